"""The stage cache: finished stages (artifact and measurements) kept by a key of everything they depend on.

``optimizer run --resume`` looks every stage up before running it; a hit is copied into the run and
checked file by file against the entry's manifest, so a tampered or damaged entry is recomputed (with a
message), never used. The key hashes:

- the stage's input (the previous artifact's id, or the checkpoint's sha256 for the baseline) and the
  artifacts of any stage it references (a distillation teacher),
- the stage name, the pass name, version, configuration, the sha256 of the pass's source file and one over
  every Python file of this package (the helpers a pass calls live outside its file),
- the data specs (with size and modification time of the files behind them), the seed and the
  ``evaluate`` settings (and the source file of a ``python:`` accuracy metric), because the measurements are
  cached too; with them the runtime torch stages are timed on, as resolved for this recipe (PyTorch eager, or
  the deployment runtime with its export and compile settings),
- library versions (from package metadata: no heavy import) and the hardware (CPU model and flags; GPU
  names, driver and the CUDA version torch was built with, when there is a GPU).

The cache lives in ``OUT/.cache`` (the output lock guards it) or in a folder shared by several outputs
(``--cache DIR``). Entries are immutable: one is built in a temporary folder and renamed into place in one
step, so two runs storing the same entry at once both succeed and readers never see half an entry.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from optimizer.artifact import Artifact, sha256_file
from optimizer.atomic import fsync_dir, fsync_tree, write_text_atomic
from optimizer.errors import InputRejected, disk_full, is_disk_full

if TYPE_CHECKING:
    from optimizer.recipe import LoadedRecipe

CACHE_DIR_NAME = ".cache"
ENTRY_FILE = "entry.json"
ENTRY_VERSION = 1
# Packages whose version can change what a pass produces or what a measurement reads.
KEY_PACKAGES = ("torch", "torchvision", "onnx", "onnxruntime", "onnxscript", "nncf", "openvino", "torch-pruning",
                "tensorrt", "numpy", "safetensors", "optimizer")
# A temporary entry older than this in a shared cache belongs to a run that died.
STALE_TEMP_S = 24 * 3600

Notify = Callable[[str], None]


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in KEY_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def hardware() -> dict[str, Any]:
    from optimizer.measure.environment import fingerprint

    env = fingerprint()
    # Not the toolkit's git revision: toolkit_digest() covers its code, and a commit that only touches docs
    # must not invalidate every cached stage.
    return {key: env.get(key) for key in ("machine", "cpu", "cpu_flags", "cpus_usable", "gpu")}


def source_digest(obj_or_module: Any) -> str | None:
    """sha256 of the file that defines a class or module (None when there is no file, e.g. a notebook)."""
    module_name = obj_or_module if isinstance(obj_or_module, str) else getattr(obj_or_module, "__module__", None)
    if not module_name:
        return None
    module = sys.modules.get(module_name)
    path = getattr(module, "__file__", None)
    if path is None:
        try:
            spec = importlib.util.find_spec(module_name)
        except (ImportError, ValueError):
            return None
        path = spec.origin if spec else None
    if not path or not os.path.isfile(path):
        return None
    return sha256_file(Path(path))


def files_stamp(path: Path, limit: int = 100_000) -> list[tuple[str, int, int]] | None:
    """Name, size and modification time of a data file or of the files under a data folder: cheap, and
    enough to notice that data changed without reading it."""
    if path.is_file():
        stat = path.stat()
        return [(path.name, stat.st_size, stat.st_mtime_ns)]
    if not path.is_dir():
        return None
    stamps = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            file = Path(root) / name
            try:
                stat = file.stat()
            except OSError:
                continue
            stamps.append((file.relative_to(path).as_posix(), stat.st_size, stat.st_mtime_ns))
            if len(stamps) >= limit:
                return stamps
    return stamps


@dataclass
class CachedStage:
    artifact: Artifact
    metrics: dict[str, Any]
    details: dict[str, Any]
    seconds: float


@dataclass
class StageCache:
    """Look-ups (only when resuming) and stores (always) of finished stages under ``root``."""

    root: Path
    read: bool
    shared: bool
    notify: Notify = field(default=lambda message: None)
    used: set[str] = field(default_factory=set)
    reused: list[str] = field(default_factory=list)
    recomputed: list[dict[str, str]] = field(default_factory=list)

    # ------------------------------------------------------------------------------------ look-up
    def lookup(self, key: str, stage: str, artifact_dest: Path, measurements_dest: Path) -> CachedStage | None:
        if not self.read:
            return None
        entry = self.root / key
        if not (entry / ENTRY_FILE).is_file():
            return None
        try:
            body = _read_entry(entry)
            # Copy first, then check the copies: what was checked is what the run uses, even if the entry
            # changes under us.
            shutil.copytree(entry / "artifact", artifact_dest)
            shutil.copytree(entry / "measurements", measurements_dest)
            problem = _compare(body["files"], {"artifact": artifact_dest, "measurements": measurements_dest})
            if problem is None:
                artifact = Artifact.load(artifact_dest, verify=True)
        except (OSError, ValueError, KeyError, TypeError, InputRejected) as exc:
            if is_disk_full(exc):
                raise disk_full(exc, f"stage '{stage}': restoring it from the cache") from exc
            problem = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if problem is not None:
            shutil.rmtree(artifact_dest, ignore_errors=True)
            shutil.rmtree(measurements_dest, ignore_errors=True)
            self.notify(f"cache: stage '{stage}': {entry} does not match its manifest ({problem}); "
                        "recomputing the stage")
            self.recomputed.append({"stage": stage, "reason": problem})
            self._discard(entry)
            return None
        metrics = dict(body["metrics"])
        metrics["raw_times_file"] = str(measurements_dest / "latency_ms.npy")
        self.used.add(key)
        self.reused.append(stage)
        return CachedStage(artifact=artifact, metrics=metrics, details=body.get("details") or {},
                           seconds=float(body.get("seconds", 0.0)))

    # -------------------------------------------------------------------------------------- store
    def store(self, key: str, parts: dict[str, Any], stage: str, artifact: Artifact, measurements: Path,
              metrics: dict[str, Any], details: dict[str, Any], seconds: float) -> None:
        self.used.add(key)
        entry = self.root / key
        if (entry / ENTRY_FILE).is_file():
            return  # entries are immutable; another run (or an earlier one) stored this very result
        tmp = self.root / f".tmp-{key[:12]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.copytree(artifact.path, tmp / "artifact")
            shutil.copytree(measurements, tmp / "measurements")
            files = {f"{top}/{p.relative_to(tmp / top).as_posix()}": sha256_file(p)
                     for top in ("artifact", "measurements") for p in sorted((tmp / top).rglob("*")) if p.is_file()}
            body = {
                "entry_version": ENTRY_VERSION,
                "key": key,
                "stage": stage,
                "parts": parts,
                "files": files,
                "metrics": {k: v for k, v in metrics.items() if k != "raw_times_file"},
                "details": details,
                "seconds": seconds,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            text = json.dumps({"body": body, "sha256": digest(body)}, indent=1, default=str)
            write_text_atomic(tmp / ENTRY_FILE, text)
            fsync_tree(tmp)
            try:
                os.rename(tmp, entry)  # atomic; refuses to replace an entry another run completed meanwhile
            except OSError:
                if not (entry / ENTRY_FILE).is_file():
                    raise
            fsync_dir(self.root)
        except OSError as exc:
            if is_disk_full(exc):
                raise disk_full(exc, f"stage '{stage}': storing it in the cache {self.root}") from exc
            # The cache saves time; a run does not fail because it cannot keep one.
            self.notify(f"cache: could not store stage '{stage}' in {self.root} ({exc}); the run goes on")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # ----------------------------------------------------------------------------------- clean-up
    def prune(self) -> None:
        """Drop what this run did not use (a private cache only: a shared one serves other outputs too),
        and temporary folders of runs that died."""
        if not self.root.is_dir():
            return
        now = time.time()
        for path in self.root.iterdir():
            if path.name.startswith((".tmp-", ".trash-")):
                try:
                    stale = not self.shared or now - path.stat().st_mtime > STALE_TEMP_S
                except OSError:
                    continue
                if stale:
                    shutil.rmtree(path, ignore_errors=True)
            elif not self.shared and path.is_dir() and path.name not in self.used:
                self._discard(path)

    def _discard(self, entry: Path) -> None:
        # Renamed away first, so no reader ever sees an entry half deleted.
        trash = self.root / f".trash-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(entry, trash)
        except OSError:
            return  # already gone (another run discarded it)
        shutil.rmtree(trash, ignore_errors=True)

    def summary(self) -> dict[str, Any]:
        return {"dir": str(self.root), "resume": self.read, "shared": self.shared, "reused": self.reused,
                "recomputed": self.recomputed}


def _read_entry(entry: Path) -> dict[str, Any]:
    document = json.loads((entry / ENTRY_FILE).read_text(encoding="utf-8"))
    body = document["body"]
    if document.get("sha256") != digest(body):
        raise ValueError(f"{ENTRY_FILE} was changed after it was written")
    if body.get("entry_version") != ENTRY_VERSION or body.get("key") != entry.name:
        raise ValueError(f"{ENTRY_FILE} belongs to another cache version or key")
    return body


def _compare(expected: dict[str, str], tops: dict[str, Path]) -> str | None:
    """The first difference between the manifest and the copied files, or None."""
    found = {f"{top}/{p.relative_to(folder).as_posix()}": p
             for top, folder in tops.items() for p in sorted(folder.rglob("*")) if p.is_file()}
    for name in sorted(set(expected) | set(found)):
        if name not in found:
            return f"file {name} is missing"
        if name not in expected:
            return f"file {name} is not in the manifest"
        if sha256_file(found[name]) != expected[name]:
            return f"file {name} has changed (sha256 mismatch)"
    return None


# ------------------------------------------------------------------------------------------- keys


def common_key_parts(loaded: "LoadedRecipe") -> dict[str, Any]:
    """What every stage's result depends on besides its own input: data, measurement settings, software,
    hardware. Computed once per run."""
    recipe = loaded.recipe
    data: dict[str, Any] = {}
    for split in ("eval", "calibration", "train", "validation"):
        spec = getattr(recipe.data, split)
        if spec is None:
            continue
        raw = getattr(spec, "root", None) or getattr(spec, "path", None)
        code = None
        if spec.dataset.startswith("python:"):
            code = source_digest(spec.dataset.removeprefix("python:").split(":")[0])
        data[split] = {"spec": spec.model_dump(mode="json"),
                       "files": files_stamp(loaded.resolve(raw)) if raw else None, "code": code}
    parts = {
        "seed": recipe.seed,
        "evaluate": recipe.evaluate.model_dump(mode="json"),
        # evaluate.latency.runtime 'auto' depends on the recipe's last stage, and a torch stage timed on the
        # deployment runtime on the export and compile settings: key the resolved choice, not the word.
        "latency_timing": _latency_timing(recipe),
        "data": data,
        "libraries": library_versions(),
        "hardware": hardware(),
    }
    metric = recipe.evaluate.accuracy.metric
    if metric.startswith("python:"):
        # A python: metric scores the cached measurements: editing its code must measure again.
        parts["metric_code"] = source_digest(metric.removeprefix("python:").split(":")[0])
    return parts


def _latency_timing(recipe: Any) -> dict[str, Any] | None:
    from optimizer.measure.deploy_timing import deploy_timing

    timing = deploy_timing(recipe)
    return None if timing is None else timing.key()


def _timing_for(common: dict[str, Any], form: str) -> dict[str, Any]:
    """The common parts for a stage producing ``form``: only torch stages are timed through a throwaway export,
    so a change of the export or compile settings re-times those and leaves the others' measurements valid."""
    return common if form == "torch" else {**common, "latency_timing": None}


def baseline_key_parts(loaded: "LoadedRecipe", common: dict[str, Any]) -> dict[str, Any]:
    model = loaded.recipe.model
    inputs: dict[str, str] = {}
    if model.checkpoint is not None:
        checkpoint = loaded.resolve(model.checkpoint)
        inputs[checkpoint.name] = sha256_file(checkpoint)
        if model.source_kind == "onnx":
            from optimizer.models import check_onnx_external_data

            for data_file in check_onnx_external_data(checkpoint):
                inputs[data_file.relative_to(checkpoint.parent).as_posix()] = sha256_file(data_file)
    factory_code = source_digest(model.factory.split(":")[0]) if model.factory else None
    return {
        "stage": "baseline",
        "model": model.model_dump(mode="json", exclude={"checkpoint"}),
        "input_files": inputs,
        "factory_code": factory_code,
        **_timing_for(common, model.start_form),
    }


_TOOLKIT_DIGEST: str | None = None


def toolkit_digest() -> str:
    """sha256 over every Python file of this package: a pass calls into helpers beyond its own file (the
    training loop, the latency tables, the measurement code), and a change to any of them must re-run it."""
    global _TOOLKIT_DIGEST
    if _TOOLKIT_DIGEST is None:
        root = Path(__file__).resolve().parent
        h = hashlib.sha256()
        for path in sorted(root.rglob("*.py")):
            h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
        _TOOLKIT_DIGEST = h.hexdigest()
    return _TOOLKIT_DIGEST


def stage_key_parts(stage_name: str, pass_cls: type, config: dict[str, Any], input_artifact: Artifact,
                    references: dict[str, Artifact], common: dict[str, Any]) -> dict[str, Any]:
    return {
        "stage": stage_name,
        "input": input_artifact.sha256,
        # The files alone do not say which shape the artifact takes: resize.input keeps the weights and changes it.
        "input_shapes": [[spec.name, list(spec.shape)] for spec in input_artifact.inputs],
        "references": {name: artifact.sha256 for name, artifact in sorted(references.items())},
        "pass": pass_cls.name,
        "pass_version": getattr(pass_cls, "version", None),
        "pass_code": source_digest(pass_cls),
        "toolkit_code": toolkit_digest(),
        "config": config,
        **_timing_for(common, pass_cls.output_form_for(input_artifact.form)),
    }


def key_of(parts: dict[str, Any]) -> str:
    return digest(parts)
