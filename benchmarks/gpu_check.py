"""TensorRT FP16 and INT8 engines of the built-in example and of torchvision resnet18, checked and timed.

    python benchmarks/gpu_check.py [--out runs/gpu_check] [--batch 1] [--iterations 1000] [--trtexec PATH]

For a machine with an NVIDIA GPU and TensorRT (pip install 'optimizer[tensorrt]'; with TensorRT 11 also
pip install 'nvidia-modelopt[onnx]' for FP16). For each model it exports ONNX (opset 18, dynamic batch),
quantizes a copy to INT8 Q/DQ with NNCF (200 calibration inputs), builds an FP16 and an INT8 engine with
the same build code as compile.tensorrt, and checks each engine's outputs against onnxruntime on the same
inputs (the FP32 ONNX for FP16, the Q/DQ ONNX for INT8). Then it times each engine file twice:

  - with this toolkit's runtime: median GPU time of one inference from CUDA events around
    execute_async_v3 (inputs already on the GPU), and median wall time of run(), which adds the copies
    from and to host memory;
  - with `trtexec --loadEngine=<the same file>`: its median "GPU Compute Time".

The ratio ours/trtexec compares two harnesses on one engine: near 1 means our runtime adds no GPU-side
overhead. (trtexec 11 replays a CUDA graph by default, which trims launch overhead on tiny models.)
resnet18 keeps its random initialization: this checks latency and agreement with ONNX, not accuracy.
The example uses checkpoints/fashion_resnet.safetensors when it exists (random weights otherwise) and,
when Fashion-MNIST is installed, real normalized test images; otherwise inputs are seeded random normal.

Without TensorRT or a CUDA GPU it exits at once with a one-line message.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "checkpoints" / "fashion_resnet.safetensors"
FASHION_ROOT = Path(os.environ.get("FASHION_MNIST_ROOT", "/usr/share/datasets/fashion-mnist"))


def model_specs() -> list[dict]:
    return [
        {"name": "fashion_resnet", "factory": "optimizer.zoo:small_resnet",
         "kwargs": {"num_classes": 10, "in_channels": 1}, "shape": (1, 28, 28),
         "checkpoint": CHECKPOINT if CHECKPOINT.is_file() else None},
        {"name": "resnet18", "factory": "torchvision.models:resnet18", "kwargs": {"weights": None},
         "shape": (3, 224, 224), "checkpoint": None},
    ]


def sample_inputs(spec: dict, count: int, seed: int) -> tuple[np.ndarray, str]:
    """Real normalized Fashion-MNIST test images for the example when available, else random normal."""
    if spec["name"] == "fashion_resnet":
        try:
            from optimizer.data.idx import load_fashion_mnist

            images, _ = load_fashion_mnist(FASHION_ROOT, "test")
            pick = np.random.default_rng(seed).choice(len(images), size=count, replace=False)
            x = (images[pick].astype(np.float32) / 255.0 - 0.2860) / 0.3530
            return x[:, None, :, :], "Fashion-MNIST test images"
        except Exception:  # the data set is optional here; fall back to random inputs
            pass
    x = np.random.default_rng(seed).standard_normal((count, *spec["shape"])).astype(np.float32)
    return x, "random normal inputs"


def export_onnx(spec: dict, folder: Path) -> Path:
    import torch

    from optimizer.models import build_architecture, load_weights, read_state_dict

    module = build_architecture(spec["factory"], spec["kwargs"]).eval()
    if spec["checkpoint"] is not None:
        load_weights(module, read_state_dict(spec["checkpoint"]), where=str(spec["checkpoint"]))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    example = (torch.randn(2, *spec["shape"]),)
    torch.onnx.export(module, example, str(path), input_names=["images"], output_names=["output"],
                      opset_version=18, dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},),
                      verbose=False)
    return path


def quantize_int8(onnx_path: Path, calibration: np.ndarray):
    """NNCF post-training INT8 (as quantize.nncf does), prepared for TensorRT (signed INT8 Q/DQ only)."""
    import logging

    import nncf
    import onnx

    from optimizer.tensorrt_support import check_qdq_for_int8, inspect_qdq, retype_uint8_qdq

    nncf.set_log_level(logging.ERROR)
    items = [{"images": calibration[i : i + 1]} for i in range(len(calibration))]
    quantized = nncf.quantize(onnx.load(str(onnx_path)), nncf.Dataset(items), subset_size=len(items))
    reference = onnx_path.with_name("model_int8.onnx")
    onnx.save(quantized, str(reference))
    check_qdq_for_int8(inspect_qdq(quantized), stage="int8")
    retype_uint8_qdq(quantized)
    return reference, quantized


def trtexec_median(trtexec: str | None, engine: Path, shapes: str, seconds: int) -> dict[str, float] | str:
    from optimizer.tensorrt_support import parse_trtexec_summary

    if trtexec is None:
        return "trtexec not found"
    command = [trtexec, f"--loadEngine={engine}", f"--shapes={shapes}", "--warmUp=500", f"--duration={seconds}"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=seconds * 10 + 120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"trtexec failed: {type(exc).__name__}"
    summary = parse_trtexec_summary(done.stdout + "\n" + done.stderr)
    if done.returncode != 0 or "gpu_compute_median_ms" not in summary:
        last = (done.stdout + done.stderr).strip().splitlines()[-1:] or ["no output"]
        return f"trtexec exit {done.returncode}: {last[0][:80]}"
    return summary


def time_runtime(runtime, x: np.ndarray, iterations: int) -> tuple[float, float]:
    """(median GPU ms from CUDA events, median wall ms of run() with host copies)."""
    import torch

    from optimizer.runtimes.tensorrt_gpu import time_cuda_events

    with torch.cuda.stream(runtime.stream):
        device_inputs = {"images": torch.from_numpy(x).to(runtime.device)}
    gpu = time_cuda_events(lambda: runtime.execute_device(device_inputs), iterations=iterations,
                           warmup=max(20, iterations // 10), stream=runtime.stream)
    host = {"images": x}
    for _ in range(max(20, iterations // 10)):
        runtime.run(host)
    wall = []
    for _ in range(iterations):
        start = time.perf_counter()
        runtime.run(host)
        wall.append((time.perf_counter() - start) * 1e3)
    return statistics.median(gpu), statistics.median(wall)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "gpu_check")
    parser.add_argument("--batch", type=int, default=1, help="batch size timed (default 1)")
    parser.add_argument("--iterations", type=int, default=1000, help="timed iterations in our runtime")
    parser.add_argument("--trtexec-seconds", type=int, default=5, help="trtexec --duration")
    parser.add_argument("--trtexec", default=None, help="path of trtexec (default: found on PATH)")
    parser.add_argument("--samples", type=int, default=256, help="inputs compared with onnxruntime")
    args = parser.parse_args(argv)

    from optimizer.errors import MissingDependency

    try:
        from optimizer.tensorrt_support import require_cuda_gpu, require_tensorrt

        trt = require_tensorrt("gpu_check", what="benchmarks/gpu_check.py")
        require_cuda_gpu("gpu_check", what="benchmarks/gpu_check.py")
    except MissingDependency as exc:
        message = str(exc).removeprefix("stage 'gpu_check': ")
        print(f"gpu_check: {message}", file=sys.stderr)
        return 2

    import torch

    from optimizer.artifact import Artifact
    from optimizer.errors import OptimizerError
    from optimizer.passes.compile_tensorrt import write_engine_folder
    from optimizer.passes.export_onnx import compare_outputs
    from optimizer.recipe import InputSpec
    from optimizer.runtimes.onnxruntime_cpu import OnnxRuntime
    from optimizer.runtimes.tensorrt_gpu import TensorRTRuntime
    from optimizer.tensorrt_support import BuildSettings, build_profiles, default_tolerances, shapes_argument

    trtexec = args.trtexec or shutil.which("trtexec")
    print(f"TensorRT {trt.__version__} | {torch.cuda.get_device_name(0)} | torch {torch.__version__} | "
          f"trtexec {trtexec or 'not found'}", flush=True)
    rows = []
    failed = False
    for spec in model_specs():
        folder = args.out / spec["name"]
        shutil.rmtree(folder, ignore_errors=True)
        print(f"{spec['name']}: export, quantize, build ...", file=sys.stderr, flush=True)
        fp32_onnx = export_onnx(spec, folder / "onnx")
        x_all, source_note = sample_inputs(spec, args.samples + 200, seed=0)
        calibration, samples = x_all[:200], x_all[200:]
        int8_reference, int8_model = quantize_int8(fp32_onnx, calibration)
        inputs = [InputSpec(name="images", shape=[args.batch, *spec["shape"]])]
        profiles = tuple(build_profiles(inputs, min_batch=1, opt_batch=args.batch,
                                        max_batch=max(args.batch, 64), stage=spec["name"]))
        for precision, source, reference in (("fp16", fp32_onnx, fp32_onnx),
                                             ("int8", int8_model, int8_reference)):
            dest = folder / precision
            dest.mkdir(parents=True)
            row = {"model": spec["name"], "precision": precision, "inputs": source_note}
            try:
                write_engine_folder(source, BuildSettings(precision, profiles), dest,
                                    stage=f"{spec['name']}-{precision}")
                engine_artifact = Artifact("tensorrt", dest, "model.engine", inputs, lineage={"stage": precision})
                runtime = TensorRTRuntime(engine_artifact, threads=1)
                onnx_artifact = Artifact("onnx", reference.parent, reference.name, inputs)
                want = OnnxRuntime(onnx_artifact, threads=os.cpu_count() or 1).run_batched({"images": samples}, 64)
                got = runtime.run({"images": samples})
                atol, rtol, agreement = default_tolerances(precision)
                fidelity = compare_outputs(want, got, atol=atol, rtol=rtol)
                row["max_abs_diff"] = fidelity["max_abs_diff"]
                row["top1_agreement"] = fidelity["top1_agreement"]
                row["fidelity_ok"] = fidelity["within_tolerance"] and fidelity["top1_agreement"] >= agreement
                failed |= not row["fidelity_ok"]
                batch = np.ascontiguousarray(samples[: args.batch])
                row["ours_gpu_ms"], row["ours_run_ms"] = time_runtime(runtime, batch, args.iterations)
                runtime.close()
                measured = trtexec_median(trtexec, dest / "model.engine", shapes_argument(profiles, args.batch),
                                          args.trtexec_seconds)
                if isinstance(measured, dict):
                    row["trtexec_gpu_ms"] = measured["gpu_compute_median_ms"]
                    row["ratio"] = row["ours_gpu_ms"] / measured["gpu_compute_median_ms"]
                else:
                    row["trtexec_note"] = measured
            except OptimizerError as exc:
                row["error"] = str(exc)
                failed = True
            rows.append(row)

    (args.out / "gpu_check.json").write_text(json.dumps(rows, indent=2))
    header = (f"{'model':<15} {'prec':<5} {'max|diff|':>10} {'top-1 agr':>9} {'ours GPU ms':>12} "
              f"{'ours run() ms':>14} {'trtexec GPU ms':>15} {'ours/trtexec':>13}")
    print(f"batch {args.batch}; GPU ms = median per inference; run() adds host<->GPU copies")
    print(header)
    print("-" * len(header))
    for row in rows:
        if "error" in row:
            print(f"{row['model']:<15} {row['precision']:<5} error: {row['error']}")
            continue
        trtexec_ms = f"{row['trtexec_gpu_ms']:.4f}" if "trtexec_gpu_ms" in row else row.get("trtexec_note", "")
        ratio = f"{row['ratio']:.2f}x" if "ratio" in row else "-"
        mark = "" if row["fidelity_ok"] else "  OUTPUTS DIFFER FROM ONNX"
        print(f"{row['model']:<15} {row['precision']:<5} {row['max_abs_diff']:>10.3g} "
              f"{row['top1_agreement']:>9.1%} {row['ours_gpu_ms']:>12.4f} {row['ours_run_ms']:>14.4f} "
              f"{trtexec_ms:>15} {ratio:>13}{mark}")
    print(f"rows: {args.out / 'gpu_check.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
