"""The frugal settings of distill.kd / finetune: cache_teacher, train_only and max_minutes.

Most tests call :func:`optimizer.training.train` directly, on real Fashion-MNIST samples and the zoo's
``small_resnet``, so that they can hook the teacher and compare weights tensor by tensor; a few go through
the pass (in one process and in two) to check the configuration and what the stage's details record.
Every model is a ``small_resnet`` of width 8 (a ninth of the default's compute: these tests run on two
shared cores). The teacher is trained here for 24 steps (about 30 % top-1 on the selection set, three
times chance): enough for the distillation term to mean something and for a ruined model to score
clearly below it.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from optimizer.data.datasets import ArrayData, load_fashion_mnist_split
from optimizer.errors import RecipeError
from optimizer.recipe import FashionMnistData
from optimizer.training import DistInfo, KDSettings, TrainingConfig, TrainResult, _evaluate, train
from optimizer.zoo import small_resnet
from tests.conftest import FASHION_ROOT

# 512 training samples, 8 steps an epoch at batch 64; selection on 200 other training samples.
BATCH = 64
WIDTH = 8
BASE = {"batch_size": BATCH, "eval_samples": 200}


@pytest.fixture(scope="module")
def arrays() -> tuple[ArrayData, ArrayData]:
    """(train, selection): disjoint seeded samples of the real Fashion-MNIST train split, normalized."""
    spec = FashionMnistData(dataset="fashion-mnist", split="train", root=str(FASHION_ROOT), samples=712,
                            mean=[0.2860], std=[0.3530])
    images, labels = load_fashion_mnist_split(spec, Path("."), 0, where="test")
    labels = labels.astype(np.int64)
    return (ArrayData({"images": images[:512]}, labels[:512]),
            ArrayData({"images": images[512:]}, labels[512:]))


@pytest.fixture(scope="module")
def teacher(arrays) -> torch.nn.Module:
    """A small_resnet trained with cross-entropy for 24 steps (seeded): well above chance."""
    torch.manual_seed(1)
    model = small_resnet(width=WIDTH)
    train_data, selection = arrays
    cfg = TrainingConfig(steps=24, batch_size=BATCH, lr=1e-2, eval_every=24)
    result = train(model, train_data, selection, cfg, seed=1, dist_info=DistInfo())
    assert result.final_selection_acc > 0.25, result.history
    return model.eval()


@pytest.fixture
def student() -> torch.nn.Module:
    torch.manual_seed(0)
    return small_resnet(width=WIDTH)


def run(student: torch.nn.Module, arrays, teacher=None, *, cache: bool = False, seed: int = 0,
        **settings) -> TrainResult:
    train_data, selection = arrays
    kd = KDSettings(cache_teacher=cache) if teacher is not None else None
    return train(student, train_data, selection, TrainingConfig(**{**BASE, **settings}), seed=seed,
                 teacher=teacher, kd=kd, dist_info=DistInfo())


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class SampleCounter:
    """Counts the samples a module's forward sees (a forward pre-hook on the whole model)."""

    def __init__(self, module: torch.nn.Module):
        self.samples = self.calls = 0
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, inputs) -> None:
        if not isinstance(inputs[0], torch.Tensor):  # torch.fx tracing the model (cache_frozen_prefix)
            return
        self.calls += 1
        self.samples += int(inputs[0].shape[0])


# ------------------------------------------------------------------------------------ cache_teacher


def test_cache_teacher_trains_the_same_weights_and_runs_the_teacher_once_per_sample(arrays, teacher,
                                                                                    student) -> None:
    """12 steps of 64 cross an epoch boundary: uncached, the teacher sees 768 samples; cached, each of the
    512 training samples exactly once, before training, and the trained weights are the same."""
    settings = {"steps": 12, "eval_every": 6, "lr": 3e-3}
    trained, seen, results = {}, {}, {}
    for cache in (False, True):
        model = copy.deepcopy(student)
        counter = SampleCounter(teacher)
        try:
            results[cache] = run(model, arrays, teacher, cache=cache, **settings)
        finally:
            counter.handle.remove()
        trained[cache], seen[cache] = state(model), counter.samples
    assert seen[False] == 12 * BATCH
    assert seen[True] == len(arrays[0]) == 512
    cached, uncached = results[True], results[False]
    assert cached.teacher_cache_seconds is not None and cached.teacher_cache_seconds > 0
    assert uncached.teacher_cache_seconds is None
    # Exact up to float rounding (the cache is computed in other batch shapes than the steps).
    for name, tensor in trained[False].items():
        assert torch.allclose(trained[True][name].float(), tensor.float(), rtol=1e-4, atol=1e-5), name
    assert [h["step"] for h in cached.history] == [h["step"] for h in uncached.history] == [0, 6, 12]
    assert cached.best_step == uncached.best_step
    for a, b in zip(cached.history[1:], uncached.history[1:]):
        assert a["kd_loss"] == pytest.approx(b["kd_loss"], rel=1e-4, abs=1e-6)
    assert teacher.training is False


def test_cache_teacher_refuses_feature_layers_in_one_line() -> None:
    from optimizer.passes.distill import DistillConfig

    with pytest.raises(ValidationError) as caught:
        DistillConfig(cache_teacher=True, feature_layers=[{"student": "layer1", "teacher": "layer1"}])
    message = next(e["msg"] for e in caught.value.errors())
    assert "cache_teacher" in message and "feature_layers" in message and "\n" not in message
    DistillConfig(cache_teacher=True)
    DistillConfig(feature_layers=[{"student": "layer1", "teacher": "layer1"}])


# --------------------------------------------------------------------------------------- train_only


def test_train_only_freezes_the_rest_and_keeps_frozen_batchnorm_statistics(arrays, teacher) -> None:
    """Only layer3 and fc train; every other parameter and every frozen BatchNorm buffer is bit-identical.

    The student is the teacher with its classifier zeroed (it predicts class 0 everywhere): with the
    teacher's features in place, four steps on layer3 and fc beat that, so the trained state is the one
    model selection keeps, and the check sees it.
    """
    student = copy.deepcopy(teacher).requires_grad_(True)
    with torch.no_grad():
        student.fc.weight.zero_()
        student.fc.bias.zero_()
    before = state(student)
    result = run(student, arrays, teacher, cache=True, steps=4, eval_every=4, lr=1e-2,
                 train_only=[r"^layer3\.", r"^fc\."])
    after = state(student)
    trained = {n for n, _ in student.named_parameters() if n.startswith(("layer3.", "fc."))}
    params = dict(student.named_parameters())
    assert result.trained_parameters == sum(params[n].numel() for n in trained)
    assert result.total_parameters == sum(p.numel() for p in params.values()) > result.trained_parameters
    assert result.best_step == 4, "the check needs the trained state, not the incoming one"
    for name in before:
        if name in trained:
            assert not torch.equal(before[name], after[name]), f"{name} should have trained"
        elif name.startswith(("layer3.", "fc.")):  # buffers of the BatchNorms that train
            if name.endswith(("running_mean", "running_var")):
                assert not torch.equal(before[name], after[name]), f"{name} should have been updated"
        else:  # frozen parameters and the statistics of frozen BatchNorms
            assert torch.equal(before[name], after[name]), f"{name} should be unchanged"
    # requires_grad is given back as it was.
    assert all(p.requires_grad for p in student.parameters())


def test_train_only_pattern_matching_nothing_is_a_one_line_error(arrays, student) -> None:
    with pytest.raises(RecipeError) as caught:
        run(student, arrays, steps=2, train_only=[r"^fc\.", r"classifier\.weight"])
    message = str(caught.value)
    assert "train_only pattern 'classifier\\\\.weight' matches no parameter" in message
    assert message.startswith("training") and "\n" not in message
    with pytest.raises(ValidationError, match=r"train_only: '\(fc' is not a regular expression"):
        TrainingConfig(train_only=["(fc"])


# -------------------------------------------------------------------------------------- max_minutes


def test_max_minutes_stops_early_and_keeps_the_best_selection_state(arrays, teacher) -> None:
    """A budget of 60 ms ends a 40-step run after its first step. That step, at an absurd learning rate,
    ruins the (good) incoming model, so the best selection state is the incoming one, and it is what the
    model holds afterwards."""
    model = copy.deepcopy(teacher)
    model.requires_grad_(True)  # train() froze the teacher's parameters when other tests distilled from it
    before = state(model)
    result = run(model, arrays, steps=40, eval_every=20, optimizer="sgd", lr=50.0, schedule="constant",
                 warmup_fraction=0.0, max_minutes=1e-7)
    assert result.budget_stopped and result.budget_stop_step == result.steps == 1
    assert not result.stopped_early  # that flag is patience's
    history = result.history
    assert [h["step"] for h in history] == [0, 1], "the stop evaluates the selection set once more"
    assert history[1]["eval_acc"] < history[0]["eval_acc"]
    assert result.best_step == 0 and result.best_eval_acc == history[0]["eval_acc"] == result.final_selection_acc
    after = state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert _evaluate(model, arrays[1], ["images"], DistInfo()) == result.best_eval_acc


def test_without_a_budget_nothing_is_recorded_as_stopped(arrays, student) -> None:
    result = run(student, arrays, steps=2, eval_every=2, max_minutes=60)
    assert not result.budget_stopped and result.budget_stop_step is None and result.steps == 2


# ------------------------------------------------------------------------------------ through the pass


@pytest.fixture(scope="module")
def pass_context(teacher, tmp_path_factory):
    """PassContexts over a baseline holding the trained teacher, and a damaged copy as the student."""
    from optimizer.baseline import make_baseline
    from optimizer.data.provider import DataProvider
    from optimizer.passes.base import PassContext
    from optimizer.progress import Progress
    from optimizer.recipe import load_recipe
    from tests.test_distill import Damage, recipe_with

    root = tmp_path_factory.mktemp("frugal")
    checkpoint = root / "teacher.safetensors"
    save_file({k: v.contiguous().clone() for k, v in teacher.state_dict().items()}, str(checkpoint))
    recipe = recipe_with(checkpoint, [{"name": "kd", "pass": "distill.kd"}], eval_samples=200)
    recipe["model"]["kwargs"]["width"] = WIDTH
    loaded = load_recipe(recipe)
    baseline = make_baseline(loaded, root / "baseline").finalize()
    data = DataProvider(loaded, list(loaded.recipe.model.inputs))
    counter = iter(range(1000))

    def make(stage: str = "kd") -> PassContext:
        work = root / f"{stage}-{next(counter)}"
        work.mkdir()
        return PassContext(stage=stage, work_dir=work, recipe=loaded, data=data, progress=Progress(quiet=True),
                           threads=1, seed=0, artifacts={"baseline": baseline})

    damaged = Damage({"noise": 0.5}).run(baseline, make("damaged")).finalize()
    return make, damaged


FRUGAL = {"teacher": "@baseline", "train_samples": 512, "batch_size": BATCH, "eval_samples": 200,
          "cache_teacher": True, "train_only": [r"^layer3\.", r"^fc\."]}


@pytest.mark.parametrize("processes, prefix", [(1, False), (2, False), (1, True), (2, True)])
def test_the_pass_records_cache_trained_parameters_and_budget(pass_context, processes: int, prefix: bool) -> None:
    """In one process and under DDP (two processes, gloo), with and without the frozen front cached: frozen
    weights stay, and the details say so."""
    from tests.test_distill import run_pass

    make, damaged = pass_context
    ctx = make()
    result = run_pass("distill.kd", {**FRUGAL, "steps": 30, "eval_every": 15, "max_minutes": 1e-7,
                                     "processes": processes, "cache_frozen_prefix": prefix}, ctx, damaged)
    training = ctx.details["training"]
    assert (training["prefix_cache_seconds"] is not None) == prefix
    if prefix:
        assert training["prefix_cache_seconds"] > 0 and training["prefix_bytes_per_sample"] > 0
    assert training["world_size"] == processes
    assert training["teacher_cache_seconds"] > 0
    assert 0 < training["trained_parameters"] < training["total_parameters"]
    assert training["budget_stopped"] and training["budget_stop_step"] == training["steps"] == 1
    assert [h["step"] for h in training["history"]] == [0, 1]
    before, after = load_file(str(damaged.entry_path)), load_file(str(result.entry_path))
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith(("layer3.", "fc.")))


def _cache_on_rank(rank: int, world: int, store: str, images: np.ndarray, weights: dict, out: str) -> None:
    """One rank of test_the_teacher_cache_is_sharded_and_gathered_in_sample_order (spawned)."""
    import torch.distributed as dist

    from optimizer.training import _teacher_cache

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = small_resnet(width=WIDTH)
        model.load_state_dict(weights)
        model.eval()
        info = DistInfo(rank=rank, world_size=world)
        cache = _teacher_cache(model, {"images": torch.from_numpy(images)}, ["images"], info,
                               layout=torch.channels_last, batch_size=16)
        if rank == 0:
            torch.save(cache, out)
    finally:
        dist.destroy_process_group()


def test_the_teacher_cache_is_sharded_and_gathered_in_sample_order(arrays, teacher, tmp_path) -> None:
    """Two gloo ranks each compute half of 101 samples (one padded row); rank 0 gets all, in order."""
    import torch.multiprocessing as mp

    images = np.ascontiguousarray(arrays[0].inputs["images"][:101])
    weights = {k: v.contiguous().clone() for k, v in teacher.state_dict().items()}
    out = tmp_path / "cache.pt"
    mp.spawn(_cache_on_rank, args=(2, str(tmp_path / "store"), images, weights, str(out)), nprocs=2)
    gathered = torch.load(out)
    with torch.no_grad():
        expected = teacher.eval()(torch.from_numpy(images))
    assert gathered.shape == (101, 10)
    assert torch.allclose(gathered, expected, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------- cache_frozen_prefix


def test_cache_frozen_prefix_trains_the_same_weights_and_runs_the_front_once(arrays, teacher) -> None:
    """layer3 and fc train; with the cache the stem and layers 1-2 see each sample once (training and
    selection sets, plus one probe batch of two), without it every step and every evaluation runs them;
    the trained weights and the selection history are the same. (The stem conv is counted: a leaf module,
    which the traced front calls as a module.)"""
    settings = {"steps": 12, "eval_every": 6, "lr": 3e-3, "train_only": [r"^layer3\.", r"^fc\."]}
    trained, seen, results = {}, {}, {}
    for cache in (False, True):
        model = copy.deepcopy(teacher).requires_grad_(True)
        counter = SampleCounter(model.stem[0])
        try:
            results[cache] = run(model, arrays, teacher, cache=True, cache_frozen_prefix=cache, **settings)
        finally:
            counter.handle.remove()
        trained[cache], seen[cache] = state(model), counter.samples
    train_samples, selection_samples = len(arrays[0]), len(arrays[1])
    assert seen[True] == train_samples + selection_samples + 2
    assert seen[False] >= 12 * BATCH + 3 * selection_samples
    cached, uncached = results[True], results[False]
    assert cached.prefix_cache_seconds is not None and cached.prefix_cache_seconds > 0
    assert cached.prefix_bytes_per_sample > 0 and uncached.prefix_cache_seconds is None
    for name, tensor in trained[False].items():
        assert torch.allclose(trained[True][name].float(), tensor.float(), rtol=1e-4, atol=1e-5), name
    assert [h["eval_acc"] for h in cached.history] == pytest.approx([h["eval_acc"] for h in uncached.history])
    assert cached.best_step == uncached.best_step


class _BatchSizeReshape(torch.nn.Module):
    """The trained head's output is reshaped with the batch size read in the front (an int, not a tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.front = torch.nn.Conv2d(1, 4, 3, stride=4)
        self.head = torch.nn.Linear(4 * 7 * 7, 10)

    def forward(self, x):
        return self.head(self.front(x).flatten(1)).reshape(x.shape[0], 10)


class _TrainingBranch(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.front = torch.nn.Conv2d(1, 4, 3, stride=4)
        self.head = torch.nn.Linear(4 * 7 * 7, 10)

    def forward(self, x):
        h = self.front(x).flatten(1)
        if self.training:
            h = h * 0.5
        return self.head(h)


@pytest.mark.parametrize("model, reason", [(_BatchSizeReshape, "not one row per sample"),
                                           (_TrainingBranch, "another path in training")])
def test_cache_frozen_prefix_refuses_a_model_it_cannot_split_in_one_line(arrays, model, reason) -> None:
    with pytest.raises(RecipeError) as caught:
        run(model(), arrays, steps=2, train_only=[r"^head\."], cache_frozen_prefix=True)
    message = str(caught.value)
    assert reason in message and "cache_frozen_prefix" in message and "\n" not in message


def test_cache_frozen_prefix_needs_train_only() -> None:
    with pytest.raises(ValidationError) as caught:
        TrainingConfig(cache_frozen_prefix=True)
    assert "train_only" in next(e["msg"] for e in caught.value.errors())
