"""recover.batchnorm and recover.reconstruct: win back accuracy after pruning without training.

Structured pruning removes channels, and two things break that need no gradient to repair:

* **Batch-norm statistics.** Every BatchNorm layer normalizes with the running mean and variance of the
  activations it saw in training. After pruning (or quantization, or any change upstream) the
  activations it receives are different, so it shifts and scales them wrongly, and the error compounds
  through the network. ``recover.batchnorm`` measures the statistics again on a few batches of real data.
  This is the cheapest repair there is: forward passes only, no gradient.

* **What a layer's consumer receives.** A layer that reads pruned channels (the 1x1 convolution or the
  Linear after them) still has the weights it learned for the full input. Its output is linear in its
  input, so the weights that best reproduce the *unpruned* model's output of that layer from the inputs it
  now gets follow in closed form from least squares (the channel-pruning reconstruction of He et al.,
  2017, and ThiNet). ``recover.reconstruct`` solves that for each such layer, in forward order, so each
  fit sees the inputs the layers refit before it produce.

Both are torch -> torch: they change weights only, so the output keeps the input's ``meta`` (factory,
kwargs and the pruning's structure patch) next to a new ``model.safetensors``. A usual chain is
``prune.structured`` -> ``recover.batchnorm`` -> ``recover.reconstruct``, with fine-tuning or
distillation after them when the budget allows.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from optimizer.artifact import Artifact
from optimizer.errors import StageError
from optimizer.passes.base import DataNeed, Pass, PassConfig, PassContext, earlier_torch_artifact, first_bad_pattern
from optimizer.passes.prune_structured import first_output

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

REFITTABLE = "nn.Linear and 1x1 nn.Conv2d with groups 1"


# ------------------------------------------------------------------------------------------ shared helpers


def _require_factory(artifact: Artifact, ctx: PassContext, pass_name: str, what: str = "input") -> None:
    if artifact.meta.get("kind") != "factory":
        raise StageError(
            f"stage '{ctx.stage}': {pass_name} needs a torch artifact built from a factory (model.factory + "
            f"weights) as its {what}; this one is kind {artifact.meta.get('kind')!r}. Run it before stages that "
            "turn the model into a program")


def _input_tensors(arrays: dict[str, "np.ndarray"], artifact: Artifact) -> tuple["torch.Tensor", ...]:
    import numpy as np
    import torch

    return tuple(torch.from_numpy(np.ascontiguousarray(arrays[spec.name])) for spec in artifact.inputs)


def _batch_bounds(count: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, stop) of each batch; a last batch of one sample joins the one before (batch norm in
    training mode cannot normalize a single value per channel)."""
    starts = list(range(0, count, batch_size))
    if len(starts) > 1 and count - starts[-1] == 1:
        starts.pop()
    return [(start, starts[i + 1] if i + 1 < len(starts) else count) for i, start in enumerate(starts)]


def _save(pass_: Pass, artifact: Artifact, ctx: PassContext, module: "nn.Module") -> Artifact:
    from optimizer.torch_structure import save_module_weights

    save_module_weights(module, ctx.work_dir / "model.safetensors")
    return pass_.new_artifact(artifact, ctx, entry="model.safetensors", meta=dict(artifact.meta))


# ------------------------------------------------------------------------------------------ recover.batchnorm


def batchnorm_layers(model: "nn.Module") -> list[tuple[str, "nn.Module"]]:
    """The BatchNorm layers that keep running statistics, by name."""
    from torch import nn

    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None]


def reestimate_batchnorm(model: "nn.Module", layers: list[tuple[str, "nn.Module"]],
                         batches) -> tuple[dict[str, tuple["torch.Tensor", "torch.Tensor"]], list[str]]:
    """Measure ``layers``' running statistics again over ``batches`` (tuples of input tensors, each at least 2
    samples); returns (the statistics before, the layers that never ran and so kept theirs).

    The statistics are a cumulative average (momentum None after a reset), so every batch weighs the same and
    the old statistics leave no trace. Only the batch norm layers run in training mode; the model is left in
    eval mode. Shared with the input-size sweep, which re-estimates them at each resolution."""
    import torch

    before = {name: (m.running_mean.clone(), m.running_var.clone()) for name, m in layers}
    momenta = {name: m.momentum for name, m in layers}
    for _, m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: every batch weighs the same
        m.train()
    try:
        with torch.no_grad():
            for inputs in batches:
                model(*inputs)
    finally:
        for name, m in layers:
            m.momentum = momenta[name]
        model.eval()
    # A layer that never ran (an unused branch) got no new statistics: it keeps its old ones.
    unused = [name for name, m in layers if int(m.num_batches_tracked) == 0]
    for name, m in layers:
        if name in unused:
            m.running_mean.copy_(before[name][0])
            m.running_var.copy_(before[name][1])
    return before, unused


class RecoverBatchNormConfig(PassConfig):
    split: Literal["calibration", "train"] = Field(
        default="calibration",
        description="Data split whose samples the statistics are measured on (data.calibration or data.train).")
    batches: int = Field(default=20, ge=1,
                         description="Most batches to run; fewer when the split has fewer samples.")
    batch_size: int = Field(default=32, ge=2,
                            description="Samples per batch (at least 2: batch norm needs two values per channel).")

    def samples(self, available: int) -> int:
        """How many samples re-estimation reads of a split of ``available``: the first ``batches`` × ``batch_size``."""
        return min(available, self.batches * self.batch_size)


def reestimate_on_samples(model: "nn.Module", layers: list[tuple[str, "nn.Module"]],
                          take: Callable[[int, int], dict[str, "np.ndarray"]], names: Sequence[str], count: int,
                          batch_size: int, on_batch: Callable[[int, int], None] | None = None
                          ) -> tuple[dict[str, tuple["torch.Tensor", "torch.Tensor"]], list[str], int]:
    """``reestimate_batchnorm`` over the first ``count`` samples in batches of ``batch_size``: what recover.batchnorm
    and the input-size sweep share. ``take(start, stop)``: those samples as arrays by input name, fed to the model
    in the order of ``names``; ``on_batch(index, total)`` is called before each batch. Returns (the statistics
    before, the layers that never ran, the number of batches)."""
    import numpy as np
    import torch

    bounds = _batch_bounds(count, batch_size)

    def batches():
        for index, (start, stop) in enumerate(bounds):
            if on_batch is not None:
                on_batch(index, len(bounds))
            arrays = take(start, stop)
            yield tuple(torch.from_numpy(np.ascontiguousarray(arrays[name])) for name in names)

    before, unused = reestimate_batchnorm(model, layers, batches())
    return before, unused, len(bounds)


class RecoverBatchNorm(Pass):
    """Re-estimate every BatchNorm layer's running mean and variance on real data.

    The statistics are a cumulative average over the batches (momentum None after a reset), not an
    exponential one, so every batch counts equally and the old statistics leave no trace. Only the batch
    norm layers run in training mode; everything else stays in eval mode, so dropout and similar layers
    behave as in inference. No gradient is computed and no weight other than the statistics changes.
    """

    name = "recover.batchnorm"
    summary = "Re-estimate BatchNorm running statistics on calibration (or train) batches, e.g. after pruning."
    input_forms = ("torch",)
    output_form = "torch"
    needs = ("calibration",)
    Config = RecoverBatchNormConfig

    def required_data(self) -> tuple[DataNeed, ...]:
        return (self.config.split,)  # type: ignore[attr-defined]

    def run(self, artifact: Artifact, ctx: PassContext) -> Artifact:
        import torch

        from optimizer.runtimes.torch_eager import load_torch_module

        cfg: RecoverBatchNormConfig = self.config  # type: ignore[assignment]
        stage = f"stage '{ctx.stage}'"
        _require_factory(artifact, ctx, self.name)
        torch.set_num_threads(max(1, ctx.threads))
        ctx.progress.update("loading the model")
        model = load_torch_module(artifact).eval()
        layers = batchnorm_layers(model)
        if not layers:
            raise StageError(f"{stage}: {self.name} found no BatchNorm layer with running statistics in the model; "
                             "remove this stage")

        data = ctx.data.calibration() if cfg.split == "calibration" else ctx.data.train()
        count = cfg.samples(len(data))
        if count < 2:
            raise StageError(f"{stage}: data.{cfg.split} has {len(data)} samples; batch norm statistics need "
                             "at least 2")

        def on_batch(index: int, total: int) -> None:
            ctx.progress.update(f"measuring batch norm statistics: batch {index + 1} of {total}", index / total)

        before, unused, batch_count = reestimate_on_samples(
            model, layers, data.batch, [spec.name for spec in artifact.inputs], count, cfg.batch_size, on_batch)
        updated = [(name, m) for name, m in layers if name not in unused]
        if not updated:
            raise StageError(f"{stage}: none of the {len(layers)} BatchNorm layers runs in the model's forward pass")
        mean_change = torch.cat([(m.running_mean - before[n][0]).abs().flatten().double() for n, m in updated])
        var_change = torch.cat([(m.running_var - before[n][1]).abs().flatten().double() for n, m in updated])
        ctx.details["batchnorm"] = {
            "layers": len(updated),
            **({"not_run": unused} if unused else {}),
            "split": cfg.split,
            "samples": count,
            "batches": batch_count,
            "mean_abs_change_running_mean": float(mean_change.mean()),
            "mean_abs_change_running_var": float(var_change.mean()),
        }
        ctx.progress.update("saving")
        return _save(self, artifact, ctx, model)


# ------------------------------------------------------------------------------------------ recover.reconstruct


class RecoverReconstructConfig(PassConfig):
    reference: str = Field(
        default="@baseline",
        description="The unpruned model whose layer outputs are reproduced: '@baseline' or '@<earlier torch "
        "stage>' (quote it in YAML). Layers are matched by module name, which pruning keeps.")
    layers: list[str] | None = Field(
        default=None,
        description="Layers to refit: exact module names, or regular expressions searched in module names (a "
        f"pattern takes only the {REFITTABLE} it matches). Default: every {REFITTABLE} with fewer input "
        "channels than the reference's layer of the same name.")
    samples: int = Field(default=128, ge=1,
                         description="Calibration samples the layer inputs and reference outputs are taken from.")
    max_rows: int = Field(
        default=50_000, ge=1,
        description="Most rows of each least-squares system (one row per spatial position of a 1x1 conv, per "
        "token of a Linear); more are subsampled with the recipe's seed.")
    ridge: float = Field(
        default=1e-3, ge=0,
        description="Ridge strength, relative to the mean squared input: lambda = ridge * mean(diag(X^T X)). "
        "The bias is not regularized.")
    batch_size: int = Field(default=32, ge=1, description="Samples per forward pass.")

    @field_validator("reference")
    @classmethod
    def _is_reference(cls, value: str) -> str:
        if not value.startswith("@") or len(value) == 1:
            raise ValueError("reference must be '@baseline' or '@<earlier stage>' (quoted in YAML)")
        return value

    @field_validator("layers")
    @classmethod
    def _compiles(cls, layers: list[str] | None) -> list[str] | None:
        if layers is not None:
            if not layers:
                raise ValueError("layers is empty; leave it out to refit every pruned consumer")
            bad = first_bad_pattern(layers)
            if bad:
                raise ValueError(f"layers: {bad[0]!r} is neither a module name nor a valid regular expression "
                                 f"({bad[1]})")
        return layers


def refit_kind(module: "nn.Module") -> str | None:
    """'linear' or 'conv1x1' when the module's output is a plain matrix product of its input channels."""
    from torch import nn

    if isinstance(module, nn.Linear):
        return "linear"
    if (type(module) is nn.Conv2d and tuple(module.kernel_size) == (1, 1) and module.groups == 1
            and (module.padding_mode == "zeros" or module.padding in ((0, 0), "valid", "same"))):
        return "conv1x1"
    return None


def describe(module: "nn.Module") -> str:
    """The module's type with what makes a convolution unfit for a closed-form refit."""
    from torch import nn

    if isinstance(module, nn.modules.conv._ConvNd):
        kernel = "x".join(str(k) for k in module.kernel_size)
        extra = ", depthwise" if module.groups > 1 and module.groups == module.in_channels else ""
        if module.padding_mode != "zeros":
            extra += f", padding_mode {module.padding_mode}"
        return f"{type(module).__name__} (kernel {kernel}, groups {module.groups}{extra})"
    return type(module).__name__


def in_width(module: "nn.Module") -> int:
    return module.in_features if hasattr(module, "in_features") else module.in_channels


def out_width(module: "nn.Module") -> int:
    return module.out_features if hasattr(module, "out_features") else module.out_channels


def output_rows(kind: str, y: "torch.Tensor") -> "torch.Tensor":
    """The layer's output with one row per position (per token of a Linear, per pixel of a 1x1 conv)."""
    if kind == "linear":
        return y.reshape(-1, y.shape[-1])
    return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])


def input_rows(module: "nn.Module", kind: str, x: "torch.Tensor") -> "torch.Tensor":
    """The layer's input with one row per output position: the layer computes Y = X W^T + b row by row."""
    import torch.nn.functional as F

    if kind == "linear":
        return x.reshape(-1, x.shape[-1])
    padding = module.padding if not isinstance(module.padding, str) else (0, 0)
    if any(padding):
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    x = x[:, :, ::module.stride[0], ::module.stride[1]]
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


class _LayerReached(Exception):
    """Raised by a forward hook to stop a forward pass once the layer being refit has run."""


@dataclass
class NormalEquations:
    """Sums over the sampled rows: enough to solve the ridge regression and score any weights on them."""

    gram: "torch.Tensor"  # [X 1]^T [X 1], float64
    cross: "torch.Tensor"  # [X 1]^T Y_ref
    target_energy: float = 0.0  # ||Y_ref||^2
    error_before: float = 0.0  # ||Y_pruned - Y_ref||^2 with the current weights
    rows: int = 0

    def residual(self, theta: "torch.Tensor") -> float:
        """||[X 1] theta - Y_ref||^2 from the sums alone."""
        quadratic = float((theta * (self.gram @ theta)).sum())
        return quadratic - 2 * float((theta * self.cross).sum()) + self.target_energy


class RecoverReconstruct(Pass):
    """Refit the layers that consume pruned channels so they reproduce the unpruned model's outputs.

    For each chosen layer, in forward order: run the current (pruned, partly refit) model on calibration
    samples and record the layer's input X; run the reference model and record its same-named layer's output
    Y; then set [W b] to the ridge-regression solution of min ||X W^T + b - Y||^2 + lambda ||W||^2 (closed
    form, float64). Refitting in forward order means each layer is fit to the inputs the already refit
    layers before it produce, so errors are corrected rather than accumulated.

    Only layers whose output is a matrix product of their input channels qualify: nn.Linear and 1x1
    nn.Conv2d with groups 1. Their outputs must be as wide as the reference's (the refit reproduces every
    output channel); a layer whose outputs were pruned too is skipped and listed. A refit that would not
    lower the layer's error on the calibration rows is not applied (also listed).
    """

    name = "recover.reconstruct"
    summary = "Refit pruned layers' consumers (Linear, 1x1 conv) by least squares to match a reference's outputs."
    input_forms = ("torch",)
    output_form = "torch"
    needs = ("calibration",)
    Config = RecoverReconstructConfig

    def stage_references(self) -> tuple[str, ...]:
        return (self.config.reference[1:],)  # type: ignore[attr-defined]

    # -- choosing layers ------------------------------------------------------------------------------

    def _reference_artifact(self, ctx: PassContext) -> Artifact:
        ref = self.config.reference[1:]  # type: ignore[attr-defined]
        artifact = earlier_torch_artifact(ctx, ref, "reference", "it must be a torch artifact")
        _require_factory(artifact, ctx, self.name, what=f"reference '@{ref}'")
        return artifact

    def _choose(self, model: "nn.Module", reference: "nn.Module", ctx: PassContext) -> tuple[list[str], list[dict]]:
        """Names of the layers to refit, and the ones left out with the reason."""
        cfg: RecoverReconstructConfig = self.config  # type: ignore[assignment]
        stage = f"stage '{ctx.stage}'"
        modules, theirs = dict(model.named_modules()), dict(reference.named_modules())
        skipped: list[dict] = []
        if cfg.layers is None:
            chosen = [n for n, m in modules.items() if refit_kind(m) and type(theirs.get(n)) is type(m)
                      and in_width(m) < in_width(theirs[n])]
            if not chosen:
                raise StageError(
                    f"{stage}: no pruned 1x1 conv or Linear consumer: no {REFITTABLE} has fewer input channels "
                    f"than the layer of the same name in {cfg.reference}; was the model pruned after it? Name the "
                    "layers to refit in 'layers'")
        else:
            chosen = []
            for entry in cfg.layers:
                if entry in modules and entry:
                    if refit_kind(modules[entry]) is None:
                        raise StageError(
                            f"{stage}: layer '{entry}' is a {describe(modules[entry])}, which cannot be refit in "
                            f"closed form; {self.name} refits {REFITTABLE}")
                    chosen.append(entry)
                    continue
                hits = [n for n in modules if n and re.search(entry, n)]
                if not hits:
                    from optimizer.recipe import suggest

                    raise StageError(f"{stage}: layers: the model has no module '{entry}' and no module name "
                                     f"matches it as a pattern{suggest(entry, [n for n in modules if n])}")
                fit = [n for n in hits if refit_kind(modules[n])]
                if not fit:
                    raise StageError(f"{stage}: layers: {entry!r} matches no {REFITTABLE} (it matches "
                                     f"{', '.join(hits[:3])}{' ...' if len(hits) > 3 else ''})")
                chosen += fit
            chosen = list(dict.fromkeys(chosen))

        kept = []
        for name in chosen:
            ours, other = modules[name], theirs.get(name)
            if other is None:
                raise StageError(f"{stage}: layer '{name}' has no module of that name in {cfg.reference}")
            if type(other) is not type(ours):
                raise StageError(f"{stage}: layer '{name}' is a {type(ours).__name__} but a "
                                 f"{type(other).__name__} in {cfg.reference}")
            if out_width(ours) != out_width(other):
                skipped.append({"name": name, "reason": f"its outputs were pruned too ({out_width(ours)} of "
                                f"{out_width(other)}): the refit reproduces every output channel of the reference"})
                continue
            kept.append(name)
        return kept, skipped

    # -- one layer --------------------------------------------------------------------------------------

    def _collect(self, model: "nn.Module", name: str, batches: list[tuple["torch.Tensor", ...]],
                 reference_outputs: list[list["torch.Tensor"]], rng: "np.random.Generator", total_samples: int,
                 stage: str) -> NormalEquations:
        """Run the current model over the batches, up to this layer only, and sum up its least-squares system.

        The reference's outputs of this layer were recorded once for all layers (``reference_outputs``: per
        batch, one tensor per call of the layer); the forward pass of the pruned model stops right after the
        layer's last call, since nothing later changes its input.
        """
        import torch

        cfg: RecoverReconstructConfig = self.config  # type: ignore[assignment]
        ours = model.get_submodule(name)
        kind = refit_kind(ours)
        assert kind is not None
        seen: list[tuple] = []
        calls = [len(per_batch) for per_batch in reference_outputs]

        def record_ours(module, args, output):
            seen.append((args[0].detach(), output.detach()))
            if len(seen) >= expected:
                raise _LayerReached

        width = in_width(ours) + 1
        eq = NormalEquations(gram=torch.zeros(width, width, dtype=torch.float64),
                             cross=torch.zeros(width, out_width(ours), dtype=torch.float64))
        rows_seen = rows_taken = 0
        fraction: float | None = None
        handle = ours.register_forward_hook(record_ours)
        try:
            for batch_index, inputs in enumerate(batches):
                seen.clear()
                expected = max(1, calls[batch_index])
                with contextlib.suppress(_LayerReached), torch.no_grad():  # stopped once the layer has run
                    model(*inputs)
                wanted = reference_outputs[batch_index]
                if len(seen) != len(wanted):
                    raise StageError(f"{stage}: layer '{name}' runs {len(seen)} times per forward pass here but "
                                     f"{len(wanted)} times in the reference")
                for (x, y_ours), y_ref in zip(seen, wanted):
                    if y_ref.shape != y_ours.shape:
                        raise StageError(f"{stage}: layer '{name}' gives outputs of shape {list(y_ours.shape)} here "
                                         f"but {list(y_ref.shape)} in the reference")
                    x_rows = input_rows(ours, kind, x)
                    y_rows, y_ref = output_rows(kind, y_ours), output_rows(kind, y_ref)
                    if len(x_rows) != len(y_rows):
                        raise StageError(f"{stage}: layer '{name}': {len(x_rows)} input positions for "
                                         f"{len(y_rows)} outputs; {self.name} cannot line them up")
                    count = len(x_rows)
                    if fraction is None:  # rows per sample are known after the first batch
                        fraction = min(1.0, cfg.max_rows / (count / len(inputs[0]) * total_samples))
                    rows_seen += count
                    take = min(count, round(fraction * rows_seen) - rows_taken)
                    if take <= 0:
                        continue
                    if take < count:
                        index = torch.from_numpy(rng.choice(count, size=take, replace=False)).sort().values
                        x_rows, y_rows, y_ref = x_rows[index], y_rows[index], y_ref[index]
                    rows_taken += take
                    x64 = torch.cat([x_rows.double(), torch.ones(take, 1, dtype=torch.float64)], dim=1)
                    y_ref64 = y_ref.double()
                    eq.gram += x64.T @ x64
                    eq.cross += x64.T @ y_ref64
                    eq.target_energy += float((y_ref64 ** 2).sum())
                    eq.error_before += float(((y_rows.double() - y_ref64) ** 2).sum())
        finally:
            handle.remove()
        eq.rows = rows_taken
        return eq

    @staticmethod
    def _reference_outputs(reference: "nn.Module", names: list[str],
                           batches: list) -> tuple[dict[str, list[list]], list["torch.Tensor"]]:
        """One pass of the reference over the batches: every chosen layer's outputs per batch, and the model's
        own output per batch (what the whole-model error before and after the refit is measured against)."""
        import torch

        recorded: dict[str, list[list]] = {name: [] for name in names}
        finals: list[torch.Tensor] = []
        current: dict[str, list] = {}
        handles = [reference.get_submodule(name).register_forward_hook(
            lambda module, args, output, n=name: current[n].append(output.detach())) for name in names]
        try:
            for inputs in batches:
                for name in names:
                    current[name] = []
                with torch.no_grad():
                    finals.append(first_output(reference(*inputs)).double())
                for name in names:
                    recorded[name].append(current[name])
        finally:
            for handle in handles:
                handle.remove()
        return recorded, finals

    def _solve(self, eq: NormalEquations, has_bias: bool) -> "torch.Tensor":
        """theta = [W^T; b] minimizing ||[X 1] theta - Y||^2 + lambda ||W||^2 (bias row zero without a bias)."""
        import torch

        cfg: RecoverReconstructConfig = self.config  # type: ignore[assignment]
        width = eq.gram.shape[0] - 1
        size = width + 1 if has_bias else width
        gram, cross = eq.gram[:size, :size].clone(), eq.cross[:size]
        lam = cfg.ridge * float(torch.diagonal(eq.gram)[:width].mean())
        gram[range(width), range(width)] += lam
        try:
            theta = torch.linalg.solve(gram, cross)
        except RuntimeError:  # singular (dead input channels and no ridge): the minimum-norm solution
            theta = torch.linalg.pinv(gram) @ cross
        if not has_bias:
            theta = torch.cat([theta, torch.zeros(1, theta.shape[1], dtype=theta.dtype)])
        return theta

    # -- run ---------------------------------------------------------------------------------------------

    def run(self, artifact: Artifact, ctx: PassContext) -> Artifact:
        import numpy as np
        import torch

        from optimizer.runtimes.torch_eager import load_torch_module

        cfg: RecoverReconstructConfig = self.config  # type: ignore[assignment]
        stage = f"stage '{ctx.stage}'"
        _require_factory(artifact, ctx, self.name)
        reference_artifact = self._reference_artifact(ctx)
        torch.set_num_threads(max(1, ctx.threads))
        ctx.progress.update("loading the models")
        model = load_torch_module(artifact).eval()
        reference = load_torch_module(reference_artifact).eval()
        names, skipped = self._choose(model, reference, ctx)

        data = ctx.data.calibration()
        count = min(cfg.samples, len(data))
        batches = [_input_tensors(data.batch(start, stop), artifact)
                   for start, stop in _batch_bounds(count, cfg.batch_size)]

        # Forward order: the order in which the chosen layers first run.
        order: list[str] = []
        handles = [model.get_submodule(n).register_forward_hook(
            lambda module, args, output, n=n: order.append(n) if n not in order else None) for n in names]
        try:
            with torch.no_grad():
                model(*batches[0])
        finally:
            for handle in handles:
                handle.remove()
        skipped += [{"name": n, "reason": "never runs as a module in forward (its parent reads the weights directly)"}
                    for n in names if n not in order]
        if not order:
            raise StageError(f"{stage}: none of the layers to refit could be refit: "
                             + "; ".join(f"{s['name']}: {s['reason']}" for s in skipped[:3]))

        rng = np.random.default_rng(ctx.seed)
        refit: list[dict[str, Any]] = []
        ctx.progress.update("recording the reference's layer outputs")
        reference_outputs, reference_finals = self._reference_outputs(reference, order, batches)
        output_before = self._output_error(model, reference_finals, batches)
        for index, name in enumerate(order):
            ctx.progress.update(f"refitting {name} ({index + 1} of {len(order)})", index / (len(order) + 1))
            layer = model.get_submodule(name)
            eq = self._collect(model, name, batches, reference_outputs.pop(name), rng, count, stage)
            energy = max(eq.target_energy, 1e-30)
            has_bias = layer.bias is not None
            theta = self._solve(eq, has_bias)
            before, after = eq.error_before / energy, eq.residual(theta) / energy
            record: dict[str, Any] = {
                "name": name,
                "type": type(layer).__name__,
                "in_channels_before": in_width(reference.get_submodule(name)),
                "in_channels_after": in_width(layer),
                "out_channels": out_width(layer),
                "rows": eq.rows,
                "relative_mse_before": before,
                "relative_mse_after": after,
            }
            if not after < before:
                skipped.append({"name": name, "reason": f"the refit would not lower the error on the calibration "
                                f"rows (relative MSE {before:.4g} -> {after:.4g}); weights kept"})
                continue
            with torch.no_grad():
                weight = theta[:-1].T.to(layer.weight.dtype)
                layer.weight.copy_(weight.reshape(layer.weight.shape))
                if has_bias:
                    layer.bias.copy_(theta[-1].to(layer.bias.dtype))
            refit.append(record)

        ctx.progress.update("measuring the refit model", len(order) / (len(order) + 1))
        output_after = self._output_error(model, reference_finals, batches)
        ctx.details["reconstruction"] = {
            "reference": cfg.reference,
            "samples": count,
            "ridge": cfg.ridge,
            "layers": refit,
            "skipped": skipped,
            "output_relative_mse_before": output_before,
            "output_relative_mse_after": output_after,
        }
        ctx.progress.update("saving")
        return _save(self, artifact, ctx, model)

    @staticmethod
    def _output_error(model: "nn.Module", reference_finals: list["torch.Tensor"], batches: list) -> float:
        """||out - out_ref||^2 / ||out_ref||^2 of the whole model over the calibration samples."""
        import torch

        error = energy = 0.0
        with torch.no_grad():
            for inputs, theirs in zip(batches, reference_finals):
                ours = first_output(model(*inputs)).double()
                error += float(((ours - theirs) ** 2).sum())
                energy += float((theirs ** 2).sum())
        return error / max(energy, 1e-30)


__all__ = ["RecoverBatchNorm", "RecoverBatchNormConfig", "RecoverReconstruct", "RecoverReconstructConfig"]
