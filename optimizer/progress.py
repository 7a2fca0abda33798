"""Progress display: one line per stage with elapsed time, and a bar for long loops."""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


class Progress:
    """Thin wrapper over rich: quiet mode prints nothing; without a terminal it prints plain lines."""

    def __init__(self, *, quiet: bool = False):
        self.quiet = quiet
        self._rich = None
        self._task = None
        self._stage_start = 0.0
        if not quiet:
            from rich.console import Console

            self.console = Console(stderr=True)
            if not self.console.is_terminal:
                self.console = Console(stderr=True, width=160)
        else:
            self.console = None

    # -- stages ------------------------------------------------------------------------------------
    def start_stage(self, index: int, total: int, name: str, what: str) -> None:
        self._stage_start = time.perf_counter()
        if self.quiet:
            return
        self.console.print(f"[bold][{index}/{total}][/bold] {name}: {what}")
        if self.console.is_terminal:
            from rich.progress import BarColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn

            self._rich = RichProgress(
                TextColumn("      {task.description}"), BarColumn(), TimeElapsedColumn(),
                console=self.console, transient=True,
            )
            self._rich.start()
            self._task = self._rich.add_task("starting", total=1.0)

    def update(self, description: str, fraction: float | None = None) -> None:
        if self._rich is not None and self._task is not None:
            self._rich.update(self._task, description=description, completed=fraction or 0.0)

    def end_stage(self, summary: str) -> float:
        elapsed = time.perf_counter() - self._stage_start
        if self._rich is not None:
            self._rich.stop()
            self._rich = None
            self._task = None
        if not self.quiet:
            self.console.print(f"      {summary} [dim]({elapsed:.1f} s)[/dim]")
        return elapsed

    def log(self, message: str) -> None:
        if not self.quiet:
            self.console.print(f"      {message}")

    def track(self, items: Iterable[T], total: int, description: str) -> Iterator[T]:
        for done, item in enumerate(items, 1):
            yield item
            self.update(description, done / max(total, 1))

    def print(self, renderable: object) -> None:
        if not self.quiet:
            from rich.console import Console

            Console(file=sys.stdout).print(renderable)
