"""The rules of the pass contract that can be checked while a pass runs, shared by the runner and check_pass.

A pass writes its artifact into ``ctx.work_dir`` and nowhere else, and leaves its input alone. Two cheap checks
enforce that wherever a pass runs:

* writes: Python-level file operations anywhere (``open`` for writing, rename, remove, mkdir, shutil copies)
  are recorded through an audit hook (``sys.addaudithook``; installed once per process, inert while nothing is
  watched). What a pass creates and removes again before ``run`` returns is scratch and allowed; what it leaves,
  changes or removes outside ``ctx.work_dir`` is not, except in the folders libraries write to by design
  (``_default_allowed``), the folders a pass names in ``Pass.write_folders()``, and whatever a caller adds.
  Writes by native code or child processes are not seen by the hook;
* the input: every file of the input artifact's folder is re-hashed after the pass and compared with what its
  ``artifact.json`` lists (``input_changes``), which also catches native writes there.

``optimizer.testing.check_pass`` adds the checks that need a private copy of everything (a listing of its
whole folder, new entries in the current folder); the runner uses what is here.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optimizer.artifact import METADATA_FILE, sha256_file

if TYPE_CHECKING:
    from optimizer.artifact import Artifact


_CREATE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

# Audit event -> (argument index of the path it creates or writes, of the path it removes, and of the
# dir_fd each of those two is relative to).
_EVENTS: dict[str, tuple[int | None, int | None, tuple[int | None, int | None]]] = {
    "os.mkdir": (0, None, (2, None)),
    "shutil.copytree": (1, None, (None, None)),
    "shutil.copyfile": (1, None, (None, None)),
    "os.link": (1, None, (3, None)),
    "os.symlink": (1, None, (2, None)),
    "os.rename": (1, 0, (3, 2)),
    "shutil.move": (1, 0, (None, None)),
    "os.truncate": (0, None, (None, None)),
    "os.remove": (None, 0, (None, 1)),
    "os.rmdir": (None, 0, (None, 1)),
    "shutil.rmtree": (None, 0, (None, None)),
}


class _WriteRecorder:
    """Collects the file-system changes Python code asks for while a pass runs (via audit events)."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = str(work_dir)
        self.lock = threading.Lock()
        self.existed: dict[str, bool] = {}  # path -> it existed before the run first touched it
        self.created: list[str] = []
        self.removed: set[str] = set()

    def _touch(self, path: str) -> None:
        # The pass's own output is not watched, which keeps this cheap for passes that write many files.
        if path in self.existed or _inside(path, self.work_dir):
            return
        existed = os.path.lexists(path)
        with self.lock:
            # Inside a folder the run created, nothing existed before the run.
            fresh = any(_inside(path, other) for other in self.created)
            if path not in self.existed:
                self.existed[path] = existed and not fresh
                if not self.existed[path]:
                    self.created.append(path)

    def event(self, name: str, args: tuple[Any, ...]) -> None:
        if name == "open":
            path, _mode, flags = args
            if isinstance(flags, int) and flags & _CREATE_FLAGS:
                target = _event_path(path)
                # A folder opened for writing is O_TMPFILE: an unnamed file that vanishes when closed.
                if target is not None and not os.path.isdir(target):
                    self._touch(target)
            return
        written, removed, (written_fd, removed_fd) = _EVENTS[name]
        if written is not None and len(args) > written:
            target = _event_path(args[written], _arg(args, written_fd))
            # mkdir(exist_ok=True) on an existing folder raises this event but changes nothing.
            if target is not None and not (name == "os.mkdir" and os.path.lexists(target)):
                self._touch(target)
        if removed is not None and len(args) > removed:
            target = _event_path(args[removed], _arg(args, removed_fd))
            if target is not None:
                self._touch(target)
                with self.lock:
                    self.removed.add(target)


def _arg(args: tuple[Any, ...], index: int | None) -> Any:
    return args[index] if index is not None and len(args) > index else None


def _event_path(path: Any, dir_fd: Any = None) -> str | None:
    """An absolute path for an audit event's path argument; None for file descriptors and for paths relative
    to a dir_fd (shutil.rmtree works through those, and its own event names the top folder)."""
    if isinstance(dir_fd, int) and dir_fd != -1:
        return None
    if path is None or isinstance(path, int):
        return None
    try:
        return os.path.abspath(os.fsdecode(path))
    except (TypeError, ValueError):
        return None


_active: _WriteRecorder | None = None
_hook_installed = False
_hook_lock = threading.Lock()
_WATCHED_EVENTS = frozenset({"open", *_EVENTS})


def _audit(name: str, args: tuple[Any, ...]) -> None:
    recorder = _active
    if recorder is None or name not in _WATCHED_EVENTS:
        return
    try:
        recorder.event(name, args)
    except Exception:  # a raising audit hook would fail the library open() it watches (NNCF, torch)
        pass


class _watch_writes:
    """Context manager: record Python-level file-system changes made inside it, outside ``work_dir``.

    One watch at a time per process (the audit hook sees every thread, so two watches would each see the
    other's writes). ``busy="raise"`` refuses a second one (check_pass); ``busy="skip"`` yields None instead
    (the runner, when a run is started inside a watched pass or in a thread beside another run).
    """

    def __init__(self, work_dir: Path, *, busy: str = "raise") -> None:
        self.work_dir = work_dir
        self.busy = busy
        self.recorder: _WriteRecorder | None = None

    def __enter__(self) -> _WriteRecorder | None:
        global _active, _hook_installed
        with _hook_lock:
            if not _hook_installed:
                # Audit hooks cannot be removed; this one returns at once while nothing is watched.
                sys.addaudithook(_audit)
                _hook_installed = True
            if _active is not None:
                if self.busy == "skip":
                    return None
                raise RuntimeError("check_pass is already running in this process; run checks one at a time")
            self.recorder = _WriteRecorder(self.work_dir)
            _active = self.recorder
        return self.recorder

    def __exit__(self, *exc: object) -> None:
        global _active
        with _hook_lock:
            if self.recorder is not None and _active is self.recorder:
                _active = None


@contextmanager
def unwatched() -> Iterator[None]:
    """Stop recording inside this block: for code that runs on behalf of the recipe while a pass runs (loading
    a data split runs the recipe's data code, which may download or cache files; that is not the pass's doing).
    """
    global _active
    with _hook_lock:
        recorder, _active = _active, None
    try:
        yield
    finally:
        with _hook_lock:
            if _active is None:
                _active = recorder


def _default_allowed() -> list[str]:
    """Folders libraries write to on their own, whoever calls them: the user's cache folder (torch, NNCF and
    this package's latency tables and engines keep their caches there), ``$OPTIMIZER_CACHE_DIR`` (where this
    package's caches go when it is set) and OpenVINO's telemetry folder (~/intel)."""
    home = os.path.expanduser("~")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache")
    folders = [os.path.abspath(cache), os.path.join(home, "intel")]
    if os.environ.get("OPTIMIZER_CACHE_DIR"):
        folders.append(os.path.abspath(os.path.expanduser(os.environ["OPTIMIZER_CACHE_DIR"])))
    return folders


def _ignored(path: str, allowed: list[str]) -> bool:
    """Paths whose changes are not the pass's doing: bytecode caches, device files, allowed folders."""
    if "__pycache__" in Path(path).parts or path.endswith((".pyc", ".pyo")):
        return True
    if path.startswith(("/dev/", "/proc/", "/sys/")):
        return True
    return any(_inside(path, folder) for folder in allowed)


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _tree(folder: Path, skip: Path | None = None) -> dict[str, tuple[str, int, int]]:
    """Every entry under ``folder`` (but not under ``skip``): kind, size and modification time."""
    out: dict[str, tuple[str, int, int]] = {}
    for root, dirs, files in os.walk(folder):
        root_path = Path(root)
        if skip is not None:
            dirs[:] = [d for d in dirs if root_path / d != skip]
        for name in dirs + files:
            path = root_path / name
            try:
                stat = path.lstat()
            except OSError:
                continue
            kind = "link" if path.is_symlink() else "dir" if name in dirs else "file"
            out[str(path)] = (kind, 0 if kind == "dir" else stat.st_size, 0 if kind == "dir" else stat.st_mtime_ns)
    return out


def _top_level(folder: Path) -> dict[str, tuple[str, int, int]]:
    out: dict[str, tuple[str, int, int]] = {}
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return out
    for entry in entries:
        try:
            stat = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        is_dir = entry.is_dir(follow_symlinks=False)
        out[entry.path] = ("dir" if is_dir else "file", 0 if is_dir else stat.st_size, 0 if is_dir else stat.st_mtime_ns)
    return out


def _tree_changes(before: dict[str, tuple], after: dict[str, tuple]) -> dict[str, str]:
    changes = {p: "left behind" for p in set(after) - set(before)}
    changes.update({p: "removed" for p in set(before) - set(after)})
    changes.update({p: "changed" for p in set(before) & set(after) if before[p] != after[p]})
    return changes


def _collapse(changes: dict[str, str]) -> list[str]:
    """'path (what happened)' lines, leaving out entries inside a folder that is reported itself."""
    ordered = sorted(changes)
    kept = [p for p in ordered if not any(q != p and _inside(p, q) and changes[q] != "changed" for q in ordered)]
    return [f"{p} ({changes[p]})" for p in kept]


def _file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (artifact.json included), keyed by relative path."""
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _listing(items: list[str], limit: int = 5) -> str:
    shown = "; ".join(items[:limit])
    return shown + (f"; and {len(items) - limit} more" if len(items) > limit else "")



def _write_changes(recorder: _WriteRecorder, work_dir: Path) -> dict[str, str]:
    """What the audit events show was left, changed or removed outside ``work_dir``."""
    work = str(work_dir)
    found: dict[str, str] = {}
    for path, existed in recorder.existed.items():
        if _inside(path, work):
            continue
        exists = os.path.lexists(path)
        if existed:
            if path in recorder.removed:
                found[path] = "replaced" if exists else "removed"
            else:
                found[path] = "written to"
        elif exists:
            found[path] = "left behind"
    return found


def outside_writes(recorder: _WriteRecorder, work_dir: Path, allowed: list[str],
                   protected: list[str] = ()) -> list[str]:
    """'path (what happened)' for what a watched pass left, changed or removed outside ``work_dir``, leaving out
    the ``allowed`` folders, except where they hold a ``protected`` one (a run's output folder in the system
    temp folder is still the run's)."""
    def excused(path: str) -> bool:
        if any(_inside(path, folder) for folder in protected):
            return False
        return _ignored(path, allowed)

    return _collapse({p: why for p, why in _write_changes(recorder, work_dir).items() if not excused(p)})


def metadata_hash(artifact: "Artifact") -> str | None:
    """The sha256 of an artifact's artifact.json (None when it has none), taken before a pass runs."""
    path = artifact.path / METADATA_FILE
    return sha256_file(path) if path.is_file() else None


def input_changes(artifact: "Artifact", metadata_sha: str | None) -> list[str]:
    """What differs between an artifact's folder and the files its artifact.json lists: 'name (changed|removed|
    added)'. One pass of hashing, after the pass ran: the listed hashes are the before."""
    folder = artifact.path
    found: list[str] = []
    present = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file() or p.is_symlink()}
    for name, expected in sorted(artifact.files.items()):
        path = present.get(name)
        if path is None:
            found.append(f"{name} (removed)")
        elif path.is_symlink() or sha256_file(path) != expected:
            found.append(f"{name} (changed)")
    meta = present.get(METADATA_FILE)
    if metadata_sha is not None and (meta is None or sha256_file(meta) != metadata_sha):
        found.append(f"{METADATA_FILE} ({'removed' if meta is None else 'changed'})")
    found += [f"{name} (added)" for name in present if name not in artifact.files and name != METADATA_FILE]
    return found
