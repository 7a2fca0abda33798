"""The search loop: ask the study for a batch of trials, run them, tell it their results; then re-measure the
screening's Pareto set in full, choose, publish, and write the search report.

Layout of the search folder ``OUT``::

    study.journal          the Optuna study (append-only; --resume continues it)
    .cache/                the stage cache every trial shares (a prefix two trials share is made once;
                           --cache DIR puts it elsewhere, e.g. beside optimizer run --cache DIR)
    trials/NNNN/           each screening trial's own run folder (report.json, artifacts/, ...)
    full/NNNN/             the full re-measure of the Pareto trials
    final/                 the chosen trial's artifact, its manifest naming the trial, parameters and search
    search.json/.md/.html  the search report

Trials run in batches of ``workers``: each batch is asked for before it runs and told in trial order after, so
the study sees the same sequence whichever executor ran it, and the same seed gives the same trials.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from optimizer.errors import GateFailed, Interrupted, RecipeError

CACHE_NAME = ".cache"
Log = Callable[[str], None]


@dataclass
class SearchResult:
    out: Path
    report: dict[str, Any]
    chosen: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def run_search(
    recipe_path: str | Path,
    *,
    out: str | Path,
    trials: int | None = None,
    timeout_min: float | None = None,
    workers: int = 1,
    ray: str | None = None,
    resume: bool = False,
    overrides: list[str] | None = None,
    log: Log | None = None,
    cache: str | Path | None = None,
) -> SearchResult:
    """Run (or with ``resume`` continue) the search of a recipe into ``out``; returns the search report.

    Raises RecipeError (exit 2) for a bad recipe, search space or option before any work, GateFailed (exit 4)
    when no trial meets the budgets (after writing the report, which lists the closest), Interrupted (130) on
    Ctrl-C (the journal keeps every finished trial; --resume continues). ``cache`` is the stage cache the trials
    share (default ``out/.cache``); a folder shared with ``optimizer run --cache`` lets trials reuse the stages of
    runs of the same chain."""
    from optimizer.output_folder import OutputLock, recover
    from optimizer.preflight import make_output_folder
    from optimizer.errors import disk_full, is_disk_full
    from optimizer.recipe import load_recipe
    from optimizer.search.executor import BatchInterrupted, make_executor
    from optimizer.search.space import Space
    from optimizer.search.study import budgets, open_study, resolve_objective
    from optimizer.stage_cache import digest
    from optimizer.validate import validate_recipe

    log = log or (lambda message: None)
    if workers < 1:
        raise RecipeError(f"--workers {workers}: give 1 or more")
    if trials is not None and trials < 1:
        raise RecipeError(f"--trials {trials}: give 1 or more")
    if timeout_min is not None and not timeout_min > 0:
        raise RecipeError(f"--timeout {timeout_min}: give a number of minutes greater than 0")
    loaded = load_recipe(recipe_path, overrides)
    recipe = loaded.recipe
    space = Space.of(recipe)
    out_dir = Path(out).expanduser().resolve()
    validate_recipe(loaded, out=out_dir)
    # The recipe as written is the first trial: if it does not validate, no trial would tell the user more.
    first = _trial_loaded(space.materialize(loaded.raw, space.default_params()), loaded.source)
    validate_recipe(first, out=out_dir)
    section = recipe.search
    assert section is not None
    objective = resolve_objective(recipe)
    limits = budgets(recipe)
    higher = recipe.evaluate.accuracy.higher_is_better
    target = trials or section.trials
    identity_raw = copy.deepcopy(loaded.raw)
    identity_raw.get("search", {}).pop("trials", None)
    identity = digest({"recipe": identity_raw, "objective": objective})

    # The executor first: a Ray that is missing or unreachable is a usage error before anything is written.
    executor = make_executor(ray, workers, out_dir / ".work")
    try:
        make_output_folder(out_dir)
        cache_dir = Path(cache).expanduser().resolve() if cache is not None else out_dir / CACHE_NAME
        search = _Search(out_dir, space, loaded, objective, limits, higher, log, cache_dir)
        search.executor_description = executor.description
        with OutputLock(out_dir, notify=log):
            recover(out_dir, notify=log)
            study = open_study(out_dir, objective=objective, identity=identity, resume=resume)
            if not study.get_trials(deepcopy=False):
                study.enqueue_trial(space.default_params())
            search.study = study
            started = time.monotonic()
            try:
                search.screen(executor, target, workers, deadline=None if timeout_min is None
                              else started + timeout_min * 60)
                search.remeasure(executor, section.remeasure)
            except BatchInterrupted as stop:
                search.record(stop.finished)
                search.write_report(interrupted=True)
                raise Interrupted(f"search interrupted; {search.finished_count()} trials are in "
                                  f"{out_dir / 'study.journal'}; re-run with --resume to continue (no finished trial "
                                  "runs again)") from None
            except OSError as exc:
                if is_disk_full(exc):
                    # As in `optimizer run`: one line, exit 5; the journal keeps every finished trial and a
                    # previous final/ is restored by the publish's rollback, so --resume continues from here.
                    raise disk_full(exc, "search") from None
                raise
            search.wall_s = time.monotonic() - started
            chosen = search.choose()
            try:
                if chosen is not None:
                    search.publish(chosen)
                report = search.write_report(interrupted=False)
            except OSError as exc:
                if is_disk_full(exc):
                    raise disk_full(exc, "publishing the search's choice") from None
                raise
    finally:
        executor.close()
    if chosen is None:
        raise GateFailed(search.unreachable_message())
    return SearchResult(out_dir, report, chosen)


def _trial_loaded(raw: dict[str, Any], source: Path | None):
    from optimizer.recipe import load_recipe

    loaded = load_recipe(raw)
    loaded.source = source
    return loaded


class _Search:
    """State of one search run: the study, its outcomes, the full re-measures and the choice."""

    def __init__(self, out: Path, space, loaded, objective: str, limits: dict[str, float], higher: bool, log: Log,
                 cache_dir: Path):
        self.out = out
        self.cache_dir = cache_dir
        self.space = space
        self.loaded = loaded
        self.objective = objective
        self.limits = limits
        self.higher = higher
        self.log = log
        self.study: Any = None
        self.executor_description = ""
        self.full: dict[int, dict[str, Any]] = {}
        self.chosen: dict[str, Any] | None = None
        self.why = ""
        self.wall_s = 0.0
        self._open: dict[int, Any] = {}

    # ------------------------------------------------------------------------------------- requests
    def _request(self, number: int, params: dict[str, Any], phase: str) -> dict[str, Any]:
        from optimizer.search.space import screening_recipe

        recipe = self.space.materialize(self.loaded.raw, params)
        recipe["publish"] = "last"  # a trial's result is its chain's last stage; the search chooses among trials
        if phase == "screening":
            recipe = screening_recipe(recipe, self.loaded.recipe.search.screening)
        folder = "trials" if phase == "screening" else "full"
        return {"number": number, "phase": phase, "params": params, "recipe": recipe,
                "source": str(self.loaded.source) if self.loaded.source else None,
                "out": str(self.out / folder / f"{number:04d}"), "cache": str(self.cache_dir)}

    def _screening_is_full(self) -> bool:
        screening = self.loaded.recipe.search.screening
        samples = self.loaded.recipe.data.eval.samples
        return screening.latency == "full" and (screening.eval_samples is None or
                                                (samples is not None and samples <= screening.eval_samples))

    # ------------------------------------------------------------------------------------ screening
    def finished_count(self) -> int:
        from optuna.trial import TrialState

        return sum(1 for t in self.study.get_trials(deepcopy=False) if t.state != TrialState.RUNNING
                   and t.state != TrialState.WAITING)

    def screen(self, executor, target: int, workers: int, deadline: float | None) -> None:
        import optuna
        from optuna.trial import TrialState

        from optimizer.search.study import seed_sampler

        seed = self.loaded.recipe.seed
        # Trials an interrupted search left open run again first, under their own numbers and parameters.
        for frozen in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            self._open[frozen.number] = optuna.trial.Trial(self.study, frozen._trial_id)
        while True:
            if self._open:
                batch = sorted(self._open)[:workers]
            else:
                # An enqueued trial (the recipe as written) is WAITING until asked: not yet one of the target's.
                left = target - len([t for t in self.study.get_trials(deepcopy=False)
                                     if t.state != TrialState.WAITING])
                if left <= 0 or (deadline is not None and time.monotonic() > deadline):
                    break
                batch = []
                seed_sampler(self.study, seed)
                for _ in range(min(workers, left)):
                    trial = self.study.ask()
                    self.space.suggest(trial)
                    self._open[trial.number] = trial
                    batch.append(trial.number)
            requests = [self._request(n, dict(self._open[n].params), "screening") for n in batch]
            for request in requests:
                self.log(f"trial {request['number']}: {self.space.describe(request['params'])}")
            outcomes = executor.run_batch(requests)
            self.record(outcomes)
            self.write_report(interrupted=False)

    def record(self, outcomes: list[dict[str, Any]]) -> None:
        """Tell the study, in trial order, what each finished trial measured."""
        from optuna.trial import TrialState

        from optimizer.search.study import constraints, objective_values

        from optimizer.errors import DiskFull
        from optimizer.search.trial import DISK_FULL

        full_disk = [o for o in outcomes if o.get("status") == DISK_FULL]
        for outcome in sorted(outcomes, key=lambda o: o["number"]):
            if outcome.get("status") == DISK_FULL:
                continue  # left open in the study: it runs again on --resume
            trial = self._open.pop(outcome["number"], None)
            if trial is None:
                continue
            trial.set_user_attr("outcome", _jsonable(outcome))
            measured = outcome.get("status") in ("ok", "stopped") and outcome.get("accuracy") is not None
            if measured:
                for name, value in constraints(outcome, self.limits, self.higher).items():
                    trial.set_constraint(name, value)
                values = objective_values(self.objective, outcome, self.higher)
                if all(math.isfinite(v) for v in values):
                    self.study.tell(trial, values)
                    self._log_outcome(outcome)
                    continue
            self.study.tell(trial, state=TrialState.FAIL)
            self._log_outcome(outcome)
        if full_disk:
            # Not the trials' fault, and every later trial would meet it too: stop as `optimizer run` does.
            first = full_disk[0]
            raise DiskFull(f"search: disk full in trial {first['number']} ({first.get('error')}); free some space "
                           "and re-run with --resume (that trial runs again; finished trials stay in the journal)")

    def _log_outcome(self, outcome: dict[str, Any]) -> None:
        if outcome.get("accuracy") is None:
            self.log(f"trial {outcome['number']}: failed: {outcome.get('error')}")
            return
        status = "" if outcome["status"] == "ok" else f" ({outcome['status']} at '{outcome.get('stage')}')"
        self.log(f"trial {outcome['number']}: accuracy {outcome['accuracy']:.4f}, p50 {outcome['p50_ms']:.4f} ms"
                 f"{status}")

    # ------------------------------------------------------------------------------------ outcomes
    def trials(self) -> list[dict[str, Any]]:
        """Every trial of the study: number, state, parameters, outcome, constraints."""
        rows = []
        for frozen in self.study.get_trials(deepcopy=False):
            outcome = frozen.user_attrs.get("outcome") or {}
            rows.append({
                "number": frozen.number,
                "state": frozen.state.name.lower(),
                "params": dict(frozen.params),
                "label": self.space.describe(dict(frozen.params)),
                "constraints": dict(frozen.constraints),
                "feasible": (frozen.state.name == "COMPLETE" and all(v <= 0 for v in frozen.constraints.values())),
                **{k: v for k, v in outcome.items() if k not in ("number", "params")},
            })
        return rows

    def candidates(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The candidates for the full re-measure, best first by the objective: the screening's Pareto front
        (accuracy up, p50 down) and, under the accuracy and Pareto objectives, every trial whose accuracy is not
        significantly below the most accurate one's (95 % intervals overlap: a subset of the eval data cannot rank
        them), among the feasible trials and those just over a latency budget (``screening.latency_margin``).
        Trials whose chains produced the same artifact are one candidate (the first)."""
        from optimizer.report.verdict import pareto_front

        margin = self.loaded.recipe.search.screening.latency_margin
        pool = [r for r in rows if r.get("status") == "ok" and r["state"] == "complete"
                and (r["feasible"] or _near_latency_budget(r["constraints"], margin))]
        if not pool:
            return []
        seen: set[str] = set()
        unique = []
        for row in sorted(pool, key=lambda r: r["number"]):
            key = row.get("artifact_sha256") or repr(sorted(row["params"].items()))
            if key not in seen:
                seen.add(key)
                unique.append(row)
        sign = 1 if self.higher else -1
        chosen = {unique[i]["number"] for i in pareto_front([(r["p50_ms"], sign * r["accuracy"]) for r in unique])}
        if self.objective != "latency":
            best = min(unique, key=lambda r: (-sign * r["accuracy"], r["p50_ms"], r["number"]))
            low, high = best.get("accuracy_ci95") or [best["accuracy"]] * 2
            chosen |= {r["number"] for r in unique if _overlaps(r.get("accuracy_ci95"), r["accuracy"], low, high)}
        front = [r for r in unique if r["number"] in chosen]
        if self.objective == "latency":
            front.sort(key=lambda r: (r["p50_ms"], -sign * r["accuracy"], r["number"]))
        else:
            front.sort(key=lambda r: (-sign * r["accuracy"], r["p50_ms"], r["number"]))
        return front

    # ------------------------------------------------------------------------------------ full runs
    def remeasure(self, executor, count: int) -> None:
        front = self.candidates(self.trials())[:count]
        if not front:
            return
        if self._screening_is_full():
            self.full = {r["number"]: {**r, "phase": "full"} for r in front}
            return
        self.log(f"re-measuring {len(front)} candidate trial(s) in full: {', '.join(str(r['number']) for r in front)}")
        outcomes = executor.run_batch([self._request(r["number"], r["params"], "full") for r in front])
        for outcome in outcomes:
            self.full[outcome["number"]] = outcome
            self._log_outcome({**outcome, "number": f"{outcome['number']} (full)"})

    def _meets(self, outcome: dict[str, Any]) -> bool:
        from optimizer.search.study import constraints

        if outcome.get("status") != "ok" or outcome.get("accuracy") is None:
            return False
        return all(v <= 0 for v in constraints(outcome, self.limits, self.higher).values())

    def choose(self) -> dict[str, Any] | None:
        sign = 1 if self.higher else -1
        eligible = [o for o in self.full.values() if self._meets(o)]
        if not eligible:
            return None
        if self.objective == "accuracy":
            chosen = min(eligible, key=lambda o: (-sign * o["accuracy"], o["p50_ms"], o["number"]))
            self.why = ("the most accurate trial within the budgets" + _budget_words(self.limits)
                        + ", re-measured with the recipe's own eval data and latency settings")
        elif self.objective == "latency":
            chosen = min(eligible, key=lambda o: (o["p50_ms"], -sign * o["accuracy"], o["number"]))
            self.why = ("the fastest trial (p50) within the budgets" + _budget_words(self.limits)
                        + ", re-measured with the recipe's own eval data and latency settings")
        else:
            # No budget: the fastest trial whose accuracy is not significantly below the most accurate one's
            # (their 95 % intervals overlap).
            best = min(eligible, key=lambda o: (-sign * o["accuracy"], o["p50_ms"], o["number"]))
            low, high = best.get("accuracy_ci95") or [best["accuracy"], best["accuracy"]]
            close = [o for o in eligible if _overlaps(o.get("accuracy_ci95"), o["accuracy"], low, high)]
            chosen = min(close, key=lambda o: (o["p50_ms"], o["number"]))
            self.why = ("no budget was given: the fastest trial of the Pareto front whose accuracy interval overlaps "
                        "the most accurate trial's (not significantly less accurate)")
        self.chosen = chosen
        return chosen

    def unreachable_message(self) -> str:
        rows = [r for r in self.trials() if r.get("accuracy") is not None]
        closest = sorted(rows, key=lambda r: (sum(max(v, 0) for v in r["constraints"].values()), r["number"]))[:3]
        listed = "; ".join(f"trial {r['number']} ({r['label']}): accuracy {r['accuracy']:.4f}, p50 "
                           f"{r['p50_ms']:.4f} ms" for r in closest) or "no trial was measured"
        return (f"no trial meets the budgets{_budget_words(self.limits)}; closest: {listed}; relax the budget or "
                f"widen the search space (report: {self.out / 'search.md'})")

    # ---------------------------------------------------------------------------------- publishing
    def publish(self, chosen: dict[str, Any]) -> None:
        from optimizer.publish import publish_stage

        extra = {"search": {
            "trial": chosen["number"],
            # Where the trial's own run (its report.json, every stage) lies, relative to the search folder.
            "trial_folder": Path(chosen["out"]).resolve().relative_to(self.out.resolve()).as_posix(),
            "params": self._params_of(chosen["number"]),
            "label": self.space.describe(self._params_of(chosen["number"])),
            "objective": self.objective,
            "budgets": self.limits,
            "why": self.why,
            "study": str(self.out / "study.journal"),
            "recipe": str(self.loaded.source) if self.loaded.source else None,
            "trials": len(self.study.get_trials(deepcopy=False)),
        }}
        publish_stage(chosen["out"], self.out / "final", stage=chosen["stage"], policy="last",
                      reason=f"trial {chosen['number']}: {self.why}", extra=extra, lock=False)

    def _params_of(self, number: int) -> dict[str, Any]:
        return dict(self.study.get_trials(deepcopy=False)[number].params)

    # ------------------------------------------------------------------------------------- report
    def write_report(self, *, interrupted: bool) -> dict[str, Any]:
        from optimizer.search.report import build_search_report, write_search_report

        report = build_search_report(self, interrupted=interrupted)
        write_search_report(report, self.out)
        return report


def _near_latency_budget(constraints: dict[str, float], margin: float) -> bool:
    """Within every budget but latency, and over a latency budget by at most ``margin`` (relative)."""
    return all(value <= (margin if name.startswith("latency_") else 0.0) for name, value in constraints.items())


def _overlaps(interval: list[float] | None, value: float, low: float, high: float) -> bool:
    a, b = interval or [value, value]
    return a <= high and b >= low


def _budget_words(limits: dict[str, float]) -> str:
    words = []
    if "accuracy_drop" in limits:
        words.append(f"accuracy drop ≤ {limits['accuracy_drop']:g}")
    if "latency_p50_ms" in limits:
        words.append(f"p50 ≤ {limits['latency_p50_ms']:g} ms")
    if "latency_p90_ms" in limits:
        words.append(f"p90 ≤ {limits['latency_p90_ms']:g} ms")
    return f" ({', '.join(words)})" if words else ""


def _jsonable(outcome: dict[str, Any]) -> dict[str, Any]:
    import json

    return json.loads(json.dumps(outcome, default=str))
