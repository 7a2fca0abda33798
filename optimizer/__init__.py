"""optimizer: turn a trained PyTorch checkpoint into a faster deployable model, stage by stage.

Importing the package is cheap: torch, onnxruntime and NNCF load only when a stage needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "Artifact",
    "Pass",
    "PassConfig",
    "PassContext",
    "Report",
    "load_recipe",
    "register_pass",
    "run_recipe",
    "run_search",
    "__version__",
]

_LAZY = {
    "Artifact": "optimizer.artifact",
    "Pass": "optimizer.passes.base",
    "PassConfig": "optimizer.passes.base",
    "PassContext": "optimizer.passes.base",
    "Report": "optimizer.report.build",
    "load_recipe": "optimizer.recipe",
    "register_pass": "optimizer.registry",
    "run_recipe": "optimizer.runner",
    "run_search": "optimizer.search.driver",
}

if TYPE_CHECKING:
    from optimizer.artifact import Artifact
    from optimizer.passes.base import Pass, PassConfig, PassContext
    from optimizer.recipe import load_recipe
    from optimizer.registry import register_pass
    from optimizer.report.build import Report
    from optimizer.runner import run_recipe
    from optimizer.search.driver import run_search


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'optimizer' has no attribute '{name}'")
