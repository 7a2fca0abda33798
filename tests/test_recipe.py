"""Recipes: loading, schema errors users can act on, whole-recipe checks, and the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from optimizer.errors import RecipeError
from optimizer.recipe import load_recipe
from optimizer.validate import validate_recipe

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
QUICKSTART_CHECKPOINT = "checkpoint: ../checkpoints/fashion_resnet.safetensors"


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A real small_resnet state dict (untrained: no accuracy is claimed here) as safetensors."""
    import torch
    from safetensors.torch import save_file

    from optimizer.zoo import small_resnet

    torch.manual_seed(0)
    model = small_resnet(num_classes=10, in_channels=1)
    path = tmp_path_factory.mktemp("weights") / "fashion_resnet.safetensors"
    save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}, str(path))
    return path


def quickstart_text(weights: Path) -> str:
    text = QUICKSTART.read_text(encoding="utf-8")
    assert QUICKSTART_CHECKPOINT in text, "recipes/quickstart.yaml changed; update this test"
    return text.replace(QUICKSTART_CHECKPOINT, f"checkpoint: {weights}")


@pytest.fixture
def recipe_file(tmp_path, weights) -> Path:
    """A copy of recipes/quickstart.yaml (comments and layout kept) pointing at ``weights``."""
    path = tmp_path / "quickstart.yaml"
    path.write_text(quickstart_text(weights), encoding="utf-8")
    return path


def write_variant(tmp_path: Path, weights: Path, old: str, new: str, name: str = "variant.yaml") -> tuple[Path, int]:
    """The quickstart copy with one edit; returns the file and the 1-based line of the edit."""
    text = quickstart_text(weights)
    assert text.count(old) == 1, old
    start = text.index(old)
    line = text.count("\n", 0, start) + 1
    path = tmp_path / name
    path.write_text(text.replace(old, new), encoding="utf-8")
    return path, line


def recipe_error(*args, **kwargs) -> str:
    with pytest.raises(RecipeError) as info:
        validate_recipe(load_recipe(*args, **kwargs))
    message = str(info.value)
    assert "\n" not in message, "errors are one line"
    return message


# ------------------------------------------------------------------------------------------ valid


def test_quickstart_loads_and_validates(recipe_file, weights):
    loaded = load_recipe(recipe_file)
    recipe = loaded.recipe
    assert recipe.name == "quickstart"
    assert [s.name for s in recipe.stages] == ["export", "int8"]
    assert [s.pass_name for s in recipe.stages] == ["export.onnx", "quantize.nncf"]
    # Pass configurations are validated and completed with their defaults.
    assert recipe.stages[0].with_["opset"] == 18
    assert recipe.stages[0].with_["exporter"] == "dynamo"
    assert recipe.stages[1].with_["subset_size"] == 300
    assert recipe.model.inputs[0].name == "images"
    assert recipe.model.inputs[0].shape == [1, 1, 28, 28]
    assert recipe.data.calibration.samples == 1000
    assert loaded.source == recipe_file.resolve()
    assert loaded.resolve(recipe.model.checkpoint) == weights

    checks = {c.what: c.detail for c in validate_recipe(loaded)}
    assert checks["checkpoint"] == str(weights)
    assert checks["factory"] == "optimizer.zoo:small_resnet"
    assert checks["forms"] == "torch -> onnx -> onnx"
    assert "data.eval" in checks and "data.calibration" in checks


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path, weights):
    folder = tmp_path / "project" / "recipes"
    folder.mkdir(parents=True)
    (tmp_path / "project" / "ckpt").mkdir()
    (tmp_path / "project" / "ckpt" / "w.safetensors").write_bytes(weights.read_bytes())
    path = folder / "r.yaml"
    path.write_text(quickstart_text(weights).replace(f"checkpoint: {weights}", "checkpoint: ../ckpt/w.safetensors"))
    loaded = load_recipe(path)
    checks = {c.what: c.detail for c in validate_recipe(loaded)}
    assert checks["checkpoint"] == str(tmp_path / "project" / "ckpt" / "w.safetensors")


def test_missing_checkpoint_is_reported(tmp_path, weights):
    path, _ = write_variant(tmp_path, weights, f"checkpoint: {weights}", "checkpoint: nowhere/w.safetensors")
    message = recipe_error(path)
    assert "model.checkpoint" in message and "nowhere/w.safetensors" in message


# ------------------------------------------------------------------------------------ unknown keys


def test_misspelled_required_top_level_key(tmp_path, weights):
    # `stags` for `stages`: the user's typo is the cause; "stages is missing" alone hides it.
    path, line = write_variant(tmp_path, weights, "\nstages:", "\nstags:")
    line += 1  # the edit starts with the newline before the key
    message = recipe_error(path)
    assert f"{path}:{line}:" in message
    assert "stags" in message
    assert "did you mean 'stages'?" in message


def test_unknown_optional_top_level_key(tmp_path, weights):
    path, line = write_variant(tmp_path, weights, "seed: 0", "seed: 0\ndescripton: a typo")
    message = recipe_error(path)
    assert message.startswith(f"{path}:{line + 1}: descripton: unknown key 'descripton'")
    assert "did you mean 'description'?" in message


def test_unknown_nested_key_names_path_file_and_line(tmp_path, weights):
    path, line = write_variant(tmp_path, weights, "{threads: 1,", "{thread: 1,")
    message = recipe_error(path)
    assert message.startswith(f"{path}:{line}: evaluate.latency.thread: unknown key 'thread'")
    assert "did you mean 'threads'?" in message


def test_unknown_key_without_near_miss_points_to_schema(tmp_path, weights):
    path, line = write_variant(tmp_path, weights, "  accuracy: {metric: top1,", "  accuracy: {zzzqqq: 1, metric: top1,")
    message = recipe_error(path)
    assert f"{path}:{line}: evaluate.accuracy.zzzqqq: unknown key 'zzzqqq'" in message
    assert "did you mean" not in message
    assert "optimizer schema" in message


def test_unknown_pass_name_gets_a_suggestion(tmp_path, weights):
    path, line = write_variant(tmp_path, weights, "pass: quantize.nncf", "pass: quantize.ncf")
    message = recipe_error(path)
    assert message.startswith(f"{path}:{line}: stages.1.pass")
    assert "unknown pass 'quantize.ncf'" in message
    assert "did you mean 'quantize.nncf'?" in message


def test_unknown_pass_config_key(tmp_path, weights):
    path, line = write_variant(tmp_path, weights, "with: {opset: 18}", "with: {opset: 18, X: 1}")
    message = recipe_error(path)
    assert message.startswith(f"{path}:{line}: stages.0.with.X: unknown key 'X'")


def test_misspelled_pass_config_key_gets_a_suggestion(tmp_path, weights):
    path, line = write_variant(tmp_path, weights, "subset_size: 300", "subset_sise: 300")
    message = recipe_error(path)
    assert message.startswith(f"{path}:{line}: stages.1.with.subset_sise: unknown key")
    assert "did you mean 'subset_size'?" in message


def test_wrong_value_type_names_the_field(tmp_path, weights):
    path, line = write_variant(tmp_path, weights, "samples: 1000", "samples: lots")
    message = recipe_error(path)
    assert message.startswith(f"{path}:{line}: data.calibration.samples:")


# -------------------------------------------------------------------------------------- overrides


def test_override_with_an_unsupported_opset_is_rejected(recipe_file):
    message = recipe_error(recipe_file, overrides=["stages.0.with.opset=99"])
    assert "stages.0.with.opset" in message
    assert "opset 99 is not supported" in message


def test_opset_bounds_depend_on_the_exporter(recipe_file):
    # The dynamo exporter writes opset 18 and newer; the TorchScript exporter goes down to 9.
    message = recipe_error(recipe_file, overrides=["stages.0.with.opset=17"])
    assert "stages.0.with.opset" in message
    assert "opset 17 is not supported by the dynamo exporter" in message
    assert "torchscript" in message

    loaded = load_recipe(recipe_file, overrides=["stages.0.with.opset=17", "stages.0.with.exporter=torchscript"])
    assert loaded.recipe.stages[0].with_["opset"] == 17
    assert loaded.recipe.stages[0].with_["exporter"] == "torchscript"
    assert load_recipe(recipe_file).recipe.stages[0].with_["opset"] == 18, "the file itself is unchanged"

    message = recipe_error(recipe_file, overrides=["stages.0.with.opset=8", "stages.0.with.exporter=torchscript"])
    assert "opset 8 is not supported by the torchscript exporter" in message


def test_override_values_are_read_as_yaml(recipe_file):
    loaded = load_recipe(
        recipe_file,
        overrides=[
            "stages.0.with.dynamic_batch=false",
            "data.eval.samples=100",
            "data.eval.mean=[0.5]",
            "budget.accuracy_drop=0.02",
            "description=a string value",
        ],
    )
    recipe = loaded.recipe
    assert recipe.stages[0].with_["dynamic_batch"] is False
    assert recipe.data.eval.samples == 100
    assert recipe.data.eval.mean == [0.5]
    assert recipe.budget.accuracy_drop == 0.02
    assert recipe.description == "a string value"


def test_override_of_an_unknown_key_is_an_unknown_key(recipe_file):
    message = recipe_error(recipe_file, overrides=["evaluate.latency.thread=2"])
    assert "evaluate.latency.thread: unknown key 'thread'; did you mean 'threads'?" in message


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("stages.0.with.opset", "expected key.path=value"),
        ("stages..opset=1", "empty part"),
        ("stages.5.with.opset=18", "'5' is not an index of a list of 2 items"),
        ("stages.first.with.opset=18", "'first' is not an index"),
        ("name.x=1", "'name' is not a mapping or a list"),
    ],
)
def test_malformed_overrides(recipe_file, override, fragment):
    with pytest.raises(RecipeError, match="--set") as info:
        load_recipe(recipe_file, overrides=[override])
    assert fragment in str(info.value)


# ---------------------------------------------------------------------------------- stage checks


def test_wrong_stage_order_names_stage_and_forms(recipe_file):
    loaded = load_recipe(
        recipe_file,
        overrides=["stages.0.pass=quantize.nncf", "stages.0.with={}", "stages.0.name=int8_first",
                   "stages.1.pass=export.onnx", "stages.1.with={}", "stages.1.name=export_last"],
    )
    with pytest.raises(RecipeError) as info:
        validate_recipe(loaded)
    message = str(info.value)
    assert "stages.0 (int8_first)" in message
    assert "quantize.nncf" in message
    assert "takes onnx/openvino but receives torch" in message


def test_quantizing_an_onnx_checkpoint_needs_no_export(tmp_path, recipe_file):
    # A model that starts as ONNX may go straight to INT8; export.onnx on it is the wrong order.
    onnx_model = tmp_path / "model.onnx"
    onnx_model.write_bytes(b"checked when the run starts")
    raw = yaml.safe_load(recipe_file.read_text())
    raw["model"] = {"checkpoint": str(onnx_model), "input": raw["model"]["input"]}
    raw["stages"] = raw["stages"][1:]
    checks = {c.what: c.detail for c in validate_recipe(load_recipe(raw))}
    assert checks["forms"] == "onnx -> onnx"

    raw["stages"] = [{"name": "export", "pass": "export.onnx"}]
    with pytest.raises(RecipeError, match=r"stages\.0 \(export\): pass 'export\.onnx' takes torch but receives onnx"):
        validate_recipe(load_recipe(raw))


def test_duplicate_stage_names(recipe_file):
    message = recipe_error(recipe_file, overrides=["stages.1.name=export"])
    assert "stages.1.name" in message
    assert "'export' is used twice" in message


@pytest.mark.parametrize("reserved", ["baseline", "final"])
def test_reserved_stage_names(recipe_file, reserved):
    message = recipe_error(recipe_file, overrides=[f"stages.1.name={reserved}"])
    assert "stages.1.name" in message
    assert f"'{reserved}' is reserved" in message


@pytest.mark.parametrize("name", ["has space", "1starts_with_digit", "a/b", "../up"])
def test_stage_names_must_be_folder_safe(recipe_file, name):
    message = recipe_error(recipe_file, overrides=[f"stages.0.name={name}"])
    assert "stages.0.name" in message


# ------------------------------------------------------------------------------------------ budgets


def test_latency_budgets_load_and_a_stage_overrides_field_by_field(recipe_file):
    loaded = load_recipe(recipe_file, overrides={"budget.latency_p50_ms": 0.5, "budget.latency_p90_ms": 0.8,
                                                 "stages.1.budget": {"latency_p50_ms": 0.25}})
    recipe = loaded.recipe
    assert recipe.budget.latency_p50_ms == 0.5 and recipe.budget.latency_p90_ms == 0.8
    own = recipe.budget_for(recipe.stages[1])
    assert (own.accuracy_drop, own.latency_p50_ms, own.latency_p90_ms) == (0.01, 0.25, 0.8)
    assert recipe.budget_for(recipe.stages[0]) == recipe.budget


@pytest.mark.parametrize("value", ["-0.5", "0", ".inf", "fast"])
def test_latency_budget_must_be_a_positive_number(tmp_path, weights, value):
    path, line = write_variant(tmp_path, weights, "  accuracy_drop: 0.01", f"  latency_p90_ms: {value}")
    message = recipe_error(path)
    assert message.startswith(f"{path}:{line}: budget.latency_p90_ms:"), message


def test_stage_latency_budget_error_names_the_stage_and_line(tmp_path, weights):
    path, line = write_variant(tmp_path, weights, "    with: {opset: 18}",
                               "    with: {opset: 18}\n    budget: {latency_p50_ms: -1}")
    message = recipe_error(path)
    assert message.startswith(f"{path}:{line + 1}: stages.0.budget.latency_p50_ms:"), message
    assert "greater than 0" in message


def test_misspelled_latency_budget_gets_a_suggestion(tmp_path, weights):
    path, line = write_variant(tmp_path, weights, "  accuracy_drop: 0.01", "  latency_p50: 0.5")
    message = recipe_error(path)
    assert message.startswith(f"{path}:{line}: budget.latency_p50: unknown key 'latency_p50'"), message
    assert "did you mean 'latency_p50_ms'?" in message


def test_cli_validate_negative_latency_budget_exits_2(tmp_path, weights):
    path, line = write_variant(tmp_path, weights, "  accuracy_drop: 0.01", "  latency_p50_ms: -2")
    result = optimizer_cli("validate", str(path), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"optimizer: error: {path}:{line}: budget.latency_p50_ms:")


def test_publish_policy_defaults_to_recommended_and_rejects_other_values(tmp_path, weights, recipe_file):
    assert load_recipe(recipe_file).recipe.publish == "recommended"
    assert load_recipe(recipe_file, overrides=["publish=last"]).recipe.publish == "last"
    path, line = write_variant(tmp_path, weights, "seed: 0", "seed: 0\npublish: best")
    message = recipe_error(path)
    assert message.startswith(f"{path}:{line + 1}: publish:"), message
    assert "'recommended' or 'last'" in message


def test_quantize_without_calibration_data(recipe_file):
    message = recipe_error(recipe_file, overrides=["data.calibration=null"])
    assert "stages.1 (int8)" in message
    assert "needs data.calibration" in message


def test_unknown_dataset_kind_gets_a_suggestion(recipe_file):
    message = recipe_error(recipe_file, overrides=["data.eval.dataset=fashion_mnist"])
    assert "data.eval" in message
    assert "unknown dataset kind 'fashion_mnist'" in message
    assert "did you mean 'fashion-mnist'?" in message


def test_missing_data_folder_is_reported(recipe_file, tmp_path):
    message = recipe_error(recipe_file, overrides=[f"data.eval.root={tmp_path / 'no-such-folder'}"])
    assert "data.eval" in message and "no-such-folder" in message


def test_missing_validation_data_is_reported_although_no_pass_requires_it(recipe_file, tmp_path):
    missing = tmp_path / "no-such.npz"
    message = recipe_error(recipe_file, overrides=[f'data.validation={{"dataset": "npz", "path": "{missing}"}}'])
    assert "data.validation.path" in message and "no-such.npz" in message


def test_python_tag_is_refused_and_never_runs(tmp_path, weights):
    marker = tmp_path / "MARKER"
    for n, tag in enumerate([
        f'!!python/object/apply:os.system ["touch {marker}"]',
        f'!!python/object/apply:subprocess.check_call [["touch", "{marker}"]]',
        "!!python/name:os.system",
    ]):
        path, line = write_variant(tmp_path, weights, "seed: 0", f"seed: 0\ndescription: {tag}", name=f"t{n}.yaml")
        with pytest.raises(RecipeError) as info:
            load_recipe(path)
        message = str(info.value)
        assert message.startswith(f"{path}:{line + 1}: tag not allowed")
        assert not marker.exists()


# -------------------------------------------------------------------------------- output folder


@pytest.fixture
def image_folder_recipe(tmp_path, recipe_file):
    root = tmp_path / "images"
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    loaded = load_recipe(recipe_file, overrides=[f"data.eval={{dataset: image-folder, root: {root}}}"])
    return loaded, root


def test_output_inside_an_image_folder_is_refused(image_folder_recipe):
    loaded, root = image_folder_recipe
    for out in (root, root / "runs", root / "cat" / "out"):
        with pytest.raises(RecipeError, match=r"--out .*inside the input"):
            validate_recipe(loaded, out=out)


def test_output_containing_an_input_is_refused(image_folder_recipe, weights):
    loaded, root = image_folder_recipe
    with pytest.raises(RecipeError, match="lies inside the output folder"):
        validate_recipe(loaded, out=root.parent)
    with pytest.raises(RecipeError, match="lies inside the output folder"):
        validate_recipe(loaded, out=weights.parent)


def test_output_elsewhere_is_accepted(image_folder_recipe, tmp_path):
    loaded, _ = image_folder_recipe
    checks = {c.what: c.detail for c in validate_recipe(loaded, out=tmp_path / "runs" / "q")}
    assert checks["output"] == str(tmp_path / "runs" / "q")
    assert not (tmp_path / "runs").exists(), "validation creates nothing"


# ------------------------------------------------------------------------------------------- CLI


def optimizer_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "optimizer", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_cli_validate_ok(recipe_file, tmp_path):
    result = optimizer_cli("validate", str(recipe_file), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"{recipe_file}: valid" in result.stdout
    assert "torch -> onnx -> onnx" in result.stdout


def test_cli_validate_misspelled_key(tmp_path, weights):
    path, line = write_variant(tmp_path, weights, "{threads: 1,", "{thread: 1,")
    result = optimizer_cli("validate", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"optimizer: error: {path}:{line}: evaluate.latency.thread")
    assert "did you mean 'threads'?" in lines[0]
    assert "Traceback" not in result.stderr


def test_cli_validate_with_set(recipe_file, tmp_path):
    result = optimizer_cli("validate", str(recipe_file), "--set", "stages.0.with.opset=99", cwd=tmp_path)
    assert result.returncode == 2
    assert "opset 99 is not supported" in result.stderr


def test_cli_run_with_bad_override_stops_before_any_work(recipe_file, tmp_path):
    out = tmp_path / "out"
    result = optimizer_cli("run", str(recipe_file), "--out", str(out), "--set", "stages.0.with.opset=99",
                           cwd=tmp_path)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "opset 99" in result.stderr
    assert not out.exists()
    assert not (tmp_path / "runs").exists()


def test_cli_missing_recipe_file(tmp_path):
    result = optimizer_cli("validate", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert result.returncode == 2
    assert "recipe file not found" in result.stderr


def test_cli_schema_is_json(tmp_path):
    result = optimizer_cli("schema", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    assert {"name", "model", "data", "stages"} <= set(schema["properties"])
    assert set(schema["required"]) >= {"name", "model", "data", "stages"}


def test_cli_passes_lists_the_builtins(tmp_path):
    result = optimizer_cli("passes", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    assert {"export.onnx", "quantize.nncf", "quantize.ort"} <= set(rows)
    assert "torch -> onnx" in rows["export.onnx"]
    assert "onnx/openvino -> onnx/openvino" in rows["quantize.nncf"]
    assert "onnx -> openvino" in rows["compile.openvino"]
    assert "cannot load" not in result.stdout
