"""compile.openvino: ONNX (FP32 or Q/DQ INT8) -> OpenVINO IR, checked against onnxruntime on eval data."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from optimizer.artifact import Artifact
from optimizer.errors import GateFailed, RecipeError, StageError, first_line
from optimizer.passes.base import Pass, PassConfig, PassContext
from optimizer.passes.output_agreement import check_cosine, gates_on_classes, min_cosine_field, record_cosine
from optimizer.recipe import InputSpec


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
    buckets: list[int] | Literal["auto"] | None = Field(
        default=None, description="Shape buckets for a model with a dynamic length (model.inputs[].dynamic, one "
        "symbolic name): static-shape copies of the one IR in one compiled model, each input routed to and padded to "
        "the smallest bucket that holds it (README, 'Inputs of varied length', compares it with one dynamic model). A list of lengths whose "
        "largest is the axis's max, or 'auto': auto_buckets lengths chosen from the calibration data's lengths to "
        "minimize the padded length. Unset: one model with bounded dynamic dimensions. The model must give the "
        "same result padded (pad_values), which the fidelity check verifies sample by sample.")
    auto_buckets: int = Field(default=4, ge=1, le=16, description="How many buckets 'buckets: auto' chooses.")
    pad_values: dict[str, float] = Field(
        default_factory=dict, description="Value each input is padded with up to its bucket, by input name; "
        "default 0 (a tokenizer's [PAD] id 0 and mask zeros).")
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


def check_buckets(cfg: CompileOpenVinoConfig, inputs: list[InputSpec]) -> None:
    """Static checks of the bucket settings against the model's inputs (ValueError, reported at validation)."""
    from optimizer.shapes import length_axes

    axes = length_axes(inputs)
    names = {spec.name for spec in inputs}
    unknown = sorted(set(cfg.pad_values) - names)
    if unknown:
        raise ValueError(f"pad_values names {unknown[0]!r}, which is not a model input ({', '.join(sorted(names))})")
    if cfg.buckets is None:
        return
    if len(axes) != 1:
        raise ValueError(f"buckets need exactly one dynamic length (model.inputs[].dynamic), the model declares "
                         f"{len(axes)}" + (f" ({', '.join(axes)})" if axes else "; declare e.g. {1: {name: seq, "
                                                                                 "min: 1, max: 128}}"))
    axis = next(iter(axes.values()))
    if isinstance(cfg.buckets, list):
        if not cfg.buckets:
            raise ValueError("buckets is empty; list lengths or write 'auto'")
        outside = [b for b in cfg.buckets if not axis.min <= b <= axis.max]
        if outside:
            raise ValueError(f"bucket {outside[0]} is outside the bounds {axis.min}..{axis.max} of '{axis.name}'")
        if max(cfg.buckets) != axis.max:
            raise ValueError(f"the largest bucket is {max(cfg.buckets)} but '{axis.name}' goes up to {axis.max}; "
                             f"add {axis.max} so that every length within the bounds has a bucket")


def bounded_shapes(ov: Any, model: Any, inputs: list[InputSpec], batch: int | None) -> dict[str, Any] | None:
    """Partial shapes for the IR's inputs: the batch fixed or left dynamic, each declared dynamic axis bounded
    (ov.Dimension(min, max)) so that OpenVINO refuses other lengths and plans memory for the largest."""
    specs = {spec.name: spec for spec in inputs}
    shapes: dict[str, Any] = {}
    for port in model.inputs:
        name = port.get_any_name()
        dims = list(port.get_partial_shape())
        spec = specs.get(name)
        if batch is not None:
            dims[0] = ov.Dimension(batch)
        for axis, dyn in (spec.dynamic.items() if spec is not None else ()):
            if int(axis) < len(dims):
                dims[int(axis)] = ov.Dimension(dyn.min, dyn.max)
        shapes[name] = ov.PartialShape(dims)
    changed = batch is not None or any(spec.dynamic for spec in inputs)
    return shapes if changed else None


def convert_to_ir(ov: Any, onnx_path: Path, xml: Path, cfg: CompileOpenVinoConfig,
                  inputs: list[InputSpec] | None = None) -> None:
    """ONNX file -> IR (.xml + .bin) with the pass's batch and weight settings, and the inputs' dynamic axes
    bounded; raises what OpenVINO raises.

    Shared with the latency measurement, which converts throwaway exports of torch stages the same way."""
    model = ov.convert_model(str(onnx_path))
    shapes = bounded_shapes(ov, model, inputs or [], cfg.batch)
    if shapes is not None:
        model.reshape(shapes)
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

    def check_inputs(self, inputs: list[InputSpec]) -> None:
        """Called by validation with the model's inputs: bucket settings that cannot work fail before a run."""
        check_buckets(self.config, inputs)  # type: ignore[arg-type]

    def required_data(self) -> tuple[str, ...]:
        # buckets: auto chooses its lengths from the calibration split (see _buckets).
        return ("eval", "calibration") if self.config.buckets == "auto" else ("eval",)  # type: ignore[attr-defined]

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
            convert_to_ir(ov, artifact.entry_path, ctx.work_dir / "model.xml", cfg, artifact.inputs)
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
        buckets = self._buckets(artifact, ctx, cfg)
        if buckets is not None:
            meta["buckets"] = buckets
        result = self.new_artifact(artifact, ctx, entry="model.xml", meta=meta, facts=facts)

        ctx.progress.update("verifying against onnxruntime")
        eval_data = ctx.data.eval()
        count = min(cfg.verify_samples, len(eval_data))
        candidate_runtime = OpenVinoRuntime(result, threads=ctx.threads)
        if eval_data.axes:
            # One sample at a time at its own length: every bucket is exercised and, since onnxruntime runs the
            # unpadded input, the model's invariance to the bucket's padding is checked too.
            singles = [eval_data.batch(i, i + 1) for i in range(count)]
            reference_runtime = OnnxRuntime(artifact, threads=ctx.threads)
            reference = np.concatenate([reference_runtime.run(one) for one in singles])
            candidate = np.concatenate([candidate_runtime.run(one) for one in singles])
        else:
            samples = eval_data.batch(0, count)
            reference = OnnxRuntime(artifact, threads=ctx.threads).run_batched(samples, 64)
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

    def _buckets(self, artifact: Artifact, ctx: PassContext, cfg: CompileOpenVinoConfig) -> dict[str, Any] | None:
        """The bucket sizes (chosen from the eval data's lengths for 'auto') and how inputs are padded to them."""
        from optimizer.shapes import auto_buckets, length_axes

        if cfg.buckets is None:
            return None
        try:
            check_buckets(cfg, artifact.inputs)
        except ValueError as exc:
            raise RecipeError(f"stage '{ctx.stage}': {exc}") from None
        axis = next(iter(length_axes(artifact.inputs).values()))
        if cfg.buckets == "auto":
            # Chosen from the calibration split, never the eval split: buckets tuned to the test data would flatter
            # the latency measured on it.
            lengths = ctx.data.calibration().lengths.get(axis.name)
            if lengths is None or not len(lengths):
                raise RecipeError(f"stage '{ctx.stage}': buckets: auto chooses lengths from data.calibration, which "
                                  f"gives no per-sample lengths of '{axis.name}'; load it at each sample's own "
                                  "length (e.g. pad: longest) or list the buckets")
            sizes = auto_buckets(lengths, cfg.auto_buckets, axis.max)
        else:
            sizes = sorted(set(cfg.buckets))
        return {"axis": axis.name, "sizes": sizes, "chosen": "auto" if cfg.buckets == "auto" else "listed",
                "inputs": {name: dim for name, dim in axis.places},
                "pad_values": {spec.name: cfg.pad_values.get(spec.name, 0) for spec in artifact.inputs}}
