"""Loading models from untrusted files, safely.

Weights come from safetensors or from a state dict read with ``torch.load(weights_only=True)``; a file
that needs full unpickling is refused, never retried without the guard. A ``torch.export`` program
(.pt2) is loaded with ``torch.export.load``. ONNX models are checked by path, and their external data
must stay inside the model's folder, before onnxruntime or OpenVINO opens them.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optimizer.errors import InputRejected, RecipeError, first_line
from optimizer.registry import import_object

if TYPE_CHECKING:
    import torch

STATE_DICT_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt"}


# ------------------------------------------------------------------------------------------- torch


def build_architecture(factory: str, kwargs: dict[str, Any], *, where: str = "model.factory") -> "torch.nn.Module":
    import torch

    builder = import_object(factory, where=where)
    if not callable(builder):
        raise RecipeError(f"{where}: '{factory}' is not callable")
    try:
        module = builder(**kwargs)
    except TypeError as exc:
        raise RecipeError(f"{where}: {factory}(**model.kwargs) failed: {exc}") from None
    if not isinstance(module, torch.nn.Module):
        raise RecipeError(f"{where}: '{factory}' returned {type(module).__name__}, not a torch.nn.Module")
    return module


def read_state_dict(path: Path) -> dict[str, "torch.Tensor"]:
    """Read weights from .safetensors or a .pt/.pth state dict, with no code execution possible."""
    import pickle

    import torch

    if not path.is_file():
        raise InputRejected(f"{path}: checkpoint not found")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise InputRejected(f"{path}: not a valid safetensors file ({exc})") from None
    if suffix not in STATE_DICT_SUFFIXES:
        raise InputRejected(
            f"{path}: unknown checkpoint type '{suffix}'; use .safetensors, a .pt/.pth state dict, .pt2 or .onnx"
        )
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as exc:
        # torch's message advises weights_only=False; we never do that, so quote only what it found.
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        what = f"a reference to {found.group(1)}" if found else "objects other than tensors"
        raise InputRejected(
            f"{path}: refused: the file holds {what}, and loading it could run code; "
            "save model.state_dict() or safetensors instead"
        ) from None
    except Exception as exc:  # garbage bytes raise many types; with weights_only nothing ran, so just refuse
        raise InputRejected(f"{path}: not a readable PyTorch state dict ({first_line(exc, 160)})") from None
    return _unwrap_state_dict(loaded, path)


def _unwrap_state_dict(loaded: Any, path: Path) -> dict[str, "torch.Tensor"]:
    import torch

    # Training scripts often save {"state_dict": ..., "epoch": ...} or {"model": ...}; accept those.
    if isinstance(loaded, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            inner = loaded.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
        if loaded and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()):
            return loaded
    raise InputRejected(f"{path}: not a state dict (a mapping from parameter names to tensors)")


def load_weights(module: "torch.nn.Module", state: dict[str, "torch.Tensor"], *, where: str) -> None:
    """Load strictly, with one message that lists every missing, unexpected and mismatched key."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {list(state[k].shape)} vs model {list(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
                parts.append(f"{label}: {shown}")
        raise InputRejected(
            f"{where}: checkpoint does not fit the architecture ({'; '.join(parts)}); "
            "check model.factory and model.kwargs"
        )
    module.load_state_dict(state, strict=True)


# Inside a .pt2 archive, tensors stored as raw bytes are safe; anything pickled is code.
_SAFE_PAYLOAD_PREFIXES = {"_weights_config.json": "weight_", "_constants_config.json": "tensor_"}


def check_program_archive(path: Path) -> None:
    """Refuse a torch.export archive that torch.export.load would unpickle.

    torch.export.load reads payloads marked ``use_pickle`` with ``torch.load(weights_only=False)``, custom
    and opaque objects with pickle, and retries the sample inputs without ``weights_only``. We accept only
    archives whose weights and constants are raw tensors and whose sample inputs load with weights_only.
    """
    import io
    import json
    import pickle
    import zipfile

    import torch

    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputRejected(f"{path}: not a torch.export program ({exc})") from None
    with archive:
        for name in archive.namelist():
            parts = name.split("/")
            if len(parts) >= 2 and parts[-2] in ("weights", "constants") and name.endswith(".pt"):
                raise InputRejected(f"{path}: refused: legacy pickled payload {name}; re-save the program "
                                    "with a current torch.export.save")
            suffix = next((s for s in _SAFE_PAYLOAD_PREFIXES if name.endswith(s)), None)
            if suffix is not None:
                try:
                    config = json.loads(archive.read(name)).get("config", {})
                except ValueError:
                    raise InputRejected(f"{path}: {name} is not valid JSON") from None
                for key, entry in config.items():
                    if entry.get("use_pickle") or not str(entry.get("path_name", "")).startswith(
                            _SAFE_PAYLOAD_PREFIXES[suffix]):
                        raise InputRejected(
                            f"{path}: refused: '{key}' is stored as a pickled object, and loading it could run "
                            "code; export a program whose weights and constants are plain tensors"
                        )
            if "/data/sample_inputs/" in f"/{name}" and name.endswith(".pt"):
                try:
                    torch.load(io.BytesIO(archive.read(name)), weights_only=True)
                except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError):
                    raise InputRejected(f"{path}: refused: the sample inputs ({name}) hold objects other than "
                                        "tensors, and loading them could run code") from None


def load_program(path: Path) -> "torch.nn.Module":
    """Load a torch.export program after checking its archive; callers pass a private copy."""
    import torch

    if not path.is_file():
        raise InputRejected(f"{path}: program not found")
    check_program_archive(path)
    try:
        program = torch.export.load(str(path))
    except Exception as exc:  # torch raises many types for a foreign or corrupt archive
        raise InputRejected(f"{path}: not a torch.export program ({first_line(exc, 160)})") from None
    return program.module()


def try_eval(module: "torch.nn.Module") -> bool:
    """Put a module in eval mode; False for a torch.export program's module, which refuses eval() because
    it was exported in inference form already."""
    try:
        module.eval()
    except NotImplementedError:
        return False
    return True


def count_parameters(module: "torch.nn.Module") -> int:
    return sum(p.numel() for p in module.parameters())


# -------------------------------------------------------------------------------------------- onnx


def check_onnx_external_data(model_path: Path) -> list[Path]:
    """Return the external-data files of an ONNX model, refusing any that leave the model's folder.

    Reads only the graph structure (no tensor data), so a crafted location is caught before any
    runtime follows it. Refuses absolute paths, '..', symbolic links and hard links.
    """
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and others on garbage
        raise InputRejected(f"{model_path}: not a readable ONNX model ({first_line(exc, 160)})") from None
    folder = model_path.parent.resolve()
    files: set[Path] = set()
    for tensor in _get_all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = ExternalDataInfo(tensor).location
        where = f"{model_path}: tensor '{tensor.name}' external data '{location}'"
        if not location or os.path.isabs(location) or ".." in Path(location).parts or location.startswith(("/", "\\")):
            raise InputRejected(f"{where} points outside the model's folder; refused")
        candidate = model_path.parent / location
        if candidate.is_symlink():
            raise InputRejected(f"{where} is a symbolic link; refused (copy the data file in place)")
        if not candidate.is_file():
            raise InputRejected(f"{where} does not exist next to the model")
        if candidate.resolve().parent != folder and folder not in candidate.resolve().parents:
            raise InputRejected(f"{where} resolves outside the model's folder; refused")
        if candidate.stat().st_nlink > 1:
            raise InputRejected(f"{where} is a hard link; refused (copy the data file in place)")
        files.add(candidate)
    return sorted(files)


def check_onnx_model(model_path: Path) -> list[Path]:
    """Full check of an ONNX file from outside: external data confined, then onnx.checker by path."""
    import onnx

    if not model_path.is_file():
        raise InputRejected(f"{model_path}: ONNX model not found")
    data_files = check_onnx_external_data(model_path)
    try:
        # By path, so models over 2 GB (external data) are checked too.
        onnx.checker.check_model(str(model_path))
    except Exception as exc:  # ValidationError, and protobuf or I/O errors on a damaged file
        raise InputRejected(f"{model_path}: ONNX checker rejected the model: {first_line(exc, 200)}") from None
    return data_files


def copy_onnx_model(model_path: Path, dest_dir: Path, name: str = "model.onnx") -> Path:
    """Copy a checked ONNX model and its external data into ``dest_dir`` (as regular files)."""
    data_files = check_onnx_model(model_path)
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / name
    shutil.copyfile(model_path, dest)
    for data in data_files:
        target = dest_dir / data.relative_to(model_path.parent)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data, target)
    return dest
