"""Attention heads and MLP width of BERT-style Transformer layers, as pruning groups of their own.

Torch-Pruning's dependency graph sees a Transformer layer as channels: the query/key/value rows of one head
are coupled through reshapes it cannot split into heads, and the MLP's hidden width shares the layer (the
smallest module holding both of its Linears) with the attention. For latency-allocated pruning a layer has
two groups that are cut and timed on their own:

* **heads**: whole heads leave the query, key and value projections (their rows) and the attention output
  projection (its columns). Timed as the attention module (projections, attention, output projection, the
  residual add and LayerNorm) on the layer's hidden states.
* **mlp**: hidden units leave the intermediate Linear (rows) and the output Linear (columns). Timed as those
  two with their activation, residual add and LayerNorm.

A layer is recognized by its parts, the names Hugging Face's BERT family uses (BERT, MiniLM, RoBERTa,
DistilRoBERTa...): ``attention.self.{query,key,value}``, ``attention.output.dense``, ``intermediate.dense``,
``output.dense``. The cut is done in place on Linear weights; the attention reads its head count from the
projections' width (reshape to ``(-1, head_size)``), and the counters it keeps are updated for the record.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn

LAYER_PARTS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
               "intermediate.dense", "output.dense")


def transformer_layers(model: "nn.Module") -> list[str]:
    """Names of the BERT-style layers in ``model`` (each has every part of ``LAYER_PARTS`` as an nn.Linear)."""
    from torch import nn

    modules = dict(model.named_modules())
    found = []
    for name in modules:
        prefix = f"{name}." if name else ""
        if all(isinstance(modules.get(prefix + part), nn.Linear) for part in LAYER_PARTS) and \
                isinstance(getattr(modules[prefix + "attention.self"], "attention_head_size", None), int):
            found.append(name)
    return found


def _linear(layer: "nn.Module", part: str) -> "nn.Linear":
    return layer.get_submodule(part)


def head_size(layer: "nn.Module") -> int:
    return int(layer.get_submodule("attention.self").attention_head_size)


def _mean_one(values: np.ndarray) -> np.ndarray:
    """Normalized to a mean of 1 per group, as Torch-Pruning's magnitude importance is, so costs compare."""
    mean = float(values.mean())
    return values / mean if mean > 0 else np.ones_like(values)


def head_channel_scores(layer: "nn.Module", p: int = 2) -> np.ndarray:
    """Per channel of the attention width: the magnitude of its head (q, k, v rows and output-projection
    columns), the same value for every channel of a head, so removing the lowest channels removes whole heads."""
    import torch

    size = head_size(layer)
    with torch.no_grad():
        per_channel = sum(_linear(layer, f"attention.self.{n}").weight.abs().pow(p).sum(1)
                          for n in ("query", "key", "value"))
        per_channel = per_channel + _linear(layer, "attention.output.dense").weight.abs().pow(p).sum(0)
        per_head = per_channel.reshape(-1, size).sum(1).double().pow(1 / p).numpy()
    return _mean_one(np.repeat(per_head, size))


def mlp_channel_scores(layer: "nn.Module", p: int = 2) -> np.ndarray:
    """Per hidden unit of the MLP: the magnitude of its intermediate row and output column."""
    import torch

    with torch.no_grad():
        per_unit = _linear(layer, "intermediate.dense").weight.abs().pow(p).sum(1) \
            + _linear(layer, "output.dense").weight.abs().pow(p).sum(0)
    return _mean_one(per_unit.double().pow(1 / p).numpy())


def _keep_rows(linear: "nn.Linear", keep: "torch.Tensor") -> None:
    from torch import nn

    linear.weight = nn.Parameter(linear.weight.data[keep].clone())
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.data[keep].clone())
    linear.out_features = int(keep.numel())


def _keep_columns(linear: "nn.Linear", keep: "torch.Tensor") -> None:
    from torch import nn

    linear.weight = nn.Parameter(linear.weight.data[:, keep].clone())
    linear.in_features = int(keep.numel())


def _kept_channels(scores: np.ndarray, width: int) -> "torch.Tensor":
    """The ``width`` highest-scoring channels, in their original order."""
    import torch

    order = np.argsort(scores, kind="stable")
    return torch.as_tensor(sorted(int(i) for i in order[len(scores) - width:]), dtype=torch.long)


def cut_heads(layer: "nn.Module", scores: np.ndarray, width: int) -> None:
    """Keep the heads of the ``width`` channels scoring highest (``width`` a multiple of the head size)."""
    size = head_size(layer)
    if width % size:
        raise ValueError(f"attention width {width} is not a multiple of the head size {size}")
    keep = _kept_channels(scores, width)
    attention = layer.get_submodule("attention.self")
    for name in ("query", "key", "value"):
        _keep_rows(_linear(layer, f"attention.self.{name}"), keep)
    _keep_columns(_linear(layer, "attention.output.dense"), keep)
    attention.num_attention_heads = width // size
    attention.all_head_size = width


def cut_mlp(layer: "nn.Module", scores: np.ndarray, width: int) -> None:
    """Keep the ``width`` highest-scoring hidden units of the MLP."""
    keep = _kept_channels(scores, width)
    _keep_rows(_linear(layer, "intermediate.dense"), keep)
    _keep_columns(_linear(layer, "output.dense"), keep)


def timing_block(layer: "nn.Module", kind: str) -> "nn.Module":
    """A module computing one group's block of ``layer`` from the layer's hidden states, for timing.

    It holds the layer's own submodules (cut a deep copy of the layer first to time a narrower width).
    """
    from torch import nn

    class Attention(nn.Module):
        def __init__(self, attention: nn.Module):
            super().__init__()
            self.attention = attention

        def forward(self, hidden: "torch.Tensor") -> "torch.Tensor":
            return self.attention(hidden)[0]  # the attention weights are not part of the deployed graph

    class FeedForward(nn.Module):
        def __init__(self, intermediate: nn.Module, output: nn.Module):
            super().__init__()
            self.intermediate = intermediate
            self.output = output

        def forward(self, hidden: "torch.Tensor") -> "torch.Tensor":
            return self.output(self.intermediate(hidden), hidden)

    if kind == "heads":
        return Attention(layer.get_submodule("attention"))
    return FeedForward(layer.get_submodule("intermediate"), layer.get_submodule("output"))


def block_members(layer_name: str, kind: str) -> dict[str, str]:
    """The model's modules a timing block stands for: model name -> name inside the timing block."""
    prefix = f"{layer_name}." if layer_name else ""
    if kind == "heads":
        return {prefix + "attention": "attention"}
    return {prefix + "intermediate": "intermediate", prefix + "output": "output"}
