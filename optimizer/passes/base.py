"""The Pass contract: a named, configured step from one artifact form to another."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from optimizer.artifact import FORMS, Artifact

if TYPE_CHECKING:
    from optimizer.data.provider import DataProvider
    from optimizer.progress import Progress
    from optimizer.recipe import LoadedRecipe

DataNeed = Literal["calibration", "train", "eval"]
PASS_NAME_PATTERN = r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$"


class PassConfig(BaseModel):
    """Base for pass configurations: unknown keys are errors, so a typo never passes silently."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class PassContext:
    """What a pass may use besides its input artifact."""

    stage: str
    work_dir: Path
    """An empty folder: the pass writes its output artifact's files here."""
    recipe: "LoadedRecipe"
    data: "DataProvider"
    progress: "Progress"
    threads: int
    seed: int
    artifacts: dict[str, Artifact] = field(default_factory=dict)
    """Artifacts of the stages already run, by stage name ('baseline' first)."""
    details: dict[str, Any] = field(default_factory=dict)
    """Stage-specific facts the pass wants in the report (e.g. export fidelity)."""


class Pass(ABC):
    """Subclass, set the class attributes, define ``Config`` and implement ``run``.

    ``run`` must write a complete artifact into ``ctx.work_dir`` and return its handle; the runner
    hashes and publishes it, then measures it. Raise ``GateFailed`` when the result breaks a check.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    input_forms: ClassVar[tuple[str, ...]]
    output_form: ClassVar[str]
    needs: ClassVar[tuple[DataNeed, ...]] = ()
    version: ClassVar[str] = "1"
    Config: ClassVar[type[PassConfig]] = PassConfig

    def __init__(self, config: PassConfig | dict[str, Any] | None = None):
        if config is None or isinstance(config, dict):
            config = self.Config.model_validate(config or {})
        self.config = config

    @classmethod
    def output_form_for(cls, input_form: str) -> str:
        """The form this pass produces from ``input_form``; override when it keeps the input's form."""
        return cls.output_form

    def required_data(self) -> tuple[DataNeed, ...]:
        """Data splits this configured pass reads; override when it depends on the config."""
        return self.needs

    def stage_references(self) -> tuple[str, ...]:
        """Stage names (or 'baseline') this configured pass reads from ``ctx.artifacts``; validated up front."""
        return ()

    def write_folders(self) -> tuple[Path, ...]:
        """Folders outside ``ctx.work_dir`` this configured pass writes to by design (a cache folder its config
        names); the runner and check_pass do not count writes there against the contract. The user's cache
        folder, ``$OPTIMIZER_CACHE_DIR`` and the system temp folder need no mention here."""
        return ()

    @abstractmethod
    def run(self, artifact: Artifact, ctx: PassContext) -> Artifact:
        """Turn ``artifact`` into a new artifact written under ``ctx.work_dir``."""

    def new_artifact(self, source: Artifact, ctx: PassContext, *, entry: str, form: str | None = None,
                     meta: dict[str, Any] | None = None, facts: dict[str, Any] | None = None) -> Artifact:
        """The output handle with lineage filled in (parent hash, pass, version, config).

        Facts the pass does not set (params, MACs, precision) are inherited from the source.
        """
        inherited = {k: source.facts[k] for k in ("params", "macs", "precision") if k in source.facts}
        return Artifact(
            form=form or self.output_form,
            path=ctx.work_dir,
            entry=entry,
            inputs=list(source.inputs),
            meta=meta or {},
            facts={**inherited, **(facts or {})},
            lineage={
                "parent": source.sha256,
                "stage": ctx.stage,
                "pass": self.name,
                "pass_version": self.version,
                "config": self.config.model_dump(mode="json"),
            },
        )


def first_bad_pattern(patterns: list[str]) -> tuple[str, str] | None:
    """(pattern, why) for the first entry that is not a regular expression, else None; for config validators,
    which each word the error for their own field."""
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            return pattern, str(exc)
    return None


def earlier_torch_artifact(ctx: PassContext, reference: str, role: str, hint: str) -> Artifact:
    """The torch artifact of stage ``reference`` ('baseline' or an earlier stage), for a pass that reads one
    (a distillation teacher, a reconstruction reference). ``role`` names it in errors; ``hint`` says what to do
    when it is not a torch artifact."""
    from optimizer.errors import RecipeError

    if reference not in ctx.artifacts:
        stages = [s.name for s in ctx.recipe.recipe.stages]
        if reference == ctx.stage:
            why = "it is this stage itself"
        elif reference in stages:
            why = "that stage runs after this one"
        else:
            from optimizer.recipe import suggest

            why = f"there is no such stage{suggest(reference, ['baseline', *stages])}"
        earlier = ", ".join(f"@{name}" for name in ctx.artifacts) or "@baseline"
        raise RecipeError(f"stage '{ctx.stage}': {role} '@{reference}' must name 'baseline' or an earlier "
                          f"stage ({why}); available here: {earlier}")
    artifact = ctx.artifacts[reference]
    if artifact.form != "torch":
        raise RecipeError(f"stage '{ctx.stage}': {role} '@{reference}' is a {artifact.form} artifact; {hint}")
    return artifact


def check_pass_class(cls: type[Pass]) -> None:
    """Raise TypeError when a Pass subclass breaks the static rules of the contract."""
    problems = []
    for attr in ("name", "summary", "input_forms", "output_form"):
        if not hasattr(cls, attr):
            problems.append(f"missing class attribute '{attr}'")
    if problems:
        raise TypeError(f"{cls.__module__}.{cls.__qualname__}: {'; '.join(problems)}")
    if not re.fullmatch(PASS_NAME_PATTERN, cls.name):
        problems.append(f"name '{cls.name}' must be lower-case words joined by dots, e.g. 'prune.magnitude'")
    unknown = [f for f in (*cls.input_forms, cls.output_form) if f not in FORMS]
    if unknown:
        problems.append(f"unknown forms {unknown}; known: {list(FORMS)}")
    if not cls.input_forms:
        problems.append("input_forms is empty")
    if not (isinstance(cls.Config, type) and issubclass(cls.Config, BaseModel)):
        problems.append("Config must be a pydantic model (subclass optimizer.PassConfig)")
    elif cls.Config.model_config.get("extra") != "forbid":
        problems.append("Config must forbid unknown keys (subclass optimizer.PassConfig)")
    bad_needs = [n for n in cls.needs if n not in ("calibration", "train", "eval")]
    if bad_needs:
        problems.append(f"unknown data needs {bad_needs}")
    if problems:
        raise TypeError(f"{cls.__module__}.{cls.__qualname__}: {'; '.join(problems)}")
