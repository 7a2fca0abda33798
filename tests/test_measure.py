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
    quantile_interval,
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


# ------------------------------------------------------------------------------ tail percentile intervals


def _binomial_cdf_reference(n: int, p: float, k: int) -> float:
    """P(B <= k) for B ~ Binomial(n, p), summed term by term: an independent check of the package's ranks."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1)) if k >= 0 else 0.0


@pytest.mark.parametrize("n", [50, 200, 1000])
@pytest.mark.parametrize("q", [50, 90, 99])
def test_quantile_interval_ranks_are_the_tightest_with_95_percent_coverage(n, q):
    values = np.arange(1, n + 1, dtype=float)  # the value is its own rank
    low, high = quantile_interval(values, q)
    p = q / 100
    # [X_(l), X_(u)] misses the true percentile when fewer than l or at least u times lie below it.
    if low is not None:
        assert _binomial_cdf_reference(n, p, int(low) - 1) <= 0.025 < _binomial_cdf_reference(n, p, int(low))
    else:
        assert _binomial_cdf_reference(n, p, 0) > 0.025
    if high is not None:
        assert _binomial_cdf_reference(n, p, int(high) - 1) >= 0.975 > _binomial_cdf_reference(n, p, int(high) - 2)
    else:
        assert _binomial_cdf_reference(n, p, n - 1) < 0.975
    # For the median the exact ranks agree with the normal approximation the p50 interval uses.
    if q == 50 and n >= 200:
        assert (low, high) == median_interval(values)


def test_quantile_interval_contains_the_true_percentile_of_a_known_distribution():
    # Exponential(1): the q-th percentile is -ln(1 - q/100).
    times = np.sort(np.random.default_rng(3).exponential(size=5000))
    for q in (50, 90, 99):
        low, high = quantile_interval(times, q)
        truth = -math.log(1 - q / 100)
        assert low <= truth <= high, (q, low, truth, high)
        assert low <= nearest_rank(times, q) <= high


def test_quantile_interval_covers_the_true_p90_and_p99_about_95_percent():
    rng = np.random.default_rng(11)
    trials = 400
    for q in (90, 99):
        truth = -math.log(1 - q / 100)
        covered = 0
        for _ in range(trials):
            low, high = quantile_interval(np.sort(rng.exponential(size=1000)), q)
            covered += low <= truth <= high
        # Exact ranks never cover less than 95 % in expectation; the discreteness makes them a little more.
        assert 0.92 <= covered / trials <= 0.995, (q, covered / trials)


def test_p99_interval_is_wider_than_the_p50_interval_on_the_same_times():
    times = np.random.default_rng(5).lognormal(mean=0.0, sigma=0.5, size=2000)
    summary = summarize(times)
    width = {q: summary[f"p{q}_ci95_ms"][1] - summary[f"p{q}_ci95_ms"][0] for q in (50, 90, 99)}
    assert width[50] < width[90] < width[99]
    for q in (50, 90, 99):
        low, high = summary[f"p{q}_ci95_ms"]
        assert low <= summary[f"p{q}_ms"] <= high


def test_p99_of_few_iterations_has_no_upper_bound_and_is_unstable():
    # Below 368 times even the largest lies under the true p99 more than 2.5 % of the time.
    summary = summarize(np.linspace(1.0, 1.01, 367))
    assert summary["p99_ci95_ms"][0] is not None and summary["p99_ci95_ms"][1] is None
    assert summary["p99_unstable"] is True
    assert summary["unstable"] is False and summary["p90_unstable"] is False  # the same times are tight there
    assert summarize(np.linspace(1.0, 1.01, 368))["p99_ci95_ms"][1] == pytest.approx(1.01)
    import json

    assert '"p99_ci95_ms": [' in json.dumps(summary) and "null" in json.dumps(summary["p99_ci95_ms"])


def test_tail_is_unstable_when_its_interval_is_wide_even_if_the_median_is_tight():
    rng = np.random.default_rng(2)
    # A tight body and a long, sparse tail: the median is sharp, the p99 is not.
    times = np.concatenate([1.0 + rng.normal(scale=0.002, size=1900), 1.0 + rng.exponential(scale=2.0, size=100)])
    summary = summarize(times)
    assert summary["unstable"] is False
    assert summary["p99_unstable"] is True


def test_mean_interval_uses_students_t():
    from optimizer.measure.latency import mean_interval

    low, high = mean_interval([1.0, 2.0, 3.0])
    assert (low, high) == (pytest.approx(2 - 4.303 / math.sqrt(3)), pytest.approx(2 + 4.303 / math.sqrt(3)))
    assert mean_interval([5.0]) is None


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
    assert summary["p90_ci95_ms"] == list(quantile_interval(np.sort(times), 90))
    assert summary["p99_ci95_ms"][1] is None and summary["p99_unstable"] is True


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
    # One trial: no interval, and no evidence of instability either.
    assert result["trials"] == 1 and result["samples_per_s_ci95"] is None and result["unstable"] is False


def test_measure_throughput_gets_an_interval_across_trials():
    import time

    result = measure_throughput(lambda: time.sleep(0.001), 8, plan(min_duration_s=0.06), trials=3)
    rates = result["trial_samples_per_s"]
    assert result["trials"] == 3 and len(rates) == 3
    low, high = result["samples_per_s_ci95"]
    assert low < float(np.mean(rates)) < high
    assert low <= result["samples_per_s"] <= high
    assert result["samples_per_s"] == pytest.approx(result["iterations"] * 8 / result["wall_s"])


def test_measure_throughput_that_drifts_between_trials_is_unstable():
    import time

    calls = {"n": 0}

    def drifting() -> None:
        calls["n"] += 1
        # Fast for the 10 warm-up calls and the first trial's 7 (its share of 20), ten times slower after.
        time.sleep(0.0004 if calls["n"] <= 17 else 0.004)

    result = measure_throughput(drifting, 8, plan(min_duration_s=0.0), trials=3)
    assert max(result["trial_samples_per_s"]) > 3 * min(result["trial_samples_per_s"])
    assert result["unstable"] is True


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
    assert summary["p90_unstable"] and summary["p99_unstable"]


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


# ------------------------------------------------------------------------------------ environment


def test_fingerprint_records_the_git_revision_of_this_checkout():
    import subprocess

    from optimizer.measure.environment import describe, fingerprint
    from tests.conftest import REPO

    try:
        done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    except FileNotFoundError:
        done = None
    env = fingerprint()
    if done is None or done.returncode != 0:
        # No git, or tests run from an unpacked source archive: there is no revision to record, and the
        # fingerprint must still be built.
        assert env["toolkit_revision"] is None
        return
    head = done.stdout.strip()
    assert env["toolkit_revision"]["commit"] == head
    assert isinstance(env["toolkit_revision"]["modified"], bool)
    assert head[:12] in describe(env)


def test_toolkit_revision_is_none_outside_a_checkout_and_never_fails(monkeypatch, tmp_path):
    import subprocess

    from optimizer.measure import environment

    real_run = subprocess.run

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(environment.subprocess, "run", no_git)
    assert environment.toolkit_revision() is None

    def hanging(*args, **kwargs):
        raise subprocess.TimeoutExpired(args[0], kwargs.get("timeout"))

    monkeypatch.setattr(environment.subprocess, "run", hanging)
    assert environment.toolkit_revision() is None

    # A package inside another project's repository, where its files are not tracked, has no revision of its own.
    def untracked(cmd, *args, **kwargs):
        if "ls-files" in cmd:
            return subprocess.CompletedProcess(cmd, 1, "", "error: pathspec did not match")
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(environment.subprocess, "run", untracked)
    assert environment.toolkit_revision() is None


def test_gpu_facts_from_nvidia_smi(monkeypatch):
    import subprocess

    from optimizer.measure import environment

    environment._nvidia_smi.cache_clear()
    monkeypatch.setattr(environment.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    output = "NVIDIA H200, 570.86.15\nNVIDIA H200, 570.86.15\n"
    monkeypatch.setattr(environment.subprocess, "run",
                        lambda cmd, **kwargs: subprocess.CompletedProcess(cmd, 0, output, ""))
    try:
        facts = environment.gpu_facts()
        assert facts is not None
        assert facts["names"] == ["NVIDIA H200", "NVIDIA H200"] and facts["driver"] == "570.86.15"
        assert facts["cuda"] == environment._torch_cuda_build()
        assert "NVIDIA H200, NVIDIA H200, driver 570.86.15" in environment.describe({"gpu": facts})
    finally:
        environment._nvidia_smi.cache_clear()


def test_gpu_facts_absent_without_a_gpu(monkeypatch):
    import subprocess

    import torch

    from optimizer.measure import environment

    environment._nvidia_smi.cache_clear()
    monkeypatch.setattr(environment.shutil, "which", lambda name: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    try:
        assert environment.gpu_facts() is None
        assert environment.fingerprint()["gpu"] is None
        # A hung or failing nvidia-smi counts as no GPU, never as a failed run.
        monkeypatch.setattr(environment.shutil, "which", lambda name: "/usr/bin/nvidia-smi")

        def hanging(cmd, **kwargs):
            raise subprocess.TimeoutExpired(cmd, kwargs.get("timeout"))

        monkeypatch.setattr(environment.subprocess, "run", hanging)
        environment._nvidia_smi.cache_clear()
        assert environment.gpu_facts() is None
    finally:
        environment._nvidia_smi.cache_clear()


def test_torch_cuda_build_is_the_same_whether_torch_is_imported_or_not(monkeypatch):
    import sys

    import torch

    from optimizer.measure import environment

    imported = environment._torch_cuda_build()
    assert imported == torch.version.cuda
    monkeypatch.delitem(sys.modules, "torch")  # read from torch/version.py, as before any import of torch
    assert environment._torch_cuda_build() == imported
