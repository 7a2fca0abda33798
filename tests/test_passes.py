"""The built-in passes on the trained example: what each promises, measured on real data."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from optimizer import run_recipe
from optimizer.errors import InputRejected, RecipeError
from tests.conftest import quickstart_dict


@pytest.fixture(scope="module")
def exported(example_checkpoint: Path, tmp_path_factory) -> Path:
    """The example exported to ONNX once, shared by the quantization tests."""
    recipe = quickstart_dict(example_checkpoint, eval_samples=1000)
    recipe["stages"] = [{"name": "export", "pass": "export.onnx"}]
    out = tmp_path_factory.mktemp("exported") / "out"
    run_recipe(recipe, out=out)
    return out / "final" / "model.onnx"


def onnx_recipe(model: Path, stages: list[dict], eval_samples: int = 2000) -> dict:
    recipe = quickstart_dict(model, eval_samples=eval_samples)
    del recipe["model"]["factory"], recipe["model"]["kwargs"]
    recipe["stages"] = stages
    return recipe


def test_quantize_ort_default_is_u8s8_qdq_and_keeps_accuracy(exported: Path, tmp_path: Path) -> None:
    report = run_recipe(onnx_recipe(exported, [{"name": "int8", "pass": "quantize.ort"}]), out=tmp_path / "o")
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


def test_quantize_nncf_with_max_drop_uses_accuracy_control(exported: Path, tmp_path: Path) -> None:
    stages = [{"name": "int8", "pass": "quantize.nncf",
               "with": {"max_drop": 0.005, "accuracy_control_samples": 300, "subset_size": 200}}]
    report = run_recipe(onnx_recipe(exported, stages), out=tmp_path / "o")
    int8 = report.stage("int8")
    assert int8["status"] == "ok" and int8["details"]["quantization"]["quantize_nodes"] > 0
    # Accuracy control holds the drop on its 300 validation samples; on 2,000 eval samples allow the noise.
    assert report.stage("baseline")["accuracy"]["value"] - int8["accuracy"]["value"] <= 0.015


def test_quantizing_an_int8_model_again_is_refused(exported: Path, tmp_path: Path) -> None:
    stages = [{"name": "int8", "pass": "quantize.nncf", "with": {"subset_size": 100}},
              {"name": "again", "pass": "quantize.ort", "with": {"subset_size": 100}}]
    recipe = onnx_recipe(exported, stages, eval_samples=300)
    recipe["budget"] = {}
    with pytest.raises(RecipeError, match="already quantized"):
        run_recipe(recipe, out=tmp_path / "o")


def test_more_calibration_samples_than_available_is_an_error(exported: Path, tmp_path: Path) -> None:
    recipe = onnx_recipe(exported, [{"name": "int8", "pass": "quantize.nncf", "with": {"subset_size": 500}}],
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
