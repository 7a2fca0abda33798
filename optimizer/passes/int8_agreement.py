"""The output-agreement gate of the INT8 passes: the quantized model against its FP32 input on eval samples.

Export and compile check their output against their input; quantization changes outputs on purpose, so its
check is the predicted class only, or, when the recipe's metric reads no class (an embedding, a regression),
the mean cosine similarity of the outputs (see ``output_agreement.py``). A budget on accuracy alone can miss a
broken quantization: with no budget, a loose intermediate one, or an eval set where the wrong predictions
happen to balance out.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from optimizer.artifact import Artifact
from optimizer.errors import GateFailed
from optimizer.passes.base import PassContext
from optimizer.passes.output_agreement import check_cosine, gates_on_classes, record_cosine

# Why 0.9: INT8 that works changes only predictions close to a decision boundary. Measured here: the
# Fashion-MNIST example's INT8 agrees on 99.0 % (NNCF) and 99.4 % (onnxruntime) of 2,000 test images, and the
# pruned and distilled MiniLM of recipes/minilm_latency_prune_openvino.yaml, whose INT8 lost 1.4 points (over
# its budget), still agreed on 97.1 % of 2,551 test snippets. Calibrated on images without the model's
# normalization, the example's INT8 agrees on 16 %. Below 90 %, one prediction in ten moved: the calibration
# went wrong, which is what this gate is for, and ordinary INT8 noise stays well clear of it.
DEFAULT_MIN_TOP1_AGREEMENT = 0.9
DEFAULT_VERIFY_SAMPLES = 512


def min_top1_agreement_field() -> Any:
    return Field(
        default=DEFAULT_MIN_TOP1_AGREEMENT, ge=0, le=1,
        description="Least fraction of verify_samples eval samples whose top-1 class the INT8 model shares with "
        "its FP32 input; below it the stage fails (exit 4). 0 turns the gate off. Recorded but not checked when "
        "evaluate.accuracy.metric does not read classes (min_cosine is checked instead).",
    )


def verify_samples_field() -> Any:
    return Field(
        default=DEFAULT_VERIFY_SAMPLES, ge=1,
        description="Eval samples (the first ones) on which the INT8 model is compared with its FP32 input.",
    )


def check_int8_agreement(source: Artifact, result: Artifact, ctx: PassContext, *, samples: int,
                         minimum: float, min_cosine: float) -> dict[str, Any]:
    """Run ``source`` (FP32) and ``result`` (INT8) on the same runtime, that of their form, on the first
    ``samples`` eval samples; record the comparison as ``ctx.details['fidelity']`` and fail below ``minimum``
    top-1 agreement, or, when the recipe's metric reads no class, below ``min_cosine`` mean cosine similarity."""
    from optimizer.passes.export_onnx import compare_outputs

    if result.form == "openvino":
        from optimizer.runtimes.openvino_cpu import OpenVinoRuntime as runtime_cls
    else:
        from optimizer.runtimes.onnxruntime_cpu import OnnxRuntime as runtime_cls  # type: ignore[assignment]
    eval_data = ctx.data.eval()
    batch = eval_data.batch(0, min(samples, len(eval_data)))
    ctx.progress.update("checking agreement with the FP32 model")
    reference = runtime_cls(source, threads=ctx.threads).run_batched(batch, 64)
    candidate = runtime_cls(result, threads=ctx.threads).run_batched(batch, 64)
    if reference.shape != candidate.shape:
        raise GateFailed(f"stage '{ctx.stage}': the INT8 model's output shape {candidate.shape} differs from its "
                         f"FP32 input's {reference.shape}")
    fidelity = compare_outputs(reference, candidate, atol=0.0, rtol=0.0)
    # INT8 logits differ from FP32's by design: the differences are recorded; the top-1 class (or the cosine)
    # is gated.
    for key in ("atol", "rtol", "within_tolerance"):
        fidelity.pop(key)
    fidelity.update(elementwise_checked=False, min_top1_agreement=minimum,
                    reference=f"the FP32 input ({runtime_cls.name})")
    classes = gates_on_classes(ctx)
    if not classes:
        record_cosine(fidelity, reference, candidate, minimum=min_cosine)
    ctx.details["fidelity"] = fidelity
    if not classes:
        check_cosine(fidelity, ctx.stage, "the INT8 model's", "its FP32 input's",
                     "check that data.calibration is preprocessed like data.eval, calibrate on more samples "
                     "(subset_size), or lower min_cosine if the change is expected")
    elif fidelity["top1_agreement"] < minimum:
        agreed = round(fidelity["top1_agreement"] * fidelity["samples"])
        raise GateFailed(
            f"stage '{ctx.stage}': the INT8 model agrees with its FP32 input on the top-1 class of only {agreed} of "
            f"{fidelity['samples']} eval samples ({fidelity['top1_agreement']:.2%}; min_top1_agreement "
            f"{minimum:g}); check that data.calibration is preprocessed like data.eval, calibrate on more "
            "samples (subset_size), or lower min_top1_agreement if the change is expected"
        )
    return fidelity
