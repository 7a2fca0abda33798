"""Latency and throughput of one callable, following the practice of trtexec and torch.utils.benchmark.

Warm-up runs for at least max(10 iterations, ``warmup_s``); timing then runs until both a minimum count
and a minimum duration are reached, so the p99 is read off enough samples. Every iteration gets its
own monotonic timestamp; the raw times are returned so anyone can recompute the statistics.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from optimizer.measure.accuracy import Z95

# When the 95 % interval of the median is wider than this share of the median, the figure is noise.
UNSTABLE_RELATIVE_CI = 0.10


@dataclass(frozen=True)
class TimingPlan:
    warmup_s: float
    min_iterations: int
    min_duration_s: float
    max_duration_s: float
    mode: str = "full"

    @classmethod
    def from_spec(cls, spec: dict) -> "TimingPlan":
        if spec.get("mode") == "quick":
            # Labelled in the report; for tests and smoke runs, never for published figures.
            return cls(warmup_s=0.1, min_iterations=30, min_duration_s=0.1, max_duration_s=5.0, mode="quick")
        return cls(
            warmup_s=spec["warmup_s"],
            min_iterations=spec["min_iterations"],
            min_duration_s=spec["min_duration_s"],
            max_duration_s=spec["max_duration_s"],
        )


def nearest_rank(sorted_values: np.ndarray, q: float) -> float:
    """The q-th percentile by nearest rank: always one of the measured values."""
    n = len(sorted_values)
    rank = max(1, math.ceil(q / 100 * n))
    return float(sorted_values[rank - 1])


def median_interval(sorted_values: np.ndarray) -> tuple[float, float]:
    """Distribution-free 95 % interval for the median from order statistics (normal approx. of Binomial)."""
    n = len(sorted_values)
    half = Z95 * math.sqrt(n) / 2
    low = max(1, math.floor(n / 2 - half))
    high = min(n, math.ceil(n / 2 + half + 1))
    return float(sorted_values[low - 1]), float(sorted_values[high - 1])


def summarize(times_ms: np.ndarray) -> dict:
    ordered = np.sort(times_ms)
    p50 = nearest_rank(ordered, 50)
    low, high = median_interval(ordered)
    mean = float(ordered.mean())
    std = float(ordered.std(ddof=1)) if len(ordered) > 1 else 0.0
    return {
        "p50_ms": p50,
        "p90_ms": nearest_rank(ordered, 90),
        "p99_ms": nearest_rank(ordered, 99),
        "mean_ms": mean,
        "min_ms": float(ordered[0]),
        "max_ms": float(ordered[-1]),
        "cv": std / mean if mean else 0.0,
        "p50_ci95_ms": [low, high],
        "iterations": int(len(ordered)),
        "unstable": bool(p50 > 0 and (high - low) / p50 > UNSTABLE_RELATIVE_CI),
    }


def warm_up(fn: Callable[[], object], seconds: float) -> int:
    start = time.perf_counter()
    count = 0
    while count < 10 or time.perf_counter() - start < seconds:
        fn()
        count += 1
    return count


def time_iterations(
    fn: Callable[[], object], plan: TimingPlan, on_progress: Callable[[float], None] | None = None,
    *, warm: bool = True,
) -> tuple[dict, np.ndarray]:
    """Time ``fn`` per iteration. Returns (summary, raw times in ms)."""
    warmups = warm_up(fn, plan.warmup_s) if warm else 0
    times: list[int] = []
    clock = time.perf_counter_ns
    start = clock()
    next_report = start
    while True:
        before = clock()
        fn()
        after = clock()
        times.append(after - before)
        elapsed_s = (after - start) / 1e9
        if len(times) >= plan.min_iterations and elapsed_s >= plan.min_duration_s:
            break
        if elapsed_s >= plan.max_duration_s:
            break
        if on_progress is not None and after >= next_report:
            on_progress(min(1.0, max(len(times) / plan.min_iterations, elapsed_s / max(plan.min_duration_s, 1e-9))))
            next_report = after + 200_000_000
    raw_ms = np.asarray(times, dtype=np.float64) / 1e6
    summary = summarize(raw_ms)
    summary.update({"warmup_iterations": warmups, "duration_s": (clock() - start) / 1e9, "mode": plan.mode})
    return summary, raw_ms


def time_trials(
    fn: Callable[[], object], plan: TimingPlan, trials: int, on_progress: Callable[[float], None] | None = None
) -> tuple[dict, np.ndarray]:
    """Warm up once, then time ``trials`` back-to-back blocks that share the plan's iterations and duration.

    The pooled times give the percentiles and the interval of the median; the blocks' own medians show
    drift within the measurement (thermal, frequency, a neighbour waking up), which a single interval
    computed as if the iterations were independent would hide.
    """
    warmups = warm_up(fn, plan.warmup_s)
    share = TimingPlan(warmup_s=0.0, min_iterations=max(10, math.ceil(plan.min_iterations / trials)),
                       min_duration_s=plan.min_duration_s / trials, max_duration_s=plan.max_duration_s / trials,
                       mode=plan.mode)
    blocks: list[np.ndarray] = []
    for index in range(trials):
        report = None if on_progress is None else (lambda f, i=index: on_progress((i + f) / trials))
        _, raw = time_iterations(fn, share, report, warm=False)
        blocks.append(raw)
    raw_ms = np.concatenate(blocks)
    summary = summarize(raw_ms)
    trial_p50 = [nearest_rank(np.sort(block), 50) for block in blocks]
    middle = float(np.median(trial_p50))
    spread = (max(trial_p50) - min(trial_p50)) / middle if middle > 0 else 0.0
    summary.update({
        "warmup_iterations": warmups,
        "duration_s": float(raw_ms.sum() / 1e3),
        "mode": plan.mode,
        "trials": trials,
        "trial_p50_ms": trial_p50,
        "trial_spread": spread,
        "unstable": bool(summary["unstable"] or (trials > 1 and spread > UNSTABLE_RELATIVE_CI)),
    })
    return summary, raw_ms


def sweep_plan(plan: TimingPlan) -> TimingPlan:
    """A shorter plan for each point of a batch-size sweep: the sweep shows a curve, not a p99."""
    if plan.mode == "quick":
        return plan
    return TimingPlan(warmup_s=min(plan.warmup_s, 0.5), min_iterations=max(50, plan.min_iterations // 10),
                      min_duration_s=max(1.0, plan.min_duration_s / 3), max_duration_s=plan.max_duration_s / 3)


def measure_throughput(fn: Callable[[], object], batch_size: int, plan: TimingPlan) -> dict:
    """Offline scenario: samples per second = samples processed / wall time, after warm-up."""
    warm_up(fn, min(plan.warmup_s, 1.0))
    iterations = 0
    start = time.perf_counter()
    min_iterations = 5 if plan.mode == "quick" else 20
    while True:
        fn()
        iterations += 1
        wall = time.perf_counter() - start
        if (iterations >= min_iterations and wall >= plan.min_duration_s) or wall >= plan.max_duration_s:
            break
    return {
        "batch_size": batch_size,
        "samples_per_s": iterations * batch_size / wall,
        "iterations": iterations,
        "wall_s": wall,
    }
