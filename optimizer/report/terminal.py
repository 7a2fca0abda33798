"""The stage table for the terminal."""

from __future__ import annotations

from typing import Any

from optimizer.report.rows import COLUMNS, columns, notes, stage_rows

# The terminal is narrow: leave out the columns the Markdown report still has.
_SHOWN = ["stage", "form", "precision", "size MB", "MMACs", "top-1 % (95% CI)", "Δ top-1 vs base", "p50 ms (95% CI)",
          "p99 ms (95% CI)", "speedup vs base", "samples/s (95% CI)", "status"]


def stage_table(report: dict[str, Any]):
    """The rich table and the notes. Both are escaped: stage names and error messages come from recipes
    and exceptions, and rich would otherwise read "[...]" in them as markup."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(f"{report['recipe']['name']}: {'PASSED' if report['passed'] else 'FAILED'}"))
    index = [COLUMNS.index(c) for c in _SHOWN]
    titles = columns(report)  # the accuracy columns named after the report's metric
    for i, column in zip(index, _SHOWN):
        table.add_column(escape(titles[i]), justify="left" if column in ("stage", "form", "precision", "status")
                         else "right")
    for row in stage_rows(report):
        style = None if row[-1] == "ok" else "red"
        table.add_row(*(escape(row[i]) for i in index), style=style)
    return table, [escape(note) for note in notes(report)]
