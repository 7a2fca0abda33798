"""quantize.ort: onnxruntime static INT8 quantization in the QDQ format."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import Field

from optimizer.artifact import Artifact
from optimizer.errors import StageError, first_line
from optimizer.passes.base import Pass, PassConfig, PassContext
from optimizer.passes.int8_agreement import check_int8_agreement, min_top1_agreement_field, verify_samples_field
from optimizer.passes.onnx_io import calibration_samples, refuse_quantized
from optimizer.passes.output_agreement import min_cosine_field
from optimizer.models import check_onnx_external_data


class QuantizeOrtConfig(PassConfig):
    # Unsigned activations with signed weights (U8S8) is the form onnxruntime's x86 kernels run fast;
    # signed activations (S8S8) gave no speedup over FP32 on resnet18 on this class of CPU.
    activation_type: Literal["uint8", "int8"] = Field(default="uint8", description="Activation integer type.")
    weight_type: Literal["int8", "uint8"] = Field(default="int8", description="Weight integer type.")
    per_channel: bool = Field(default=True, description="Per-channel weight scales (better accuracy for convs).")
    reduce_range: bool = Field(default=False, description="7-bit weights, for CPUs without VNNI.")
    calibrate_method: Literal["minmax", "entropy", "percentile", "distribution"] = Field(default="minmax")
    subset_size: int = Field(default=300, ge=1, description="Calibration samples drawn from data.calibration.")
    preprocess: bool = Field(default=True, description="Run onnxruntime's quant_pre_process (shape inference, fusions) first.")
    nodes_to_exclude: list[str] = Field(default_factory=list, description="Node names left in float.")
    op_types_to_quantize: list[str] | None = Field(default=None, description="Only these operator types (default: all).")
    symmetric: bool = Field(
        default=False,
        description="Symmetric activations and weights (zero points 0), as TensorRT requires; use with "
        "activation_type: int8.",
    )
    verify_samples: int = verify_samples_field()
    min_top1_agreement: float = min_top1_agreement_field()
    min_cosine: float = min_cosine_field()


class QuantizeOrt(Pass):
    name = "quantize.ort"
    summary = "onnxruntime quantize_static INT8 (QDQ), U8S8 per-channel by default."
    input_forms = ("onnx",)
    output_form = "onnx"
    needs = ("calibration",)
    Config = QuantizeOrtConfig

    def run(self, artifact: Artifact, ctx: PassContext) -> Artifact:
        import onnx
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process

        cfg: QuantizeOrtConfig = self.config  # type: ignore[assignment]
        check_onnx_external_data(artifact.entry_path)
        refuse_quantized(onnx.load(str(artifact.entry_path), load_external_data=False), stage=ctx.stage)
        items = calibration_samples(ctx.data.calibration(), cfg.subset_size, ctx.seed, stage=ctx.stage)

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self._iter = iter(items)

            def get_next(self):
                return next(self._iter, None)

            def rewind(self) -> None:
                self._iter = iter(items)

        types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
        methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                   "percentile": CalibrationMethod.Percentile, "distribution": CalibrationMethod.Distribution}
        out = ctx.work_dir / "model.onnx"
        with tempfile.TemporaryDirectory(dir=ctx.work_dir.parent) as scratch:
            source = artifact.entry_path
            if cfg.preprocess:
                ctx.progress.update("onnxruntime: pre-processing")
                prepared = Path(scratch) / "prepared.onnx"
                try:
                    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=False)
                    source = prepared
                except Exception as exc:  # pre-processing is an optimization; quantization works without it
                    ctx.progress.log(f"quant_pre_process skipped: {first_line(exc, 120)}")
            if source == artifact.entry_path:
                # quantize_static writes a shape-inferred copy of its input beside it (model-inferred.onnx): it
                # gets a private copy to write beside, never the input artifact's folder, which must not change.
                for name in artifact.files or {artifact.entry_path.name: ""}:
                    (Path(scratch) / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(artifact.path / name, Path(scratch) / name)
                source = Path(scratch) / artifact.entry_path.name
            ctx.progress.update(f"onnxruntime: calibrating on {cfg.subset_size} samples ({cfg.calibrate_method})")
            try:
                quantize_static(
                    str(source), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=cfg.per_channel, reduce_range=cfg.reduce_range,
                    activation_type=types[cfg.activation_type], weight_type=types[cfg.weight_type],
                    calibrate_method=methods[cfg.calibrate_method],
                    nodes_to_exclude=cfg.nodes_to_exclude or None,
                    op_types_to_quantize=cfg.op_types_to_quantize,
                    extra_options={"CalibTensorRangeSymmetric": False,
                                   **({"ActivationSymmetric": True, "WeightSymmetric": True} if cfg.symmetric else {})},
                )
            except Exception as exc:
                first = first_line(exc, 300)
                raise StageError(f"stage '{ctx.stage}': onnxruntime quantize_static failed: {first}") from exc
        nodes = [n.op_type for n in onnx.load(str(out), load_external_data=False).graph.node]
        facts = {
            "precision": "int8",
            "quantize_nodes": nodes.count("QuantizeLinear"),
            "dequantize_nodes": nodes.count("DequantizeLinear"),
            "activation_type": cfg.activation_type,
            "weight_type": cfg.weight_type,
        }
        import onnxruntime

        ctx.details["quantization"] = {"tool": "onnxruntime", "version": onnxruntime.__version__, **facts}
        result = self.new_artifact(artifact, ctx, entry="model.onnx", meta=dict(artifact.meta), facts=facts)
        check_int8_agreement(artifact, result, ctx, samples=cfg.verify_samples, minimum=cfg.min_top1_agreement,
                             min_cosine=cfg.min_cosine)
        return result
