"""Latency-allocated structured pruning: per-group widths chosen from measured block latencies.

``prune.structured`` with ``allocation: latency`` comes here. The steps:

1. **Groups.** Torch-Pruning's dependency graph lists the groups of layers that lose channels together.
   A group is *local* when the smallest module containing all its layers (its *block*: a MobileNetV2
   inverted residual's ``conv``, a ResNet basic block) holds no other group's root: pruning it changes
   that block's inside, never the block's inputs or outputs. Local groups are allocated; the others (a
   residual stream coupling many blocks, a stem, the layer before the head) keep their width and are
   listed, with the reason, in the report.
2. **Latency table.** Each local group's block is cut out (its input captured on the example input),
   pruned to each candidate width (multiples of ``round_to``), exported and timed on the deployment
   runtime and precision (:mod:`optimizer.measure.latency_table`, cached on disk). The unpruned whole
   model is timed the same way: the prediction is that figure plus each block's gain.
3. **Solve.** :func:`optimizer.passes.latency_allocation.allocate`: most importance kept under the target.
4. **Check.** The pruned whole model is exported and timed. A prediction that missed the measured time by
   more than ``tolerance`` rescales the target by measured/predicted and solves again (up to
   ``corrections`` times); the attempt that meets the target with the most importance kept is the result.
"""

from __future__ import annotations

import copy
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from optimizer.errors import RecipeError, StageError
from optimizer.passes.base import PassConfig
from optimizer.passes.latency_allocation import Allocation, GroupCosts, Unreachable, allocate, ms_at_width

if TYPE_CHECKING:
    import torch
    from torch import nn

    from optimizer.measure.latency_table import LatencyCache, Target


class LatencySettings(PassConfig):
    """Where and how the latency table is measured (``allocation: latency``)."""

    runtime: Literal["auto", "openvino", "onnxruntime"] = Field(
        default="auto", description="Runtime the blocks are timed on; 'auto': OpenVINO when a later stage of the "
        "recipe is compile.openvino, else onnxruntime.")
    precision: Literal["auto", "fp32", "int8"] = Field(
        default="auto", description="Precision the blocks are timed in; 'auto': int8 when a later stage "
        "quantizes (quantize.nncf / quantize.ort), else fp32.")
    threads: int | None = Field(default=None, ge=1,
                                description="Threads for timing (default: the recipe's evaluate.latency.threads).")
    widths: int = Field(default=6, ge=2, le=16, description="Candidate widths timed per group, from the full width "
                                                            "down to min_width_ratio (multiples of round_to).")
    min_width_ratio: float = Field(default=0.25, gt=0, le=1,
                                   description="No group keeps fewer than this fraction of its channels.")
    tolerance: float = Field(default=0.05, gt=0, lt=1,
                             description="Largest relative miss between predicted and measured whole-model latency "
                                         "accepted before the target is corrected and solved again.")
    corrections: int = Field(default=2, ge=0, le=5, description="Most re-solves after a missed prediction.")
    group_cost: Literal["importance", "sensitivity"] = Field(
        default="importance", description="What a narrower width costs a group. 'importance': the channel "
        "importance removed (the pass's importance criterion, normalized per group). 'sensitivity': measured on "
        "calibration data: the KL divergence of the model's outputs from the unpruned model's when only that "
        "group is cut to that width (needs data.calibration; one forward pass per group and width).")
    sensitivity_samples: int = Field(default=64, ge=1, le=4096,
                                     description="Calibration samples for group_cost: sensitivity.")
    solver: Literal["knapsack", "uniform"] = Field(
        default="knapsack", description="'knapsack': per-group widths keeping the most importance under the target. "
        "'uniform': the same kept fraction in every group (the widest that meets the target, block times "
        "interpolated between timed widths): the MAC-uniform control for comparisons at equal measured latency.")
    cache_dir: str | None = Field(default=None, description="Latency-table cache folder (default: "
                                  "$OPTIMIZER_CACHE_DIR/latency_tables or ~/.cache/optimizer/latency_tables).")


@dataclass
class LocalGroup:
    """A group whose cut stays inside one block.

    ``kind`` "channels": a Torch-Pruning group (``handler`` cuts it, ``block`` is the module timed). "heads" and
    "mlp": a Transformer layer's attention heads or MLP width (:mod:`optimizer.passes.prune_transformer`),
    cut on ``layer``; ``block`` then only names what is timed. ``unit``: the channels that can only go
    together (the head size for heads, else 1).
    """

    name: str
    block: str
    channels: int
    scores: np.ndarray
    handler: Any = None
    kind: Literal["channels", "heads", "mlp"] = "channels"
    layer: str = ""
    unit: int = 1
    widths: list[int] = field(default_factory=list)
    ms: list[float] = field(default_factory=list)

    def step(self, round_to: int) -> int:
        """Widths are multiples of this: of round_to and of the unit."""
        return math.lcm(max(1, round_to), self.unit)

    def members(self) -> dict[str, str]:
        """The model's modules this group's timing block stands for: model name -> name inside the block."""
        if self.kind == "channels":
            return {self.block: ""}
        from optimizer.passes.prune_transformer import block_members

        return block_members(self.layer, self.kind)


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    prefix: list[str] = []
    for pieces in zip(*parts):
        if len(set(pieces)) != 1:
            break
        prefix.append(pieces[0])
    return ".".join(prefix)


def resolve_target(settings: LatencySettings, recipe_stages: list, stage: str) -> tuple[str, str, str]:
    """(runtime, precision, quantization) the later stages deploy, unless set explicitly; quantization is
    "transformer" when a later quantize.nncf stage sets model_type: transformer, else "default"."""
    names = [s.name for s in recipe_stages]
    later_stages = recipe_stages[names.index(stage) + 1:] if stage in names else []
    later = [s.pass_name for s in later_stages]
    runtime = settings.runtime
    if runtime == "auto":
        runtime = "openvino" if "compile.openvino" in later else "onnxruntime"
    precision = settings.precision
    if precision == "auto":
        precision = "int8" if any(p in ("quantize.nncf", "quantize.ort") for p in later) else "fp32"
    quantization = "default"
    for s in later_stages:
        if s.pass_name == "quantize.nncf" and (s.with_ or {}).get("model_type") == "transformer":
            quantization = "transformer"
    return runtime, precision, quantization


def candidate_widths(channels: int, round_to: int, min_ratio: float, count: int) -> list[int]:
    """From ``channels`` down to about ``min_ratio`` of it, multiples of ``round_to`` (the full width kept as is)."""
    floor = max(round_to, int(np.ceil(channels * min_ratio / round_to)) * round_to)
    out = [channels]
    for fraction in np.linspace(1.0, min_ratio, count)[1:]:
        width = max(floor, int(round(channels * fraction / round_to)) * round_to)
        if width < out[-1]:
            out.append(width)
    return out


def discover_groups(tp, model: "nn.Module", example: tuple, ignored: list["nn.Module"], importance,
                    round_to: int) -> tuple[list[LocalGroup], list[dict[str, Any]]]:
    """Local groups with per-channel importance, and the groups left at full width with the reason."""
    import torch
    from torch import nn

    from optimizer.passes.prune_transformer import transformer_layers

    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    names = {m: n for n, m in model.named_modules()}
    groups = list(graph.get_all_groups(ignored_layers=ignored, root_module_types=(nn.Conv2d, nn.Linear)))
    roots = [names.get(g[0].dep.target.module, "") for g in groups]
    members_of = [sorted({names[it.dep.target.module] for it in g.items if it.dep.target.module in names})
                  for g in groups]
    blocks = [_common_prefix(m) for m in members_of]
    layers = transformer_layers(model)
    local: list[LocalGroup] = transformer_groups(model, layers, ignored, round_to)
    kept: list[dict[str, Any]] = []

    def inside_layer(block: str) -> bool:
        return any(block == layer or block.startswith(layer + ".") for layer in layers)

    for group, root, members, block in zip(groups, roots, members_of, blocks):
        if block and inside_layer(block):
            continue  # a Transformer layer's channels are pruned as its heads and MLP width (transformer_groups)
        module = group[0].dep.target.module
        channels = int(graph.get_out_channels(module) or 0)
        # Every layer of the group lies inside `block`, so pruning it leaves the block's inputs and outputs
        # alone. A block that contains another group's block spans several blocks (a residual stream coupling
        # them, a stem): timing it means timing most of the model, so such a group keeps its width.
        spans = [b for b in blocks if b != block and (not block or b.startswith(block + "."))]
        if not block or spans:
            kept.append({"group": root, "channels": channels, "layers": len(members),
                         "reason": "couples layers of several blocks (a residual stream, a stem or the layer before "
                                   "the head); its width stays"})
            continue
        if channels < 2 * round_to:
            kept.append({"group": root, "channels": channels, "layers": len(members),
                         "reason": f"{channels} channels: fewer than two multiples of round_to {round_to}"})
            continue
        with torch.no_grad():
            scores = importance(group)
        if scores is None:
            kept.append({"group": root, "channels": channels, "layers": len(members),
                         "reason": "the importance criterion gives no score for this group"})
            continue
        local.append(LocalGroup(name=root, block=block, channels=channels,
                                scores=scores.detach().double().numpy(), handler=group[0].dep.handler))
    return local, kept


def transformer_groups(model: "nn.Module", layers: list[str], ignored: list["nn.Module"],
                       round_to: int) -> list[LocalGroup]:
    """Heads and MLP width of each BERT-style layer, unless a layer of that group is ignored."""
    from optimizer.passes import prune_transformer as pt

    modules = dict(model.named_modules())
    ignored_ids = {id(m) for m in ignored}
    out: list[LocalGroup] = []
    for layer_name in layers:
        layer = modules[layer_name]
        prefix = f"{layer_name}." if layer_name else ""
        heads_parts = [f"attention.self.{n}" for n in ("query", "key", "value")] + ["attention.output.dense"]
        if not any(id(layer.get_submodule(p)) in ignored_ids for p in heads_parts):
            size = pt.head_size(layer)
            out.append(LocalGroup(name=f"{prefix}attention:heads", block=f"{prefix}attention", kind="heads",
                                  layer=layer_name, channels=layer.get_submodule("attention.self.query").out_features,
                                  scores=pt.head_channel_scores(layer), unit=size))
        if not any(id(layer.get_submodule(p)) in ignored_ids for p in ("intermediate.dense", "output.dense")):
            out.append(LocalGroup(name=f"{prefix}intermediate:mlp", block=f"{prefix}intermediate+output", kind="mlp",
                                  layer=layer_name, channels=layer.get_submodule("intermediate.dense").out_features,
                                  scores=pt.mlp_channel_scores(layer)))
    return out


def _record_inputs(model: "nn.Module", example: tuple, targets: dict[str, "nn.Module"], pick) -> dict[str, tuple]:
    """Run ``model`` on ``example`` once; for each target module, what ``pick(args, kwargs)`` makes of the inputs
    of its first call (a tuple of tensors, or () when they cannot be timed on their own)."""
    import torch

    captured: dict[str, tuple] = {}

    def hook_for(label: str):
        def hook(module, args, kwargs):
            captured.setdefault(label, pick(args, kwargs))
        return hook

    hooks = [module.register_forward_pre_hook(hook_for(label), with_kwargs=True) for label, module in targets.items()]
    try:
        with torch.no_grad():
            model(*example)
    finally:
        for h in hooks:
            h.remove()
    return captured


def capture_layer_inputs(model: "nn.Module", example: tuple, groups: list[LocalGroup]) -> dict[str, tuple]:
    """The hidden states each Transformer group's block receives (its first positional or hidden_states input),
    by the group's block name."""
    import torch

    entry = {"heads": "attention", "mlp": "intermediate"}

    def hidden_states(args: tuple, kwargs: dict) -> tuple:
        hidden = args[0] if args else kwargs.get("hidden_states")
        return (hidden.detach().clone(),) if isinstance(hidden, torch.Tensor) else ()

    targets = {g.block: model.get_submodule(f"{g.layer}.{entry[g.kind]}" if g.layer else entry[g.kind])
               for g in groups}
    return _record_inputs(model, example, targets, hidden_states)


def transformer_block_copy(layer: "nn.Module", g: LocalGroup, width: int) -> "nn.Module":
    """The timing block of a Transformer group, on a copy of its layer cut to ``width``."""
    from optimizer.passes import prune_transformer as pt

    work = copy.deepcopy(layer).eval()
    if width < g.channels:
        (pt.cut_heads if g.kind == "heads" else pt.cut_mlp)(work, g.scores, width)
    return pt.timing_block(work, g.kind).eval()


def capture_block_inputs(model: "nn.Module", example: tuple, blocks: list[str]) -> dict[str, tuple]:
    """The positional tensor inputs each block receives on the example input (() when it takes others)."""
    import torch

    def positional_tensors(args: tuple, kwargs: dict) -> tuple:
        if kwargs or not all(isinstance(a, torch.Tensor) for a in args):
            return ()
        return tuple(a.detach().clone() for a in args)

    modules = dict(model.named_modules())
    return _record_inputs(model, example, {name: modules[name] for name in set(blocks)}, positional_tensors)


def _lowest(scores: np.ndarray, remove: int) -> list[int]:
    return sorted(int(i) for i in np.argsort(scores, kind="stable")[:remove])


def prune_block_copy(tp, block: "nn.Module", args: tuple, root_rel: str, handler, scores: np.ndarray,
                     width: int) -> "nn.Module":
    """A copy of ``block`` with its group cut to ``width`` (the lowest-scoring channels removed)."""
    work = copy.deepcopy(block).eval()
    if width < len(scores):
        graph = tp.DependencyGraph().build_dependency(work, example_inputs=args)
        module = dict(work.named_modules())[root_rel]
        graph.get_pruning_group(module, handler, _lowest(scores, len(scores) - width)).prune()
    return work


def prune_model_to_widths(tp, model: "nn.Module", example: tuple, groups: list[LocalGroup],
                          widths: dict[str, int]) -> "nn.Module":
    from optimizer.passes import prune_transformer as pt

    work = copy.deepcopy(model).eval()
    modules = dict(work.named_modules())
    cut = [g for g in groups if widths[g.name] < g.channels]
    channel_groups = [g for g in cut if g.kind == "channels"]
    if channel_groups:
        graph = tp.DependencyGraph().build_dependency(work, example_inputs=example)
        for g in channel_groups:
            remove = g.channels - widths[g.name]
            graph.get_pruning_group(modules[g.name], g.handler, _lowest(g.scores, remove)).prune()
    for g in cut:
        if g.kind != "channels":
            (pt.cut_heads if g.kind == "heads" else pt.cut_mlp)(modules[g.layer], g.scores, widths[g.name])
    for p in work.parameters():
        p.requires_grad_(True)
    return work.eval()


def allocate_uniform(groups: list[LocalGroup], base_ms: float, target_ms: float, round_to: int,
                     min_ratio: float) -> Allocation:
    """The widest common kept fraction whose predicted latency meets ``target_ms`` (bisection on the fraction)."""

    def widths_at(fraction: float) -> dict[str, int]:
        out = {}
        for g in groups:
            floor, step = min(g.widths), g.step(round_to)
            out[g.name] = int(min(g.channels, max(floor, round(g.channels * fraction / step) * step)))
        return out

    def predicted(widths: dict[str, int]) -> float:
        return base_ms + sum(ms_at_width(g.widths, g.ms, widths[g.name]) - g.ms[0] for g in groups)

    narrowest = widths_at(min_ratio)
    if predicted(narrowest) > target_ms:
        raise Unreachable(target_ms, predicted(narrowest))
    low, high = min_ratio, 1.0  # predicted(low) meets the target; find the largest fraction that still does
    for _ in range(30):
        middle = (low + high) / 2
        if predicted(widths_at(middle)) <= target_ms:
            low = middle
        else:
            high = middle
    widths = widths_at(low)
    lost = 0.0
    for g in groups:
        lost += float(np.sort(g.scores)[:g.channels - widths[g.name]].sum())
    return Allocation(widths=widths, predicted_ms=predicted(widths), importance_lost=lost,
                      moves=sum(1 for g in groups if widths[g.name] < g.channels))


def _replace_module(model: "nn.Module", name: str, new: "nn.Module") -> "nn.Module":
    """Put ``new`` where ``name`` is; returns what was there."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = parent._modules[child]
    parent._modules[child] = new
    return old


def sensitivity_costs(model: "nn.Module", groups: list[LocalGroup], pruned_blocks: dict[tuple[str, int], "nn.Module"],
                      samples: tuple, progress) -> dict[str, list[float]]:
    """Per group and candidate width: mean KL(unpruned || model with only that group cut) on ``samples``.

    The loss that matters, measured rather than assumed from weight magnitudes: a channel of an early,
    narrow block and one of a late, wide block may carry the same normalized magnitude and very different
    weight in the output. Summing the groups' costs assumes their effects add up, as NetAdapt-style
    per-layer tables do; the accuracy of the result is measured anyway after the stages that follow.
    """
    import torch
    import torch.nn.functional as F

    from optimizer.passes.prune_structured import first_output  # that module imports this one

    def log_probs() -> "torch.Tensor":
        with torch.no_grad():
            out = first_output(model(*samples))
        return F.log_softmax(out.reshape(len(samples[0]), -1).double(), dim=-1)

    reference = log_probs()
    costs: dict[str, list[float]] = {}
    for index, g in enumerate(groups):
        progress(f"sensitivity of {g.name} ({index + 1} of {len(groups)})")
        values = [0.0]
        for w in g.widths[1:]:
            block = pruned_blocks[(g.name, w)]
            originals = {name: _replace_module(model, name, block.get_submodule(inside) if inside else block)
                         for name, inside in g.members().items()}
            try:
                current = log_probs()
            finally:
                for name, original in originals.items():
                    _replace_module(model, name, original)
            kl = (reference.exp() * (reference - current)).sum(-1).mean()
            values.append(max(0.0, float(kl)))
        costs[g.name] = values
    return costs


def _machine_busy() -> float | None:
    """The 1-minute load average per usable CPU (None where the OS does not say)."""
    import os

    try:
        return os.getloadavg()[0] / max(1, len(os.sched_getaffinity(0)))
    except (OSError, AttributeError):
        return None


class TableBuilder:
    """Times blocks and whole models; the ones to time are timed together in one fresh process.

    Blocks go through the on-disk cache. Two kinds of figure never do: whole models of a check (``fresh``
    items), which are always timed anew, next to each other in the same process, so that a speedup is a ratio
    of two figures taken under the same conditions; and figures taken while the machine was busier than one
    runnable task per CPU, which are used for this run but not stored, and cached ones of that kind are
    timed again.

    The ``anchor`` (the unpruned whole model a table's prediction starts from) is cached with its blocks and
    read from the cache only when every other item was too; whenever anything is timed, it is timed again
    with it (and with no anchor in the cache, everything is). A table is a sum of differences added to the
    anchor, so the two must come from the same conditions: a busy machine's whole-model time next to a quiet
    machine's block times made a reachable target look out of reach.
    """

    BUSY = 1.0  # load average per usable CPU above which a figure is not stored

    def __init__(self, target: "Target", cache: "LatencyCache", where: str):
        self.target = target
        self.cache = cache
        self.where = where
        self.timed = 0
        self.reused = 0
        self.not_stored = 0

    def times(self, items: list[tuple[str, "nn.Module", tuple]], progress,
              fresh: frozenset[str] = frozenset(), anchor: str | None = None) -> dict[str, float]:
        """``items``: (label, module, args); labels in ``fresh`` bypass the cache; ``anchor``: see the class.
        Returns {label: p50 ms}."""
        from optimizer.measure.latency_table import BlockToTime, entry_key, export_for_timing, measure_blocks
        from optimizer.measure.latency_table import module_signature

        keys: dict[str, str] = {}
        cached: dict[str, dict | None] = {}
        for label, module, args in items:
            signature = module_signature(module, [tuple(a.shape) for a in args], [str(a.dtype) for a in args])
            keys[label] = entry_key(signature, self.target) + ("-fresh" if label in fresh else "")
            entry = None if label in fresh else self.cache.get(keys[label])
            cached[label] = entry if entry is not None and (entry.get("busy") or 0) <= self.BUSY else None
        if anchor is not None and any(cached[label] is None for label, _, _ in items if label != anchor):
            cached[anchor] = None  # something is timed now: time the anchor with it
        if anchor is not None and cached[anchor] is None and all(cached[label] for label, _, _ in items
                                                                 if label != anchor):
            cached = dict.fromkeys(cached)  # cached blocks, no anchor of their time: time them all together
        result: dict[str, float] = {}
        pending: list[tuple[str, str]] = []
        timed: dict[str, dict] = {}
        with tempfile.TemporaryDirectory(prefix="optimizer-blocks-") as scratch:
            to_time: list[BlockToTime] = []
            seen: set[str] = set()
            for index, (label, module, args) in enumerate(items):
                key, entry = keys[label], cached[label]
                if entry is not None:
                    result[label] = float(entry["p50_ms"])
                    self.reused += 1
                    continue
                pending.append((label, key))
                if key in seen:
                    continue
                path = Path(scratch) / f"block{index}.onnx"
                values = Path(scratch) / f"block{index}.npz"
                np.savez(values, **{f"in{i}": a.detach().cpu().numpy() for i, a in enumerate(args)})
                progress(f"exporting {label} for timing")
                try:
                    export_for_timing(module, args, path)
                except Exception as exc:  # noqa: BLE001 - any exporter failure is this stage's one-line error
                    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                    raise StageError(f"{self.where}: could not export {label} to time it: {first[:200]}") from None
                seen.add(key)
                to_time.append(BlockToTime(key=key, onnx=path, label=label, inputs=values))
            if to_time:
                progress(f"timing {len(to_time)} models/blocks on {self.target.runtime} {self.target.precision} "
                         f"({self.target.threads} thread(s), fresh process)")
                busy_before = _machine_busy()
                timed = measure_blocks(to_time, self.target, where=self.where)
                busy = max(b for b in (busy_before, _machine_busy(), 0.0) if b is not None)
                self.timed += len(to_time)
                for key, entry in timed.items():
                    if key.endswith("-fresh"):
                        continue
                    if busy > self.BUSY:
                        self.not_stored += 1
                        continue
                    self.cache.put(key, {**entry, "busy": round(busy, 3), "target": self.target.as_dict()})
            for label, key in pending:
                if key not in timed:
                    raise StageError(f"{self.where}: the latency-table worker returned no time for {label}")
                result[label] = float(timed[key]["p50_ms"])
        return result


def run_latency_allocation(tp, *, model: "nn.Module", example: tuple, ignored: list["nn.Module"], importance,
                           round_to: int, target_ms: float | None, speedup: float | None,
                           settings: LatencySettings, runtime: str, precision: str, threads: int, where: str,
                           progress, calibration: tuple | None = None,
                           quantization: str = "default") -> tuple["nn.Module", dict[str, Any]]:
    """Prune ``model`` (a copy) to meet the latency target on the target runtime; returns it and the report."""
    from optimizer.measure.latency_table import LatencyCache, Target

    target = Target.here(runtime, precision, threads, quantization)  # type: ignore[arg-type]
    cache = LatencyCache(Path(settings.cache_dir).expanduser() if settings.cache_dir else None)
    builder = TableBuilder(target, cache, where)

    progress("finding pruning groups")
    groups, kept = discover_groups(tp, model, example, ignored, importance, round_to)
    if not groups:
        raise StageError(f"{where}: no pruning group lies inside one block, so latency allocation has nothing to "
                         f"choose ({len(kept)} coupled group(s) keep their width); use a channel ratio instead")
    channel_groups = [g for g in groups if g.kind == "channels"]
    inputs = capture_block_inputs(model, example, [g.block for g in channel_groups])
    inputs.update(capture_layer_inputs(model, example, [g for g in groups if g.kind != "channels"]))
    modules = dict(model.named_modules())
    for g in list(groups):
        if not inputs.get(g.block):
            kept.append({"group": g.name, "channels": g.channels, "reason": f"its block '{g.block}' takes keyword or "
                         "non-tensor inputs, which the latency table cannot time on their own; its width stays"})
            groups.remove(g)
    if not groups:
        raise StageError(f"{where}: no pruning group has a block that can be timed on its own")

    base_label = "whole model (unpruned)"
    items: list[tuple[str, Any, tuple]] = [(base_label, model, example)]
    pruned_blocks: dict[tuple[str, int], Any] = {}
    for g in groups:
        g.widths = candidate_widths(g.channels, g.step(round_to), settings.min_width_ratio, settings.widths)
        for w in g.widths:
            progress(f"cutting {g.block} to {w} channels")
            if g.kind == "channels":
                rel = g.name[len(g.block) + 1:]
                pruned_blocks[(g.name, w)] = prune_block_copy(tp, modules[g.block], inputs[g.block], rel, g.handler,
                                                              g.scores, w)
            else:
                pruned_blocks[(g.name, w)] = transformer_block_copy(modules[g.layer], g, w)
            items.append((f"{g.name}@{w}", pruned_blocks[(g.name, w)], inputs[g.block]))
    table = builder.times(items, progress, anchor=base_label)
    base_ms = table[base_label]
    for g in groups:
        g.ms = [table[f"{g.name}@{w}"] for w in g.widths]
    sensitivity = None
    if settings.group_cost == "sensitivity":
        if calibration is None:
            raise StageError(f"{where}: latency.group_cost: sensitivity needs data.calibration")
        sensitivity = sensitivity_costs(model, groups, pruned_blocks, calibration, progress)

    # The goal is on the table's scale. A check runs in another process, minutes later and perhaps under another
    # load, so it times the unpruned model again beside the pruned one and rescales to the table's conditions.
    goal = target_ms if target_ms is not None else base_ms / float(speedup)  # type: ignore[arg-type]
    costs = []
    for g in groups:
        ordered = np.sort(g.scores)
        loss = sensitivity[g.name] if sensitivity else [float(ordered[:g.channels - w].sum()) for w in g.widths]
        costs.append(GroupCosts(name=g.name, widths=list(g.widths), ms=list(g.ms), loss=loss))
    attempts: list[dict[str, Any]] = []
    best: tuple[Any, dict[str, Any]] | None = None
    solve_for = goal
    for attempt in range(settings.corrections + 1):
        try:
            if settings.solver == "uniform":
                allocation = allocate_uniform(groups, base_ms, solve_for, round_to, settings.min_width_ratio)
            else:
                allocation = allocate(costs, base_ms, solve_for)
        except Unreachable as exc:
            if attempt == 0:
                raise RecipeError(
                    f"{where}: the latency target {goal:.4g} ms is out of reach: with every group at its narrowest "
                    f"candidate (min_width_ratio {settings.min_width_ratio}) the smallest reachable latency is "
                    f"{exc.smallest_ms:.4g} ms on {runtime} {precision} (unpruned {base_ms:.4g} ms); raise the target "
                    "or lower latency.min_width_ratio") from None
            break
        progress(f"pruning to the chosen widths (attempt {attempt + 1})")
        pruned = prune_model_to_widths(tp, model, example, groups, allocation.widths)
        label = f"whole model (attempt {attempt + 1})"
        check = builder.times([(label, pruned, example), (base_label, model, example)], progress,
                              fresh=frozenset({label, base_label}))
        # Scale the check to the table's conditions: the unpruned model was timed in both processes.
        scale = base_ms / check[base_label]
        measured_ms = check[label] * scale
        miss = (measured_ms - allocation.predicted_ms) / allocation.predicted_ms
        record = {"solve_for_ms": solve_for, "predicted_ms": allocation.predicted_ms, "measured_ms": measured_ms,
                  "measured_raw_ms": check[label], "unpruned_raw_ms": check[base_label],
                  "speedup": check[base_label] / check[label], "miss": miss,
                  "importance_lost": allocation.importance_lost, "widths": allocation.widths}
        attempts.append(record)
        meets = measured_ms <= goal * (1 + settings.tolerance)
        if best is None or (meets and (not best[1]["meets"] or record["importance_lost"] < best[1]["importance_lost"])) \
                or (not meets and not best[1]["meets"] and measured_ms < best[1]["measured_ms"]):
            best = (pruned, {**record, "meets": meets})
        if abs(miss) <= settings.tolerance:
            break
        solve_for = solve_for * goal / measured_ms  # the runtime's own correction of the additive prediction
    assert best is not None
    pruned, chosen = best
    report = {
        "runtime": runtime, "precision": precision, "threads": threads, "solver": settings.solver,
        "target_ms": goal, "requested": {"target_latency_ms": target_ms} if target_ms is not None else {"speedup": speedup},
        "base_ms": base_ms, "predicted_ms": chosen["predicted_ms"], "measured_ms": chosen["measured_ms"],
        "measured_speedup": chosen["speedup"], "met": chosen["meets"],
        "attempts": attempts,
        "group_cost": settings.group_cost,
        "table": {g.name: {"block": g.block, "widths": g.widths, "ms": g.ms, "chosen": chosen["widths"][g.name],
                           "channels": g.channels, "cost": c.loss} for g, c in zip(groups, costs)},
        "kept_groups": kept,
        "cache": {"reused": builder.reused, "timed": builder.timed, "not_stored_busy": builder.not_stored,
                  "folder": str(cache.root)},
        "environment": target.as_dict(),
    }
    return pruned, report
