"""Accuracy metrics beyond top-1 (evaluate.accuracy.metric): top5 on the trained example, a python:module:function
metric on a regression made from Fashion-MNIST images, the statistics behind them (bootstrap interval and sign-flip
permutation test for scores that are not 0/1; Wilson and McNemar when they are), the reports naming the metric,
and one-line errors for a bad metric."""

from __future__ import annotations

import copy
import itertools
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from optimizer import run_recipe
from optimizer.errors import OptimizerError, RecipeError
from optimizer.measure import metrics as m
from optimizer.measure.accuracy import bootstrap_interval, mcnemar, sign_flip_test, wilson_interval
from optimizer.recipe import load_recipe
from tests.conftest import FASHION_ROOT, quickstart_dict, write_recipe

# ------------------------------------------------------------------------------------------ statistics


def test_bootstrap_interval_is_seeded_and_covers_the_mean_about_95_percent() -> None:
    rng = np.random.default_rng(1)
    values = rng.exponential(size=300)
    assert bootstrap_interval(values, seed=3) == bootstrap_interval(values, seed=3)
    low, high = bootstrap_interval(values, seed=3)
    assert low < values.mean() < high
    # Coverage of the true mean (1 for an exponential) over repeated draws: close to the nominal 95 %.
    covered = 0
    for _ in range(200):
        sample = rng.exponential(size=200)
        low, high = bootstrap_interval(sample, seed=int(rng.integers(1 << 30)), resamples=1000)
        covered += low <= 1.0 <= high
    assert 0.88 <= covered / 200 <= 0.99
    assert bootstrap_interval(np.full(50, 0.7), seed=0) == (0.7, 0.7)


def test_sign_flip_test_matches_the_exact_permutation_distribution() -> None:
    rng = np.random.default_rng(2)
    reference = rng.normal(size=12)
    candidate = reference + rng.normal(0.3, 1.0, size=12)
    d = candidate - reference
    # Every one of the 2**12 sign patterns: the exact two-sided p-value the Monte Carlo test estimates.
    flips = np.array(list(itertools.product((-1, 1), repeat=12)))
    exact = float(np.mean(np.abs((flips * d).mean(axis=1)) >= abs(d.mean()) * (1 - 1e-9)))
    result = sign_flip_test(reference, candidate, seed=0, resamples=20_000)
    assert result["test"] == "sign-flip" and result["mean_difference"] == pytest.approx(d.mean())
    assert result["p_value"] == pytest.approx(exact, abs=0.01)
    low, high = result["difference_ci95"]
    assert low < d.mean() < high


def test_sign_flip_test_identical_scores_and_a_clear_loss() -> None:
    scores = np.linspace(0.2, 0.9, 500)
    same = sign_flip_test(scores, scores, seed=0)
    assert same["p_value"] == 1.0 and not same["significant"] and same["difference_ci95"] == [0.0, 0.0]
    worse = sign_flip_test(scores, scores - 0.01 - 0.001 * np.cos(np.arange(500)), seed=0)
    assert worse["significant"] and worse["p_value"] == pytest.approx(1 / 2001)
    assert worse["difference_ci95"][1] < 0


def test_scores_of_zero_or_one_keep_wilson_and_mcnemar() -> None:
    """A python: metric whose scores are right-or-wrong is a proportion: Wilson interval and McNemar's test,
    as for top-1; one with other scores gets the bootstrap interval and the sign-flip test."""
    metric = m.Metric("python:tests.test_metrics:unused")
    base = np.array([1.0] * 90 + [0.0] * 10)
    stage = np.array([1.0] * 80 + [0.0] * 17 + [1.0] * 3)
    record = m.summarize(metric, stage, seed=0)
    assert record["interval"] == "wilson" and record["correct"] == 83
    assert record["ci95"] == list(wilson_interval(83, 100))
    assert m.paired_test(metric, base, stage, seed=0) == mcnemar(base.astype(bool), stage.astype(bool))
    graded = stage * 0.5
    record = m.summarize(metric, graded, seed=0)
    assert record["interval"] == "bootstrap" and "correct" not in record
    assert m.paired_test(metric, base, graded, seed=0)["test"] == "sign-flip"


def test_top1_record_is_unchanged_and_agreement_scores_against_the_baseline() -> None:
    logits = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.3, 0.2, 0.5], [0.0, 0.0, 1.0]], np.float32)
    labels = np.array([1, 0, 0, 2])
    predictions = logits.argmax(-1)
    top1 = m.Metric()
    scores = m.sample_scores(top1, predictions=predictions, kept=None, labels=labels, reference=None)
    assert m.summarize(top1, scores, seed=0) == {"metric": "top1", "value": 0.75, "n": 4, "correct": 3,
                                                 "ci95": list(wilson_interval(3, 4))}
    agreement = m.Metric("agreement")
    assert m.sample_scores(agreement, predictions=predictions, kept=None, labels=labels,
                           reference=None).tolist() == [1, 1, 1, 1]        # the baseline agrees with itself
    assert m.sample_scores(agreement, predictions=predictions, kept=None, labels=labels,
                           reference=np.array([1, 0, 0, 0])).tolist() == [1, 1, 0, 0]
    cosine = m.Metric("agreement", "cosine")
    kept = m.kept_from_batch(cosine, logits)
    turned = kept * np.array([[2.0], [1.0], [1.0], [1.0]]) - np.array([[0, 0, 0], [0, 0, 0], [0, 0, 0], [1.0, 0, 0]])
    cos = m.sample_scores(cosine, predictions=predictions, kept=turned, labels=labels, reference=kept)
    assert cos[:3] == pytest.approx([1.0, 1.0, 1.0]) and cos[3] == pytest.approx(1 / np.sqrt(2))
    record = m.summarize(cosine, np.ones(4), seed=0)
    assert record["interval"] == "bootstrap" and record["agreement"] == "cosine" and record["ci95"] == [1.0, 1.0]


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("spec", ["top-5", "accuracy", "python:no_function", "python:os.path"])
def test_a_bad_metric_is_a_one_line_recipe_error_naming_the_field(example_checkpoint: Path, spec: str) -> None:
    recipe = quickstart_dict(example_checkpoint)
    recipe["evaluate"]["accuracy"]["metric"] = spec
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe)
    message = str(info.value)
    assert "evaluate.accuracy.metric" in message and "\n" not in message
    assert "top1, top5, agreement or python:module:function" in message


def test_settings_that_do_not_fit_the_metric_are_refused(example_checkpoint: Path) -> None:
    recipe = quickstart_dict(example_checkpoint)
    recipe["evaluate"]["accuracy"].update(metric="top1", agreement="cosine")
    with pytest.raises(RecipeError, match=r"evaluate\.accuracy: 'agreement' applies to metric 'agreement'"):
        load_recipe(recipe)
    recipe["evaluate"]["accuracy"] = {"metric": "top5", "higher_is_better": False}
    with pytest.raises(RecipeError, match="applies to a python: metric"):
        load_recipe(recipe)
    # A share of samples cannot drop by more than all of it; a python: metric's budget is in its own units.
    recipe["evaluate"]["accuracy"] = {"metric": "top5"}
    recipe["budget"]["accuracy_drop"] = 2.5
    with pytest.raises(RecipeError, match=r"budget\.accuracy_drop: 2\.5 is more than all of metric 'top5'"):
        load_recipe(recipe)
    recipe["evaluate"]["accuracy"] = {"metric": "python:math:dist"}
    assert load_recipe(recipe).recipe.budget.accuracy_drop == 2.5


def test_an_unimportable_metric_fails_validation_with_one_line(example_checkpoint: Path, tmp_path: Path) -> None:
    from optimizer.validate import validate_recipe

    recipe = quickstart_dict(example_checkpoint)
    for spec, expected in (("python:no_such_module_here:score", "cannot import module"),
                           ("python:math:no_such_function", "has no attribute"), ("python:math:pi", "not callable")):
        recipe["evaluate"]["accuracy"]["metric"] = spec
        with pytest.raises(RecipeError) as info:
            validate_recipe(load_recipe(write_recipe(tmp_path, recipe)))
        assert "evaluate.accuracy.metric" in str(info.value) and expected in str(info.value)
        assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------ top5, end to end


def test_top5_on_the_trained_example(example_checkpoint: Path, tmp_path: Path) -> None:
    """Baseline and ONNX export scored by top-5 on 1,000 test images; checked against the model's own logits."""
    import torch

    from optimizer.data.datasets import load_dataset
    from optimizer.models import build_architecture, load_weights, read_state_dict

    recipe = quickstart_dict(example_checkpoint, eval_samples=1000)
    recipe["evaluate"]["accuracy"]["metric"] = "top5"
    recipe["stages"] = recipe["stages"][:1]
    report = run_recipe(write_recipe(tmp_path, recipe), out=tmp_path / "out")
    assert report.passed
    loaded = load_recipe(write_recipe(tmp_path, recipe))
    data = load_dataset(loaded.recipe.data.eval, inputs=list(loaded.recipe.model.inputs), base_dir=tmp_path,
                        seed=0, where="eval")
    model = build_architecture(loaded.recipe.model.factory, loaded.recipe.model.kwargs)
    load_weights(model, read_state_dict(example_checkpoint), where="checkpoint")
    with torch.inference_mode():
        logits = model.eval()(torch.from_numpy(data.inputs["images"])).numpy()
    in_top5 = (np.argsort(-logits, axis=1)[:, :5] == data.labels[:, None]).any(axis=1)
    top1 = float((logits.argmax(1) == data.labels).mean())
    for name in ("baseline", "export"):
        accuracy = report.stage(name)["accuracy"]
        assert accuracy["metric"] == "top5" and accuracy["name"] == "top-5" and accuracy["interval"] == "wilson"
        assert accuracy["n"] == 1000 and accuracy["correct"] == int(in_top5.sum())
        assert accuracy["ci95"] == pytest.approx(list(wilson_interval(accuracy["correct"], 1000)))
    assert report.stage("baseline")["accuracy"]["value"] > top1 > 0.85   # top-5 is above top-1, as it must be
    assert report.stage("export")["vs_baseline"]["accuracy_test"]["test"] == "mcnemar"
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "| top-5 % (95% CI) | Δ top-5 vs base |" in markdown and "top-1 %" not in markdown


# ------------------------------------------------------------------------------------------ python: metric


METRIC_MODULE = '''
"""A toy regression on Fashion-MNIST: predict the share of bright pixels from a 7x7 average-pooled image."""
import numpy as np
from torch import nn


def pooled_regressor():
    return nn.Sequential(nn.AvgPool2d(4), nn.Flatten(), nn.Linear(49, 1))


def absolute_error(outputs, labels):
    return np.abs(outputs.reshape(len(outputs)) - labels)


def one_score_for_all(outputs, labels):
    return float(np.abs(outputs.reshape(len(outputs)) - labels).mean())
'''


@pytest.fixture
def regression(tmp_path: Path, monkeypatch) -> dict:
    """Real images, a target computed from them, and a linear model fitted to it by least squares."""
    import torch
    from safetensors.torch import save_file

    from optimizer.data.idx import load_fashion_mnist

    (tmp_path / "regression_metric.py").write_text(textwrap.dedent(METRIC_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    images, _ = load_fashion_mnist(FASHION_ROOT, "test")
    x = (images[:1200].astype(np.float32) / 255.0)[:, None]
    target = (x > 0.5).mean(axis=(1, 2, 3)).astype(np.float32)   # share of bright pixels: not linear in the pools
    pooled = x.reshape(-1, 7, 4, 7, 4).mean(axis=(2, 4)).reshape(-1, 49)
    fit, held_out = slice(0, 800), slice(800, 1200)
    design = np.hstack([pooled[fit], np.ones((800, 1), np.float32)])
    coef, *_ = np.linalg.lstsq(design, target[fit], rcond=None)
    weights = {"2.weight": torch.from_numpy(coef[:49][None].astype(np.float32)),
               "2.bias": torch.from_numpy(coef[49:].astype(np.float32))}
    save_file(weights, str(tmp_path / "regressor.safetensors"))
    np.savez(tmp_path / "eval.npz", x=x[held_out], y=target[held_out])
    predictions = np.hstack([pooled[held_out], np.ones((400, 1), np.float32)]) @ coef
    recipe = {
        "name": "regression-metric", "seed": 0,
        "model": {"factory": "regression_metric:pooled_regressor", "checkpoint": "regressor.safetensors",
                  "input": {"name": "images", "shape": [1, 1, 28, 28], "dtype": "float32"}},
        "data": {"eval": {"dataset": "npz", "path": "eval.npz"}},
        "evaluate": {"accuracy": {"metric": "python:regression_metric:absolute_error", "higher_is_better": False},
                     "latency": {"mode": "quick"}},
        "budget": {"accuracy_drop": 0.01},
        "stages": [{"name": "export", "pass": "export.onnx", "with": {"opset": 18}}],
    }
    return {"folder": tmp_path, "recipe": recipe, "errors": np.abs(predictions - target[held_out])}


def test_python_metric_gets_a_bootstrap_interval_and_a_paired_test(regression: dict) -> None:
    folder, recipe = regression["folder"], regression["recipe"]
    report = run_recipe(write_recipe(folder, recipe), out=folder / "out")
    assert report.passed
    base, export = report.stage("baseline"), report.stage("export")
    errors = regression["errors"]
    for stage in (base, export):
        accuracy = stage["accuracy"]
        assert accuracy["metric"] == "python:regression_metric:absolute_error" and accuracy["name"] == "absolute_error"
        assert accuracy["interval"] == "bootstrap" and accuracy["higher_is_better"] is False
        assert "correct" not in accuracy and accuracy["n"] == 400
        assert accuracy["value"] == pytest.approx(errors.mean(), abs=1e-5)   # the model, run by the toolkit
        scores = np.load(folder / "out" / "measurements" / stage["name"] / "scores.npy")
        assert accuracy["ci95"] == pytest.approx(list(bootstrap_interval(scores, seed=0)))
        assert accuracy["ci95"][0] < accuracy["value"] < accuracy["ci95"][1]
    test = export["vs_baseline"]["accuracy_test"]
    assert test["test"] == "sign-flip" and test["resamples"] == 2000 and 0 < test["p_value"] <= 1
    # The budget counts a rise of a lower-is-better metric as the drop, in the metric's own units.
    assert export["budget"]["drop"] == pytest.approx(export["accuracy"]["value"] - base["accuracy"]["value"])
    markdown = (folder / "out" / "report.md").read_text()
    assert "| absolute_error (95% CI) | Δ absolute_error vs base |" in markdown and "top-1" not in markdown
    assert "sign-flip permutation test" in markdown


def test_python_metric_that_returns_one_number_fails_the_stage_naming_the_field(regression: dict) -> None:
    folder, recipe = regression["folder"], copy.deepcopy(regression["recipe"])
    recipe["evaluate"]["accuracy"]["metric"] = "python:regression_metric:one_score_for_all"
    with pytest.raises(OptimizerError) as info:
        run_recipe(write_recipe(folder, recipe), out=folder / "out")
    message = str(info.value)
    assert "evaluate.accuracy.metric" in message and "one float per sample (shape [400])" in message
    assert "\n" not in message


def test_float_labels_stay_floats_and_class_labels_stay_int64(regression: dict) -> None:
    from optimizer.data.datasets import label_array

    folder = regression["folder"]
    with np.load(folder / "eval.npz") as archive:
        targets = archive["y"]
    assert label_array(targets, where="t").dtype == np.float32
    assert label_array(np.array([3.0, 1.0]), where="t").dtype == np.int64      # whole numbers: classes, as before
    assert label_array(np.array([[2], [5]], np.int32), where="t").tolist() == [2, 5]


# ------------------------------------------------------------------------------------------ reports


def _cosine_report() -> dict:
    from tests.test_report_html import synthetic_report

    report = synthetic_report(optional=True)
    for k, (stage, value) in enumerate(zip(report["stages"], (1.0, 0.9999998, 0.9931, 0.9712))):
        stage["accuracy"] = {"metric": "agreement", "value": value, "n": 300, "ci95": [value - 0.001 * k, min(1, value + 0.001 * k)],
                             "name": "cosine agreement", "interval": "bootstrap", "agreement": "cosine",
                             "higher_is_better": True}
    for stage in report["stages"][1:]:
        delta = stage["accuracy"]["value"] - 1.0
        for change in (stage["vs_baseline"], stage["vs_previous"]):
            change["accuracy_delta"] = delta
        stage["vs_baseline"]["accuracy_test"] = {"test": "sign-flip", "mean_difference": delta, "resamples": 2000,
                                                 "difference_ci95": [delta * 1.1, delta * 0.9], "p_value": 1 / 2001,
                                                 "significant": True}
        stage["budget"] = {"accuracy_drop": 0.02, "drop": -delta}
    return report


def test_every_rendering_names_the_metric_instead_of_top1(tmp_path: Path) -> None:
    from rich.console import Console

    from optimizer.report.html import render_html
    from optimizer.report.markdown import render_markdown
    from optimizer.report.terminal import stage_table

    report = _cosine_report()
    markdown = render_markdown(report)
    assert "| cosine agreement (95% CI) | Δ cosine agreement vs base | Δ cosine agreement vs prev |" in markdown
    assert "| 0.9931 (0.9911–0.9951) | -0.0069 (p=0.0005) |" in markdown
    assert "-2.0e-07" in markdown                          # an export's change is not hidden as +0.0000
    assert "Accuracy: cosine agreement 0.9931 (95 % bootstrap CI" in markdown
    page = render_html(report)
    assert "cosine agreement<small>95% CI</small>" in page and "cosine agreement change" in page
    assert "cosine agreement against p50 latency" in page
    table, notes = stage_table(report)
    console = Console(width=250, record=True)
    console.print(table)
    text = console.export_text()
    assert "cosine agreement" in text
    for rendering in (markdown, page, text, " ".join(notes)):
        assert "top-1" not in rendering and "Top-1" not in rendering
    json.dumps(report)   # the report stays plain JSON


def test_top1_reports_read_as_before() -> None:
    from optimizer.report.markdown import render_markdown
    from tests.test_report_html import synthetic_report

    markdown = render_markdown(synthetic_report(optional=True))
    assert "| top-1 % (95% CI) | Δ top-1 vs base | Δ top-1 vs prev |" in markdown
    assert "Δ top-1 is in points; p is McNemar's exact test" in markdown
    assert "Accuracy: top-1 91.10 % (95 % CI" in markdown


def test_shipped_embedding_recipe_names_cosine_agreement() -> None:
    from tests.conftest import REPO

    raw = yaml.safe_load((REPO / "recipes" / "minilm_embedding_agreement_int8_openvino.yaml").read_text())
    accuracy = load_recipe(raw).recipe.evaluate.accuracy
    assert (accuracy.metric, accuracy.agreement, accuracy.is_fraction) == ("agreement", "cosine", False)
