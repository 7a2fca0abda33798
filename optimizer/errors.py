"""Errors a user can cause, each with the exit code the command line returns for it.

Every message names the file, field or stage at fault and says what to do; the CLI prints it on one
line and shows a traceback only with ``--debug``.
"""

from __future__ import annotations

import errno

EXIT_OK = 0
EXIT_STAGE_ERROR = 1
EXIT_USAGE = 2
EXIT_INPUT_REJECTED = 3
EXIT_GATE_FAILED = 4
EXIT_RESOURCE = 5
EXIT_LOCKED = 6
EXIT_CONTRACT = 7
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = """exit codes:
  0    ok
  1    a stage failed inside a library (the message names the stage)
  2    usage or recipe error (nothing was run)
  3    input rejected: unsafe, corrupt or incompatible checkpoint, model or data
  4    a gate failed: accuracy budget, export fidelity, NaN outputs, nothing within budget to publish
       (report still written)
  5    resource failure: disk full, out of memory
  6    output folder locked by another run
  7    a pass broke the pass contract: wrote outside ctx.work_dir, changed its input, or returned no
       entry file (test it with optimizer.testing.check_pass)
  130  interrupted"""


class OptimizerError(Exception):
    """Base class: a failure with a one-line, actionable message."""

    exit_code: int = EXIT_STAGE_ERROR


class RecipeError(OptimizerError):
    """The recipe or the command line is wrong; found before any work starts."""

    exit_code = EXIT_USAGE


class InputRejected(OptimizerError):
    """A checkpoint, model file or data set is unsafe, corrupt or does not fit."""

    exit_code = EXIT_INPUT_REJECTED


class GateFailed(OptimizerError):
    """A stage produced an artifact that breaks a budget or a fidelity check."""

    exit_code = EXIT_GATE_FAILED


class StageError(OptimizerError):
    """A pass failed while running; the message names the stage."""

    exit_code = EXIT_STAGE_ERROR


class ResourceFailure(OptimizerError):
    """Disk full, out of memory, or a similar failure of the machine."""

    exit_code = EXIT_RESOURCE


class DiskFull(ResourceFailure):
    """The disk (or the quota) filled up: the machine's fault, not the recipe's; --resume continues once freed."""


class OutputLocked(OptimizerError):
    """Another run holds the output folder."""

    exit_code = EXIT_LOCKED


class ContractViolation(OptimizerError):
    """A pass broke the rules every pass keeps (docs/writing_a_pass.md): it wrote outside ``ctx.work_dir``,
    changed its input artifact, or returned an artifact without its entry file. ``tainted``: the run's own
    folders were touched, so nothing of the run is published."""

    exit_code = EXIT_CONTRACT

    def __init__(self, message: str, *, tainted: bool = False):
        super().__init__(message)
        self.tainted = tainted


class Interrupted(OptimizerError):
    """Ctrl-C or SIGINT; the message names the stage that was running."""

    exit_code = EXIT_INTERRUPTED


class MissingDependency(OptimizerError):
    """An optional package a stage needs is not installed."""

    exit_code = EXIT_USAGE


def error_from_exit_code(code: int, message: str) -> OptimizerError:
    """Rebuild an error reported by a child process (which can only pass its message and exit code)."""
    for cls in (RecipeError, InputRejected, GateFailed, ResourceFailure, OutputLocked, ContractViolation):
        if cls.exit_code == code:
            return cls(message)
    return StageError(message)


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def is_disk_full(exc: BaseException) -> bool:
    """True for the OSErrors a full disk or an exhausted quota raise (also when only the message says so,
    as from a child process that could pass on nothing but text)."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        return True
    return "[Errno 28]" in str(exc) or "No space left on device" in str(exc)


def disk_full(exc: BaseException, what: str) -> DiskFull:
    """The one-line error for a full disk while doing ``what`` (which names the stage or the file)."""
    where = getattr(exc, "filename", None)
    place = f" ({where})" if where else ""
    return DiskFull(f"{what}: disk full{place}; free some space and re-run with --resume "
                           "(finished stages are cached; earlier outputs are unchanged)")


def one_line(message: str) -> str:
    """Messages printed by the CLI are a single line, even when a library's text had several; control
    characters a user typed (or a file name holds) are shown escaped, never sent to the terminal."""
    text = " ".join(part.strip() for part in message.replace("\r", "\n").split("\n") if part.strip())
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message (its type name when the message is empty)."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()[:limit]
    return type(exc).__name__
