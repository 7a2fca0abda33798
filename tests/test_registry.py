"""The pass registry: @register_pass, python:module:Class, entry points, and the contract checks."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from pydantic import BaseModel, Field

import optimizer.registry as registry
from optimizer import Pass, PassConfig, register_pass
from optimizer.errors import RecipeError
from optimizer.passes.base import check_pass_class
from optimizer.recipe import load_recipe
from optimizer.registry import get_pass, pass_names


@pytest.fixture(autouse=True)
def isolated_registry(monkeypatch):
    """Passes registered by one test are not seen by the next."""
    monkeypatch.setattr(registry, "_registered", {})


def _onnx_recipe(pass_name: str, config: dict | None = None) -> dict:
    return {
        "name": "t",
        "model": {"checkpoint": "model.onnx", "input": {"shape": [1, 4]}},
        "data": {"eval": {"dataset": "fashion-mnist"}},
        "stages": [{"name": "custom", "pass": pass_name, "with": config or {}}],
    }


class ScaleConfig(PassConfig):
    factor: float = Field(default=1.0, gt=0)


def make_scale_pass(name: str = "test.scale") -> type[Pass]:
    class ScalePass(Pass):
        summary = "multiply the weights (test)"
        input_forms = ("onnx",)
        output_form = "onnx"
        Config = ScaleConfig

        def run(self, artifact, ctx):  # pragma: no cover - never run here
            return artifact

    ScalePass.name = name
    return ScalePass


# ------------------------------------------------------------------------------------ register_pass


def test_register_pass_makes_a_pass_available_to_recipes():
    cls = register_pass(make_scale_pass())
    assert get_pass("test.scale") is cls
    assert "test.scale" in pass_names()

    loaded = load_recipe(_onnx_recipe("test.scale", {"factor": 2}))
    assert loaded.recipe.stages[0].with_ == {"factor": 2.0}
    with pytest.raises(RecipeError, match=r"stages\.0\.with\.factr: unknown key 'factr'; did you mean 'factor'"):
        load_recipe(_onnx_recipe("test.scale", {"factr": 2}))
    with pytest.raises(RecipeError, match=r"stages\.0\.with\.factor"):
        load_recipe(_onnx_recipe("test.scale", {"factor": -1}))


def test_register_pass_as_a_decorator():
    @register_pass
    class Shout(Pass):
        name = "test.shout"
        summary = "s"
        input_forms = ("torch", "onnx")
        output_form = "torch"

        def run(self, artifact, ctx):  # pragma: no cover
            return artifact

    assert get_pass("test.shout") is Shout
    assert Shout().config.model_dump() == {}


def test_unregistered_name_is_unknown():
    with pytest.raises(RecipeError, match="unknown pass 'test.scale'"):
        get_pass("test.scale")


def test_registered_name_gets_suggested():
    register_pass(make_scale_pass())
    with pytest.raises(RecipeError, match="did you mean 'test.scale'"):
        get_pass("test.scael")


def test_builtin_names_cannot_be_taken():
    with pytest.raises(ValueError, match="built-in"):
        register_pass(make_scale_pass("export.onnx"))
    assert get_pass("export.onnx").__module__ == "optimizer.passes.export_onnx"


def test_register_pass_refuses_non_passes():
    class NotAPass:
        name = "test.not"

    with pytest.raises(TypeError, match="subclasses of optimizer.Pass"):
        register_pass(NotAPass)
    with pytest.raises(TypeError):
        register_pass(lambda: None)


# ------------------------------------------------------------------------------- contract checks


def test_config_must_forbid_unknown_keys():
    class LooseConfig(BaseModel):
        factor: float = 1.0

    cls = make_scale_pass()
    cls.Config = LooseConfig
    with pytest.raises(TypeError, match="forbid unknown keys"):
        check_pass_class(cls)
    with pytest.raises(TypeError, match="forbid unknown keys"):
        register_pass(cls)
    assert "test.scale" not in pass_names()


def test_config_must_be_pydantic():
    cls = make_scale_pass()
    cls.Config = dict
    with pytest.raises(TypeError, match="pydantic"):
        check_pass_class(cls)


@pytest.mark.parametrize("name", ["Test.Upper", "has space", "trailing.", ".leading", "a..b", "1digit", "dash-ed", ""])
def test_bad_pass_names_are_refused(name):
    with pytest.raises(TypeError, match="lower-case words joined by dots"):
        register_pass(make_scale_pass(name))


@pytest.mark.parametrize("name", ["prune", "prune.magnitude", "my_org.quantize.int4", "x1.y2"])
def test_good_pass_names_are_accepted(name):
    check_pass_class(make_scale_pass(name))


def test_unknown_forms_and_missing_attributes():
    cls = make_scale_pass()
    cls.output_form = "tflite"
    with pytest.raises(TypeError, match=r"unknown forms \['tflite'\]"):
        check_pass_class(cls)

    cls = make_scale_pass()
    cls.input_forms = ()
    with pytest.raises(TypeError, match="input_forms is empty"):
        check_pass_class(cls)

    cls = make_scale_pass()
    cls.needs = ("validation",)
    with pytest.raises(TypeError, match="unknown data needs"):
        check_pass_class(cls)

    class Bare(Pass):
        def run(self, artifact, ctx):  # pragma: no cover
            return artifact

    with pytest.raises(TypeError, match="missing class attribute 'name'.*'summary'.*'input_forms'.*'output_form'"):
        check_pass_class(Bare)


def test_builtin_passes_follow_the_contract():
    for name in registry.BUILTIN_PASSES:
        cls = get_pass(name)
        check_pass_class(cls)
        assert cls.name == name


# ------------------------------------------------------------------------------ python:module:Class


@pytest.fixture
def user_module(tmp_path, monkeypatch) -> str:
    name = f"user_passes_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(
        """
        from optimizer import Pass, PassConfig

        class HalfConfig(PassConfig):
            keep: float = 0.5

        class Halve(Pass):
            name = "user.halve"
            summary = "halve (test)"
            input_forms = ("onnx",)
            output_form = "onnx"
            Config = HalfConfig

            def run(self, artifact, ctx):
                return artifact

        class Loose(Halve):
            from pydantic import BaseModel as _B
            class Config(_B):
                keep: float = 0.5

        class NotAPass:
            pass
        """
    ))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_python_class_path(user_module):
    cls = get_pass(f"python:{user_module}:Halve")
    assert cls.__name__ == "Halve" and cls.name == "user.halve"
    loaded = load_recipe(_onnx_recipe(f"python:{user_module}:Halve", {"keep": 0.25}))
    assert loaded.recipe.stages[0].with_ == {"keep": 0.25}
    with pytest.raises(RecipeError, match=r"stages\.0\.with\.kept"):
        load_recipe(_onnx_recipe(f"python:{user_module}:Halve", {"kept": 0.25}))


def test_python_class_path_must_follow_the_contract(user_module):
    with pytest.raises(TypeError, match="forbid unknown keys"):
        get_pass(f"python:{user_module}:Loose")
    with pytest.raises(RecipeError, match="not a subclass of optimizer.Pass"):
        get_pass(f"python:{user_module}:NotAPass")


@pytest.mark.parametrize(
    "path, message",
    [
        ("python:no_such_module_xyz:Pass", "cannot import module 'no_such_module_xyz'"),
        ("python:optimizer.zoo:NoSuchPass", "has no attribute 'NoSuchPass'"),
        ("python:optimizer.zoo", "is not an import path"),
    ],
)
def test_python_class_path_errors_name_the_stage(path, message):
    with pytest.raises(RecipeError) as info:
        load_recipe(_onnx_recipe(path))
    assert "stages.0.pass" in str(info.value)
    assert message in str(info.value)


# ---------------------------------------------------------------------------------- entry points


PLUGIN_MODULE = '''
from optimizer import Pass, PassConfig


class IdentityConfig(PassConfig):
    note: str = ""


class IdentityPass(Pass):
    name = "test.identity"
    summary = "returns its input (test plugin)"
    input_forms = ("torch", "onnx")
    output_form = "onnx"
    Config = IdentityConfig

    def run(self, artifact, ctx):
        return artifact
'''

PLUGIN_PYPROJECT = '''
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "optimizer-test-plugin"
version = "0.0.1"

[project.entry-points."optimizer.passes"]
"test.identity" = "optimizer_test_plugin:IdentityPass"
"test.broken" = "optimizer_test_plugin_missing_module:Nothing"

[tool.setuptools]
py-modules = ["optimizer_test_plugin"]
'''


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def installed_plugin(tmp_path):
    source = tmp_path / "plugin"
    source.mkdir()
    (source / "pyproject.toml").write_text(PLUGIN_PYPROJECT)
    (source / "optimizer_test_plugin.py").write_text(PLUGIN_MODULE)
    result = _pip("install", "--no-deps", "--no-build-isolation", "--no-index", str(source))
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        yield
    finally:
        _pip("uninstall", "-y", "optimizer-test-plugin")  # a no-op when the test uninstalled it already


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_entry_point_pass_is_listed_and_usable(installed_plugin, tmp_path):
    cli = subprocess.run([sys.executable, "-m", "optimizer", "passes"], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert cli.returncode == 0, cli.stderr
    rows = {line.split()[0]: line for line in cli.stdout.splitlines() if line.strip()}
    assert "test.identity" in rows
    assert "torch/onnx -> onnx" in rows["test.identity"]
    assert "returns its input (test plugin)" in rows["test.identity"]
    # A broken plugin is shown as such; it does not break the listing.
    assert "test.broken" in rows and "cannot load" in rows["test.broken"]
    assert {"export.onnx", "quantize.nncf", "quantize.ort"} <= set(rows)

    check = _python(textwrap.dedent(
        """
        import json
        from optimizer.errors import RecipeError
        from optimizer.recipe import load_recipe
        raw = {"name": "t", "model": {"checkpoint": "m.onnx", "input": {"shape": [1, 4]}},
               "data": {"eval": {"dataset": "fashion-mnist"}},
               "stages": [{"name": "same", "pass": "test.identity", "with": {"note": "hi"}}]}
        loaded = load_recipe(raw)
        out = {"with": loaded.recipe.stages[0].with_}
        raw["stages"][0]["pass"] = "test.broken"
        try:
            load_recipe(raw)
        except RecipeError as exc:
            out["broken"] = str(exc)
        print(json.dumps(out))
        """
    ), tmp_path)
    assert check.returncode == 0, check.stderr
    out = json.loads(check.stdout)
    assert out["with"] == {"note": "hi"}
    assert "stages.0.pass" in out["broken"]
    assert "the package providing pass 'test.broken' failed to load" in out["broken"]

    # Uninstalling the package removes its passes.
    assert _pip("uninstall", "-y", "optimizer-test-plugin").returncode == 0
    cli = subprocess.run([sys.executable, "-m", "optimizer", "passes"], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert cli.returncode == 0, cli.stderr
    assert "test.identity" not in cli.stdout and "test.broken" not in cli.stdout


# ---------------------------------------------------------------------------------- import cost


HEAVY = ("torch", "onnxruntime", "nncf", "onnx", "openvino", "tensorrt")


def test_import_optimizer_is_light(tmp_path):
    result = _python(
        "import json, sys, optimizer\n"
        "from optimizer.registry import pass_names\n"
        "names = pass_names()\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_resolving_builtin_passes_does_not_import_their_libraries(tmp_path):
    # `optimizer passes` and recipe loading resolve every pass class; NNCF and onnxruntime load only to run.
    result = _python(
        "import json, sys\n"
        "from optimizer.registry import get_pass, BUILTIN_PASSES\n"
        "for name in BUILTIN_PASSES: get_pass(name)\n"
        "print(json.dumps([m for m in ('torch', 'onnxruntime', 'nncf', 'openvino') if m in sys.modules]))",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
