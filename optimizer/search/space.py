"""The ``search:`` section of a recipe, and a trial's parameters turned into a concrete recipe.

What a user can search, per stage named in ``stages``:

- ``optional: true``: the stage may be switched off (parameter ``<stage>.enabled``);
- ``alternatives``: other passes the stage may run instead of its own (parameter ``<stage>.pass``, whose values
  are option names: the stage's own pass name first, then each alternative's ``name``, by default its pass);
- ``parameters``: values of the stage's ``with`` keys: ``choice`` (a list), ``int`` / ``float`` ([low, high],
  optional ``step``) or ``log_float`` ([low, high], sampled on a log scale). An alternative's own ``parameters``
  apply when it is chosen (parameter ``<stage>.<option>.<key>``), the stage's when its own pass runs
  (``<stage>.<key>``).

A trial is a recipe: `materialize` copies the recipe, drops ``search``, removes switched-off stages and writes
the chosen pass and values into the others. Every value a parameter can take is checked against the pass's
configuration when the recipe is loaded, so a bound a pass would reject stops the search before any work.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

if TYPE_CHECKING:
    import yaml

    from optimizer.recipe import Recipe

Scalar = bool | int | float | str | None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ParameterSpec(_Strict):
    """One searched value: exactly one of ``choice``, ``int``, ``float``, ``log_float``."""

    choice: list[Scalar] | None = Field(default=None, description="The values to choose from (scalars).")
    int_: list[int] | None = Field(default=None, alias="int", description="[low, high], both included.")
    float_: list[float] | None = Field(default=None, alias="float", description="[low, high], both included.")
    log_float: list[float] | None = Field(
        default=None, description="[low, high] with 0 < low, sampled uniformly in log space.")
    step: float | None = Field(default=None, gt=0, description="Grid step for int and float (default: 1 / none).")

    @field_validator("choice")
    @classmethod
    def _not_empty(cls, values: list[Scalar] | None) -> list[Scalar] | None:
        if values is not None and not values:
            raise ValueError("an empty choice; give at least one value")
        if values is not None and len(set(map(repr, values))) != len(values):
            raise ValueError("a value is listed twice in the choice")
        return values

    @model_validator(mode="after")
    def _one_kind(self) -> "ParameterSpec":
        kinds = [name for name, value in (("choice", self.choice), ("int", self.int_), ("float", self.float_),
                                          ("log_float", self.log_float)) if value is not None]
        if len(kinds) != 1:
            raise ValueError(f"give exactly one of choice, int, float, log_float (got {', '.join(kinds) or 'none'})")
        bounds = self.int_ if self.int_ is not None else self.float_ if self.float_ is not None else self.log_float
        if bounds is not None:
            if len(bounds) != 2 or not bounds[0] <= bounds[1]:
                raise ValueError(f"{kinds[0]}: give [low, high] with low <= high, not {bounds}")
            if self.log_float is not None and bounds[0] <= 0:
                raise ValueError(f"log_float: the low bound must be greater than 0, not {bounds[0]}")
        if self.step is not None and (self.choice is not None or self.log_float is not None):
            raise ValueError("'step' applies to int and float")
        if self.step is not None and self.int_ is not None and self.step != int(self.step):
            raise ValueError(f"int: 'step' must be a whole number, not {self.step}")
        return self

    @property
    def kind(self) -> str:
        return ("choice" if self.choice is not None else "int" if self.int_ is not None
                else "float" if self.float_ is not None else "log_float")

    def extremes(self) -> list[Scalar]:
        """The values whose validity implies every other's, as far as a pass's range checks go."""
        if self.choice is not None:
            return list(self.choice)
        bounds = self.int_ if self.int_ is not None else self.float_ if self.float_ is not None else self.log_float
        return list(dict.fromkeys(bounds or []))

    def suggest(self, trial: Any, name: str) -> Scalar:
        if self.choice is not None:
            return trial.suggest_categorical(name, self.choice)
        if self.int_ is not None:
            return trial.suggest_int(name, self.int_[0], self.int_[1], step=int(self.step or 1))
        if self.float_ is not None:
            return trial.suggest_float(name, self.float_[0], self.float_[1], step=self.step)
        assert self.log_float is not None
        return trial.suggest_float(name, self.log_float[0], self.log_float[1], log=True)

    def holds(self, value: Any) -> bool:
        """Whether ``value`` is one this parameter can take (the recipe's own value, for the first trial)."""
        if self.choice is not None:
            return any(value == c and type(value) is type(c) for c in self.choice)
        bounds = self.int_ if self.int_ is not None else self.float_ if self.float_ is not None else self.log_float
        if isinstance(value, bool) or not isinstance(value, (int, float)) or bounds is None:
            return False
        if self.int_ is not None and (not isinstance(value, int) or (value - bounds[0]) % int(self.step or 1)):
            return False
        return bounds[0] <= value <= bounds[1]


class Alternative(_Strict):
    name: str | None = Field(default=None, pattern=r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$",
                             description="Option name (default: the pass name).")
    pass_name: str = Field(alias="pass", description="Registered pass name the stage may run instead.")
    with_: dict[str, Any] = Field(default_factory=dict, alias="with", description="That pass's configuration.")
    parameters: dict[str, ParameterSpec] = Field(default_factory=dict,
                                                 description="Searched keys of this alternative's configuration.")

    @property
    def option(self) -> str:
        return self.name or self.pass_name


class StageSearch(_Strict):
    optional: bool = Field(default=False, description="The stage may be switched off.")
    parameters: dict[str, ParameterSpec] = Field(default_factory=dict,
                                                 description="Searched keys of the stage's own `with`.")
    alternatives: list[Alternative] = Field(default_factory=list,
                                            description="Other passes the stage may run instead of its own.")

    @model_validator(mode="after")
    def _searches_something(self) -> "StageSearch":
        if not self.optional and not self.parameters and not self.alternatives:
            raise ValueError("searches nothing; give optional, parameters or alternatives (or remove it)")
        return self


class Screening(_Strict):
    eval_samples: int | None = Field(
        default=1000, ge=1,
        description="Trials are screened on this many eval samples (drawn with the recipe's seed); null: all.")
    latency: Literal["quick", "full"] = Field(
        default="quick", description="Latency mode of the screening runs; the Pareto set is re-measured in full.")
    latency_margin: float = Field(
        default=0.25, ge=0, le=1,
        description="Quick latency is noisy: a trial whose screening p50/p90 is at most this fraction over a latency "
        "budget (and within every other budget) is still a candidate for the full re-measure, which decides. The "
        "sampler is told it is infeasible either way.")


class SearchSection(_Strict):
    trials: int = Field(default=20, ge=1, description="Trials in the study (the default of --trials).")
    objective: Literal["auto", "accuracy", "latency", "pareto"] = Field(
        default="auto",
        description="'accuracy': the most accurate within the budgets; 'latency': the fastest (p50) within them; "
        "'pareto': the accuracy-latency front. 'auto': accuracy when a latency budget is set, else latency when an "
        "accuracy budget is set, else pareto.")
    remeasure: int = Field(
        default=4, ge=1,
        description="At most this many candidates of the screening (its Pareto front, and the trials not significantly "
        "less accurate than the best) are re-run in full (full eval data and latency, with intervals) before the "
        "choice.")
    screening: Screening = Field(default_factory=Screening)
    stages: dict[str, StageSearch] = Field(min_length=1, description="What to search, by stage name.")


# ---------------------------------------------------------------------------------- checks and trials


def _line(node: "yaml.Node | None", loc: tuple[Any, ...]) -> str:
    from optimizer.recipe import _line_of

    line = _line_of(node, loc)
    return f":{line}" if line else ""


def check_space(recipe: "Recipe", *, where: str, node: "yaml.Node | None") -> None:
    """Checks the section against the recipe: stages exist, passes resolve, every value a parameter can take
    is one the pass accepts. Raises RecipeError (exit 2) naming the file, line and field."""
    from optimizer.errors import RecipeError
    from optimizer.recipe import suggest
    from optimizer.registry import get_pass

    section = recipe.search
    assert section is not None
    stages = {stage.name: stage for stage in recipe.stages}
    for name, spec in section.stages.items():
        loc = ("search", "stages", name)
        field = f"search.stages.{name}"
        if name not in stages:
            hint = suggest(name, list(stages)) or f" (stages: {', '.join(stages)})"
            raise RecipeError(f"{where}{_line(node, loc)}: {field}: no stage named '{name}' in stages{hint}")
        stage = stages[name]
        options = [(stage.pass_name, stage.with_, spec.parameters, loc + ("parameters",))]
        for index, alternative in enumerate(spec.alternatives):
            options.append((alternative.pass_name, alternative.with_, alternative.parameters,
                            loc + ("alternatives", index, "parameters")))
        names = [stage.pass_name] + [a.option for a in spec.alternatives]
        if len(set(names)) != len(names):
            raise RecipeError(f"{where}{_line(node, loc + ('alternatives',))}: {field}.alternatives: two options "
                              f"are named the same ({', '.join(names)}); give each alternative a distinct 'name'")
        for number, (pass_name, with_, parameters, ploc) in enumerate(options):
            at = f"{where}{_line(node, ploc[:-1] + ('pass',) if number else loc)}"
            pass_cls = get_pass(pass_name, where=f"{at}: {field}" + (f".alternatives.{number - 1}.pass" if number else ""))
            base = dict(with_)
            if number:
                try:
                    base = pass_cls.Config.model_validate(with_).model_dump(mode="json")
                except ValidationError as exc:
                    raise RecipeError(f"{at}: {field}.alternatives.{number - 1}.with: {_first(exc)}") from None
            known = set(pass_cls.Config.model_fields) | {f.alias for f in pass_cls.Config.model_fields.values()
                                                          if f.alias}
            for key, parameter in parameters.items():
                pline = f"{where}{_line(node, ploc + (key,))}"
                pfield = ".".join(str(p) for p in ploc + (key,))
                if key not in known:
                    raise RecipeError(f"{pline}: {pfield}: '{key}' is not a setting of pass '{pass_name}'"
                                      f"{suggest(key, known) or '; see `optimizer passes` and the pass docs'}")
                for value in parameter.extremes():
                    try:
                        pass_cls.Config.model_validate({**base, key: value})
                    except ValidationError as exc:
                        raise RecipeError(f"{pline}: {pfield}: pass '{pass_name}' rejects {key}={value!r}: "
                                          f"{_first(exc)}; narrow the range") from None


def _first(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(p) for p in error["loc"])
    return f"{where + ': ' if where else ''}{error['msg'].removeprefix('Value error, ')}"


@dataclass(frozen=True)
class Space:
    """The searched stages of one recipe, in the recipe's stage order."""

    section: SearchSection
    stage_order: tuple[str, ...]
    own_passes: dict[str, str]
    own_with: dict[str, dict[str, Any]]

    @classmethod
    def of(cls, recipe: "Recipe") -> "Space":
        if recipe.search is None:
            from optimizer.errors import RecipeError

            raise RecipeError(f"recipe '{recipe.name}' has no 'search:' section; add one (see the README's search "
                              "section) or run it with `optimizer run`")
        order = tuple(stage.name for stage in recipe.stages if stage.name in recipe.search.stages)
        return cls(recipe.search, order, {s.name: s.pass_name for s in recipe.stages},
                   {s.name: dict(s.with_) for s in recipe.stages})

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Ask the trial for every parameter, define-by-run: a switched-off stage's parameters are not asked."""
        for name in self.stage_order:
            spec = self.section.stages[name]
            if spec.optional and not trial.suggest_categorical(f"{name}.enabled", [True, False]):
                continue
            option = self.own_passes[name]
            if spec.alternatives:
                option = trial.suggest_categorical(f"{name}.pass", [option] + [a.option for a in spec.alternatives])
            for key, parameter in self._parameters(name, option).items():
                parameter.suggest(trial, self._param_name(name, option, key))
        return dict(trial.params)

    def default_params(self) -> dict[str, Any]:
        """The recipe's own chain as parameters (every stage on, its own pass, its own values where the space
        holds them): the first trial, so the hand-written chain is always a candidate."""
        params: dict[str, Any] = {}
        for name in self.stage_order:
            spec = self.section.stages[name]
            own = self.own_passes[name]
            if spec.optional:
                params[f"{name}.enabled"] = True
            if spec.alternatives:
                params[f"{name}.pass"] = own
            for key, parameter in spec.parameters.items():
                value = self.own_with[name].get(key)
                if parameter.holds(value):
                    params[self._param_name(name, own, key)] = value
        return params

    def _parameters(self, stage: str, option: str) -> dict[str, ParameterSpec]:
        spec = self.section.stages[stage]
        if option == self.own_passes[stage]:
            return spec.parameters
        return next(a.parameters for a in spec.alternatives if a.option == option)

    def _param_name(self, stage: str, option: str, key: str) -> str:
        return f"{stage}.{key}" if option == self.own_passes[stage] else f"{stage}.{option}.{key}"

    def materialize(self, raw: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        """The trial's recipe: ``raw`` (the user's mapping, overrides applied) without ``search``, with the
        switched-off stages removed and the chosen passes and values written in."""
        recipe = copy.deepcopy(raw)
        recipe.pop("search", None)
        stages = []
        for stage in recipe["stages"]:
            name = stage.get("name")
            if name not in self.section.stages:
                stages.append(stage)
                continue
            if params.get(f"{name}.enabled", True) is False:
                continue
            spec = self.section.stages[name]
            option = params.get(f"{name}.pass", self.own_passes[name])
            if option != self.own_passes[name]:
                alternative = next(a for a in spec.alternatives if a.option == option)
                stage["pass"] = alternative.pass_name
                stage["with"] = copy.deepcopy(alternative.with_)
            with_ = dict(stage.get("with") or {})
            for key in self._parameters(name, option):
                param = self._param_name(name, option, key)
                if param in params:
                    with_[key] = params[param]
            stage["with"] = with_
            stages.append(stage)
        recipe["stages"] = stages
        return recipe

    def describe(self, params: dict[str, Any]) -> str:
        """A short label: 'prune.ratio=0.5, distill off, int8=quantize.ort'."""
        parts = []
        for name in self.stage_order:
            if params.get(f"{name}.enabled", True) is False:
                parts.append(f"{name} off")
                continue
            if f"{name}.pass" in params:
                parts.append(f"{name}={params[f'{name}.pass']}")
            prefix = f"{name}."
            for key, value in params.items():
                if key.startswith(prefix) and key not in (f"{name}.enabled", f"{name}.pass"):
                    parts.append(f"{key}={_short(value)}")
        return ", ".join(parts) or "recipe as written"


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def screening_recipe(raw: dict[str, Any], screening: Screening) -> dict[str, Any]:
    """The trial recipe measured for screening: fewer eval samples, quick latency."""
    recipe = copy.deepcopy(raw)
    data_eval = recipe.setdefault("data", {}).setdefault("eval", {})
    if screening.eval_samples is not None:
        current = data_eval.get("samples")
        data_eval["samples"] = screening.eval_samples if current is None else min(int(current), screening.eval_samples)
    if screening.latency == "quick":
        evaluate = recipe.get("evaluate") or {}
        latency = dict(evaluate.get("latency") or {})
        latency["mode"] = "quick"
        evaluate["latency"] = latency
        recipe["evaluate"] = evaluate
    return recipe
