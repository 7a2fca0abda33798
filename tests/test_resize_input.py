"""resize.input (issue 14): a model served at another input resolution, with every later stage measuring and
working on the data loaded at that size, on the Fashion-MNIST example model and real test images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import quickstart_dict

QUICK = {"mode": "quick", "trials": 1, "warmup_s": 0.0, "min_iterations": 10, "min_duration_s": 0.0,
         "max_duration_s": 5.0}


def _recipe(checkpoint: Path, stages: list[dict]) -> dict:
    recipe = quickstart_dict(checkpoint, eval_samples=300)
    recipe["data"]["eval"]["resize"] = 28
    recipe["data"]["calibration"].update(samples=128, resize=28)
    recipe["evaluate"]["latency"].update(QUICK)
    recipe["stages"] = stages
    recipe["budget"] = {"accuracy_drop": 1.0}  # trained at 28×28, the model loses about 20 points at 20×20
    return recipe


def test_resize_input_serves_the_model_at_another_size_and_later_stages_see_the_data_there(
        example_checkpoint: Path, tmp_path: Path) -> None:
    import onnx
    import torch

    from optimizer import run_recipe
    from optimizer.artifact import Artifact
    from optimizer.data.datasets import load_dataset
    from optimizer.recipe import Recipe
    from optimizer.runtimes.torch_eager import load_torch_module

    recipe = _recipe(example_checkpoint, [{"name": "small", "pass": "resize.input", "with": {"size": 20}},
                                          {"name": "export", "pass": "export.onnx"}])
    report = run_recipe(recipe, out=tmp_path / "out")
    stages = {s["name"]: s for s in report.data["stages"]}
    small = Artifact.load(tmp_path / "out" / "artifacts" / "small")
    assert small.inputs[0].shape == [1, 1, 20, 20]
    graph = onnx.load(str(tmp_path / "out" / "artifacts" / "export" / "model.onnx"), load_external_data=False).graph
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim][2:] == [20, 20]
    # Fewer MACs by the ratio of the areas, for a network whose cost is in its convolutions.
    assert stages["small"]["macs"] < stages["baseline"]["macs"] * (24 / 28) ** 2
    # The stage's accuracy is the model's on the 300 eval images loaded at 20×20 from the source images.
    spec = Recipe.model_validate(recipe).data.eval.model_copy(update={"resize": 20})
    images = load_dataset(spec, inputs=small.inputs, base_dir=tmp_path, seed=0, where="test")
    with torch.no_grad():
        logits = load_torch_module(small)(torch.from_numpy(images.inputs["images"])).numpy()
    expected = float((logits.argmax(1) == images.labels).mean())
    assert stages["small"]["accuracy"]["value"] == pytest.approx(expected, abs=1e-9)
    assert stages["export"]["accuracy"]["value"] == pytest.approx(expected, abs=2 / 300)
    assert stages["small"]["accuracy"]["value"] != stages["baseline"]["accuracy"]["value"]


def test_resize_input_refuses_what_it_cannot_serve_before_a_run(example_checkpoint: Path, tmp_path: Path) -> None:
    from optimizer import run_recipe
    from optimizer.errors import RecipeError

    recipe = _recipe(example_checkpoint, [{"name": "small", "pass": "resize.input", "with": {"size": 20}}])
    del recipe["data"]["eval"]["resize"]
    with pytest.raises(RecipeError, match=r"stages\.0 \(small\): resize\.input loads data\.eval again at 20×20 .*"
                                          r"add resize to data\.eval") as caught:
        run_recipe(recipe, out=tmp_path / "out")
    assert caught.value.exit_code == 2 and not (tmp_path / "out").exists()
    recipe = _recipe(example_checkpoint, [{"name": "small", "pass": "resize.input", "with": {"size": 4}}])
    with pytest.raises(RecipeError, match=r"size"):
        run_recipe(recipe, out=tmp_path / "out")
