"""Fuzzing the front door: mutated recipes and random command lines fed to the CLI's ``main()``.

Whatever comes in, the command ends cleanly: exit 2 (usage or recipe error) or 3 (rejected input), or 0
for ``validate`` when the mutation left a valid recipe; on failure exactly one line on stderr, starting
with ``optimizer:``, never a traceback. ``run`` always gets a checkpoint that is missing or unsafe, so it
fails before any stage: nothing here trains or measures.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optimizer.cli import main
from tests.conftest import quickstart_dict

# A fixed, fast set by default (so the suite is repeatable); FUZZ_EXAMPLES=5000 explores, with fresh randomness.
_EXPLORE = os.environ.get("FUZZ_EXAMPLES")
FUZZ = settings(max_examples=int(_EXPLORE or 100), deadline=None, derandomize=not _EXPLORE, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

TAGS = [
    "!!python/object/apply:os.system ['touch {marker}']",
    "!!python/object/apply:builtins.exec [\"open('{marker}', 'w')\"]",
    "!!python/name:os.system",
    "!!python/module:os",
    "!!python/object/new:builtins.dict {{}}",
    "!custom '{marker}'",
]
PASSES = ["export.onnx", "quantize.nncf", "quantize.ort", "no.such.pass", "python:os:system", "python:nope:X",
          "prune.structured", "distill.kd", "finetune", "", "EXPORT.ONNX"]
HUGE = [2**63, -(2**63) - 1, 10**100, 1e308, float("inf"), float("-inf"), float("nan")]

# Text without lone surrogates: a file holds only what UTF-8 can encode.
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.sampled_from(HUGE), st.floats(), TEXT,
                    st.sampled_from(PASSES))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(TEXT, SCALARS, max_size=3))


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> dict[str, Path]:
    """Files the fuzzed commands may name: a real checkpoint, a missing one, unsafe ones, and output folders."""
    import torch
    from safetensors.torch import save_file

    from optimizer.zoo import small_resnet

    root = tmp_path_factory.mktemp("fuzz")
    checkpoint = root / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in small_resnet().state_dict().items()}, str(checkpoint))
    engine = root / "model.engine"
    engine.write_bytes(b"ftrt" + bytes(32))
    legacy = root / "legacy.pt"
    torch.save({"w": torch.zeros(1)}, legacy, _use_new_zipfile_serialization=False)
    broken = root / "broken.safetensors"
    broken.write_bytes((1 << 40).to_bytes(8, "little"))
    return {"root": root, "checkpoint": checkpoint, "missing": root / "missing.safetensors", "engine": engine,
            "legacy": legacy, "broken": broken, "marker": root / "MARKER"}


def invoke(argv: list[str], cwd: Path) -> tuple[int, str]:
    err = io.StringIO()
    previous = os.getcwd()
    os.chdir(cwd)  # a default output folder (runs/<name>) lands in the scratch folder, never in the repository
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse ends with SystemExit
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        os.chdir(previous)
    return code, err.getvalue()


def assert_clean(code: int, stderr: str, allowed: set[int], argv: list[str]) -> None:
    assert "Traceback" not in stderr, (argv, stderr)
    assert code in allowed, (argv, code, stderr)
    if code != 0:
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1, (argv, stderr)
        assert lines[0].startswith("optimizer: "), (argv, stderr)


# ------------------------------------------------------------------------------------ mutations


def paths_of(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path in a nested recipe (mappings and lists)."""
    found = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            found += paths_of(value, prefix + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += paths_of(value, prefix + (index,))
    return found


def parent_of(recipe: dict, path: tuple) -> Any:
    node: Any = recipe
    for part in path[:-1]:
        node = node[part]
    return node


@st.composite
def mutated_recipes(draw, base: dict) -> tuple[dict, list[str]]:
    recipe = copy.deepcopy(base)
    done: list[str] = []
    for _ in range(draw(st.integers(1, 4))):
        paths = paths_of(recipe)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent, last = parent_of(recipe, path), path[-1]
        action = draw(st.sampled_from(["drop", "rename", "replace", "huge", "pass", "wrap"]))
        done.append(f"{action} {'.'.join(map(str, path))}")
        if action == "drop":
            del parent[last]
        elif action == "rename" and isinstance(parent, dict):
            parent[draw(TEXT) or f"{last}_"] = parent.pop(last)
        elif action == "replace":
            parent[last] = draw(VALUES)
        elif action == "huge":
            parent[last] = draw(st.sampled_from(HUGE))
        elif action == "pass":
            stages = recipe.get("stages")
            if isinstance(stages, list) and stages:
                stage = stages[draw(st.integers(0, len(stages) - 1))]
                if isinstance(stage, dict):
                    stage["pass"] = draw(st.sampled_from(PASSES))
        elif action == "wrap":
            parent[last] = [parent[last]] if draw(st.booleans()) else {"value": parent[last]}
    return recipe, done


def write(folder: Path, recipe: Any, name: str = "fuzzed.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------- tests


@FUZZ
@given(data=st.data())
def test_mutated_recipes_validate_cleanly(place, data) -> None:
    recipe, _ = data.draw(mutated_recipes(quickstart_dict(place["checkpoint"])))
    path = write(place["root"], recipe)
    argv = ["validate", str(path)]
    assert_clean(*invoke(argv, place["root"]), {0, 2, 3}, argv)


@FUZZ
@given(data=st.data())
def test_mutated_recipes_fail_run_before_any_stage(place, data) -> None:
    recipe, _ = data.draw(mutated_recipes(quickstart_dict(place["checkpoint"])))
    path = write(place["root"], recipe)
    checkpoint = data.draw(st.sampled_from(["missing", "engine", "legacy", "broken"]))
    argv = ["run", str(path), "--checkpoint", str(place[checkpoint]), "--out", str(place["root"] / "out"), "--quiet"]
    assert_clean(*invoke(argv, place["root"]), {2, 3}, argv)
    assert not (place["root"] / "out" / "report.json").exists()


@FUZZ
@given(data=st.data())
def test_python_tags_anywhere_are_refused_and_never_run(place, data) -> None:
    recipe = quickstart_dict(place["checkpoint"])
    path_in_recipe = data.draw(st.sampled_from(paths_of(recipe)))
    parent_of(recipe, path_in_recipe)[path_in_recipe[-1]] = "__TAG__"
    tag = data.draw(st.sampled_from(TAGS)).format(marker=place["marker"])
    text = yaml.safe_dump(recipe, sort_keys=False).replace("__TAG__", tag)
    path = place["root"] / "tagged.yaml"
    path.write_text(text, encoding="utf-8")
    command = data.draw(st.sampled_from(["validate", "run"]))
    argv = [command, str(path)] + (["--checkpoint", str(place["missing"])] if command == "run" else [])
    code, stderr = invoke(argv, place["root"])
    assert_clean(code, stderr, {2}, argv)
    assert "tag not allowed" in stderr or "not valid YAML" in stderr, stderr
    assert not place["marker"].exists()


@FUZZ
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=300))
def test_arbitrary_yaml_text_validates_cleanly(place, text: str) -> None:
    path = place["root"] / "random.yaml"
    path.write_text(text, encoding="utf-8")
    argv = ["validate", str(path)]
    assert_clean(*invoke(argv, place["root"]), {2}, argv)


OPTIONS = ["--set", "--out", "--checkpoint", "--quiet", "--resume", "--cache", "--debug-not", "--", "-x", "--se",
           "--set=", "stages.0.with.opset=17", "stages.0.with=", "model=", "=", "stages.9.pass=x", "name.x=1",
           "budget.accuracy_drop=2", "seed=1e400", "stages.0=5", "evaluate.latency.threads=-1"]


@FUZZ
@given(data=st.data())
def test_random_command_lines_fail_cleanly(place, data) -> None:
    recipe = write(place["root"], quickstart_dict(place["missing"]), name="base.yaml")
    safe_values = [str(place["root"] / "o1"), str(place["root"] / "o2"), str(place["missing"]), str(place["engine"]),
                   str(place["legacy"]), str(place["broken"]), str(recipe), str(place["root"] / "nope.yaml")]
    command = data.draw(st.sampled_from(["run", "validate", "run", "validate", "bogus", "--set", ""]))
    tokens = data.draw(st.lists(st.one_of(st.sampled_from(OPTIONS), st.sampled_from(safe_values),
                                          TEXT.filter(lambda t: "/" not in t and not t.startswith("."))),
                                max_size=6))
    argv = [command, *tokens]
    if command == "run":
        # Never a real run: whatever else is given, the last --checkpoint wins and is missing or unsafe.
        argv += ["--checkpoint", str(data.draw(st.sampled_from([place["missing"], place["engine"],
                                                                 place["legacy"], place["broken"]])))]
    code, stderr = invoke(argv, place["root"])
    allowed = {0, 2, 3} if command == "validate" else {2, 3}
    assert_clean(code, stderr, allowed, argv)
