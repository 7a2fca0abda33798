"""The Runner: baseline, then every stage in order, each measured on its own runtime and process.

Everything a run writes goes into a staging folder inside ``OUT`` first. Only when the run ends (passed,
or stopped by a gate or a failing pass, so the report shows the failed stage) is it published
(``output_folder.publish``: all or nothing, rolled back on failure): ``artifacts/``, ``measurements/``
and the report files, and ``final/`` only when every stage passed. A usage error, an interrupt, a full
disk or a crash leaves the previous outputs untouched.

Each finished stage (artifact and measurements) is also stored in the stage cache
(``stage_cache.StageCache``); ``resume=True`` reuses the entries whose key and files still match.
"""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np
from rich.markup import escape

from optimizer.artifact import Artifact
from optimizer.data.provider import DataProvider, ProviderView
from optimizer.contract import (
    _default_allowed,
    _inside,
    _listing,
    _watch_writes,
    input_changes,
    metadata_hash,
    outside_writes,
    unwatched,
)
from optimizer.errors import (
    ContractViolation,
    GateFailed,
    Interrupted,
    OptimizerError,
    RecipeError,
    ResourceFailure,
    StageError,
    disk_full,
    first_line,
    is_disk_full,
)
from optimizer.measure.environment import fingerprint
from optimizer.measure.deploy_timing import CHECK_SAMPLES, deploy_timing, throwaway_artifact
from optimizer.measure.evaluate import evaluate_artifact
from optimizer.output_folder import STAGING_PREFIX, OutputLock, publish, recover
from optimizer.passes.base import PassContext
from optimizer.preflight import (
    check_free_space,
    check_writable,
    estimate_run_bytes,
    estimate_stage_bytes,
    input_size,
    make_output_folder,
    tree_size,
)
from optimizer.progress import Progress
from optimizer.publish import build_final
from optimizer.recipe import LoadedRecipe, Recipe, load_recipe
from optimizer.registry import get_pass
from optimizer.report.build import Report, build_report, stage_record
from optimizer.report.verdict import choose_publish
from optimizer.report.write import write_reports
from optimizer.stage_cache import (
    CACHE_DIR_NAME,
    CachedStage,
    StageCache,
    baseline_key_parts,
    common_key_parts,
    key_of,
    stage_key_parts,
)
from optimizer.validate import validate_recipe

DEFAULT_OUT_ROOT = Path("runs")
PUBLISHED = ["artifacts", "measurements", "report.json", "report.md", "report.html"]


def run_recipe(
    recipe_or_path: str | Path | dict[str, Any] | Recipe | LoadedRecipe,
    *,
    checkpoint: str | Path | None = None,
    out: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    quiet: bool = True,
    progress: Progress | None = None,
    resume: bool = False,
    cache: str | Path | None = None,
) -> Report:
    """Run a recipe end to end and return its report (also written to ``out``).

    ``resume`` reuses stages cached by earlier runs (in ``out/.cache``, or in ``cache`` when given: a
    folder several outputs may share). Raises ``GateFailed`` (after writing the report) when a stage
    breaks a budget or a check, and other ``OptimizerError`` subclasses for bad input; each carries the
    CLI's exit code.
    """
    loaded = recipe_or_path if isinstance(recipe_or_path, LoadedRecipe) else load_recipe(recipe_or_path, overrides)
    if checkpoint is not None:
        loaded.recipe.model.checkpoint = str(Path(checkpoint).expanduser().resolve())
    if loaded.recipe.model.checkpoint is not None:
        # Unsafe model files (TensorRT engines, TorchScript, legacy pickles, malformed safetensors) are
        # refused from their bytes before anything else looks at them.
        source = loaded.resolve(loaded.recipe.model.checkpoint)
        if source.is_file() or source.suffix.lower() in (".engine", ".plan", ".trt"):
            from optimizer.models import check_model_file

            check_model_file(source)
    out_dir = Path(out) if out is not None else DEFAULT_OUT_ROOT / loaded.recipe.name
    out_dir = out_dir.expanduser().resolve()
    validate_recipe(loaded, out=out_dir)
    cache_dir = _cache_folder(cache, out_dir)
    progress = progress or Progress(quiet=quiet)
    return Runner(loaded, out_dir, progress, resume=resume, cache_dir=cache_dir).run()


def _cache_folder(cache: str | Path | None, out_dir: Path) -> Path | None:
    if cache is None:
        return None
    folder = Path(cache).expanduser().resolve()
    if folder.exists() and not folder.is_dir():
        raise RecipeError(f"--cache {folder}: not a folder; give a folder (it is created when missing)")
    for published in ("artifacts", "measurements", "final"):
        replaced = out_dir / published
        if folder == replaced or replaced in folder.parents:
            raise RecipeError(f"--cache {folder}: inside {replaced}, which every run replaces; choose another folder")
    return folder


class Runner:
    def __init__(self, loaded: LoadedRecipe, out_dir: Path, progress: Progress, *, resume: bool = False,
                 cache_dir: Path | None = None):
        self.loaded = loaded
        self.recipe = loaded.recipe
        self.out_dir = out_dir
        self.progress = progress
        self.threads = self.recipe.evaluate.latency.threads
        self.current_stage = "baseline"
        self.notes: list[str] = []
        self.cache = StageCache(cache_dir or out_dir / CACHE_DIR_NAME, read=resume, shared=cache_dir is not None,
                                notify=self._note)
        self._eval_npz: dict[tuple[tuple[int, ...], ...], Path] = {}  # per input shapes (resize.input)
        self._shape_points: list[dict[str, Any]] | None = None
        self._baseline_predictions: np.ndarray | None = None
        # Where torch stages are timed: None for PyTorch eager, else the deployment runtime (measure/deploy_timing).
        self._deploy_timing = deploy_timing(self.recipe)

    def _note(self, message: str) -> None:
        """Something the user should know that does not stop the run: shown now, and kept in the report."""
        self.notes.append(message)
        self.progress.log(escape(message))  # paths and library text may hold [brackets] rich would parse

    # ------------------------------------------------------------------------------------------ run
    def run(self) -> Report:
        created = make_output_folder(self.out_dir)
        try:
            return self._run_locked()
        except BaseException:
            if created and self.out_dir.is_dir() and not any(self.out_dir.iterdir()):
                self.out_dir.rmdir()  # leave no empty folder behind a run that wrote nothing
            raise

    def _run_locked(self) -> Report:
        with OutputLock(self.out_dir, notify=self._note):
            recover(self.out_dir, notify=self._note)
            check_writable(self.out_dir)
            model_bytes = input_size(self.loaded.resolve(self.recipe.model.checkpoint)
                                     if self.recipe.model.checkpoint else None)
            check_free_space(self.out_dir, estimate_run_bytes(model_bytes, len(self.recipe.stages)),
                             f"for this run ({len(self.recipe.stages) + 1} stages)")
            staging = self.out_dir / f"{STAGING_PREFIX}{uuid.uuid4().hex[:8]}"
            try:
                staging.mkdir()
                report, error = self._run_stages(staging)
                if isinstance(error, ResourceFailure):
                    raise error  # nothing is published from a run the machine could not carry
                self.current_stage = "publishing"
                report.data["notes"] = self.notes
                report.data["cache"] = self.cache.summary()
                write_reports(report, staging)
                publish(staging, self.out_dir, PUBLISHED + (["final"] if report.passed else []))
            except KeyboardInterrupt:
                raise Interrupted(f"interrupted during stage '{self.current_stage}'; outputs of earlier runs are "
                                  "unchanged; finished stages are cached: re-run with --resume to reuse them") from None
            except MemoryError:
                raise ResourceFailure(f"stage '{self.current_stage}': out of memory; lower batch sizes or sample "
                                      "counts") from None
            except OSError as exc:
                if is_disk_full(exc):
                    raise disk_full(exc, f"{self.out_dir} (stage '{self.current_stage}')") from exc
                raise
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            self.cache.prune()
        report.path = self.out_dir
        if error is not None:
            error.report = report  # type: ignore[attr-defined]  # the CLI prints the table of a failed run too
            raise error
        return report

    def _run_stages(self, staging: Path) -> tuple[Report, OptimizerError | None]:
        recipe = self.recipe
        environment = fingerprint(threads=self.threads)
        artifacts_dir = staging / "artifacts"
        total = len(recipe.stages) + 1
        started = time.time()
        common = common_key_parts(self.loaded)
        data = DataProvider(self.loaded, list(recipe.model.inputs))

        # ---- baseline
        source = recipe.model.checkpoint or recipe.model.factory
        self.progress.start_stage(1, total, "baseline", escape(f"load {source}"))
        parts = baseline_key_parts(self.loaded, common)

        def make_baseline_artifact() -> tuple[Artifact, dict[str, Any]]:
            from optimizer.baseline import make_baseline

            return make_baseline(self.loaded, artifacts_dir / "baseline").finalize(), {}

        stage_start = time.perf_counter()
        baseline, metrics, details, cached = self._produce("baseline", key_of(parts), parts, make_baseline_artifact,
                                                           data, staging)
        records: list[dict[str, Any]] = []
        records.append(self._record("baseline", None, baseline, metrics, staging, details, None,
                                    time.perf_counter() - stage_start, cached))
        # The baseline is held to the recipe's latency budget too: the verdict may tell users to keep it.
        record_latency_budget(records[-1], recipe.budget)
        error: OptimizerError | None = self._gate_numerics(records[-1])
        self._baseline_predictions = self._predictions(staging, "baseline")
        if error is None and self._classifies() and _constant(self._baseline_predictions):
            self._note(f"baseline: every eval prediction is class {int(self._baseline_predictions[0])}; if the model "
                       "is trained, check model.checkpoint and the data's mean/std")
        self.progress.end_stage(_summary(records[-1]))

        artifacts: dict[str, Artifact] = {"baseline": baseline}
        current = baseline
        for index, stage in enumerate(recipe.stages, start=2):
            if error is not None:
                break
            pass_cls = get_pass(stage.pass_name, where=f"stages.{index - 2}.pass")
            self.current_stage = stage.name
            self.progress.start_stage(index, total, stage.name, escape(f"{pass_cls.name}: {pass_cls.summary}"))
            stage_start = time.perf_counter()
            instance = pass_cls(pass_cls.Config.model_validate(stage.with_))
            references = {name: artifacts[name] for name in instance.stage_references() if name in artifacts}
            parts = stage_key_parts(stage.name, pass_cls, stage.with_, current, references, common)
            # The data at the resolution the stage's input artifact takes (resize.input may have changed it).
            ctx = PassContext(stage=stage.name, work_dir=artifacts_dir / stage.name, recipe=self.loaded,
                              data=data.at_inputs(current.inputs),
                              progress=self.progress, threads=self.threads, seed=recipe.seed,
                              artifacts=dict(artifacts))

            def run_pass(current: Artifact = current, ctx: PassContext = ctx, instance=instance,
                         pass_cls=pass_cls, references=references) -> tuple[Artifact, dict[str, Any]]:
                check_free_space(self.out_dir, estimate_stage_bytes(tree_size(current.path)),
                                 f"for stage '{ctx.stage}'")
                ctx.work_dir.mkdir(parents=True)
                produced = self._run_watched(instance, pass_cls.name, current, ctx, references)
                return produced.finalize(), ctx.details

            try:
                produced, metrics, details, cached = self._produce(stage.name, key_of(parts), parts, run_pass, data,
                                                                   staging)
            except Exception as exc:
                error = self._stage_error(exc, stage.name, pass_cls.name)
                if isinstance(error, ResourceFailure):
                    raise error from exc
                if isinstance(error, ContractViolation) and error.tainted:
                    # An earlier stage's files or the run's folders were changed after they were measured:
                    # nothing of this run can be published as measured, so nothing is (as for a full disk).
                    raise error from exc
                records.append(stage_record(stage.name, pass_cls.name, None, None, status="failed",
                                            seconds=time.perf_counter() - stage_start, out_dir=staging,
                                            error=str(error), details=ctx.details, config=stage.with_))
                self.progress.end_stage(f"[red]failed[/red]: {escape(str(error))}")
                break
            record = self._record(stage.name, pass_cls.name, produced, metrics, staging, details, stage.with_,
                                  time.perf_counter() - stage_start, cached)
            records.append(record)
            # The budget first: when a stage breaks it, that is the failure users know how to act on; the
            # checks after it catch what a budget can miss.
            error = (self._gate_numerics(record) or self._gate_budget(record, records[0], stage)
                     or self._gate_constant(record, staging) or self._gate_fidelity(record))
            self.progress.end_stage(_summary(record))
            artifacts[stage.name] = produced
            current = produced

        shutil.rmtree(staging / ".work", ignore_errors=True)
        report = build_report(self.loaded, environment, records, started=started)
        if report.passed:
            error = self._stage_final(report, artifacts, staging)
        return report, error

    def _stage_final(self, report: Report, artifacts: dict[str, Artifact], staging: Path) -> OptimizerError | None:
        """Build final/ in the staging folder from the stage the recipe's publish policy picks (the chooser the
        report's verdict uses, so the two never disagree). When it picks none, the run fails its gate and the
        previous final/ stays, as after any gate failure; the report and artifacts are still published."""
        choice = choose_publish(report.data, self.recipe.publish)
        report.data["publish"] = choice.to_dict()
        if choice.stage is None:
            report.data["passed"] = False
            report.data["final"] = None
            return GateFailed(f"publish: {choice.policy}: {choice.reason}; final/ was not updated (publish: last "
                              "ships the last stage regardless)")
        name = choice.stage["name"]
        self.progress.log(escape(f"final/: stage '{name}' ({choice.reason})"))
        build_final(artifacts[name], choice.stage, staging / "final", report=report.data, publish=choice.to_dict())
        return None

    # -------------------------------------------------------------------------------------- stages
    def _produce(self, stage: str, key: str, parts: dict[str, Any],
                 make: Callable[[], tuple[Artifact, dict[str, Any]]], data: DataProvider,
                 staging: Path) -> tuple[Artifact, dict[str, Any], dict[str, Any], bool]:
        """The stage's artifact and measurements: from the cache when resuming and the entry is intact,
        else made and measured, then stored."""
        artifact_dir = staging / "artifacts" / stage
        measurements = staging / "measurements" / stage
        hit: CachedStage | None = self.cache.lookup(key, stage, artifact_dir, measurements)
        if hit is not None:
            return hit.artifact, hit.metrics, hit.details, True
        start = time.perf_counter()
        artifact, details = make()
        metrics = self._measure(artifact, stage, data, staging, measurements)
        self.cache.store(key, parts, stage, artifact, measurements, metrics, details, time.perf_counter() - start)
        return artifact, metrics, details, False

    def _record(self, name: str, pass_name: str | None, artifact: Artifact, metrics: dict[str, Any], staging: Path,
                details: dict[str, Any], config: dict[str, Any] | None, seconds: float,
                cached: bool) -> dict[str, Any]:
        record = stage_record(name, pass_name, artifact, metrics, status="ok", seconds=seconds, out_dir=staging,
                              details=details, config=config)
        record["cached"] = cached
        return record

    def _run_watched(self, instance, pass_name: str, current: Artifact, ctx: PassContext,
                     references: dict[str, Artifact]) -> Artifact:
        """Run a pass and enforce the rules of the contract that are cheap to check on every run (the rest is
        for optimizer.testing.check_pass): nothing left, changed or removed outside ctx.work_dir by Python code
        (the audit hook check_pass uses, optimizer.contract), the input artifact and the earlier stages it reads
        byte-identical to what their artifact.json lists (re-hashed), and the returned entry file in place."""
        inputs = [current] + [artifact for artifact in references.values() if artifact.path != current.path]
        before = [metadata_hash(artifact) for artifact in inputs]
        ctx.data = _DataOutsideWatch(ctx.data)  # type: ignore[assignment]
        error: Exception | None = None
        produced: Any = None
        with _watch_writes(ctx.work_dir, busy="skip") as recorder:
            try:
                produced = instance.run(current, ctx)
            except Exception as exc:  # checked below first: a pass that broke the contract and then failed
                error = exc
        if recorder is None:
            self._note(f"stage '{ctx.stage}': writes outside ctx.work_dir were not watched (another watched pass "
                       "or run is active in this process)")
        where = f"stage '{ctx.stage}': pass '{pass_name}'"
        hint = "test the pass with optimizer.testing.check_pass"
        # Named as they will be published (artifacts/<stage>/...), not by the staging folder that is removed.
        staging = str(ctx.work_dir.parent.parent)
        changed = [f"artifacts/{artifact.path.name}/{line}" for artifact, sha in zip(inputs, before)
                   for line in input_changes(artifact, sha)]
        outside = outside_writes(recorder, ctx.work_dir, self._allowed_writes(instance),
                                 protected=self._protected()) if recorder is not None else []
        if changed or outside:
            tainted = bool(changed) or any(_inside(line, folder) for line in outside for folder in self._protected())
            what = []
            if changed:
                what.append(f"changed its input ({_listing(changed)})")
            if outside:
                shown = [str(self.out_dir) + line[len(staging):] if _inside(line, staging) else line
                         for line in outside]
                what.append(f"wrote outside ctx.work_dir ({_listing(shown)})")
            published = "; nothing of this run was published, earlier outputs are unchanged" if tainted else ""
            raise ContractViolation(f"{where} broke the pass contract: {' and '.join(what)}; a pass writes only "
                                    f"into ctx.work_dir (artifacts/{ctx.stage}) and only reads its input{published}; "
                                    f"{hint}", tainted=tainted) from error
        if error is not None:
            raise error
        if not isinstance(produced, Artifact):
            raise ContractViolation(f"{where}: run() returned {type(produced).__name__}, not an Artifact; return "
                                    f"self.new_artifact(artifact, ctx, entry=...); {hint}")
        if produced.path.resolve() != ctx.work_dir.resolve():
            raise ContractViolation(f"{where} returned an artifact in {produced.path}, not in ctx.work_dir; build it "
                                    f"with self.new_artifact(artifact, ctx, entry=...); {hint}")
        entry = produced.entry_path
        if entry.is_symlink() or not entry.is_file():
            written = sorted(p.relative_to(ctx.work_dir).as_posix() for p in ctx.work_dir.rglob("*") if p.is_file())
            raise ContractViolation(
                f"{where} returned entry file '{produced.entry}', which it did not write into ctx.work_dir "
                f"(the stage's artifact folder, artifacts/{ctx.stage}; it holds "
                f"{_listing(written) if written else 'nothing'}); write the model there before returning; {hint}")
        return produced

    def _allowed_writes(self, instance) -> list[str]:
        """Where a pass may leave files outside ctx.work_dir during a run. Besides what check_pass allows (the
        user's cache folder, where torch, NNCF and this package's latency tables and engines keep caches;
        $OPTIMIZER_CACHE_DIR; OpenVINO's ~/intel; the pass's own write_folders()), the system temp folder:
        libraries leave temporary files there (ONNX export, compilers, the timing lock), which touch neither the
        run's outputs nor the user's files. check_pass stays stricter and reports leftovers there."""
        import os
        import tempfile

        return _default_allowed() + [os.path.abspath(tempfile.gettempdir())] + [
            os.path.abspath(os.path.expanduser(str(folder))) for folder in instance.write_folders()]

    def _protected(self) -> list[str]:
        """Folders no pass may write to even when they lie in an allowed one (a run in /tmp): the output folder,
        which holds the staged earlier stages, and the stage cache."""
        return [str(self.out_dir), str(self.cache.root)]

    def _stage_error(self, exc: Exception, stage: str, pass_name: str) -> OptimizerError:
        if isinstance(exc, OptimizerError):
            if isinstance(exc, StageError) and is_disk_full(exc):
                return disk_full(exc, f"stage '{stage}'")  # reported by the measurement process as text
            return exc
        if is_disk_full(exc):
            return disk_full(exc, f"stage '{stage}' ({pass_name})")
        # A library bug: keep the report, name the stage, chain the traceback.
        error = StageError(f"stage '{stage}' ({pass_name}) failed: {type(exc).__name__}: {exc}")
        error.__cause__ = exc
        return error

    # ------------------------------------------------------------------------------- data and measuring
    def _eval_arrays(self, data: DataProvider, inputs: list[Any], staging: Path) -> Path:
        """The eval set, as an artifact with ``inputs`` takes it, as one .npz for the measurement processes;
        written on first need only, so a fully cached run never loads the data. Artifacts served at another
        resolution (resize.input) get their own, loaded at that size."""
        shapes = tuple(tuple(spec.shape) for spec in inputs)
        if shapes not in self._eval_npz:
            self.progress.update("loading eval data")
            eval_data = data.at_inputs(inputs).eval()
            work = staging / ".work"
            work.mkdir(parents=True, exist_ok=True)
            path = work / ("eval.npz" if not self._eval_npz else f"eval-{len(self._eval_npz)}.npz")
            # Each sample's own length on every dynamic axis travels along: the worker cuts batches to them.
            lengths = {f"__length__{name}": own for name, own in eval_data.lengths.items()}
            np.savez(path, __labels__=eval_data.labels, **lengths, **eval_data.inputs)
            self._eval_npz[shapes] = path
        return self._eval_npz[shapes]

    def _shape_sweep(self, data: DataProvider, staging: Path) -> list[dict[str, Any]]:
        """evaluate.latency.shapes: the data at each size, written once for every stage's measurement."""
        if self._shape_points is None:
            from optimizer.measure.shape_sweep import write_points

            if self.recipe.evaluate.latency.shapes:
                self.progress.update("loading the data at each swept size")
            self._shape_points = write_points(self.loaded, data, staging / ".work" / "shapes")
        return self._shape_points

    def _measure(self, artifact: Artifact, stage: str, data: DataProvider, staging: Path,
                 measurements: Path) -> dict[str, Any]:
        eval_npz = self._eval_arrays(data, artifact.inputs, staging)
        shape_points = self._shape_sweep(data, staging)
        timing_artifact, fallback, folder = self._throwaway(artifact, stage, data, staging)
        try:
            return self._evaluate(artifact, stage, eval_npz, measurements, timing_artifact, fallback, shape_points)
        finally:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)  # the throwaway is for timing only, never kept

    def _throwaway(self, artifact: Artifact, stage: str, data: DataProvider,
                   staging: Path) -> tuple[Artifact | None, str | None, Path | None]:
        """(throwaway artifact, why there is none, its folder) for timing a torch stage on the deployment runtime.

        An export that fails leaves the stage timed on PyTorch eager with the reason recorded: the stage itself
        is fine, only its timing on the deployment runtime is out of reach."""
        timing = self._deploy_timing
        if timing is None or artifact.form != "torch":
            return None, None, None
        folder = staging / ".work" / "deploy-timing" / stage
        shutil.rmtree(folder, ignore_errors=True)
        self.progress.update(f"throwaway export for timing on {timing.describe()}")
        try:
            samples = data.at_inputs(artifact.inputs).eval().batch(0, max(CHECK_SAMPLES, artifact.inputs[0].shape[0]))
            made = throwaway_artifact(artifact, timing, folder, samples, threads=self.threads, stage=stage)
        except MemoryError:
            raise
        except Exception as exc:  # exporter and converter failures come in many types
            if is_disk_full(exc):
                raise
            reason = f"the throwaway export failed ({type(exc).__name__}: {first_line(exc, 200)})"
            self.progress.log(escape(f"stage '{stage}': latency timed on PyTorch eager: {reason}"))
            return None, reason, folder
        return made, None, folder

    def _evaluate(self, artifact: Artifact, stage: str, eval_npz: Path, measurements: Path,
                  timing_artifact: Artifact | None, fallback: str | None,
                  shape_points: list[dict[str, Any]]) -> dict[str, Any]:
        spec = self.recipe.evaluate
        return evaluate_artifact(
            artifact,
            stage=stage,
            eval_npz=eval_npz,
            measurements_dir=measurements,
            threads=self.threads,
            latency=spec.latency.model_dump(),
            accuracy_batch_size=spec.accuracy.batch_size,
            seed=self.recipe.seed,
            import_paths=[self.loaded.base_dir, Path.cwd()],
            progress=self.progress,
            profile=spec.profile,
            runtime_options={"onnx": {"providers": list(spec.onnxruntime.providers)}},
            metric=spec.accuracy.settings(),
            timing_artifact=timing_artifact,
            timing_fallback=fallback,
            shape_sweep=shape_points,
        )

    @staticmethod
    def _predictions(staging: Path, stage: str) -> np.ndarray | None:
        path = staging / "measurements" / stage / "predictions.npy"
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None

    # ---------------------------------------------------------------------------------------- gates
    @staticmethod
    def _fail(record: dict[str, Any], message: str) -> GateFailed:
        record["status"] = "failed"
        record["error"] = message
        return GateFailed(message)

    def _gate_numerics(self, record: dict[str, Any]) -> OptimizerError | None:
        bad = record.get("non_finite_outputs", 0)
        if bad:
            return self._fail(record, f"stage '{record['name']}': {bad} outputs on the eval set are NaN or infinite")
        return None

    def _gate_constant(self, record: dict[str, Any], staging: Path) -> OptimizerError | None:
        """A model that predicts one class for every input has lost its input, whatever its accuracy says
        (on an eval set dominated by one class it can look fine). Judged against the baseline: when the
        baseline itself predicts one class (an untrained network), there is nothing to lose."""
        if any(stage.name == record["name"] and stage.intermediate for stage in self.recipe.stages):
            return None  # the recipe says a later stage repairs this one (pruning before distillation)
        if not self._classifies():
            return None  # an embedding's or a regression's arg-max is no class: the metric and budget judge it
        predictions = self._predictions(staging, record["name"])
        if predictions is None:
            return self._fail(record, f"stage '{record['name']}': the measurement wrote no predictions; re-run")
        if _constant(predictions) and not _constant(self._baseline_predictions):
            return self._fail(
                record,
                f"stage '{record['name']}': all {len(predictions)} eval predictions are class {int(predictions[0])} "
                "while the baseline's vary: the model's output no longer depends on its input; check the stage's "
                "settings (calibration data, ignored layers, pruning ratio)",
            )
        return None

    def _classifies(self) -> bool:
        """Whether the recipe's metric reads the output as class scores (top1, top5, top-1 agreement)."""
        from optimizer.measure.metrics import Metric

        return Metric.from_settings(self.recipe.evaluate.accuracy.settings()).classifies

    def _gate_fidelity(self, record: dict[str, Any]) -> OptimizerError | None:
        fidelity = (record.get("details") or {}).get("fidelity")
        if isinstance(fidelity, dict) and not fidelity.get("samples"):
            return self._fail(record, f"stage '{record['name']}': the fidelity check compared no samples, so the "
                                      "export is unverified; give data.eval samples and verify_samples >= 1")
        return None

    def _gate_budget(self, record: dict[str, Any], baseline: dict[str, Any], stage) -> OptimizerError | None:
        limits = self.recipe.budget_for(stage)
        # Latency limits are recorded for the recommendation (report/verdict.within_budget), never a gate here:
        # the stages before the fast ones are slower by design, and the run's gate on them is that some
        # publishable stage meets them (see _choose_publish).
        record_latency_budget(record, limits)
        budget = limits.accuracy_drop
        if budget is None:
            return None
        accuracy = self.recipe.evaluate.accuracy
        # The drop is how much worse the stage is, in the metric's units: a rise for a lower-is-better metric.
        drop = baseline["accuracy"]["value"] - record["accuracy"]["value"]
        drop = drop if accuracy.higher_is_better else -drop
        record.setdefault("budget", {}).update({"accuracy_drop": budget, "drop": drop})
        if drop > budget + 1e-12:
            if accuracy.metric == "top1":
                what = f"accuracy dropped {drop * 100:.2f} points, over the budget of {budget * 100:.2f}"
            elif accuracy.is_fraction:
                what = (f"{_metric_name(accuracy)} dropped {drop * 100:.2f} points, over the budget of "
                        f"{budget * 100:.2f}")
            else:
                change = "fell" if accuracy.higher_is_better else "rose"
                what = (f"{_metric_name(accuracy)} {change} by {drop:.4g}, over the budget of {budget:g} (in the "
                        "metric's units)")
            return self._fail(record, f"stage '{record['name']}': {what}; relax budget.accuracy_drop or change the "
                                      "stage's settings")
        return None


class _DataOutsideWatch(ProviderView):
    """ctx.data while a pass runs watched: loading a split runs the recipe's data code (a python: data set may
    download or cache files), which is the recipe's doing, not the pass's, so it is not watched."""

    def get(self, split):
        with unwatched():
            return self._provider.get(split)


def record_latency_budget(record: dict[str, Any], budget) -> None:
    """Put the budget's latency limits into a stage record, where the report's verdict reads them."""
    limits = {name: getattr(budget, name) for name in ("latency_p50_ms", "latency_p90_ms")
              if getattr(budget, name) is not None}
    if limits:
        record.setdefault("budget", {}).update(limits)


def _constant(predictions: np.ndarray | None) -> bool:
    return predictions is not None and len(predictions) >= 2 and bool(np.all(predictions == predictions[0]))


def _metric_name(accuracy) -> str:
    from optimizer.measure.metrics import metric_name

    return metric_name(accuracy.metric, accuracy.agreement)


def _summary(record: dict[str, Any]) -> str:
    if record.get("status") != "ok":
        return f"[red]failed[/red]: {escape(str(record.get('error')))}"
    from optimizer.report.metric import metric_view

    acc = record["accuracy"]
    lat = record["latency"]
    cached = " [dim](cached)[/dim]" if record.get("cached") else ""
    view = metric_view(acc)
    return (f"{escape(view.name)} {view.value(acc['value'])}{' %' if view.percent else ''} (n={acc['n']}), "
            f"p50 {lat['p50_ms']:.3f} ms, "
            f"{record['throughput']['samples_per_s']:.0f} samples/s, {record['size_bytes'] / 1e6:.2f} MB{cached}")
