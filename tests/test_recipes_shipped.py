"""Every recipe under recipes/ validates (schema, pass options, form chain, data reachable) and says what it is for.

A recipe whose checkpoint has not been trained on this machine (the MobileNetV2 and MiniLM examples take
15-20 minutes each) is validated with a stand-in file at the checkpoint's path: everything but the weights is
checked, and `optimizer validate` checks the real file where it exists.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from optimizer.recipe import load_recipe
from optimizer.validate import validate_recipe
from tests.conftest import REPO

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def test_the_recipes_the_docs_promise_are_there() -> None:
    names = {path.stem for path in RECIPES}
    assert {"quickstart", "cpu_openvino_int8", "prune_distill_int8", "prune_distill_int8_openvino",
            "minilm_sentiment_int8", "minilm_accuracy_controlled_int8", "gpu_tensorrt_fp16",
            "gpu_tensorrt_int8", "cpu_openvino_int8_mobilenet", "mobilenet_latency_prune_openvino",
            "minilm_latency_prune_openvino"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_has_a_comment_header(path: Path) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line)
    assert len(header) >= 2, f"{path.name}: start with a comment saying what the recipe is for and what it needs"


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_validates(path: Path, tmp_path: Path) -> None:
    loaded = load_recipe(path)
    checkpoint = loaded.recipe.model.checkpoint
    if checkpoint is not None and not loaded.resolve(checkpoint).is_file():
        stand_in = tmp_path / Path(checkpoint).name
        stand_in.write_bytes(b"")
        loaded = load_recipe(path, [f"model.checkpoint={stand_in}"])
    checks = {check.what: check.detail for check in validate_recipe(loaded)}
    assert checks["forms"].startswith("torch")
    assert "data.eval" in checks
