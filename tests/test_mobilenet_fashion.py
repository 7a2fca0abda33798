"""MobileNetV2-Fashion example (weights loaded safely, data as the recipes feed it) and the workloads benchmark."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from optimizer.errors import InputRejected
from tests.conftest import REPO

BENCHMARK = REPO / "benchmarks" / "workloads.py"
MOBILENET_RECIPE = REPO / "recipes" / "cpu_openvino_int8_mobilenet.yaml"


@pytest.fixture
def imagenet_weights() -> Path:
    """The weights file; missing, the test fails with the install line (scripts/install.sh installs it)."""
    from optimizer.examples.mobilenet_fashion import imagenet_weights_path

    try:
        return imagenet_weights_path()
    except InputRejected as exc:
        pytest.fail(str(exc), pytrace=False)


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_workloads", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_workloads"] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------- model


def test_factory_loads_imagenet_weights_with_weights_only(imagenet_weights, monkeypatch):
    import torch

    from optimizer.examples import mobilenet_fashion as mf

    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    model = mf.mobilenet_v2_fashion(num_classes=10, pretrained=True)
    assert calls and all(kwargs.get("weights_only") is True for kwargs in calls)

    state = real_load(str(mf.imagenet_weights_path()), map_location="cpu", weights_only=True)
    loaded = model.state_dict()
    # The backbone is ImageNet's, bit for bit; the head is new, with 10 outputs.
    for key in ("features.0.0.weight", "features.18.1.running_var", "features.9.conv.1.0.weight"):
        assert torch.equal(loaded[key], state[key])
    assert tuple(loaded["classifier.1.weight"].shape) == (10, 1280)
    assert "classifier.1.weight" in state and tuple(state["classifier.1.weight"].shape) == (1000, 1280)


def test_weights_with_another_hash_are_refused_before_unpickling(tmp_path, monkeypatch):
    import torch

    from optimizer.examples import mobilenet_fashion as mf

    fake = tmp_path / "mobilenet_v2-b0353104.pth"
    torch.save({"x": torch.zeros(1)}, fake)  # a valid state dict, but not the pinned file
    monkeypatch.setenv(mf.WEIGHTS_ENV, str(fake))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load ran on an unverified file"))
    with pytest.raises(InputRejected, match="sha256"):
        mf.mobilenet_v2_fashion(pretrained=True)


def test_factory_without_weights_builds_the_head():
    from optimizer.examples.mobilenet_fashion import mobilenet_v2_fashion

    model = mobilenet_v2_fashion(num_classes=7)
    assert model.classifier[1].out_features == 7


# ----------------------------------------------------------------------------------------------- data


def test_preprocess_shape_and_imagenet_normalization():
    from optimizer.examples.mobilenet_fashion import IMAGENET_MEAN, IMAGENET_STD, preprocess

    images = np.zeros((2, 28, 28), np.uint8)
    images[1] = 255
    x = preprocess(images)
    assert x.shape == (2, 3, 224, 224) and x.dtype == np.float32
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    np.testing.assert_allclose(x[0].mean(axis=(1, 2)), -mean / std, atol=1e-5)
    np.testing.assert_allclose(x[1].mean(axis=(1, 2)), (1 - mean) / std, atol=1e-5)


def test_recipe_data_and_training_preprocessing_agree():
    """The recipe's data entry, data_spec() and preprocess() (what training used) give identical arrays."""
    from optimizer.data.idx import load_fashion_mnist
    from optimizer.examples.mobilenet_fashion import FashionMnist224, data_spec, preprocess
    from optimizer.recipe import load_recipe

    recipe = load_recipe(MOBILENET_RECIPE)
    eval_spec = recipe.recipe.data.eval.model_dump(exclude={"root"}, exclude_none=True)
    assert eval_spec == data_spec("test", samples=eval_spec["samples"])

    from optimizer.data.datasets import load_dataset

    small = load_recipe(MOBILENET_RECIPE, overrides=["data.eval.samples=4"])
    arrays = load_dataset(small.recipe.data.eval, inputs=list(small.recipe.model.inputs), base_dir=small.base_dir,
                          seed=small.recipe.seed, where="eval")
    assert arrays.inputs["images"].shape == (4, 3, 224, 224)

    from optimizer.data.datasets import draw_indices

    root = small.recipe.data.eval.root
    images, labels = load_fashion_mnist(Path(root), "test")
    index = draw_indices(len(labels), 4, small.recipe.seed, where="test")
    np.testing.assert_array_equal(arrays.inputs["images"], preprocess(images[index]))
    np.testing.assert_array_equal(arrays.labels, labels[index])

    item, label = FashionMnist224("test", root)[int(index[0])]
    np.testing.assert_array_equal(item, arrays.inputs["images"][0])
    assert label == labels[index[0]]


# ---------------------------------------------------------------------------------------------- benchmark


def test_benchmark_variants_are_valid_recipes(example_checkpoint):
    from optimizer.recipe import load_recipe

    bench = _load_benchmark()
    workload = next(w for w in bench.WORKLOADS if w.name == "fashion-resnet")
    for quick in (False, True):
        for variant in bench.VARIANTS:
            loaded = load_recipe(bench.variant_recipe(workload, variant, quick=quick))
            assert [s.pass_name for s in loaded.recipe.stages] == [p for _, p in variant.chain or (bench.EXPORT,)]
            assert loaded.recipe.budget.accuracy_drop is None
    # Both INT8 paths calibrate on the same number of samples.
    settings = bench.stage_settings(workload, quick=False)
    assert settings["quantize.ort"]["subset_size"] == settings["quantize.nncf"]["subset_size"]


def test_benchmark_skips_a_workload_it_cannot_run(tmp_path):
    bench = _load_benchmark()
    missing = bench.Workload(name="nothing", title="absent", recipe="recipes/does_not_exist.yaml")
    assert "does not exist" in bench.check_workload(missing, tmp_path)


@pytest.mark.slow  # about a minute; the fast suite must stay under 15 minutes (the workload checks above stay)
def test_benchmark_quick_smoke_on_the_builtin_workload(example_checkpoint, tmp_path):
    # 12 stages built, each measured in its own process, then 6 artifacts re-measured: 1-2 minutes on 2
    # busy cores (62 s at load 2.8, 104 s at load 9), under the 2-minute line for the slow marker.
    out = tmp_path / "bench"
    result = subprocess.run(
        [sys.executable, str(BENCHMARK), "--workloads", "fashion-resnet", "--quick", "--trials", "1",
         "--out", str(out)],
        capture_output=True, text=True, timeout=900, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Environment:" in result.stdout and "QUICK MODE" in result.stdout
    data = json.loads((out / "workloads.json").read_text())
    variants = {v["variant"]: v for v in data["workloads"]["fashion-resnet"]["variants"]}
    assert set(variants) == {"eager", "ort-fp32", "ort-int8", "nncf-ir-ov", "recipe-int8-ov", "recipe-pdq-ov",
                             "recipe-latency-prune-ov"}
    # The built-in workload has no latency-pruning recipe: the variant is listed as skipped, with the reason.
    assert "no latency-allocated pruning recipe" in variants["recipe-latency-prune-ov"]["skipped"]
    for name, entry in variants.items():
        if name == "recipe-latency-prune-ov":
            continue
        assert entry["skipped"] is None, (name, entry["skipped"])
        assert entry["p50_ms"] > 0 and 0 <= entry["top1"] <= 1
    assert variants["eager"]["speedup_vs_eager"][0] == pytest.approx(1.0)
    assert (out / "fashion-resnet.svg").read_text().lstrip().startswith("<?xml")
