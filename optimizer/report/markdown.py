"""report.md: the stage table with changes against the baseline and the previous stage."""

from __future__ import annotations

from typing import Any

from optimizer.measure.environment import describe
from optimizer.report.rows import COLUMNS, notes, stage_rows


def render_markdown(report: dict[str, Any]) -> str:
    recipe = report["recipe"]
    lines = [
        f"# {recipe['name']}: optimization report",
        "",
        f"**{'PASSED' if report['passed'] else 'FAILED'}** · {report['finished']} · {report['duration_s']} s",
        "",
        f"Environment: {describe(report['environment'])}",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in stage_rows(report)]
    lines.append("")
    for note in notes(report):
        lines.append(f"- {note}")
    if report.get("final"):
        lines += ["", "Deployable artifact: `final/` (see `final/manifest.json`)."]
    return "\n".join(lines) + "\n"
