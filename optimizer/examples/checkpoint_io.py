"""Saving an example's trained weights: ``<out>`` (safetensors) and ``<out>.json`` (how it was made), atomically.

Shared by the example training scripts, so that every example checkpoint is written the same way: to a
temporary name in the same folder, then renamed, so a crash or Ctrl-C never leaves a half-written file
where a recipe would load it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_write", "save_checkpoint"]


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it onto ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # the writers create 0600 files; a checkpoint is meant to be shared
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(model: torch.nn.Module, out: Path, info: dict[str, Any]) -> Path:
    """Write the model's state dict to ``out`` and ``info`` to ``<out>.json``; return the sidecar's path."""
    from safetensors.torch import save_file  # only needed at the end of training

    model = model.to(memory_format=torch.contiguous_format)
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: save_file(state, str(tmp)))
    sidecar = out.with_name(out.name + ".json")
    atomic_write(sidecar, lambda tmp: tmp.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8"))
    return sidecar
