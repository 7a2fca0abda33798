"""The Optuna study behind a search: its storage, sampler, objective and constraints.

- Storage: a journal file in the search folder (``study.journal``, Optuna's append-only JournalStorage). Only
  the search process writes it; trial processes never touch it, so a killed trial leaves it intact, and an
  interrupted search leaves its running trials open, to be run again by ``--resume``.
- Sampler: TPE, seeded with the recipe's seed plus the number of trials already in the study, so a resumed search
  does not draw the first trials' parameters again, and the same journal gives the same next trials.
- Objective: ``accuracy`` (maximize the metric), ``latency`` (minimize p50), or ``pareto`` (both).
- Budgets are constraints the sampler reads (``Trial.set_constraint``, Optuna 5): a trial over a budget is
  infeasible, and TPE ranks infeasible trials by how far over they are, below every feasible one.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optimizer.errors import RecipeError

if TYPE_CHECKING:
    import optuna

    from optimizer.recipe import Recipe

JOURNAL_NAME = "study.journal"
STUDY_NAME = "search"
OBJECTIVES = {"accuracy": ["maximize"], "latency": ["minimize"], "pareto": ["maximize", "minimize"]}


def resolve_objective(recipe: "Recipe") -> str:
    chosen = recipe.search.objective if recipe.search else "auto"
    if chosen != "auto":
        return chosen
    budget = recipe.budget
    if budget.latency_p50_ms is not None or budget.latency_p90_ms is not None:
        return "accuracy"
    if budget.accuracy_drop is not None:
        return "latency"
    return "pareto"


def budgets(recipe: "Recipe") -> dict[str, float]:
    """The recipe's budgets that constrain the search (the final stage's: the recipe-level ones)."""
    budget = recipe.budget
    return {name: float(getattr(budget, name)) for name in ("accuracy_drop", "latency_p50_ms", "latency_p90_ms")
            if getattr(budget, name) is not None}


def constraints(outcome: dict[str, Any], limits: dict[str, float], higher_is_better: bool) -> dict[str, float]:
    """Constraint values of a measured trial: positive when over a budget, by the relative excess for latency
    and by the excess in the metric's units (points for a fraction: 0.01) for accuracy."""
    values: dict[str, float] = {}
    if "accuracy_drop" in limits:
        drop = outcome["baseline_accuracy"] - outcome["accuracy"]
        drop = drop if higher_is_better else -drop
        values["accuracy_drop"] = drop - limits["accuracy_drop"]
    for name, key in (("latency_p50_ms", "p50_ms"), ("latency_p90_ms", "p90_ms")):
        if name in limits and outcome.get(key) is not None:
            values[name] = outcome[key] / limits[name] - 1.0
    # A chain a gate stopped (a stage over its own budget, NaN outputs, a collapsed model) is never feasible.
    values["gates"] = 1.0 if outcome["status"] == "stopped" else 0.0
    return values


def objective_values(objective: str, outcome: dict[str, Any], higher_is_better: bool) -> list[float]:
    accuracy = outcome["accuracy"] if higher_is_better else -outcome["accuracy"]
    if objective == "accuracy":
        return [accuracy]
    if objective == "latency":
        return [outcome["p50_ms"]]
    return [accuracy, outcome["p50_ms"]]


def _quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def open_study(folder: Path, *, objective: str, identity: str, resume: bool) -> "optuna.Study":
    """Create the study in ``folder``, or load it with ``resume``; refuses to mix two different searches."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    _quiet_optuna()
    journal = folder / JOURNAL_NAME
    exists = journal.is_file() and journal.stat().st_size > 0
    if exists and not resume:
        raise RecipeError(f"{folder}: holds a search already ({journal}); add --resume to continue it, or choose "
                          "another --out")
    storage = JournalStorage(JournalFileBackend(str(journal)))
    study = optuna.create_study(storage=storage, study_name=STUDY_NAME, directions=OBJECTIVES[objective],
                                load_if_exists=True)
    previous = study.user_attrs.get("identity")
    if previous is None:
        study.set_user_attr("identity", identity)
        study.set_user_attr("objective", objective)
    elif previous != identity:
        raise RecipeError(f"{folder}: the search there ran another recipe, search space, budget or seed; --resume "
                          "continues only the same search: restore the recipe, or choose another --out")
    return study


def seed_sampler(study: "optuna.Study", seed: int) -> None:
    """A fresh TPE sampler seeded by the study's length (see the module's docstring)."""
    import optuna

    _quiet_optuna()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study.sampler = optuna.samplers.TPESampler(
            seed=seed * 100_003 + len(study.get_trials(deepcopy=False)), n_startup_trials=8, constant_liar=True,
            multivariate=True, group=True)
