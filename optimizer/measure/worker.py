"""Measures one artifact in a process of its own: accuracy, latency, throughput.

Thread pools of torch, onnxruntime and OpenVINO compete when several runtimes live in one process and
inflate latency 3-10x, so the runner starts this module once per stage:

    python -m optimizer.measure.worker REQUEST.json

The request names the artifact, the eval arrays (.npz) and the timing plan; the result is written as
JSON next to it. Progress goes to stdout as ``@@progress <phase> <fraction>`` lines.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from dataclasses import dataclass
from collections.abc import Callable
from pathlib import Path

import numpy as np


def _progress(phase: str, fraction: float) -> None:
    print(f"@@progress {phase} {fraction:.3f}", flush=True)


@dataclass(frozen=True)
class Lengths:
    """The artifact's dynamic axes and each eval sample's own length on them (read from the eval .npz, where
    samples are stored padded to the longest): what cuts a batch of eval samples to its own longest."""

    axes: dict
    own: dict[str, np.ndarray]

    def cut(self, batch: dict[str, np.ndarray], index) -> dict[str, np.ndarray]:
        from optimizer.shapes import trim

        return trim(batch, self.axes, {name: lengths[index] for name, lengths in self.own.items()})


def _cut(batch: dict[str, np.ndarray], index, lengths: Lengths | None) -> dict[str, np.ndarray]:
    return batch if lengths is None else lengths.cut(batch, index)


def _fixed_batch(inputs: dict[str, np.ndarray], batch_size: int, seed: int,
                 lengths: Lengths | None = None) -> dict[str, np.ndarray]:
    """Real eval samples chosen by seed, tiled if the set is smaller; contiguous and in memory; cut to their
    longest on the dynamic axes when ``lengths`` says the samples are stored padded."""
    n = len(next(iter(inputs.values())))
    index = np.random.default_rng(seed).choice(n, size=batch_size, replace=batch_size > n)
    return _cut({name: np.ascontiguousarray(array[index]) for name, array in inputs.items()}, index, lengths)


# Distinct batches cycled when a batch of several eval samples is timed (each one a copy): enough to vary the
# inputs, bounded so a large eval set at a large resolution does not double the process's memory.
EVAL_POOL_BATCHES = 256


def eval_feed(inputs: dict[str, np.ndarray], batch_size: int, seed: int,
              lengths: Lengths | None = None) -> tuple[Callable[[], dict], int]:
    """Real eval samples for timing, round-robin in a seeded order: (next batch, number of distinct samples).

    At batch 1 every eval sample takes its turn, as views into the eval arrays (copies only where ``lengths``
    cuts a sample to its own length). A larger batch cycles through up to ``EVAL_POOL_BATCHES`` batches drawn from
    the same seeded order. The pool is built before timing: a timed call only takes the next entry.
    """
    n = len(next(iter(inputs.values())))
    order = np.random.default_rng(seed).permutation(n)
    # Each batch cut to its longest sample on the dynamic axes: samples of varied length are timed at their own.
    if batch_size == 1:
        pool = [_cut({name: array[i : i + 1] for name, array in inputs.items()}, slice(i, i + 1), lengths)
                for i in order]
    else:
        groups = max(1, min(EVAL_POOL_BATCHES, n // batch_size))
        take = np.resize(order, groups * batch_size).reshape(groups, batch_size)
        pool = [_cut({name: np.ascontiguousarray(array[index]) for name, array in inputs.items()}, index, lengths)
                for index in take]
    return itertools.cycle(pool).__next__, min(n, len(pool) * batch_size)


def time_latency(runtime, inputs: dict[str, np.ndarray], spec: dict, batch_size: int, seed: int,
                 on_progress: Callable[[float], None] | None = None, *, plan=None,
                 trials: int | None = None, lengths: Lengths | None = None) -> tuple[dict, np.ndarray]:
    """Single-stream latency under the recipe's plan (or ``plan``), on one fixed batch or (``inputs: eval``) on
    the eval samples in turn, so the percentiles are over the inputs users send rather than over one of them.
    ``lengths``: the eval samples are stored padded; each timed batch is cut to its own longest sample."""
    from optimizer.measure.latency import TimingPlan, time_trials

    plan = plan or TimingPlan.from_spec(spec)
    trials = trials or int(spec.get("trials", 1))
    if spec.get("inputs", "fixed") == "eval":
        feed, distinct = eval_feed(inputs, batch_size, seed, lengths)
        latency, raw_ms = time_trials(lambda: runtime.run(feed()), plan, trials, on_progress)
        latency.update({"inputs": "eval", "input_samples": distinct})
    else:
        batch = _fixed_batch(inputs, batch_size, seed, lengths)
        latency, raw_ms = time_trials(lambda: runtime.run(batch), plan, trials, on_progress)
        latency["inputs"] = "fixed"
    latency["batch_size"] = batch_size
    return latency, raw_ms


def measure(request: dict) -> dict:
    from optimizer.artifact import Artifact
    from optimizer.measure.latency import TimingPlan, measure_throughput, sweep_plan, time_iterations
    from optimizer.measure.shape_sweep import merge_points
    from optimizer.measure.timing_lock import timing_lock
    from optimizer.runtimes.base import open_runtime

    artifact = Artifact.load(request["artifact"])
    with np.load(request["eval_npz"], allow_pickle=False) as archive:
        labels = archive["__labels__"]
        inputs = {spec.name: archive[spec.name] for spec in artifact.inputs}
        from optimizer.shapes import length_axes

        axes = length_axes(artifact.inputs)
        own = {name: archive[f"__length__{name}"] for name in axes if f"__length__{name}" in archive.files}
    # Samples of varied length are stored padded to the longest: every batch below is cut to its own longest.
    lengths = Lengths(axes, own) if own else None

    start = time.perf_counter()
    runtime = open_runtime(artifact, threads=request["threads"], options=request.get("runtime_options"))
    load_s = time.perf_counter() - start

    fixed = runtime.fixed_batch
    latency_batch = fixed or request["latency"]["batch_size"]
    first_batch = _fixed_batch(inputs, latency_batch, request["seed"], lengths)
    start = time.perf_counter()
    runtime.run(first_batch)
    first_inference_ms = (time.perf_counter() - start) * 1e3

    # Accuracy over the whole eval set, in batches (the model's own batch size if it has a fixed one;
    # a last partial batch is padded with repeated samples and the padding's predictions dropped).
    # A torch stage timed on the deployment runtime is measured by two processes (evaluate.py): "accuracy" on
    # its own artifact, "timing" on its throwaway export. Anything else measures both here.
    parts = request.get("parts", "all")
    accuracy, accuracy_test, non_finite = ((None, None, 0) if parts == "timing"
                                           else _score(runtime, inputs, labels, request, fixed, lengths))
    # The input-size sweep's scoring (and BatchNorm re-estimation) needs no quiet machine: done before the lock.
    scored_sizes = [] if parts == "timing" else _shape_sweep(runtime, request, latency_batch, fixed, score=True,
                                                             timed=False)
    if parts == "accuracy":
        settings = runtime.settings()
        runtime.close()
        return {"accuracy": accuracy, "non_finite_outputs": non_finite, "accuracy_test": accuracy_test,
                "runtime": settings, "shape_sweep": scored_sizes}

    # Timing waits for the machine's timing lock when a search runs several trials at once (timing_lock.py).
    with timing_lock():
        spec = request["latency"]
        plan = TimingPlan.from_spec(spec)
        latency, raw_ms = time_latency(runtime, inputs, spec, latency_batch, request["seed"],
                                       lambda f: _progress("latency", f), lengths=lengths)
        latency["runtime"] = runtime.name  # the report says per stage where its latency was timed
        np.save(request["raw_times_npy"], raw_ms)
        _progress("latency", 1.0)

        throughput_size = fixed or request["latency"]["throughput_batch_size"]
        throughput_batch = _fixed_batch(inputs, throughput_size, request["seed"] + 1, lengths)
        throughput = measure_throughput(runtime.offline_runner(throughput_batch), throughput_size, plan,
                                        int(spec.get("trials", 1)))
        _progress("throughput", 1.0)

        sweep = []
        for size in spec.get("batch_sizes") or []:
            if fixed and size != fixed:
                sweep.append({"batch_size": size, "skipped": f"the model's batch is fixed at {fixed}"})
                continue
            batch = _fixed_batch(inputs, size, request["seed"] + 2, lengths)
            summary, _ = time_iterations(lambda b=batch: runtime.run(b), sweep_plan(plan))
            sweep.append({
                "batch_size": size,
                "p50_ms": summary["p50_ms"],
                "p50_ci95_ms": summary["p50_ci95_ms"],
                "samples_per_s": summary["iterations"] * size / max(summary["duration_s"], 1e-9),
                "unstable": summary["unstable"],
            })
            _progress("sweep", len(sweep) / len(spec["batch_sizes"]))

        timed_sizes = _shape_sweep(runtime, request, latency_batch, fixed, score=False, timed=True)

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
        "shape_sweep": merge_points(scored_sizes, timed_sizes) if request.get("shape_sweep") else [],
        "profile": profile,
    }
    runtime.close()
    return result


def _score(runtime, inputs: dict[str, np.ndarray], labels: np.ndarray, request: dict,
           fixed: int | None, lengths: Lengths | None) -> tuple[dict, dict | None, int]:
    """Run the eval set, score every sample with the recipe's metric and save what later stages pair with.

    Saved next to the result: ``predictions.npy`` (arg-max per sample, for the constant-prediction gate),
    ``scores.npy`` (the metric's per-sample scores), ``correct.npy`` (the same as booleans, when they are
    right-or-wrong) and, from the baseline under cosine agreement, ``outputs.npy`` (its flattened outputs, the
    reference every later stage is compared with)."""
    from optimizer.measure import metrics as m

    metric = m.Metric.from_settings(request.get("metric"))
    predictions, outputs, non_finite = _predict(runtime, inputs, len(labels), fixed or request["accuracy_batch_size"],
                                                fixed, metric, "accuracy", lengths=lengths)
    np.save(request["predictions_npy"], predictions)

    is_baseline = bool(request.get("is_baseline"))
    reference = None
    if metric.metric == "agreement" and not is_baseline:
        reference = _load_reference(request, metric)
    if metric.cosine and is_baseline and request.get("outputs_npy"):
        assert outputs is not None
        np.save(request["outputs_npy"], outputs)  # float32, [n, values]: what cosine agreement needs, no more
    # NaN or infinite outputs fail the stage on their own gate, with that message; scoring them must not fail first.
    scores = m.sample_scores(metric, predictions=predictions, kept=outputs, labels=labels, reference=reference,
                             tolerate_non_finite=non_finite > 0)
    accuracy = m.summarize(metric, scores, seed=int(request["seed"]))
    np.save(request["scores_npy"], scores)
    if "correct" in accuracy:
        np.save(request["correct_npy"], scores.astype(bool))

    accuracy_test = None
    baseline_scores = _load_baseline_scores(request)
    if baseline_scores is not None and len(baseline_scores) == len(scores):
        # Paired test on the same samples: is the change from the baseline more than chance?
        accuracy_test = m.paired_test(metric, baseline_scores, scores, seed=int(request["seed"]) + 1)
    return accuracy, accuracy_test, non_finite


def _predict(runtime, inputs: dict[str, np.ndarray], count_all: int, batch_size: int, fixed: int | None, metric,
             phase: str, *, lengths: Lengths | None = None) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Run every sample in batches: (arg-max per sample, what the metric keeps of the outputs, non-finite count).

    A model with a fixed batch gets its last partial batch padded with repeated samples, the padding's outputs
    dropped. ``lengths``: the inputs are the eval set as stored (padded), so each batch is cut to its longest
    sample on the dynamic axes (a sweep's inputs are already at the size being measured: none)."""
    from optimizer.measure import metrics as m

    predictions = np.empty(count_all, dtype=np.int64)
    kept: list[np.ndarray] = []
    non_finite = 0
    for start_index in range(0, count_all, batch_size):
        batch = {name: array[start_index : start_index + batch_size] for name, array in inputs.items()}
        batch = _cut(batch, slice(start_index, start_index + batch_size), lengths)
        count = len(next(iter(batch.values())))
        if fixed and count < fixed:
            batch = {name: np.concatenate([a, np.repeat(a[-1:], fixed - count, axis=0)]) for name, a in batch.items()}
        logits = runtime.run(batch)[:count]
        non_finite += int((~np.isfinite(logits)).sum())
        predictions[start_index : start_index + count] = logits.reshape(count, -1).argmax(-1)
        part = m.kept_from_batch(metric, logits)
        if part is not None:
            kept.append(part)
        _progress(phase, min(1.0, (start_index + batch_size) / count_all))
    return predictions, (np.concatenate(kept) if kept else None), non_finite


def _shape_sweep(runtime, request: dict, batch_size: int, fixed: int | None, *, score: bool,
                 timed: bool) -> list[dict]:
    """``evaluate.latency.shapes``: at each size, accuracy (``score``, where the data was loaded at that size;
    BatchNorm statistics of a torch model re-estimated there first when asked) and p50 latency (``timed``).

    A size the runtime refuses is recorded with its error and the sweep goes on: validation has already refused
    the sizes a stage's declared shapes exclude, so what is left is the runtime's own limit, a figure to report
    rather than a reason to lose the stage."""
    from optimizer.errors import first_line
    from optimizer.measure import metrics as m
    from optimizer.measure.latency import TimingPlan, sweep_plan

    points = request.get("shape_sweep") or []
    out = []
    plan = sweep_plan(TimingPlan.from_spec(request["latency"]))
    metric = m.Metric.from_settings(request.get("metric"))
    for index, point in enumerate(points):
        entry: dict = {"size": point["size"], "shape": point["shape"], "source": point["source"]}
        scoring = bool(score and point.get("accuracy") and metric.metric != "agreement")
        with np.load(point["npz"], allow_pickle=False) as archive:
            arrays = {spec.name: archive[spec.name] for spec in runtime.artifact.inputs}
            labels = archive["__labels__"] if scoring else None
            bn = {k.removeprefix("__bn__"): archive[k] for k in archive.files if k.startswith("__bn__")} \
                if scoring else {}
        try:
            if scoring:
                with _batchnorm_at(runtime, bn) as batchnorm:
                    predictions, outputs, non_finite = _predict(runtime, arrays, len(labels),
                                                                fixed or request["accuracy_batch_size"], fixed,
                                                                metric, "shapes")
            if timed:
                timing, _ = time_latency(runtime, arrays, request["latency"], batch_size, int(request["seed"]) + 3,
                                         plan=plan, trials=1)
        except Exception as exc:
            # Only the runtime runs in this block: its refusal of this size comes in its own exception types
            # (OpenVINO's and torch's RuntimeError, onnxruntime's own classes, our InputRejected).
            entry["error"] = f"{type(exc).__name__}: {first_line(exc, 200)}"
            out.append(entry)
            _progress("shapes", (index + 1) / len(points))
            continue
        if scoring:
            scores = m.sample_scores(metric, predictions=predictions, kept=outputs, labels=labels,
                                     reference=None, tolerate_non_finite=non_finite > 0)
            summary = m.summarize(metric, scores, seed=int(request["seed"]))
            entry["accuracy"] = {k: summary.get(k) for k in ("value", "n", "ci95", "interval") if k in summary}
            entry["batchnorm"] = batchnorm
        if timed:
            entry.update({key: timing[key] for key in ("p50_ms", "p50_ci95_ms", "p90_ms", "iterations", "unstable",
                                                       "inputs")})
            # The shape timed, read from the arrays the timing was fed rather than from the request's plan.
            entry["shape"] = {name: [batch_size, *array.shape[1:]] for name, array in arrays.items()}
        out.append(entry)
        _progress("shapes", (index + 1) / len(points))
    return out


class _batchnorm_at:
    """Re-estimate a torch model's BatchNorm statistics on ``arrays`` for the duration of a ``with`` block, then
    put the trained ones back; yields what was done ('re-estimated on N samples', or why not) or None."""

    def __init__(self, runtime, arrays: dict[str, np.ndarray]):
        self.runtime, self.arrays, self.saved = runtime, arrays, None

    def __enter__(self) -> str | None:
        if not self.arrays:
            return None
        module = getattr(self.runtime, "module", None)
        if module is None or not hasattr(module, "named_modules"):
            return f"kept: the {self.runtime.name} artifact has its statistics folded in"
        from optimizer.measure.shape_sweep import batchnorm_settings
        from optimizer.passes.recover import batchnorm_layers, reestimate_on_samples

        layers = batchnorm_layers(module)
        if not layers:
            return "none: the model has no BatchNorm layer"
        self.saved = {k: v.clone() for k, v in module.state_dict().items()}
        settings = batchnorm_settings()
        count = settings.samples(len(next(iter(self.arrays.values()))))
        reestimate_on_samples(module, layers, lambda a, b: {n: array[a:b] for n, array in self.arrays.items()},
                              [spec.name for spec in self.runtime.artifact.inputs], count, settings.batch_size)
        return f"re-estimated on {count} data.calibration samples"

    def __exit__(self, *exc) -> None:
        if self.saved is not None:
            self.runtime.module.load_state_dict(self.saved)


def _load_reference(request: dict, metric) -> np.ndarray:
    from optimizer.errors import StageError

    path = Path(request["baseline_outputs_npy"] if metric.cosine else request["baseline_predictions_npy"])
    if not path.is_file():
        raise StageError(f"{metric.label()} needs the baseline's outputs ({path.name} of the baseline's "
                         "measurement), which are missing; re-run without --resume")
    return np.load(path, allow_pickle=False)


def _load_baseline_scores(request: dict) -> np.ndarray | None:
    """The baseline's per-sample scores; from a baseline measured before scores were saved, its correct.npy."""
    for key in ("baseline_scores_npy", "baseline_correct_npy"):
        path = request.get(key)
        if path and Path(path).is_file():
            return np.load(path, allow_pickle=False).astype(np.float64)
    return None


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
