"""quantize.nncf: NNCF post-training INT8 of an ONNX model, optionally with accuracy control."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from optimizer.artifact import Artifact
from optimizer.errors import StageError, first_line
from optimizer.passes.base import Pass, PassConfig, PassContext
from optimizer.passes.int8_agreement import check_int8_agreement, min_top1_agreement_field, verify_samples_field
from optimizer.passes.onnx_io import calibration_indices, load_onnx, refuse_quantized, save_onnx, single_samples
from optimizer.passes.output_agreement import min_cosine_field


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
        description="With a value, nncf.quantize_with_accuracy_control keeps the top-1 drop within it (absolute "
        "fraction), reverting operations to float as needed. The drop is measured on data.validation or, without "
        "it, on data.calibration samples that calibration does not use; never on data.eval, which only reports.",
    )
    accuracy_control_samples: int = Field(
        default=1000, ge=10,
        description="Validation samples accuracy control uses (it runs the model many times); fewer when fewer "
        "are held out.",
    )
    verify_samples: int = verify_samples_field()
    min_top1_agreement: float = min_top1_agreement_field()
    min_cosine: float = min_cosine_field()


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
        calibration_data = ctx.data.calibration()
        calibration_index = calibration_indices(calibration_data, cfg.subset_size, ctx.seed, stage=ctx.stage)
        calibration = nncf.Dataset(single_samples(calibration_data, calibration_index))
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
                from optimizer.passes.accuracy_control import choose_validation, quantize_with_accuracy_control

                validation = choose_validation(ctx, calibration_data, calibration_index, cfg.accuracy_control_samples)
                ctx.progress.update(f"nncf: accuracy-controlled quantization (max_drop {cfg.max_drop}, "
                                    f"{len(validation.items)} samples of {validation.record['source']})")
                quantized = quantize_with_accuracy_control(nncf, model, calibration, validation, options, ctx,
                                                           cfg.max_drop)
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
        result = self.new_artifact(artifact, ctx, entry=entry, form=artifact.form, meta=dict(artifact.meta),
                                   facts=facts)
        check_int8_agreement(artifact, result, ctx, samples=cfg.verify_samples, minimum=cfg.min_top1_agreement,
                             min_cosine=cfg.min_cosine)
        return result

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
