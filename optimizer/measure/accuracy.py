"""Accuracy statistics: top-1 with a Wilson 95 % interval and McNemar's paired test for per-sample results
that are right or wrong; a bootstrap interval of the mean and a sign-flip permutation test for per-sample
scores that are not (a cosine similarity, an error)."""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval: unlike the normal approximation it stays inside [0, 1] near 0 % and 100 %."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0 % and 100 % rounding would exclude the estimate itself; pin those bounds exactly.
    low = 0.0 if correct == 0 else max(0.0, centre - half)
    high = 1.0 if correct == n else min(1.0, centre + half)
    return (low, high)


def top1(logits_or_predictions: np.ndarray, labels: np.ndarray) -> dict:
    predictions = logits_or_predictions if logits_or_predictions.ndim == 1 else logits_or_predictions.argmax(-1)
    correct = int((predictions == labels).sum())
    n = int(len(labels))
    low, high = wilson_interval(correct, n)
    return {"metric": "top1", "value": correct / n if n else 0.0, "n": n, "correct": correct, "ci95": [low, high]}


def mcnemar(reference_correct: np.ndarray, candidate_correct: np.ndarray, alpha: float = 0.05) -> dict:
    """Exact McNemar test on paired per-sample correctness (same samples, two models).

    Only the discordant samples carry information: b = right before and wrong after, c = the reverse.
    Under "no difference" each discordant sample falls either way with probability 1/2, so the two-sided
    p-value is twice the binomial tail of min(b, c) out of b + c (exact, no large-sample approximation).
    """
    reference_correct = np.asarray(reference_correct, dtype=bool)
    candidate_correct = np.asarray(candidate_correct, dtype=bool)
    if reference_correct.shape != candidate_correct.shape:
        raise ValueError("McNemar needs the same samples on both sides")
    b = int((reference_correct & ~candidate_correct).sum())
    c = int((~reference_correct & candidate_correct).sum())
    n = b + c
    if n == 0:
        p_value = 1.0
    else:
        # Sum in log space: n can be thousands, where 2**-n underflows a float.
        log_terms = [math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) - n * math.log(2)
                     for k in range(min(b, c) + 1)]
        top = max(log_terms)
        p_value = min(1.0, 2 * math.exp(top) * sum(math.exp(t - top) for t in log_terms))
    return {"test": "mcnemar", "only_baseline_right": b, "only_stage_right": c, "p_value": p_value,
            "significant": bool(p_value < alpha)}


# Resamples of the bootstrap interval and of the permutation test: with 2,000 the Monte Carlo error of a 2.5 %
# percentile is about 0.35 percentage points of coverage, and the smallest p-value is 1/2001.
RESAMPLES = 2000
# Rows of resampled indices drawn at once: bounds memory at about 16 MB whatever the eval set's size.
_CHUNK_VALUES = 2_000_000


def _resampled_means(values: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Means of ``resamples`` bootstrap samples (n draws with replacement) of ``values``."""
    n = len(values)
    out = np.empty(resamples)
    rows = max(1, _CHUNK_VALUES // max(n, 1))
    for start in range(0, resamples, rows):
        count = min(rows, resamples - start)
        out[start:start + count] = values[rng.integers(0, n, size=(count, n))].mean(axis=1)
    return out


def bootstrap_interval(values: np.ndarray, *, seed: int, resamples: int = RESAMPLES) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the mean of per-sample ``values`` (seeded, so reproducible).

    Makes no assumption about the scores' distribution; with few samples it is somewhat too narrow, as
    every percentile bootstrap is."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return (float("nan"), float("nan"))
    if np.all(values == values[0]):
        return (float(values[0]), float(values[0]))  # no spread: every resample has the same mean
    means = _resampled_means(values, resamples, np.random.default_rng(seed))
    low, high = np.quantile(means, [0.025, 0.975])
    return (float(low), float(high))


def sign_flip_test(reference: np.ndarray, candidate: np.ndarray, *, seed: int, resamples: int = RESAMPLES,
                   alpha: float = 0.05) -> dict:
    """Paired test of the mean difference of per-sample scores (same samples, two models).

    Under "no difference" each sample's difference d = candidate - reference is as likely to have either
    sign, so flipping signs at random gives the null distribution of the mean difference; the two-sided
    p-value is the share of ``resamples`` flips (plus the observed one) whose mean is at least as far from 0.
    The interval of the difference is a paired bootstrap (the samples resampled, both scores together)."""
    reference = np.asarray(reference, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    if reference.shape != candidate.shape:
        raise ValueError("the paired test needs the same samples on both sides")
    d = candidate - reference
    observed = float(d.mean()) if len(d) else 0.0
    result = {"test": "sign-flip", "mean_difference": observed, "resamples": resamples}
    if not len(d) or not np.any(d):
        return {**result, "difference_ci95": [observed, observed], "p_value": 1.0, "significant": False}
    rng = np.random.default_rng(seed)
    n = len(d)
    extreme = 0
    rows = max(1, _CHUNK_VALUES // n)
    # A flip's mean equal to the observed one up to rounding counts as "as extreme".
    threshold = abs(observed) * (1 - 1e-9)
    for start in range(0, resamples, rows):
        count = min(rows, resamples - start)
        signs = rng.integers(0, 2, size=(count, n), dtype=np.int8) * 2 - 1
        extreme += int((np.abs((signs * d).mean(axis=1)) >= threshold).sum())
    p_value = (extreme + 1) / (resamples + 1)
    low, high = bootstrap_interval(d, seed=seed + 1, resamples=resamples)
    return {**result, "difference_ci95": [low, high], "p_value": p_value, "significant": bool(p_value < alpha)}
