"""The Runner: baseline, then every stage in order, each measured on its own runtime and process.

Everything a run writes goes into a staging folder inside ``OUT`` first. Only when the run ends (passed,
or stopped by a gate, so the report shows the failed stage) does it move into place: ``artifacts/`` and
``measurements/`` as wholes, the report files by atomic rename, and ``final/`` only when every stage
passed. A crash or a usage error leaves the previous outputs untouched.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from optimizer.artifact import Artifact
from optimizer.data.provider import DataProvider
from optimizer.errors import GateFailed, Interrupted, OptimizerError, OutputLocked, StageError
from optimizer.measure.environment import fingerprint
from optimizer.measure.evaluate import evaluate_artifact
from optimizer.passes.base import PassContext
from optimizer.progress import Progress
from optimizer.recipe import LoadedRecipe, Recipe, load_recipe
from optimizer.registry import get_pass
from optimizer.report.build import Report, build_report, stage_record
from optimizer.report.write import write_final, write_reports
from optimizer.validate import validate_recipe

DEFAULT_OUT_ROOT = Path("runs")


def run_recipe(
    recipe_or_path: str | Path | dict[str, Any] | Recipe | LoadedRecipe,
    *,
    checkpoint: str | Path | None = None,
    out: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    quiet: bool = True,
    progress: Progress | None = None,
) -> Report:
    """Run a recipe end to end and return its report (also written to ``out``).

    Raises ``GateFailed`` (after writing the report) when a stage breaks a budget or a check, and other
    ``OptimizerError`` subclasses for bad input; each carries the CLI's exit code.
    """
    loaded = recipe_or_path if isinstance(recipe_or_path, LoadedRecipe) else load_recipe(recipe_or_path, overrides)
    if checkpoint is not None:
        loaded.recipe.model.checkpoint = str(Path(checkpoint).expanduser().resolve())
    out_dir = Path(out) if out is not None else DEFAULT_OUT_ROOT / loaded.recipe.name
    out_dir = out_dir.expanduser().resolve()
    validate_recipe(loaded, out=out_dir)
    progress = progress or Progress(quiet=quiet)
    return Runner(loaded, out_dir, progress).run()


class Runner:
    def __init__(self, loaded: LoadedRecipe, out_dir: Path, progress: Progress):
        self.loaded = loaded
        self.recipe = loaded.recipe
        self.out_dir = out_dir
        self.progress = progress
        self.threads = self.recipe.evaluate.latency.threads
        self.current_stage = "baseline"

    # ------------------------------------------------------------------------------------------ run
    def run(self) -> Report:
        created = not self.out_dir.exists()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        try:
            return self._run_locked()
        except BaseException:
            if created and not any(self.out_dir.iterdir()):
                self.out_dir.rmdir()  # leave no empty folder behind a run that wrote nothing
            raise

    def _run_locked(self) -> Report:
        with _OutputLock(self.out_dir):
            staging = self.out_dir / f".staging-{uuid.uuid4().hex[:8]}"
            staging.mkdir()
            try:
                try:
                    report, error = self._run_stages(staging)
                except KeyboardInterrupt:
                    raise Interrupted(f"interrupted during stage '{self.current_stage}'; outputs of earlier "
                                      "runs are unchanged") from None
                write_reports(report, staging)
                _publish(staging, self.out_dir, include_final=report.passed)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        report.path = self.out_dir
        if error is not None:
            error.report = report  # type: ignore[attr-defined]  # the CLI prints the table of a failed run too
            raise error
        return report

    def _run_stages(self, staging: Path) -> tuple[Report, OptimizerError | None]:
        recipe = self.recipe
        environment = fingerprint(threads=self.threads)
        artifacts_dir = staging / "artifacts"
        measurements_dir = staging / "measurements"
        total = len(recipe.stages) + 1
        started = time.time()

        self.progress.start_stage(1, total, "baseline", f"load {recipe.model.checkpoint or recipe.model.factory}")
        from optimizer.baseline import make_baseline

        baseline = make_baseline(self.loaded, artifacts_dir / "baseline").finalize()
        data = DataProvider(self.loaded, list(recipe.model.inputs))
        eval_npz = self._write_eval_arrays(data, staging / ".work")
        records: list[dict[str, Any]] = []
        baseline_metrics = self._measure(baseline, "baseline", eval_npz, measurements_dir)
        records.append(stage_record("baseline", None, baseline, baseline_metrics, status="ok", seconds=0.0,
                                    out_dir=staging))
        error: OptimizerError | None = self._gate_numerics(records[-1])
        self.progress.end_stage(_summary(records[-1]))

        artifacts: dict[str, Artifact] = {"baseline": baseline}
        current = baseline
        for index, stage in enumerate(recipe.stages, start=2):
            if error is not None:
                break
            pass_cls = get_pass(stage.pass_name, where=f"stages.{index - 2}.pass")
            self.current_stage = stage.name
            self.progress.start_stage(index, total, stage.name, f"{pass_cls.name}: {pass_cls.summary}")
            stage_start = time.perf_counter()
            work_dir = artifacts_dir / stage.name
            work_dir.mkdir(parents=True)
            ctx = PassContext(stage=stage.name, work_dir=work_dir, recipe=self.loaded, data=data,
                              progress=self.progress, threads=self.threads, seed=recipe.seed,
                              artifacts=dict(artifacts))
            instance = pass_cls(pass_cls.Config.model_validate(stage.with_))
            try:
                produced = instance.run(current, ctx)
                if produced.path.resolve() != work_dir.resolve():
                    raise StageError(f"stage '{stage.name}': pass '{pass_cls.name}' wrote its artifact outside "
                                     "ctx.work_dir")
                produced.finalize()
                metrics = self._measure(produced, stage.name, eval_npz, measurements_dir)
            except Exception as exc:
                if isinstance(exc, OptimizerError):
                    error = exc
                else:  # a library bug: keep the report, name the stage, chain the traceback
                    error = StageError(f"stage '{stage.name}' ({pass_cls.name}) failed: {type(exc).__name__}: {exc}")
                    error.__cause__ = exc
                records.append(stage_record(stage.name, pass_cls.name, None, None, status="failed",
                                            seconds=time.perf_counter() - stage_start, out_dir=staging,
                                            error=str(error), details=ctx.details, config=stage.with_))
                self.progress.end_stage(f"[red]failed[/red]: {error}")
                break
            seconds = time.perf_counter() - stage_start
            record = stage_record(stage.name, pass_cls.name, produced, metrics, status="ok", seconds=seconds,
                                  out_dir=staging, details=ctx.details, config=stage.with_)
            records.append(record)
            error = self._gate_numerics(record) or self._gate_budget(record, records[0], stage)
            self.progress.end_stage(_summary(record))
            artifacts[stage.name] = produced
            current = produced

        shutil.rmtree(staging / ".work", ignore_errors=True)
        report = build_report(self.loaded, environment, records, started=started)
        if report.passed:
            write_final(report, current, staging / "final", self.loaded)
        return report, error

    # -------------------------------------------------------------------------------------- helpers
    def _write_eval_arrays(self, data: DataProvider, work: Path) -> Path:
        self.progress.update("loading eval data")
        eval_data = data.eval()
        work.mkdir(parents=True, exist_ok=True)
        path = work / "eval.npz"
        np.savez(path, __labels__=eval_data.labels, **eval_data.inputs)
        return path

    def _measure(self, artifact: Artifact, stage: str, eval_npz: Path, measurements_dir: Path) -> dict[str, Any]:
        spec = self.recipe.evaluate
        return evaluate_artifact(
            artifact,
            stage=stage,
            eval_npz=eval_npz,
            measurements_dir=measurements_dir / stage,
            threads=self.threads,
            latency=spec.latency.model_dump(),
            accuracy_batch_size=spec.accuracy.batch_size,
            seed=self.recipe.seed,
            import_paths=[self.loaded.base_dir, Path.cwd()],
            progress=self.progress,
        )

    def _gate_numerics(self, record: dict[str, Any]) -> OptimizerError | None:
        bad = record.get("non_finite_outputs", 0)
        if bad:
            message = f"stage '{record['name']}': {bad} outputs on the eval set are NaN or infinite"
            record["status"] = "failed"
            record["error"] = message
            return GateFailed(message)
        return None

    def _gate_budget(self, record: dict[str, Any], baseline: dict[str, Any], stage) -> OptimizerError | None:
        budget = stage.budget.accuracy_drop if stage.budget and stage.budget.accuracy_drop is not None \
            else self.recipe.budget.accuracy_drop
        if budget is None:
            return None
        drop = baseline["accuracy"]["value"] - record["accuracy"]["value"]
        record["budget"] = {"accuracy_drop": budget, "drop": drop}
        if drop > budget + 1e-12:
            message = (f"stage '{record['name']}': accuracy dropped {drop * 100:.2f} points, over the budget of "
                       f"{budget * 100:.2f}; relax budget.accuracy_drop or change the stage's settings")
            record["status"] = "failed"
            record["error"] = message
            return GateFailed(message)
        return None


def _summary(record: dict[str, Any]) -> str:
    if record.get("status") != "ok":
        return f"[red]failed[/red]: {record.get('error')}"
    acc = record["accuracy"]
    lat = record["latency"]
    return (f"top-1 {acc['value'] * 100:.2f} % (n={acc['n']}), p50 {lat['p50_ms']:.3f} ms, "
            f"{record['throughput']['samples_per_s']:.0f} samples/s, {record['size_bytes'] / 1e6:.2f} MB")


class _OutputLock:
    """An exclusive lock file in the output folder; a lock left by a dead process is taken over."""

    def __init__(self, folder: Path):
        self.path = folder / ".lock"

    def __enter__(self) -> "_OutputLock":
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                return self
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and _alive(pid):
                    raise OutputLocked(f"{self.path.parent}: another run (pid {pid}) is writing here; wait for it "
                                       "or choose another --out") from None
                self.path.unlink(missing_ok=True)
        raise OutputLocked(f"{self.path.parent}: cannot take the output lock {self.path}")

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _publish(staging: Path, out_dir: Path, *, include_final: bool) -> None:
    """Move the staged outputs into place; folders are swapped as wholes."""
    names = ["artifacts", "measurements"] + (["final"] if include_final else [])
    for name in names:
        source = staging / name
        if not source.exists():
            continue
        target = out_dir / name
        old = out_dir / f".old-{name}-{uuid.uuid4().hex[:6]}"
        if target.exists():
            os.replace(target, old)
        os.replace(source, target)
        shutil.rmtree(old, ignore_errors=True)
    for file in sorted(staging.glob("report.*")):
        os.replace(file, out_dir / file.name)
