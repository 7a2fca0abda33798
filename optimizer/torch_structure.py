"""Saving a torch module whose structure differs from what its factory builds (a pruned model, say).

A pruned network no longer fits its architecture's state dict, and pickling the module would make the
artifact code. Instead a torch artifact stores: the factory and kwargs, the weights as safetensors, and a
*structure patch* — for each submodule, the plain attributes (ints, floats, bools, tuples of them) that
differ from a fresh build, such as ``out_channels``, ``groups`` or ``num_heads``. Loading builds the
architecture, applies the patch, resizes every parameter and buffer to the stored shape, and loads the
weights strictly. No pickle anywhere, and the patch is readable JSON.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

_PLAIN = (int, float, bool, str)


def _plain_attributes(module: "torch.nn.Module") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in vars(module).items():
        if name.startswith("_") or name == "training":
            continue
        if isinstance(value, _PLAIN) or (
            isinstance(value, (tuple, list)) and all(isinstance(v, _PLAIN) for v in value)
        ):
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def capture_structure(changed: "torch.nn.Module", fresh: "torch.nn.Module") -> dict[str, dict[str, Any]]:
    """The attribute patch that turns ``fresh`` (the factory's build) into ``changed``'s structure."""
    fresh_modules = dict(fresh.named_modules())
    patch: dict[str, dict[str, Any]] = {}
    for name, module in changed.named_modules():
        reference = fresh_modules.get(name)
        if reference is None or type(reference) is not type(module):
            raise ValueError(f"module '{name or '(root)'}' is not in the factory's architecture; structural changes "
                             "must keep module names and types")
        ours, theirs = _plain_attributes(module), _plain_attributes(reference)
        diff = {k: v for k, v in ours.items() if theirs.get(k) != v}
        if diff:
            patch[name] = diff
    return patch


def apply_structure(module: "torch.nn.Module", patch: dict[str, dict[str, Any]],
                    shapes: dict[str, tuple[int, ...]]) -> None:
    """Apply an attribute patch and resize parameters and buffers to ``shapes`` (from the weights file)."""
    import torch

    modules = dict(module.named_modules())
    for name, attributes in patch.items():
        target = modules.get(name)
        if target is None:
            raise ValueError(f"structure patch names module '{name}', which the factory does not build")
        for attr, value in attributes.items():
            current = getattr(target, attr, None)
            setattr(target, attr, tuple(value) if isinstance(current, tuple) and isinstance(value, list) else value)
    for full_name, shape in shapes.items():
        owner_name, _, leaf = full_name.rpartition(".")
        owner = modules.get(owner_name)
        if owner is None:
            continue  # reported as unexpected by the strict load that follows
        if leaf in owner._parameters and owner._parameters[leaf] is not None:
            old = owner._parameters[leaf]
            if tuple(old.shape) != tuple(shape):
                owner._parameters[leaf] = torch.nn.Parameter(torch.empty(shape, dtype=old.dtype),
                                                             requires_grad=old.requires_grad)
        elif leaf in owner._buffers and owner._buffers[leaf] is not None:
            old = owner._buffers[leaf]
            if tuple(old.shape) != tuple(shape):
                owner._buffers[leaf] = torch.empty(shape, dtype=old.dtype)


def save_module_weights(module: "torch.nn.Module", path: Path) -> None:
    """safetensors refuses tensors that share storage; clone() gives each its own."""
    from safetensors.torch import save_file

    state = {name: tensor.detach().contiguous().clone() for name, tensor in module.state_dict().items()}
    save_file(state, str(path))


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
