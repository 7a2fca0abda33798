"""Top-1 accuracy with a 95 % interval."""

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
