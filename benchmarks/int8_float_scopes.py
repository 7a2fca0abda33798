"""Which layers does NNCF INT8 cost a MobileNetV2 its accuracy on? Quantize one exported FP32 ONNX model several
times, each time leaving one set of layers in float, and score every result on the same test images.

    python benchmarks/int8_float_scopes.py --onnx runs/bench_latency_prune/latency+rec+kd/artifacts/export/model.onnx
                                           [--images 1000] [--calibration 300]

The model's inputs and preprocessing are those of ``recipes/mobilenet_latency_prune_openvino.yaml`` (224×224
Fashion-MNIST, ImageNet normalization); the images are the recipe's seeded eval subset of that size and the
calibration images its calibration split. Scopes (convolutions in graph order):

  none          plain NNCF INT8 (performance preset), nothing left in float
  head          the classifier Gemm
  last-13       the last 13 convolutions (blocks 14-18 of MobileNetV2 and its last 1x1 conv)
  first-39      the first 39 convolutions (stem and blocks 1-13)
  projections   each block's projection 1x1 convolution (the layers recover.reconstruct refits)
  adds          the residual adds

Prints top-1 of the FP32 model and of each INT8 model, and the drop against FP32.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RECIPE = REPO / "recipes" / "mobilenet_latency_prune_openvino.yaml"


def projection_convs(model) -> list[str]:
    """Convs whose output feeds no activation: MobileNetV2's linear-bottleneck projections (and the head conv's
    producer chain stays out: its output goes through ReLU6, a Clip)."""
    consumers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    return [n.name for n in model.graph.node if n.op_type == "Conv"
            and not any(op in ("Clip", "Relu") for op in consumers.get(n.output[0], []))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, required=True, help="FP32 ONNX export of the model")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--calibration", type=int, default=300)
    args = parser.parse_args(argv)

    import nncf
    import onnx
    import onnxruntime as ort

    from optimizer.data.provider import DataProvider
    from optimizer.recipe import load_recipe

    raw = yaml.safe_load(RECIPE.read_text())
    raw["model"]["checkpoint"] = str((RECIPE.parent / raw["model"]["checkpoint"]).resolve())
    raw["data"]["eval"]["samples"] = args.images
    recipe = load_recipe(raw)
    data = DataProvider(recipe, list(recipe.recipe.model.inputs))
    evaluation, calibration = data.eval(), data.calibration()
    images, labels = evaluation.inputs["images"], evaluation.labels
    calib = calibration.inputs["images"][:args.calibration]

    def top1(model) -> float:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        predictions = np.concatenate([session.run(None, {"images": images[i:i + 50]})[0].argmax(1)
                                      for i in range(0, len(images), 50)])
        return float((predictions == labels).mean())

    model = onnx.load(str(args.onnx))
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    gemms = [n.name for n in model.graph.node if n.op_type == "Gemm"]
    scopes = {"none": None, "head": {"names": gemms}, "last-13": {"names": convs[-13:]},
              "first-39": {"names": convs[:39]}, "projections": {"names": projection_convs(model)},
              "adds": {"types": ["Add"]}}
    dataset = nncf.Dataset([{"images": calib[i:i + 1]} for i in range(len(calib))])
    fp32 = top1(model)
    print(f"FP32: top-1 {fp32 * 100:.2f} % on {len(labels)} test images")
    for name, scope in scopes.items():
        quantized = nncf.quantize(model, dataset, subset_size=len(calib),
                                  ignored_scope=nncf.IgnoredScope(**scope) if scope else None)
        value = top1(quantized)
        print(f"INT8, float {name:12s}: top-1 {value * 100:.2f} % ({(value - fp32) * 100:+.2f} points)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
