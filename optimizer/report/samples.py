"""Per-iteration latencies of each stage, read back from the run folder for the distribution chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def load_raw_latencies(report: dict[str, Any], run_dir: Path | None) -> dict[str, np.ndarray]:
    """Stage name → per-iteration milliseconds, for the stages whose .npy file is there and readable.

    A report can outlive its measurements (copied on its own, or measurements/ pruned), so a missing or
    unreadable file only drops that stage from the chart. Paths are resolved inside ``run_dir`` and
    loaded without pickle: report.json is data, and may come from someone else's run.
    """
    if run_dir is None:
        return {}
    root = Path(run_dir).resolve()
    out: dict[str, np.ndarray] = {}
    for stage in report.get("stages") or []:
        relative = stage.get("raw_latency_file")
        if not relative:
            continue
        path = (root / relative).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            continue
        try:
            values = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            continue
        values = np.asarray(values, dtype=np.float64).ravel()
        values = values[np.isfinite(values)]
        if values.size:
            out[stage["name"]] = values
    return out
