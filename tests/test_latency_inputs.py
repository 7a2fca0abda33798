"""Latency on the data's real inputs (evaluate.latency.inputs) and across input sizes (evaluate.latency.shapes).

The timed runtime is the real one (PyTorch eager on the example ResNet, trained on Fashion-MNIST); a thin
wrapper records what each timed call received, so the tests check which inputs were timed, never how fast.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import quickstart_dict

QUICK = {"mode": "quick", "trials": 1, "warmup_s": 0.0, "min_iterations": 10, "min_duration_s": 0.0,
         "max_duration_s": 5.0}


class Recording:
    """The real runtime, with every input it is handed kept (copied) for the test to read back."""

    def __init__(self, runtime) -> None:
        self.runtime = runtime
        self.seen: list[dict[str, np.ndarray]] = []

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        self.seen.append({name: np.array(array) for name, array in inputs.items()})
        return self.runtime.run(inputs)


@pytest.fixture(scope="module")
def eager_runtime(example_checkpoint: Path, tmp_path_factory):
    from optimizer.baseline import make_baseline
    from optimizer.recipe import load_recipe
    from optimizer.runtimes.base import open_runtime

    loaded = load_recipe(quickstart_dict(example_checkpoint))
    artifact = make_baseline(loaded, tmp_path_factory.mktemp("baseline") / "baseline").finalize()
    runtime = open_runtime(artifact, threads=1)
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def eval_images() -> dict[str, np.ndarray]:
    from optimizer.data.datasets import load_fashion_mnist_split
    from optimizer.recipe import FashionMnistData

    spec = FashionMnistData(dataset="fashion-mnist", split="test", samples=37, mean=[0.2860], std=[0.3530])
    x, _ = load_fashion_mnist_split(spec, Path("."), 0, where="data.eval")
    return {"images": x}


def _index_of(sample: np.ndarray, pool: np.ndarray) -> int:
    matches = np.flatnonzero((pool == sample).reshape(len(pool), -1).all(axis=1))
    assert len(matches) >= 1, "the timed runtime received an input that is no eval sample"
    return int(matches[0])


def test_eval_inputs_time_every_eval_sample_round_robin_in_a_seeded_order(eager_runtime, eval_images) -> None:
    from optimizer.measure.worker import time_latency

    recording = Recording(eager_runtime)
    latency, raw = time_latency(recording, eval_images, {**QUICK, "inputs": "eval"}, 1, seed=5)
    images = eval_images["images"]
    seen = [_index_of(s["images"][0], images) for s in recording.seen]
    assert all(s["images"].shape == (1, *images.shape[1:]) for s in recording.seen)
    # Warm-up and timed calls walk one permutation of the eval set, again and again.
    order = np.random.default_rng(5).permutation(len(images))
    assert seen == [int(order[i % len(images)]) for i in range(len(seen))]
    assert len(seen) > len(images) and set(seen) == set(range(len(images)))
    assert latency["inputs"] == "eval" and latency["input_samples"] == len(images)
    assert latency["batch_size"] == 1 and len(raw) == latency["iterations"]
    # Another seed, another order.
    other = Recording(eager_runtime)
    time_latency(other, eval_images, {**QUICK, "inputs": "eval"}, 1, seed=6)
    assert [_index_of(s["images"][0], images) for s in other.seen][:len(images)] != seen[:len(images)]


def test_fixed_inputs_time_one_batch_again_and_again(eager_runtime, eval_images) -> None:
    from optimizer.measure.worker import time_latency

    recording = Recording(eager_runtime)
    latency, _ = time_latency(recording, eval_images, QUICK, 1, seed=5)
    seen = {_index_of(s["images"][0], eval_images["images"]) for s in recording.seen}
    assert len(seen) == 1 and latency["inputs"] == "fixed" and "input_samples" not in latency


def test_eval_inputs_at_a_larger_batch_cycle_batches_of_eval_samples(eager_runtime, eval_images) -> None:
    from optimizer.measure.worker import time_latency

    recording = Recording(eager_runtime)
    latency, _ = time_latency(recording, eval_images, {**QUICK, "inputs": "eval"}, 4, seed=5)
    images = eval_images["images"]
    batches = [tuple(_index_of(row, images) for row in s["images"]) for s in recording.seen]
    assert all(len(b) == 4 for b in batches)
    distinct = sorted(set(batches))
    assert len(distinct) == len(images) // 4  # 9 batches of 4 from 37 samples, cycled
    assert len({i for b in distinct for i in b}) == 36 and latency["input_samples"] == 36


# ------------------------------------------------------------------------------------ input-size sweep


def _sweep_recipe(checkpoint: Path, **latency) -> dict:
    recipe = quickstart_dict(checkpoint, eval_samples=300)
    recipe["data"]["eval"]["resize"] = 28
    recipe["data"]["calibration"].update(samples=128, resize=28)
    recipe["evaluate"]["latency"].update(QUICK, **latency)
    return recipe


def test_a_size_a_static_artifact_cannot_take_fails_validation_with_exit_2(example_checkpoint: Path,
                                                                           tmp_path: Path) -> None:
    from optimizer import run_recipe
    from optimizer.errors import RecipeError

    # export.onnx then NNCF: a static 28×28 ONNX model, which the torch baseline is timed through too (runtime auto).
    recipe = _sweep_recipe(example_checkpoint, shapes=[20, 28])
    with pytest.raises(RecipeError) as caught:
        run_recipe(recipe, out=tmp_path / "out")
    message = str(caught.value)
    assert caught.value.exit_code == 2 and "\n" not in message
    assert message.startswith("evaluate.latency.shapes: stage 'baseline' is timed through a throwaway export on "
                              "onnxruntime")
    assert "static input shape [1, 1, 28, 28], which cannot take size 20; declare axes 2 and 3" in message
    assert not (tmp_path / "out").exists()  # refused before anything ran
    recipe["evaluate"]["latency"]["runtime"] = "native"
    with pytest.raises(RecipeError, match=r"^evaluate\.latency\.shapes: stage 'export' produces a onnx artifact with "
                                          r"the static input shape \[1, 1, 28, 28\], which cannot take size 20"):
        run_recipe(recipe, out=tmp_path / "out")
    # Declared dynamic axes lift the refusal; a size outside their bounds is refused in its turn.
    recipe["model"]["input"]["dynamic"] = {2: {"name": "h", "min": 20, "max": 32}, 3: {"name": "w", "min": 20, "max": 32}}
    from optimizer.recipe import load_recipe
    from optimizer.validate import validate_recipe

    checks = {c.what: c.detail for c in validate_recipe(load_recipe(recipe))}
    assert "declared dynamic" in checks["shape sweep"]
    recipe["evaluate"]["latency"]["shapes"] = [20, 40]
    with pytest.raises(RecipeError, match=r"^evaluate\.latency\.shapes\.1: 40 lies outside the declared dynamic "
                                          r"bounds 20\.\.32") as caught:
        validate_recipe(load_recipe(recipe))
    assert caught.value.exit_code == 2


def test_a_model_without_an_axis_to_sweep_fails_validation(example_checkpoint: Path) -> None:
    from optimizer.errors import RecipeError
    from optimizer.measure.shape_sweep import check_shapes
    from optimizer.recipe import Recipe

    recipe = _sweep_recipe(example_checkpoint, shapes=[16, 32])
    recipe["model"]["input"] = {"name": "input_ids", "shape": [1, 64], "dtype": "int64"}
    with pytest.raises(RecipeError, match=r"^evaluate\.latency\.shapes: the model declares no dynamic axis"):
        check_shapes(Recipe.model_validate(recipe), [("baseline", "torch")], None)
    recipe["model"]["input"]["dynamic"] = {1: {"name": "seq", "min": 8, "max": 128}}
    line = check_shapes(Recipe.model_validate(recipe), [("baseline", "torch"), ("export", "onnx")], None)
    assert "input_ids axes 1 (declared dynamic)" in line
    # BatchNorm re-estimation needs data the toolkit loads at each size, and an accuracy to change.
    recipe["evaluate"]["latency"]["shape_batchnorm"] = True
    with pytest.raises(RecipeError, match=r"^evaluate\.latency\.shape_batchnorm: needs eval and calibration data"):
        check_shapes(Recipe.model_validate(recipe), [("baseline", "torch")], None)
    recipe["evaluate"]["latency"]["shape_accuracy"] = False
    with pytest.raises(RecipeError, match=r"^evaluate\.latency\.shape_batchnorm: the statistics only change "):
        check_shapes(Recipe.model_validate(recipe), [("baseline", "torch")], None)


def test_sequence_inputs_are_cut_or_padded_to_each_size() -> None:
    from optimizer.measure.shape_sweep import SweptAxes, fit_arrays

    ids = np.arange(1, 13, dtype=np.int64).reshape(2, 6)
    axes = SweptAxes({"input_ids": (1,), "attention_mask": (1,)}, True, 1, 128)
    short = fit_arrays({"input_ids": ids, "attention_mask": np.ones_like(ids)}, axes, 4)
    assert short["input_ids"].tolist() == [[1, 2, 3, 4], [7, 8, 9, 10]] and short["attention_mask"].shape == (2, 4)
    long = fit_arrays({"input_ids": ids, "attention_mask": np.ones_like(ids)}, axes, 8)
    assert long["input_ids"][:, 6:].tolist() == [[0, 0], [0, 0]] and long["attention_mask"][:, 6:].sum() == 0
    assert long["input_ids"].flags.c_contiguous and long["input_ids"].dtype == np.int64


def test_batchnorm_statistics_are_re_estimated_for_a_size_then_put_back(eager_runtime) -> None:
    from optimizer.data.datasets import load_fashion_mnist_split
    from optimizer.measure.worker import _batchnorm_at
    from optimizer.passes.recover import batchnorm_layers
    from optimizer.recipe import FashionMnistData

    spec = FashionMnistData(dataset="fashion-mnist", split="train", samples=96, resize=40, mean=[0.2860], std=[0.3530])
    images, _ = load_fashion_mnist_split(spec, Path("."), 0, where="data.calibration")
    (name, layer), *_ = batchnorm_layers(eager_runtime.module)
    trained = layer.running_mean.clone()
    with _batchnorm_at(eager_runtime, {"images": images}) as done:
        assert done == "re-estimated on 96 data.calibration samples"
        assert not np.allclose(layer.running_mean.numpy(), trained.numpy())
        assert eager_runtime.run({"images": images[:2]}).shape == (2, 10)
    assert np.array_equal(layer.running_mean.numpy(), trained.numpy())
    with _batchnorm_at(eager_runtime, {}) as done:
        assert done is None


def test_each_size_stores_only_what_its_measurement_reads(example_checkpoint: Path, tmp_path: Path) -> None:
    from optimizer.data.provider import DataProvider
    from optimizer.measure.shape_sweep import LATENCY_SAMPLES, write_points
    from optimizer.recipe import load_recipe

    recipe = _sweep_recipe(example_checkpoint, shapes=[20], shape_batchnorm=True)
    recipe["data"]["calibration"]["samples"] = 700
    loaded = load_recipe(recipe)
    (point,) = write_points(loaded, DataProvider(loaded, loaded.recipe.model.inputs), tmp_path / "scored")
    with np.load(point["npz"]) as archive:
        assert point["accuracy"] and sorted(archive.files) == ["__bn__images", "__labels__", "images"]
        assert archive["images"].shape == (300, 1, 20, 20) and archive["__labels__"].shape == (300,)
        # BatchNorm re-estimation reads recover.batchnorm's 20 batches of 32: the rest of the 700 are not stored.
        assert archive["__bn__images"].shape == (640, 1, 20, 20)
    # Agreement scores nothing at a size (the baseline's outputs are at its own): a few samples to time, no labels.
    recipe["evaluate"]["accuracy"]["metric"] = "agreement"
    loaded = load_recipe(recipe)
    (point,) = write_points(loaded, DataProvider(loaded, loaded.recipe.model.inputs), tmp_path / "timed")
    with np.load(point["npz"]) as archive:
        assert not point["accuracy"] and archive.files == ["images"]
        assert archive["images"].shape == (min(300, LATENCY_SAMPLES), 1, 20, 20)


def test_shape_sweep_run_reports_latency_and_accuracy_per_size_in_every_format(example_checkpoint: Path,
                                                                                tmp_path: Path) -> None:
    """A torch chain (BatchNorm re-estimation as the stage) swept over three resolutions of real Fashion-MNIST,
    with latency on the eval samples in turn: JSON, Markdown and HTML all carry both."""
    from optimizer import run_recipe

    recipe = _sweep_recipe(example_checkpoint, shapes=[20, 28, 40], shape_batchnorm=True, inputs="eval",
                           runtime="native")
    recipe["stages"] = [{"name": "bn", "pass": "recover.batchnorm", "with": {"batches": 4}}]
    report = run_recipe(recipe, out=tmp_path / "out")
    for stage in report.data["stages"]:
        assert stage["latency"]["inputs"] == "eval" and stage["latency"]["input_samples"] == 300
        points = stage["shape_sweep"]
        assert [p["size"] for p in points] == [20, 28, 40]
        # Each point's shape is read from the arrays its timing was fed: every size was timed at that size.
        assert [p["shape"]["images"] for p in points] == [[1, 1, s, s] for s in (20, 28, 40)]
        for p in points:
            assert "error" not in p and p["p50_ms"] > 0 and p["p50_ci95_ms"][0] <= p["p50_ms"] <= p["p50_ci95_ms"][1]
            assert p["accuracy"]["n"] == 300 and 0 < p["accuracy"]["value"] <= 1 and p["inputs"] == "eval"
            assert p["batchnorm"] == "re-estimated on 128 data.calibration samples"
        # The model was trained at 28×28: that is where it is most accurate.
        assert points[1]["accuracy"]["value"] > max(points[0]["accuracy"]["value"], points[2]["accuracy"]["value"])
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "## Latency against input size" in markdown and "| stage | size 20 | size 28 | size 40 |" in markdown
    assert "real eval samples (300 distinct)" in markdown
    page = (tmp_path / "out" / "report.html").read_text()
    assert "<h2>Latency against input size</h2>" in page and 'aria-label="Latency against input size' in page


def test_a_stage_measured_by_two_processes_gets_accuracy_from_one_and_latency_from_the_other() -> None:
    from optimizer.measure.shape_sweep import merge_points

    scored = [{"size": 28, "shape": {"images": [1, 1, 28, 28]}, "accuracy": {"value": 0.9, "n": 10},
               "batchnorm": "re-estimated on 64 data.calibration samples"},
              {"size": 20, "shape": {"images": [1, 1, 20, 20]}, "accuracy": {"value": 0.8, "n": 10}}]
    timed = [{"size": 20, "shape": {"images": [1, 1, 20, 20]}, "p50_ms": 0.5, "accuracy": None},
             {"size": 28, "shape": {"images": [1, 1, 28, 28]}, "error": "refused"}]
    merged = merge_points(scored, timed)
    assert [p["size"] for p in merged] == [20, 28]
    assert merged[0]["accuracy"]["value"] == 0.8 and merged[0]["p50_ms"] == 0.5
    assert merged[1]["accuracy"]["value"] == 0.9 and merged[1]["error"] == "refused"
    assert merged[1]["batchnorm"].startswith("re-estimated")
    # The same refusal from both halves is said once.
    twice = merge_points([{"size": 20, "error": "refused"}], [{"size": 20, "error": "refused"}])
    assert twice == [{"size": 20, "error": "refused"}]


def test_a_torch_chain_timed_through_a_throwaway_export_is_told_how_to_sweep(example_checkpoint: Path) -> None:
    from optimizer.errors import RecipeError
    from optimizer.measure.shape_sweep import check_shapes
    from optimizer.recipe import Recipe

    recipe = Recipe.model_validate(_sweep_recipe(example_checkpoint, shapes=[20, 28]))
    forms = [("baseline", "torch"), ("bn", "torch")]
    with pytest.raises(RecipeError, match=r"stage 'baseline' is timed through a throwaway export on onnxruntime .*"
                                          r"or time the torch stages on PyTorch eager"):
        check_shapes(recipe, forms, "onnxruntime")
    assert "image resolution, torch stages only" in check_shapes(recipe, forms, None)


def test_batchnorm_per_size_under_agreement_is_refused_at_validation(example_checkpoint: Path) -> None:
    """Under metric: agreement a sweep scores no size, so re-estimated statistics would change nothing."""
    from optimizer.errors import RecipeError
    from optimizer.measure.shape_sweep import check_shapes
    from optimizer.recipe import Recipe

    raw = _sweep_recipe(example_checkpoint, shapes=[20, 28], shape_batchnorm=True, runtime="native")
    raw["evaluate"]["accuracy"] = {"metric": "agreement"}
    recipe = Recipe.model_validate(raw)
    with pytest.raises(RecipeError, match=r"^evaluate\.latency\.shape_batchnorm: .*metric: agreement.*drop "
                                          r"shape_batchnorm$"):
        check_shapes(recipe, [("baseline", "torch")], None)
