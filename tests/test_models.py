"""Loading models from user files: weights, programs and ONNX, and refusing unsafe or broken ones."""

from __future__ import annotations

import io
import json
import os
import pickle
import textwrap
import uuid
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from optimizer.baseline import make_baseline
from optimizer.errors import InputRejected, RecipeError
from optimizer.models import (
    build_architecture,
    check_onnx_external_data,
    check_onnx_model,
    copy_onnx_model,
    count_parameters,
    load_program,
    load_weights,
    read_state_dict,
)
from optimizer.recipe import load_recipe
from optimizer.zoo import small_resnet

SMALL = "optimizer.zoo:small_resnet"
SMALL_KWARGS = {"num_classes": 10, "in_channels": 1, "width": 8}


def _model(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    model = small_resnet(**{**SMALL_KWARGS, **overrides}).eval()
    # Non-trivial BN statistics and weights, so "the same outputs" is a real check.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
    return model


def _plain_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


def _fresh_module(model_kwargs=None) -> torch.nn.Module:
    return build_architecture(SMALL, {**SMALL_KWARGS, **(model_kwargs or {})}).eval()


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> None:
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------ state dicts


def test_safetensors_checkpoint_loads_into_the_architecture(tmp_path):
    model = _model()
    path = tmp_path / "w.safetensors"
    save_file(_plain_state(model), str(path))

    module = _fresh_module()
    load_weights(module, read_state_dict(path), where=str(path))
    _same_outputs(model, module)


def test_pt_state_dict_loads(tmp_path):
    model = _model()
    path = tmp_path / "w.pt"
    torch.save(model.state_dict(), path)

    module = _fresh_module()
    load_weights(module, read_state_dict(path), where=str(path))
    _same_outputs(model, module)


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict", "model"])
def test_training_checkpoint_wrapper_is_unwrapped(tmp_path, key):
    model = _model()
    path = tmp_path / "ckpt.pth"
    torch.save({key: model.state_dict(), "epoch": 7, "best_acc": 0.91}, path)

    state = read_state_dict(path)
    assert set(state) == set(model.state_dict())
    module = _fresh_module()
    load_weights(module, state, where=str(path))
    _same_outputs(model, module)


def test_pickle_of_something_else_than_a_state_dict_is_rejected(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2), torch.ones(2)], path)
    with pytest.raises(InputRejected, match="not a state dict"):
        read_state_dict(path)


def test_unknown_checkpoint_suffix_is_rejected(tmp_path):
    path = tmp_path / "w.h5"
    path.write_bytes(b"\x89HDF\r\n")
    with pytest.raises(InputRejected, match=r"unknown checkpoint type '\.h5'"):
        read_state_dict(path)


def test_missing_checkpoint_is_rejected(tmp_path):
    with pytest.raises(InputRejected, match="not found"):
        read_state_dict(tmp_path / "nope.safetensors")


def test_mismatched_keys_are_all_listed(tmp_path):
    state = _plain_state(_model())
    del state["stem.0.weight"]  # missing
    state["extra.weight"] = torch.zeros(3)  # unexpected
    state["fc.weight"] = torch.zeros(5, 32)  # shape mismatch (model: [10, 32])

    module = _fresh_module()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(InputRejected) as info:
        load_weights(module, state, where="ckpt.safetensors")
    message = str(info.value)
    assert "ckpt.safetensors" in message
    assert "missing: stem.0.weight" in message
    assert "unexpected: extra.weight" in message
    assert "shape mismatch: fc.weight [5, 32] vs model [10, 32]" in message
    assert "\n" not in message
    # Nothing was half-loaded.
    for k, v in module.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_many_missing_keys_are_summarized(tmp_path):
    state = _plain_state(_model())
    for key in [k for k in state if k.startswith("layer3.")]:
        del state[key]
    with pytest.raises(InputRejected, match=r"missing: .* and \d+ more"):
        load_weights(_fresh_module(), state, where="w")


# --------------------------------------------------------------------------------- unsafe pickles


class _RunsShell:
    """Unpickling this runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class _RunsExec:
    """Unpickling this runs Python code through builtins.exec."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def _write_torch_save(path: Path, payload) -> None:
    torch.save(payload, path)


def _write_legacy_torch_save(path: Path, payload) -> None:
    torch.save(payload, path, _use_new_zipfile_serialization=False)


def _write_raw_pickle(path: Path, payload) -> None:
    with open(path, "wb") as handle:
        pickle.dump(payload, handle, protocol=2)


@pytest.mark.parametrize("writer", [_write_torch_save, _write_legacy_torch_save, _write_raw_pickle])
@pytest.mark.parametrize("gadget", [_RunsShell, _RunsExec])
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, writer, gadget, suffix):
    marker = tmp_path / "MARKER"
    path = tmp_path / f"evil{suffix}"
    # Hidden next to a genuine tensor, as an attacker would.
    writer(path, {"fc.weight": torch.zeros(2, 2), "fc.bias": gadget(marker)})
    with pytest.raises(InputRejected, match="refused"):
        read_state_dict(path)
    assert not marker.exists()


def test_corrupt_safetensors_header_is_rejected(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.zeros(3)}, str(good))
    raw = good.read_bytes()

    too_large = tmp_path / "huge.safetensors"
    too_large.write_bytes((1 << 40).to_bytes(8, "little") + raw[8:])
    bad_json = tmp_path / "json.safetensors"
    bad_json.write_bytes(raw[:8] + b"{" * (len(raw) - 8))
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(raw[:-4])
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    for path in (too_large, bad_json, truncated, empty):
        with pytest.raises(InputRejected, match="not a valid safetensors file"):
            read_state_dict(path)


def test_garbage_pt_file_is_rejected(tmp_path):
    path = tmp_path / "w.pt"
    path.write_bytes(os.urandom(256))
    with pytest.raises(InputRejected):
        read_state_dict(path)


# ----------------------------------------------------------------------------------- architectures


def test_torchvision_factory_with_kwargs():
    module = build_architecture("torchvision.models:resnet18", {"num_classes": 10})
    assert isinstance(module, torch.nn.Module)
    assert module.fc.out_features == 10
    with torch.no_grad():
        assert module.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 10)


def test_factory_with_a_wrong_keyword_is_a_recipe_error():
    with pytest.raises(RecipeError, match=r"model\.factory: .*small_resnet\(\*\*model\.kwargs\) failed"):
        build_architecture(SMALL, {"num_clases": 10})


@pytest.mark.parametrize(
    "factory, message",
    [
        ("optimizer_no_such_module_xyz:Net", "cannot import module"),
        ("optimizer.zoo:no_such_name", "has no attribute"),
        ("optimizer.zoo:__all__", "not callable"),
    ],
)
def test_bad_factory_paths(factory, message):
    with pytest.raises(RecipeError, match=message):
        build_architecture(factory, {})


def test_user_module_on_sys_path_as_factory(tmp_path, monkeypatch):
    name = f"user_models_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            import torch

            class Net(torch.nn.Module):
                def __init__(self, hidden=4):
                    super().__init__()
                    self.body = torch.nn.Linear(6, hidden)
                    self.head = torch.nn.Linear(hidden, 3)

                def forward(self, x):
                    return self.head(torch.relu(self.body(x)))

            def not_a_module():
                return 42
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))

    module = build_architecture(f"{name}:Net", {"hidden": 5})
    assert module.body.out_features == 5
    assert count_parameters(module) == 6 * 5 + 5 + 5 * 3 + 3

    # Weights saved from the user's model load back into it.
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    save_file(state, str(tmp_path / "net.safetensors"))
    again = build_architecture(f"{name}:Net", {"hidden": 5})
    load_weights(again, read_state_dict(tmp_path / "net.safetensors"), where="net")
    x = torch.randn(2, 6)
    torch.testing.assert_close(again(x), module(x))

    with pytest.raises(RecipeError, match="not a torch.nn.Module"):
        build_architecture(f"{name}:not_a_module", {})


# ------------------------------------------------------------------------------------- programs


@pytest.fixture(scope="module")
def exported_program(tmp_path_factory):
    model = _model()
    folder = tmp_path_factory.mktemp("pt2")
    path = folder / "model.pt2"
    example = (torch.randn(2, 1, 28, 28),)
    program = torch.export.export(model, example, dynamic_shapes=({0: torch.export.Dim("batch", max=1024)},))
    torch.export.save(program, str(path))
    return model, path


def test_pt2_program_loads_and_gives_the_same_outputs(exported_program):
    model, path = exported_program
    loaded = load_program(path)
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)


def test_garbage_pt2_is_rejected(tmp_path):
    path = tmp_path / "model.pt2"
    path.write_bytes(b"not a zip archive at all")
    with pytest.raises(InputRejected, match="not a torch.export program"):
        load_program(path)
    with pytest.raises(InputRejected, match="not found"):
        load_program(tmp_path / "missing.pt2")


def _rewrite_pt2(source: Path, dest: Path, edit) -> None:
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_STORED) as out:
        for info in src.infolist():
            out.writestr(info, edit(info.filename, src.read(info.filename)))


def test_pt2_with_pickled_weight_never_runs_code(exported_program, tmp_path):
    # A .pt2 archive may mark a weight as pickled (use_pickle), which torch.export.load reads with
    # torch.load(weights_only=False). A program file is as untrusted as a checkpoint.
    _, source = exported_program
    marker = tmp_path / "MARKER"

    def edit(name: str, data: bytes) -> bytes:
        if name.endswith("data/weights/model_weights_config.json"):
            config = json.loads(data)
            first = next(iter(config["config"]))
            config["config"][first]["use_pickle"] = True
            target = config["config"][first]["path_name"]
            edit.target = target
            return json.dumps(config).encode()
        return data

    stage = tmp_path / "stage.pt2"
    _rewrite_pt2(source, stage, edit)
    evil = tmp_path / "evil.pt2"
    _rewrite_pt2(stage, evil, lambda name, data: pickle.dumps(_RunsShell(marker))
                 if name.endswith(f"data/weights/{edit.target}") else data)

    with pytest.raises(InputRejected):
        load_program(evil)
    assert not marker.exists(), "loading a .pt2 ran code from a pickle inside it"


def test_pt2_with_pickled_sample_inputs_never_runs_code(exported_program, tmp_path):
    # torch.export.load falls back to torch.load(weights_only=False) for the sample inputs.
    _, source = exported_program
    marker = tmp_path / "MARKER"
    payload = io.BytesIO()
    torch.save((_RunsExec(marker),), payload)
    evil = tmp_path / "evil.pt2"
    _rewrite_pt2(source, evil, lambda name, data: payload.getvalue()
                 if name.endswith("data/sample_inputs/model.pt") else data)

    with pytest.raises(InputRejected, match="sample inputs"):
        load_program(evil)
    assert not marker.exists(), "loading a .pt2 ran code from its sample inputs"


def test_baseline_from_pt2_program(exported_program, tmp_path):
    model, path = exported_program
    loaded = load_recipe(_recipe_dict(checkpoint=str(path), factory=None))
    artifact = make_baseline(loaded, tmp_path / "baseline")
    assert artifact.form == "torch"
    assert artifact.meta["kind"] == "program"
    assert artifact.facts["params"] == count_parameters(model)
    again = load_program(artifact.entry_path)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------------- baseline


def _recipe_dict(*, checkpoint: str, factory: str | None = SMALL, shape=(1, 1, 28, 28)) -> dict:
    model = {"checkpoint": checkpoint, "input": {"name": "images", "shape": list(shape)}}
    if factory is not None:
        model.update(factory=factory, kwargs=dict(SMALL_KWARGS))
    return {
        "name": "t",
        "model": model,
        "data": {"eval": {"dataset": "fashion-mnist", "samples": 10}},
        "stages": [{"name": "export", "pass": "export.onnx"}],
    }


def test_baseline_resaves_a_pickle_state_dict_as_safetensors(tmp_path):
    model = _model()
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, ckpt)
    loaded = load_recipe(_recipe_dict(checkpoint=str(ckpt)))
    artifact = make_baseline(loaded, tmp_path / "baseline")

    assert artifact.form == "torch"
    assert artifact.entry == "model.safetensors"
    assert sorted(p.name for p in (tmp_path / "baseline").iterdir()) == ["model.safetensors"]
    assert artifact.facts["params"] == count_parameters(model)
    assert artifact.meta["factory"] == SMALL
    module = _fresh_module()
    load_weights(module, read_state_dict(artifact.entry_path), where="baseline")
    _same_outputs(model, module)


def test_baseline_refuses_a_checkpoint_for_another_architecture(tmp_path):
    ckpt = tmp_path / "w.safetensors"
    save_file(_plain_state(_model(num_classes=5)), str(ckpt))
    loaded = load_recipe(_recipe_dict(checkpoint=str(ckpt)))
    with pytest.raises(InputRejected, match=r"fc\.weight \[5, 32\] vs model \[10, 32\]"):
        make_baseline(loaded, tmp_path / "baseline")
    assert not (tmp_path / "baseline" / "model.safetensors").exists()


# ------------------------------------------------------------------------------------------ onnx


def _tiny_onnx(folder: Path, *, location: str = "w.data") -> tuple[Path, np.ndarray]:
    """Y = X @ W with W stored as external data in ``folder / location``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["images", "W"], ["output"])],
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(weight, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)
    return path, weight


def _set_location(model_path: Path, location: str) -> None:
    """Point every external tensor at ``location`` without touching any data file."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    model_path.write_bytes(model.SerializeToString())


def test_onnx_with_external_data_in_its_folder_is_accepted(tmp_path):
    path, weight = _tiny_onnx(tmp_path / "m")
    assert check_onnx_external_data(path) == [tmp_path / "m" / "w.data"]
    assert check_onnx_model(path) == [tmp_path / "m" / "w.data"]

    copied = copy_onnx_model(path, tmp_path / "copy")
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == ["model.onnx", "w.data"]
    import onnxruntime as ort

    session = ort.InferenceSession(str(copied), providers=["CPUExecutionProvider"])
    x = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(session.run(None, {"images": x})[0], x @ weight, rtol=1e-6)


def test_onnx_external_data_in_a_subfolder_is_accepted(tmp_path):
    folder = tmp_path / "m"
    (folder / "weights").mkdir(parents=True)
    path, _ = _tiny_onnx(folder, location="weights/w.data")
    assert check_onnx_external_data(path) == [folder / "weights" / "w.data"]


def _outside_copy(tmp_path: Path) -> tuple[Path, Path]:
    """A model whose data file was moved out of its folder, to ``tmp_path/outside/w.data``."""
    path, _ = _tiny_onnx(tmp_path / "m")
    outside = tmp_path / "outside"
    outside.mkdir()
    (path.parent / "w.data").rename(outside / "w.data")
    return path, outside / "w.data"


def _escape_parent(tmp_path):
    path, _ = _tiny_onnx(tmp_path / "m")
    (path.parent / "w.data").rename(tmp_path / "w.data")  # the file really is there
    _set_location(path, "../w.data")
    return path, "outside"


def _escape_nested_parent(tmp_path):
    path, _ = _tiny_onnx(tmp_path / "m")
    (path.parent / "sub").mkdir()
    (path.parent / "w.data").rename(tmp_path / "w.data")
    _set_location(path, "sub/../../w.data")
    return path, "outside"


def _escape_absolute(tmp_path):
    path, data = _outside_copy(tmp_path)
    _set_location(path, str(data))
    return path, "outside"


def _escape_symlink(tmp_path):
    path, data = _outside_copy(tmp_path)
    (path.parent / "w.data").symlink_to(data)
    return path, "symbolic link"


def _escape_symlinked_folder(tmp_path):
    path, data = _outside_copy(tmp_path)
    (path.parent / "weights").symlink_to(data.parent, target_is_directory=True)
    _set_location(path, "weights/w.data")
    return path, "outside"


def _escape_hardlink(tmp_path):
    path, data = _outside_copy(tmp_path)
    os.link(data, path.parent / "w.data")
    return path, "hard link"


@pytest.mark.parametrize(
    "make",
    [_escape_parent, _escape_nested_parent, _escape_absolute, _escape_symlink, _escape_symlinked_folder,
     _escape_hardlink],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink", "symlinked-folder", "hardlink"],
)
def test_onnx_external_data_outside_the_folder_is_refused(tmp_path, make):
    path, reason = make(tmp_path)
    with pytest.raises(InputRejected, match=reason):
        check_onnx_external_data(path)
    with pytest.raises(InputRejected, match=reason):
        check_onnx_model(path)
    # Nothing is copied from a refused model.
    with pytest.raises(InputRejected, match=reason):
        copy_onnx_model(path, tmp_path / "copy")
    assert not (tmp_path / "copy" / "model.onnx").exists()
    assert not (tmp_path / "copy" / "w.data").exists()


@pytest.mark.parametrize("make", [_escape_parent, _escape_symlink, _escape_hardlink],
                         ids=["dotdot", "symlink", "hardlink"])
def test_onnxruntime_is_never_opened_on_a_refused_model(tmp_path, make):
    from optimizer.artifact import Artifact
    from optimizer.recipe import InputSpec
    from optimizer.runtimes.onnxruntime_cpu import OnnxRuntime

    path, reason = make(tmp_path)
    artifact = Artifact("onnx", path.parent, path.name, [InputSpec(name="images", shape=[1, 4])])
    with pytest.raises(InputRejected, match=reason):
        OnnxRuntime(artifact, threads=1)


def test_onnx_runtime_runs_an_accepted_model(tmp_path):
    from optimizer.artifact import Artifact
    from optimizer.recipe import InputSpec
    from optimizer.runtimes.onnxruntime_cpu import OnnxRuntime

    path, weight = _tiny_onnx(tmp_path / "m")
    artifact = Artifact("onnx", path.parent, path.name, [InputSpec(name="images", shape=[1, 4])])
    runtime = OnnxRuntime(artifact, threads=1)
    x = np.full((3, 4), 0.5, np.float32)
    np.testing.assert_allclose(runtime.run({"images": x}), x @ weight, rtol=1e-6)


def test_onnx_external_data_file_missing_is_rejected(tmp_path):
    path, _ = _tiny_onnx(tmp_path / "m")
    (path.parent / "w.data").unlink()
    with pytest.raises(InputRejected, match="does not exist"):
        check_onnx_external_data(path)


@pytest.mark.parametrize("content", [b"", b"garbage\x00\xff not protobuf" * 10, os.urandom(512)],
                         ids=["empty", "text", "random"])
def test_garbage_onnx_is_rejected(tmp_path, content):
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    with pytest.raises(InputRejected):
        check_onnx_model(path)


def test_missing_onnx_is_rejected(tmp_path):
    with pytest.raises(InputRejected, match="not found"):
        check_onnx_model(tmp_path / "model.onnx")


def test_baseline_from_onnx_copies_model_and_data(tmp_path):
    path, weight = _tiny_onnx(tmp_path / "m")
    raw = _recipe_dict(checkpoint=str(path), factory=None, shape=(1, 4))
    raw["stages"] = [{"name": "int8", "pass": "quantize.ort"}]
    artifact = make_baseline(load_recipe(raw), tmp_path / "baseline")
    assert artifact.form == "onnx"
    assert artifact.facts["params"] == weight.size
    assert sorted(p.name for p in (tmp_path / "baseline").iterdir()) == ["model.onnx", "w.data"]
    assert (tmp_path / "baseline" / "w.data").read_bytes() == (tmp_path / "m" / "w.data").read_bytes()


def test_baseline_from_onnx_refuses_escaping_data_before_copying(tmp_path):
    path, _ = _escape_parent(tmp_path)
    raw = _recipe_dict(checkpoint=str(path), factory=None, shape=(1, 4))
    raw["stages"] = [{"name": "int8", "pass": "quantize.ort"}]
    with pytest.raises(InputRejected, match="outside"):
        make_baseline(load_recipe(raw), tmp_path / "baseline")
    assert not (tmp_path / "baseline" / "model.onnx").exists()
