"""Timing torch stages on the deployment runtime (``evaluate.latency.runtime: deploy``).

Each stage is timed on the runtime its artifact runs on, so torch stages are timed on PyTorch eager and the
stages after the export on onnxruntime or OpenVINO. The waterfall then shows pruning's gain on eager, where
the model will never run, and books the switch of runtime to the export step. With ``deploy``, a torch stage
is exported once more into a throwaway folder, the way the recipe's export stage exports (exporter, opset,
batch axis), converted to OpenVINO IR when the recipe ends there (the compile stage's precision hint, batch
and weight settings) and timed on that runtime. Its accuracy is still measured on its own torch artifact,
which is never touched, and the throwaway is deleted after the measurement.

The throwaway keeps the stage's own precision (FP32 for every torch stage): an INT8 deployment's gain from
quantization belongs to its quantization stage, and a torch stage has not been quantized.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from optimizer.artifact import Artifact
from optimizer.errors import RecipeError

if TYPE_CHECKING:
    from optimizer.recipe import Recipe

# The forms whose runtime a throwaway export can reach from torch.
DEPLOY_FORMS = ("onnx", "openvino")
# Eval samples the throwaway export is compared on with PyTorch before it is timed.
CHECK_SAMPLES = 16


@dataclass(frozen=True)
class DeployTiming:
    """How torch stages are timed: the final artifact's form and the settings that recreate its runtime."""

    form: str                              # "onnx" or "openvino"
    export: dict[str, Any]                 # the recipe's export.onnx settings (its defaults without one)
    openvino: dict[str, Any] | None = None  # the recipe's compile.openvino settings, for an OpenVINO deployment

    @property
    def runtime(self) -> str:
        """The runtime's name as the measurement records it (``latency.runtime``)."""
        return "openvino" if self.form == "openvino" else "onnxruntime"

    def describe(self) -> str:
        """e.g. 'OpenVINO (precision hint f32)', for progress lines and messages."""
        if self.openvino is not None:
            return f"OpenVINO (precision hint {self.openvino['precision_hint']})"
        return "onnxruntime"

    def key(self) -> dict[str, Any]:
        """What the stage cache's key needs: a change re-times every torch stage."""
        return asdict(self)


def deploy_timing(recipe: "Recipe") -> DeployTiming | None:
    """The recipe's ``evaluate.latency.runtime`` resolved against its stages; None means PyTorch eager.

    ``auto`` is ``deploy`` when the last stage produces ONNX or OpenVINO. ``deploy`` on any other recipe is a
    RecipeError: there is no deployment runtime a throwaway export could reach."""
    from optimizer.passes.compile_openvino import CompileOpenVino, CompileOpenVinoConfig
    from optimizer.passes.export_onnx import ExportOnnx, ExportOnnxConfig
    from optimizer.registry import get_pass

    setting = recipe.evaluate.latency.runtime
    if setting == "native":
        return None
    form = recipe.model.start_form
    export: dict[str, Any] = {}
    openvino: dict[str, Any] = {}
    for index, stage in enumerate(recipe.stages):
        pass_cls = get_pass(stage.pass_name, where=f"stages.{index}.pass")
        # The last of each: the settings the final artifact was made with.
        if pass_cls is ExportOnnx:
            export = dict(stage.with_)
        elif pass_cls is CompileOpenVino:
            openvino = dict(stage.with_)
        form = pass_cls.output_form_for(form)
    if form not in DEPLOY_FORMS:
        if setting == "deploy":
            raise RecipeError(f"evaluate.latency.runtime: 'deploy' times torch stages on the runtime of the final "
                              f"artifact, which must be ONNX or OpenVINO, but this recipe ends on {form}; use "
                              "'native' or 'auto'")
        return None
    export_cfg = ExportOnnxConfig.model_validate(export)
    # What shapes the exported graph, and the tolerances the throwaway is checked with (on a few samples).
    export_settings = export_cfg.model_dump(mode="json", include={"exporter", "opset", "dynamic_batch",
                                                                  "output_name", "atol", "rtol"})
    if form == "onnx":
        return DeployTiming("onnx", export_settings)
    ov_cfg = CompileOpenVinoConfig.model_validate(openvino)
    return DeployTiming("openvino", export_settings,
                        ov_cfg.model_dump(mode="json", include={"precision_hint", "performance_hint", "streams",
                                                                "batch", "compress_to_fp16"}))


def throwaway_artifact(artifact: Artifact, timing: DeployTiming, folder: Path, samples: dict[str, np.ndarray],
                       *, threads: int, stage: str) -> Artifact:
    """Export a torch artifact into ``folder`` for timing (and convert it for OpenVINO); ``artifact`` is only read.

    The export is compared with PyTorch on a few eval ``samples`` first: a graph that computes something else
    would be timed for nothing. Raises on any failure; the caller then times the stage on PyTorch eager."""
    from optimizer.passes.export_onnx import ExportOnnxConfig, compare_outputs, export_module
    from optimizer.runtimes.onnxruntime_cpu import OnnxRuntime
    from optimizer.runtimes.torch_eager import TorchEagerRuntime

    cfg = ExportOnnxConfig.model_validate(timing.export)
    onnx_dir = folder / "onnx"
    onnx_dir.mkdir(parents=True)
    reference_runtime = TorchEagerRuntime(artifact, threads=threads)
    export_module(reference_runtime.module, artifact, samples, onnx_dir / "model.onnx", cfg)
    lineage = {"parent": artifact.sha256, "stage": stage, "purpose": "throwaway export for timing"}
    facts = {"precision": artifact.facts.get("precision", "fp32")}
    exported = Artifact("onnx", onnx_dir, "model.onnx", list(artifact.inputs),
                        meta={"opset": cfg.opset, "exporter": cfg.exporter}, lineage=lineage, facts=facts).finalize()

    # A static batch runs at exactly the recipe's batch size; a dynamic one on the first few samples.
    count = CHECK_SAMPLES if cfg.dynamic_batch else artifact.inputs[0].shape[0]
    total = len(next(iter(samples.values())))
    index = np.arange(count) % max(total, 1)
    check = {name: np.ascontiguousarray(array[index]) for name, array in samples.items()}
    reference = reference_runtime.run_batched(check, count)
    candidate = OnnxRuntime(exported, threads=threads).run_batched(check, count)
    if reference.shape != candidate.shape:
        raise ValueError(f"the export's output shape {candidate.shape} differs from PyTorch's {reference.shape}")
    fidelity = compare_outputs(reference, candidate, atol=cfg.atol, rtol=cfg.rtol)
    if not fidelity["within_tolerance"]:
        raise ValueError(f"the export differs from PyTorch (max abs diff {fidelity['max_abs_diff']:.3g} on "
                         f"{count} eval samples)")
    if timing.openvino is None:
        return exported

    from optimizer.passes.compile_openvino import CompileOpenVinoConfig, convert_to_ir, runtime_meta
    from optimizer.runtimes.openvino_cpu import import_openvino

    ov = import_openvino(f"stage '{stage}': timing on OpenVINO")
    ov_cfg = CompileOpenVinoConfig.model_validate(timing.openvino)
    ir_dir = folder / "openvino"
    ir_dir.mkdir()
    convert_to_ir(ov, exported.entry_path, ir_dir / "model.xml", ov_cfg, list(artifact.inputs))
    return Artifact("openvino", ir_dir, "model.xml", list(artifact.inputs),
                    meta={"runtime": runtime_meta(ov_cfg), "openvino": ov.get_version(), "source_quantized": False},
                    lineage=lineage, facts=facts).finalize()

