"""Re-render report.md and report.html of a finished run from its report.json.

report.json is the source of truth, so the readable files can be rebuilt at any time: after the
renderers improve, or for an older report, without measuring anything again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from optimizer.errors import InputRejected, RecipeError
from optimizer.report.html import render_html
from optimizer.report.markdown import render_markdown

SUPPORTED_SCHEMA = 1


def load_report(run_dir: Path) -> dict[str, Any]:
    """report.json of a run folder, checked just enough to render: a usage error when the folder holds no
    report, an input error when the file is not a report this version can read."""
    path = Path(run_dir) / "report.json"
    if not path.is_file():
        raise RecipeError(f"{run_dir}: no report.json here; give the output folder of a run (its --out)")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputRejected(f"{path}: not readable as JSON ({exc})") from exc
    if not isinstance(report, dict) or not isinstance(report.get("stages"), list):
        raise InputRejected(f"{path}: not an optimizer report (no 'stages' list)")
    version = report.get("schema_version")
    if version != SUPPORTED_SCHEMA:
        raise InputRejected(f"{path}: schema_version {version!r}; this version reads schema_version {SUPPORTED_SCHEMA}")
    return report


def render_files(report: dict[str, Any], run_dir: Path | None) -> dict[str, str]:
    """File name → text of every readable rendering of one report."""
    return {"report.md": render_markdown(report), "report.html": render_html(report, run_dir=run_dir)}


def rerender(run_dir: Path | str) -> list[Path]:
    """Rewrite report.md and report.html in ``run_dir`` from its report.json; returns the paths written.
    Each file is replaced atomically, so a reader never sees half a page."""
    # Imported here: write.py may itself use render_files, and a module-level import would be circular.
    from optimizer.report.write import write_atomic

    folder = Path(run_dir)
    report = load_report(folder)
    written = []
    for name, content in render_files(report, folder).items():
        write_atomic(folder / name, content)
        written.append(folder / name)
    return written
