"""Writing report files, each atomically and synced to disk (final/ is optimizer/publish.py's)."""

from __future__ import annotations

import json
from pathlib import Path

from optimizer.atomic import write_text_atomic
from optimizer.report.build import Report
from optimizer.report.html import render_html
from optimizer.report.markdown import render_markdown


def write_atomic(path: Path, text: str) -> None:
    """Temp file in the same folder, flushed to disk, renamed into place: readers never see half a file."""
    write_text_atomic(path, text)


def write_reports(report: Report, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / "report.json", json.dumps(report.data, indent=2, default=str) + "\n")
    write_atomic(folder / "report.md", render_markdown(report.data))
    # ``folder`` is where report.json's relative paths start: the raw latencies for the distribution chart.
    write_atomic(folder / "report.html", render_html(report.data, run_dir=folder))
