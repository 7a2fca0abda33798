"""The output folder's life: one run at a time, leftovers of crashed runs cleaned, all-or-nothing publishing.

A run builds everything in ``OUT/.staging-*`` and publishes at the end by renaming whole folders and files
into place. Before the first rename it writes a journal (``OUT/.publish.json``) naming what it will
replace; the previous versions are renamed aside, not deleted, until every rename has succeeded and the
journal is removed (the commit point). A failure in between rolls back at once; a crash in between
(power cut, SIGKILL) is rolled back by the next run, which finds the journal. So a reader sees either the
previous run's outputs or the new ones, never a mix.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
import uuid
from pathlib import Path
from typing import Callable

from optimizer.atomic import TEMP_MARK, fsync_dir, fsync_tree, remove_path, write_text_atomic
from optimizer.errors import OutputLocked
from optimizer.preflight import PROBE_PREFIX

LOCK_NAME = ".lock"
JOURNAL_NAME = ".publish.json"
STAGING_PREFIX = ".staging-"
OLD_PREFIX = ".old-"

Notify = Callable[[str], None]


# ------------------------------------------------------------------------------------------ lock


class OutputLock:
    """An exclusive lock on the output folder, held for the whole run.

    The kernel lock (``flock``) is the real exclusion: it vanishes with the process that held it, so a run
    killed with SIGKILL never blocks the next one. The PID written into the file names the holder in the
    error message, and lets a lock file written by a process that no longer exists be told apart from one
    whose process is alive but holds no kernel lock (another machine on a network file system, say), which
    is refused.
    """

    def __init__(self, folder: Path, notify: Notify | None = None):
        self.folder = folder
        self.path = folder / LOCK_NAME
        self.notify = notify or (lambda message: None)
        self._fd: int | None = None

    def __enter__(self) -> "OutputLock":
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                raise OutputLocked(f"{self.folder}: another run (pid {self._holder()}) is writing here; wait for it "
                                   "or choose another --out") from None
            # The holder before us may have removed the file between our open and our flock: then we locked
            # a deleted file, and must lock the one now at the path.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = _read_pid(fd)
            if previous and previous != os.getpid():
                if _alive(previous):
                    os.close(fd)
                    raise OutputLocked(
                        f"{self.folder}: another run (pid {previous}) holds the lock file {self.path}; wait for it, "
                        f"or if no run is writing here delete {self.path}"
                    )
                self.notify(f"{self.path}: took over a stale lock left by pid {previous}, which is no longer running")
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            os.fsync(fd)
            self._fd = fd
            return self
        raise OutputLocked(f"{self.folder}: cannot take the output lock {self.path}; retry, or choose another --out")

    def _holder(self) -> str:
        # The holder writes its PID right after locking; give it a moment if the file is still empty.
        for _ in range(10):
            try:
                pid = _parse_pid(self.path.read_bytes())
            except OSError:
                pid = 0
            if pid:
                return str(pid)
            time.sleep(0.05)
        return "unknown"

    def __exit__(self, *exc: object) -> None:
        if self._fd is None:
            return
        try:
            # Removed while still locked, so nobody can lock this file after we let go of it.
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None


def _parse_pid(raw: bytes) -> int:
    try:
        return int(raw.split()[0]) if raw.split() else 0
    except ValueError:
        return 0


def _read_pid(fd: int) -> int:
    return _parse_pid(os.pread(fd, 64, 0))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


# -------------------------------------------------------------------------------------- recovery


def recover(folder: Path, notify: Notify | None = None) -> None:
    """Under the lock: undo a publish a crash interrupted, and remove what crashed runs left behind."""
    notify = notify or (lambda message: None)
    journal_path = folder / JOURNAL_NAME
    if journal_path.exists():
        try:
            journal = json.loads(journal_path.read_text(encoding="utf-8"))
            _roll_back(folder, journal)
            notify(f"{folder}: an earlier run was stopped while publishing; its previous outputs were restored")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            notify(f"{journal_path}: could not roll back an interrupted publish ({exc}); check the outputs")
        journal_path.unlink(missing_ok=True)
        fsync_dir(folder)
    leftovers = [p for p in folder.iterdir()
                 if p.name.startswith((STAGING_PREFIX, OLD_PREFIX, PROBE_PREFIX)) or TEMP_MARK in p.name]
    for path in leftovers:
        remove_path(path)
    if leftovers:
        notify(f"{folder}: removed {len(leftovers)} leftover(s) of an interrupted run "
               f"({', '.join(sorted(p.name for p in leftovers)[:3])})")


def _old_name(name: str, token: str) -> str:
    return f"{OLD_PREFIX}{name}-{token}"


def _roll_back(folder: Path, journal: dict) -> None:
    token = journal["token"]
    for item in reversed(journal["items"]):
        target = folder / item["name"]
        old = folder / _old_name(item["name"], token)
        if old.exists():
            remove_path(target)
            os.replace(old, target)
        elif not item["had_old"] and item.get("moved"):
            remove_path(target)  # added by the interrupted publish; the previous run had none
        elif not item["had_old"]:
            # Whether the new one got moved in before the crash is unknown from the journal alone; it came
            # from a staging folder, which the crash left, so its staging twin tells.
            staged = folder / journal["staging"] / item["name"]
            if not staged.exists():
                remove_path(target)
    fsync_dir(folder)


# -------------------------------------------------------------------------------------- publishing


def publish(staging: Path, folder: Path, names: list[str]) -> None:
    """Move ``staging/<name>`` to ``folder/<name>`` for every name that was staged, all or nothing."""
    items = [name for name in names if (staging / name).exists()]
    fsync_tree(staging)  # the renames below publish only bytes that are on the disk
    token = uuid.uuid4().hex[:8]
    journal = {
        "token": token,
        "staging": staging.name,
        "items": [{"name": name, "had_old": os.path.lexists(folder / name)} for name in items],
    }
    write_text_atomic(folder / JOURNAL_NAME, json.dumps(journal))
    try:
        for item in journal["items"]:
            name = item["name"]
            if item["had_old"]:
                os.replace(folder / name, folder / _old_name(name, token))
            os.replace(staging / name, folder / name)
            item["moved"] = True
        fsync_dir(folder)
    except BaseException:
        _roll_back(folder, journal)
        (folder / JOURNAL_NAME).unlink(missing_ok=True)
        fsync_dir(folder)
        raise
    (folder / JOURNAL_NAME).unlink()  # the commit point: from here on the new outputs stand
    fsync_dir(folder)
    for item in journal["items"]:
        if item["had_old"]:
            remove_path(folder / _old_name(item["name"], token))
