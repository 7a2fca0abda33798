"""Latency-allocated pruning: the solver on a toy network of known costs, the latency-table cache, the pass end
to end on the trained Fashion-MNIST example, and its errors.

Tests check behaviour (what was chosen, what was cached, what was reported), never wall-clock speed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from optimizer import run_recipe
from optimizer.errors import RecipeError
from optimizer.measure.latency_table import LatencyCache, Target
from optimizer.passes.latency_allocation import GroupCosts, Unreachable, allocate, predict
from optimizer.passes.prune_latency import TableBuilder, candidate_widths
from optimizer.passes.prune_structured import PruneStructuredConfig
from tests.conftest import quickstart_dict

# ------------------------------------------------------------------------------------------ the solver


def toy_groups() -> list[GroupCosts]:
    """Three groups whose per-width costs are known exactly.

    'cheap' saves a lot of time and carries little importance; 'precious' saves little and carries much;
    'flat' costs the same at every width (a runtime that pads to its SIMD width), so pruning it buys nothing.
    """
    return [
        GroupCosts("cheap", widths=[64, 48, 32, 16], ms=[4.0, 3.0, 2.0, 1.0], loss=[0.0, 1.0, 2.0, 3.0]),
        GroupCosts("precious", widths=[64, 48, 32, 16], ms=[2.0, 1.6, 1.2, 0.8], loss=[0.0, 10.0, 20.0, 30.0]),
        GroupCosts("flat", widths=[64, 48, 32, 16], ms=[1.0, 1.0, 1.0, 1.0], loss=[0.0, 0.5, 1.0, 1.5]),
    ]


def test_allocator_meets_the_target_on_known_costs() -> None:
    groups = toy_groups()
    base = 10.0  # the whole model: 7 ms in these blocks, 3 ms elsewhere
    result = allocate(groups, base, 7.5)
    assert result.predicted_ms <= 7.5
    assert result.predicted_ms == pytest.approx(predict(groups, base, {
        g.name: g.widths.index(result.widths[g.name]) for g in groups}))
    # The cheap group goes first (1 importance per ms); the precious one is untouched; the flat one is never
    # pruned, since that would lose importance for no time.
    assert result.widths == {"cheap": 16, "precious": 64, "flat": 64}


def test_allocator_reaches_deeper_targets_with_the_next_cheapest_group() -> None:
    groups = toy_groups()
    result = allocate(groups, 10.0, 6.6)
    assert result.predicted_ms <= 6.6
    assert result.widths["cheap"] == 16 and result.widths["precious"] < 64 and result.widths["flat"] == 64


def test_allocator_prefers_a_fine_cut_to_an_overshooting_coarse_one() -> None:
    # The coarse cut is cheaper per millisecond but saves far more than needed and loses more importance than
    # the fine cut that alone meets the target: a greedy rule takes the coarse one, the exact solver does not.
    groups = [GroupCosts("coarse", widths=[64, 32], ms=[5.0, 1.0], loss=[0.0, 3.0]),
              GroupCosts("fine", widths=[64, 56], ms=[2.0, 1.5], loss=[0.0, 1.0])]
    result = allocate(groups, 10.0, 9.6)
    assert result.predicted_ms <= 9.6
    assert result.widths == {"coarse": 64, "fine": 56} and result.importance_lost == 1.0


def test_unreachable_target_names_the_smallest_latency() -> None:
    with pytest.raises(Unreachable) as info:
        allocate(toy_groups(), 10.0, 5.0)
    assert info.value.smallest_ms == pytest.approx(10.0 - 3.0 - 1.2 - 0.0)


def test_candidate_widths_are_multiples_of_round_to() -> None:
    widths = candidate_widths(144, 8, 0.25, 6)
    assert widths[0] == 144 and widths == sorted(widths, reverse=True)
    assert all(w % 8 == 0 for w in widths) and min(widths) >= 36


def test_latency_config_needs_one_time_target() -> None:
    with pytest.raises(ValueError, match="exactly one target"):
        PruneStructuredConfig(allocation="latency")
    with pytest.raises(ValueError, match="exactly one target"):
        PruneStructuredConfig(allocation="latency", speedup=1.5, ratio=0.3)
    with pytest.raises(ValueError, match="needs allocation: latency"):
        PruneStructuredConfig(ratio=0.3, speedup=1.5)


# ------------------------------------------------------------------------------------------ the cache


class Block(nn.Module):
    """A MobileNetV2-like inverted residual body: expand 1x1, depthwise 3x3, project 1x1."""

    def __init__(self, channels: int = 16, hidden: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
                                  nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
                                  nn.BatchNorm2d(hidden), nn.ReLU6(), nn.Conv2d(hidden, channels, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def test_latency_table_is_cached_and_invalidated_by_runtime_precision_and_cpu(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(TableBuilder, "BUSY", float("inf"))  # store whatever the load of the test machine
    cache = LatencyCache(tmp_path / "tables")
    block = Block().eval()
    args = (torch.zeros(1, 16, 14, 14),)
    target = Target.here("onnxruntime", "fp32", 1)
    first = TableBuilder(target, cache, "test")
    times = first.times([("block", block, args)], lambda *a: None)
    assert first.timed == 1 and first.reused == 0 and times["block"] > 0

    again = TableBuilder(target, cache, "test")
    assert again.times([("block", block, args)], lambda *a: None) == times
    assert again.timed == 0 and again.reused == 1

    # A block of another width is another entry.
    narrower = TableBuilder(target, cache, "test")
    narrower.times([("block", Block(hidden=32).eval(), args)], lambda *a: None)
    assert narrower.timed == 1

    for changed in (dataclasses.replace(target, precision="int8"),
                    dataclasses.replace(target, runtime="openvino"),
                    dataclasses.replace(target, cpu=target.cpu + " (another CPU)")):
        other = TableBuilder(changed, cache, "test")
        other.times([("block", block, args)], lambda *a: None)
        assert other.timed == 1 and other.reused == 0, changed

    # Whole models are never read from the cache: a speedup is always two figures timed side by side.
    whole = TableBuilder(target, cache, "test")
    whole.times([("block", block, args)], lambda *a: None, fresh=frozenset({"block"}))
    assert whole.timed == 1 and whole.reused == 0


def test_openvino_block_keeps_its_inputs_after_the_callers_arrays_are_gone(tmp_path: Path) -> None:
    # The request outlives the arrays it was given: it must hold its own copy, not a view of freed memory.
    pytest.importorskip("openvino")
    import gc

    import numpy as np

    from optimizer.measure import latency_table_worker as worker
    from optimizer.measure.latency_table import export_for_timing

    args = (torch.randn(1, 16, 14, 14),)
    export_for_timing(Block().eval(), args, tmp_path / "block.onnx")
    expected = args[0].numpy().copy()
    inputs = {"in0": args[0].numpy().copy()}
    run = worker._openvino_runner(tmp_path / "block.onnx", inputs, 1)
    inputs["in0"][:] = 0  # the caller reuses or frees its array; the bound input must not change with it
    del inputs
    gc.collect()
    run()
    bound = np.array(run.__self__.get_input_tensor(0).data)
    np.testing.assert_array_equal(bound, expected)


def test_the_unpruned_anchor_is_timed_again_with_any_new_block(tmp_path: Path, monkeypatch) -> None:
    # A prediction adds block differences to the unpruned model's time: both must come from the same
    # conditions, so a cached anchor is used only with cached blocks.
    monkeypatch.setattr(TableBuilder, "BUSY", float("inf"))
    cache = LatencyCache(tmp_path / "tables")
    target = Target.here("onnxruntime", "fp32", 1)
    args = (torch.zeros(1, 16, 14, 14),)
    whole = nn.Sequential(Block(), Block()).eval()
    items = [("whole", whole, args), ("wide", Block().eval(), args)]
    first = TableBuilder(target, cache, "test")
    first.times(items, lambda *a: None, anchor="whole")
    assert first.timed == 2

    again = TableBuilder(target, cache, "test")
    again.times(items, lambda *a: None, anchor="whole")
    assert again.timed == 0 and again.reused == 2  # everything cached: the anchor too

    more = TableBuilder(target, cache, "test")
    more.times(items + [("narrow", Block(hidden=32).eval(), args)], lambda *a: None, anchor="whole")
    assert more.timed == 2 and more.reused == 1  # the new block and the anchor, side by side

    # Blocks cached without their anchor (timed by an earlier version, or as plain blocks): all timed again.
    alone = TableBuilder(target, cache, "test")
    alone.times([("other whole", nn.Sequential(Block()).eval(), args), ("wide", Block().eval(), args)],
                lambda *a: None, anchor="other whole")
    assert alone.timed == 2 and alone.reused == 0


def test_openvino_int8_table_times_a_block_on_its_real_inputs(tmp_path: Path, monkeypatch) -> None:
    # The timing worker binds each block's recorded inputs to an OpenVINO request; a tensor sharing the memory
    # of an array nobody kept alive crashed the worker (segmentation fault) on MobileNetV2 blocks.
    pytest.importorskip("openvino")
    monkeypatch.setattr(TableBuilder, "BUSY", float("inf"))
    builder = TableBuilder(Target.here("openvino", "int8", 1), LatencyCache(tmp_path / "tables"), "test")
    args = (torch.randn(1, 16, 14, 14),)
    times = builder.times([("wide", Block().eval(), args), ("narrow", Block(hidden=32).eval(), args)],
                          lambda *a: None)
    assert builder.timed == 2 and all(t > 0 for t in times.values())


def test_figures_timed_on_a_busy_machine_are_not_cached(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(TableBuilder, "BUSY", -1.0)  # any load counts as busy
    cache = LatencyCache(tmp_path / "tables")
    target = Target.here("onnxruntime", "fp32", 1)
    first = TableBuilder(target, cache, "test")
    first.times([("block", Block().eval(), (torch.zeros(1, 16, 14, 14),))], lambda *a: None)
    assert first.timed == 1 and first.not_stored == 1
    again = TableBuilder(target, cache, "test")
    again.times([("block", Block().eval(), (torch.zeros(1, 16, 14, 14),))], lambda *a: None)
    assert again.timed == 1 and again.reused == 0


# ------------------------------------------------------------------------------------------ end to end


def _latency_recipe(checkpoint: Path, prune_with: dict) -> dict:
    recipe = quickstart_dict(checkpoint, eval_samples=1000)
    recipe["budget"] = {}
    recipe["stages"] = [
        {"name": "prune", "pass": "prune.structured", "intermediate": True,
         "with": {"allocation": "latency", "round_to": 4, **prune_with}},
        {"name": "bn", "pass": "recover.batchnorm", "with": {"batches": 8, "batch_size": 64}, "intermediate": True},
        {"name": "export", "pass": "export.onnx", "with": {"verify_samples": 64}, "intermediate": True},
    ]
    recipe["publish"] = "last"  # every stage is intermediate, which publish: recommended never ships
    return recipe


def test_example_pruned_to_a_measured_speedup(example_checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("OPTIMIZER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(TableBuilder, "BUSY", float("inf"))
    recipe = _latency_recipe(example_checkpoint, {"speedup": 1.3, "latency": {"runtime": "onnxruntime",
                                                                             "precision": "fp32", "widths": 4}})
    report = run_recipe(recipe, out=tmp_path / "o")
    prune = report.stage("prune")
    assert prune["status"] == "ok" and report.stage("export")["status"] == "ok"
    latency = prune["details"]["pruning"]["latency"]
    assert latency["runtime"] == "onnxruntime" and latency["precision"] == "fp32"
    assert latency["target_ms"] == pytest.approx(latency["base_ms"] / 1.3)
    assert latency["predicted_ms"] > 0 and latency["measured_ms"] > 0 and latency["attempts"]
    # The check timed the pruned and the unpruned model side by side; the speedup is their ratio.
    first = latency["attempts"][0]
    assert first["speedup"] == pytest.approx(first["unpruned_raw_ms"] / first["measured_raw_ms"])
    # The solver met the target on its prediction (full widths everywhere would predict the unpruned time).
    assert first["predicted_ms"] <= first["solve_for_ms"] < latency["base_ms"]
    assert any(entry["chosen"] < entry["channels"] for entry in latency["table"].values())
    # Every allocated group is one of the example's residual blocks, at one of its timed widths (multiples of 4).
    assert latency["table"], latency
    for name, entry in latency["table"].items():
        assert entry["chosen"] in entry["widths"] and entry["chosen"] % 4 == 0, (name, entry)
        assert len(entry["ms"]) == len(entry["widths"])
    # Groups that couple several blocks are listed with their reason, never silently skipped.
    assert latency["kept_groups"] and all(k["reason"] for k in latency["kept_groups"])
    assert prune["macs"] < report.stage("baseline")["macs"]
    # Re-running with the same cache folder reuses every block of the table and the unpruned model they were timed
    # with; only the check's whole models are timed again.
    again = run_recipe(recipe, out=tmp_path / "o2")
    second = again.stage("prune")["details"]["pruning"]["latency"]
    blocks = sum(len(entry["widths"]) for entry in latency["table"].values())
    assert second["cache"]["reused"] == blocks + 1
    assert second["cache"]["timed"] == 2 * len(second["attempts"])  # each check: pruned and unpruned, side by side


def test_unreachable_latency_target_is_exit_2_naming_the_smallest(example_checkpoint: Path, tmp_path: Path,
                                                                    monkeypatch) -> None:
    monkeypatch.setenv("OPTIMIZER_CACHE_DIR", str(tmp_path / "cache"))
    recipe = _latency_recipe(example_checkpoint, {"target_latency_ms": 0.0001,
                                                  "latency": {"runtime": "onnxruntime", "precision": "fp32",
                                                              "widths": 3}})
    with pytest.raises(RecipeError, match=r"smallest reachable latency is [0-9.]+ ms") as info:
        run_recipe(recipe, out=tmp_path / "o")
    assert info.value.exit_code == 2


def test_report_renders_a_uniform_width_between_the_timed_ones() -> None:
    """The uniform solver may choose a width that was not timed; the Markdown table interpolates its block time."""
    from optimizer.report.markdown import _latency_allocation

    table = {"features.2.conv.1.0": {"block": "features.2.conv", "channels": 96, "widths": [96, 80, 64],
                                     "ms": [1.0, 0.8, 0.6], "chosen": 72, "cost": [0, 1, 2]}}
    report = {"stages": [{"name": "prune", "details": {"pruning": {"macs_ratio": 1.3, "latency": {
        "runtime": "openvino", "precision": "int8", "threads": 1, "base_ms": 5.0, "target_ms": 4.0,
        "predicted_ms": 3.9, "measured_ms": 3.95, "measured_speedup": 1.27, "table": table, "kept_groups": []}}}}]}
    text = "\n".join(_latency_allocation(report))
    assert "| features.2.conv.1.0 | features.2.conv | 96 | 72 | 1.0000 | 0.7000 |" in text


def test_uniform_solver_keeps_one_fraction_everywhere() -> None:
    import numpy as np

    from optimizer.passes.prune_latency import LocalGroup, allocate_uniform

    groups = [LocalGroup(name=f"g{i}", block=f"b{i}", channels=c, scores=np.ones(c), handler=None,
                         widths=[c, c // 2, c // 4], ms=[ms, ms / 2, ms / 4])
              for i, (c, ms) in enumerate([(64, 2.0), (128, 1.0)])]
    result = allocate_uniform(groups, base_ms=5.0, target_ms=4.0, round_to=8, min_ratio=0.25)
    assert result.predicted_ms <= 4.0
    fractions = {name: width / g.channels for g in groups for name, width in result.widths.items() if name == g.name}
    assert max(fractions.values()) - min(fractions.values()) <= 8 / 64  # the same fraction, up to round_to
    assert all(f < 1 for f in fractions.values())


def test_sensitivity_cost_is_zero_for_a_harmless_cut_and_positive_for_a_harmful_one() -> None:
    """group_cost: sensitivity measures the output change of each cut on real inputs, rather than assuming it."""
    import copy

    import numpy as np

    from optimizer.passes.prune_latency import LocalGroup, sensitivity_costs

    torch.manual_seed(0)
    model = nn.Sequential(Block(), nn.Flatten(), nn.Linear(16 * 14 * 14, 10)).eval()
    group = LocalGroup(name="0.body.0", block="0", channels=64, scores=np.ones(64), handler=None, widths=[64, 32, 16])
    harmless = copy.deepcopy(model[0])  # an identical block: no change at all
    harmful = copy.deepcopy(model[0])
    with torch.no_grad():
        harmful.body[-1].weight.mul_(-3.0)
    costs = sensitivity_costs(model, [group], {("0.body.0", 32): harmless, ("0.body.0", 16): harmful},
                              (torch.randn(8, 16, 14, 14),), lambda *a: None)
    assert costs["0.body.0"][0] == 0.0 and costs["0.body.0"][1] == pytest.approx(0.0, abs=1e-9)
    assert costs["0.body.0"][2] > 1e-3
    assert model[0] is not harmless and model[0] is not harmful  # the model is restored after each cut
