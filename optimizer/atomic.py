"""Durable writes: a temp name in the same folder, flushed to disk, renamed into place.

A reader (or a run that crashed half-way) never sees half a file: the rename is atomic within one file
system, and the fsync before it makes sure the bytes reached the disk before the name points at them.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path

TEMP_MARK = ".tmp-"


def temp_name(path: Path) -> Path:
    """A hidden sibling of ``path`` that no other process or run picks: same folder, so rename is atomic."""
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:6]}")


def fsync_dir(folder: Path) -> None:
    """Persist the folder's entries (a rename is durable only once its folder is synced)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # some file systems do not let a folder be opened; nothing more can be done there
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def fsync_tree(folder: Path) -> None:
    """fsync every file, then every folder bottom-up, so a rename of ``folder`` publishes complete files."""
    if folder.is_file():
        _fsync_file(folder)
        return
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            path = Path(root) / name
            if not path.is_symlink():
                _fsync_file(path)
        fsync_dir(Path(root))


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def remove_path(path: Path) -> None:
    """Delete a file or a folder tree; missing is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
