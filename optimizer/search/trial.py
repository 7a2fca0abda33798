"""One trial: its recipe run by the Runner into its own folder, with the search's shared stage cache, and
the outcome read from the run's report.

An outcome is a plain dict (it crosses process and Ray boundaries as JSON):

- ``status``: ``ok`` (every stage passed; the figures are the last stage's), ``stopped`` (a gate stopped the
  chain, e.g. an intermediate stage already over the accuracy budget; the figures are that stage's), ``failed``
  (no figures; ``error`` is the one-line reason);
- ``stage``, ``accuracy`` / ``accuracy_ci95`` / ``baseline_accuracy``, ``p50_ms`` / ``p50_ci95_ms``,
  ``p90_ms`` / ``p90_ci95_ms``, ``latency_mode``;
- ``seconds`` (wall time), ``stages_run`` and ``stages_cached``, ``report`` (the run's report.json).

Run as ``python -m optimizer.search.trial REQUEST.json OUTCOME.json`` by the local executor, or called in a
Ray task.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from optimizer.errors import DiskFull, GateFailed, Interrupted, OptimizerError, first_line, is_disk_full, one_line

#: A trial's status when the disk filled up under it: not the trial's fault, so the search stops (exit 5, as
#: `optimizer run` does) and the trial stays open in the study, to run again on --resume.
DISK_FULL = "disk_full"


def run_trial(request: dict[str, Any]) -> dict[str, Any]:
    """Run the trial described by ``request`` (number, recipe, source, out, cache, timing_lock)."""
    from optimizer.measure.timing_lock import ENV_VAR, machine_lock_path

    if request.get("timing_lock", True):
        # Resolved where the trial runs: on a cluster, each machine has its own lock.
        os.environ[ENV_VAR] = str(machine_lock_path())
    out = Path(request["out"])
    started = time.perf_counter()
    outcome: dict[str, Any] = {"number": request["number"], "phase": request.get("phase", "screening"),
                               "out": str(out)}
    report = None
    try:
        from optimizer.recipe import load_recipe
        from optimizer.runner import run_recipe

        loaded = load_recipe(request["recipe"])
        # Paths in the recipe are relative to the user's recipe file, not to the trial's folder.
        loaded.source = Path(request["source"]) if request.get("source") else None
        report = run_recipe(loaded, out=out, cache=request["cache"], resume=True, quiet=True).data
        outcome["status"] = "ok"
    except (KeyboardInterrupt, Interrupted):
        raise  # the search stops; the trial stays open in the study and runs again on --resume
    except OptimizerError as exc:
        if isinstance(exc, DiskFull):
            return _disk_full(outcome, exc, started)
        produced = getattr(exc, "report", None)
        report = produced.data if produced is not None else None
        # A gate (a budget, NaN outputs, a collapsed model) stops a chain that ran; anything else is a failure.
        stopped = isinstance(exc, GateFailed) and report is not None and _measured(report)
        outcome["status"] = "stopped" if stopped else "failed"
        outcome["error"] = one_line(str(exc))[:400]
    except Exception as exc:  # a pass or library bug: the trial fails, the search goes on
        if is_disk_full(exc):
            return _disk_full(outcome, exc, started)
        outcome["status"] = "failed"
        outcome["error"] = one_line(f"{type(exc).__name__}: {first_line(exc, 300)}")
    outcome["seconds"] = round(time.perf_counter() - started, 3)
    if report is not None:
        outcome["uncached_seconds"] = _uncached_seconds(report, Path(request["cache"]), outcome["seconds"])
        figures = _figures(report)
        if outcome["status"] == "failed":  # no figures for a chain that did not finish: only what it cost
            figures = {k: v for k, v in figures.items() if k in ("stages_run", "stages_cached", "stage_seconds")}
        outcome.update(figures)
        outcome["report"] = str(out / "report.json")
    return outcome


def _disk_full(outcome: dict[str, Any], exc: BaseException, started: float) -> dict[str, Any]:
    outcome["status"] = DISK_FULL
    outcome["error"] = one_line(str(exc) or type(exc).__name__)[:400]
    outcome["seconds"] = round(time.perf_counter() - started, 3)
    return outcome


def _uncached_seconds(report: dict[str, Any], cache: Path, wall: float) -> float | None:
    """What this trial would have taken with nothing cached: its own time, with each stage it took from the cache
    counted at what making and measuring that stage cost when it was stored. None when an entry is gone."""
    from optimizer.artifact import Artifact

    index: dict[tuple[Any, ...], float] = {}
    for path in cache.glob("*/entry.json"):
        try:
            body = json.loads(path.read_text(encoding="utf-8"))["body"]
            sha = Artifact.load(path.parent / "artifact").sha256
        except (OSError, ValueError, KeyError, TypeError, OptimizerError):
            continue
        metrics = body.get("metrics") or {}
        index[(body.get("stage"), sha, (metrics.get("accuracy") or {}).get("n"),
               (metrics.get("latency") or {}).get("mode"))] = float(body.get("seconds") or 0.0)
    spent = uncached = 0.0
    for stage in report["stages"]:
        seconds = float(stage.get("seconds") or 0.0)
        spent += seconds
        if stage.get("cached"):
            key = (stage["name"], stage.get("sha256"), (stage.get("accuracy") or {}).get("n"),
                   (stage.get("latency") or {}).get("mode"))
            if key not in index:
                return None
            seconds = index[key]
        uncached += seconds
    return round(wall - spent + uncached, 3)


def _measured(report: dict[str, Any]) -> bool:
    return any(s.get("accuracy") and s.get("latency") and s["name"] != "baseline" for s in report["stages"])


def _figures(report: dict[str, Any]) -> dict[str, Any]:
    """The figures of the chain's result: the last stage that was measured (the last stage of a passed run)."""
    stages = report["stages"]
    measured = [s for s in stages if s.get("accuracy") and s.get("latency")]
    figures: dict[str, Any] = {
        "stages_run": sum(1 for s in stages if s.get("status") == "ok" and not s.get("cached")),
        "stages_cached": sum(1 for s in stages if s.get("cached")),
        "stage_seconds": round(sum(float(s.get("seconds") or 0.0) for s in stages), 3),
    }
    if not measured:
        return figures
    last, baseline = measured[-1], stages[0]
    latency = last["latency"]
    figures.update({
        "stage": last["name"],
        "stage_status": last.get("status"),
        "metric": last["accuracy"].get("metric"),
        "accuracy": last["accuracy"]["value"],
        "accuracy_ci95": last["accuracy"].get("ci95"),
        "accuracy_n": last["accuracy"].get("n"),
        "baseline_accuracy": (baseline.get("accuracy") or {}).get("value"),
        "p50_ms": latency["p50_ms"],
        "p50_ci95_ms": latency.get("p50_ci95_ms"),
        "p90_ms": latency.get("p90_ms"),
        "p90_ci95_ms": latency.get("p90_ci95_ms"),
        "latency_mode": latency.get("mode"),
        "runtime": latency.get("runtime"),
        "form": last.get("form"),
        "size_bytes": last.get("size_bytes"),
        "artifact_sha256": last.get("sha256"),
    })
    return figures


def main(argv: list[str] | None = None) -> int:
    import signal

    # The search forwards Ctrl-C as one SIGINT; a search started in the background (SIGINT ignored) would pass
    # the ignoring on to this process, which could then never stop cleanly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    args = sys.argv[1:] if argv is None else argv
    request = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    try:
        outcome = run_trial(request)
    except (KeyboardInterrupt, Interrupted):
        return 130
    from optimizer.atomic import write_text_atomic

    write_text_atomic(Path(args[1]), json.dumps(outcome, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
