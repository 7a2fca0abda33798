"""quantize.nncf: NNCF post-training INT8 of an ONNX model, optionally with accuracy control."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from optimizer.artifact import Artifact
from optimizer.errors import GateFailed, StageError, first_line
from optimizer.passes.base import Pass, PassConfig, PassContext
from optimizer.passes.onnx_io import calibration_samples, load_onnx, refuse_quantized, save_onnx


class IgnoredScopeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    names: list[str] = Field(default_factory=list, description="Node names left in float.")
    patterns: list[str] = Field(default_factory=list, description="Regular expressions over node names.")
    types: list[str] = Field(default_factory=list, description="Operator types, e.g. ['Softmax'].")
    validate_names: bool = Field(default=True, description="Fail when a name or type matches nothing.")


class QuantizeNncfConfig(PassConfig):
    preset: Literal["performance", "mixed"] = Field(
        default="performance",
        description="'performance': symmetric weights and activations; 'mixed': asymmetric activations.",
    )
    subset_size: int = Field(default=300, ge=1, description="Calibration samples drawn from data.calibration.")
    fast_bias_correction: bool = Field(default=True, description="Fast bias correction (off: slower, exact).")
    model_type: Literal["transformer"] | None = Field(default=None, description="'transformer' for attention models.")
    ignored_scope: IgnoredScopeConfig = Field(default_factory=IgnoredScopeConfig)
    max_drop: float | None = Field(
        default=None, gt=0, le=1,
        description="With a value, nncf.quantize_with_accuracy_control keeps the top-1 drop on the eval "
        "data within it (absolute fraction), reverting layers to float as needed.",
    )
    accuracy_control_samples: int = Field(
        default=1000, ge=10, description="Eval samples used by accuracy control (it runs the model many times)."
    )


class QuantizeNncf(Pass):
    name = "quantize.nncf"
    summary = "NNCF post-training INT8 of ONNX (Q/DQ) or OpenVINO IR; accuracy-controlled with max_drop."
    input_forms = ("onnx", "openvino")
    output_form = "onnx"
    needs = ("calibration",)
    Config = QuantizeNncfConfig

    @classmethod
    def output_form_for(cls, input_form: str) -> str:
        return input_form  # NNCF quantizes either form in place: ONNX stays ONNX, IR stays IR

    def run(self, artifact: Artifact, ctx: PassContext) -> Artifact:
        import nncf

        cfg: QuantizeNncfConfig = self.config  # type: ignore[assignment]
        openvino_form = artifact.form == "openvino"
        model = self._load_openvino(artifact, ctx) if openvino_form else load_onnx(artifact.entry_path)
        if not openvino_form:
            refuse_quantized(model, stage=ctx.stage)
        if ctx.progress.quiet:
            import logging

            nncf.set_log_level(logging.ERROR)
        items = calibration_samples(ctx.data.calibration(), cfg.subset_size, ctx.seed, stage=ctx.stage)
        calibration = nncf.Dataset(items)
        scope = cfg.ignored_scope
        options = dict(
            preset=nncf.QuantizationPreset.PERFORMANCE if cfg.preset == "performance" else nncf.QuantizationPreset.MIXED,
            subset_size=cfg.subset_size,
            fast_bias_correction=cfg.fast_bias_correction,
            model_type=nncf.ModelType.TRANSFORMER if cfg.model_type == "transformer" else None,
            ignored_scope=nncf.IgnoredScope(names=scope.names, patterns=scope.patterns, types=scope.types,
                                            validate=scope.validate_names)
            if (scope.names or scope.patterns or scope.types) else None,
        )
        ctx.progress.update(f"nncf: calibrating on {cfg.subset_size} samples")
        try:
            if cfg.max_drop is None:
                quantized = nncf.quantize(model, calibration, **options)
            else:
                quantized = self._with_accuracy_control(nncf, model, calibration, options, ctx)
        except nncf.ValidationError as exc:
            raise StageError(f"stage '{ctx.stage}': NNCF rejected the configuration: {first_line(exc)}") from None
        if openvino_form:
            import openvino as ov

            entry = "model.xml"
            ov.save_model(quantized, str(ctx.work_dir / entry), compress_to_fp16=False)
            facts = {"precision": "int8",
                     "fake_quantize_nodes": sum(op.get_type_name() == "FakeQuantize" for op in quantized.get_ops())}
        else:
            entry = "model.onnx"
            save_onnx(quantized, ctx.work_dir / entry)
            nodes = [n.op_type for n in quantized.graph.node]
            facts = {
                "precision": "int8",
                "quantize_nodes": nodes.count("QuantizeLinear"),
                "dequantize_nodes": nodes.count("DequantizeLinear"),
            }
        ctx.details["quantization"] = {"tool": "nncf", "version": nncf.__version__, **facts}
        return self.new_artifact(artifact, ctx, entry=entry, form=artifact.form, meta=dict(artifact.meta), facts=facts)

    @staticmethod
    def _load_openvino(artifact: Artifact, ctx: PassContext):
        from optimizer.errors import RecipeError
        from optimizer.runtimes.openvino_cpu import check_ir_files, import_openvino

        ov = import_openvino(f"stage '{ctx.stage}'")
        xml, weights = check_ir_files(artifact)
        model = ov.Core().read_model(str(xml), str(weights))
        if any(op.get_type_name() == "FakeQuantize" for op in model.get_ops()):
            raise RecipeError(f"stage '{ctx.stage}': the input IR is already quantized (it has FakeQuantize "
                              "nodes); quantize the float model instead")
        return model

    def _with_accuracy_control(self, nncf, model, calibration, options, ctx: PassContext):
        import onnxruntime as ort

        cfg: QuantizeNncfConfig = self.config  # type: ignore[assignment]
        eval_data = ctx.data.eval()
        count = min(cfg.accuracy_control_samples, len(eval_data))
        index = np.sort(np.random.default_rng(ctx.seed + 7).choice(len(eval_data), size=count, replace=False))
        items = [({n: a[i : i + 1] for n, a in eval_data.inputs.items()}, int(eval_data.labels[i])) for i in index]
        threads = ctx.threads

        def validate(candidate, data_items) -> tuple[float, list[float]]:
            if hasattr(candidate, "SerializeToString"):  # an ONNX ModelProto
                options_ = ort.SessionOptions()
                options_.intra_op_num_threads = threads
                session = ort.InferenceSession(candidate.SerializeToString(), options_,
                                               providers=["CPUExecutionProvider"])
                output = session.get_outputs()[0].name
                infer = lambda x: session.run([output], x)[0]  # noqa: E731
            else:  # an OpenVINO CompiledModel: NNCF compiles each candidate itself, with f32 precision
                infer = lambda x: candidate(x)[0]  # noqa: E731
            per_item = [float(infer(x).argmax() == y) for x, y in data_items]
            return (float(np.mean(per_item)) if per_item else 0.0), per_item

        validation = nncf.Dataset(items, lambda item: item[0])
        ctx.progress.update(f"nncf: accuracy-controlled quantization (max_drop {cfg.max_drop})")
        try:
            return nncf.quantize_with_accuracy_control(
                model, calibration, validation, validate, max_drop=cfg.max_drop,
                drop_type=nncf.DropType.ABSOLUTE, **options,
            )
        except RuntimeError as exc:
            raise GateFailed(f"stage '{ctx.stage}': accuracy control could not meet max_drop {cfg.max_drop}: {exc}") from None
