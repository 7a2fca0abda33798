"""Latency and throughput of one callable, following the practice of trtexec and torch.utils.benchmark.

Warm-up runs for at least max(10 iterations, ``warmup_s``); timing then runs until both a minimum count
and a minimum duration are reached, so the p99 is read off enough samples. Every iteration gets its
own monotonic timestamp; the raw times are returned so anyone can recompute the statistics.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from optimizer.measure.accuracy import Z95

# When the 95 % interval of the median is wider than this share of the median, the figure is noise.
UNSTABLE_RELATIVE_CI = 0.10
# Two-sided 95 % quantiles of Student's t for 1..19 degrees of freedom (recipes allow at most 20 trials).
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093)


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


def quantile_interval(sorted_values: np.ndarray, q: float,
                      confidence: float = 0.95) -> tuple[float | None, float | None]:
    """Distribution-free interval for the q-th percentile from order statistics, with exact Binomial ranks.

    The number of times below the true percentile is Binomial(n, q/100), so the l-th and u-th smallest times
    bracket it with probability P(l <= B < u); l and u leave at most (1 - confidence) / 2 on each side. A
    bound no order statistic reaches at this confidence is None: the upper bound of a p99 needs
    n >= 368, since even the largest of fewer times lies below the true p99 more than 2.5 % of the time.
    """
    n = len(sorted_values)
    if n == 0:
        return None, None
    p = min(max(q / 100, 0.0), 1.0)
    tail = (1 - confidence) / 2
    cdf = _binomial_cdf(n, p)  # cdf[k] = P(B <= k), k = 0..n
    # Largest l with P(B <= l - 1) <= tail, smallest u with P(B <= u - 1) >= 1 - tail.
    below = np.flatnonzero(cdf[:n] <= tail)
    above = np.flatnonzero(cdf[:n] >= 1 - tail)
    low = float(sorted_values[below[-1]]) if len(below) else None
    high = float(sorted_values[above[0]]) if len(above) else None
    return low, high


def _binomial_cdf(n: int, p: float) -> np.ndarray:
    """P(B <= k) for k = 0..n, B ~ Binomial(n, p); the pmf in log space, so large n does not underflow."""
    if p <= 0.0 or p >= 1.0:
        return np.ones(n + 1) if p <= 0.0 else np.r_[np.zeros(n), 1.0]
    k = np.arange(n)
    log_ratio = np.log((n - k) / (k + 1)) + math.log(p / (1 - p))  # log pmf(k + 1) - log pmf(k)
    log_pmf = n * math.log1p(-p) + np.r_[0.0, np.cumsum(log_ratio)]
    cdf = np.cumsum(np.exp(log_pmf - log_pmf.max()))
    return cdf / cdf[-1]


def relative_width(interval: Sequence[float | None], value: float) -> float:
    """Width of an interval as a share of its figure; infinite when a bound is missing."""
    low, high = interval
    if low is None or high is None:
        return math.inf
    return (high - low) / value if value > 0 else 0.0


def summarize(times_ms: np.ndarray) -> dict:
    ordered = np.sort(times_ms)
    p50 = nearest_rank(ordered, 50)
    low, high = median_interval(ordered)
    mean = float(ordered.mean())
    std = float(ordered.std(ddof=1)) if len(ordered) > 1 else 0.0
    summary = {
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
    for q in (90, 99):
        interval = list(quantile_interval(ordered, q))
        summary[f"p{q}_ci95_ms"] = interval
        # The tail is judged like the median; too few times to bound it at all is unstable too.
        summary[f"p{q}_unstable"] = bool(relative_width(interval, summary[f"p{q}_ms"]) > UNSTABLE_RELATIVE_CI)
    return summary


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
    })
    # A machine that changed speed between trials makes every percentile suspect, not only the median.
    drifted = trials > 1 and spread > UNSTABLE_RELATIVE_CI
    for key in ("unstable", "p90_unstable", "p99_unstable"):
        summary[key] = bool(summary[key] or drifted)
    return summary, raw_ms


def sweep_plan(plan: TimingPlan) -> TimingPlan:
    """A shorter plan for each point of a batch-size sweep: the sweep shows a curve, not a p99."""
    if plan.mode == "quick":
        return plan
    return TimingPlan(warmup_s=min(plan.warmup_s, 0.5), min_iterations=max(50, plan.min_iterations // 10),
                      min_duration_s=max(1.0, plan.min_duration_s / 3), max_duration_s=plan.max_duration_s / 3)


def mean_interval(values: Sequence[float]) -> tuple[float, float] | None:
    """95 % Student-t interval of the mean of a few independent figures (None for fewer than two)."""
    k = len(values)
    if k < 2:
        return None
    mean = float(np.mean(values))
    # Beyond the table t changes little; its last entry errs on the wide side.
    half = T95[min(k - 1, len(T95)) - 1] * float(np.std(values, ddof=1)) / math.sqrt(k)
    return mean - half, mean + half


def measure_throughput(fn: Callable[[], object], batch_size: int, plan: TimingPlan, trials: int = 1) -> dict:
    """Offline scenario: samples per second = samples processed / wall time, after warm-up.

    The time is split into ``trials`` back-to-back blocks like the latency measurement; the blocks' own rates
    give the figure a 95 % interval (Student's t across trials) and show drift within the measurement.
    """
    warm_up(fn, min(plan.warmup_s, 1.0))
    min_iterations = 5 if plan.mode == "quick" else 20
    share_iterations = max(2, math.ceil(min_iterations / trials))
    counts: list[int] = []
    walls: list[float] = []
    for _ in range(trials):
        iterations = 0
        start = time.perf_counter()
        while True:
            fn()
            iterations += 1
            wall = time.perf_counter() - start
            if ((iterations >= share_iterations and wall >= plan.min_duration_s / trials)
                    or wall >= plan.max_duration_s / trials):
                break
        counts.append(iterations)
        walls.append(wall)
    rates = [count * batch_size / wall for count, wall in zip(counts, walls)]
    samples_per_s = sum(counts) * batch_size / sum(walls)
    interval = mean_interval(rates)
    return {
        "batch_size": batch_size,
        "samples_per_s": samples_per_s,
        "iterations": sum(counts),
        "wall_s": sum(walls),
        "trials": trials,
        "trial_samples_per_s": rates,
        "samples_per_s_ci95": list(interval) if interval else None,
        # One trial gives no interval and so no evidence either way; like p50's rule otherwise.
        "unstable": bool(interval is not None and relative_width(interval, samples_per_s) > UNSTABLE_RELATIVE_CI),
    }
