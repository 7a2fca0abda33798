"""Times ONNX blocks for a latency table, in a process of their own: ``python -m optimizer.measure.latency_table_worker REQUEST.json``.

For each block: quantize it to INT8 with NNCF when the target precision is INT8 (the calibration values are
the block's inputs on the model's example input, with noise: they change the scales, never the kernels, so
the time is that of the real INT8 model), open it on
the target runtime with the target's threads (OpenVINO: precision hint f32 for float layers, latency hint,
one stream, as compile.openvino deploys it) and bind one input. Then every block is timed with the toolkit's
own loop in ROUNDS interleaved rounds (block 1, 2, ..., n, then again), and its figure is the smallest of
its rounds' medians: a neighbour's burst of load lands in one round of some blocks, not in all rounds of
one block, so the minimum keeps a table of tens of small figures consistent on a shared machine.
Writes ``{"ok": true, "timings": {key: {...}}}`` or ``{"ok": false, "label", "error"}`` to the result path.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

# Short plan per round: a block takes 0.01-3 ms, so this is tens to hundreds of iterations; a table needs a
# curve, not a p99.
ROUNDS = 3
WARMUP_S = 0.05
MIN_ITERATIONS = 60
MIN_DURATION_S = 0.15
MAX_DURATION_S = 2.0


def _real_inputs(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as stored:
        return {name: stored[name] for name in stored.files}


def _quantize(model_path: Path, out_path: Path, inputs: dict[str, np.ndarray], model_type: str) -> None:
    import nncf
    import onnx

    model = onnx.load(str(model_path))
    rng = np.random.default_rng(1)
    samples = [{k: (v + 0.1 * rng.standard_normal(v.shape)).astype(v.dtype) if v.dtype == np.float32 else v
                for k, v in inputs.items()} for _ in range(4)]
    quantized = nncf.quantize(model, nncf.Dataset(samples), preset=nncf.QuantizationPreset.PERFORMANCE,
                              subset_size=len(samples),
                              model_type=nncf.ModelType.TRANSFORMER if model_type == "transformer" else None)
    onnx.save(quantized, str(out_path))


def _openvino_runner(model_path: Path, inputs: dict[str, np.ndarray], threads: int) -> Callable[[], Any]:
    import openvino as ov

    from optimizer.runtimes.openvino_cpu import compile_properties

    core = ov.Core()
    compiled = core.compile_model(ov.convert_model(str(model_path)), "CPU",
                                  compile_properties(precision="f32", performance_hint="latency", threads=threads))
    request = compiled.create_infer_request()
    for port in compiled.inputs:
        name = port.get_any_name()
        # A copy: a tensor sharing the array's memory does not keep the array alive, and nothing else here does
        # (the request outlives this function), so a shared tensor would read freed memory (a crash, seen).
        request.set_tensor(name, ov.Tensor(np.array(inputs[name], copy=True, order="C")))
    return request.infer


def _onnxruntime_runner(model_path: Path, inputs: dict[str, np.ndarray], threads: int) -> Callable[[], Any]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    return lambda: session.run(None, inputs)


def prepare_block(model_path: Path, target: dict[str, Any], scratch: Path, inputs_path: Path) -> Callable[[], Any]:
    """The block ready to run: quantized when the target is INT8, compiled, its recorded inputs bound."""
    inputs = _real_inputs(inputs_path)
    if target["precision"] == "int8":
        quantized = scratch / f"{model_path.stem}.int8.onnx"
        _quantize(model_path, quantized, inputs, target.get("quantization", "default"))
        model_path = quantized
    threads = int(target["threads"])
    if target["runtime"] == "openvino":
        return _openvino_runner(model_path, inputs, threads)
    return _onnxruntime_runner(model_path, inputs, threads)


def time_rounds(runners: dict[str, Callable[[], Any]], rounds: int = ROUNDS) -> dict[str, dict[str, Any]]:
    from optimizer.measure.latency import TimingPlan, time_iterations, warm_up

    plan = TimingPlan(warmup_s=0.0, min_iterations=MIN_ITERATIONS, min_duration_s=MIN_DURATION_S,
                      max_duration_s=MAX_DURATION_S)
    medians: dict[str, list[float]] = {key: [] for key in runners}
    intervals: dict[str, list[list[float]]] = {key: [] for key in runners}
    for _ in range(rounds):
        for key, run in runners.items():
            warm_up(run, WARMUP_S)
            summary, _ = time_iterations(run, plan, warm=False)
            medians[key].append(summary["p50_ms"])
            intervals[key].append(summary["p50_ci95_ms"])
    out = {}
    for key, values in medians.items():
        best = min(range(len(values)), key=values.__getitem__)
        out[key] = {"p50_ms": values[best], "p50_ci95_ms": intervals[key][best], "round_p50_ms": values}
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    request = json.loads(Path(args[0]).read_text())
    result_path = Path(request["result"])
    target = request["target"]  # threads: the runtimes take them explicitly, OpenMP from OMP_NUM_THREADS
    label = None
    try:
        with tempfile.TemporaryDirectory(prefix="optimizer-table-int8-") as scratch:
            runners: dict[str, Callable[[], Any]] = {}
            for block in request["blocks"]:
                label = block["label"]
                runners[block["key"]] = prepare_block(Path(block["onnx"]), target, Path(scratch),
                                                      Path(block["inputs"]))
            label = "timing"
            timings = time_rounds(runners)
    except Exception as exc:  # reported to the parent, which turns it into a one-line stage error
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        result_path.write_text(json.dumps({"ok": False, "label": label, "error": f"{type(exc).__name__}: {first[:300]}"}))
        return 1
    result_path.write_text(json.dumps({"ok": True, "timings": timings}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
