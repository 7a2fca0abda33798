"""Measures one artifact in a process of its own: accuracy, latency, throughput.

Thread pools of torch, onnxruntime and OpenVINO compete when several runtimes live in one process and
inflate latency 3-10x, so the runner starts this module once per stage:

    python -m optimizer.measure.worker REQUEST.json

The request names the artifact, the eval arrays (.npz) and the timing plan; the result is written as
JSON next to it. Progress goes to stdout as ``@@progress <phase> <fraction>`` lines.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def _progress(phase: str, fraction: float) -> None:
    print(f"@@progress {phase} {fraction:.3f}", flush=True)


def _fixed_batch(inputs: dict[str, np.ndarray], batch_size: int, seed: int) -> dict[str, np.ndarray]:
    """Real eval samples chosen by seed, tiled if the set is smaller; contiguous and in memory."""
    n = len(next(iter(inputs.values())))
    index = np.random.default_rng(seed).choice(n, size=batch_size, replace=batch_size > n)
    return {name: np.ascontiguousarray(array[index]) for name, array in inputs.items()}


def measure(request: dict) -> dict:
    from optimizer.artifact import Artifact
    from optimizer.measure.accuracy import top1
    from optimizer.measure.accuracy import mcnemar
    from optimizer.measure.latency import TimingPlan, measure_throughput, sweep_plan, time_iterations, time_trials
    from optimizer.runtimes.base import open_runtime

    artifact = Artifact.load(request["artifact"])
    with np.load(request["eval_npz"], allow_pickle=False) as archive:
        labels = archive["__labels__"]
        inputs = {spec.name: archive[spec.name] for spec in artifact.inputs}

    start = time.perf_counter()
    runtime = open_runtime(artifact, threads=request["threads"], options=request.get("runtime_options"))
    load_s = time.perf_counter() - start

    fixed = runtime.fixed_batch
    latency_batch = fixed or request["latency"]["batch_size"]
    first_batch = _fixed_batch(inputs, latency_batch, request["seed"])
    start = time.perf_counter()
    runtime.run(first_batch)
    first_inference_ms = (time.perf_counter() - start) * 1e3

    # Accuracy over the whole eval set, in batches (the model's own batch size if it has a fixed one;
    # a last partial batch is padded with repeated samples and the padding's predictions dropped).
    batch_size = fixed or request["accuracy_batch_size"]
    predictions = np.empty(len(labels), dtype=np.int64)
    non_finite = 0
    for start_index in range(0, len(labels), batch_size):
        batch = {name: array[start_index : start_index + batch_size] for name, array in inputs.items()}
        count = len(next(iter(batch.values())))
        if fixed and count < fixed:
            batch = {name: np.concatenate([a, np.repeat(a[-1:], fixed - count, axis=0)]) for name, a in batch.items()}
        logits = runtime.run(batch)[:count]
        non_finite += int((~np.isfinite(logits)).sum())
        predictions[start_index : start_index + count] = logits.reshape(count, -1).argmax(-1)
        _progress("accuracy", min(1.0, (start_index + batch_size) / len(labels)))
    accuracy = top1(predictions, labels)
    np.save(request["predictions_npy"], predictions)
    correct = predictions == labels
    np.save(request["correct_npy"], correct)
    accuracy_test = None
    baseline_correct = request.get("baseline_correct_npy")
    if baseline_correct and Path(baseline_correct).is_file():
        # Paired test on the same samples: is the change from the baseline more than chance?
        accuracy_test = mcnemar(np.load(baseline_correct, allow_pickle=False), correct)

    spec = request["latency"]
    plan = TimingPlan.from_spec(spec)
    latency, raw_ms = time_trials(lambda: runtime.run(first_batch), plan, int(spec.get("trials", 1)),
                                  lambda f: _progress("latency", f))
    latency["batch_size"] = latency_batch
    np.save(request["raw_times_npy"], raw_ms)
    _progress("latency", 1.0)

    throughput_size = fixed or request["latency"]["throughput_batch_size"]
    throughput_batch = _fixed_batch(inputs, throughput_size, request["seed"] + 1)
    throughput = measure_throughput(runtime.offline_runner(throughput_batch), throughput_size, plan,
                                    int(spec.get("trials", 1)))
    _progress("throughput", 1.0)

    sweep = []
    for size in spec.get("batch_sizes") or []:
        if fixed and size != fixed:
            sweep.append({"batch_size": size, "skipped": f"the model's batch is fixed at {fixed}"})
            continue
        batch = _fixed_batch(inputs, size, request["seed"] + 2)
        summary, _ = time_iterations(lambda b=batch: runtime.run(b), sweep_plan(plan))
        sweep.append({
            "batch_size": size,
            "p50_ms": summary["p50_ms"],
            "p50_ci95_ms": summary["p50_ci95_ms"],
            "samples_per_s": summary["iterations"] * size / max(summary["duration_s"], 1e-9),
            "unstable": summary["unstable"],
        })
        _progress("sweep", len(sweep) / len(spec["batch_sizes"]))

    profile = None
    if request.get("profile"):
        _progress("profile", 0.0)
        profile = runtime.profile(first_batch, iterations=50 if plan.mode == "quick" else 200)
        _progress("profile", 1.0)

    result = {
        "accuracy": accuracy,
        "non_finite_outputs": non_finite,
        "latency": latency,
        "throughput": throughput,
        "load_s": load_s,
        "first_inference_ms": first_inference_ms,
        "runtime": runtime.settings(),
        "accuracy_test": accuracy_test,
        "latency_sweep": sweep,
        "profile": profile,
    }
    runtime.close()
    return result


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    request_path = Path(args[0])
    request = json.loads(request_path.read_text())
    try:
        result = {"ok": True, **measure(request)}
    except Exception as exc:  # reported to the parent process, which names the stage
        from optimizer.errors import OptimizerError

        code = exc.exit_code if isinstance(exc, OptimizerError) else 1
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "exit_code": code}
    out = Path(request["result_json"])
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
