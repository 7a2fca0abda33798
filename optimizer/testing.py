"""Test a pass against the rules every pass must keep, in one call.

A recipe trusts each pass to follow the contract of :class:`optimizer.Pass`: write its artifact into
``ctx.work_dir`` and nowhere else, leave its input alone, return an artifact of the form it announced,
record honest lineage, and produce a model that loads and runs in its form's runtime. ``check_pass``
runs a pass outside a recipe, the way the runner would, and checks all of that::

    from optimizer.testing import check_pass

    def test_my_pass(tmp_path):
        check_pass(MyPass, {"strength": 0.5}, source="runs/quickstart/artifacts/export", work_dir=tmp_path)

It returns a :class:`PassCheckReport` listing every rule and whether it held, and raises
``AssertionError`` naming each violated rule (so it reads well in pytest).

How writes are watched: the pass runs on a copy of its input inside a private folder whose every file is
listed before and after; Python-level file operations anywhere (``open`` for writing, rename, remove,
mkdir, shutil copies) are recorded through an audit hook (``sys.addaudithook``; installed once per
process, inert outside a check). Scratch files and folders a pass creates and removes again before
``run`` returns are allowed; whatever it leaves, changes or removes outside ``ctx.work_dir`` is not.
Writes made by native code or by child processes are seen only inside the private folder, and as new
entries at the top of the current directory. Python bytecode caches, the user's cache folder (``~/.cache``), OpenVINO's
telemetry folder (``~/intel``), ``$OPTIMIZER_CACHE_DIR``, the folders the pass names in ``write_folders()`` and
folders given as ``allow_writes`` are not checked. The write watching is ``optimizer.contract``'s, the same code
the runner enforces the contract with on every run.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from optimizer.artifact import FORMS, METADATA_FILE, Artifact
from optimizer.data.provider import ProviderView
# One implementation of write watching, shared with the runner, which enforces the same rules on every run.
from optimizer.contract import (
    _collapse,
    _default_allowed,
    _file_hashes,
    _ignored,
    _inside,
    _listing,
    _top_level,
    _tree,
    _tree_changes,
    _watch_writes,
    _write_changes,
)

if TYPE_CHECKING:
    from optimizer.data.provider import DataProvider
    from optimizer.passes.base import Pass, PassConfig
    from optimizer.recipe import LoadedRecipe, Recipe

__all__ = ["RULES", "PassCheckReport", "RuleResult", "check_pass"]

# Rule id -> the rule in words. The order is the order they are checked and reported in.
RULES: dict[str, str] = {
    "contract": "class attributes follow the static rules (name, summary, forms, Config, needs)",
    "config-forbids-unknown-keys": "Config rejects a key it does not define",
    "config-round-trip": "Config survives model_dump(mode='json') -> JSON -> model_validate unchanged",
    "config-schema": "Config has a JSON Schema (recipe docs and editors read it)",
    "output-form-for": "output_form_for() gives a known form for every input form",
    "run": "run() returns an Artifact without raising",
    "artifact-in-work-dir": "the returned artifact's folder is ctx.work_dir",
    "output-form": "the returned form is output_form_for(input form)",
    "entry-exists": "the entry file exists, is a regular file, and lies inside ctx.work_dir",
    "finalize": "finalize() hashes the files; artifact.json reloads and every hash verifies",
    "lineage": "lineage names the parent artifact, the stage, the pass, its version and its full config",
    "inputs-kept": "the output keeps the input spec (names, dtypes, per-sample shapes)",
    "writes-confined": "nothing is left, changed or removed outside ctx.work_dir",
    "input-unchanged": "the input artifact's files are byte-identical afterwards",
    "declared-data": "only data splits the pass declares (needs / required_data(); eval always) are read",
    "details-json": "ctx.details is plain JSON (it goes into report.json)",
    "runtime-loads": "the output opens in its form's runtime",
    "runtime-output": "a batch of the input spec's shape gives finite outputs of the input artifact's output shape",
    "repeatable": "a second run with the same seed gives identical files (deterministic) or a valid artifact",
}

# Enough samples for calibration-style passes, small enough for any input size.
SYNTHETIC_BYTES = 32 << 20
SYNTHETIC_MAX_SAMPLES = 512
SYNTHETIC_MIN_SAMPLES = 8


@dataclass
class RuleResult:
    rule: str
    passed: bool | None
    """True: kept; False: violated; None: not checked (``detail`` says why)."""
    detail: str = ""

    @property
    def description(self) -> str:
        return RULES[self.rule]


@dataclass
class PassCheckReport:
    """What ``check_pass`` found: every rule, in order, with its outcome."""

    pass_name: str
    config: dict[str, Any]
    input_form: str
    output_form: str | None
    results: list[RuleResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    output: Artifact | None = None
    """The first run's artifact; its files stay on disk only when ``work_dir`` was given."""

    @property
    def ok(self) -> bool:
        return not self.violations

    @property
    def violations(self) -> list[RuleResult]:
        return [r for r in self.results if r.passed is False]

    @property
    def checked(self) -> list[str]:
        """Ids of the rules that were checked (kept or violated)."""
        return [r.rule for r in self.results if r.passed is not None]

    def result(self, rule: str) -> RuleResult:
        for item in self.results:
            if item.rule == rule:
                return item
        raise KeyError(f"no rule '{rule}' in this report; rules: {[r.rule for r in self.results]}")

    def __str__(self) -> str:
        arrow = f"{self.input_form} -> {self.output_form or '?'}"
        lines = [f"check_pass {self.pass_name} ({arrow}), config {json.dumps(self.config, sort_keys=True)}"]
        width = max(len(r.rule) for r in self.results) if self.results else 0
        for item in self.results:
            mark = {True: "ok  ", False: "FAIL", None: "skip"}[item.passed]
            detail = f": {item.detail}" if item.detail else ""
            lines.append(f"  {mark}  {item.rule:<{width}}  {item.description}{detail}")
        lines += [f"  note: {note}" for note in self.notes]
        kept = sum(r.passed is True for r in self.results)
        skipped = sum(r.passed is None for r in self.results)
        lines.append(f"{kept} rules kept, {len(self.violations)} violated, {skipped} not checked")
        return "\n".join(lines)

    def failure_message(self) -> str:
        head = (f"check_pass({self.pass_name}): {len(self.violations)} of {len(self.checked)} checked rules "
                "violated:")
        body = [f"  - {r.rule} ({r.description}): {r.detail}" for r in self.violations]
        kept = [r.rule for r in self.results if r.passed is True]
        tail = [f"kept: {', '.join(kept) or 'none'}"]
        return "\n".join([head, *body, *tail])


# ------------------------------------------------------------------------------------------ data


class _RecordingData(ProviderView):
    """A DataProvider stand-in that remembers which splits the pass read."""

    def __init__(self, provider: "DataProvider"):
        super().__init__(provider)
        self.read: set[str] = set()

    def has(self, split: str) -> bool:
        return self._provider.has(split)  # type: ignore[arg-type]

    def get(self, split: str):
        self.read.add(split)
        return self._provider.get(split)  # type: ignore[arg-type]


def _synthetic_inputs(specs: list, seed: int) -> dict[str, np.ndarray]:
    """Seeded inputs of the spec's per-sample shapes: normal floats, ones for integers (valid token ids)."""
    per_sample = sum(int(np.prod(s.shape[1:])) * np.dtype(s.dtype).itemsize for s in specs) or 1
    count = int(min(SYNTHETIC_MAX_SAMPLES, max(SYNTHETIC_MIN_SAMPLES, SYNTHETIC_BYTES // per_sample)))
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for spec in specs:
        shape = (count, *spec.shape[1:])
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            arrays[spec.name] = rng.standard_normal(shape).astype(dtype)
        else:
            arrays[spec.name] = np.ones(shape, dtype=dtype)
    return arrays


def _synthetic_recipe(folder: Path, source: Artifact, pass_name: str, stage: str, config: dict[str, Any],
                      seed: int, threads: int, labels_from: Any) -> "LoadedRecipe":
    """A recipe whose eval, calibration and train splits are the same seeded random samples, labelled
    with the input artifact's own predictions (so training passes have a target any classifier fits)."""
    from optimizer.recipe import LoadedRecipe, Recipe

    inputs = _synthetic_inputs(source.inputs, seed)
    outputs = labels_from(inputs)
    labels = (outputs.reshape(len(outputs), -1).argmax(-1) if outputs.ndim >= 2
              else np.zeros(len(outputs))).astype(np.int64)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "synthetic.npz"
    keys = {spec.name: f"input{i}" for i, spec in enumerate(source.inputs)}
    np.savez(path, y=labels, **{keys[name]: array for name, array in inputs.items()})
    split = {"dataset": "npz", "path": str(path), "inputs": keys, "labels": "y"}
    model: dict[str, Any] = {"inputs": [spec.model_dump() for spec in source.inputs]}
    if source.meta.get("kind") == "factory":
        model.update(factory=source.meta["factory"], kwargs=source.meta.get("kwargs", {}))
    raw = {
        "name": "check-pass",
        "seed": seed,
        "model": model,
        "data": {"eval": split, "calibration": split, "train": split},
        "evaluate": {"latency": {"threads": threads}},
        "stages": [{"name": stage, "pass": pass_name, "with": config}],
    }
    return LoadedRecipe(Recipe.model_validate(raw), folder / "recipe.yaml", raw)


def _load_recipe(value: Any) -> "LoadedRecipe":
    from optimizer.recipe import LoadedRecipe, Recipe, load_recipe

    if isinstance(value, LoadedRecipe):
        return value
    if isinstance(value, (Recipe, Mapping)):
        return load_recipe(dict(value) if isinstance(value, Mapping) else value)
    return load_recipe(Path(value))


def _is_recipe(value: Any) -> bool:
    from optimizer.recipe import LoadedRecipe, Recipe

    if isinstance(value, (LoadedRecipe, Recipe, Mapping)):
        return True
    return isinstance(value, (str, Path)) and Path(value).suffix.lower() in (".yaml", ".yml")


def _artifact_at(value: Artifact | str | Path, what: str) -> Artifact:
    if isinstance(value, Artifact):
        return value
    folder = Path(value).expanduser()
    if (folder / METADATA_FILE).is_file():
        return Artifact.load(folder, verify=True)
    stages = folder / "artifacts"
    if stages.is_dir():
        names = sorted(p.name for p in stages.iterdir() if (p / METADATA_FILE).is_file())
        raise ValueError(f"{what}: {folder} is a run's output folder; give one of its stage artifacts: "
                         + ", ".join(str(stages / n) for n in names))
    raise ValueError(f"{what}: {folder} holds no {METADATA_FILE}; give an artifact folder such as "
                     "runs/<run>/artifacts/<stage>, an Artifact, or a recipe")


def _copy_artifact(artifact: Artifact, target: Path) -> Artifact:
    """A private copy: the pass under test never gets the caller's files. Finalized, so it has an id."""
    shutil.copytree(artifact.path, target)
    copy = Artifact(form=artifact.form, path=target, entry=artifact.entry, inputs=list(artifact.inputs),
                    meta=dict(artifact.meta), lineage=dict(artifact.lineage), facts=dict(artifact.facts),
                    files=dict(artifact.files))
    if not copy.files:
        copy.finalize()
    copy.verify()
    return copy


# ------------------------------------------------------------------------------------------ checks


class _Checks:
    """Collects rule outcomes; the first outcome given for a rule wins (a later run cannot un-fail it)."""

    def __init__(self) -> None:
        self.outcomes: dict[str, RuleResult] = {}

    def kept(self, rule: str, detail: str = "") -> None:
        self.outcomes.setdefault(rule, RuleResult(rule, True, detail))

    def violated(self, rule: str, detail: str) -> None:
        existing = self.outcomes.get(rule)
        if existing is None or existing.passed is not False:
            self.outcomes[rule] = RuleResult(rule, False, detail)

    def skipped(self, rule: str, why: str) -> None:
        self.outcomes.setdefault(rule, RuleResult(rule, None, why))

    def ordered(self) -> list[RuleResult]:
        return [self.outcomes[r] for r in RULES if r in self.outcomes]


def _static_checks(pass_cls: type, checks: _Checks) -> bool:
    """The class-level rules; False when the class is too broken to instantiate."""
    from pydantic import BaseModel

    from optimizer.passes.base import Pass, check_pass_class

    if not (isinstance(pass_cls, type) and issubclass(pass_cls, Pass)):
        checks.violated("contract", f"{pass_cls!r} is not a subclass of optimizer.Pass")
        return False
    try:
        check_pass_class(pass_cls)
        checks.kept("contract")
    except TypeError as exc:
        checks.violated("contract", str(exc).split(": ", 1)[-1])
    if any(not hasattr(pass_cls, a) for a in ("name", "summary", "input_forms", "output_form")):
        return False
    config_cls = getattr(pass_cls, "Config", None)
    if not (isinstance(config_cls, type) and issubclass(config_cls, BaseModel)):
        return False

    forms = {}
    try:
        forms = {form: pass_cls.output_form_for(form) for form in pass_cls.input_forms}
        unknown = {f: out for f, out in forms.items() if out not in FORMS}
        unstable = [f for f in forms if pass_cls.output_form_for(f) != forms[f]]
        if unknown:
            checks.violated("output-form-for", f"unknown output forms {unknown}; known: {list(FORMS)}")
        elif unstable:
            checks.violated("output-form-for", f"gives different answers for the same input form: {unstable}")
        else:
            checks.kept("output-form-for", ", ".join(f"{f} -> {o}" for f, o in forms.items()))
    except Exception as exc:  # noqa: BLE001 - any failure is the finding
        checks.violated("output-form-for", f"raised {type(exc).__name__}: {exc}")

    try:
        config_cls.model_json_schema()
        checks.kept("config-schema")
    except Exception as exc:  # noqa: BLE001
        checks.violated("config-schema", f"model_json_schema() raised {type(exc).__name__}: {exc}")
    return True


def _config_checks(config_cls: type, config: Any, checks: _Checks) -> None:
    from pydantic import ValidationError

    dumped = config.model_dump(mode="json")
    unknown_key = "__check_pass_unknown_key__"
    try:
        config_cls.model_validate({**dumped, unknown_key: 1})
        checks.violated("config-forbids-unknown-keys",
                        f"accepted the unknown key '{unknown_key}'; subclass optimizer.PassConfig "
                        "(model_config extra='forbid') so recipe typos are errors")
    except ValidationError as exc:
        if any(e["type"] == "extra_forbidden" for e in exc.errors()):
            checks.kept("config-forbids-unknown-keys")
        else:
            checks.violated("config-forbids-unknown-keys",
                            f"rejected its own dump plus an unknown key for another reason: {exc.errors()[0]['msg']}")
    try:
        text = json.dumps(dumped, allow_nan=False)
        again = config_cls.model_validate(json.loads(text))
        if again.model_dump(mode="json") != dumped:
            checks.violated("config-round-trip", f"model_validate(model_dump()) gives {again.model_dump(mode='json')}, "
                                                 f"not {dumped}")
        else:
            checks.kept("config-round-trip")
    except (TypeError, ValueError) as exc:  # ValidationError is a ValueError
        checks.violated("config-round-trip", f"{type(exc).__name__}: {str(exc).splitlines()[0]}")


def _output_checks(pass_cls: type, instance: "Pass", produced: Any, ctx: Any, source: Artifact,
                   checks: _Checks, run_label: str) -> Artifact | None:
    """Rules about the returned artifact; returns it finalized, or None when it cannot be used further."""
    if not isinstance(produced, Artifact):
        checks.violated("run", f"{run_label}: run() returned {type(produced).__name__}, not an Artifact")
        return None
    checks.kept("run")
    work_dir = Path(ctx.work_dir).resolve()
    if Path(produced.path).resolve() != work_dir:
        checks.violated("artifact-in-work-dir", f"{run_label}: returned an artifact in {produced.path}, not in "
                                                f"ctx.work_dir {ctx.work_dir}")
        return None
    checks.kept("artifact-in-work-dir")

    expected_form = pass_cls.output_form_for(source.form)
    if produced.form != expected_form:
        checks.violated("output-form", f"{run_label}: returned form '{produced.form}', but "
                                       f"output_form_for('{source.form}') is '{expected_form}'")
    else:
        checks.kept("output-form", f"{source.form} -> {produced.form}")

    entry = produced.entry_path
    if entry.is_symlink() or not entry.is_file():
        checks.violated("entry-exists", f"{run_label}: entry file {entry} is missing or not a regular file")
        return None
    if not _inside(str(entry.resolve()), str(work_dir)):
        checks.violated("entry-exists", f"{run_label}: entry {produced.entry} resolves outside ctx.work_dir")
        return None
    links = [p for p in work_dir.rglob("*") if p.is_symlink()]
    if links:
        checks.violated("entry-exists", f"{run_label}: the artifact folder holds links: "
                                        f"{_listing([str(p.relative_to(work_dir)) for p in links])}")
        return None
    checks.kept("entry-exists", produced.entry)

    try:
        produced.finalize()
        reloaded = Artifact.load(work_dir, verify=True)
        if (reloaded.form, reloaded.entry, reloaded.files) != (produced.form, produced.entry, produced.files):
            raise ValueError("artifact.json does not describe the returned artifact")
        if not reloaded.files:
            raise ValueError("no files were hashed")
        checks.kept("finalize", f"{len(reloaded.files)} files, {produced.size_bytes / 1e6:.2f} MB")
    except Exception as exc:  # noqa: BLE001
        checks.violated("finalize", f"{run_label}: {type(exc).__name__}: {exc}")
        return None

    expected = {
        "parent": source.sha256,
        "stage": ctx.stage,
        "pass": pass_cls.name,
        "pass_version": pass_cls.version,
        "config": instance.config.model_dump(mode="json"),
    }
    wrong = {k: produced.lineage.get(k, "(missing)") for k, v in expected.items() if produced.lineage.get(k) != v}
    if wrong:
        checks.violated("lineage", f"{run_label}: lineage fields {sorted(wrong)} differ from the expected "
                                   f"{ {k: expected[k] for k in wrong} } (build the result with self.new_artifact)")
    else:
        checks.kept("lineage")

    def spec_key(specs: list) -> list[tuple]:
        return [(s.name, s.dtype, tuple(s.shape[1:])) for s in specs]

    if spec_key(produced.inputs) != spec_key(source.inputs):
        checks.violated("inputs-kept", f"{run_label}: inputs {spec_key(produced.inputs)} differ from the input's "
                                       f"{spec_key(source.inputs)}")
    else:
        checks.kept("inputs-kept")
    return produced


def _runtime_checks(output: Artifact, reference: np.ndarray, batch: dict[str, np.ndarray], threads: int,
                    options: dict[str, Any] | None, checks: _Checks, run_label: str) -> dict[str, Any]:
    from optimizer.runtimes.base import open_runtime

    try:
        runtime = open_runtime(output, threads=threads, options=options)
    except Exception as exc:  # noqa: BLE001
        checks.violated("runtime-loads", f"{run_label}: {type(exc).__name__}: {exc}")
        checks.skipped("runtime-output", "the output did not load")
        return {}
    checks.kept("runtime-loads", runtime.name)
    try:
        size = len(next(iter(batch.values())))
        result = np.asarray(runtime.run_batched(batch, runtime.fixed_batch or size))
    except Exception as exc:  # noqa: BLE001
        checks.violated("runtime-output", f"{run_label}: running a batch raised {type(exc).__name__}: {exc}")
        return {}
    finally:
        runtime.close()
    facts: dict[str, Any] = {}
    bad = int((~np.isfinite(result)).sum()) if np.issubdtype(result.dtype, np.floating) else 0
    if result.shape != reference.shape:
        checks.violated("runtime-output", f"{run_label}: output shape {result.shape} differs from the input "
                                          f"artifact's {reference.shape}")
    elif bad:
        checks.violated("runtime-output", f"{run_label}: {bad} of {result.size} output values are NaN or infinite")
    else:
        diff = np.abs(result.astype(np.float64) - reference.astype(np.float64))
        facts = {"max_abs_diff": float(diff.max()) if diff.size else 0.0}
        detail = f"shape {list(result.shape)}, max abs diff vs input {facts['max_abs_diff']:.3g}"
        if result.ndim >= 2:
            same = result.reshape(len(result), -1).argmax(-1) == reference.reshape(len(reference), -1).argmax(-1)
            facts["top1_agreement"] = float(same.mean())
            detail += f", top-1 agreement {facts['top1_agreement']:.0%}"
        checks.kept("runtime-output", detail)
    return facts


# ------------------------------------------------------------------------------------------ the API


def check_pass(
    pass_cls: type["Pass"],
    config: "PassConfig | Mapping[str, Any] | None" = None,
    *,
    source: "Artifact | str | Path | LoadedRecipe | Recipe | Mapping[str, Any]",
    data: "LoadedRecipe | Recipe | Mapping[str, Any] | str | Path | DataProvider | None" = None,
    artifacts: Mapping[str, Artifact | str | Path] | None = None,
    seed: int | None = None,
    threads: int | None = None,
    deterministic: bool = True,
    repeat: bool = True,
    work_dir: str | Path | None = None,
    stage: str = "check",
    runtime_options: dict[str, Any] | None = None,
    allow_writes: Sequence[str | Path] = (),
    raise_on_violation: bool = True,
) -> PassCheckReport:
    """Run ``pass_cls`` the way a recipe would and check every rule of the pass contract (see ``RULES``).

    Args:
        pass_cls: the Pass subclass under test (registered or not).
        config: its configuration, as a mapping (validated by ``pass_cls.Config``) or a Config instance;
            None for the defaults.
        source: the input artifact: an :class:`Artifact`, the folder of one (``runs/<run>/artifacts/<stage>``
            or a run's ``final/``), or a recipe (a ``.yaml`` path, a mapping or a loaded recipe) whose
            baseline, built from its model, is the input.
        data: where the pass's data splits come from: a recipe (path, mapping, ``Recipe``, loaded recipe) or
            a ``DataProvider``. Defaults to the recipe given as ``source``. Without any recipe every split is
            the same seeded random inputs of the input spec (8 to 512 samples), labelled with the input
            artifact's own predictions: enough for the contract, meaningless for accuracy.
        artifacts: earlier stages the pass reads from ``ctx.artifacts``, by name; ``baseline`` is ``source``
            unless given here.
        seed, threads: ``ctx.seed`` and ``ctx.threads`` (default: the data recipe's, else 0 and 1).
        deterministic: require byte-identical output files from two runs with the same seed. Set False for
            a pass that is not; both runs must then still produce valid artifacts.
        repeat: run the pass a second time for the ``repeatable`` rule; False halves the time.
        work_dir: a folder for the runs (e.g. pytest's ``tmp_path``); what is written there is kept.
            Default: a temporary folder, removed at the end.
        stage: ``ctx.stage``, the stage name the pass sees.
        runtime_options: runtime options by form, as the runner passes them (``{"onnx": {...}}``).
        allow_writes: folders a library the pass calls writes to by design (a compiler cache, say);
            changes there are not violations. The user's cache folder, ~/intel, $OPTIMIZER_CACHE_DIR and the
            pass's own ``write_folders()`` are always allowed.
        raise_on_violation: raise ``AssertionError`` listing the violated rules (the default, for tests);
            False returns the report either way.

    Returns:
        A :class:`PassCheckReport`; ``str(report)`` is a table of every rule and its outcome.

    Raises:
        AssertionError: a rule was violated (``raise_on_violation``); ``.report`` holds the report.
        ValueError: the call itself is wrong (a source form the pass does not take, invalid config,
            missing stage references); nothing was checked.
    """
    import re

    from optimizer.recipe import STAGE_NAME_PATTERN

    if not re.fullmatch(STAGE_NAME_PATTERN, stage):
        raise ValueError(f"stage '{stage}' is not a valid stage name ({STAGE_NAME_PATTERN})")
    checks = _Checks()
    name = str(getattr(pass_cls, "name", getattr(pass_cls, "__name__", repr(pass_cls))))
    if not _static_checks(pass_cls, checks):
        for rule in RULES:
            checks.skipped(rule, "not reached: the class cannot be used")
        return _finish(PassCheckReport(name, {}, "?", None, checks.ordered()), raise_on_violation)

    config_obj = _configure(pass_cls, config)
    _config_checks(pass_cls.Config, config_obj, checks)
    instance = pass_cls(config_obj)
    config_dump = config_obj.model_dump(mode="json")

    owns_root = work_dir is None
    if owns_root:
        root = Path(tempfile.mkdtemp(prefix="check_pass-"))
    else:
        folder = Path(work_dir).expanduser()  # type: ignore[arg-type]
        folder.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix=f"check_pass-{name}-", dir=folder))
    root = root.resolve()
    try:
        setup = _prepare(pass_cls, instance, name, stage, config_dump, source, data, artifacts, seed, threads,
                         runtime_options, root)
        setup.allow_writes = tuple(allow_writes)
        report = PassCheckReport(name, config_dump, setup.input.form, pass_cls.output_form_for(setup.input.form))
        outputs: list[Artifact] = []
        for index in range(2 if repeat else 1):
            output = _run_once(pass_cls, instance, setup, stage, f"run {index + 1}", root / f"run{index + 1}",
                               checks)
            if output is None:
                break
            outputs.append(output)
            if checks.outcomes["output-form"].passed is False:
                # The runtime is chosen by form: with the wrong form its verdict would mislead.
                checks.skipped("runtime-loads", "the returned form is wrong")
                checks.skipped("runtime-output", "the returned form is wrong")
            elif index == 0 or not deterministic:
                facts = _runtime_checks(output, setup.reference, setup.batch, setup.threads, runtime_options,
                                        checks, f"run {index + 1}")
                if index == 0 and facts:
                    report.notes.append(f"output vs input on {len(setup.reference)} eval sample(s): "
                                        + ", ".join(f"{k} {v:.4g}" for k, v in facts.items()))
            if index == 1:
                _repeat_check(outputs[0], output, deterministic, setup.seed, checks)
        report.output = outputs[0] if outputs else None
        for rule in RULES:
            checks.skipped(rule, "repeat=False" if rule == "repeatable" and not repeat
                           else "not reached: an earlier rule failed")
        report.results = checks.ordered()
        if owns_root:
            report.notes.append("no work_dir given: the runs' files were removed")
        return _finish(report, raise_on_violation)
    finally:
        if owns_root:
            shutil.rmtree(root, ignore_errors=True)


def _configure(pass_cls: type["Pass"], config: Any) -> Any:
    from pydantic import ValidationError

    config_cls = pass_cls.Config
    if isinstance(config, config_cls):
        return config
    if config is not None and not isinstance(config, Mapping):
        raise ValueError(f"config for {pass_cls.name}: give a mapping or a {config_cls.__name__}, not "
                         f"{type(config).__name__}")
    try:
        return config_cls.model_validate(dict(config or {}))
    except ValidationError as exc:
        raise ValueError(f"config for {pass_cls.name} is not valid: {exc}") from None


@dataclass
class _Setup:
    input: Artifact
    references: dict[str, Artifact]
    recipe: "LoadedRecipe"
    provider: Any
    seed: int
    threads: int
    batch: dict[str, np.ndarray]
    reference: np.ndarray
    allow_writes: tuple[str | Path, ...] = ()


def _prepare(pass_cls: type["Pass"], instance: "Pass", name: str, stage: str, config_dump: dict[str, Any],
             source: Any, data: Any, artifacts: Mapping[str, Any] | None, seed: int | None, threads: int | None,
             runtime_options: dict[str, Any] | None, root: Path) -> _Setup:
    """Private copies of the inputs, the data, and the input artifact's output on one batch."""
    from optimizer.data.provider import DataProvider
    from optimizer.runtimes.base import open_runtime

    inputs_dir = root / "inputs"
    inputs_dir.mkdir()
    recipe = _load_recipe(source) if _is_recipe(source) else None
    if recipe is not None:
        from optimizer.baseline import make_baseline

        input_artifact = make_baseline(recipe, inputs_dir / "baseline").finalize()
    else:
        input_artifact = _copy_artifact(_artifact_at(source, "source"), inputs_dir / "source")
    if input_artifact.form not in pass_cls.input_forms:
        raise ValueError(f"source is a '{input_artifact.form}' artifact; {name} takes {list(pass_cls.input_forms)}")
    references: dict[str, Artifact] = {"baseline": input_artifact}
    for ref_name, ref in (artifacts or {}).items():
        references[ref_name] = _copy_artifact(_artifact_at(ref, f"artifacts['{ref_name}']"),
                                               inputs_dir / f"ref-{ref_name}")
    missing = [r for r in instance.stage_references() if r not in references]
    if missing:
        raise ValueError(f"{name} with this config reads stages {missing} from ctx.artifacts; give them as "
                         "artifacts={name: artifact folder}")

    provider: Any = None
    if isinstance(data, DataProvider):
        provider = data
        recipe = getattr(data, "_loaded", None)
        if recipe is None:
            raise ValueError("data: this DataProvider carries no recipe; give the recipe instead")
    elif data is not None:
        recipe = _load_recipe(data)
    seed = seed if seed is not None else (recipe.recipe.seed if recipe else 0)
    threads = threads if threads is not None else (recipe.recipe.evaluate.latency.threads if recipe else 1)

    runtime = open_runtime(input_artifact, threads=threads, options=runtime_options)
    try:
        size = runtime.fixed_batch or input_artifact.inputs[0].shape[0]
        if recipe is None:
            recipe = _synthetic_recipe(root / "data", input_artifact, name, stage, config_dump, seed, threads,
                                       lambda arrays: runtime.run_batched(arrays, runtime.fixed_batch or 64))
        if provider is None:
            provider = DataProvider(recipe, list(input_artifact.inputs))
        eval_data = provider.eval()
        if len(eval_data) < size:
            raise ValueError(f"the eval data has {len(eval_data)} samples; the input spec's batch is {size}")
        batch = {k: np.ascontiguousarray(v) for k, v in eval_data.batch(0, size).items()}
        reference = np.asarray(runtime.run_batched(batch, size))
    finally:
        runtime.close()
    return _Setup(input_artifact, references, recipe, provider, seed, threads, batch, reference)


def _run_once(pass_cls: type["Pass"], instance: "Pass", setup: _Setup, stage: str, label: str, run_root: Path,
              checks: _Checks) -> Artifact | None:
    """One run of the pass in a fresh work_dir, watched; the finalized output, or None when unusable."""
    from optimizer.passes.base import PassContext
    from optimizer.progress import Progress

    # Like the runner's staging/artifacts/<stage>: the parent exists and belongs to the run.
    work_dir = run_root / "artifacts" / stage
    recording = _RecordingData(setup.provider)
    ctx = PassContext(stage=stage, work_dir=work_dir, recipe=setup.recipe, data=recording,  # type: ignore[arg-type]
                      progress=Progress(quiet=True), threads=setup.threads, seed=setup.seed,
                      artifacts=dict(setup.references))
    work_dir.mkdir(parents=True)
    root = run_root.parent
    cwd = Path.cwd()
    tree_before, cwd_before = _tree(root, skip=work_dir), _top_level(cwd)
    hashes_before = {n: _file_hashes(a.path) for n, a in setup.references.items()}
    produced: Any = None
    error: Exception | None = None
    with _watch_writes(work_dir) as recorder:
        try:
            produced = instance.run(setup.input, ctx)
        except Exception as exc:  # noqa: BLE001 - the failure is the finding
            error = exc

    # In the current folder only new entries count: other programs (an editor, a parallel test) may be
    # changing files there at the same time, and changes by this process are in the audit record anyway.
    changes = {p: why for p, why in _tree_changes(cwd_before, _top_level(cwd)).items() if why == "left behind"}
    changes.update(_tree_changes(tree_before, _tree(root, skip=work_dir)))
    changes.update(_write_changes(recorder, work_dir))
    allowed = _default_allowed() + [os.path.abspath(os.path.expanduser(str(a)))
                                     for a in (*setup.allow_writes, *instance.write_folders())]
    lines = _collapse({p: why for p, why in changes.items() if not _ignored(p, allowed)})
    if lines:
        checks.violated("writes-confined", f"{label}: outside ctx.work_dir: {_listing(lines)}")
    else:
        checks.kept("writes-confined")

    altered: list[str] = []
    for ref_name, artifact in setup.references.items():
        after, before = _file_hashes(artifact.path), hashes_before[ref_name]
        prefix = "" if ref_name == "baseline" else f"{ref_name}/"
        altered += [f"{prefix}{f} (changed)" for f in sorted(set(before) & set(after)) if before[f] != after[f]]
        altered += [f"{prefix}{f} (removed)" for f in sorted(set(before) - set(after))]
        altered += [f"{prefix}{f} (added)" for f in sorted(set(after) - set(before))]
    if altered:
        checks.violated("input-unchanged", f"{label}: the pass modified its input artifact: {_listing(altered)}")
    else:
        checks.kept("input-unchanged")

    undeclared = sorted(recording.read - set(instance.required_data()) - {"eval"})
    if undeclared:
        checks.violated("declared-data", f"{label}: read data.{', data.'.join(undeclared)} without declaring it in "
                                         "needs (or required_data()), so recipe validation cannot check it exists")
    else:
        checks.kept("declared-data", f"read {', '.join(sorted(recording.read))}" if recording.read else "no data read")
    try:
        json.dumps(ctx.details)
        checks.kept("details-json")
    except (TypeError, ValueError) as exc:
        checks.violated("details-json", f"{label}: {exc}")

    if error is not None:
        checks.violated("run", f"{label}: raised {type(error).__name__}: {error}")
        return None
    return _output_checks(pass_cls, instance, produced, ctx, setup.input, checks, label)


def _repeat_check(first: Artifact, second: Artifact, deterministic: bool, seed: int, checks: _Checks) -> None:
    if first.files == second.files:
        checks.kept("repeatable", "identical files")
        return
    if not deterministic:
        checks.kept("repeatable", "files differ between the runs (deterministic=False); both are valid")
        return
    differ = sorted(n for n in set(first.files) | set(second.files) if first.files.get(n) != second.files.get(n))
    checks.violated("repeatable", f"two runs with seed {seed} wrote different files: {_listing(differ)}; make the "
                                  "pass deterministic, or call check_pass(..., deterministic=False)")


def _finish(report: PassCheckReport, raise_on_violation: bool) -> PassCheckReport:
    if raise_on_violation and report.violations:
        error = AssertionError(report.failure_message())
        error.report = report  # type: ignore[attr-defined]
        raise error
    return report
