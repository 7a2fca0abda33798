"""The fidelity checks of the INT8 and compile passes follow the recipe's metric: top-1 agreement with the input
model gates a classifier's stages, the mean cosine similarity of the outputs gates those of an embedding or a
regression (whose arg-max is no class), with the top-1 agreement still recorded."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from optimizer import run_recipe
from optimizer.errors import EXIT_GATE_FAILED, GateFailed
from optimizer.passes.base import PassContext
from optimizer.passes.output_agreement import (
    DEFAULT_MIN_COSINE,
    check_cosine,
    gates_on_classes,
    output_cosine,
    record_cosine,
)
from optimizer.progress import Progress
from optimizer.recipe import LoadedRecipe, Recipe
from tests.conftest import quickstart_dict, write_recipe

COSINE = {"metric": "agreement", "agreement": "cosine"}


def _context(recipe: object) -> PassContext:
    return PassContext(stage="int8", work_dir=Path("."), recipe=recipe, data=None,  # type: ignore[arg-type]
                       progress=Progress(quiet=True), threads=1, seed=0)


# ------------------------------------------------------------------------------------------ units


@pytest.mark.parametrize(("accuracy", "classes"), [
    ({"metric": "top1"}, True), ({"metric": "top5"}, True), ({"metric": "agreement"}, True),
    (COSINE, False), ({"metric": "python:tests.metrics:mse", "higher_is_better": False}, False),
])
def test_the_recipes_metric_decides_what_gates(tmp_path: Path, accuracy: dict, classes: bool) -> None:
    raw = quickstart_dict(tmp_path / "model.safetensors")
    raw["evaluate"]["accuracy"] = accuracy
    assert gates_on_classes(_context(LoadedRecipe(Recipe.model_validate(raw), None, raw))) is classes


def test_a_pass_run_without_a_recipe_keeps_the_classifier_check() -> None:
    assert gates_on_classes(_context(None))
    assert gates_on_classes(_context(SimpleNamespace(resolve=lambda p: p)))


def test_output_cosine_per_sample_and_over_the_eval_set_for_one_value() -> None:
    reference = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]], np.float32)
    candidate = np.array([[1.0, 1.0], [0.0, 5.0], [-3.0, -4.0]], np.float32)
    cosine = output_cosine(reference, candidate)
    assert cosine["cosine_over"] == "sample"
    assert cosine["cosine_min"] == -1.0
    assert cosine["cosine_mean"] == pytest.approx((2 ** -0.5 + 1 - 1) / 3)
    # One value per sample (a regression): a per-sample cosine would be the sign only. Over the eval samples,
    # centred on the reference's mean, a faithful output scores near 1 and a constant one 0.
    target = np.linspace(100.0, 110.0, 50).reshape(50, 1)
    faithful = output_cosine(target, target + np.random.default_rng(0).normal(0, 0.05, target.shape))
    assert faithful["cosine_over"] == "eval set" and faithful["cosine_mean"] > 0.999
    constant = {"samples": 50}
    record_cosine(constant, target, np.full_like(target, target.mean()), minimum=DEFAULT_MIN_COSINE)
    assert constant["cosine_mean"] == 0.0
    with pytest.raises(GateFailed, match=r"^stage 'int8': the regressor's outputs have a mean cosine similarity "
                                         r"\(over the eval samples\) of only 0\.0000 to its input's on 50 eval "
                                         r"samples \(min_cosine 0\.98\); hint$"):
        check_cosine(constant, "int8", "the regressor's", "its input's", "hint")


def test_cosine_below_its_minimum_is_a_one_line_gate_failure_naming_the_stage() -> None:
    reference = np.eye(4, dtype=np.float32)
    candidate = reference + 0.5 * np.roll(reference, 1, axis=1)
    fidelity = {"top1_agreement": 1.0, "samples": 4}
    record_cosine(fidelity, reference, candidate, minimum=DEFAULT_MIN_COSINE)
    assert fidelity["top1_gated"] is False and fidelity["min_cosine"] == 0.98
    assert fidelity["cosine_mean"] == pytest.approx(1 / 1.25 ** 0.5)
    with pytest.raises(GateFailed) as caught:
        check_cosine(fidelity, "int8", "the INT8 model's", "its FP32 input's", "lower min_cosine")
    assert caught.value.exit_code == EXIT_GATE_FAILED
    message = str(caught.value)
    assert "\n" not in message
    assert message == ("stage 'int8': the INT8 model's outputs have a mean cosine similarity (per sample) of only "
                       "0.8944 to its FP32 input's on 4 eval samples (lowest 0.8944; min_cosine 0.98); lower "
                       "min_cosine")
    check_cosine({**fidelity, "min_cosine": 0.8}, "int8", "x", "y", "z")   # at or above: nothing raised
    # 0 turns the gate off, even for outputs that point away from the input's.
    check_cosine({**fidelity, "cosine_mean": -0.5, "min_cosine": 0.0}, "int8", "x", "y", "z")


def test_cosine_figures_appear_in_the_report_notes() -> None:
    from optimizer.report.rows import notes
    from tests.test_metrics import _cosine_report

    report = _cosine_report()
    report["stages"][2]["details"] = {"fidelity": {
        "max_abs_diff": 0.087, "max_rel_diff": 4e4, "top1_agreement": 0.8933, "samples": 300,
        "reference": "the FP32 input (onnxruntime)", "cosine_mean": 0.99673, "cosine_min": 0.93164,
        "cosine_over": "sample", "top1_gated": False, "min_cosine": 0.98}}
    note = next(n for n in notes(report) if n.startswith("Stage 'int8' fidelity"))
    assert note.endswith("max rel diff 4.00e+04, mean cosine similarity 0.9967 (lowest 0.9316).")


# ------------------------------------------------------------------------------------------ passes


def _recipe(model: Path, stages: list[dict], accuracy: dict | None = None, eval_samples: int = 600) -> dict:
    """The example's ONNX export scored with ``accuracy`` (its logits then read as an embedding), no budget:
    only the passes' own checks can stop the run."""
    recipe = quickstart_dict(model, eval_samples=eval_samples)
    del recipe["model"]["factory"], recipe["model"]["kwargs"]
    recipe["evaluate"]["accuracy"] = accuracy or COSINE
    recipe["budget"] = {}
    recipe["stages"] = stages
    return recipe


def test_classifier_int8_gate_records_no_cosine(example_onnx: Path, tmp_path: Path) -> None:
    report = run_recipe(_recipe(example_onnx, [{"name": "int8", "pass": "quantize.ort"}], {"metric": "top1"}),
                        out=tmp_path / "o")
    fidelity = report.stage("int8")["details"]["fidelity"]
    assert fidelity["min_top1_agreement"] == 0.9 and fidelity["top1_agreement"] >= 0.97
    assert not {"cosine_mean", "cosine_min", "min_cosine", "top1_gated"} & set(fidelity)


def test_embedding_int8_gate_ignores_top1_and_holds_the_cosine(example_onnx: Path, tmp_path: Path) -> None:
    """Every top-1 class asked to agree, which fails a classifier's INT8 (test_passes): under cosine agreement
    the arg-max is only recorded, and the outputs' cosine to the FP32 input's (0.9999 here) passes."""
    stages = [{"name": "int8", "pass": "quantize.ort", "with": {"min_top1_agreement": 1.0}}]
    report = run_recipe(_recipe(example_onnx, stages), out=tmp_path / "o")
    int8 = report.stage("int8")
    assert int8["status"] == "ok"
    fidelity = int8["details"]["fidelity"]
    assert fidelity["top1_agreement"] < 1 and fidelity["top1_gated"] is False
    assert fidelity["min_cosine"] == DEFAULT_MIN_COSINE and fidelity["cosine_mean"] > 0.999
    assert fidelity["cosine_over"] == "sample" and fidelity["samples"] == 512


def test_embedding_int8_with_broken_calibration_exits_4_on_the_cosine(example_onnx: Path, tmp_path: Path) -> None:
    """Calibration images without the model's normalization: the cosine of the INT8 outputs to FP32's falls to
    about 0.43, far below the default 0.98, and the stage fails with one line naming it."""
    from tests.test_end_to_end import run_cli

    recipe = _recipe(example_onnx, [{"name": "int8", "pass": "quantize.nncf", "with": {"subset_size": 300}}])
    del recipe["data"]["calibration"]["mean"], recipe["data"]["calibration"]["std"]
    result = run_cli("run", str(write_recipe(tmp_path, recipe)), "--out", str(tmp_path / "out"))
    assert result.returncode == EXIT_GATE_FAILED, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("optimizer: error: stage 'int8': the INT8 model's outputs have a mean cosine "
                           "similarity (per sample) of only "), last
    assert "min_cosine 0.98" in last and "top-1" not in last
    stage = json.loads((tmp_path / "out" / "report.json").read_text())["stages"][-1]
    assert stage["name"] == "int8" and stage["status"] == "failed"
    assert stage["details"]["fidelity"]["cosine_mean"] < 0.9


def test_embedding_openvino_compile_gates_on_the_cosine(example_onnx: Path, tmp_path: Path) -> None:
    """bf16 moves the arg-max of a few logits in a thousand (no elementwise check at reduced precision): with
    every top-1 class of 2,000 asked to agree the stage passes under cosine agreement; asking for a cosine of
    exactly 1 fails it."""
    pytest.importorskip("openvino", reason="OpenVINO is not installed: pip install 'optimizer[openvino]'")
    settings = {"precision_hint": "bf16", "min_top1_agreement": 1.0, "verify_samples": 2000}
    stages = [{"name": "ov", "pass": "compile.openvino", "with": settings}]
    report = run_recipe(_recipe(example_onnx, stages, eval_samples=2000), out=tmp_path / "a")
    fidelity = report.stage("ov")["details"]["fidelity"]
    assert not fidelity["elementwise_checked"] and fidelity["top1_gated"] is False
    assert fidelity["top1_agreement"] < 1           # what a classifier's gate would have failed on
    assert fidelity["cosine_mean"] > 0.999 and fidelity["min_cosine"] == DEFAULT_MIN_COSINE
    stages = [{"name": "ov", "pass": "compile.openvino", "with": {**settings, "min_cosine": 1.0}}]
    with pytest.raises(GateFailed) as caught:
        run_recipe(_recipe(example_onnx, stages, eval_samples=2000), out=tmp_path / "b")
    assert caught.value.exit_code == EXIT_GATE_FAILED
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("stage 'ov': OpenVINO's outputs have a mean cosine similarity (per sample) of only ")
    assert message.endswith("min_cosine 1); try precision_hint f32 or lower min_cosine")
