"""compile.tensorrt: an ONNX model compiled into a TensorRT engine for the NVIDIA GPU of this machine.

The artifact folder holds the engine (``model.engine``), the ONNX it was built from (``source.onnx``) and
``engine.json`` (TensorRT version, GPU, compute capability, sha256 of engine and ONNX, precision, profile).
The runtime rebuilds from ``source.onnx`` wherever the engine was built for another TensorRT or GPU.
After the build the engine's outputs are compared with onnxruntime's on real eval samples.

``tensorrt`` is imported only when a build runs, so recipes naming this pass validate on any machine.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from optimizer.artifact import Artifact, sha256_file
from optimizer.errors import GateFailed, MissingDependency, OptimizerError, RecipeError, StageError, first_line
from optimizer.passes.base import Pass, PassConfig, PassContext
from optimizer.passes.output_agreement import check_cosine, gates_on_classes, min_cosine_field, record_cosine
from optimizer.tensorrt_support import (
    ENGINE_FILE,
    INSTALL_MODELOPT,
    MANIFEST_FILE,
    SOURCE_ONNX,
    BuildPlan,
    BuildSettings,
    EngineManifest,
    ParserIssue,
    build_failure_error,
    build_profiles,
    check_batch_range,
    check_profiles_against_onnx,
    check_qdq_for_int8,
    current_gpu,
    default_tolerances,
    inspect_qdq,
    make_tensorrt_logger,
    onnx_input_dims,
    parse_version,
    plan_precision,
    require_cuda_gpu,
    require_tensorrt,
    retype_uint8_qdq,
    sha256_bytes,
    write_bytes_atomic,
    write_manifest,
)

if TYPE_CHECKING:
    import onnx


class CompileTensorRTConfig(PassConfig):
    precision: Literal["fp32", "fp16", "bf16", "int8"] = Field(
        default="fp16",
        description="Engine precision. 'int8' needs a Q/DQ model (a quantize.nncf or quantize.ort stage before "
        "this one); fp16/bf16 on TensorRT 11 convert the graph with NVIDIA ModelOpt AutoCast first.",
    )
    int8_fallback: Literal["fp16", "fp32"] = Field(
        default="fp16", description="With precision int8: the precision of layers outside Q/DQ pairs."
    )
    min_batch: int = Field(default=1, ge=1, description="Smallest batch the engine accepts.")
    # validate_default: a bound left at its default is still checked against the ones that were set.
    opt_batch: int = Field(default=1, ge=1, validate_default=True,
                           description="Batch TensorRT tunes kernels for (min <= opt <= max).")
    max_batch: int = Field(default=64, ge=1, validate_default=True,
                           description="Largest batch the engine accepts; bigger ones are split.")
    workspace_mb: int | None = Field(
        default=None, ge=1, description="Builder workspace limit in MiB (default: TensorRT's, the GPU's memory)."
    )
    timing_cache: str | None = Field(
        default=None,
        description="File of TensorRT's timing cache, reused between builds (relative to the recipe file); "
        "created if missing, updated atomically after a build.",
    )
    builder_optimization_level: int = Field(
        default=3, ge=0, le=5, description="0-5; higher searches longer for faster kernels (TensorRT default 3)."
    )
    verify_samples: int = Field(default=256, ge=1, description="Eval samples compared with onnxruntime.")
    atol: float | None = Field(default=None, ge=0, description="Absolute tolerance (default depends on precision).")
    rtol: float | None = Field(default=None, ge=0, description="Relative tolerance (default depends on precision).")
    min_top1_agreement: float | None = Field(
        default=None, ge=0, le=1, description="Least top-1 agreement with onnxruntime (default depends on precision). "
        "Recorded but not checked when evaluate.accuracy.metric does not read classes (min_cosine is checked "
        "instead).",
    )
    min_cosine: float = min_cosine_field()

    # Declared after the fields they compare, so info.data holds those.
    @field_validator("opt_batch")
    @classmethod
    def _opt_after_min(cls, opt_batch: int, info: ValidationInfo) -> int:
        min_batch = info.data.get("min_batch", 1)
        problem = check_batch_range(min_batch, opt_batch, max(opt_batch, min_batch))
        if problem:
            raise ValueError(problem)
        return opt_batch

    @field_validator("max_batch")
    @classmethod
    def _max_after_opt(cls, max_batch: int, info: ValidationInfo) -> int:
        if "opt_batch" not in info.data:  # opt_batch itself was invalid; that error is reported first
            return max_batch
        problem = check_batch_range(info.data.get("min_batch", 1), info.data["opt_batch"], max_batch)
        if problem:
            raise ValueError(problem)
        return max_batch


@dataclass
class BuiltEngine:
    data: bytes
    tensorrt_version: str
    plan: BuildPlan
    outputs: list[str]
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _autocast(onnx_path: Path, precision: str, scratch: Path, stage: str) -> Path:
    """The ONNX graph converted to fp16/bf16 by ModelOpt AutoCast (TensorRT 11 has no FP16 builder flag)."""
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except ImportError:
        raise MissingDependency(
            f"stage '{stage}': {precision} on TensorRT 11 or newer needs the ONNX graph converted first "
            f"(TensorRT 11 removed the {precision.upper()} builder flag), which needs NVIDIA ModelOpt: "
            f"{INSTALL_MODELOPT}"
        ) from None
    from optimizer.passes.onnx_io import save_onnx

    try:
        converted = convert_to_mixed_precision(onnx_path=str(onnx_path), low_precision_type=precision,
                                               keep_io_types=True)
    except Exception as exc:  # AutoCast raises many types; name the stage and the cause
        raise StageError(f"stage '{stage}': ModelOpt AutoCast could not convert the model to {precision}: "
                         f"{first_line(exc)}") from exc
    out = scratch / f"autocast_{precision}.onnx"
    save_onnx(converted, out)
    return out


def _parser_issues(parser: Any) -> list[ParserIssue]:
    issues = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        name = operator = ""
        try:
            name, operator = error.node_name(), error.node_operator()
        except AttributeError:  # older bindings: description only
            pass
        issues.append(ParserIssue(str(error.desc()), str(name or ""), str(operator or "")))
    return issues


def _load_timing_cache(trt: Any, config: Any, path: Path | None, notes: list[str]) -> Any:
    """Attach the timing cache stored at ``path`` (a fresh one when missing or made elsewhere)."""
    if path is None:
        return None
    data = b""
    if path.is_file():
        data = path.read_bytes()
    cache = None
    try:
        cache = config.create_timing_cache(data)
        if not config.set_timing_cache(cache, False):
            raise ValueError("recorded for another GPU or TensorRT version")
    except Exception as exc:  # a damaged or foreign cache only costs build time: start over
        notes.append(f"timing cache {path} not reused ({first_line(exc, 100)}); starting a new one")
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    return cache


def build_engine(onnx_path: Path, settings: BuildSettings, *, stage: str, timing_cache: Path | None = None,
                 progress: Callable[[str], None] | None = None) -> BuiltEngine:
    """Build a serialized engine from ``onnx_path`` for the current GPU; raise our errors on failure.

    Used by the pass and by the runtime (rebuilding for a machine the engine was not made for).
    """
    from optimizer.models import check_onnx_external_data

    trt = require_tensorrt(stage)
    require_cuda_gpu(stage)
    # TensorRT follows external-data locations itself: confine them to the model's folder first.
    check_onnx_external_data(onnx_path)
    say = progress or (lambda message: None)
    version = str(trt.__version__)
    plan = plan_precision(settings.precision, parse_version(version)[0], int8_fallback=settings.int8_fallback)
    logger = make_tensorrt_logger(trt)
    notes: list[str] = []
    started = time.perf_counter()
    # Scratch space outside the artifact folder: a rebuild must not touch a published artifact.
    with tempfile.TemporaryDirectory(prefix="optimizer-tensorrt-") as scratch:
        source = _autocast(onnx_path, plan.autocast, Path(scratch), stage) if plan.autocast else onnx_path
        try:
            builder = trt.Builder(logger)
            flags = 0
            strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
            if plan.strongly_typed and strongly_typed is not None:
                flags |= 1 << int(strongly_typed)
            network = builder.create_network(flags)
            parser = trt.OnnxParser(network, logger)
            say("TensorRT: parsing the ONNX model")
            if not parser.parse_from_file(str(source)):
                issues = _parser_issues(parser) or [ParserIssue(logger.errors[-1] if logger.errors
                                                                else "parse_from_file returned False")]
                raise build_failure_error(stage, parser_errors=issues)
            names = sorted(network.get_input(i).name for i in range(network.num_inputs))
            wanted = sorted(p.name for p in settings.profiles)
            if names != wanted:
                raise RecipeError(f"stage '{stage}': the network's inputs {names} differ from the recipe's {wanted}")
            outputs = [network.get_output(i).name for i in range(network.num_outputs)]

            config = builder.create_builder_config()
            if settings.workspace_mb:
                config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mb << 20)
            config.builder_optimization_level = settings.builder_optimization_level
            for flag in plan.flags:
                config.set_flag(getattr(trt.BuilderFlag, flag))
            if plan.disable_tf32 and hasattr(trt.BuilderFlag, "TF32"):
                config.clear_flag(trt.BuilderFlag.TF32)
            profile = builder.create_optimization_profile()
            for item in settings.profiles:
                profile.set_shape(item.name, item.min, item.opt, item.max)
            config.add_optimization_profile(profile)
            cache = _load_timing_cache(trt, config, timing_cache, notes)

            say(f"TensorRT {version}: building ({plan.note})")
            serialized = builder.build_serialized_network(network, config)
            if serialized is None:
                raise build_failure_error(stage, log_messages=logger.errors)
            data = bytes(memoryview(serialized))
            if cache is not None and timing_cache is not None:
                timing_cache.parent.mkdir(parents=True, exist_ok=True)
                write_bytes_atomic(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
        except OptimizerError:
            raise
        except Exception as exc:  # TensorRT raises RuntimeError, TypeError, MemoryError...: map them
            raise build_failure_error(stage, log_messages=logger.errors, exc=exc) from exc
    return BuiltEngine(data=data, tensorrt_version=version, plan=plan, outputs=outputs,
                       warnings=notes + logger.warnings[-20:], seconds=time.perf_counter() - started)


def _move_into(staging: Path, dest: Path, last: tuple[str, ...]) -> None:
    """Move staged files into ``dest``; the names in ``last`` go last, so a reader never sees a manifest
    without its engine."""
    order = {name: index + 1 for index, name in enumerate(last)}
    files = sorted((p for p in staging.rglob("*") if p.is_file()),
                   key=lambda p: (order.get(p.relative_to(staging).as_posix(), 0), p.as_posix()))
    for file in files:
        target = dest / file.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(file, target)


def write_engine_folder(source: "Path | onnx.ModelProto", settings: BuildSettings, dest: Path, *, stage: str,
                        timing_cache: Path | None = None,
                        progress: Callable[[str], None] | None = None) -> tuple[EngineManifest, BuiltEngine]:
    """Build an engine from ``source`` (an ONNX file or model) and write engine, source.onnx and manifest
    into ``dest``, only once the build has succeeded: everything is staged in a hidden folder first.
    """
    from optimizer.models import copy_onnx_model
    from optimizer.passes.onnx_io import save_onnx

    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=dest))
    try:
        staged_source = staging / SOURCE_ONNX
        if isinstance(source, Path):
            copy_onnx_model(source, staging, SOURCE_ONNX)
        else:
            save_onnx(source, staged_source)
        built = build_engine(staged_source, settings, stage=stage, timing_cache=timing_cache, progress=progress)
        gpu_name, cc = current_gpu()
        write_bytes_atomic(staging / ENGINE_FILE, built.data)
        manifest = EngineManifest(
            tensorrt_version=built.tensorrt_version, gpu_name=gpu_name, compute_capability=cc,
            engine_sha256=sha256_bytes(built.data), source_onnx_sha256=sha256_file(staged_source),
            precision=settings.precision, settings=settings, plan=built.plan, outputs=built.outputs,
        )
        write_manifest(staging / MANIFEST_FILE, manifest)
        _move_into(staging, dest, last=(ENGINE_FILE, MANIFEST_FILE))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest, built


class CompileTensorRT(Pass):
    name = "compile.tensorrt"
    summary = "TensorRT engine (fp32/fp16/bf16/int8 Q/DQ) for NVIDIA GPUs, checked against onnxruntime."
    input_forms = ("onnx",)
    output_form = "tensorrt"
    needs = ("eval",)
    Config = CompileTensorRTConfig

    def run(self, artifact: Artifact, ctx: PassContext) -> Artifact:
        from optimizer.passes.onnx_io import load_onnx

        cfg: CompileTensorRTConfig = self.config  # type: ignore[assignment]
        stage = ctx.stage
        # What can be checked without a GPU is checked first, so a CPU machine reports recipe problems too.
        model = load_onnx(artifact.entry_path)
        profiles = build_profiles(artifact.inputs, min_batch=cfg.min_batch, opt_batch=cfg.opt_batch,
                                  max_batch=cfg.max_batch, stage=stage)
        check_profiles_against_onnx(profiles, onnx_input_dims(model), stage=stage)
        report = inspect_qdq(model)
        retyped = 0
        if cfg.precision == "int8":
            check_qdq_for_int8(report, stage=stage)
            if report.uint8_zero:
                retyped = retype_uint8_qdq(model)
        elif report.has_qdq:
            raise RecipeError(f"stage '{stage}': the input model is quantized (it has QuantizeLinear nodes); "
                              f"compile it with precision: int8, or compile the float model for {cfg.precision}")
        require_tensorrt(stage)
        require_cuda_gpu(stage)

        settings = BuildSettings(precision=cfg.precision, profiles=tuple(profiles),
                                 int8_fallback=cfg.int8_fallback, workspace_mb=cfg.workspace_mb,
                                 builder_optimization_level=cfg.builder_optimization_level)
        timing_cache = ctx.recipe.resolve(cfg.timing_cache) if cfg.timing_cache else None
        manifest, built = write_engine_folder(model if retyped else artifact.entry_path, settings, ctx.work_dir,
                                              stage=stage, timing_cache=timing_cache, progress=ctx.progress.update)
        del model
        gpu_name, cc = manifest.gpu_name, manifest.compute_capability

        ctx.details["tensorrt"] = {
            "version": built.tensorrt_version, "gpu": gpu_name, "compute_capability": cc,
            "precision": cfg.precision, "plan": built.plan.note, "build_s": round(built.seconds, 3),
            "engine_bytes": len(built.data), "profile": [p.to_dict() for p in profiles],
            "uint8_qdq_retyped": retyped, "timing_cache": str(timing_cache) if timing_cache else None,
            "warnings": built.warnings[:5],
        }
        meta = {
            "engine": ENGINE_FILE, "manifest": MANIFEST_FILE, "source_onnx": SOURCE_ONNX,
            "tensorrt": built.tensorrt_version, "gpu": gpu_name, "compute_capability": cc,
            "precision": cfg.precision, "plan": built.plan.note, "profile": [p.to_dict() for p in profiles],
            "onnx": dict(artifact.meta),
        }
        result = self.new_artifact(artifact, ctx, entry=ENGINE_FILE, meta=meta, facts={"precision": cfg.precision})
        self._check_fidelity(artifact, result, ctx)
        return result

    def _check_fidelity(self, source: Artifact, result: Artifact, ctx: PassContext) -> None:
        """Engine vs onnxruntime (CPU) on the same real eval samples; beyond tolerance the stage fails."""
        from optimizer.passes.export_onnx import compare_outputs
        from optimizer.runtimes.onnxruntime_cpu import OnnxRuntime
        from optimizer.runtimes.tensorrt_gpu import TensorRTRuntime

        cfg: CompileTensorRTConfig = self.config  # type: ignore[assignment]
        atol, rtol, agreement = default_tolerances(cfg.precision)
        atol = cfg.atol if cfg.atol is not None else atol
        rtol = cfg.rtol if cfg.rtol is not None else rtol
        agreement = cfg.min_top1_agreement if cfg.min_top1_agreement is not None else agreement
        eval_data = ctx.data.eval()
        samples = eval_data.batch(0, min(cfg.verify_samples, len(eval_data)))
        ctx.progress.update("verifying against onnxruntime")
        reference = OnnxRuntime(source, threads=ctx.threads).run_batched(samples, 256)
        runtime = TensorRTRuntime(result, threads=ctx.threads)
        try:
            candidate = runtime.run_batched(samples, cfg.max_batch)
        finally:
            runtime.close()
        if reference.shape != candidate.shape:
            raise GateFailed(f"stage '{ctx.stage}': engine output shape {candidate.shape} differs from "
                             f"onnxruntime's {reference.shape}")
        fidelity = compare_outputs(reference, candidate.astype("float32"), atol=atol, rtol=rtol)
        fidelity["reference"] = "onnxruntime CPU on the input ONNX model"
        fidelity["min_top1_agreement"] = agreement
        classes = gates_on_classes(ctx)
        if not classes:
            record_cosine(fidelity, reference, candidate, minimum=cfg.min_cosine)
        ctx.details["fidelity"] = fidelity
        if not fidelity["within_tolerance"] or (classes and fidelity["top1_agreement"] < agreement):
            # The arg-max agreement is named only where it is a class agreement.
            top1 = f", top-1 agreement {fidelity['top1_agreement']:.1%}, need {agreement:.0%}" if classes else ""
            knobs = "atol/rtol/min_top1_agreement" if classes else "atol/rtol"
            raise GateFailed(
                f"stage '{ctx.stage}': the {cfg.precision} engine differs from onnxruntime beyond tolerance "
                f"(max abs diff {fidelity['max_abs_diff']:.3g}, atol {atol}, rtol {rtol}{top1}); raise {knobs} if "
                "the difference is expected, or try int8_fallback: fp32 / a higher precision"
            )
        if not classes:
            check_cosine(fidelity, ctx.stage, f"the {cfg.precision} engine's", "onnxruntime's",
                         "lower min_cosine if the difference is expected, or try int8_fallback: fp32 / a higher "
                         "precision")
