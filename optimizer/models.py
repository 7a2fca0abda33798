"""Loading models from untrusted files, safely.

Weights come from safetensors (whose header is checked by us before the library reads it) or from a
zip-format state dict read with ``torch.load(weights_only=True)``; a file that needs full unpickling is
refused, never retried without the guard. Legacy (non-zip) pickles and TorchScript archives are refused
outright: the first go through a different, older unpickling path, the second hold code. TensorRT engines
are never model input. A ``torch.export`` program (.pt2) is checked, then loaded with
``torch.export.load``. ONNX models are checked by path, and their external data must stay inside the
model's folder, before onnxruntime or OpenVINO opens them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optimizer.errors import InputRejected, RecipeError, first_line
from optimizer.registry import import_object

if TYPE_CHECKING:
    import torch

STATE_DICT_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt"}
# A TensorRT engine is compiled for one GPU model and TensorRT version, and deserializing one can load
# plugin libraries: it is an output of this toolkit, never an input.
TENSORRT_SUFFIXES = {".engine", ".plan", ".trt"}


# ---------------------------------------------------------------------------------- file checks


def check_model_file(path: Path) -> None:
    """Refuse, from its bytes and before any library parses it, a model file this toolkit never loads.

    Cheap (reads headers and zip directories only), so ``optimizer validate`` and the start of a run call
    it; the loaders call it again on the file they actually read.
    """
    suffix = path.suffix.lower()
    if suffix in TENSORRT_SUFFIXES:
        raise InputRejected(
            f"{path}: refused: TensorRT engines ({', '.join(sorted(TENSORRT_SUFFIXES))}) are never accepted as "
            "model input (an engine is tied to one GPU and TensorRT version, and loading one can run plugin "
            "code); give the PyTorch checkpoint or the ONNX model instead"
        )
    if not path.is_file():
        raise InputRejected(f"{path}: checkpoint not found")
    if suffix == ".safetensors":
        check_safetensors_header(path)
    elif suffix in STATE_DICT_SUFFIXES:
        check_pickle_container(path)
    elif suffix == ".pt2":
        check_program_archive(path)
    elif suffix == ".onnx":
        check_onnx_external_data(path)


def check_pickle_container(path: Path) -> None:
    """Accept only the zip format of ``torch.save`` holding a plain pickle; refuse legacy and TorchScript files.

    ``weights_only=True`` guards both formats, but the legacy (pre-1.6, tar or raw pickle) path is older,
    less exercised code that has had bypasses, and a state dict saved by any torch of the last five years
    is a zip. A TorchScript archive is a program, not weights.
    """
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError as exc:
        raise InputRejected(f"{path}: cannot read the checkpoint ({exc.strerror or exc})") from None
    if not is_zip:
        raise InputRejected(
            f"{path}: refused: not a zip-format PyTorch file (a legacy or raw pickle, or not PyTorch at all); "
            "load it where you trust it and re-save it with safetensors.torch.save_file(model.state_dict(), ...)"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise InputRejected(f"{path}: not a readable PyTorch state dict ({first_line(exc, 160)})") from None
    if any(name.endswith("constants.pkl") or "/code/" in name for name in names):
        raise InputRejected(
            f"{path}: refused: a TorchScript archive is a program and loading it runs its code; save "
            "model.state_dict() (safetensors or torch.save) and name the architecture in model.factory"
        )
    if not any(name.endswith("data.pkl") for name in names):
        raise InputRejected(f"{path}: not a PyTorch state dict (the zip holds no data.pkl)")


# The dtypes of the safetensors format and their width in bits.
_SAFETENSORS_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16,
    "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "I64": 64, "U64": 64, "F64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library's own limit


def check_safetensors_header(path: Path) -> None:
    """Validate a safetensors file's layout: header size, JSON, dtypes, shapes and the byte ranges.

    Every tensor's range must match its shape and dtype, the ranges must tile the data section exactly (no
    overlap, no gap) and the data section must end where the file ends (not truncated, nothing appended).
    The library checks much of this too; checking it here gives one clear message and does not depend on
    which library version is installed.
    """

    def refuse(reason: str) -> InputRejected:
        return InputRejected(f"{path}: not a valid safetensors file ({reason}); refused")

    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise refuse(f"{size} bytes, shorter than the 8-byte header length")
        header_len = int.from_bytes(prefix, "little")
        if header_len > SAFETENSORS_MAX_HEADER:
            raise refuse(f"header length {header_len} exceeds the {SAFETENSORS_MAX_HEADER}-byte limit")
        if 8 + header_len > size:
            raise refuse(f"header length {header_len} runs past the end of the {size}-byte file")
        raw = handle.read(header_len)

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate key '{next(k for k in keys if keys.count(k) > 1)}'")
        return dict(pairs)

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        raise refuse(f"header is not valid JSON: {first_line(exc, 120)}") from None
    if not isinstance(header, dict):
        raise refuse("header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise refuse("__metadata__ must map names to strings")

    ranges: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise refuse(f"tensor '{name}': expected exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _SAFETENSORS_BITS:
            raise refuse(f"tensor '{name}': unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                   for d in shape):
            raise refuse(f"tensor '{name}': shape must be a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise refuse(f"tensor '{name}': data_offsets must be two integers [begin, end] with begin <= end")
        numel = 1
        for dim in shape:
            numel *= dim
        bits = numel * _SAFETENSORS_BITS[dtype]
        if bits % 8 or bits // 8 != offsets[1] - offsets[0]:
            raise refuse(f"tensor '{name}': {offsets[1] - offsets[0]} bytes do not hold a {dtype} tensor of "
                         f"shape {shape}")
        ranges.append((offsets[0], offsets[1], name))

    data_size = size - 8 - header_len
    position, previous = 0, None
    for begin, end, name in sorted(ranges):
        if begin < position:
            raise refuse(f"tensor '{name}' bytes [{begin}, {end}) overlap tensor '{previous}'")
        if begin > position:
            raise refuse(f"{begin - position} unused bytes before tensor '{name}'")
        position, previous = end, name
    if position > data_size:
        raise refuse(f"truncated: the header describes {position} bytes of tensor data, the file holds {data_size}")
    if position < data_size:
        raise refuse(f"{data_size - position} bytes after the last tensor")


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

    suffix = path.suffix.lower()
    if suffix not in STATE_DICT_SUFFIXES | {".safetensors"} | TENSORRT_SUFFIXES:
        raise InputRejected(
            f"{path}: unknown checkpoint type '{suffix}'; use .safetensors, a .pt/.pth state dict, .pt2 or .onnx"
        )
    check_model_file(path)
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise InputRejected(f"{path}: not a valid safetensors file ({first_line(exc, 160)})") from None
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
