"""Checks before a run (and before each stage) writes: the output folder is writable and has room.

A run that finds a full disk after twenty minutes of training has wasted them; these checks fail at once,
with exit code 5 and one line naming the folder, what is needed and what is free. The estimates are
deliberately generous: every stage writes an artifact about the size of its input, the stage cache keeps a
second copy, and ``final/`` a third of the last one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from optimizer.errors import DiskFull, ResourceFailure, is_disk_full

MIB = 1 << 20
PROBE_PREFIX = ".write-probe-"
# Eval arrays, measurements, reports and library scratch files: small next to models, but never zero.
RESERVE_BYTES = 128 * MIB
STAGE_RESERVE_BYTES = 64 * MIB


def human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(size) < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"  # pragma: no cover


def tree_size(path: Path) -> int:
    """Bytes of a file, or of every file under a folder (0 when missing)."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += (Path(root) / name).stat().st_size
            except OSError:
                pass  # a file removed while we walk does not need room
    return total


def input_size(model_file: Path | None) -> int:
    """Bytes of the model input, with an ONNX model's external data (the files next to it)."""
    if model_file is None or not model_file.is_file():
        return 0
    if model_file.suffix.lower() == ".onnx":
        from optimizer.models import check_onnx_external_data

        return model_file.stat().st_size + sum(p.stat().st_size for p in check_onnx_external_data(model_file))
    return model_file.stat().st_size


def estimate_run_bytes(model_bytes: int, stages: int) -> int:
    # Per stage (baseline included): the artifact plus its cached copy; plus final/.
    return model_bytes * (2 * (stages + 1) + 1) + RESERVE_BYTES


def estimate_stage_bytes(input_bytes: int) -> int:
    # The stage's artifact, its cached copy, and room for a pass that grows the model (float16 -> float32).
    return 3 * input_bytes + STAGE_RESERVE_BYTES


def check_writable(folder: Path) -> None:
    """Create, write, sync and remove a probe file: permission bits alone do not tell (root, read-only
    mounts, quotas)."""
    probe = folder / f"{PROBE_PREFIX}{os.getpid()}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            os.write(fd, b"0")
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFull(f"{folder}: the disk is full; free some space or choose another --out") from None
        raise ResourceFailure(f"{folder}: cannot write in the output folder ({exc.strerror or exc}); "
                              "fix its permissions or choose another --out") from None
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass


def check_free_space(folder: Path, needed: int, what: str) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise ResourceFailure(
            f"{folder}: not enough free disk space {what}: about {human(needed)} needed, {human(free)} free; "
            "free some space or choose another --out"
        )


def make_output_folder(folder: Path) -> bool:
    """Create the output folder (and parents); True when it did not exist before."""
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFull(f"{folder}: the disk is full; free some space or choose another --out") from None
        raise ResourceFailure(f"{folder}: cannot create the output folder ({exc.strerror or exc}); "
                              "choose another --out") from None
    if not folder.is_dir():
        raise ResourceFailure(f"{folder}: the output path is not a folder; choose another --out")
    return created
