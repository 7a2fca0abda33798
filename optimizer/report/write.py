"""Writing report files and the deployable final/ folder, each file atomically and synced to disk."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from optimizer.artifact import METADATA_FILE, Artifact, sha256_file
from optimizer.atomic import fsync_tree, write_text_atomic
from optimizer.measure.environment import package_versions
from optimizer.recipe import LoadedRecipe
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


def write_final(report: Report, artifact: Artifact, folder: Path, loaded: LoadedRecipe) -> None:
    """Copy the last stage's artifact into final/ with a manifest that lets a deployer check it."""
    shutil.copytree(artifact.path, folder)
    files = {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}
    last = report.stages[-1]
    manifest: dict[str, Any] = {
        "manifest_version": 1,
        "form": artifact.form,
        "entry": artifact.entry,
        "inputs": [spec.model_dump() for spec in artifact.inputs],
        "files": {name: digest for name, digest in files.items() if name != METADATA_FILE},
        "artifact_sha256": artifact.sha256,
        "stage": last["name"],
        "accuracy": last.get("accuracy"),
        "latency": {k: last["latency"][k] for k in ("batch_size", "p50_ms", "p90_ms", "p99_ms")} if "latency" in last else None,
        "runtime": last.get("runtime"),
        "library_versions": package_versions(),
        "environment": report.data["environment"],
        "recipe": report.data["recipe"],
        "lineage": [s.get("sha256") for s in report.stages],
    }
    write_atomic(folder / "manifest.json", json.dumps(manifest, indent=2, default=str) + "\n")
    fsync_tree(folder)  # the copied model files too: final/ is published by renaming this folder
