"""distill.kd and finetune: train the incoming torch model again, with or without a teacher.

Both take a ``torch`` artifact built from a factory (``meta.kind == "factory"``, possibly with a structure
patch from a pruning pass), train it with :func:`optimizer.training.train` on ``data.train``, and write
the new weights next to the unchanged ``meta`` (so the structure patch travels on). ``finetune`` is the
control: the same loop, the same data and schedule, cross-entropy only.

The teacher of ``distill.kd``:

* ``"@baseline"`` (default) or ``"@<stage>"``: an artifact of an earlier stage. In YAML, quote it
  (``teacher: "@baseline"``): a plain scalar cannot start with ``@``.
* a checkpoint path (relative to the recipe): a ``.pt2`` program, or a state dict (``.safetensors``,
  ``.pt``...) for the recipe's ``model.factory``/``model.kwargs``;
* a mapping ``{factory, kwargs, checkpoint}`` for a teacher of another architecture.

Every file is loaded through :mod:`optimizer.models` (safetensors / ``weights_only`` / checked ``.pt2``).

Model selection: the best state is chosen by top-1 on a *selection set*. The default,
``selection_split: train_holdout``, holds a seeded slice of ``eval_samples`` training samples out of
training; the figure the report shows (the eval split) is then unbiased. ``selection_split: eval`` uses a
seeded subset of the eval split instead, which picks the checkpoint on data the report then scores, and
so biases the reported accuracy slightly upwards (more so with small eval sets and many evaluations).

Frugal recovery (see :mod:`optimizer.training` for the details): ``cache_teacher`` runs the teacher once
over the training samples instead of once per step, ``train_only`` trains only the parameters whose names
match its regular expressions (frozen BatchNorm layers keep their running statistics), and ``max_minutes``
bounds the wall-clock time of the training steps, keeping the best state seen; ``cache_frozen_prefix`` (with
``train_only``) runs the frozen front of the student once and trains the rest on its outputs. All four work with
``processes: N > 1`` as well. ``training`` in the stage's details records the cache's seconds
(``teacher_cache_seconds``) and of the front's (``prefix_cache_seconds``), ``trained_parameters`` of
``total_parameters``, and whether the budget stopped
training (``budget_stopped``, ``budget_stop_step``).

``processes: N > 1`` runs the loop under DistributedDataParallel in N processes started with
``python -m torch.distributed.run --standalone --nproc_per_node N -m optimizer.training_worker
REQUEST.json``; the arrays go to the worker once, as an ``.npz``, and rank 0 writes the weights and
the result.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from optimizer.artifact import Artifact
from optimizer.errors import RecipeError, StageError, error_from_exit_code
from optimizer.passes.base import DataNeed, Pass, PassContext, earlier_torch_artifact
from optimizer.training import FeaturePair, KDSettings, TrainingConfig

STATE_DICT_SUFFIXES = {".safetensors", ".pt", ".pth", ".bin", ".ckpt"}


class TeacherSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    factory: str | None = Field(default=None, description="'module:callable' building the teacher "
                                                          "(default: the recipe's model.factory).")
    kwargs: dict[str, Any] | None = Field(default=None, description="Its keyword arguments "
                                                                    "(default: the recipe's model.kwargs when the "
                                                                    "factory is the recipe's).")
    checkpoint: str = Field(description="Teacher weights (.safetensors or a .pt/.pth state dict) or a .pt2 program.")


class FinetuneConfig(TrainingConfig):
    """The training settings alone: fine-tuning has no teacher."""


class DistillConfig(TrainingConfig):
    teacher: str | TeacherSpec = Field(
        default="@baseline",
        description="'@baseline', '@<earlier stage>', a checkpoint path, or {factory, kwargs, checkpoint}.")
    temperature: float = Field(default=4.0, gt=0, description="Softmax temperature T of the distillation term.")
    alpha: float = Field(default=0.7, ge=0, le=1,
                         description="Weight of the distillation term; 1 - alpha weighs cross-entropy on labels.")
    feature_layers: list[FeaturePair] = Field(
        default_factory=list, description="Feature-distillation pairs {student, teacher, weight} (MSE).")
    cache_teacher: bool = Field(
        default=False,
        description="Compute the teacher's logits for every training sample once, before training, and read them "
                    "by sample index instead of running the teacher at every step (exact: training applies no "
                    "augmentation). Memory: samples x classes x 4 bytes. Not with feature_layers.")

    @model_validator(mode="after")
    def _cache_without_features(self) -> "DistillConfig":
        if self.cache_teacher and self.feature_layers:
            raise ValueError("cache_teacher and feature_layers cannot be combined: feature distillation needs the "
                             "teacher's intermediate features at every step; drop one of them")
        return self

    @field_validator("teacher")
    @classmethod
    def _teacher_text(cls, value):
        if isinstance(value, str):
            if not value.strip():
                raise ValueError("teacher is empty; use '@baseline', '@<stage>' or a checkpoint path")
            if value.startswith("@") and len(value) == 1:
                raise ValueError("'@' must be followed by a stage name, e.g. '@baseline'")
        return value


# ------------------------------------------------------------------------------------------ teachers


def teacher_reference(teacher: str | TeacherSpec | None) -> str | None:
    """The stage name in a '@name' teacher, else None."""
    if isinstance(teacher, str) and teacher.startswith("@"):
        return teacher[1:]
    return None


def resolve_teacher(teacher: str | TeacherSpec, ctx: PassContext, scratch: Path) -> dict[str, Any]:
    """A JSON-able description of the teacher that any process can load (files already checked)."""
    reference = teacher_reference(teacher)
    if reference is not None:
        artifact = earlier_torch_artifact(ctx, reference, "teacher",
                                          "a teacher must be a torch artifact (distil before exporting)")
        return {"kind": "artifact", "path": str(artifact.path), "describe": f"@{reference}"}

    model = ctx.recipe.recipe.model
    if isinstance(teacher, str):
        spec = TeacherSpec(checkpoint=teacher)
    else:
        spec = teacher
    path = ctx.recipe.resolve(spec.checkpoint)
    if not path.is_file():
        raise RecipeError(f"stage '{ctx.stage}': teacher checkpoint {path} not found")
    suffix = path.suffix.lower()
    if suffix == ".pt2":
        if spec.factory is not None:
            raise RecipeError(f"stage '{ctx.stage}': a .pt2 teacher carries its architecture; remove 'factory'")
        # Check and load a private copy: the file we checked is the file we load.
        copy = scratch / "teacher.pt2"
        shutil.copyfile(path, copy)
        return {"kind": "program", "checkpoint": str(copy), "describe": str(path)}
    if suffix not in STATE_DICT_SUFFIXES:
        raise RecipeError(f"stage '{ctx.stage}': teacher checkpoint {path} is not a .safetensors/.pt/.pth state "
                          "dict nor a .pt2 program")
    factory = spec.factory or model.factory
    if factory is None:
        raise RecipeError(f"stage '{ctx.stage}': teacher {path} is a state dict; give teacher.factory")
    kwargs = spec.kwargs if spec.kwargs is not None else (model.kwargs if factory == model.factory else {})
    return {"kind": "factory", "factory": factory, "kwargs": kwargs, "checkpoint": str(path), "describe": str(path)}


def build_teacher(spec: dict[str, Any]):
    """Load a teacher described by :func:`resolve_teacher`, safely (no pickle)."""
    from optimizer.models import build_architecture, load_program, load_weights, read_state_dict

    kind = spec["kind"]
    if kind == "artifact":
        from optimizer.runtimes.torch_eager import load_torch_module

        return load_torch_module(Artifact.load(spec["path"]))
    if kind == "program":
        return load_program(Path(spec["checkpoint"]))
    module = build_architecture(spec["factory"], spec["kwargs"], where="teacher.factory")
    load_weights(module, read_state_dict(Path(spec["checkpoint"])), where=f"teacher {spec['checkpoint']}")
    return module.eval()


# ---------------------------------------------------------------------------------------------- data


def split_train_and_selection(cfg: TrainingConfig, ctx: PassContext):
    """(train arrays, selection arrays, description). Seeded with the recipe's seed; see the module doc."""
    from optimizer.data.datasets import ArrayData

    train = ctx.data.train()

    def take(data: ArrayData, index: np.ndarray) -> ArrayData:
        return ArrayData(inputs={n: np.ascontiguousarray(a[index]) for n, a in data.inputs.items()},
                         labels=np.asarray(data.labels[index], dtype=np.int64))

    rng = np.random.default_rng(ctx.seed)
    if cfg.selection_split == "train_holdout":
        if cfg.eval_samples >= len(train):
            raise RecipeError(f"stage '{ctx.stage}': eval_samples {cfg.eval_samples} would hold out all "
                              f"{len(train)} training samples; lower eval_samples")
        perm = rng.permutation(len(train))
        selection = take(train, np.sort(perm[:cfg.eval_samples]))
        rest = perm[cfg.eval_samples:]
        where = f"train split (held out, {cfg.eval_samples} samples)"
    else:
        evaluation = ctx.data.eval()
        if cfg.eval_samples > len(evaluation):
            raise RecipeError(f"stage '{ctx.stage}': eval_samples {cfg.eval_samples} is more than the "
                              f"{len(evaluation)} eval samples")
        selection = take(evaluation, np.sort(rng.choice(len(evaluation), cfg.eval_samples, replace=False)))
        rest = rng.permutation(len(train))
        where = f"eval split ({cfg.eval_samples} samples; biases the reported accuracy slightly)"
    if cfg.train_samples is not None:
        if cfg.train_samples > len(rest):
            raise RecipeError(f"stage '{ctx.stage}': train_samples {cfg.train_samples} is more than the "
                              f"{len(rest)} training samples available")
        rest = rest[:cfg.train_samples]
    return take(train, np.sort(rest)), selection, where


def save_arrays(path: Path, train, selection) -> None:
    arrays = {f"train__{n}": a for n, a in train.inputs.items()}
    arrays.update({f"selection__{n}": a for n, a in selection.inputs.items()})
    np.savez(path, __train_labels__=train.labels, __selection_labels__=selection.labels, **arrays)


def load_arrays(path: Path):
    from optimizer.data.datasets import ArrayData

    with np.load(path, allow_pickle=False) as archive:
        parts = {"train": {}, "selection": {}}
        for key in archive.files:
            prefix, _, name = key.partition("__")
            if prefix in parts:
                parts[prefix][name] = archive[key]
        return (ArrayData(parts["train"], archive["__train_labels__"]),
                ArrayData(parts["selection"], archive["__selection_labels__"]))


# ---------------------------------------------------------------------------------------------- pass


class _TrainPass(Pass):
    input_forms = ("torch",)
    output_form = "torch"
    needs = ("train", "eval")
    uses_teacher = False

    def required_data(self) -> tuple[DataNeed, ...]:
        return ("train", "eval") if self.config.selection_split == "eval" else ("train",)

    def stage_references(self) -> tuple[str, ...]:
        """Stage names this configured pass reads from ctx.artifacts (for a static order check)."""
        ref = teacher_reference(getattr(self.config, "teacher", None)) if self.uses_teacher else None
        return (ref,) if ref is not None else ()

    def _kd(self) -> KDSettings | None:
        if not self.uses_teacher:
            return None
        cfg: DistillConfig = self.config  # type: ignore[assignment]
        return KDSettings(temperature=cfg.temperature, alpha=cfg.alpha, feature_layers=list(cfg.feature_layers),
                          cache_teacher=cfg.cache_teacher)

    def run(self, artifact: Artifact, ctx: PassContext) -> Artifact:
        cfg: TrainingConfig = self.config  # type: ignore[assignment]
        if artifact.meta.get("kind") != "factory":
            raise RecipeError(f"stage '{ctx.stage}': {self.name} trains a torch model rebuilt from its factory "
                              f"(meta.kind 'factory'); this one is {artifact.meta.get('kind')!r}. Put "
                              f"{self.name} before stages that turn the model into a program")
        started = time.perf_counter()
        scratch = Path(tempfile.mkdtemp(prefix=f"optimizer-{ctx.stage}-"))
        try:
            teacher_spec = resolve_teacher(self.config.teacher, ctx, scratch) if self.uses_teacher else None
            ctx.progress.update("loading training data")
            train_data, selection, selection_where = split_train_and_selection(cfg, ctx)
            weights = ctx.work_dir / "model.safetensors"
            if cfg.processes > 1:
                result = self._run_distributed(artifact, ctx, teacher_spec, train_data, selection, scratch, weights)
            else:
                result = self._run_here(artifact, ctx, teacher_spec, train_data, selection, weights)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        ctx.details["training"] = {
            **result,
            "seconds": round(time.perf_counter() - started, 3),
            "processes": cfg.processes,
            "selection": selection_where,
            "teacher": teacher_spec["describe"] if teacher_spec else None,
        }
        return self.new_artifact(artifact, ctx, entry="model.safetensors", meta=dict(artifact.meta))

    def _run_here(self, artifact, ctx, teacher_spec, train_data, selection, weights: Path) -> dict[str, Any]:
        from optimizer.runtimes.torch_eager import load_torch_module
        from optimizer.torch_structure import save_module_weights
        from optimizer.training import single_process, train

        cfg: TrainingConfig = self.config  # type: ignore[assignment]
        info = single_process(cfg.device)
        student = load_torch_module(artifact)
        teacher = build_teacher(teacher_spec) if teacher_spec else None
        result = train(student, train_data, selection, cfg, seed=ctx.seed, teacher=teacher, kd=self._kd(),
                       progress=ctx.progress.update, dist_info=info, where=f"stage '{ctx.stage}'")
        save_module_weights(student, weights)
        return result.to_dict()

    def _run_distributed(self, artifact, ctx, teacher_spec, train_data, selection, scratch: Path,
                         weights: Path) -> dict[str, Any]:
        from optimizer.measure.evaluate import worker_environment
        from optimizer.training import usable_cores

        cfg: TrainingConfig = self.config  # type: ignore[assignment]
        ctx.progress.update(f"starting {cfg.processes} training processes")
        data_npz = scratch / "arrays.npz"
        save_arrays(data_npz, train_data, selection)
        # Only what the recipe set (so 'steps' does not meet a defaulted 'epochs' in the validator).
        training_fields = {k: v for k, v in cfg.model_dump(mode="json", exclude_unset=True).items()
                           if k in TrainingConfig.model_fields}
        kd = self._kd()
        request = {
            "student": str(artifact.path),
            "teacher": teacher_spec,
            "training": training_fields,
            "kd": None if kd is None else {"temperature": kd.temperature, "alpha": kd.alpha,
                                           "feature_layers": [p.model_dump() for p in kd.feature_layers],
                                           "cache_teacher": kd.cache_teacher},
            "data_npz": str(data_npz),
            "seed": ctx.seed,
            "stage": ctx.stage,
            "weights": str(weights),
            "result_json": str(scratch / "result.json"),
        }
        request_path = scratch / "request.json"
        request_path.write_text(json.dumps(request, indent=2))
        threads = cfg.threads or max(1, usable_cores() // cfg.processes)
        env = worker_environment(threads, [ctx.recipe.base_dir, Path.cwd()])
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={cfg.processes}", "-m", "optimizer.training_worker", str(request_path)]
        tail: list[str] = []
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                   start_new_session=True)
        try:
            assert process.stdout is not None
            for line in process.stdout:
                # Rank 0 writes "@@progress <fraction> <description>"; other output is kept for errors.
                match = re.search(r"@@progress (\d+(?:\.\d+)?) ?(.*)", line)
                if match:
                    ctx.progress.update(match.group(2), float(match.group(1)))
                else:
                    tail = (tail + [line.rstrip()])[-30:]
            process.wait()
        except BaseException:
            _kill_group(process)
            raise
        result_path = Path(request["result_json"])
        if not result_path.is_file():
            detail = next((l for l in reversed(tail) if "Error" in l), None) or \
                next((l for l in reversed(tail) if l.strip()), f"exit code {process.returncode}")
            raise StageError(f"stage '{ctx.stage}': the training processes failed ({detail.strip()[:300]})")
        result = json.loads(result_path.read_text())
        if not result.get("ok"):
            raise error_from_exit_code(result.get("exit_code", 1), result["error"])
        if not weights.is_file():
            raise StageError(f"stage '{ctx.stage}': the training processes wrote no weights")
        return result["result"]


def _kill_group(process: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired, PermissionError):
        process.kill()
        process.wait()


class Finetune(_TrainPass):
    name = "finetune"
    summary = "Train the torch model again on data.train with cross-entropy (the control for distill.kd)."
    Config = FinetuneConfig


class DistillKD(_TrainPass):
    name = "distill.kd"
    summary = "Knowledge distillation from a teacher (default @baseline) into the torch model, on data.train."
    Config = DistillConfig
    uses_teacher = True


__all__ = ["DistillKD", "Finetune", "DistillConfig", "FinetuneConfig", "TeacherSpec", "build_teacher",
           "resolve_teacher", "split_train_and_selection", "load_arrays", "save_arrays"]
