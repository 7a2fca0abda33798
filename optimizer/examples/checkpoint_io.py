"""Saving an example's trained weights: ``<out>`` (safetensors) and ``<out>.json`` (how it was made), atomically.

Shared by the example training scripts, so that every example checkpoint is written the same way, through
the toolkit's durable writes (`optimizer.atomic`): a crash or Ctrl-C never leaves a half-written file where a
recipe would load it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from optimizer.atomic import write_bytes_atomic, write_text_atomic

__all__ = ["save_checkpoint"]


def save_checkpoint(model: torch.nn.Module, out: Path, info: dict[str, Any]) -> Path:
    """Write the model's state dict to ``out`` and ``info`` to ``<out>.json``; return the sidecar's path."""
    from safetensors.torch import save  # only needed at the end of training

    model = model.to(memory_format=torch.contiguous_format)
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out, save(state))
    sidecar = out.with_name(out.name + ".json")
    write_text_atomic(sidecar, json.dumps(info, indent=2) + "\n")
    return sidecar
