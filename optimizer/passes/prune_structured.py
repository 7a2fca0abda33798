"""prune.structured: remove whole channels, MLP units and attention heads with Torch-Pruning.

Torch-Pruning's dependency graph finds which layers must lose the same channels together (a residual
add, a depthwise conv and its neighbours, a squeeze-excitation block, the q/k/v projections of an
attention block) and removes them from every layer of the group at once, so the result is a smaller
dense network that runs anywhere the original did. The classifier head keeps its outputs.

The pruned network no longer fits its factory's architecture. It is saved as the factory and kwargs,
safetensors weights, and a JSON structure patch (``meta["structure"]``, see ``optimizer.torch_structure``)
that ``load_torch_module`` applies before loading the weights: no pickle.

Targets: a channel ``ratio`` (what Torch-Pruning calls ``pruning_ratio``), or a ``macs_reduction`` /
``params_reduction`` reached by bisection over the ratio, pruning a deep copy at each step and measuring
the copy with ``optimizer.measure.complexity.count_macs``. With ``allocation: latency`` the target is a time
instead (``target_latency_ms`` or ``speedup``) and each group gets its own width, chosen from latencies
measured on the deployment runtime (``optimizer.passes.prune_latency``).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from optimizer.artifact import Artifact
from optimizer.errors import GateFailed, MissingDependency, StageError
from optimizer.measure.complexity import count_macs
from optimizer.models import count_parameters
from optimizer.passes.base import DataNeed, Pass, PassConfig, PassContext, first_bad_pattern
from optimizer.passes.prune_latency import LatencySettings

if TYPE_CHECKING:
    import torch
    from torch import nn

INSTALL_HINT = "pip install 'torch-pruning>=1.5'"


def import_torch_pruning():
    """Torch-Pruning, or a MissingDependency that says what to install."""
    try:
        import torch_pruning
    except ImportError as exc:
        raise MissingDependency(
            f"pass 'prune.structured' needs Torch-Pruning, which is not installed ({exc}); run: {INSTALL_HINT}"
        ) from None
    return torch_pruning


# ------------------------------------------------------------------------------------------ config


class IgnoreConfig(PassConfig):
    """Modules whose output channels are never removed (their inputs may still shrink with a neighbour)."""

    names: list[str] = Field(default_factory=list,
                             description="Exact module names, as in model.named_modules(), e.g. 'layer4.1.conv2'.")
    patterns: list[str] = Field(default_factory=list,
                                description="Regular expressions searched in module names (re.search; anchor with ^ and $).")
    types: list[str] = Field(default_factory=list,
                             description="Class names, e.g. 'Linear' or 'MultiheadAttention'; subclasses match too.")

    @field_validator("patterns")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        bad = first_bad_pattern(patterns)
        if bad:
            raise ValueError(f"pattern {bad[0]!r} is not a valid regular expression: {bad[1]}")
        return patterns


class PruneStructuredConfig(PassConfig):
    importance: Literal["magnitude", "taylor", "random"] = Field(
        default="magnitude",
        description="How channels are ranked: 'magnitude' (group Lp norm of the weights), 'taylor' (|weight x "
        "gradient| of the loss on calibration batches; needs data.calibration) or 'random' (seeded baseline).")
    norm: Literal[1, 2] = Field(default=2, description="The p of the Lp norm for 'magnitude' importance.")
    ratio: float | None = Field(
        default=None, gt=0, lt=1,
        description="Fraction of channels removed from each prunable group (Torch-Pruning's pruning_ratio). "
        "Give exactly one of ratio, macs_reduction, params_reduction.")
    macs_reduction: float | None = Field(
        default=None, gt=0, lt=1,
        description="Fraction of the MACs to remove (0.5 = half); the channel ratio is found by bisection.")
    params_reduction: float | None = Field(
        default=None, gt=0, lt=1,
        description="Fraction of the parameters to remove; the channel ratio is found by bisection.")
    tolerance: float = Field(
        default=0.02, gt=0, lt=0.5,
        description="For macs_reduction / params_reduction: the reduction reached may differ from the target "
        "by this much (absolute fraction); the stage fails if the search cannot get that close.")
    search_steps: int = Field(default=14, ge=2, le=40, description="Most bisection steps of the ratio search.")
    global_pruning: bool = Field(
        default=False,
        description="Rank channels across all layers at once (uneven widths) instead of per layer (uniform).")
    max_layer_ratio: float = Field(
        default=1.0, gt=0, le=1,
        description="No layer loses more than this fraction of its channels (useful with global_pruning).")
    iterative_steps: int = Field(
        default=1, ge=1, le=100,
        description="Reach the ratio in this many equal steps, re-ranking after each (taylor re-reads gradients).")
    round_to: int | None = Field(
        default=None, ge=1,
        description="Keep channel counts multiples of this (e.g. 8 for SIMD-friendly widths).")
    ignore: IgnoreConfig = Field(default_factory=IgnoreConfig,
                                 description="Modules to leave alone, by name, name pattern or class name.")
    keep_head: bool = Field(
        default=True,
        description="Leave the classifier head alone: the last nn.Linear whose out_features equals the model's "
        "output size. Set false only when the output layer is named in 'ignore' or the model has none.")
    taylor_batches: int = Field(default=4, ge=1, description="Calibration batches whose gradients rank channels (taylor).")
    taylor_batch_size: int = Field(default=32, ge=1, description="Samples per calibration batch (taylor).")
    allocation: Literal["uniform", "latency"] = Field(
        default="uniform",
        description="'uniform': the ratio/MAC/param target decides widths (per layer, or global_pruning). 'latency': "
        "per-group widths chosen from block latencies measured on the deployment runtime to meet "
        "target_latency_ms or speedup while keeping the most importance.")
    target_latency_ms: float | None = Field(
        default=None, gt=0,
        description="allocation: latency — batch-1 latency the pruned model must reach on the timing runtime (ms).")
    speedup: float | None = Field(
        default=None, gt=1,
        description="allocation: latency — required speedup over the unpruned model on the timing runtime.")
    latency: LatencySettings = Field(
        default_factory=LatencySettings,
        description="allocation: latency — where and how the latency table is measured.")
    prune_heads: float = Field(
        default=0.0, ge=0, lt=1,
        description="Fraction of attention heads to remove, in nn.MultiheadAttention and in Hugging Face "
        "BERT-style self-attention (modules with num_attention_heads and query/key/value). For "
        "nn.MultiheadAttention the heads share the residual width, so the same heads go in every coupled layer.")

    @model_validator(mode="after")
    def _one_target(self) -> "PruneStructuredConfig":
        timed = [name for name in ("target_latency_ms", "speedup") if getattr(self, name) is not None]
        if self.allocation == "latency":
            others = [n for n in ("ratio", "macs_reduction", "params_reduction") if getattr(self, n) is not None]
            if len(timed) != 1 or others:
                raise ValueError("allocation: latency takes exactly one target: target_latency_ms or speedup"
                                 + (f"; got {', '.join(timed + others)}" if timed or others else ""))
            if self.prune_heads > 0 or self.global_pruning or self.iterative_steps > 1:
                raise ValueError("allocation: latency chooses every width itself; remove prune_heads, "
                                 "global_pruning and iterative_steps")
            return self
        if timed:
            raise ValueError(f"{', '.join(timed)} needs allocation: latency")
        given = [name for name in ("ratio", "macs_reduction", "params_reduction") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one target: ratio (channel fraction), macs_reduction or params_reduction"
                             + (f"; got {', '.join(given)}" if given else ""))
        return self


# ------------------------------------------------------------------------------------------ helpers


def first_output(out: Any) -> "torch.Tensor":
    """The first tensor of a model's output (a tuple, list or dict of outputs holds it first)."""
    if isinstance(out, (tuple, list)):
        return first_output(out[0])
    if isinstance(out, dict):
        return first_output(next(iter(out.values())))
    return out


def _forward(module: "nn.Module", inputs: tuple) -> "torch.Tensor":
    import torch

    with torch.no_grad():
        return first_output(module(*inputs))


def find_head(model: "nn.Module", output: "torch.Tensor") -> str | None:
    """Name of the last nn.Linear whose out_features equals the output's last dimension."""
    from torch import nn

    size = output.shape[-1] if output.dim() else None
    found = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == size:
            found = name
    return found


def resolve_ignored(model: "nn.Module", cfg: PruneStructuredConfig, head: str | None) -> list[str]:
    """Module names to leave alone; a name, pattern or type that matches nothing is an error (a typo)."""
    modules = dict(model.named_modules())
    chosen: list[str] = []
    for name in cfg.ignore.names:
        if name not in modules:
            from optimizer.recipe import suggest

            hint = suggest(name, [n for n in modules if n])
            raise StageError(f"ignore.names: the model has no module '{name}'{hint}")
        chosen.append(name)
    for pattern in cfg.ignore.patterns:
        hits = [n for n in modules if n and re.search(pattern, n)]
        if not hits:
            raise StageError(f"ignore.patterns: {pattern!r} matches no module name")
        chosen += hits
    for type_name in cfg.ignore.types:
        hits = [n for n, m in modules.items() if n and any(c.__name__ == type_name for c in type(m).__mro__)]
        if not hits:
            present = sorted({type(m).__name__ for m in modules.values()})
            raise StageError(f"ignore.types: no module is a {type_name}; the model has {', '.join(present)}")
        chosen += hits
    if head is not None:
        chosen.append(head)
    return list(dict.fromkeys(chosen))


def _attention_modules(model: "nn.Module") -> tuple[list["nn.Module"], list["nn.Module"]]:
    """nn.MultiheadAttention modules, and Hugging Face style self-attention modules (query/key/value Linears)."""
    from torch import nn

    torch_mha, hf = [], []
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            torch_mha.append(module)
        elif isinstance(getattr(module, "num_attention_heads", None), int) and all(
            isinstance(getattr(module, part, None), nn.Linear) for part in ("query", "key", "value")
        ):
            hf.append(module)
    return torch_mha, hf


def _fresh_group_dicts(model: "nn.Module") -> dict[str, dict]:
    """Channel-group and head maps for BasePruner (always new dicts: Torch-Pruning mutates its defaults)."""
    torch_mha, hf = _attention_modules(model)
    # nn.MultiheadAttention: embed_dim is pruned as num_heads equal groups, so every head loses the same dims
    # (Torch-Pruning's num_heads map expects q/k/v Linears and does not fit nn.MultiheadAttention).
    out_groups: dict = {m: m.num_heads for m in torch_mha if m.num_heads > 1}
    num_heads: dict = {}
    for m in hf:
        for part in ("query", "key", "value"):
            num_heads[getattr(m, part)] = m.num_attention_heads
    return {"in_channel_groups": {}, "out_channel_groups": out_groups, "num_heads": num_heads}


def _sync_hf_attention(model: "nn.Module", num_heads: dict) -> None:
    """After pruning: the attribute values a BERT-style attention reads in forward."""
    _, hf = _attention_modules(model)
    for m in hf:
        heads = num_heads.get(m.query, m.num_attention_heads)
        m.num_attention_heads = int(heads)
        m.attention_head_size = m.query.out_features // m.num_attention_heads
        m.all_head_size = m.query.out_features


def kept_channels(model: "nn.Module") -> dict[str, dict[str, int]]:
    """Widths that pruning changes, per layer: out channels of convs/linears, embed dims, heads."""
    from torch import nn

    out: dict[str, dict[str, int]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            out[name] = {"in": m.in_channels, "out": m.out_channels}
        elif isinstance(m, nn.Linear):
            out[name] = {"in": m.in_features, "out": m.out_features}
        elif isinstance(m, nn.MultiheadAttention):
            out[name] = {"embed_dim": m.embed_dim, "heads": m.num_heads}
        elif isinstance(getattr(m, "num_attention_heads", None), int):
            out[name] = {"heads": m.num_attention_heads}
        elif isinstance(m, nn.Embedding):
            out[name] = {"dim": m.embedding_dim}
    return out


# ------------------------------------------------------------------------------------------ the pass


class PruneStructured(Pass):
    name = "prune.structured"
    summary = "Structured pruning (channels, MLP width, attention heads) with Torch-Pruning's dependency graph."
    input_forms = ("torch",)
    output_form = "torch"
    needs = ()
    Config = PruneStructuredConfig

    def required_data(self) -> tuple[DataNeed, ...]:
        cfg: PruneStructuredConfig = self.config  # type: ignore[assignment]
        sensitivity = cfg.allocation == "latency" and cfg.latency.group_cost == "sensitivity"
        return ("calibration",) if cfg.importance == "taylor" or sensitivity else ()

    def write_folders(self) -> tuple[Path, ...]:
        # latency.cache_dir is where the latency tables are kept between runs: written by design.
        cfg: PruneStructuredConfig = self.config  # type: ignore[assignment]
        return (Path(cfg.latency.cache_dir).expanduser(),) if cfg.latency.cache_dir else ()

    # -- pruning one copy ------------------------------------------------------------------------

    def _importance(self, tp):
        cfg: PruneStructuredConfig = self.config  # type: ignore[assignment]
        if cfg.importance == "magnitude":
            return tp.importance.MagnitudeImportance(p=cfg.norm)
        if cfg.importance == "taylor":
            return tp.importance.TaylorImportance()
        return tp.importance.RandomImportance()

    def _gradients(self, model: "nn.Module", batches: list[tuple[tuple, "torch.Tensor"]]) -> None:
        """Accumulate loss gradients for Taylor importance (model in eval mode: BN statistics stay put)."""
        import torch
        import torch.nn.functional as F

        model.eval()
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            for inputs, labels in batches:
                logits = first_output(model(*inputs))
                loss = F.cross_entropy(logits.reshape(len(labels), -1), labels)
                loss.backward()

    def _prune_mha_heads(self, tp, model, example, ignored: list["nn.Module"], importance, seed: int) -> dict:
        """Remove whole heads of nn.MultiheadAttention through the dependency graph.

        q, k, v and the attention output all live in embed_dim, which is also the residual width, so the
        heads' dims leave the residual stream too, in every module coupled to it, and the same heads go
        in every coupled attention layer (their importance is the group's, summed over those layers).
        """
        import torch
        from torch import nn

        cfg: PruneStructuredConfig = self.config  # type: ignore[assignment]
        torch_mha, _ = _attention_modules(model)
        ignored_set = {id(m) for layer in ignored for m in layer.modules()}
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
        fn = tp.prune_multihead_attention_out_channels
        done: set[int] = set()
        report: dict[str, Any] = {}
        names = {id(m): n for n, m in model.named_modules()}
        for mha in torch_mha:
            if id(mha) in done or id(mha) in ignored_set or mha not in graph.module2node:
                continue
            heads, head_dim = mha.num_heads, mha.head_dim
            group = graph.get_pruning_group(mha, fn, list(range(mha.embed_dim)))
            coupled = [dep.target.module for dep, _ in group if isinstance(dep.target.module, nn.MultiheadAttention)]
            coupled = list({id(m): m for m in coupled}.values())
            done.update(id(m) for m in coupled)
            blocked = any(id(dep.target.module) in ignored_set and graph.is_out_channel_pruning_fn(dep.handler)
                          for dep, _ in group)
            if blocked or any(m.num_heads != heads or m.embed_dim != mha.embed_dim for m in coupled):
                report[names[id(mha)]] = "kept: coupled to an ignored module or to attention of another shape"
                continue
            remove = min(int(cfg.prune_heads * heads), heads - 1)
            if remove <= 0:
                continue
            torch.manual_seed(seed)
            scores = importance(group)
            if scores is None:
                continue
            head_scores = scores.detach().reshape(heads, head_dim).mean(1)
            drop = sorted(torch.argsort(head_scores)[:remove].tolist())
            idxs = [h * head_dim + d for h in drop for d in range(head_dim)]
            for m in coupled:  # Torch-Pruning's check wants embed_dim divisible by num_heads after the cut
                m.num_heads = heads - remove
            group = graph.get_pruning_group(mha, fn, idxs)
            group.prune()
            for m in coupled:
                m.head_dim = m.embed_dim // m.num_heads
            report[names[id(mha)]] = {"heads_removed": drop, "coupled_layers": [names[id(m)] for m in coupled]}
        return report

    def _prune_copy(self, tp, model: "nn.Module", ratio: float, example: tuple, ignored_names: list[str],
                    batches: list, seed: int) -> tuple["nn.Module", dict]:
        import torch

        cfg: PruneStructuredConfig = self.config  # type: ignore[assignment]
        work = copy.deepcopy(model).eval()
        modules = dict(work.named_modules())
        ignored = [modules[n] for n in ignored_names]
        importance = self._importance(tp)
        info: dict[str, Any] = {}
        torch_mha, hf = _attention_modules(work)
        if cfg.prune_heads > 0 and torch_mha:
            if cfg.importance == "taylor":
                self._gradients(work, batches)
            info["mha_heads"] = self._prune_mha_heads(tp, work, example, ignored, importance, seed)
        groups = _fresh_group_dicts(work)
        pruner = tp.pruner.BasePruner(
            work, example, importance=importance, pruning_ratio=ratio, global_pruning=cfg.global_pruning,
            max_pruning_ratio=cfg.max_layer_ratio, iterative_steps=cfg.iterative_steps, round_to=cfg.round_to,
            ignored_layers=ignored, in_channel_groups=groups["in_channel_groups"],
            out_channel_groups=groups["out_channel_groups"], num_heads=groups["num_heads"],
            prune_num_heads=cfg.prune_heads > 0 and bool(hf), head_pruning_ratio=cfg.prune_heads if hf else 0.0,
        )
        for _ in range(cfg.iterative_steps):
            if cfg.importance == "taylor":
                self._gradients(work, batches)
            torch.manual_seed(seed)
            pruner.step()
        _sync_hf_attention(work, groups["num_heads"])
        work.zero_grad(set_to_none=True)
        for p in work.parameters():
            p.requires_grad_(True)
        return work.eval(), info

    # -- run ---------------------------------------------------------------------------------------

    def run(self, artifact: Artifact, ctx: PassContext) -> Artifact:
        cfg: PruneStructuredConfig = self.config  # type: ignore[assignment]
        stage = f"stage '{ctx.stage}'"
        if artifact.meta.get("kind") != "factory":
            raise StageError(
                f"{stage}: prune.structured needs a torch artifact built from a factory (model.factory + weights); "
                f"this one is kind {artifact.meta.get('kind')!r} (a torch.export .pt2 program cannot be pruned and "
                "rebuilt). Start the recipe from the architecture's factory and a state dict or safetensors file"
            )
        tp = import_torch_pruning()
        import numpy as np
        import torch

        from optimizer.measure.complexity import example_inputs
        from optimizer.models import build_architecture
        from optimizer.runtimes.torch_eager import load_torch_module
        from optimizer.torch_structure import capture_structure, save_module_weights

        torch.set_num_threads(max(1, ctx.threads))
        ctx.progress.update("loading the model")
        model = load_torch_module(artifact).eval()
        inputs = list(artifact.inputs)
        example = example_inputs(inputs)
        reference_out = _forward(model, example)
        head = find_head(model, reference_out) if cfg.keep_head else None
        if cfg.keep_head and head is None:
            raise StageError(
                f"{stage}: found no nn.Linear with out_features {tuple(reference_out.shape)[-1:]} (the model's output "
                "size) to keep as the classifier head; name the output layer in ignore.names and set keep_head: false"
            )
        ignored_names = resolve_ignored(model, cfg, head)

        batches: list = []
        if cfg.importance == "taylor":
            data = ctx.data.calibration()
            size = cfg.taylor_batch_size
            for index in range(cfg.taylor_batches):
                start = index * size
                if start >= len(data):
                    break
                arrays = data.batch(start, start + size)
                tensors = tuple(torch.from_numpy(np.ascontiguousarray(arrays[spec.name])) for spec in inputs)
                batches.append((tensors, torch.from_numpy(data.labels[start:start + size]).long()))
            if not batches:
                raise StageError(f"{stage}: taylor importance needs calibration samples; data.calibration is empty")

        params_before = count_parameters(model)
        macs_before = count_macs(model, inputs)

        def attempt(ratio: float) -> tuple["nn.Module", dict, int, int | None]:
            try:
                pruned, info = self._prune_copy(tp, model, ratio, example, ignored_names, batches, ctx.seed)
            except (AssertionError, RuntimeError, ValueError, IndexError) as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise StageError(f"{stage}: Torch-Pruning failed at ratio {ratio:.4g}: {type(exc).__name__}: "
                                 f"{first[:300]}") from exc
            return pruned, info, count_parameters(pruned), count_macs(pruned, inputs)

        search: list[dict[str, Any]] = []
        latency_report: dict[str, Any] | None = None
        if cfg.allocation == "latency":
            from optimizer.passes.prune_latency import resolve_target, run_latency_allocation

            modules = dict(model.named_modules())
            if cfg.importance == "taylor":
                self._gradients(model, batches)
            runtime, precision, quantization = resolve_target(cfg.latency, list(ctx.recipe.recipe.stages), ctx.stage)
            threads = cfg.latency.threads or ctx.recipe.recipe.evaluate.latency.threads
            calibration = None
            if cfg.latency.group_cost == "sensitivity":
                data = ctx.data.calibration()
                arrays = data.batch(0, min(cfg.latency.sensitivity_samples, len(data)))
                calibration = tuple(torch.from_numpy(np.ascontiguousarray(arrays[spec.name])) for spec in inputs)
            pruned, latency_report = run_latency_allocation(
                tp, model=model, example=example, ignored=[modules[n] for n in ignored_names],
                importance=self._importance(tp), round_to=cfg.round_to or 1, target_ms=cfg.target_latency_ms,
                speedup=cfg.speedup, settings=cfg.latency, runtime=runtime, precision=precision, threads=threads,
                where=stage, progress=ctx.progress.update, calibration=calibration, quantization=quantization)
            model.zero_grad(set_to_none=True)
            info = {}
            params_after, macs_after = count_parameters(pruned), count_macs(pruned, inputs)
            chosen_ratio = None
        elif cfg.ratio is not None:
            ctx.progress.update(f"pruning (ratio {cfg.ratio})")
            pruned, info, params_after, macs_after = attempt(cfg.ratio)
            chosen_ratio = cfg.ratio
        else:
            metric = "macs" if cfg.macs_reduction is not None else "params"
            target = cfg.macs_reduction if cfg.macs_reduction is not None else cfg.params_reduction
            before = macs_before if metric == "macs" else params_before
            if not before:
                raise StageError(f"{stage}: the model's MACs could not be counted, so macs_reduction cannot be "
                                 "searched; give a channel ratio instead")
            # Regula falsi on reduction(ratio), which rises monotonically (in steps) from 0 at ratio 0. MACs and
            # params of a conv net shrink about with the square of the kept width, so interpolate in
            # s = 1 - sqrt(1 - reduction), which is close to linear in the ratio.
            def linear(reduction: float) -> float:
                return 1 - max(1 - reduction, 0.0) ** 0.5

            low, high, at_low, at_high = 0.0, 0.99, 0.0, 1.0
            ratio = min(max(linear(target), 0.01), 0.98)
            best: tuple | None = None
            for step in range(cfg.search_steps):
                ctx.progress.update(f"searching the ratio for {metric} -{target:.0%}: step {step + 1}, ratio {ratio:.4f}")
                candidate = attempt(ratio)
                value = candidate[3] if metric == "macs" else candidate[2]
                if value is None:
                    raise StageError(f"{stage}: MACs of the pruned model could not be counted at ratio {ratio:.4g}")
                reached = 1 - value / before
                search.append({"ratio": round(ratio, 6), "reduction": round(reached, 6)})
                if best is None or abs(reached - target) < abs(best[1] - target):
                    best = (ratio, reached, candidate)
                if abs(reached - target) <= cfg.tolerance / 2:
                    break
                if reached < target:
                    low, at_low = ratio, reached
                else:
                    high, at_high = ratio, reached
                width = high - low
                if width < 2e-3:  # a step in reduction(ratio): no ratio lies between the two sides
                    break
                span = max(linear(at_high) - linear(at_low), 1e-9)
                guess = low + (linear(target) - linear(at_low)) / span * width
                ratio = min(max(guess, low + 0.05 * width), high - 0.05 * width)
            assert best is not None
            chosen_ratio, reached, (pruned, info, params_after, macs_after) = best
            if abs(reached - target) > cfg.tolerance:
                raise StageError(
                    f"{stage}: no channel ratio removes {target:.1%} of the {metric} within {cfg.tolerance:.1%}; the "
                    f"closest is {reached:.1%} at ratio {chosen_ratio:.4f} (round_to, ignored layers, max_layer_ratio "
                    "and prune_heads, which removes its share whatever the ratio, limit what can be reached); "
                    "raise 'tolerance' or change the target"
                )

        out = _forward(pruned, example)
        if tuple(out.shape) != tuple(reference_out.shape):
            raise StageError(
                f"{stage}: pruning changed the output shape from {tuple(reference_out.shape)} to {tuple(out.shape)}; "
                "add the output layer to ignore.names"
            )

        ctx.progress.update("saving")
        fresh = build_architecture(artifact.meta["factory"], artifact.meta.get("kwargs", {}),
                                   where=f"stage '{ctx.stage}': factory")
        try:
            structure = capture_structure(pruned, fresh)
        except ValueError as exc:
            raise StageError(f"{stage}: the pruned model cannot be described as a patch of its factory: {exc}") from None
        save_module_weights(pruned, ctx.work_dir / "model.safetensors")
        meta = {"kind": "factory", "factory": artifact.meta["factory"], "kwargs": artifact.meta.get("kwargs", {}),
                "structure": structure}
        result = self.new_artifact(artifact, ctx, entry="model.safetensors", meta=meta,
                                   facts={"params": params_after, "macs": macs_after, "precision": "fp32"})

        ctx.progress.update("reloading to check the saved structure")
        check_inputs = self._check_inputs(ctx, inputs)
        reloaded = load_torch_module(result)
        expected, got = _forward(pruned, check_inputs), _forward(reloaded, check_inputs)
        diff = float((expected.double() - got.double()).abs().max()) if expected.shape == got.shape else float("inf")
        if not diff <= 1e-5 * max(1.0, float(expected.abs().max())):
            raise GateFailed(
                f"{stage}: the saved pruned model reloads with different outputs (max abs diff {diff:.3g}); "
                "the structure patch misses an attribute this architecture reads in forward"
            )

        before_kept, after_kept = kept_channels(model), kept_channels(pruned)
        ctx.details["pruning"] = {
            "importance": cfg.importance,
            "ratio": chosen_ratio,
            "target": {k: getattr(cfg, k) for k in ("ratio", "macs_reduction", "params_reduction")
                       if getattr(cfg, k) is not None},
            "macs_before": macs_before,
            "macs_after": macs_after,
            "macs_ratio": (macs_before / macs_after) if macs_before and macs_after else None,
            "params_before": params_before,
            "params_after": params_after,
            "params_ratio": params_before / params_after if params_after else None,
            "ignored": ignored_names,
            "head": head,
            "kept_channels": {name: {"before": before_kept[name], "after": widths}
                              for name, widths in after_kept.items() if before_kept.get(name) != widths},
            "reload_max_abs_diff": diff,
            **({"search": search} if search else {}),
            **({"latency": latency_report} if latency_report else {}),
            **info,
        }
        return result

    @staticmethod
    def _check_inputs(ctx: PassContext, inputs: list) -> tuple:
        """A few eval samples (real data exercises every channel); example inputs when there is no eval set."""
        import numpy as np
        import torch

        from optimizer.measure.complexity import example_inputs

        try:
            arrays = ctx.data.eval().batch(0, 4)
            return tuple(torch.from_numpy(np.ascontiguousarray(arrays[spec.name])) for spec in inputs)
        except Exception:  # a minimal context without data: fall back to the example inputs
            return example_inputs(inputs, batch=2)
