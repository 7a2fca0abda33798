"""Runs the measurement worker for one artifact in a fresh process and collects its result (two processes for
a torch stage timed on the deployment runtime: one scores it, one times its throwaway export)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optimizer.artifact import Artifact
from optimizer.errors import (
    InputRejected,
    MissingDependency,
    StageError,
    error_from_exit_code,
    first_line,
    is_disk_full,
)

if TYPE_CHECKING:
    from optimizer.progress import Progress

# What a stage's timing process contributes when its accuracy is measured by another one.
TIMING_KEYS = ("latency", "throughput", "load_s", "first_inference_ms", "runtime", "latency_sweep", "profile")


def worker_environment(threads: int, extra_paths: list[Path]) -> dict[str, str]:
    env = dict(os.environ)
    # The same thread settings for every stage; OpenMP and MKL pools obey these too.
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    # The worker must import what this process can (a user's model module, say): pass our sys.path on.
    import optimizer

    # The folder this package was imported from goes first: a library may have put a folder holding a module of
    # the same name on sys.path (onnxruntime.transformers appends one with an optimizer.py).
    home = str(Path(optimizer.__file__).resolve().parent.parent)
    paths = [home] + [str(p) for p in extra_paths] + [p for p in sys.path if p and os.path.isdir(p)]
    paths += [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def evaluate_artifact(
    artifact: Artifact,
    *,
    stage: str,
    eval_npz: Path,
    measurements_dir: Path,
    threads: int,
    latency: dict[str, Any],
    accuracy_batch_size: int,
    seed: int,
    import_paths: list[Path],
    progress: "Progress",
    runtime_options: dict[str, Any] | None = None,
    profile: bool = False,
    metric: dict[str, Any] | None = None,
    timing_artifact: Artifact | None = None,
    timing_fallback: str | None = None,
    shape_sweep: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Measure one stage in fresh processes; the result's ``latency`` says which runtime timed it.

    ``timing_artifact``: a throwaway export of a torch ``artifact`` on the deployment runtime. Accuracy is then
    measured on ``artifact`` and everything timed (latency, throughput, sweep, profile) on the export, each in
    a process of its own; should timing the export fail, the stage is timed on its own runtime and the reason
    recorded. ``timing_fallback``: why no throwaway could be made for a stage that wanted one (recorded).
    """
    measurements_dir.mkdir(parents=True, exist_ok=True)
    baseline_dir = measurements_dir.parent / "baseline"
    is_baseline = stage == "baseline"
    request = {
        "artifact": str(artifact.path),
        "eval_npz": str(eval_npz),
        "threads": threads,
        "latency": latency,
        "accuracy_batch_size": accuracy_batch_size,
        "seed": seed,
        "runtime_options": runtime_options or {},
        "result_json": str(measurements_dir / "result.json"),
        "predictions_npy": str(measurements_dir / "predictions.npy"),
        "raw_times_npy": str(measurements_dir / "latency_ms.npy"),
        "correct_npy": str(measurements_dir / "correct.npy"),
        "scores_npy": str(measurements_dir / "scores.npy"),
        "outputs_npy": str(measurements_dir / "outputs.npy"),
        "metric": metric or {"metric": "top1"},
        "is_baseline": is_baseline,
        # Written by the baseline's own measurement; every later stage is paired against it (and, for the
        # agreement metric, scored against its predictions or outputs).
        "baseline_correct_npy": None if is_baseline else str(baseline_dir / "correct.npy"),
        "baseline_scores_npy": None if is_baseline else str(baseline_dir / "scores.npy"),
        "baseline_predictions_npy": None if is_baseline else str(baseline_dir / "predictions.npy"),
        "baseline_outputs_npy": None if is_baseline else str(baseline_dir / "outputs.npy"),
        "profile": profile,
        # evaluate.latency.shapes: one .npz per size (measure/shape_sweep.write_points).
        "shape_sweep": shape_sweep or [],
    }
    worker = {"stage": stage, "threads": threads, "import_paths": import_paths, "progress": progress}
    timed_via = "artifact"
    if timing_artifact is None:
        result = _run_worker(request, measurements_dir / "request.json", **worker)
    else:
        result = _run_worker({**request, "parts": "accuracy"}, measurements_dir / "request.json", **worker)
        timing_request = {**request, "parts": "timing", "artifact": str(timing_artifact.path),
                          "result_json": str(measurements_dir / "timing-result.json")}
        try:
            timing = _run_worker(timing_request, measurements_dir / "timing-request.json", **worker)
            timed_via = "export"
        except (StageError, InputRejected, MissingDependency) as exc:
            if is_disk_full(exc):
                raise
            # The stage itself is fine and its accuracy measured: time it where it runs, and say why.
            timing_fallback = f"timing the throwaway export failed ({first_line(exc, 200)})"
            timing = _run_worker({**request, "parts": "timing"}, measurements_dir / "timing-request.json", **worker)
        result["accuracy_runtime"] = result["runtime"]
        scored = result.get("shape_sweep")
        result.update({key: timing.get(key) for key in TIMING_KEYS})
        if scored or timing.get("shape_sweep"):
            from optimizer.measure.shape_sweep import merge_points

            result["shape_sweep"] = merge_points(scored, timing.get("shape_sweep"))
    result["latency"]["timed_via"] = timed_via
    if timing_fallback:
        result["latency"]["deploy_fallback"] = timing_fallback
    result["raw_times_file"] = str(Path(request["raw_times_npy"]))
    return result


def _run_worker(request: dict[str, Any], request_path: Path, *, stage: str, threads: int, import_paths: list[Path],
                progress: "Progress") -> dict[str, Any]:
    """One measurement process on ``request``; its result, or the error it reported."""
    request_path.write_text(json.dumps(request, indent=2))
    result_path = Path(request["result_json"])
    result_path.unlink(missing_ok=True)

    output_tail: list[str] = []
    process = subprocess.Popen(
        [sys.executable, "-m", "optimizer.measure.worker", str(request_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=worker_environment(threads, import_paths),
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("@@progress "):
                _, phase, fraction = line.split()
                progress.update(f"measure: {phase}", float(fraction))
            else:
                output_tail = (output_tail + [line.rstrip()])[-20:]
        process.wait()
    except BaseException:
        process.kill()
        process.wait()
        raise
    if not result_path.is_file():
        detail = next((l for l in reversed(output_tail) if l.strip()), f"exit code {process.returncode}")
        raise StageError(f"stage '{stage}': the measurement process died ({detail[:200]})")
    result = json.loads(result_path.read_text())
    if not result.get("ok"):
        raise error_from_exit_code(result.get("exit_code", 1),
                                   f"stage '{stage}': measuring the artifact failed: {result['error']}")
    result.pop("ok")
    return result
