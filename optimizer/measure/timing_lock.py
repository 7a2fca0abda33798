"""One latency measurement at a time per machine, when several runs share it (``optimizer search`` workers).

Accuracy can be measured by many processes at once, but two timings on the same cores disturb each other. A run
started by the search gets ``OPTIMIZER_TIMING_LOCK`` (a file on the machine's local disk); its measurement
processes hold an exclusive ``flock`` on that file while they time. The kernel drops the lock with the process,
so a killed worker never blocks the others. Without the variable nothing is locked (``optimizer run``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path
from typing import Iterator

ENV_VAR = "OPTIMIZER_TIMING_LOCK"


def machine_lock_path() -> Path:
    """The lock file for this machine: in its temporary folder, so each machine of a cluster has its own."""
    return Path(tempfile.gettempdir()) / f"optimizer-timing-{os.getuid()}.lock"


@contextlib.contextmanager
def timing_lock() -> Iterator[None]:
    path = os.environ.get(ENV_VAR)
    if not path:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock
