"""The built-in passes on the trained example: what each promises, measured on real data."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from optimizer import run_recipe
from optimizer.errors import EXIT_GATE_FAILED, GateFailed, InputRejected, RecipeError
from tests.conftest import quickstart_dict, write_recipe


def onnx_recipe(model: Path, stages: list[dict], eval_samples: int = 2000) -> dict:
    recipe = quickstart_dict(model, eval_samples=eval_samples)
    del recipe["model"]["factory"], recipe["model"]["kwargs"]
    recipe["stages"] = stages
    return recipe


def test_quantize_ort_default_is_u8s8_qdq_and_keeps_accuracy(example_onnx: Path, tmp_path: Path) -> None:
    report = run_recipe(onnx_recipe(example_onnx, [{"name": "int8", "pass": "quantize.ort"}]), out=tmp_path / "o")
    int8 = report.stage("int8")
    assert int8["precision"] == "int8"
    assert int8["details"]["quantization"]["activation_type"] == "uint8"
    assert report.stage("baseline")["accuracy"]["value"] - int8["accuracy"]["value"] <= 0.015
    model = onnx.load(str(tmp_path / "o" / "final" / "model.onnx"))
    quantize = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert quantize
    zero_points = {init.name: init.data_type for init in model.graph.initializer}
    activation_zero_point = quantize[0].input[2]
    assert zero_points[activation_zero_point] == onnx.TensorProto.UINT8
    # The agreement gate ran with its defaults against the FP32 input (99.4 % here).
    fidelity = int8["details"]["fidelity"]
    assert fidelity["samples"] == 512 and fidelity["min_top1_agreement"] == 0.9
    assert fidelity["top1_agreement"] >= 0.97 and fidelity["reference"] == "the FP32 input (onnxruntime)"


def test_quantize_ort_without_pre_processing_leaves_its_input_untouched(example_onnx: Path, tmp_path: Path) -> None:
    # quantize_static writes an inferred copy beside the model it reads: never beside the input artifact.
    stages = [{"name": "int8", "pass": "quantize.ort", "with": {"preprocess": False, "subset_size": 64}}]
    report = run_recipe(onnx_recipe(example_onnx, stages), out=tmp_path / "o")
    assert report.stage("int8")["precision"] == "int8"
    baseline = tmp_path / "o" / "artifacts" / "baseline"
    listed = set(json.loads((baseline / "artifact.json").read_text())["files"])
    assert {p.name for p in baseline.iterdir()} == listed | {"artifact.json"}


# Fashion-MNIST's training split with the normalization the example was trained with: held-out data for
# accuracy control, apart from the test split the pipeline reports on.
TRAIN_SPLIT = {"dataset": "fashion-mnist", "split": "train", "mean": [0.2860], "std": [0.3530]}


def test_accuracy_control_brings_a_broken_int8_back_within_max_drop(example_onnx: Path, tmp_path: Path) -> None:
    """Calibration images at half the scale the model sees (std doubled, as a wrong normalization does)
    give plain INT8 activation ranges that clip: it loses several points. Accuracy control, choosing on
    data.validation, must revert operations to float until the drop is within max_drop; with max_drop
    ignored the controlled drop would be the plain one."""
    stages = [{"name": "int8", "pass": "quantize.nncf",
               "with": {"max_drop": 0.01, "accuracy_control_samples": 500, "subset_size": 300}}]
    recipe = onnx_recipe(example_onnx, stages)
    recipe["data"]["calibration"]["std"] = [0.706]
    recipe["data"]["validation"] = {**TRAIN_SPLIT, "samples": 500}
    report = run_recipe(recipe, out=tmp_path / "o")
    int8 = report.stage("int8")
    control = int8["details"]["accuracy_control"]
    assert control["validation"] == {"source": "data.validation", "samples": 500, "requested": 500,
                                     "available": 500, "shared_with_eval": 0}
    assert control["plain_int8_drop"] > 0.03  # 6.6 points here: plain INT8 breaks max_drop by far
    assert control["controlled_drop"] <= 0.01
    assert 0 < len(control["reverted"]) < control["operations_with_int8_inputs"]
    assert all(r["drop_after"] is not None for r in control["reverted"])
    assert min(r["drop_after"] for r in control["reverted"]) <= 0.01
    # The operations named are float in the model deployed: none of them takes an int8 input.
    from optimizer.passes.accuracy_control import quantized_operations

    remaining = quantized_operations(onnx.load(str(tmp_path / "o" / "final" / "model.onnx")))
    assert remaining and not {r["name"] for r in control["reverted"]} & set(remaining)
    # The figure reported is the eval split's, and holds the pipeline's 1-point budget.
    assert report.stage("baseline")["accuracy"]["value"] - int8["accuracy"]["value"] <= 0.01
    assert "accuracy control on 500 validation samples (data.validation" in (tmp_path / "o" / "report.md").read_text()


def test_accuracy_control_holds_out_calibration_samples_by_default(example_onnx: Path, tmp_path: Path) -> None:
    stages = [{"name": "int8", "pass": "quantize.nncf",
               "with": {"max_drop": 0.005, "accuracy_control_samples": 1000, "subset_size": 200}}]
    report = run_recipe(onnx_recipe(example_onnx, stages), out=tmp_path / "o")
    int8 = report.stage("int8")
    assert int8["status"] == "ok" and int8["details"]["quantization"]["quantize_nodes"] > 0
    # data.calibration has 1,000 samples: 200 calibrate, and only the other 800 may serve accuracy control.
    control = int8["details"]["accuracy_control"]
    assert control["validation"] == {"source": "data.calibration, held out from calibration",
                                     "samples": 800, "requested": 1000, "available": 800, "shared_with_eval": 0,
                                     "disjoint_from_calibration_subset": True}
    assert control["controlled_drop"] <= 0.005
    # Accuracy control holds the drop on its validation samples; on 2,000 eval samples allow the noise.
    assert report.stage("baseline")["accuracy"]["value"] - int8["accuracy"]["value"] <= 0.015


@pytest.mark.parametrize("split", ["calibration", "validation"])
def test_accuracy_control_refuses_to_choose_on_the_eval_set(example_onnx: Path, tmp_path: Path, split: str) -> None:
    stages = [{"name": "int8", "pass": "quantize.nncf", "with": {"max_drop": 0.01, "subset_size": 100}}]
    recipe = onnx_recipe(example_onnx, stages, eval_samples=500)
    recipe["data"][split] = dict(recipe["data"]["eval"])
    with pytest.raises(RecipeError, match=rf"stage 'int8': all \d+ accuracy-control samples \(data.{split}\) "
                                          "are also in data.eval"):
        run_recipe(recipe, out=tmp_path / "o")


@pytest.mark.parametrize("pass_name", ["quantize.nncf", "quantize.ort"])
def test_int8_agreement_threshold_above_one_is_a_recipe_error(example_onnx: Path, tmp_path: Path, pass_name: str) -> None:
    recipe = onnx_recipe(example_onnx, [{"name": "int8", "pass": pass_name, "with": {"min_top1_agreement": 1.01}}],
                         eval_samples=300)
    with pytest.raises(RecipeError, match=r"stages\.0\.with\.min_top1_agreement: Input should be less than or equal to 1"):
        run_recipe(recipe, out=tmp_path / "o")


def test_nncf_int8_gate_fails_when_some_predictions_change(example_onnx: Path, tmp_path: Path) -> None:
    """Well-calibrated INT8 still moves about 1 % of the predictions (near a class boundary): asking for
    every one of 2,000 to agree must fail the stage, with the figures kept in the report."""
    stages = [{"name": "int8", "pass": "quantize.nncf",
               "with": {"subset_size": 300, "verify_samples": 2000, "min_top1_agreement": 1.0}}]
    with pytest.raises(GateFailed) as caught:
        run_recipe(onnx_recipe(example_onnx, stages), out=tmp_path / "o")
    assert caught.value.exit_code == EXIT_GATE_FAILED
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("stage 'int8': the INT8 model agrees with its FP32 input on the top-1 class of only ")
    stage = json.loads((tmp_path / "o" / "report.json").read_text())["stages"][-1]
    assert stage["name"] == "int8" and stage["status"] == "failed"
    assert stage["details"]["fidelity"]["samples"] == 2000 and 0.97 <= stage["details"]["fidelity"]["top1_agreement"] < 1


def test_ort_int8_calibrated_without_normalization_exits_4(example_onnx: Path, tmp_path: Path) -> None:
    """Calibration images without the model's mean/std: the INT8 model agrees with FP32 on about 16 % of the
    eval images. With no accuracy budget at all, the default agreement gate alone stops the run."""
    from tests.test_end_to_end import run_cli

    recipe = onnx_recipe(example_onnx, [{"name": "int8", "pass": "quantize.ort"}], eval_samples=600)
    del recipe["data"]["calibration"]["mean"], recipe["data"]["calibration"]["std"]
    recipe["budget"] = {}
    result = run_cli("run", str(write_recipe(tmp_path, recipe)), "--out", str(tmp_path / "out"))
    assert result.returncode == EXIT_GATE_FAILED, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("optimizer: error: stage 'int8': the INT8 model agrees with its FP32 input on the top-1 "
                           "class of only "), last
    assert "min_top1_agreement 0.9" in last


def test_quantizing_an_int8_model_again_is_refused(example_onnx: Path, tmp_path: Path) -> None:
    stages = [{"name": "int8", "pass": "quantize.nncf", "with": {"subset_size": 100}},
              {"name": "again", "pass": "quantize.ort", "with": {"subset_size": 100}}]
    recipe = onnx_recipe(example_onnx, stages, eval_samples=300)
    recipe["budget"] = {}
    with pytest.raises(RecipeError, match="already quantized"):
        run_recipe(recipe, out=tmp_path / "o")


def test_more_calibration_samples_than_available_is_an_error(example_onnx: Path, tmp_path: Path) -> None:
    recipe = onnx_recipe(example_onnx, [{"name": "int8", "pass": "quantize.nncf", "with": {"subset_size": 500}}],
                         eval_samples=300)
    recipe["data"]["calibration"]["samples"] = 100
    with pytest.raises(InputRejected, match="500 calibration samples but data.calibration has 100"):
        run_recipe(recipe, out=tmp_path / "o")


def test_export_with_torchscript_exporter_and_static_batch(example_checkpoint: Path, tmp_path: Path) -> None:
    recipe = quickstart_dict(example_checkpoint, eval_samples=300)
    recipe["stages"] = [{"name": "export", "pass": "export.onnx",
                         "with": {"exporter": "torchscript", "opset": 17, "dynamic_batch": False,
                                  "verify_samples": 1}}]
    report = run_recipe(recipe, out=tmp_path / "o")
    model = onnx.load(str(tmp_path / "o" / "final" / "model.onnx"))
    assert model.opset_import[0].version == 17
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    assert report.stage("export")["details"]["fidelity"]["within_tolerance"]


def length_fixed_at_export():
    """A model whose forward turns its input's length into a Python int: PyTorch takes any length, while a traced
    export keeps the ramp of the length it was traced at, so onnxruntime refuses every other one."""
    import torch
    from torch import nn

    class LengthFixedAtExport(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            ramp = torch.arange(int(x.shape[1]), dtype=x.dtype)
            return (x + ramp).sum(dim=1, keepdim=True) * self.scale

    return LengthFixedAtExport()


def test_an_export_that_fails_at_a_verify_length_is_a_one_line_gate_naming_stage_and_length(tmp_path: Path) -> None:
    import numpy as np

    from optimizer.artifact import Artifact
    from optimizer.data.datasets import ArrayData
    from optimizer.passes.base import PassContext
    from optimizer.passes.export_onnx import ExportOnnx
    from optimizer.progress import Progress
    from optimizer.recipe import InputSpec
    from optimizer.shapes import length_axes
    from optimizer.torch_structure import save_module_weights

    inputs = [InputSpec(name="x", shape=[1, 16], dtype="float32", dynamic={1: {"name": "seq", "min": 4, "max": 32}})]
    source = tmp_path / "source"
    source.mkdir()
    save_module_weights(length_fixed_at_export(), source / "model.safetensors")
    artifact = Artifact("torch", source, "model.safetensors", inputs,
                        meta={"kind": "factory", "factory": "tests.test_passes:length_fixed_at_export",
                              "kwargs": {}}).finalize()
    samples = np.random.default_rng(0).normal(size=(6, 16)).astype(np.float32)
    data = ArrayData(inputs={"x": samples}, labels=np.zeros(6, dtype=np.int64), axes=length_axes(inputs),
                     lengths={"seq": np.full(6, 16)})

    class EvalOnly:
        def eval(self) -> ArrayData:
            return data

    work = tmp_path / "export"
    work.mkdir()
    ctx = PassContext(stage="export", work_dir=work, recipe=None, data=EvalOnly(),  # type: ignore[arg-type]
                      progress=Progress(quiet=True), threads=1, seed=0)
    export = ExportOnnx({"exporter": "torchscript", "opset": 17, "verify_lengths": [16, 8, 32]})
    with pytest.raises(GateFailed) as caught:
        export.run(artifact, ctx)
    message = str(caught.value)
    # At the traced length 16 the export matches PyTorch; at 8 onnxruntime refuses to broadcast the fixed ramp.
    assert caught.value.exit_code == EXIT_GATE_FAILED and "\n" not in message
    assert message.startswith("stage 'export': the exported model fails to run at length 8 of dynamic axis 'seq' "
                              "(Fail: [ONNXRuntimeError]")
    rows = ctx.details["fidelity"]["lengths"]
    assert [row["length"] for row in rows] == [16, 8] and rows[0]["within_tolerance"] and "error" in rows[1]
