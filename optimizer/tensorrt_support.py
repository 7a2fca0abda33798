"""TensorRT support that runs without TensorRT: profiles, the engine manifest, compatibility, errors.

A TensorRT engine (plan file) only runs on the TensorRT version and the GPU model it was built for, and
deserializing one executes whatever plugin code it names. So an engine is only ever loaded from an
artifact folder this toolkit wrote, next to a manifest (``engine.json``) that records the TensorRT
version, GPU, compute capability, the sha256 of the engine and of the ONNX it was built from
(``source.onnx``), the precision and the optimization profile. When anything differs on the machine that
loads it, the engine is rebuilt from ``source.onnx`` instead of being deserialized. Engine files are never
accepted as recipe inputs.

Nothing here imports ``tensorrt`` at module level, so every rule is checked by the CPU test suite;
``optimizer.passes.compile_tensorrt`` and ``optimizer.runtimes.tensorrt_gpu`` do the GPU work.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from optimizer.errors import (
    InputRejected,
    MissingDependency,
    OptimizerError,
    RecipeError,
    ResourceFailure,
    StageError,
)

if TYPE_CHECKING:
    import onnx

ENGINE_FILE = "model.engine"
SOURCE_ONNX = "source.onnx"
MANIFEST_FILE = "engine.json"
MANIFEST_FORMAT = 1
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
MIN_TENSORRT_MAJOR = 10
INSTALL_TENSORRT = "pip install 'optimizer[tensorrt]'"
INSTALL_MODELOPT = "pip install 'nvidia-modelopt[onnx]'"

PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8")


class _NamedShape(Protocol):
    """What a profile needs from an input spec (``optimizer.recipe.InputSpec`` fits)."""

    name: str
    shape: list[int]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parse_version(text: str) -> tuple[int, ...]:
    """'10.13.0.35' -> (10, 13, 0, 35); trailing non-numeric parts ('11.1.0rc1') are dropped."""
    parts: list[int] = []
    for piece in str(text).split("."):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
        if digits.group() != piece:
            break
    return tuple(parts)


def format_cc(cc: str | Sequence[int]) -> str:
    """Compute capability as 'major.minor' whatever form it came in ((9, 0), '9.0', 'sm_90' is not accepted)."""
    if isinstance(cc, str):
        return cc.strip()
    major, minor = cc
    return f"{int(major)}.{int(minor)}"


# ----------------------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class InputProfile:
    """One input's optimization profile: the shapes TensorRT builds kernels for (batch first)."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    @property
    def max_batch(self) -> int:
        return self.max[0]

    @property
    def min_batch(self) -> int:
        return self.min[0]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "InputProfile":
        return cls(str(data["name"]), tuple(int(d) for d in data["min"]), tuple(int(d) for d in data["opt"]),
                   tuple(int(d) for d in data["max"]))


def check_batch_range(min_batch: int, opt_batch: int, max_batch: int) -> str | None:
    """Why min/opt/max batch sizes cannot form a profile, or None when they can."""
    for label, value in (("min_batch", min_batch), ("opt_batch", opt_batch), ("max_batch", max_batch)):
        if value < 1:
            return f"{label} must be at least 1 (got {value})"
    if min_batch > opt_batch:
        return f"min_batch {min_batch} is above opt_batch {opt_batch}; need min_batch <= opt_batch <= max_batch"
    if opt_batch > max_batch:
        return f"opt_batch {opt_batch} is above max_batch {max_batch}; need min_batch <= opt_batch <= max_batch"
    return None


def build_profiles(inputs: Sequence[_NamedShape], *, min_batch: int, opt_batch: int, max_batch: int,
                   stage: str) -> list[InputProfile]:
    """One profile per recipe input: the batch axis from the stage's config, the other axes from the spec."""
    problem = check_batch_range(min_batch, opt_batch, max_batch)
    if problem:
        raise RecipeError(f"stage '{stage}': with.{problem.split()[0]}: {problem}")
    if not inputs:
        raise RecipeError(f"stage '{stage}': the model declares no inputs; add model.input to the recipe")
    profiles = []
    for spec in inputs:
        if len(spec.shape) < 1:
            raise RecipeError(f"stage '{stage}': model input '{spec.name}' has no batch axis; give its shape "
                              "with the batch first, e.g. [1, 3, 224, 224]")
        rest = tuple(int(d) for d in spec.shape[1:])
        profiles.append(InputProfile(spec.name, (min_batch, *rest), (opt_batch, *rest), (max_batch, *rest)))
    return profiles


def check_profiles_against_onnx(profiles: Sequence[InputProfile], onnx_inputs: dict[str, list[int | None]],
                                *, stage: str) -> None:
    """Refuse a profile the ONNX model cannot take: other names, other rank, or a fixed axis that differs.

    ``onnx_inputs`` maps each graph input to its dimensions, None for a dynamic (symbolic) one.
    """
    wanted = {p.name for p in profiles}
    if set(onnx_inputs) != wanted:
        raise InputRejected(f"stage '{stage}': the ONNX model's inputs {sorted(onnx_inputs)} differ from the "
                            f"recipe's inputs {sorted(wanted)}; fix model.input(s) in the recipe")
    for profile in profiles:
        dims = onnx_inputs[profile.name]
        if len(dims) != len(profile.max):
            raise InputRejected(f"stage '{stage}': ONNX input '{profile.name}' has rank {len(dims)} but the recipe "
                                f"shape {list(profile.opt)} has rank {len(profile.max)}; fix model.input.shape")
        batch = dims[0]
        if batch is not None and not profile.min[0] == profile.max[0] == batch:
            raise RecipeError(f"stage '{stage}': ONNX input '{profile.name}' has a fixed batch of {batch}; set "
                              f"min_batch, opt_batch and max_batch to {batch}, or export with dynamic_batch: true")
        for axis, (fixed, wanted_dim) in enumerate(zip(dims[1:], profile.opt[1:], strict=True), start=1):
            if fixed is not None and fixed != wanted_dim:
                raise InputRejected(f"stage '{stage}': ONNX input '{profile.name}' axis {axis} is {fixed} but the "
                                    f"recipe shape says {wanted_dim}; fix model.input.shape")


def onnx_input_dims(model: "onnx.ModelProto") -> dict[str, list[int | None]]:
    """Graph inputs (initializers excluded) with their dimensions; None where the dimension is symbolic."""
    initializers = {init.name for init in model.graph.initializer}
    dims: dict[str, list[int | None]] = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        shape = value.type.tensor_type.shape
        dims[value.name] = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in shape.dim]
    return dims


# ------------------------------------------------------------------------------------- build plan


@dataclass(frozen=True)
class BuildPlan:
    """How a precision becomes a TensorRT build on a given TensorRT major version.

    TensorRT 10 offers weak typing (builder flags let it choose FP16/INT8 kernels); TensorRT 11 removed
    those flags, so reduced float precision there means converting the ONNX graph first (NVIDIA ModelOpt
    AutoCast) and building a strongly typed network. Explicit (Q/DQ) INT8 is strongly typed where the
    documentation asks for it; with TensorRT 10, an FP16 fallback for layers outside Q/DQ pairs needs the
    weakly typed INT8+FP16 build.
    """

    strongly_typed: bool
    flags: tuple[str, ...] = ()
    autocast: Literal["fp16", "bf16"] | None = None
    disable_tf32: bool = False
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"strongly_typed": self.strongly_typed, "flags": list(self.flags), "autocast": self.autocast,
                "disable_tf32": self.disable_tf32, "note": self.note}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BuildPlan":
        return cls(bool(data["strongly_typed"]), tuple(data.get("flags", ())), data.get("autocast"),
                   bool(data.get("disable_tf32", False)), str(data.get("note", "")))


def plan_precision(precision: str, tensorrt_major: int, *, int8_fallback: str = "fp16") -> BuildPlan:
    """The build plan for ``precision`` on TensorRT ``tensorrt_major``."""
    weak_typing = tensorrt_major < 11
    if precision == "fp32":
        # TF32 is on by default on Ampere and newer; off, 'fp32' means what it says.
        return BuildPlan(strongly_typed=True, disable_tf32=True, note="fp32 strongly typed, TF32 off")
    if precision in ("fp16", "bf16"):
        if weak_typing:
            return BuildPlan(strongly_typed=False, flags=(precision.upper(),),
                             note=f"weakly typed, BuilderFlag.{precision.upper()}")
        return BuildPlan(strongly_typed=True, autocast=precision,  # type: ignore[arg-type]
                         note=f"ONNX converted to {precision} by ModelOpt AutoCast (I/O kept fp32), strongly typed")
    if precision == "int8":
        if int8_fallback == "fp32":
            return BuildPlan(strongly_typed=True, note="explicit Q/DQ INT8, strongly typed, other layers fp32")
        if weak_typing:
            return BuildPlan(strongly_typed=False, flags=("INT8", "FP16"),
                             note="explicit Q/DQ INT8, weakly typed so layers without INT8 kernels may run in fp16")
        return BuildPlan(strongly_typed=True, autocast="fp16",
                         note="explicit Q/DQ INT8, float parts converted to fp16 by ModelOpt AutoCast, strongly typed")
    raise ValueError(f"unknown precision '{precision}'; known: {', '.join(PRECISIONS)}")


@dataclass(frozen=True)
class BuildSettings:
    """Everything a build depends on besides the ONNX file, TensorRT and the GPU; kept in the manifest."""

    precision: str
    profiles: tuple[InputProfile, ...]
    int8_fallback: str = "fp16"
    workspace_mb: int | None = None
    builder_optimization_level: int = 3

    def to_dict(self) -> dict[str, Any]:
        return {"precision": self.precision, "profiles": [p.to_dict() for p in self.profiles],
                "int8_fallback": self.int8_fallback, "workspace_mb": self.workspace_mb,
                "builder_optimization_level": self.builder_optimization_level}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BuildSettings":
        return cls(str(data["precision"]), tuple(InputProfile.from_dict(p) for p in data["profiles"]),
                   str(data.get("int8_fallback", "fp16")), data.get("workspace_mb"),
                   int(data.get("builder_optimization_level", 3)))


def default_tolerances(precision: str) -> tuple[float, float, float]:
    """(atol, rtol, minimum top-1 agreement) for comparing an engine's outputs with onnxruntime's.

    Reduced precision changes logits by amounts that grow with their magnitude; INT8 engines also fuse
    and round differently from onnxruntime's Q/DQ arithmetic, so their bound is the loosest.
    """
    return {
        "fp32": (1e-3, 1e-3, 0.99),
        "fp16": (5e-2, 5e-2, 0.99),
        "bf16": (2e-1, 1e-1, 0.98),
        "int8": (5e-1, 2e-1, 0.97),
    }[precision]


# --------------------------------------------------------------------------------------- manifest


@dataclass
class EngineManifest:
    """What an engine was built from and for; written next to it as engine.json."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    engine_sha256: str
    source_onnx_sha256: str
    precision: str
    settings: BuildSettings
    plan: BuildPlan
    outputs: list[str] = field(default_factory=list)
    engine_file: str = ENGINE_FILE
    source_onnx: str = SOURCE_ONNX
    format: int = MANIFEST_FORMAT

    @property
    def profiles(self) -> tuple[InputProfile, ...]:
        return self.settings.profiles

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "tensorrt_version": self.tensorrt_version,
            "gpu_name": self.gpu_name,
            "compute_capability": self.compute_capability,
            "engine_file": self.engine_file,
            "engine_sha256": self.engine_sha256,
            "source_onnx": self.source_onnx,
            "source_onnx_sha256": self.source_onnx_sha256,
            "precision": self.precision,
            "profile": [p.to_dict() for p in self.settings.profiles],
            "outputs": list(self.outputs),
            "settings": self.settings.to_dict(),
            "plan": self.plan.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EngineManifest":
        if data.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"manifest format {data.get('format')!r}, expected {MANIFEST_FORMAT}")
        for name in ("engine_file", "source_onnx"):
            # Only plain file names inside the artifact folder: a manifest never points elsewhere.
            value = str(data[name])
            if Path(value).name != value or value in ("", ".", ".."):
                raise ValueError(f"{name} '{value}' is not a plain file name")
        return cls(
            tensorrt_version=str(data["tensorrt_version"]),
            gpu_name=str(data["gpu_name"]),
            compute_capability=format_cc(data["compute_capability"]),
            engine_sha256=str(data["engine_sha256"]),
            source_onnx_sha256=str(data["source_onnx_sha256"]),
            precision=str(data["precision"]),
            settings=BuildSettings.from_dict(data["settings"]),
            plan=BuildPlan.from_dict(data["plan"]),
            outputs=[str(o) for o in data.get("outputs", [])],
            engine_file=str(data["engine_file"]),
            source_onnx=str(data["source_onnx"]),
        )


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, then rename: readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_manifest(path: Path, manifest: EngineManifest) -> None:
    write_json_atomic(path, manifest.to_dict())


def read_manifest(path: Path) -> EngineManifest:
    try:
        return EngineManifest.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise InputRejected(f"{path}: no engine manifest; a TensorRT engine is only loaded next to the manifest "
                            "compile.tensorrt wrote; re-run that stage") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputRejected(f"{path}: not a readable engine manifest ({exc}); "
                            "re-run the compile.tensorrt stage") from None


def check_engine_compatible(manifest: EngineManifest, current_trt_version: str, current_gpu_name: str,
                            current_cc: str | Sequence[int]) -> str | None:
    """Why this machine must not deserialize the engine, or None when it was built for exactly this setup.

    Plans are tied to the exact TensorRT version and to the GPU model (kernels are chosen for its
    compute capability, memory and clocks), so any difference means a rebuild, not a load.
    """
    if manifest.tensorrt_version != current_trt_version:
        return f"built with TensorRT {manifest.tensorrt_version}, this machine has {current_trt_version}"
    if format_cc(manifest.compute_capability) != format_cc(current_cc):
        return (f"built for compute capability {manifest.compute_capability}, this GPU has "
                f"{format_cc(current_cc)}")
    if manifest.gpu_name.strip() != current_gpu_name.strip():
        return f"built on {manifest.gpu_name}, this GPU is {current_gpu_name}"
    return None


@dataclass(frozen=True)
class EngineDecision:
    action: Literal["load", "rebuild"]
    reason: str


def decide_engine_action(manifest: EngineManifest, *, engine_sha256: str | None, source_onnx_sha256: str | None,
                         current_trt_version: str, current_gpu_name: str, current_cc: str | Sequence[int],
                         where: str = "engine") -> EngineDecision:
    """Load only an unchanged engine built for this machine; anything else is rebuilt from source.onnx.

    The source ONNX must match the manifest either way: a changed source means the folder was edited and
    nothing in it can be trusted, so that is refused rather than rebuilt.
    """
    if source_onnx_sha256 is None:
        raise InputRejected(f"{where}: {manifest.source_onnx} is missing; the engine cannot be checked or rebuilt; "
                            "re-run the compile.tensorrt stage")
    if source_onnx_sha256 != manifest.source_onnx_sha256:
        raise InputRejected(f"{where}: {manifest.source_onnx} changed since the engine was built (sha256 differs from "
                            "engine.json); refused; re-run the compile.tensorrt stage")
    if engine_sha256 is None:
        return EngineDecision("rebuild", f"{manifest.engine_file} is missing")
    if engine_sha256 != manifest.engine_sha256:
        return EngineDecision("rebuild", f"{manifest.engine_file} does not match the sha256 in engine.json")
    reason = check_engine_compatible(manifest, current_trt_version, current_gpu_name, current_cc)
    if reason is not None:
        return EngineDecision("rebuild", reason)
    return EngineDecision("load", "built with this TensorRT for this GPU; sha256 verified")


@dataclass(frozen=True)
class HostInfo:
    """The TensorRT version and GPU of the machine that loads an engine."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str


@dataclass
class ResolvedEngine:
    """Engine bytes that are safe to deserialize here, and where they came from."""

    data: bytes
    manifest: EngineManifest
    origin: Literal["artifact", "cache", "rebuilt"]
    reason: str


def engine_cache_dir() -> Path:
    """Where engines rebuilt for this machine are kept: $OPTIMIZER_CACHE_DIR, else the XDG cache folder."""
    root = os.environ.get("OPTIMIZER_CACHE_DIR")
    if root:
        return Path(root).expanduser() / "tensorrt"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "optimizer" / "tensorrt"


def rebuild_cache_key(manifest: EngineManifest, host: HostInfo) -> str:
    """One key per (source ONNX, build settings, TensorRT version, GPU): equal keys, interchangeable engines."""
    identity = json.dumps({
        "source": manifest.source_onnx_sha256,
        "settings": manifest.settings.to_dict(),
        "tensorrt": host.tensorrt_version,
        "gpu": host.gpu_name,
        "cc": host.compute_capability,
    }, sort_keys=True)
    return sha256_bytes(identity.encode())[:32]


def _read_if_file(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def resolve_engine(folder: Path, host: HostInfo, *, rebuild: Callable[[EngineManifest, Path], bytes],
                   cache_dir: Path | None = None) -> ResolvedEngine:
    """Pick the engine bytes to deserialize for the artifact in ``folder``.

    The artifact's own engine is used only when its bytes hash to the manifest's value and it was built
    with this TensorRT for this GPU. Otherwise a cached rebuild for this machine is used if its bytes check
    out, else ``rebuild(manifest, source_onnx_path)`` builds one, which is cached (written atomically).
    The bytes returned are the bytes that were hashed, so what is checked is what gets loaded.
    """
    manifest = read_manifest(folder / MANIFEST_FILE)
    source_path = folder / manifest.source_onnx
    source = _read_if_file(source_path)
    engine = _read_if_file(folder / manifest.engine_file)
    decision = decide_engine_action(
        manifest, engine_sha256=sha256_bytes(engine) if engine is not None else None,
        source_onnx_sha256=sha256_bytes(source) if source is not None else None,
        current_trt_version=host.tensorrt_version, current_gpu_name=host.gpu_name,
        current_cc=host.compute_capability, where=str(folder),
    )
    if decision.action == "load":
        assert engine is not None
        return ResolvedEngine(engine, manifest, "artifact", decision.reason)

    cache = (cache_dir or engine_cache_dir()) / rebuild_cache_key(manifest, host)
    cached_manifest_path = cache / MANIFEST_FILE
    if cached_manifest_path.is_file():
        try:
            cached = read_manifest(cached_manifest_path)
            data = _read_if_file(cache / cached.engine_file)
            if (data is not None and sha256_bytes(data) == cached.engine_sha256
                    and cached.source_onnx_sha256 == manifest.source_onnx_sha256
                    and check_engine_compatible(cached, host.tensorrt_version, host.gpu_name,
                                                host.compute_capability) is None):
                return ResolvedEngine(data, cached, "cache", f"{decision.reason}; using the engine rebuilt for this "
                                      f"machine in {cache}")
        except InputRejected:
            pass  # a damaged cache entry is rebuilt below, never loaded
    data = rebuild(manifest, source_path)
    rebuilt = EngineManifest(
        tensorrt_version=host.tensorrt_version, gpu_name=host.gpu_name,
        compute_capability=host.compute_capability, engine_sha256=sha256_bytes(data),
        source_onnx_sha256=manifest.source_onnx_sha256, precision=manifest.precision,
        settings=manifest.settings, plan=manifest.plan, outputs=list(manifest.outputs),
    )
    try:
        cache.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(cache / rebuilt.engine_file, data)
        write_manifest(cached_manifest_path, rebuilt)
    except OSError:
        pass  # the cache only saves time; an unwritable one is not an error
    return ResolvedEngine(data, rebuilt, "rebuilt", decision.reason)


# ----------------------------------------------------------------------------------- dependencies


def require_tensorrt(stage: str, *, what: str = "compile.tensorrt") -> Any:
    """Import and return the ``tensorrt`` module, or raise a one-line MissingDependency."""
    try:
        import tensorrt
    except ImportError as exc:
        raise MissingDependency(
            f"stage '{stage}': {what} needs the TensorRT Python package, which is not installed "
            f"({type(exc).__name__}: {exc}); {INSTALL_TENSORRT} on a Linux or Windows machine with an NVIDIA GPU"
        ) from None
    version = getattr(tensorrt, "__version__", "0")
    if parse_version(version)[:1] < (MIN_TENSORRT_MAJOR,):
        raise MissingDependency(f"stage '{stage}': TensorRT {version} is too old for {what}; "
                                f"TensorRT {MIN_TENSORRT_MAJOR} or newer is needed: {INSTALL_TENSORRT} --upgrade")
    return tensorrt


def require_cuda_gpu(stage: str, *, what: str = "compile.tensorrt") -> None:
    """Raise a one-line MissingDependency when torch sees no CUDA GPU."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a core dependency
        raise MissingDependency(f"stage '{stage}': {what} needs torch with CUDA") from None
    if torch.version.cuda is None:
        raise MissingDependency(
            f"stage '{stage}': {what} needs an NVIDIA CUDA GPU, and this torch {torch.__version__} is a CPU-only "
            "build; install a CUDA build of torch and run on a machine with an NVIDIA GPU and driver"
        )
    if not torch.cuda.is_available():
        raise MissingDependency(
            f"stage '{stage}': {what} needs an NVIDIA CUDA GPU and none is visible here "
            "(torch.cuda.is_available() is False); run this recipe on a machine with an NVIDIA GPU and driver "
            "(check nvidia-smi and CUDA_VISIBLE_DEVICES), or remove the stage"
        )


def current_gpu(device: int = 0) -> tuple[str, str]:
    """(name, compute capability 'major.minor') of a CUDA device, as torch reports them."""
    import torch

    return torch.cuda.get_device_name(device), format_cc(torch.cuda.get_device_capability(device))


def refuse_engine_input(path: str | Path) -> None:
    """Refuse a TensorRT engine offered as a model input: it runs code and is tied to one TensorRT and GPU."""
    p = Path(path)
    if p.suffix.lower() in ENGINE_SUFFIXES:
        raise InputRejected(
            f"{p}: TensorRT engines ({', '.join(ENGINE_SUFFIXES)}) are not accepted as model inputs: loading one "
            "can run plugin code and it only works with the TensorRT version and GPU it was built for; give the "
            "ONNX model or the checkpoint and add a compile.tensorrt stage"
        )


def make_tensorrt_logger(trt: Any) -> Any:
    """A logger for the ``tensorrt`` module ``trt`` that keeps errors and warnings, so a failed build or load
    can say why in one line."""

    class CollectingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.warnings: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if int(severity) <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(str(msg))
            elif int(severity) == int(trt.ILogger.Severity.WARNING):
                self.warnings.append(str(msg))

    return CollectingLogger()


# ---------------------------------------------------------------------------------- error mapping


@dataclass(frozen=True)
class ParserIssue:
    """One error of TensorRT's ONNX parser (``IParserError``), as plain data."""

    description: str
    node_name: str = ""
    operator: str = ""


OUT_OF_MEMORY_PATTERNS = (
    r"out[ _]?of[ _]?memory",  # 'out of memory', TensorRT's 'Error Code 2: OutOfMemory', 'CUDA_ERROR_OUT_OF_MEMORY'
    r"\bOOM\b",
    r"cudaErrorMemoryAllocation",
    r"FAILED_ALLOCATION",
    r"insufficient (device |GPU )?memory",
    r"failed to allocate",
    r"could not allocate",
    r"Requested amount of GPU memory",
    r"\bstd::bad_alloc\b",
)


def is_out_of_memory(text: str) -> bool:
    return any(re.search(p, text, flags=re.IGNORECASE) for p in OUT_OF_MEMORY_PATTERNS)


def _one_line(text: str, limit: int = 220) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def build_failure_error(stage: str, *, parser_errors: Sequence[ParserIssue] = (),
                        log_messages: Sequence[str] = (), exc: BaseException | None = None) -> OptimizerError:
    """Turn a failed engine build into one of our errors with a one-line message naming stage and cause.

    Parser errors mean the ONNX model uses something TensorRT does not take (InputRejected); running out of
    GPU memory is a machine limit (ResourceFailure); anything else is a failure inside TensorRT (StageError).
    """
    if parser_errors:
        first = parser_errors[0]
        node = f"node '{first.node_name}' ({first.operator}): " if first.node_name or first.operator else ""
        more = f" (+{len(parser_errors) - 1} more)" if len(parser_errors) > 1 else ""
        return InputRejected(f"stage '{stage}': TensorRT's ONNX parser rejected the model: "
                             f"{node}{_one_line(first.description, 160)}{more}; check the operator is supported "
                             "by this TensorRT version or change the export (opset, exporter)")
    texts = [*(str(m) for m in log_messages), *([f"{type(exc).__name__}: {exc}"] if exc is not None else [])]
    if isinstance(exc, MemoryError) or any(is_out_of_memory(t) for t in texts):
        cause = next((t for t in texts if is_out_of_memory(t)), "MemoryError")
        return ResourceFailure(f"stage '{stage}': TensorRT ran out of GPU memory building the engine "
                               f"({_one_line(cause, 140)}); lower max_batch or workspace_mb, or free the GPU")
    cause = next((t for t in reversed(texts) if t.strip()), "build_serialized_network returned no engine")
    return StageError(f"stage '{stage}': TensorRT could not build the engine: {_one_line(cause, 180)}; "
                      "re-run with --debug for TensorRT's log")


# ------------------------------------------------------------------------------------- Q/DQ checks

_INT8 = 3  # onnx.TensorProto.INT8
_UINT8 = 2  # onnx.TensorProto.UINT8
_QDQ = ("QuantizeLinear", "DequantizeLinear")


@dataclass
class QdqReport:
    """The Q/DQ nodes of an ONNX graph as TensorRT sees them.

    TensorRT quantizes symmetrically to signed INT8: zero points must be 0 and are read as INT8 even when
    the graph says UINT8 (the unsigned range [0, 255] then clips at 127).
    """

    quantize: int = 0
    dequantize: int = 0
    int8_symmetric: list[str] = field(default_factory=list)
    uint8_zero: list[str] = field(default_factory=list)
    """UINT8 zero points, all 0: unsigned quantizers, re-expressible as signed ones (see retype_uint8_qdq)."""
    asymmetric: list[str] = field(default_factory=list)
    """Non-zero zero points: asymmetric quantization TensorRT cannot run."""
    other: list[str] = field(default_factory=list)
    """Zero points that are not a constant initializer, or of a type other than INT8/UINT8."""

    @property
    def has_qdq(self) -> bool:
        return self.quantize + self.dequantize > 0


def _node_label(node: Any, index: int) -> str:
    return node.name or f"{node.op_type}#{index}"


def inspect_qdq(model: "onnx.ModelProto") -> QdqReport:
    from onnx import numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    report = QdqReport()
    for index, node in enumerate(model.graph.node):
        if node.op_type not in _QDQ:
            continue
        if node.op_type == "QuantizeLinear":
            report.quantize += 1
        else:
            report.dequantize += 1
        label = _node_label(node, index)
        zero_point = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if zero_point is None or zero_point not in initializers:
            report.other.append(label)
            continue
        tensor = initializers[zero_point]
        values = numpy_helper.to_array(tensor)
        if tensor.data_type not in (_INT8, _UINT8):
            report.other.append(label)
        elif values.any():
            report.asymmetric.append(label)
        elif tensor.data_type == _UINT8:
            report.uint8_zero.append(label)
        else:
            report.int8_symmetric.append(label)
    return report


def check_qdq_for_int8(report: QdqReport, *, stage: str) -> None:
    """Refuse an int8 build whose graph TensorRT cannot run as the ONNX model means."""
    if not report.has_qdq:
        raise RecipeError(
            f"stage '{stage}': precision int8 needs a Q/DQ ONNX model (QuantizeLinear/DequantizeLinear nodes) and "
            "the input has none; add a quantize.nncf stage before this one, or use precision fp16"
        )
    if report.asymmetric:
        raise InputRejected(
            f"stage '{stage}': {len(report.asymmetric)} Q/DQ nodes have non-zero zero points (e.g. "
            f"'{report.asymmetric[0]}'); TensorRT only runs symmetric INT8; quantize with quantize.nncf "
            "(preset: performance), or with symmetric activations and weights"
        )
    if report.other:
        raise InputRejected(
            f"stage '{stage}': {len(report.other)} Q/DQ nodes have no constant INT8/UINT8 zero point (e.g. "
            f"'{report.other[0]}'); TensorRT's INT8 path needs explicit zero points equal to 0"
        )


def retype_uint8_qdq(model: "onnx.ModelProto") -> int:
    """Re-express unsigned (UINT8, zero point 0) Q/DQ nodes as signed INT8 ones with the same upper bound.

    TensorRT has no unsigned INT8 quantization and would read [0, 255] as [-128, 127], clipping half the
    range. With the scale multiplied by 255/127, the signed quantizer covers the same [0, 255 * scale] at
    about half the resolution, which is what a symmetric INT8 quantizer of a non-negative tensor gets. NNCF
    uses unsigned quantizers after ReLU-like operations, where values are non-negative. The model is changed
    in place; returns the number of nodes rewritten. Weights stored as UINT8 are refused (rescaling them
    would round twice).
    """
    import numpy as np
    from onnx import numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    replaced: dict[str, str] = {}
    rewritten = 0
    retyped_outputs: set[str] = set()
    for node in model.graph.node:
        if node.op_type not in _QDQ or len(node.input) < 3 or node.input[2] not in initializers:
            continue
        zero = initializers[node.input[2]]
        if zero.data_type != _UINT8 or numpy_helper.to_array(zero).any():
            continue
        if node.op_type == "DequantizeLinear" and node.input[0] in initializers:
            raise InputRejected(f"DequantizeLinear '{node.name}' reads UINT8 weights '{node.input[0]}'; TensorRT "
                                "needs INT8 weights; quantize weights as signed INT8")
        if node.op_type == "DequantizeLinear" and node.input[0] not in producers:
            raise InputRejected(f"DequantizeLinear '{node.name}' reads a UINT8 graph input; TensorRT needs INT8")
        scale_name = node.input[1]
        if scale_name not in initializers:
            raise InputRejected(f"{node.op_type} '{node.name}': scale '{scale_name}' is not a constant initializer")
        for old, make in ((scale_name, lambda a: (a.astype(np.float64) * 255.0 / 127.0).astype(a.dtype)),
                          (node.input[2], lambda a: np.zeros(a.shape, dtype=np.int8))):
            if old not in replaced:
                new_name = f"{old}__tensorrt_int8"
                array = make(numpy_helper.to_array(initializers[old]))
                model.graph.initializer.append(numpy_helper.from_array(array, new_name))
                replaced[old] = new_name
        node.input[1] = replaced[scale_name]
        node.input[2] = replaced[zero.name]
        if node.op_type == "QuantizeLinear":
            retyped_outputs.update(node.output)
        rewritten += 1
    # Declared types of the quantized tensors change with their zero points.
    for value in [*model.graph.value_info, *model.graph.output]:
        if value.name in retyped_outputs and value.type.tensor_type.elem_type == _UINT8:
            value.type.tensor_type.elem_type = _INT8
    used = {name for node in model.graph.node for name in node.input}
    stale = [init for init in model.graph.initializer if init.name in replaced and init.name not in used]
    for init in stale:
        model.graph.initializer.remove(init)
    return rewritten


# ----------------------------------------------------------------------------------------- trtexec


def parse_trtexec_summary(text: str) -> dict[str, float]:
    """Medians (ms) and throughput from trtexec's '=== Performance summary ===' block.

    Keys present when found: 'gpu_compute_median_ms', 'latency_median_ms', 'throughput_qps'.
    """
    result: dict[str, float] = {}
    number = r"([0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?)"
    for line in text.splitlines():
        body = re.sub(r"^\s*(\[[^\]]*\]\s*)*", "", line)  # drop '[date-time] [I] ' prefixes
        if body.startswith("GPU Compute Time:"):
            found = re.search(r"median = " + number + " ms", body)
            if found:
                result["gpu_compute_median_ms"] = float(found.group(1))
        elif body.startswith("Latency:"):
            found = re.search(r"median = " + number + " ms", body)
            if found:
                result["latency_median_ms"] = float(found.group(1))
        elif body.startswith("Throughput:"):
            found = re.search(number + r" qps", body)
            if found:
                result["throughput_qps"] = float(found.group(1))
    return result


def shapes_argument(profiles: Iterable[InputProfile], batch: int) -> str:
    """trtexec's --shapes value for every input at ``batch``: 'images:1x1x28x28,mask:1x8'."""
    return ",".join(f"{p.name}:{'x'.join(str(d) for d in (batch, *p.opt[1:]))}" for p in profiles)
