"""Latency statistics and timing loop; top-1 accuracy with its Wilson interval."""

from __future__ import annotations

import math

import numpy as np
import pytest

from optimizer.measure.accuracy import Z95, top1, wilson_interval
from optimizer.measure.latency import (
    TimingPlan,
    measure_throughput,
    median_interval,
    nearest_rank,
    summarize,
    time_iterations,
    warm_up,
)

# ------------------------------------------------------------------------------------ percentiles


def test_nearest_rank_on_one_to_ten():
    values = np.arange(1, 11, dtype=float)
    assert nearest_rank(values, 50) == 5
    assert nearest_rank(values, 90) == 9
    assert nearest_rank(values, 91) == 10
    assert nearest_rank(values, 99) == 10
    assert nearest_rank(values, 100) == 10
    assert nearest_rank(values, 10) == 1
    assert nearest_rank(values, 0) == 1


def test_nearest_rank_on_one_to_hundred():
    values = np.arange(1, 101, dtype=float)
    for q in (1, 25, 50, 90, 99, 100):
        assert nearest_rank(values, q) == q
    assert nearest_rank(values, 99.5) == 100
    assert nearest_rank(values, 0.5) == 1


def test_nearest_rank_is_always_a_measured_value():
    rng = np.random.default_rng(0)
    values = np.sort(rng.lognormal(size=37))
    for q in np.linspace(0, 100, 41):
        assert nearest_rank(values, q) in values
    assert nearest_rank(np.array([4.2]), 99) == 4.2


def test_nearest_rank_is_monotone_in_q():
    values = np.sort(np.random.default_rng(1).normal(size=101))
    ranks = [nearest_rank(values, q) for q in range(0, 101)]
    assert ranks == sorted(ranks)


# -------------------------------------------------------------------------------- median interval


def test_median_interval_known_ranks():
    # n = 100: half-width 1.96 * sqrt(100) / 2 = 9.8 ranks -> order statistics 40 and 61.
    values = np.arange(1, 101, dtype=float)
    assert median_interval(values) == (40.0, 61.0)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 10, 31, 100, 1000, 10001])
def test_median_interval_contains_the_median(n):
    values = np.sort(np.random.default_rng(n).exponential(size=n))
    low, high = median_interval(values)
    median = nearest_rank(values, 50)
    assert low <= median <= high
    assert low in values and high in values
    assert values[0] <= low and high <= values[-1]


def test_median_interval_narrows_with_more_samples():
    widths = []
    for n in (25, 100, 1000, 10000, 100000):
        # Quantiles of the same distribution: only n changes.
        values = np.sort(np.random.default_rng(0).normal(loc=10.0, size=n))
        low, high = median_interval(values)
        widths.append(high - low)
    assert all(a > b for a, b in zip(widths, widths[1:])), widths
    assert widths[-1] < 0.05 * widths[0]


def test_median_interval_covers_the_true_median_about_95_percent():
    rng = np.random.default_rng(7)
    covered = 0
    trials = 400
    for _ in range(trials):
        values = np.sort(rng.exponential(size=200))
        low, high = median_interval(values)
        covered += low <= math.log(2) <= high
    assert 0.90 <= covered / trials <= 0.995


# ------------------------------------------------------------------------------------- summarize


def test_summarize_fields():
    times = np.arange(100, 0, -1, dtype=float)  # unsorted on purpose
    summary = summarize(times)
    assert set(summary) >= {"p50_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms", "max_ms", "cv", "p50_ci95_ms",
                            "iterations", "unstable"}
    assert summary["p50_ms"] == 50
    assert summary["p90_ms"] == 90
    assert summary["p99_ms"] == 99
    assert summary["min_ms"] == 1
    assert summary["max_ms"] == 100
    assert summary["mean_ms"] == pytest.approx(50.5)
    assert summary["iterations"] == 100
    assert summary["cv"] == pytest.approx(np.std(times, ddof=1) / 50.5)
    assert summary["p50_ci95_ms"] == [40.0, 61.0]
    assert summary["unstable"] is True  # the interval spans 42 % of the median


def test_summarize_stable_figures():
    rng = np.random.default_rng(0)
    times = 2.0 + rng.normal(scale=0.01, size=2000)
    summary = summarize(times)
    assert summary["unstable"] is False
    assert summary["p50_ci95_ms"][0] <= summary["p50_ms"] <= summary["p50_ci95_ms"][1]
    assert summary["p50_ms"] <= summary["p90_ms"] <= summary["p99_ms"] <= summary["max_ms"]
    assert summary["cv"] == pytest.approx(0.005, rel=0.1)


def test_summarize_single_value():
    summary = summarize(np.array([3.0]))
    assert summary["p50_ms"] == summary["p99_ms"] == summary["min_ms"] == summary["max_ms"] == 3.0
    assert summary["cv"] == 0.0
    assert summary["iterations"] == 1
    assert summary["unstable"] is False


def test_summary_is_json_serializable():
    import json

    json.dumps(summarize(np.array([1.0, 2.0, 3.0])))


# ---------------------------------------------------------------------------------- timing loop


class Counter:
    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1


def plan(**kwargs) -> TimingPlan:
    defaults = dict(warmup_s=0.0, min_iterations=10, min_duration_s=0.0, max_duration_s=60.0)
    return TimingPlan(**{**defaults, **kwargs})


def test_warm_up_runs_at_least_ten_iterations():
    fn = Counter()
    assert warm_up(fn, 0.0) == 10
    assert fn.calls == 10


def test_time_iterations_stops_at_min_iterations_when_duration_is_met():
    fn = Counter()
    summary, raw = time_iterations(fn, plan(min_iterations=50))
    assert len(raw) == 50
    assert summary["iterations"] == 50
    assert summary["warmup_iterations"] == 10
    assert fn.calls == 60
    assert raw.dtype == np.float64 and (raw >= 0).all()
    assert summary["mode"] == "full"


def test_time_iterations_runs_until_min_duration():
    fn = Counter()
    summary, raw = time_iterations(fn, plan(min_iterations=10, min_duration_s=0.05))
    assert summary["duration_s"] >= 0.05
    # A call costs microseconds: reaching 50 ms takes far more than the minimum count.
    assert len(raw) > 10
    assert fn.calls == len(raw) + summary["warmup_iterations"]


def test_time_iterations_stops_at_max_duration():
    fn = Counter()
    summary, raw = time_iterations(fn, plan(min_iterations=10**12, min_duration_s=0.0, max_duration_s=0.05))
    assert 10 <= len(raw) < 10**12
    assert 0.05 <= summary["duration_s"] < 5


def test_time_iterations_raw_times_match_the_summary():
    summary, raw = time_iterations(Counter(), plan(min_iterations=200))
    again = summarize(raw)
    for key in ("p50_ms", "p99_ms", "mean_ms", "min_ms", "max_ms", "iterations"):
        assert summary[key] == again[key]


def test_time_iterations_reports_progress_between_zero_and_one():
    seen: list[float] = []
    time_iterations(Counter(), plan(min_iterations=10, min_duration_s=0.3), on_progress=seen.append)
    assert seen
    assert all(0.0 <= p <= 1.0 for p in seen)
    assert seen == sorted(seen)


def test_timing_plan_from_spec():
    full = TimingPlan.from_spec({"warmup_s": 1.0, "min_iterations": 1000, "min_duration_s": 3.0,
                                 "max_duration_s": 60.0, "mode": "full"})
    assert (full.min_iterations, full.min_duration_s, full.mode) == (1000, 3.0, "full")
    quick = TimingPlan.from_spec({"warmup_s": 1.0, "min_iterations": 1000, "min_duration_s": 3.0,
                                  "max_duration_s": 60.0, "mode": "quick"})
    assert quick.mode == "quick"
    assert quick.min_iterations < full.min_iterations and quick.max_duration_s < full.max_duration_s


def test_measure_throughput_counts_samples():
    fn = Counter()
    result = measure_throughput(fn, 32, plan(min_duration_s=0.02))
    assert result["batch_size"] == 32
    assert result["iterations"] >= 20
    assert result["wall_s"] >= 0.02
    assert result["samples_per_s"] == pytest.approx(result["iterations"] * 32 / result["wall_s"])
    assert fn.calls >= 10 + result["iterations"]


# --------------------------------------------------------------------------------------- accuracy


def test_wilson_interval_known_values():
    low, high = wilson_interval(90, 100)
    assert low == pytest.approx(0.8256, abs=5e-4)
    assert high == pytest.approx(0.9448, abs=5e-4)
    low, high = wilson_interval(50, 100)
    assert (low, high) == (pytest.approx(0.4038, abs=5e-4), pytest.approx(0.5962, abs=5e-4))
    low, high = wilson_interval(0, 10)
    assert low == 0.0
    assert high == pytest.approx(0.2775, abs=5e-4)


def test_wilson_interval_stays_in_unit_range_and_is_symmetric():
    for n in (1, 7, 100, 10000):
        for k in range(0, n + 1, max(1, n // 10)):
            low, high = wilson_interval(k, n)
            assert 0.0 <= low <= high <= 1.0
            if 0 < k < n:
                assert low < k / n < high
            mirror_low, mirror_high = wilson_interval(n - k, n)
            assert low == pytest.approx(1 - mirror_high, abs=1e-12)
            assert high == pytest.approx(1 - mirror_low, abs=1e-12)


def test_wilson_interval_narrows_with_n():
    widths = [np.subtract(*wilson_interval(9 * n // 10, n)[::-1]) for n in (10, 100, 1000, 10000)]
    assert all(a > b for a, b in zip(widths, widths[1:]))
    # About 2 * 1.96 * sqrt(p (1 - p) / n) for large n.
    assert widths[-1] == pytest.approx(2 * Z95 * math.sqrt(0.09 / 10000), rel=0.01)


@pytest.mark.parametrize("n", [3, 7, 10, 100, 10000])
def test_wilson_interval_at_zero_and_full_accuracy_contains_the_estimate(n):
    # The Wilson interval of 0/n starts at exactly 0 and that of n/n ends at exactly 1; a report of
    # "100 % (ci 72.2-99.99999 %)" would exclude the measured value itself.
    assert wilson_interval(0, n)[0] == 0.0
    assert wilson_interval(n, n)[1] == 1.0
    result = top1(np.arange(n) % 10, np.arange(n) % 10)
    assert result["value"] == 1.0
    assert result["ci95"][0] <= result["value"] <= result["ci95"][1]


def test_wilson_interval_of_nothing():
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_top1_from_logits():
    logits = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.3, 0.2, 0.5], [0.0, 0.0, 1.0]], np.float32)
    labels = np.array([1, 0, 0, 2])
    result = top1(logits, labels)
    assert result["metric"] == "top1"
    assert result["n"] == 4
    assert result["correct"] == 3
    assert result["value"] == 0.75
    assert result["ci95"] == pytest.approx(list(wilson_interval(3, 4)))


def test_top1_from_predictions():
    result = top1(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 0]))
    assert (result["correct"], result["n"], result["value"]) == (2, 4, 0.5)


def test_top1_on_fashion_mnist_sized_input():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 10000)
    logits = rng.normal(size=(10000, 10))
    logits[np.arange(9000), labels[:9000]] += 100  # the first 9000 are surely right
    logits[np.arange(9000, 10000), labels[9000:]] -= 100  # the rest surely wrong
    result = top1(logits, labels)
    assert result["correct"] == 9000
    assert result["value"] == 0.9
    low, high = result["ci95"]
    assert low < 0.9 < high and high - low < 0.02


# ------------------------------------------------------------------------------ trials, sweep, McNemar


def test_mcnemar_matches_the_exact_binomial_test():
    from optimizer.measure.accuracy import mcnemar

    reference = np.array([True] * 100 + [False] * 10)
    candidate = np.array([True] * 90 + [False] * 10 + [True] * 3 + [False] * 7)
    result = mcnemar(reference, candidate)
    assert (result["only_baseline_right"], result["only_stage_right"]) == (10, 3)
    # Two-sided exact binomial: 2 * P(X <= 3 | n=13, p=1/2) = 2 * (1 + 13 + 78 + 286) / 8192.
    assert result["p_value"] == pytest.approx(2 * 378 / 8192)
    assert not result["significant"]


def test_mcnemar_identical_models_and_a_clear_loss():
    from optimizer.measure.accuracy import mcnemar

    same = np.ones(1000, dtype=bool)
    assert mcnemar(same, same) == {"test": "mcnemar", "only_baseline_right": 0, "only_stage_right": 0,
                                   "p_value": 1.0, "significant": False}
    worse = same.copy()
    worse[:60] = False  # 60 samples lost, none gained: far beyond chance, and no float underflow
    result = mcnemar(same, worse)
    assert result["significant"] and 0 < result["p_value"] < 1e-15


def test_mcnemar_large_balanced_discordance_is_not_significant():
    from optimizer.measure.accuracy import mcnemar

    reference = np.array([True, False] * 3000)
    candidate = np.array([False, True] * 3000)
    result = mcnemar(reference, candidate)
    assert result["p_value"] == pytest.approx(1.0) and not result["significant"]


def test_time_trials_reports_each_trial_and_pools_the_times():
    from optimizer.measure.latency import TimingPlan, time_trials

    plan = TimingPlan(warmup_s=0.0, min_iterations=60, min_duration_s=0.0, max_duration_s=5.0)
    summary, raw = time_trials(lambda: None, plan, 3)
    assert summary["trials"] == 3 and len(summary["trial_p50_ms"]) == 3
    assert summary["iterations"] == len(raw) >= 60
    assert summary["trial_spread"] >= 0


def test_time_trials_marks_drift_between_trials_unstable():
    import time

    from optimizer.measure.latency import TimingPlan, time_trials

    calls = {"n": 0}

    def drifting() -> None:
        # The first trial's calls are ten times faster than the later ones: a machine that changed speed.
        calls["n"] += 1
        time.sleep(0.0002 if calls["n"] <= 30 else 0.002)

    plan = TimingPlan(warmup_s=0.0, min_iterations=60, min_duration_s=0.0, max_duration_s=5.0)
    summary, _ = time_trials(drifting, plan, 3)
    assert summary["trial_spread"] > 0.5
    assert summary["unstable"]


def test_sweep_plan_is_shorter_than_the_main_plan():
    from optimizer.measure.latency import TimingPlan, sweep_plan

    full = TimingPlan(warmup_s=1.0, min_iterations=1000, min_duration_s=3.0, max_duration_s=60.0)
    sweep = sweep_plan(full)
    assert sweep.min_iterations < full.min_iterations and sweep.min_duration_s <= full.min_duration_s
    quick = TimingPlan.from_spec({"mode": "quick"})
    assert sweep_plan(quick) == quick


def test_profile_summary_shape():
    from optimizer.measure.profile import summarize_profile

    entries = [("conv1", "Conv", 300.0), ("conv2", "Conv", 100.0), ("fc", "Gemm", 100.0)] * 2
    profile = summarize_profile("onnxruntime", entries, iterations=2)
    assert profile["total_ms"] == pytest.approx(0.5)
    assert profile["by_op_type"][0] == {"op_type": "Conv", "ms": pytest.approx(0.4), "share": pytest.approx(0.8)}
    assert profile["top_ops"][0]["name"] == "conv1"


def test_onnxruntime_providers_never_fall_back_silently():
    from optimizer.errors import MissingDependency
    from optimizer.runtimes.onnxruntime_cpu import session_providers

    assert session_providers(["cpu"], ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert session_providers(["cuda"], ["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(MissingDependency, match="CUDAExecutionProvider.*onnxruntime-gpu"):
        session_providers(["cuda"], ["CPUExecutionProvider"])
