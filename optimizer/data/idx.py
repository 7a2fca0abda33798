"""Reader for the IDX format of (Fashion-)MNIST, gzipped or not."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from optimizer.errors import InputRejected

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"),
               0x0E: np.dtype(">f8")}

FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise InputRejected(f"{path}: cannot read IDX file ({exc})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise InputRejected(f"{path}: not an IDX file (bad magic number)")
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise InputRejected(f"{path}: IDX file is truncated or padded ({len(data) - header} bytes, {expected} expected)")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def fashion_mnist_files(root: Path, split: str) -> tuple[Path, Path]:
    images, labels = FASHION_MNIST_FILES[split]
    for name in (images, labels):
        candidate = root / name
        if not candidate.is_file() and not (root / name.removesuffix(".gz")).is_file():
            raise InputRejected(
                f"{root}: Fashion-MNIST file {name} not found; install the Debian package dataset-fashion-mnist "
                "(apt-get install dataset-fashion-mnist) or set the dataset's 'root'"
            )
    pick = lambda name: root / name if (root / name).is_file() else root / name.removesuffix(".gz")  # noqa: E731
    return pick(images), pick(labels)


def load_fashion_mnist(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images as uint8 [N, 28, 28] and labels as int64 [N]."""
    images_path, labels_path = fashion_mnist_files(root, split)
    images = read_idx(images_path)
    labels = read_idx(labels_path).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise InputRejected(f"{root}: Fashion-MNIST {split} images and labels do not match in count or shape")
    return images, labels
