"""recover.batchnorm and recover.reconstruct on small_resnet with real Fashion-MNIST images.

The model is untrained (seeded), so these tests claim numbers about statistics and layer outputs, not
accuracy: the batch-norm statistics must become those of the data, and the refit layers must reproduce
the unpruned model's outputs better than before, on the calibration samples and on held-out images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from optimizer.artifact import Artifact
from optimizer.data.datasets import ArrayData, load_dataset
from optimizer.errors import StageError
from optimizer.passes.base import Pass, PassContext
from optimizer.passes.prune_structured import PruneStructured
from optimizer.passes.recover import RecoverBatchNorm, RecoverReconstruct
from optimizer.progress import Progress
from optimizer.recipe import FashionMnistData, InputSpec
from optimizer.runtimes.torch_eager import load_torch_module
from optimizer.testing import check_pass
from optimizer.torch_structure import save_module_weights
from tests.conftest import FASHION_ROOT, REPO

INPUTS = [InputSpec(name="images", shape=[1, 1, 28, 28])]
FACTORY = "optimizer.zoo:small_resnet"
# The layer2 shortcut keeps its 48 outputs while its input (the layer1 stream) loses half its channels:
# a pruned 1x1 consumer (stride 2) for recover.reconstruct, next to the classifier head `fc`.
PRUNING = {"ratio": 0.5, "ignore": {"names": ["layer2.0.shortcut.0"]}}


class _Data:
    """The part of DataProvider the passes read."""

    def __init__(self, calibration: ArrayData):
        self._data = calibration

    def eval(self) -> ArrayData:
        return self._data

    def calibration(self) -> ArrayData:
        return self._data

    def train(self) -> ArrayData:
        return self._data


def fashion(split: str, samples: int) -> ArrayData:
    spec = FashionMnistData(dataset="fashion-mnist", split=split, samples=samples, mean=[0.2860], std=[0.3530],
                            root=str(FASHION_ROOT))
    return load_dataset(spec, inputs=INPUTS, base_dir=REPO, seed=0, where=f"data.{split}")


def make_artifact(folder: Path, module: nn.Module, factory: str = FACTORY, kwargs: dict | None = None,
                  inputs: list[InputSpec] = INPUTS) -> Artifact:
    folder.mkdir(parents=True)
    save_module_weights(module, folder / "model.safetensors")
    return Artifact("torch", folder, "model.safetensors", inputs,
                    meta={"kind": "factory", "factory": factory, "kwargs": kwargs or {}}).finalize()


def run_pass(pass_: Pass, artifact: Artifact, data: ArrayData, work: Path,
             artifacts: dict[str, Artifact] | None = None) -> tuple[Artifact, dict]:
    """run() with a minimal context, as the runner calls it; returns the finalized artifact and the details."""
    work.mkdir(parents=True)
    ctx = PassContext(stage=work.name, work_dir=work, recipe=None, data=_Data(data),  # type: ignore[arg-type]
                      progress=Progress(quiet=True), threads=2, seed=0, artifacts=dict(artifacts or {}))
    return pass_.run(artifact, ctx).finalize(), ctx.details


def relative_mse(ours: nn.Module, theirs: nn.Module, layer: str, images: np.ndarray) -> float:
    """||y - y_ref||^2 / ||y_ref||^2 of one layer's output in two models, over all positions."""
    captured: dict[str, torch.Tensor] = {}
    handles = [ours.get_submodule(layer).register_forward_hook(lambda m, a, out: captured.__setitem__("ours", out)),
               theirs.get_submodule(layer).register_forward_hook(lambda m, a, out: captured.__setitem__("ref", out))]
    try:
        with torch.no_grad():
            x = torch.from_numpy(images)
            ours(x), theirs(x)
    finally:
        for handle in handles:
            handle.remove()
    y, ref = captured["ours"].double(), captured["ref"].double()
    return float(((y - ref) ** 2).sum() / (ref ** 2).sum())


@pytest.fixture(scope="module")
def calibration() -> ArrayData:
    return fashion("train", 128)


@pytest.fixture(scope="module")
def pruned_pair(calibration: ArrayData, tmp_path_factory) -> tuple[Artifact, Artifact]:
    """(unpruned, pruned) small_resnet; both with batch-norm statistics measured on the calibration images
    (an untrained model's defaults, mean 0 and variance 1, would make every later figure meaningless)."""
    from optimizer.zoo import small_resnet

    root = tmp_path_factory.mktemp("recover")
    torch.manual_seed(0)
    untrained = make_artifact(root / "untrained", small_resnet())
    baseline, _ = run_pass(RecoverBatchNorm({"batches": 4}), untrained, calibration, root / "baseline")
    pruned, _ = run_pass(PruneStructured(PRUNING), baseline, calibration, root / "prune")
    recalibrated, _ = run_pass(RecoverBatchNorm({"batches": 4}), pruned, calibration, root / "prune_bn")
    return baseline, recalibrated


# ------------------------------------------------------------------------------------------ recover.batchnorm


def test_batchnorm_statistics_become_those_of_the_data(calibration: ArrayData, tmp_path: Path) -> None:
    from optimizer.zoo import small_resnet

    torch.manual_seed(0)
    source = make_artifact(tmp_path / "source", small_resnet())
    result, details = run_pass(RecoverBatchNorm({"batches": 4, "batch_size": 32}), source, calibration,
                               tmp_path / "bn")
    info = details["batchnorm"]
    assert info["layers"] == 9 and info["samples"] == 128 and info["batches"] == 4
    assert info["mean_abs_change_running_mean"] > 0 and info["mean_abs_change_running_var"] > 0
    assert result.meta == source.meta

    before, after = load_torch_module(source), load_torch_module(result)
    with torch.no_grad():  # the first BN reads the stem convolution's output, which the pass does not change
        pre = after.stem[0](torch.from_numpy(calibration.inputs["images"])).double()
    bn = after.stem[1]
    # Four equal batches: the cumulative average of batch means is the mean over all 128 images.
    np.testing.assert_allclose(bn.running_mean.double().numpy(), pre.mean((0, 2, 3)).numpy(), rtol=1e-4, atol=1e-5)
    # The average of per-batch variances: close to, not exactly, the variance over all images.
    np.testing.assert_allclose(bn.running_var.double().numpy(), pre.var((0, 2, 3)).numpy(), rtol=0.1)
    assert not torch.allclose(before.stem[1].running_mean, bn.running_mean)
    assert int(bn.num_batches_tracked) == 4 and bn.momentum == 0.1  # a fresh load: momentum is not saved
    # Statistics only: every weight is unchanged.
    for (name, w0), (_, w1) in zip(before.named_parameters(), after.named_parameters()):
        assert torch.equal(w0, w1), name


def test_batchnorm_reads_the_split_it_is_given() -> None:
    assert RecoverBatchNorm().required_data() == ("calibration",)
    assert RecoverBatchNorm({"split": "train"}).required_data() == ("train",)
    with pytest.raises(ValueError):
        RecoverBatchNorm({"batch_size": 1})


def test_batchnorm_refuses_a_model_without_batchnorm_and_a_program(tmp_path: Path) -> None:
    inputs = [InputSpec(name="x", shape=[1, 4])]
    linear = make_artifact(tmp_path / "linear", nn.Linear(4, 3), "torch.nn:Linear",
                           {"in_features": 4, "out_features": 3}, inputs)
    data = ArrayData({"x": np.zeros((8, 4), np.float32)}, np.zeros(8, np.int64))
    with pytest.raises(StageError, match=r"stage 'bn': recover\.batchnorm found no BatchNorm layer"):
        run_pass(RecoverBatchNorm(), linear, data, tmp_path / "bn")
    program = Artifact("torch", tmp_path, "model.pt2", inputs, meta={"kind": "program"})
    with pytest.raises(StageError, match="this one is kind 'program'"):
        run_pass(RecoverBatchNorm(), program, data, tmp_path / "bn2")


def test_batchnorm_keeps_the_contract(tmp_path: Path) -> None:
    from optimizer.zoo import small_resnet

    torch.manual_seed(0)
    source = make_artifact(tmp_path / "source", small_resnet())
    report = check_pass(RecoverBatchNorm, {"batches": 2, "batch_size": 16}, source=source.path,
                        work_dir=tmp_path / "check")
    assert report.ok, str(report)
    assert report.result("declared-data").detail == "read calibration"
    assert report.result("repeatable").detail == "identical files"


# ------------------------------------------------------------------------------------------ recover.reconstruct


def test_reconstruction_lowers_the_consumers_error(pruned_pair, calibration: ArrayData, tmp_path: Path) -> None:
    baseline, pruned = pruned_pair
    # max_rows above the rows there are (128 x 14 x 14 for the shortcut): the figures cover every position,
    # so they can be checked against a direct measurement below.
    result, details = run_pass(RecoverReconstruct({"samples": 128, "max_rows": 10**6}), pruned, calibration,
                               tmp_path / "reconstruct", {"baseline": baseline})
    info = details["reconstruction"]
    layers = {layer["name"]: layer for layer in info["layers"]}
    assert list(layers) == ["layer2.0.shortcut.0", "fc"]  # forward order; auto mode found both consumers
    assert info["skipped"] == []
    shortcut, fc = layers["layer2.0.shortcut.0"], layers["fc"]
    assert (shortcut["in_channels_before"], shortcut["in_channels_after"], shortcut["out_channels"]) == (24, 12, 48)
    assert (fc["in_channels_before"], fc["in_channels_after"], fc["out_channels"]) == (96, 48, 10)
    assert shortcut["rows"] == 128 * 14 * 14 and fc["rows"] == 128
    for layer in layers.values():
        assert layer["relative_mse_after"] < 0.5 * layer["relative_mse_before"], layer
    assert fc["relative_mse_after"] < 0.1 * fc["relative_mse_before"], fc
    assert info["output_relative_mse_after"] < 0.1 * info["output_relative_mse_before"], info

    reference, before, after = load_torch_module(baseline), load_torch_module(pruned), load_torch_module(result)
    images = calibration.inputs["images"]
    # The reported figures are what the models compute (fc's "before" is measured after the shortcut's
    # refit, the model the fc refit starts from, so only its "after" is compared here).
    measured = {"shortcut before": relative_mse(before, reference, "layer2.0.shortcut.0", images),
                "shortcut after": relative_mse(after, reference, "layer2.0.shortcut.0", images),
                "fc after": relative_mse(after, reference, "fc", images)}
    reported = {"shortcut before": shortcut["relative_mse_before"], "shortcut after": shortcut["relative_mse_after"],
                "fc after": fc["relative_mse_after"]}
    assert measured == pytest.approx(reported, rel=1e-4)

    # On held-out images (the test split) the refit layers still match the unpruned model better.
    held_out = fashion("test", 256).inputs["images"]
    for name in ("layer2.0.shortcut.0", "fc"):
        was, now = relative_mse(before, reference, name, held_out), relative_mse(after, reference, name, held_out)
        assert now < 0.5 * was, (name, was, now)
    assert result.meta == pruned.meta  # the structure patch travels on
    assert after.fc.in_features == 48 and after.layer2[0].shortcut[0].in_channels == 12


def test_patterns_choose_layers_and_pruned_outputs_are_skipped(pruned_pair, calibration: ArrayData,
                                                               tmp_path: Path) -> None:
    baseline, pruned = pruned_pair
    config = {"layers": [r"shortcut\.0$"], "samples": 32, "max_rows": 2000}
    _, details = run_pass(RecoverReconstruct(config), pruned, calibration, tmp_path / "r", {"baseline": baseline})
    info = details["reconstruction"]
    assert [layer["name"] for layer in info["layers"]] == ["layer2.0.shortcut.0"]
    assert info["layers"][0]["rows"] == 2000  # subsampled from 32 x 14 x 14 positions
    assert [s["name"] for s in info["skipped"]] == ["layer3.0.shortcut.0"]  # its 96 outputs became 48
    assert "outputs were pruned too (48 of 96)" in info["skipped"][0]["reason"]


@pytest.mark.parametrize(("layers", "message"), [
    (["layer1.0.conv1"], r"layer 'layer1\.0\.conv1' is a Conv2d \(kernel 3x3, groups 1\), which cannot be refit "
                         r"in closed form; recover\.reconstruct refits nn\.Linear and 1x1 nn\.Conv2d"),
    (["layer2.0.shortcu.0"], r"no module 'layer2\.0\.shortcu\.0'.*did you mean 'layer2\.0\.shortcut\.0'"),
    ([r"\.bn\d$"], r"matches no nn\.Linear and 1x1 nn\.Conv2d with groups 1 \(it matches layer1\.0\.bn1"),
])
def test_layers_it_cannot_refit_are_named(pruned_pair, calibration: ArrayData, tmp_path: Path, layers: list[str],
                                          message: str) -> None:
    baseline, pruned = pruned_pair
    with pytest.raises(StageError, match=message):
        run_pass(RecoverReconstruct({"layers": layers}), pruned, calibration, tmp_path / "r", {"baseline": baseline})


def test_depthwise_convolution_is_named_with_its_groups(tmp_path: Path) -> None:
    from torchvision.models import mobilenet_v2

    torch.manual_seed(0)
    kwargs = {"width_mult": 0.25, "num_classes": 10}
    inputs = [InputSpec(name="images", shape=[1, 3, 32, 32])]
    source = make_artifact(tmp_path / "m", mobilenet_v2(**kwargs), "torchvision.models:mobilenet_v2", kwargs, inputs)
    data = ArrayData({"images": np.zeros((4, 3, 32, 32), np.float32)}, np.zeros(4, np.int64))
    with pytest.raises(StageError, match=r"layer 'features\.2\.conv\.1\.0' is a Conv2d \(kernel 3x3, groups 48, "
                                         r"depthwise\)"):
        run_pass(RecoverReconstruct({"layers": ["features.2.conv.1.0"]}), source, data, tmp_path / "r",
                 {"baseline": source})


def test_nothing_pruned_means_nothing_to_refit(pruned_pair, calibration: ArrayData, tmp_path: Path) -> None:
    baseline, _ = pruned_pair
    with pytest.raises(StageError, match="no pruned 1x1 conv or Linear consumer"):
        run_pass(RecoverReconstruct(), baseline, calibration, tmp_path / "r", {"baseline": baseline})


def test_reference_is_a_stage_reference() -> None:
    assert RecoverReconstruct().stage_references() == ("baseline",)
    assert RecoverReconstruct({"reference": "@prune"}).stage_references() == ("prune",)
    assert RecoverReconstruct().required_data() == ("calibration",)
    for bad in ("baseline", "@"):
        with pytest.raises(ValueError, match="reference must be"):
            RecoverReconstruct({"reference": bad})
    with pytest.raises(ValueError, match="neither a module name nor a valid regular expression"):
        RecoverReconstruct({"layers": ["fc("]})


def test_reconstruct_keeps_the_contract(pruned_pair, tmp_path: Path) -> None:
    baseline, pruned = pruned_pair
    # check_pass runs the pass on `source` and calls it 'baseline' in ctx.artifacts, so the unpruned model
    # goes in under another name.
    report = check_pass(RecoverReconstruct, {"reference": "@unpruned", "samples": 32, "max_rows": 2000},
                        source=pruned.path, artifacts={"unpruned": baseline.path}, work_dir=tmp_path / "check")
    assert report.ok, str(report)
    assert report.result("declared-data").detail == "read calibration"
    assert report.result("repeatable").detail == "identical files"
