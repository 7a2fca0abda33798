"""The accuracy metric of a recipe (``evaluate.accuracy.metric``) as one score per eval sample.

Every metric gives each eval sample a score, so that every stage gets an interval and a paired test against
the baseline on the same samples, whatever the metric:

- ``top1`` / ``top5``: 1 when the label is the arg-max / among the five largest outputs, else 0;
- ``agreement``: similarity to the baseline's own outputs on the same sample (labels unused): ``top1``, 1 when
  the arg-max classes match, or ``cosine``, the cosine similarity of the flattened outputs. The baseline
  scores 1 by definition;
- ``python:module:function``: ``function(outputs, labels)`` on the whole eval set (numpy arrays: the model's
  first output and the labels), returning one float per sample.

Scores that are all 0 or 1 (the class metrics always) are a proportion: Wilson interval and McNemar's test.
Other scores get a bootstrap interval of their mean and a sign-flip permutation test of the paired
differences (``measure/accuracy.py``). Cosine agreement is always treated as a mean, so that the baseline's
1.0 and a stage's 0.99 are shown and tested alike.

This module runs in the measurement process; the renderers only use ``metric_name``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from optimizer.errors import RecipeError

FIELD = "evaluate.accuracy.metric"
TOP_K = 5


def metric_name(metric: str, agreement: str | None = None) -> str:
    """How reports name a metric: 'top-1', 'top-5', 'top-1 agreement', 'cosine agreement', or a python:
    metric's function name."""
    if metric == "top1":
        return "top-1"
    if metric == "top5":
        return "top-5"
    if metric == "agreement":
        return "cosine agreement" if agreement == "cosine" else "top-1 agreement"
    return metric.rsplit(":", 1)[-1].rsplit(".", 1)[-1]


@dataclass(frozen=True)
class Metric:
    metric: str = "top1"
    agreement: str | None = None        # for metric 'agreement': 'top1' (when unset) or 'cosine'
    higher_is_better: bool = True

    @classmethod
    def from_settings(cls, settings: dict[str, Any] | None) -> "Metric":
        settings = settings or {}
        return cls(settings.get("metric") or "top1", settings.get("agreement"),
                   bool(settings.get("higher_is_better", True)))

    @property
    def cosine(self) -> bool:
        return self.metric == "agreement" and self.agreement == "cosine"

    @property
    def custom(self) -> bool:
        return self.metric.startswith("python:")

    @property
    def classifies(self) -> bool:
        """Scores judge the arg-max class (so a model predicting one class everywhere is broken)."""
        return self.metric in ("top1", "top5") or (self.metric == "agreement" and not self.cosine)

    @property
    def name(self) -> str:
        return metric_name(self.metric, self.agreement)

    def label(self) -> str:
        return f"metric '{self.metric}'" + (f" (agreement: {self.agreement})" if self.metric == "agreement" else "")


# ------------------------------------------------------------------------------------ per batch


def kept_from_batch(metric: Metric, outputs: np.ndarray) -> np.ndarray | None:
    """What the metric needs of one batch's outputs beyond the arg-max (which the worker always keeps):
    nothing for top-1, the five best classes for top-5, the flattened outputs for cosine agreement, the
    outputs as they are for a python: metric. Keeping no more keeps a large eval set's memory small."""
    flat = outputs.reshape(len(outputs), -1)
    if metric.metric == "top5":
        if flat.shape[1] < TOP_K:
            raise RecipeError(f"{FIELD}: top5 needs at least {TOP_K} classes; the model's output has {flat.shape[1]} "
                              "values per sample; use top1")
        return np.argpartition(-flat, TOP_K - 1, axis=1)[:, :TOP_K]
    if metric.cosine:
        if flat.shape[1] < 2:
            raise RecipeError(f"{FIELD}: cosine agreement needs more than one output value per sample; the model "
                              "gives 1; use a python:module:function metric")
        return np.array(flat, dtype=np.float32)
    if metric.custom:
        return np.array(outputs)
    if metric.metric == "agreement" and flat.shape[1] < 2:
        raise RecipeError(f"{FIELD}: top-1 agreement needs a class dimension (more than one output value per "
                          "sample); the model gives 1; set evaluate.accuracy.agreement: cosine or use a python: metric")
    return None


# ------------------------------------------------------------------------------------ scores


def load_function(metric: Metric) -> Callable[..., Any]:
    from optimizer.registry import import_object

    function = import_object(metric.metric.removeprefix("python:"), where=FIELD)
    if not callable(function):
        raise RecipeError(f"{FIELD}: '{metric.metric}' is not callable; name a function(outputs, labels)")
    return function  # type: ignore[return-value]


def _class_labels(labels: np.ndarray, metric: Metric) -> np.ndarray:
    if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or np.all(labels == np.round(labels))):
        raise RecipeError(f"{FIELD}: {metric.metric} needs one class index per sample; the eval labels have shape "
                          f"{list(labels.shape)} and dtype {labels.dtype}; use a python:module:function metric")
    return labels


def sample_scores(metric: Metric, *, predictions: np.ndarray, kept: np.ndarray | None, labels: np.ndarray,
                  reference: np.ndarray | None, tolerate_non_finite: bool = False) -> np.ndarray:
    """One float per eval sample. ``reference`` is the baseline's arg-max (top-1 agreement) or flattened
    outputs (cosine agreement); None while measuring the baseline itself, which agrees with itself.
    ``tolerate_non_finite``: the outputs hold NaN or infinities (a gate fails the stage for that); their
    scores count as 0 rather than stopping the measurement with a less precise message."""
    n = len(predictions)
    if metric.metric == "top1":
        return (predictions == _class_labels(labels, metric)).astype(np.float64)
    if metric.metric == "top5":
        assert kept is not None
        return (kept == _class_labels(labels, metric)[:, None]).any(axis=1).astype(np.float64)
    if metric.metric == "agreement":
        if reference is None:
            return np.ones(n)  # the baseline is its own reference
        if len(reference) != n:
            raise RecipeError(f"{FIELD}: the baseline's reference outputs cover {len(reference)} samples, this stage "
                              f"{n}; re-run without --resume")
        if not metric.cosine:
            return (predictions == reference).astype(np.float64)
        assert kept is not None
        if reference.shape != kept.shape:
            raise RecipeError(f"{FIELD}: this stage's outputs have {kept.shape[1]} values per sample, the baseline's "
                              f"{reference.shape[1]}; cosine agreement compares outputs of one shape")
        return np.nan_to_num(cosine_similarity(kept, reference), nan=0.0)
    assert kept is not None
    return custom_scores(load_function(metric), metric, kept, labels, tolerate_non_finite=tolerate_non_finite)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity in float64 (float32 rounding alone would move it by 1e-7); two zero rows are
    identical (1), a zero row against a non-zero one shares no direction (0)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = (a * b).sum(axis=1)
    both_zero = (np.linalg.norm(a, axis=1) == 0) & (np.linalg.norm(b, axis=1) == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 0.0)
    return np.clip(np.where(both_zero, 1.0, out), -1.0, 1.0)


def custom_scores(function: Callable[..., Any], metric: Metric, outputs: np.ndarray, labels: np.ndarray, *,
                  tolerate_non_finite: bool = False) -> np.ndarray:
    n = len(outputs)
    try:
        raw = function(outputs, labels)
    except Exception as exc:  # the user's code: name the metric and keep the cause's first line
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise RecipeError(f"{FIELD}: {metric.metric} raised {type(exc).__name__}: {message[:200]}") from exc
    try:
        scores = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError):
        raise RecipeError(f"{FIELD}: {metric.metric} returned {type(raw).__name__}, not numbers; return one float "
                          f"per sample (shape [{n}])") from None
    if scores.shape != (n,):
        raise RecipeError(f"{FIELD}: {metric.metric} returned shape {list(scores.shape)}; return one float per "
                          f"sample (shape [{n}]), so that intervals and paired tests can be computed")
    if tolerate_non_finite:
        return np.nan_to_num(scores, nan=0.0, posinf=0.0, neginf=0.0)
    if not np.all(np.isfinite(scores)):
        bad = int((~np.isfinite(scores)).sum())
        raise RecipeError(f"{FIELD}: {metric.metric} returned {bad} NaN or infinite scores; return a finite float "
                          "per sample")
    return scores


def is_binary(metric: Metric, scores: np.ndarray) -> bool:
    """Whether the scores are right-or-wrong results: the class metrics always, cosine agreement never, a
    python: metric when every score is 0 or 1."""
    if metric.classifies:
        return True
    if metric.cosine:
        return False
    return bool(np.all((scores == 0) | (scores == 1)))


# ------------------------------------------------------------------------------------ statistics


def summarize(metric: Metric, scores: np.ndarray, *, seed: int) -> dict[str, Any]:
    """The stage's accuracy record. top-1's keeps the fields it always had; other metrics add their name,
    how the interval was computed and the direction."""
    from optimizer.measure.accuracy import bootstrap_interval, wilson_interval

    n = int(len(scores))
    binary = is_binary(metric, scores)
    if binary:
        correct = int(scores.sum())
        value = correct / n if n else 0.0
        record: dict[str, Any] = {"metric": metric.metric, "value": value, "n": n, "correct": correct,
                                  "ci95": list(wilson_interval(correct, n))}
    else:
        value = float(scores.mean()) if n else 0.0
        record = {"metric": metric.metric, "value": value, "n": n, "ci95": list(bootstrap_interval(scores, seed=seed))}
    if metric.metric == "top1":
        return record
    record["name"] = metric.name
    record["interval"] = "wilson" if binary else "bootstrap"
    if metric.metric == "agreement":
        record["agreement"] = metric.agreement or "top1"
    record["higher_is_better"] = metric.higher_is_better
    return record


def paired_test(metric: Metric, reference: np.ndarray, scores: np.ndarray, *, seed: int) -> dict[str, Any]:
    """The stage against the baseline on the same samples: McNemar when both sides are right-or-wrong,
    else the sign-flip permutation test of the mean difference."""
    from optimizer.measure.accuracy import mcnemar, sign_flip_test

    if is_binary(metric, reference) and is_binary(metric, scores):
        return mcnemar(reference.astype(bool), scores.astype(bool))
    return sign_flip_test(reference, scores, seed=seed)
