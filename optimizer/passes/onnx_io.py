"""Helpers the ONNX-producing passes share: saving a model and drawing calibration samples."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from optimizer.errors import InputRejected

if TYPE_CHECKING:
    import onnx

    from optimizer.data.datasets import ArrayData

EXTERNAL_DATA_BYTES = 1_800_000_000


def save_onnx(model: "onnx.ModelProto", path: Path) -> None:
    """Save next to nothing else; only models near the 2 GiB protobuf limit get an external data file."""
    import onnx

    large = model.ByteSize() > EXTERNAL_DATA_BYTES
    onnx.save_model(model, str(path), save_as_external_data=large,
                    location=path.name + ".data" if large else None)


def load_onnx(path: Path) -> "onnx.ModelProto":
    import onnx

    from optimizer.models import check_onnx_external_data

    check_onnx_external_data(path)
    return onnx.load(str(path))


def refuse_quantized(model: "onnx.ModelProto", *, stage: str) -> None:
    """Quantizing a model that already holds Q/DQ pairs stacks a second rounding on the first."""
    if any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in model.graph.node):
        from optimizer.errors import RecipeError

        raise RecipeError(f"stage '{stage}': the input model is already quantized (it has QuantizeLinear nodes); "
                          "quantize the float model instead")


def calibration_indices(data: "ArrayData", count: int, seed: int, *, stage: str) -> np.ndarray:
    """Sorted indices of the ``count`` calibration samples drawn with the seed; fewer available is an error,
    never silent. Accuracy control holds out the others."""
    if len(data) == 0:
        raise InputRejected(f"stage '{stage}': the calibration set is empty")
    if count > len(data):
        raise InputRejected(
            f"stage '{stage}': asks for {count} calibration samples but data.calibration has {len(data)}; "
            "lower subset_size or add samples"
        )
    return np.sort(np.random.default_rng(seed).choice(len(data), size=count, replace=False))


def single_samples(data: "ArrayData", index: np.ndarray) -> list[dict[str, np.ndarray]]:
    """One input mapping per index, each a batch of one at the sample's own length on any dynamic axis (so
    calibration sees the lengths the deployed model will)."""
    return [data.batch(int(i), int(i) + 1) for i in index]


def calibration_samples(data: "ArrayData", count: int, seed: int, *, stage: str) -> list[dict[str, np.ndarray]]:
    """``count`` single-sample inputs drawn with the seed (see calibration_indices)."""
    return single_samples(data, calibration_indices(data, count, seed, stage=stage))
