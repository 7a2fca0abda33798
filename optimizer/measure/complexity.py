"""Multiply-accumulate count of a torch module for one sample, from PyTorch's own FLOP counter."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from optimizer.recipe import InputSpec


def example_inputs(inputs: list["InputSpec"], batch: int = 1) -> tuple["torch.Tensor", ...]:
    """Zeros (or ones for integer inputs such as token ids) of the spec's shape at ``batch``."""
    import torch

    tensors = []
    for spec in inputs:
        shape = [batch, *spec.shape[1:]]
        dtype = getattr(torch, spec.dtype)
        tensors.append(torch.ones(shape, dtype=dtype) if not dtype.is_floating_point else torch.zeros(shape, dtype=dtype))
    return tuple(tensors)


def count_macs(module: "torch.nn.Module", inputs: list["InputSpec"]) -> int | None:
    """MACs per sample (FLOPs / 2 over matmuls, convolutions and attention); None if the model won't run."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from optimizer.models import try_eval

    was_training = module.training if try_eval(module) else None
    # In eval mode nn.TransformerEncoder takes a fused fast path the FLOP counter cannot see (it would
    # report a few hundred MACs); count with the fast path off.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(*example_inputs(inputs))
        return int(counter.get_total_flops() // 2)
    except Exception:  # counting is informative only; a model that needs special inputs just has no count
        return None
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        if was_training is not None:
            module.train(was_training)
