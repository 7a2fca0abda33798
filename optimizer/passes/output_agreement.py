"""Which agreement between a pass's output model and its input the fidelity checks gate on, by the recipe's metric.

The INT8 passes and the compile passes check that their output model predicts the class its input predicts:
the arg-max of both outputs on eval samples. That is a class only when the recipe's metric reads one
(``evaluate.accuracy.metric`` top1, top5, or top-1 agreement). For an embedding or a regression output the
arg-max is an arbitrary coordinate: MiniLM's INT8 moved it on 11 % of 300 sentences while the mean cosine
similarity of the embeddings to FP32's stayed 0.9967. Under the other metrics (cosine agreement, python:
metrics) the top-1 agreement is therefore recorded for information only, and the checks gate on the cosine
similarity of the outputs to the input's outputs instead (``min_cosine``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from optimizer.errors import GateFailed
from optimizer.passes.base import PassContext

# Why 0.98, on the mean over the verified samples: working INT8 and compilation stay far above it, a broken
# calibration falls far below it, and it is the bar the shipped embedding recipe holds every stage to against
# the baseline (accuracy_drop 0.02 under cosine agreement): one pass that falls below it on its own would
# likely break such a budget anyway, and is stopped before it is measured. Measured here: MiniLM's NNCF INT8
# against its FP32 input 0.9967 on 300 sentences, OpenVINO against onnxruntime on that INT8 model 0.9998; the
# Fashion-MNIST example's logits 0.9995 (NNCF INT8), 0.9999 (onnxruntime INT8), 0.99999 (OpenVINO bf16), but
# 0.43 with calibration images lacking the model's normalization (the calibration the top-1 gate stops at 16 %
# agreement). The mean, not the worst sample: one MiniLM sentence of working INT8 is at 0.93.
DEFAULT_MIN_COSINE = 0.98


def min_cosine_field() -> Any:
    return Field(
        default=DEFAULT_MIN_COSINE, ge=0, le=1,
        description="Least mean cosine similarity of the outputs to the input model's on the verified eval "
        "samples; below it the stage fails (exit 4). Applies in place of min_top1_agreement when "
        "evaluate.accuracy.metric does not read classes (cosine agreement, python: metrics), where the arg-max "
        "of an embedding or a regression output is no class. 0 turns the gate off.",
    )


def gates_on_classes(ctx: PassContext) -> bool:
    """Whether the recipe's metric reads outputs as class scores, so that top-1 agreement is the check.

    A pass run without a recipe (a test's bare context) keeps the classifier's check it always had."""
    from optimizer.measure.metrics import Metric

    recipe = getattr(ctx.recipe, "recipe", None)
    accuracy = getattr(getattr(recipe, "evaluate", None), "accuracy", None)
    if accuracy is None:
        return True
    return Metric.from_settings(accuracy.settings()).classifies


def output_cosine(reference: np.ndarray, candidate: np.ndarray) -> dict[str, Any]:
    """Cosine similarity of ``candidate``'s outputs to ``reference``'s: per sample, of its flattened output.

    With one value per sample a per-sample cosine is only the sign, so the eval samples' outputs form one
    vector each instead, both centred on the reference's mean: then a constant output or a shifted one scores
    low, as an output that lost its dependence on the input should."""
    from optimizer.measure.metrics import cosine_similarity

    ref = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    cand = np.asarray(candidate, dtype=np.float64).reshape(len(candidate), -1)
    if ref.shape[1] > 1 or len(ref) < 2:
        per_sample = cosine_similarity(cand, ref)
        over = "sample"
    else:
        centre = ref.mean()
        per_sample = cosine_similarity((cand - centre).reshape(1, -1), (ref - centre).reshape(1, -1))
        over = "eval set"
    return {"cosine_mean": float(per_sample.mean()), "cosine_min": float(per_sample.min()), "cosine_over": over}


def record_cosine(fidelity: dict[str, Any], reference: np.ndarray, candidate: np.ndarray, *,
                  minimum: float | None) -> None:
    """Add the cosine figures to a fidelity record whose top-1 agreement does not gate; ``minimum`` is the
    threshold the check holds them to (None: recorded only)."""
    fidelity.update(output_cosine(reference, candidate), top1_gated=False)
    if minimum is not None:
        fidelity["min_cosine"] = minimum


def check_cosine(fidelity: dict[str, Any], stage: str, subject: str, against: str, hint: str) -> None:
    """Fail the stage (exit 4) when the mean cosine recorded by ``record_cosine`` is below its minimum."""
    minimum = fidelity["min_cosine"]
    # 0 turns the gate off, as 0 does for min_top1_agreement: a cosine can be negative, so compare only above it.
    if minimum > 0 and fidelity["cosine_mean"] < minimum:
        per_sample = fidelity["cosine_over"] == "sample"
        lowest = f"lowest {fidelity['cosine_min']:.4f}; " if per_sample else ""
        raise GateFailed(
            f"stage '{stage}': {subject} outputs have a mean cosine similarity "
            f"({'per sample' if per_sample else 'over the eval samples'}) of only {fidelity['cosine_mean']:.4f} to "
            f"{against} on {fidelity['samples']} eval samples ({lowest}min_cosine {minimum:g}); {hint}"
        )
