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
