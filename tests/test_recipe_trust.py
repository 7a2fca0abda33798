"""What a recipe imports: ``python_path`` folders relative to the recipe for its own passes, factory, data and
metrics (no PYTHONPATH), recipe errors found by validation carrying their line in `optimizer run` as in
`optimizer validate`, and `optimizer validate` listing every module a recipe would import before importing any.
Runs on the Fashion example with 200 eval images in quick latency mode."""

from __future__ import annotations

import contextlib
import io
import json
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from optimizer.cli import main
from optimizer.errors import EXIT_OK, EXIT_USAGE
from tests.conftest import quickstart_dict

MODULE_SOURCE = '''
"""A user's own code, beside the recipe: a model factory, a pass and a metric."""
import shutil

import numpy as np

from optimizer import Artifact, Pass, PassConfig
from optimizer.zoo import small_resnet

print("{name}: module body ran")


def build(**kwargs):
    return small_resnet(**kwargs)


def score(outputs, labels):
    return (np.asarray(outputs).argmax(axis=1) == labels).astype(float)


class Copy(Pass):
    name = "trust.copy"
    summary = "Copy the model (test pass)."
    input_forms = ("torch",)
    output_form = "torch"

    def run(self, artifact: Artifact, ctx) -> Artifact:
        for file in artifact.files:
            shutil.copyfile(artifact.path / file, ctx.work_dir / file)
        return self.new_artifact(artifact, ctx, entry=artifact.entry, meta=dict(artifact.meta))
'''


@pytest.fixture
def clean_sys_path(monkeypatch) -> None:
    """python_path changes sys.path for the process: give each test its own copy."""
    monkeypatch.setattr(sys, "path", list(sys.path))


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def user_project(root: Path, checkpoint: Path, *, metric: bool = False) -> tuple[Path, str]:
    """root/recipes/recipe.yaml naming code in root/recipes/code/<module>.py through python_path: [code]."""
    module = f"user_code_{uuid.uuid4().hex[:8]}"
    code = root / "recipes" / "code"
    code.mkdir(parents=True)
    (code / f"{module}.py").write_text(MODULE_SOURCE.replace("{name}", module))
    recipe = quickstart_dict(checkpoint, eval_samples=200)
    recipe = {"name": recipe["name"], "seed": 0, "python_path": ["code"], **{k: v for k, v in recipe.items()
                                                                             if k not in ("name", "seed")}}
    recipe["model"]["factory"] = f"{module}:build"
    recipe["budget"] = {}
    recipe["publish"] = "last"
    if metric:
        recipe["evaluate"]["accuracy"] = {"metric": f"python:{module}:score"}
    recipe["stages"] = [{"name": "copy", "pass": f"python:{module}:Copy"},
                        {"name": "export", "pass": "export.onnx"}]
    path = root / "recipes" / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path, module


def line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), start=1) if text in line)


def test_python_path_serves_the_recipes_own_pass_and_factory(example_checkpoint: Path, tmp_path: Path,
                                                             clean_sys_path, monkeypatch) -> None:
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.chdir(tmp_path)  # nowhere near the code: only python_path can find it
    recipe, module = user_project(tmp_path, example_checkpoint)
    recipe_data = yaml.safe_load(recipe.read_text())
    recipe_data["stages"] = recipe_data["stages"][:1]
    recipe.write_text(yaml.safe_dump(recipe_data, sort_keys=False))
    code, _, stderr = cli("run", str(recipe), "--out", str(tmp_path / "out"), "--quiet")
    assert code == EXIT_OK, stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["baseline", "copy"]
    # The measurement processes rebuilt the model from the factory found through python_path.
    assert report["stages"][1]["accuracy"]["value"] > 0.8


def test_missing_python_path_folder_is_a_recipe_error_with_its_line(tmp_path: Path, example_checkpoint: Path,
                                                                    clean_sys_path) -> None:
    recipe, _ = user_project(tmp_path, example_checkpoint)
    recipe.write_text(recipe.read_text().replace("- code", "- cdoe"))
    for command in (["validate", str(recipe)], ["run", str(recipe), "--out", str(tmp_path / "out")]):
        code, _, stderr = cli(*command)
        assert code == EXIT_USAGE
        assert stderr.strip().startswith(f"optimizer: error: {recipe}:{line_of(recipe, '- cdoe')}: python_path.0: "
                                         f"folder {recipe.parent / 'cdoe'} does not exist"), stderr


def test_run_prints_the_line_of_a_typo_found_by_validation(tmp_path: Path, example_checkpoint: Path,
                                                            clean_sys_path) -> None:
    """A misspelled factory is found by validation, not by the schema: run and validate both name its line."""
    recipe, module = user_project(tmp_path, example_checkpoint)
    recipe.write_text(recipe.read_text().replace(f"{module}:build", f"{module}:biuld"))
    line = line_of(recipe, ":biuld")
    for command in (["validate", str(recipe)], ["run", str(recipe), "--out", str(tmp_path / "out")]):
        code, _, stderr = cli(*command)
        assert code == EXIT_USAGE, stderr
        assert stderr.strip() == (f"optimizer: error: {recipe}:{line}: model.factory: module '{module}' has no "
                                  "attribute 'biuld'"), stderr
    assert not (tmp_path / "out").exists()


def test_validate_lists_every_module_the_recipe_imports_before_importing_any(tmp_path: Path, example_checkpoint: Path,
                                                                              clean_sys_path) -> None:
    recipe, module = user_project(tmp_path, example_checkpoint, metric=True)
    code, stdout, stderr = cli("validate", str(recipe))
    assert code == EXIT_OK, stderr
    lines = stdout.splitlines()
    assert lines[0].startswith("code this recipe imports (4; it runs with your rights")
    listed = [line.split() for line in lines[1:5]]
    where = str(recipe.parent / "code" / f"{module}.py")
    assert listed == [[module, "model.factory:", "python_path:", where],
                      [module, "evaluate.accuracy.metric:", "python_path:", where],
                      [module, "stages.0.pass:", "python_path:", where],
                      ["optimizer.passes.export_onnx", "stages.1.pass:", "built-in", "pass"]]
    # Listed first, imported after: the module's own code ran only once the list was printed.
    assert stdout.index(f"{module}: module body ran") > stdout.index(lines[4])
    assert lines[-1] == f"{recipe}: valid"


def test_a_recipe_rebuilt_from_its_mapping_keeps_the_python_path_folders(tmp_path: Path, example_checkpoint: Path,
                                                                         clean_sys_path, monkeypatch) -> None:
    """A search's trials are loaded from the recipe's mapping, elsewhere: the folders stay the file's."""
    from optimizer.recipe import load_recipe

    recipe, module = user_project(tmp_path, example_checkpoint)
    loaded = load_recipe(recipe)
    assert loaded.raw["python_path"] == [str(recipe.parent / "code")]
    monkeypatch.chdir(tmp_path)
    again = load_recipe(loaded.raw)
    assert again.recipe.stages[0].pass_name == f"python:{module}:Copy"
