"""export.onnx: torch -> ONNX, verified against the torch model on real evaluation inputs."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, ValidationInfo, field_validator

from optimizer.artifact import Artifact
from optimizer.errors import GateFailed, StageError, first_line
from optimizer.passes.base import Pass, PassConfig, PassContext
from optimizer.passes.onnx_io import EXTERNAL_DATA_BYTES
from optimizer.passes.output_agreement import gates_on_classes, record_cosine
from optimizer.shapes import LengthAxis, length_axes

# The dynamo exporter emits opset 18 and newer; the TorchScript exporter goes down to 9.
MIN_OPSET = {"dynamo": 18, "torchscript": 9}


def max_supported_opset(exporter: str) -> int:
    """The highest opset this torch's exporter writes (torch keeps it in a private module; fall back to onnx)."""
    try:
        from torch.onnx import _constants

        return int(_constants.ONNX_MAX_OPSET if exporter == "dynamo"
                   else _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
    except (ImportError, AttributeError):
        import onnx.defs

        return int(onnx.defs.onnx_opset_version())


class ExportOnnxConfig(PassConfig):
    exporter: Literal["dynamo", "torchscript"] = Field(
        default="dynamo", description="torch.onnx exporter: 'dynamo' (torch.export based) or the legacy 'torchscript'."
    )
    # Declared after `exporter` so that its validator can see which exporter was chosen.
    opset: int = Field(default=18, description="ONNX opset (18 or newer with the dynamo exporter).")
    dynamic_batch: bool = Field(default=True, description="Make the first dimension of every input dynamic.")
    output_name: str = Field(default="output", description="Name of the model output.")
    verify_samples: int = Field(default=256, ge=1, description="Eval samples compared between torch and ONNX.")
    verify_lengths: list[int] | None = Field(
        default=None, description="With dynamic axes (model.inputs[].dynamic): the lengths at which the export is "
        "also compared with PyTorch, each on a few eval samples padded or cut to it. Unset: 8, 16, 32, 64, 128, "
        "256, 512 within the bounds, and both bounds.")
    verify_length_samples: int = Field(default=4, ge=1, description="Eval samples compared at each verify length.")
    atol: float = Field(default=1e-4, ge=0, description="Absolute tolerance of the comparison.")
    rtol: float = Field(default=1e-3, ge=0, description="Relative tolerance of the comparison.")

    @field_validator("opset")
    @classmethod
    def _known_opset(cls, opset: int, info: ValidationInfo) -> int:
        exporter = info.data.get("exporter", "dynamo")
        low, high = MIN_OPSET[exporter], max_supported_opset(exporter)
        if not low <= opset <= high:
            other = "torchscript" if exporter == "dynamo" else "dynamo"
            raise ValueError(
                f"opset {opset} is not supported by the {exporter} exporter; use {low}..{high} "
                f"(the {other} exporter takes {MIN_OPSET[other]}..{max_supported_opset(other)})"
            )
        return opset


def compare_outputs(reference: np.ndarray, candidate: np.ndarray, *, atol: float, rtol: float) -> dict:
    """Max absolute and relative difference, top-1 agreement, and whether allclose holds."""
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    scale = np.abs(reference).astype(np.float64)
    rel = diff / np.maximum(scale, 1e-12)
    within = bool(np.all(diff <= atol + rtol * scale))
    agree = float((reference.reshape(len(reference), -1).argmax(-1) == candidate.reshape(len(candidate), -1).argmax(-1)).mean())
    return {
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float(rel.max()),
        "top1_agreement": agree,
        "samples": int(len(reference)),
        "atol": atol,
        "rtol": rtol,
        "within_tolerance": within,
    }


def export_module(module: Any, artifact: Artifact, samples: dict[str, np.ndarray], out_path: Path,
                  cfg: ExportOnnxConfig) -> None:
    """torch.onnx.export of a torch artifact's module with the pass's settings, traced on real samples.

    Shared with the latency measurement, which times torch stages on the deployment runtime through a
    throwaway export made the same way as the recipe's own. Raises whatever the exporter raises.
    """
    import torch

    names = [spec.name for spec in artifact.inputs]
    # A static export is traced at the recipe's batch size; a dynamic one at 2 (1 could be specialized).
    example_batch = 2 if cfg.dynamic_batch else artifact.inputs[0].shape[0]
    example = tuple(torch.from_numpy(samples[name][:example_batch]) for name in names)
    external = sum(p.numel() * p.element_size() for p in module.parameters()) > EXTERNAL_DATA_BYTES
    # Declared dynamic axes become symbolic dimensions; one Dim object (or one name) per symbolic name, so
    # inputs that share it are one length in the graph (the ids and the mask of a Transformer).
    declared = {spec.name: dict(spec.dynamic) for spec in artifact.inputs}
    if cfg.exporter == "dynamo":
        batch = torch.export.Dim("batch")
        dims = {dyn.name: torch.export.Dim(dyn.name, min=dyn.min, max=dyn.max)
                for spec in artifact.inputs for dyn in spec.dynamic.values()}
        per_input = [{**({0: batch} if cfg.dynamic_batch else {}),
                      **{int(axis): dims[dyn.name] for axis, dyn in declared[name].items()}} for name in names]
        dynamic = tuple(axes or None for axes in per_input) if any(per_input) else None
        with warnings.catch_warnings():
            # Several inputs share the batch (and any shared dynamic) dimension (MiniLM's ids and mask): the exporter
            # keeps one name for it and warns that the others are unused, which is what we want.
            warnings.filterwarnings("ignore", message=r".*axis name: \w+ will not be used")
            torch.onnx.export(
                module, example, str(out_path), input_names=names, output_names=[cfg.output_name],
                opset_version=cfg.opset, dynamo=True, dynamic_shapes=dynamic, external_data=external,
                verbose=False,
            )
    else:
        axes: dict[str, dict[int, str]] | None = {
            name: {**({0: "batch"} if cfg.dynamic_batch else {}),
                   **{int(axis): dyn.name for axis, dyn in declared.get(name, {}).items()}}
            for name in [*names, cfg.output_name]}
        axes = {name: dims for name, dims in axes.items() if dims} or None
        torch.onnx.export(
            module, example, str(out_path), input_names=names, output_names=[cfg.output_name],
            opset_version=cfg.opset, dynamo=False, dynamic_axes=axes,
        )


def default_verify_lengths(low: int, high: int) -> list[int]:
    """The lengths an export with a dynamic axis is checked at: powers of two from 8 within the bounds, and both
    bounds (a graph specialized to the traced length fails at the others)."""
    return sorted({low, high} | {n for n in (8, 16, 32, 64, 128, 256, 512) if low <= n <= high})


def fit_length(batch: dict[str, np.ndarray], axis: "LengthAxis", length: int) -> dict[str, np.ndarray]:
    """Samples cut or zero-padded to ``length`` on ``axis``: both models are fed the same arrays, so the
    comparison needs no padding invariance of the model."""
    from optimizer.shapes import pad_into

    out = dict(batch)
    for name, dim in axis.places:
        array = out[name]
        cut = [slice(None)] * array.ndim
        cut[dim] = slice(0, min(length, array.shape[dim]))
        array = array[tuple(cut)]
        shape = list(array.shape)
        shape[dim] = length
        out[name] = pad_into(np.empty(shape, dtype=array.dtype), array, dim, 0)
    return out


def verify_lengths(reference: Any, candidate: Any, eval_data: Any, axes: dict[str, "LengthAxis"],
                   cfg: ExportOnnxConfig) -> list[dict[str, Any]]:
    """Elementwise comparison of PyTorch and the export at several lengths of each dynamic axis.

    A length the export fails to run at ends the comparison with a row holding the runtime's ``error``: a graph
    specialized to the traced length refuses the others, which is what this check is there to find."""
    count = min(cfg.verify_length_samples, len(eval_data))
    rows = []
    for name, axis in axes.items():
        lengths = cfg.verify_lengths or default_verify_lengths(axis.min, axis.max)
        for length in lengths:
            if not axis.min <= length <= axis.max:
                continue
            batch = fit_length(eval_data.batch(0, count), axis, length)
            expected = reference.run(batch)
            try:
                got = candidate.run(batch)
            except MemoryError:
                raise
            except Exception as exc:  # onnxruntime raises its own classes (Fail, InvalidArgument, ...)
                rows.append({"axis": name, "length": int(length), "error": f"{type(exc).__name__}: "
                             f"{first_line(exc, 400)}", "within_tolerance": False, "samples": count})
                return rows
            result = compare_outputs(expected, got, atol=cfg.atol, rtol=cfg.rtol)
            rows.append({"axis": name, "length": int(length), "max_abs_diff": result["max_abs_diff"],
                         "within_tolerance": result["within_tolerance"], "samples": count})
    return rows


class ExportOnnx(Pass):
    name = "export.onnx"
    summary = "Export to ONNX (dynamic batch) and check outputs against PyTorch on eval data."
    input_forms = ("torch",)
    output_form = "onnx"
    needs = ("eval",)
    Config = ExportOnnxConfig

    def run(self, artifact: Artifact, ctx: PassContext) -> Artifact:
        from optimizer.runtimes.onnxruntime_cpu import OnnxRuntime
        from optimizer.runtimes.torch_eager import TorchEagerRuntime

        cfg: ExportOnnxConfig = self.config  # type: ignore[assignment]
        eval_data = ctx.data.eval()
        count = min(cfg.verify_samples, len(eval_data))
        if count == 0:
            raise GateFailed(f"stage '{ctx.stage}': the eval set is empty, so the exported model cannot be compared "
                             "with PyTorch; give data.eval at least one sample")
        samples = eval_data.batch(0, count)
        reference_runtime = TorchEagerRuntime(artifact, threads=ctx.threads)
        ctx.progress.update(f"exporting ({cfg.exporter}, opset {cfg.opset})")
        try:
            export_module(reference_runtime.module, artifact, samples, ctx.work_dir / "model.onnx", cfg)
        except Exception as exc:  # exporter failures come in many types; name the stage and the cause
            first = first_line(exc, 300)
            raise StageError(f"stage '{ctx.stage}': torch.onnx.export failed: {first}") from exc

        result = self.new_artifact(artifact, ctx, entry="model.onnx",
                                   meta={"opset": cfg.opset, "exporter": cfg.exporter},
                                   facts={"precision": "fp32"})
        ctx.progress.update("verifying against PyTorch")
        reference = reference_runtime.run_batched(samples, 256)
        candidate = OnnxRuntime(result, threads=ctx.threads).run_batched(samples, 256)
        if reference.shape != candidate.shape:
            raise GateFailed(f"stage '{ctx.stage}': ONNX output shape {candidate.shape} differs from PyTorch {reference.shape}")
        fidelity = compare_outputs(reference, candidate, atol=cfg.atol, rtol=cfg.rtol)
        # Only the elementwise tolerance gates an export; the agreement figures tell how far a failing one is off,
        # in the terms of the recipe's metric (the arg-max of an embedding is no class).
        classes = gates_on_classes(ctx)
        if not classes:
            record_cosine(fidelity, reference, candidate, minimum=None)
        ctx.details["fidelity"] = fidelity
        axes = length_axes(artifact.inputs)
        if axes and fidelity["within_tolerance"]:
            ctx.progress.update("verifying across lengths")
            sweep = verify_lengths(reference_runtime, OnnxRuntime(result, threads=ctx.threads), eval_data, axes, cfg)
            fidelity["lengths"] = sweep
            failed = next((row for row in sweep if "error" in row), None)
            if failed is not None:
                raise GateFailed(
                    f"stage '{ctx.stage}': the exported model fails to run at length {failed['length']} of dynamic "
                    f"axis '{failed['axis']}' ({failed['error']}); check the model for code that fixes a length at "
                    "export (a Python int taken from a shape, say), or narrow model.inputs[].dynamic")
            worst = next((row for row in sweep if not row["within_tolerance"]), None)
            if worst is not None:
                fidelity["within_tolerance"] = False
                fidelity["max_abs_diff"] = max(fidelity["max_abs_diff"], worst["max_abs_diff"])
                fidelity["failed_length"] = worst["length"]
        if not fidelity["within_tolerance"]:
            agreement = (f"top-1 agreement {fidelity['top1_agreement']:.1%}" if classes
                         else f"mean cosine similarity {fidelity['cosine_mean']:.4f}")
            at = f" at length {fidelity['failed_length']}" if "failed_length" in fidelity else ""
            raise GateFailed(
                f"stage '{ctx.stage}': exported model differs from PyTorch beyond tolerance{at} "
                f"(max abs diff {fidelity['max_abs_diff']:.3g}, atol {cfg.atol}, rtol {cfg.rtol}, "
                f"{agreement}); check the model for data-dependent code, or raise atol/rtol if the difference is "
                "expected"
            )
        return result
