"""The report: one JSON document (the source of truth) built from the stage records."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from optimizer.artifact import Artifact
from optimizer.recipe import LoadedRecipe

SCHEMA_VERSION = 1


@dataclass
class Report:
    """What ``run_recipe`` returns: the report document plus where it was written."""

    data: dict[str, Any]
    path: Path | None = field(default=None)

    @property
    def passed(self) -> bool:
        return bool(self.data["passed"])

    @property
    def stages(self) -> list[dict[str, Any]]:
        return self.data["stages"]

    def stage(self, name: str) -> dict[str, Any]:
        for record in self.stages:
            if record["name"] == name:
                return record
        raise KeyError(f"no stage named '{name}' in the report; stages: {[s['name'] for s in self.stages]}")


def stage_record(
    name: str,
    pass_name: str | None,
    artifact: Artifact | None,
    metrics: dict[str, Any] | None,
    *,
    status: str,
    seconds: float,
    out_dir: Path,
    error: str | None = None,
    details: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    record: dict[str, Any] = {"name": name, "pass": pass_name, "config": config, "status": status,
                              "seconds": round(seconds, 3)}
    if artifact is not None:
        record.update({
            "form": artifact.form,
            "artifact": artifact.path.relative_to(out_dir).as_posix(),
            "sha256": artifact.sha256,
            "size_bytes": artifact.size_bytes,
            "params": artifact.facts.get("params"),
            "macs": artifact.facts.get("macs"),
            "precision": artifact.facts.get("precision"),
        })
    if metrics is not None:
        latency = dict(metrics["latency"])
        record.update({
            "accuracy": metrics["accuracy"],
            "latency": latency,
            # The interval and trial keys are absent from measurements made before they existed.
            "throughput": {k: v for k, v in metrics["throughput"].items()
                           if k in ("batch_size", "samples_per_s", "iterations", "wall_s", "trials",
                                    "trial_samples_per_s", "samples_per_s_ci95", "unstable")},
            "load_s": metrics["load_s"],
            "first_inference_ms": metrics["first_inference_ms"],
            "runtime": metrics["runtime"],
            "non_finite_outputs": metrics["non_finite_outputs"],
            "raw_latency_file": Path(metrics["raw_times_file"]).relative_to(out_dir).as_posix(),
        })
        if metrics.get("accuracy_test"):
            record["accuracy_test"] = metrics["accuracy_test"]
        if metrics.get("latency_sweep"):
            record["latency_sweep"] = metrics["latency_sweep"]
        if metrics.get("shape_sweep"):
            record["shape_sweep"] = metrics["shape_sweep"]
        if metrics.get("profile"):
            record["profile"] = metrics["profile"]
        if metrics.get("accuracy_runtime"):
            # A torch stage timed through a throwaway export: ``runtime`` is the timing runtime's settings.
            record["accuracy_runtime"] = metrics["accuracy_runtime"]
    if details:
        record["details"] = details
    if error is not None:
        record["error"] = error
    return record


def _change(current: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any] | None:
    if "accuracy" not in current or "accuracy" not in reference:
        return None
    lat, ref_lat = current["latency"], reference["latency"]
    # Significant only when the median intervals do not overlap and neither figure is marked unstable.
    low, high = lat["p50_ci95_ms"]
    ref_low, ref_high = ref_lat["p50_ci95_ms"]
    separate = high < ref_low or low > ref_high
    return {
        "accuracy_delta": current["accuracy"]["value"] - reference["accuracy"]["value"],
        "p50_ratio": lat["p50_ms"] / ref_lat["p50_ms"] if ref_lat["p50_ms"] else None,
        "speedup": ref_lat["p50_ms"] / lat["p50_ms"] if lat["p50_ms"] else None,
        "latency_significant": bool(separate and not lat["unstable"] and not ref_lat["unstable"]),
        "throughput_ratio": current["throughput"]["samples_per_s"] / reference["throughput"]["samples_per_s"],
        "size_ratio": current["size_bytes"] / reference["size_bytes"] if reference.get("size_bytes") else None,
    }


def build_report(loaded: LoadedRecipe, environment: dict[str, Any], records: list[dict[str, Any]],
                 *, started: float) -> Report:
    from optimizer import __version__

    baseline = records[0]
    previous = baseline
    for record in records[1:]:
        if record["status"] == "ok":
            record["vs_baseline"] = _change(record, baseline)
            if record["vs_baseline"] is not None and record.get("accuracy_test"):
                # McNemar on the same eval samples: is the accuracy change more than chance?
                record["vs_baseline"]["accuracy_test"] = record["accuracy_test"]
            record["vs_previous"] = _change(record, previous)
            previous = record
    passed = all(r["status"] == "ok" for r in records) and len(records) == len(loaded.recipe.stages) + 1
    data = {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "optimizer", "version": __version__},
        "recipe": loaded.recipe.model_dump(mode="json", by_alias=True),
        "recipe_file": str(loaded.source) if loaded.source else None,
        "environment": environment,
        "started": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(time.time() - started, 1),
        "passed": passed,
        "stages": records,
        "final": "final" if passed else None,
    }
    return Report(data)
