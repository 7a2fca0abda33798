"""One table from pass name to pass class.

Built-in passes are listed as 'module:Class' strings and imported only when a recipe uses them, so
importing the package never imports NNCF, OpenVINO or TensorRT. Third-party packages add passes through
the entry-point group ``optimizer.passes``; a script registers one with ``@register_pass``; a recipe may
name any class directly as ``python:module:Class``.
"""

from __future__ import annotations

import importlib
from importlib import metadata
from typing import TYPE_CHECKING, TypeVar

from optimizer.errors import RecipeError

if TYPE_CHECKING:
    from optimizer.passes.base import Pass

ENTRY_POINT_GROUP = "optimizer.passes"

BUILTIN_PASSES: dict[str, str] = {
    "compile.openvino": "optimizer.passes.compile_openvino:CompileOpenVino",
    "compile.tensorrt": "optimizer.passes.compile_tensorrt:CompileTensorRT",
    "distill.kd": "optimizer.passes.distill:DistillKD",
    "export.onnx": "optimizer.passes.export_onnx:ExportOnnx",
    "finetune": "optimizer.passes.distill:Finetune",
    "quantize.nncf": "optimizer.passes.quantize_nncf:QuantizeNncf",
    "quantize.ort": "optimizer.passes.quantize_ort:QuantizeOrt",
    "prune.structured": "optimizer.passes.prune_structured:PruneStructured",
    "recover.batchnorm": "optimizer.passes.recover:RecoverBatchNorm",
    "recover.reconstruct": "optimizer.passes.recover:RecoverReconstruct",
    "resize.input": "optimizer.passes.resize_input:ResizeInput",
}

_registered: dict[str, type["Pass"]] = {}

P = TypeVar("P", bound=type["Pass"])


def register_pass(cls: P) -> P:
    """Class decorator: make a Pass subclass available to recipes under its ``name``."""
    from optimizer.passes.base import Pass, check_pass_class

    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise TypeError("@register_pass decorates subclasses of optimizer.Pass")
    check_pass_class(cls)
    if cls.name in BUILTIN_PASSES:
        raise ValueError(f"pass name '{cls.name}' is a built-in pass; choose another name")
    _registered[cls.name] = cls
    return cls


def _entry_points() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def pass_names() -> list[str]:
    return sorted(set(BUILTIN_PASSES) | set(_registered) | set(_entry_points()))


def import_object(path: str, *, where: str) -> object:
    """Import ``module:attr`` (attr may be dotted); errors name ``where``."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise RecipeError(f"{where}: '{path}' is not an import path 'module:name'")
    try:
        obj: object = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise RecipeError(
            f"{where}: cannot import module '{module_name}' ({exc}); is it installed, or in a folder the "
            "recipe's python_path names (relative to the recipe)?"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RecipeError(f"{where}: module '{module_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    return obj


def get_pass(name: str, *, where: str = "pass") -> type["Pass"]:
    """Resolve a pass name, or 'python:module:Class', to its class."""
    from optimizer.passes.base import Pass, check_pass_class
    from optimizer.recipe import suggest

    if name.startswith("python:"):
        cls = import_object(name.removeprefix("python:"), where=where)
    elif name in _registered:
        return _registered[name]
    elif name in BUILTIN_PASSES:
        cls = import_object(BUILTIN_PASSES[name], where=where)
    elif name in (entry_points := _entry_points()):
        try:
            cls = entry_points[name].load()
        except Exception as exc:  # a broken third-party package: say which one
            raise RecipeError(f"{where}: the package providing pass '{name}' failed to load: {exc}") from None
    else:
        raise RecipeError(
            f"{where}: unknown pass '{name}'{suggest(name, pass_names())} (see `optimizer passes`)"
        )
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise RecipeError(f"{where}: '{name}' is not a subclass of optimizer.Pass")
    check_pass_class(cls)
    return cls
