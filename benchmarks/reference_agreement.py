"""Does the toolkit's latency agree with the reference tools on the same model, threads and hints?

    python benchmarks/reference_agreement.py [--run runs/cpu_openvino_int8] [--rounds 3] [--threads 1]

Without --run, recipes/cpu_openvino_int8.yaml is run first (export -> NNCF INT8 -> OpenVINO). Then, for
each stage artifact of that run:

- OpenVINO IR: OpenVINO's own ``benchmark_app`` (shipped with the openvino wheel) on the same IR with the
  same device, threads, streams, precision hint and performance hint, synchronous API, batch 1;
- ONNX: an independent minimal onnxruntime loop (no toolkit code: a session with the same thread
  settings, ``perf_counter_ns`` around ``run``), in a fresh process;

against the toolkit's own measurement (its runtime and timing loop) in a fresh process. The two sides
alternate over ``--rounds`` rounds so that drift of the machine hits both; the table shows the median of
the rounds' medians and the ratio toolkit / reference. The aim is agreement within 5 %.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "cpu_openvino_int8.yaml"

# The toolkit's measurement: its runtime (settings from the artifact) and its timing loop, nothing else.
TOOLKIT_SCRIPT = """
import json, sys
import numpy as np
from optimizer.artifact import Artifact
from optimizer.measure.latency import TimingPlan, time_trials
from optimizer.runtimes.base import open_runtime
artifact = Artifact.load(sys.argv[1], verify=True)
runtime = open_runtime(artifact, threads=int(sys.argv[2]))
spec = artifact.inputs[0]
x = np.random.default_rng(0).standard_normal([1, *spec.shape[1:]]).astype(spec.dtype)
plan = TimingPlan(warmup_s=1.0, min_iterations=1000, min_duration_s=float(sys.argv[3]), max_duration_s=60.0)
summary, _ = time_trials(lambda: runtime.run({spec.name: x}), plan, 3)
print(json.dumps({"p50_ms": summary["p50_ms"], "settings": runtime.settings()}))
"""

# An independent onnxruntime loop: written from onnxruntime's documented API only.
ORT_REFERENCE_SCRIPT = """
import json, sys, time
import numpy as np
import onnxruntime as ort
options = ort.SessionOptions()
options.intra_op_num_threads = int(sys.argv[2])
options.inter_op_num_threads = 1
options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
first = session.get_inputs()[0]
shape = [1] + [d if isinstance(d, int) else 1 for d in first.shape[1:]]
x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
feed = {first.name: x}
start = time.perf_counter()
while time.perf_counter() - start < 1.0:
    session.run(None, feed)
times = []
start = time.perf_counter()
while len(times) < 1000 or time.perf_counter() - start < float(sys.argv[3]):
    t0 = time.perf_counter_ns()
    session.run(None, feed)
    times.append((time.perf_counter_ns() - t0) / 1e6)
print(json.dumps({"p50_ms": float(np.median(times))}))
"""


def run_json(args: list[str]) -> dict:
    done = subprocess.run(args, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"{args[0]} failed: {done.stderr.strip().splitlines()[-1] if done.stderr else done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def toolkit_p50(folder: Path, threads: int, seconds: float) -> float:
    return run_json([sys.executable, "-c", TOOLKIT_SCRIPT, str(folder), str(threads), str(seconds)])["p50_ms"]


def onnxruntime_p50(model: Path, threads: int, seconds: float) -> float:
    return run_json([sys.executable, "-c", ORT_REFERENCE_SCRIPT, str(model), str(threads), str(seconds)])["p50_ms"]


def benchmark_app_p50(folder: Path, meta: dict, inputs: list[dict], threads: int, seconds: float) -> float:
    tool = shutil.which("benchmark_app") or str(Path(sys.executable).parent / "benchmark_app")
    runtime = meta.get("runtime", {})
    shapes = ",".join(f"{spec['name']}[{','.join(str(d) for d in [1, *spec['shape'][1:]])}]" for spec in inputs)
    # benchmark_app only takes explicit streams and threads with "-hint none"; with one stream and the same
    # threads and precision this is the configuration the toolkit's LATENCY-hinted model runs.
    args = [tool, "-m", str(folder / "model.xml"), "-d", "CPU", "-api", "sync", "-hint", "none",
            "-nthreads", str(threads), "-nstreams", str(runtime.get("streams") or 1),
            "-infer_precision", runtime.get("precision_hint", "f32"),
            "-data_shape", shapes, "-t", str(max(1, int(seconds)))]
    done = subprocess.run(args, capture_output=True, text=True)
    # benchmark_app prints "[ INFO ]    Median:     0.21 ms" (or "210.5 us") under its Latency block.
    match = re.search(r"Median:\s+([0-9.]+)\s*(ms|us)", done.stdout)
    if done.returncode != 0 or match is None:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise SystemExit(f"benchmark_app failed: {' | '.join(tail)}")
    return float(match.group(1)) / (1000.0 if match.group(2) == "us" else 1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="an existing run folder (default: run the OpenVINO recipe)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per measurement, at least")
    args = parser.parse_args(argv)

    run_dir = args.run
    if run_dir is None:
        run_dir = REPO / "runs" / "reference_agreement"
        subprocess.run([sys.executable, "-m", "optimizer", "run", str(RECIPE), "--out", str(run_dir), "--quiet",
                        "--set", f"evaluate.latency.threads={args.threads}"], check=True, cwd=REPO)
    report = json.loads((run_dir / "report.json").read_text())

    rows = []
    for stage in report["stages"]:
        folder = run_dir / stage["artifact"]
        meta = json.loads((folder / "artifact.json").read_text())
        if stage["form"] == "openvino":
            reference_name = "benchmark_app"
            reference = lambda: benchmark_app_p50(folder, meta["meta"], meta["inputs"], args.threads, args.seconds)  # noqa: E731
        elif stage["form"] == "onnx":
            reference_name = "onnxruntime loop"
            reference = lambda: onnxruntime_p50(folder / meta["entry"], args.threads, args.seconds)  # noqa: E731
        else:
            continue
        ours, theirs = [], []
        for round_index in range(args.rounds):
            # Alternate which side goes first, so that a slow drift favours neither.
            order = [("ours", lambda: toolkit_p50(folder, args.threads, args.seconds)), ("ref", reference)]
            for side, measure in order if round_index % 2 == 0 else reversed(order):
                (ours if side == "ours" else theirs).append(measure())
        ours_p50, ref_p50 = statistics.median(ours), statistics.median(theirs)
        rows.append((stage["name"], stage["form"], reference_name, ours_p50, ref_p50, ours_p50 / ref_p50))

    from optimizer.measure.environment import describe

    print(f"Environment: {describe(report['environment'])}")
    print(f"batch 1, {args.threads} thread(s), {args.rounds} alternating rounds, median of round medians\n")
    print("| stage | form | reference | toolkit p50 ms | reference p50 ms | ratio |")
    print("|---|---|---|---:|---:|---:|")
    for name, form, ref_name, ours_p50, ref_p50, ratio in rows:
        print(f"| {name} | {form} | {ref_name} | {ours_p50:.4f} | {ref_p50:.4f} | {ratio:.3f} |")
    worst = max(abs(row[-1] - 1) for row in rows) if rows else 0.0
    print(f"\nlargest disagreement: {worst:.1%} ({'within' if worst <= 0.05 else 'outside'} the 5 % aim)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
