"""compile.openvino: ONNX (FP32 or Q/DQ INT8) -> OpenVINO IR, checked against onnxruntime on eval data."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from optimizer.artifact import Artifact
from optimizer.errors import GateFailed, StageError, first_line
from optimizer.passes.base import Pass, PassConfig, PassContext
from optimizer.passes.output_agreement import check_cosine, gates_on_classes, min_cosine_field, record_cosine


class CompileOpenVinoConfig(PassConfig):
    precision_hint: Literal["f32", "bf16", "f16"] = Field(
        default="f32",
        description="Inference precision the CPU plugin is told to use for float layers. Set explicitly because "
        "OpenVINO otherwise runs bf16 on CPUs with AMX or AVX-512 BF16. Recorded with every measurement.",
    )
    performance_hint: Literal["latency", "throughput"] = Field(
        default="latency",
        description="Deployment hint written into the artifact: 'latency' (one stream, batch 1) or 'throughput'. "
        "The offline measurement always uses a THROUGHPUT-hinted copy.",
    )
    streams: int | None = Field(default=None, ge=1, description="CPU streams; unset: 1 for latency, OpenVINO's choice for throughput.")
    compress_to_fp16: bool = Field(
        default=False, description="Store float weights as FP16 in the .bin (halves its size; compute precision is "
        "set by precision_hint)."
    )
    batch: int | None = Field(
        default=None, ge=1, description="Fix the batch dimension (a static shape compiles to slightly faster code); "
        "unset keeps the ONNX model's dynamic batch."
    )
    verify_samples: int = Field(default=512, ge=1, description="Eval samples compared between onnxruntime and OpenVINO.")
    atol: float = Field(default=1e-3, ge=0, description="Absolute tolerance (f32 on a float model only).")
    rtol: float = Field(default=1e-3, ge=0, description="Relative tolerance (f32 on a float model only).")
    min_top1_agreement: float = Field(
        default=0.98, ge=0, le=1,
        description="Least fraction of samples whose top-1 class matches onnxruntime's (checked at every precision; "
        "the only check for INT8 or reduced-precision models, whose logits legitimately differ). Recorded but not "
        "checked when evaluate.accuracy.metric does not read classes (min_cosine is checked instead).",
    )
    min_cosine: float = min_cosine_field()


def is_quantized(model_path) -> bool:
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in model.graph.node)


def convert_to_ir(ov: Any, onnx_path: Path, xml: Path, cfg: CompileOpenVinoConfig) -> None:
    """ONNX file -> IR (.xml + .bin) with the pass's batch and weight settings; raises what OpenVINO raises.

    Shared with the latency measurement, which converts throwaway exports of torch stages the same way."""
    model = ov.convert_model(str(onnx_path))
    if cfg.batch is not None:
        model.reshape({port.get_any_name(): [cfg.batch, *list(port.get_partial_shape())[1:]]
                       for port in model.inputs})
    # save_model compresses weights to FP16 unless told not to: always pass the choice explicitly.
    ov.save_model(model, str(xml), compress_to_fp16=cfg.compress_to_fp16)


def runtime_meta(cfg: CompileOpenVinoConfig) -> dict[str, Any]:
    """The settings an IR artifact is deployed with (read by the OpenVINO runtime)."""
    return {"precision_hint": cfg.precision_hint, "performance_hint": cfg.performance_hint,
            "streams": cfg.streams, "device": "CPU"}


class CompileOpenVino(Pass):
    name = "compile.openvino"
    summary = "Convert ONNX to OpenVINO IR (CPU); precision hint explicit; outputs checked against onnxruntime."
    input_forms = ("onnx",)
    output_form = "openvino"
    needs = ("eval",)
    Config = CompileOpenVinoConfig

    def run(self, artifact: Artifact, ctx: PassContext) -> Artifact:
        from optimizer.models import check_onnx_external_data
        from optimizer.passes.export_onnx import compare_outputs
        from optimizer.runtimes.onnxruntime_cpu import OnnxRuntime
        from optimizer.runtimes.openvino_cpu import OpenVinoRuntime, import_openvino

        cfg: CompileOpenVinoConfig = self.config  # type: ignore[assignment]
        ov = import_openvino(f"stage '{ctx.stage}'")
        # The ONNX file may come from a user: check its external data before OpenVINO reads it.
        check_onnx_external_data(artifact.entry_path)
        quantized = is_quantized(artifact.entry_path)
        ctx.progress.update("converting ONNX to OpenVINO IR")
        try:
            convert_to_ir(ov, artifact.entry_path, ctx.work_dir / "model.xml", cfg)
        except Exception as exc:  # conversion errors come in several types; name the stage and the cause
            raise StageError(f"stage '{ctx.stage}': OpenVINO could not convert {artifact.entry_path.name}: "
                             f"{first_line(exc, 300)}") from exc

        precision = artifact.facts.get("precision", "fp32")
        facts = {"precision": precision if quantized else
                 {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}[cfg.precision_hint],
                 "compute_precision_hint": cfg.precision_hint, "weights_fp16": cfg.compress_to_fp16}
        meta = {
            "runtime": runtime_meta(cfg),
            "openvino": ov.get_version(),
            "source_quantized": quantized,
        }
        result = self.new_artifact(artifact, ctx, entry="model.xml", meta=meta, facts=facts)

        ctx.progress.update("verifying against onnxruntime")
        eval_data = ctx.data.eval()
        samples = eval_data.batch(0, min(cfg.verify_samples, len(eval_data)))
        reference = OnnxRuntime(artifact, threads=ctx.threads).run_batched(samples, 64)
        candidate_runtime = OpenVinoRuntime(result, threads=ctx.threads)
        candidate = candidate_runtime.run_batched(samples, 64)
        ctx.details["openvino"] = candidate_runtime.settings()
        if reference.shape != candidate.shape:
            raise GateFailed(f"stage '{ctx.stage}': OpenVINO output shape {candidate.shape} differs from "
                             f"onnxruntime's {reference.shape}")
        fidelity = compare_outputs(reference, candidate, atol=cfg.atol, rtol=cfg.rtol)
        # Elementwise tolerance only means something when both sides compute the same float math.
        fidelity["elementwise_checked"] = cfg.precision_hint == "f32" and not quantized
        fidelity["reference"] = "onnxruntime"
        classes = gates_on_classes(ctx)
        if not classes:
            record_cosine(fidelity, reference, candidate, minimum=cfg.min_cosine)
        ctx.details["fidelity"] = fidelity
        if fidelity["elementwise_checked"] and not fidelity["within_tolerance"]:
            raise GateFailed(
                f"stage '{ctx.stage}': OpenVINO outputs differ from onnxruntime beyond tolerance (max abs diff "
                f"{fidelity['max_abs_diff']:.3g}, atol {cfg.atol}, rtol {cfg.rtol}); raise atol/rtol if expected"
            )
        if not classes:
            check_cosine(fidelity, ctx.stage, "OpenVINO's", "onnxruntime's",
                         "try precision_hint f32 or lower min_cosine")
        elif fidelity["top1_agreement"] < cfg.min_top1_agreement:
            raise GateFailed(
                f"stage '{ctx.stage}': OpenVINO agrees with onnxruntime on the top-1 class of only "
                f"{fidelity['top1_agreement']:.1%} of {fidelity['samples']} samples (min_top1_agreement "
                f"{cfg.min_top1_agreement:.0%}); try precision_hint f32 or lower min_top1_agreement"
            )
        return result
