"""The training loop shared by ``distill.kd`` and ``finetune``: seeded, CPU-first, optionally distributed.

One function, :func:`train`, runs the loop in-process or, started by ``torch.distributed.run`` (see
``optimizer/training_worker.py``), in every rank of a DistributedDataParallel job. What it does:

* **Data.** Batches are cut from in-memory arrays (:class:`optimizer.data.datasets.ArrayData`). Each epoch
  one permutation is drawn from ``numpy.random.default_rng(seed)``, identical on every rank; global batch
  ``k`` is ``perm[k*B:(k+1)*B]`` and rank ``r`` takes ``[r::world_size]`` of it, so ``batch_size`` is the
  *global* batch and one process and N processes see the same samples per optimizer step. A last partial
  batch too small to give every rank two samples is dropped (BatchNorm in train mode needs more than one).
* **Loss.** Without a teacher: cross-entropy (the fine-tuning control). With one (Hinton et al.):
  ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``, plus optional feature
  distillation: for each ``{student, teacher, weight}`` pair, forward hooks capture both modules' outputs
  and ``weight * MSE(proj(student), teacher)`` is added, where ``proj`` is a learned 1x1 convolution
  (4-D features) or linear map (2-D) when the channel counts differ (and an adaptive average pool when the
  spatial sizes differ). Projections are trained with the student and discarded afterwards.
  The student is in train mode (BatchNorm uses batch statistics and updates its running ones); the
  teacher is in eval mode and runs under ``no_grad``.
* **Optimizer and schedule.** ``sgd`` (momentum, weight decay) or ``adamw``; the learning rate follows
  ``constant``, ``cosine`` (to zero) or ``onecycle`` (from lr/25 up, then cosine down to lr/1e4), each
  after a linear warm-up of ``warmup_fraction`` of the steps (``onecycle`` warms up over at least 30 %).
* **Model selection.** Top-1 on a fixed *selection* set is measured before the first step, after every
  epoch (or every ``eval_every`` steps) and at the end; an in-memory copy of the best state is kept
  (ties keep the earlier one, so the incoming weights win if training never helps) and restored at the
  end. ``patience`` evaluations without improvement stop training early.
* **Frugal settings** (for recovering a pruned network in minutes on a small CPU):

  - ``cache_teacher`` (distillation only, :class:`KDSettings`): the teacher's logits for every training
    sample are computed once before the loop (eval mode, ``no_grad``, in batches; sharded over the ranks
    and gathered when distributed), kept on the CPU (samples x classes x 4 bytes), and each step reads
    its batch's rows by sample index instead of running the teacher. This is exact: the loop feeds every
    sample unchanged (no augmentation, no random crop or noise; the only randomness is the order of the
    samples) and the teacher is in eval mode, so its output for a sample is a function of that sample
    alone. The only possible difference is float rounding: the cache is computed in other batch
    compositions than the training steps, and a kernel may sum in another order for another batch shape
    (on the example's CPU the trained weights came out bit-identical). Feature distillation needs the teacher's intermediate features of each batch, so it
    cannot use the cache (the config refuses the pair).
  - ``train_only`` (:class:`TrainingConfig`): regular expressions searched (``re.search``) in the
    student's parameter names; only matching parameters get ``requires_grad`` and go to the optimizer,
    the others are frozen (bit-identical afterwards). Every pattern must match at least one parameter.
    A BatchNorm module none of whose parameters trains (also one without affine parameters) is kept in
    eval mode during training: it normalizes with its running statistics and does not update them.
    Otherwise the frozen layers' statistics would drift towards the training batches while the weights
    around them cannot adapt, and their outputs would no longer be what the deployed model computes.
    Autograd builds no graph in front of the first trained parameter, so a frozen front costs its
    forward only. Feature projections (learned with ``feature_layers``) always train.
  - ``cache_frozen_prefix`` (:class:`TrainingConfig`, with ``train_only``): the frozen front of the student
    (every node before the trained layers, found by tracing with ``torch.fx``; see
    :mod:`optimizer.frozen_prefix`) runs once over the training and selection samples, in eval mode, and
    the loop then trains and evaluates the rest of the student on the front's outputs, kept on the CPU.
    Exact for the same reasons as the teacher cache (no augmentation; the front's BatchNorm layers are
    frozen and in eval mode either way); tests/test_distill_frugal.py checks that the trained weights match the
    uncached run's. For MobileNetV2 training its last five blocks (batch 64, 2 threads, idle machine), a step
    costs 0.20 of an uncached one (``python benchmarks/frozen_prefix.py``: 195 against 959 ms).
  - ``max_minutes`` (:class:`TrainingConfig`): a wall-clock budget for the training steps (the clock
    starts at the first step, after the teacher cache and the step-0 evaluation). When it is spent,
    training stops after the current step, the selection set is evaluated (unless that step was just
    evaluated) and the best state seen is kept, as at any end. The learning-rate schedule is still
    planned over ``epochs``/``steps``, so a run the budget stops ends before the schedule has decayed:
    set ``steps`` to what the budget allows when the schedule matters. When distributed, rank 0's clock
    decides and the decision is broadcast each step, so that all ranks stop at the same step.

* **Threads.** Training is throughput work, unlike the single-stream latency that ``evaluate.latency.
  threads`` describes, so the loop uses every core this process may run on (``os.sched_getaffinity``),
  divided among the processes of a distributed job; ``threads`` in the config overrides that. The caller's
  torch thread count is restored afterwards.
* **Distributed.** With ``WORLD_SIZE > 1`` in the environment (torchrun), the process group is created
  (``gloo`` on the CPU, ``nccl`` when ``device: cuda`` is asked and CUDA is present), the student is
  wrapped in DistributedDataParallel, logged losses are averaged over ranks, and the selection set is
  split over the ranks whose correct counts are summed, so every rank computes the same accuracy and
  takes the same keep/stop decisions. BatchNorm statistics are per rank during a step (DDP broadcasts
  rank 0's buffers before each forward, and the loop broadcasts them again before evaluating), so all
  ranks evaluate and keep identical weights. Only rank 0 is meant to write files (see
  ``DistInfo.is_main``). The process group is destroyed at the end if this module created it.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from optimizer.errors import RecipeError, StageError
from optimizer.models import try_eval
from optimizer.passes.base import PassConfig, first_bad_pattern

if TYPE_CHECKING:
    import torch

    from optimizer.data.datasets import ArrayData

ProgressFn = Callable[[str, float], None]


# -------------------------------------------------------------------------------------------- config


class FeaturePair(BaseModel):
    """One feature-distillation term: MSE between a student module's output and a teacher module's."""

    model_config = ConfigDict(extra="forbid")
    student: str = Field(description="Student module name, as in model.named_modules(), e.g. 'layer2'.")
    teacher: str = Field(description="Teacher module name whose output the student's should match.")
    weight: float = Field(default=1.0, ge=0, description="Weight of this MSE term in the loss.")


class TrainingConfig(PassConfig):
    """Settings of the training loop; ``distill.kd`` and ``finetune`` add theirs to these."""

    epochs: int = Field(default=2, ge=1, description="Passes over the training samples (unless 'steps' is set).")
    steps: int | None = Field(default=None, ge=1, description="Optimizer steps instead of epochs.")
    batch_size: int = Field(default=128, ge=2, description="Global batch size (split over 'processes').")
    optimizer: Literal["sgd", "adamw"] = Field(default="adamw", description="'sgd' (with momentum) or 'adamw'.")
    lr: float = Field(default=1e-3, gt=0, description="Peak learning rate.")
    momentum: float = Field(default=0.9, ge=0, lt=1, description="SGD momentum (sgd only).")
    weight_decay: float = Field(default=1e-4, ge=0, description="Weight decay (decoupled for adamw).")
    schedule: Literal["constant", "cosine", "onecycle"] = Field(
        default="cosine", description="Learning-rate schedule after the warm-up.")
    warmup_fraction: float = Field(default=0.05, ge=0, lt=1, description="Fraction of steps of linear warm-up.")
    eval_every: int | None = Field(
        default=None, ge=1, description="Evaluate for model selection every this many steps (default: every epoch).")
    patience: int | None = Field(
        default=None, ge=1, description="Stop after this many evaluations without improvement (default: never).")
    selection_split: Literal["train_holdout", "eval"] = Field(
        default="train_holdout",
        description="Where the model-selection samples come from: 'train_holdout' (a seeded slice of the train "
                    "split, held out of training; the reported eval accuracy stays unbiased) or 'eval' (a seeded "
                    "subset of the eval split; picking the best checkpoint on the data that is then reported "
                    "biases the reported figure slightly upwards).")
    eval_samples: int = Field(default=1000, ge=1, description="Size of the model-selection set.")
    train_samples: int | None = Field(
        default=None, ge=1, description="Use at most this many training samples (a seeded subset).")
    processes: int = Field(
        default=1, ge=1, description="Training processes; more than 1 runs DistributedDataParallel through "
                                     "torch.distributed.run (gloo on the CPU).")
    threads: int | None = Field(
        default=None, ge=1, description="Torch threads per training process (default: all usable cores / processes).")
    device: Literal["cpu", "cuda"] = Field(default="cpu", description="Train on the CPU or on CUDA (nccl when distributed).")
    train_only: list[str] = Field(
        default_factory=list,
        description="Train only the parameters whose names (as in model.named_parameters(), e.g. 'fc.weight') "
                    "match one of these regular expressions (re.search); freeze the others. BatchNorm layers "
                    "with no trained parameter stay in eval mode (running statistics kept). Each pattern must "
                    "match a parameter. Empty (default): train everything.")
    cache_frozen_prefix: bool = Field(
        default=False,
        description="With train_only: run the frozen front of the student (every layer before the trained ones, "
                    "found by tracing with torch.fx) once over the training and selection samples, keep what it "
                    "hands to the trained layers, and train only the rest (exact: no augmentation, frozen "
                    "BatchNorm layers in eval mode). Memory: samples x the front's output size. Not with "
                    "feature_layers.")
    max_minutes: float | None = Field(
        default=None, gt=0,
        description="Wall-clock budget of the training steps in minutes: when spent, training stops after the "
                    "current step, evaluates on the selection set and keeps the best state seen (default: none).")

    @field_validator("train_only")
    @classmethod
    def _patterns_compile(cls, value: list[str]) -> list[str]:
        bad = first_bad_pattern(value)
        if bad:
            raise ValueError(f"train_only: {bad[0]!r} is not a regular expression ({bad[1]})")
        return value

    @model_validator(mode="after")
    def _epochs_or_steps(self) -> "TrainingConfig":
        if self.steps is not None and "epochs" in self.model_fields_set:
            raise ValueError("set 'epochs' or 'steps', not both")
        if self.cache_frozen_prefix and not self.train_only:
            raise ValueError("cache_frozen_prefix needs train_only: with every layer training there is no frozen "
                             "front to run once")
        if self.batch_size % self.processes:
            raise ValueError(f"batch_size {self.batch_size} must be divisible by processes {self.processes} "
                             "(it is the global batch, split evenly over the processes)")
        return self


@dataclass
class KDSettings:
    """The distillation part of the loss; absent for plain fine-tuning."""

    temperature: float = 4.0
    alpha: float = 0.7
    feature_layers: list[FeaturePair] = field(default_factory=list)
    #: Compute the teacher's logits for every training sample once, before the loop (see the module doc).
    cache_teacher: bool = False


# ------------------------------------------------------------------------------------------ distributed


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def single_process(device: str = "cpu") -> DistInfo:
    """One process, whatever the environment says (the in-process path of the passes)."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise RecipeError("device: cuda was asked but CUDA is not available; use device: cpu")
    return DistInfo(device="cuda:0" if device == "cuda" else "cpu")


def init_distributed(device: str = "cpu") -> DistInfo:
    """Join the torchrun job described by the environment (WORLD_SIZE > 1), or describe a single process."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda" and not torch.cuda.is_available():
        raise RecipeError("device: cuda was asked but CUDA is not available; use device: cpu")
    dev = f"cuda:{local_rank}" if device == "cuda" else "cpu"
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    if world <= 1:
        return DistInfo(device=dev)
    import torch.distributed as dist

    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
        owns = True
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=dev,
                    owns_group=owns)


def finish_distributed(info: DistInfo) -> None:
    if info.owns_group:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


# ------------------------------------------------------------------------------------------- schedule


def lr_factor(step: int, total: int, schedule: str, warmup_fraction: float) -> float:
    """Multiplier of the peak lr for ``step`` (0-based) of ``total``."""
    if schedule == "onecycle":
        warm = max(1, round(max(warmup_fraction, 0.3) * total))
        if step < warm:
            return 1 / 25 + (1 - 1 / 25) * step / warm
        progress = (step - warm) / max(1, total - warm)
        low = 1e-4
        return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress))
    warm = round(warmup_fraction * total)
    if step < warm:
        return (step + 1) / (warm + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warm) / max(1, total - warm)
    return 0.5 * (1 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------ feature taps


class _Tap:
    """Forward hooks that keep the latest output of named modules."""

    def __init__(self, model: "torch.nn.Module", names: list[str], *, role: str):
        modules = dict(model.named_modules())
        self.values: dict[str, Any] = {}
        self.enabled = True
        self.handles = []
        for name in names:
            if name not in modules:
                known = [n for n in modules if n][:12]
                raise RecipeError(f"feature_layers: the {role} has no module '{name}'; it has {known}"
                                  f"{' ...' if len(modules) > 13 else ''}")
            self.handles.append(modules[name].register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if self.enabled:
                out = output[0] if isinstance(output, (tuple, list)) else output
                # A clone: an in-place op after this module (ReLU(inplace=True)) must not change what we keep.
                self.values[name] = out.clone()
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _projection(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], pair: FeaturePair):
    from torch import nn

    if len(student_shape) != len(teacher_shape):
        raise RecipeError(f"feature_layers: student '{pair.student}' gives {list(student_shape[1:])} features, "
                          f"teacher '{pair.teacher}' {list(teacher_shape[1:])}; pick modules of the same rank")
    layers: list[nn.Module] = []
    if len(student_shape) == 4:
        if student_shape[2:] != teacher_shape[2:]:
            layers.append(nn.AdaptiveAvgPool2d(tuple(teacher_shape[2:])))
        if student_shape[1] != teacher_shape[1]:
            layers.append(nn.Conv2d(student_shape[1], teacher_shape[1], 1, bias=False))
    elif len(student_shape) == 2:
        if student_shape[1] != teacher_shape[1]:
            layers.append(nn.Linear(student_shape[1], teacher_shape[1], bias=False))
    elif student_shape != teacher_shape:
        raise RecipeError(f"feature_layers: cannot match {list(student_shape[1:])} to {list(teacher_shape[1:])} "
                          f"({pair.student} -> {pair.teacher}); use 2-D or 4-D features")
    return nn.Sequential(*layers) if layers else nn.Identity()


def _wrapper_class():
    from torch import nn

    class StudentWithProjections(nn.Module):
        """The student plus the feature projections, so that DDP synchronizes both."""

        def __init__(self, student: nn.Module, tap: _Tap | None, pairs: list[FeaturePair],
                     projections: nn.ModuleList):
            super().__init__()
            self.student = student
            self.projections = projections
            self._tap = tap
            self._pairs = pairs

        def forward(self, *inputs):
            logits = self.student(*inputs)
            if isinstance(logits, (tuple, list)):
                logits = logits[0]
            features = [proj(self._tap.values[pair.student]) for pair, proj in zip(self._pairs, self.projections)] \
                if self._tap is not None else []
            return logits, features

    return StudentWithProjections


# ----------------------------------------------------------------------------------------------- loop


@dataclass
class TrainResult:
    history: list[dict[str, Any]]
    best_eval_acc: float
    best_step: int
    final_selection_acc: float
    steps: int
    epochs: float
    stopped_early: bool
    train_seconds: float
    world_size: int
    threads_per_process: int
    train_samples: int
    selection_samples: int
    #: Seconds spent computing the teacher cache (``cache_teacher``), None when the teacher ran every step.
    teacher_cache_seconds: float | None = None
    #: Scalars of the student's parameters that trained (``train_only``) and in all.
    trained_parameters: int = 0
    total_parameters: int = 0
    #: Whether ``max_minutes`` ended training, and after which step (None when it did not).
    budget_stopped: bool = False
    budget_stop_step: int | None = None
    #: Seconds spent running the frozen front once (``cache_frozen_prefix``) and its output size per sample.
    prefix_cache_seconds: float | None = None
    prefix_bytes_per_sample: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _logits(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _evaluate(model: "torch.nn.Module", data: "ArrayData", names: list[str], info: DistInfo, *,
              layout=None, batch_size: int = 500) -> float:
    """Top-1 of ``model`` in eval mode on ``data``, split over the ranks, the same figure on every rank."""
    import torch

    model.eval()
    index = np.arange(info.rank, len(data), info.world_size)
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(index), batch_size):
            part = index[start:start + batch_size]
            xs = [torch.from_numpy(np.ascontiguousarray(data.inputs[n][part])).to(info.device) for n in names]
            if layout is not None:
                xs = [_layout(x, layout) for x in xs]
            pred = _logits(model(*xs)).argmax(1).cpu().numpy()
            correct += int((pred == data.labels[part]).sum())
    counts = torch.tensor([correct, len(index)], dtype=torch.float64)
    if info.distributed:
        import torch.distributed as dist

        counts = counts.to(info.device)
        dist.all_reduce(counts)
        counts = counts.cpu()
    return float(counts[0] / counts[1])


def _sync_buffers(model: "torch.nn.Module", info: DistInfo) -> None:
    """Give every rank rank 0's BatchNorm statistics (each rank updated them with its own batches)."""
    if info.distributed:
        import torch.distributed as dist

        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)


def _select_trained(student: "torch.nn.Module", patterns: list[str], *, where: str) -> dict[str, bool]:
    """Which student parameters train, by name: all without ``patterns``, else those any pattern matches.

    A pattern that matches nothing is almost always a typo (or a name from another architecture); training
    would then silently freeze what the recipe meant to train, so it is an error naming the pattern.
    """
    names = [name for name, _ in student.named_parameters()]
    if not patterns:
        return dict.fromkeys(names, True)
    compiled = [(pattern, re.compile(pattern)) for pattern in patterns]
    for pattern, regex in compiled:
        if not any(regex.search(name) for name in names):
            examples = names[:6]
            raise RecipeError(f"{where}: train_only pattern {pattern!r} matches no parameter of the student; "
                              f"its parameters are named like {examples}{' ...' if len(names) > 6 else ''}")
    return {name: any(regex.search(name) for _, regex in compiled) for name in names}


def _frozen_batchnorms(student: "torch.nn.Module") -> list["torch.nn.Module"]:
    """BatchNorm modules none of whose parameters trains: they stay in eval mode (see the module doc)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    return [m for m in student.modules()
            if isinstance(m, _BatchNorm) and not any(p.requires_grad for p in m.parameters(recurse=False))]


def _teacher_cache(teacher: "torch.nn.Module", inputs: dict[str, "torch.Tensor"], names: list[str],
                   info: DistInfo, *, layout, batch_size: int = 512) -> "torch.Tensor":
    """The teacher's logits for every training sample, in sample order, on the CPU (see :func:`_outputs_once`)."""
    return _outputs_once(teacher, inputs, names, info, layout=layout, batch_size=batch_size,
                         pick=lambda out: [_logits(out).float()])[0]


def _outputs_once(module: "torch.nn.Module", inputs: dict[str, "torch.Tensor"], names: list[str],
                  info: DistInfo, *, layout, pick: Callable[[Any], list["torch.Tensor"]],
                  batch_size: int = 512) -> list["torch.Tensor"]:
    """``pick(module(batch))`` for every sample, in sample order, concatenated on the CPU.

    Computed under ``no_grad`` (not ``inference_mode``: the rows later enter the loss, whose backward may keep
    them, and inference tensors cannot be saved for backward), with ``module`` in whatever mode the caller set.
    When distributed, each rank computes one contiguous shard and the shards are gathered, so the pass costs
    each rank 1/world_size of one pass over the data and every rank ends up with the same full tables.
    """
    import torch

    total = len(next(iter(inputs.values())))
    shard = math.ceil(total / info.world_size)
    start, stop = min(total, info.rank * shard), min(total, (info.rank + 1) * shard)
    parts: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for lo in range(start, stop, batch_size):
            hi = min(stop, lo + batch_size)
            xs = [_layout(inputs[n][lo:hi].to(info.device), layout) for n in names]
            parts.append([value.detach() for value in pick(module(*xs))])
        if not info.distributed:
            return [torch.cat([part[i] for part in parts]).cpu() for i in range(len(parts[0]))]
        import torch.distributed as dist

        # Every rank needs each table's row shape even with an empty shard (more ranks than samples): take it
        # from one probe row, computed on every rank.
        probe = pick(module(*[_layout(inputs[n][:1].to(info.device), layout) for n in names]))
        tables = []
        for i, example in enumerate(probe):
            local = torch.zeros((shard, *example.shape[1:]), dtype=example.dtype, device=info.device)
            if parts:
                local[:stop - start] = torch.cat([part[i] for part in parts])
            gathered = [torch.empty_like(local) for _ in range(info.world_size)]
            dist.all_gather(gathered, local.contiguous())
            tables.append(torch.cat(gathered)[:total].cpu())
        return tables


def _layout(x: "torch.Tensor", layout) -> "torch.Tensor":
    """``x`` in ``layout`` when it is 4-D (channels-last applies to images only), else contiguous."""
    import torch

    return x.contiguous(memory_format=layout if x.dim() == 4 else torch.contiguous_format)


def _frozen_front_cache(student, frozen_bns, inputs, names, selection, info: DistInfo, *, layout, where: str,
                        progress: ProgressFn):
    """Run the student's frozen front once (``cache_frozen_prefix``): (suffix module, train inputs and names,
    selection data), all in terms of the front's outputs. See :mod:`optimizer.frozen_prefix`."""
    import torch

    from optimizer.data.datasets import ArrayData
    from optimizer.frozen_prefix import split_frozen_prefix

    total = len(next(iter(inputs.values())))
    probe = [_layout(inputs[n][:2].to(info.device), layout) for n in names]
    split = split_frozen_prefix(student, frozen_bns, probe, where=where)
    split.prefix.eval()  # every module in it is frozen: eval mode is what training would run
    row_bytes = split.bytes_per_sample
    needed = row_bytes * (total + len(selection))
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > physical // 2:
        raise RecipeError(f"{where}: cache_frozen_prefix would keep {needed / 2**30:.1f} GiB of the frozen front's "
                          f"outputs ({row_bytes} bytes per sample), over half of this machine's memory; lower "
                          "train_samples or train more layers")
    progress(f"running the frozen front once over {total} samples (cache_frozen_prefix)", 0.0)
    train_tables = _outputs_once(split.prefix, inputs, names, info, layout=layout, pick=list)
    selection_inputs = {n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in selection.inputs.items()}
    # Every rank evaluates its own slice of the selection set, so each keeps the whole (small) table.
    selection_tables = _outputs_once(split.prefix, selection_inputs, names, DistInfo(device=info.device),
                                     layout=layout, pick=list)
    cached_inputs = dict(zip(split.boundary, train_tables))
    cached_selection = ArrayData({n: t.numpy() for n, t in zip(split.boundary, selection_tables)}, selection.labels)
    return split.suffix, cached_inputs, list(split.boundary), cached_selection, row_bytes


def train(
    student: "torch.nn.Module",
    train_data: "ArrayData",
    selection: "ArrayData",
    cfg: TrainingConfig,
    *,
    seed: int,
    teacher: "torch.nn.Module | None" = None,
    kd: KDSettings | None = None,
    progress: ProgressFn | None = None,
    dist_info: DistInfo | None = None,
    where: str = "training",
) -> TrainResult:
    """Train ``student`` in place (the best state by selection top-1 is loaded at the end).

    ``dist_info=None`` joins a torchrun job when the environment describes one (and leaves it at the
    end); pass ``DistInfo()`` to force a single process.
    """
    import torch
    import torch.nn.functional as F

    info = dist_info if dist_info is not None else init_distributed(cfg.device)
    previous_threads = torch.get_num_threads()
    threads = cfg.threads or max(1, usable_cores() // max(1, info.world_size))
    torch.set_num_threads(threads)
    try:
        return _train(student, train_data, selection, cfg, seed=seed, teacher=teacher,
                      kd=kd or KDSettings(), progress=progress or (lambda d, f: None), info=info,
                      threads=threads, where=where, F=F)
    finally:
        torch.set_num_threads(previous_threads)
        if dist_info is None:
            finish_distributed(info)


def _train(student, train_data, selection, cfg: TrainingConfig, *, seed, teacher, kd: KDSettings, progress, info,
           threads, where, F) -> TrainResult:
    import torch
    from torch import nn

    started = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    names = list(train_data.inputs)
    inputs = {n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in train_data.inputs.items()}
    labels = torch.from_numpy(np.asarray(train_data.labels, dtype=np.int64))
    total_samples = len(labels)
    batch = cfg.batch_size
    world = info.world_size
    full, rest = divmod(total_samples, batch)
    steps_per_epoch = full + (1 if rest >= 2 * world else 0)
    if steps_per_epoch == 0:
        raise RecipeError(f"{where}: {total_samples} training samples are fewer than one batch of {batch}; "
                          "lower batch_size or use more samples")
    total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch
    epochs_total = math.ceil(total_steps / steps_per_epoch)

    # Image batches in channels-last layout: oneDNN's convolutions run several times faster on the CPU
    # (about 6x for the example ResNet's training step). Only the memory layout changes, not the values.
    layout = torch.channels_last if all(a.dim() == 4 for a in inputs.values()) else torch.contiguous_format
    student.to(info.device, memory_format=layout)

    # train_only: freeze what no pattern names (before DDP wraps the student: DDP reduces only what trains).
    requires_grad_before = {name: p.requires_grad for name, p in student.named_parameters()}
    if cfg.train_only:
        trained = _select_trained(student, cfg.train_only, where=where)
        for name, parameter in student.named_parameters():
            parameter.requires_grad_(trained[name])
    frozen_bns = _frozen_batchnorms(student) if cfg.train_only else []
    trained_parameters = sum(p.numel() for p in student.parameters() if p.requires_grad)
    total_parameters = sum(p.numel() for p in student.parameters())

    if teacher is not None:
        teacher.to(info.device, memory_format=layout)
        try_eval(teacher)  # the teacher stays in eval mode: only the student wrapper is switched to train()
        for p in teacher.parameters():
            p.requires_grad_(False)

    # Feature distillation: hooks on both models, projections sized by one dry forward.
    pairs = list(kd.feature_layers) if teacher is not None else []
    s_tap = t_tap = None
    projections = nn.ModuleList()
    if pairs:
        try:
            s_tap = _Tap(student, [p.student for p in pairs], role="student")
            t_tap = _Tap(teacher, [p.teacher for p in pairs], role="teacher")
        except RecipeError as exc:
            raise RecipeError(f"{where}: {exc}") from None
        probe = [inputs[n][:2].to(info.device) for n in names]
        was_training = student.training
        student.eval()
        with torch.no_grad():
            student(*probe)
            teacher(*probe)
        student.train(was_training)
        for pair in pairs:
            try:
                projections.append(_projection(tuple(s_tap.values[pair.student].shape),
                                               tuple(t_tap.values[pair.teacher].shape), pair))
            except RecipeError as exc:
                raise RecipeError(f"{where}: {exc}") from None
        projections.to(info.device, memory_format=layout)

    # cache_teacher: one teacher pass over the training samples replaces one per step.
    cached_logits: torch.Tensor | None = None
    cache_seconds: float | None = None
    if teacher is not None and kd.cache_teacher:
        if pairs:
            raise RecipeError(f"{where}: cache_teacher and feature_layers cannot be combined (feature distillation "
                              "needs the teacher's intermediate features at every step)")
        progress(f"computing the teacher's outputs for {total_samples} samples once (cache_teacher)", 0.0)
        cache_started = time.perf_counter()
        cached_logits = _teacher_cache(teacher, inputs, names, info, layout=layout)
        cache_seconds = round(time.perf_counter() - cache_started, 3)
    # cache_frozen_prefix: the frozen front runs once; from here on the loop trains and evaluates the rest of
    # the student (which shares its parameters) on the front's outputs.
    trained_module = student
    prefix_seconds: float | None = None
    prefix_row_bytes: int | None = None
    if cfg.cache_frozen_prefix:
        if pairs:
            raise RecipeError(f"{where}: cache_frozen_prefix and feature_layers cannot be combined (feature "
                              "distillation taps modules that may lie in the frozen front)")
        prefix_started = time.perf_counter()
        trained_module, inputs, names, selection, prefix_row_bytes = _frozen_front_cache(
            student, frozen_bns, inputs, names, selection, info, layout=layout, where=where, progress=progress)
        prefix_seconds = round(time.perf_counter() - prefix_started, 3)
    wrapped = _wrapper_class()(trained_module, s_tap, pairs, projections)
    model: nn.Module = wrapped
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(wrapped, device_ids=[info.local_rank] if info.device != "cpu" else None)

    params = [p for p in wrapped.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def train_mode() -> None:
        """Train mode, except for the BatchNorm layers train_only freezes (they keep their statistics)."""
        model.train()
        for module in frozen_bns:
            module.eval()

    deadline: float | None = None

    def over_budget() -> bool:
        """Whether max_minutes is spent; rank 0's clock decides for every rank (one broadcast per step)."""
        flag = torch.tensor([1 if deadline is not None and time.perf_counter() >= deadline else 0])
        if info.distributed:
            import torch.distributed as dist

            flag = flag.to(info.device)
            dist.broadcast(flag, src=0)
        return bool(flag.item())

    def snapshot() -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in student.state_dict().items()}

    def evaluate() -> float:
        _sync_buffers(student, info)
        if s_tap is not None:
            s_tap.enabled = False
        try:
            return _evaluate(trained_module, selection, names, info, layout=layout)
        finally:
            if s_tap is not None:
                s_tap.enabled = True

    history: list[dict[str, Any]] = []
    sums = np.zeros(5)  # loss, kd, ce, feature, batches since the last evaluation

    def record(step: int, epoch: float) -> float:
        nonlocal sums
        totals = torch.tensor(sums, dtype=torch.float64)
        if info.distributed:
            import torch.distributed as dist

            totals = totals.to(info.device)
            dist.all_reduce(totals)
            totals = (totals / world).cpu()
        n = float(totals[4])
        mean = (lambda i: float(totals[i]) / n) if n else (lambda i: None)
        acc = evaluate()
        history.append({
            "step": step,
            "epoch": round(epoch, 4),
            "lr": optimizer.param_groups[0]["lr"] if step else 0.0,
            "loss": mean(0),
            "kd_loss": mean(1) if teacher is not None else None,
            "ce_loss": mean(2),
            "feature_loss": mean(3) if pairs else None,
            "eval_acc": acc,
        })
        sums = np.zeros(5)
        return acc

    best_acc = record(0, 0.0)
    best_state, best_step = snapshot(), 0
    since_best = 0
    stopped_early = False
    budget_stopped, budget_stop_step = False, None
    step = 0
    T, alpha = kd.temperature, kd.alpha
    progress(f"epoch 0/{epochs_total} selection top-1 {best_acc:.3f}", 0.0)
    if cfg.max_minutes is not None:
        deadline = time.perf_counter() + cfg.max_minutes * 60

    for epoch in range(epochs_total):
        perm = rng.permutation(total_samples)  # the same on every rank: one seed, one sequence
        train_mode()
        for b in range(steps_per_epoch):
            if step >= total_steps:
                break
            index = torch.from_numpy(perm[b * batch:(b + 1) * batch][info.rank::world])
            xs = [_layout(inputs[n][index].to(info.device), layout) for n in names]
            y = labels[index].to(info.device)
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor(step, total_steps, cfg.schedule, cfg.warmup_fraction)
            logits, features = model(*xs)
            ce = F.cross_entropy(logits, y)
            kd_loss = feat_loss = None
            if teacher is not None:
                if cached_logits is not None:
                    t_logits = cached_logits[index].to(info.device)
                else:
                    with torch.no_grad():
                        t_logits = _logits(teacher(*xs))
                kd_loss = F.kl_div(F.log_softmax(logits / T, dim=1), F.log_softmax(t_logits / T, dim=1),
                                   reduction="batchmean", log_target=True) * (T * T)
                loss = alpha * kd_loss + (1 - alpha) * ce
                if pairs:
                    feat_loss = sum(pair.weight * F.mse_loss(f, t_tap.values[pair.teacher])
                                    for pair, f in zip(pairs, features))
                    loss = loss + feat_loss
            else:
                loss = ce
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise StageError(f"{where}: the loss became {value} at step {step + 1}; lower lr")
            sums += [value, float(kd_loss.detach()) if kd_loss is not None else 0.0, float(ce.detach()),
                     float(feat_loss.detach()) if feat_loss is not None else 0.0, 1.0]
            step += 1
            running = sums[0] / sums[4]
            progress(f"epoch {epoch + 1}/{epochs_total} loss {running:.3f}", step / total_steps)
            end_of_epoch = b == steps_per_epoch - 1
            due = (step % cfg.eval_every == 0) if cfg.eval_every else end_of_epoch
            out_of_time = deadline is not None and step < total_steps and over_budget()
            if due or step == total_steps or out_of_time:
                acc = record(step, step / steps_per_epoch)
                train_mode()
                if acc > best_acc:
                    best_acc, best_state, best_step, since_best = acc, snapshot(), step, 0
                else:
                    since_best += 1
                if cfg.patience is not None and since_best >= cfg.patience and step < total_steps:
                    stopped_early = True
                    break
            if out_of_time:
                budget_stopped, budget_stop_step = True, step
                break
        if stopped_early or budget_stopped or step >= total_steps:
            break

    if s_tap is not None:
        s_tap.remove()
        t_tap.remove()
    student.load_state_dict(best_state)
    for name, parameter in student.named_parameters():
        parameter.requires_grad_(requires_grad_before[name])
    student.eval()
    final_acc = evaluate()
    student.to("cpu", memory_format=torch.contiguous_format)
    return TrainResult(
        history=history, best_eval_acc=best_acc, best_step=best_step, final_selection_acc=final_acc, steps=step,
        epochs=round(step / steps_per_epoch, 4), stopped_early=stopped_early,
        train_seconds=round(time.perf_counter() - started, 3), world_size=world, threads_per_process=threads,
        train_samples=total_samples, selection_samples=len(selection), teacher_cache_seconds=cache_seconds,
        trained_parameters=trained_parameters, total_parameters=total_parameters, budget_stopped=budget_stopped,
        budget_stop_step=budget_stop_step, prefix_cache_seconds=prefix_seconds,
        prefix_bytes_per_sample=prefix_row_bytes,
    )
