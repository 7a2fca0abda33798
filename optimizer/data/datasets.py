"""Datasets by kind, materialized as numpy arrays keyed by model input name.

Evaluation and calibration sets here are small enough to hold in memory (Fashion-MNIST's test split is
31 MB as float32); a ``samples`` count caps larger ones. Subsets are drawn with the recipe's seed, so two
runs of one recipe see the same samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from optimizer.errors import InputRejected, RecipeError
from optimizer.recipe import (
    FashionMnistData,
    ImageFolderData,
    ImageTransform,
    InputSpec,
    NpzData,
    PythonData,
)
from optimizer.shapes import LengthAxis, length_axes, trim

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class ArrayData:
    """Inputs (one array per model input, batch first) and labels: integer classes, or numbers of any
    per-sample shape for a python: accuracy metric (a regression target, a box)."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray
    # Dynamic axes (by symbolic name) and each sample's own length on them. The arrays hold every sample
    # padded to the longest; a batch is cut to the longest sample in it ("padded to the longest in a batch").
    axes: dict[str, LengthAxis] = field(default_factory=dict)
    lengths: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, start: int, stop: int) -> dict[str, np.ndarray]:
        batch = {name: array[start:stop] for name, array in self.inputs.items()}
        return trim(batch, self.axes, {name: own[start:stop] for name, own in self.lengths.items()})

    def batches(self, batch_size: int):
        for start in range(0, len(self), batch_size):
            yield self.batch(start, start + batch_size), self.labels[start : start + batch_size]


def draw_indices(total: int, samples: int | None, seed: int, *, where: str) -> np.ndarray:
    if total == 0:
        raise InputRejected(f"{where}: the data set is empty")
    if samples is None:
        return np.arange(total)
    if samples > total:
        raise InputRejected(f"{where}: asks for {samples} samples but the data set has only {total}")
    return np.sort(np.random.default_rng(seed).choice(total, size=samples, replace=False))


def _resize_crop(images: np.ndarray, transform: ImageTransform) -> np.ndarray:
    """Resize the shorter side and center-crop a float32 NCHW batch (bilinear, antialiased, like PIL)."""
    if transform.resize is None and transform.crop is None:
        return images
    import torch
    import torch.nn.functional as F

    out = []
    for start in range(0, len(images), 512):
        chunk = torch.from_numpy(images[start : start + 512])
        if transform.resize is not None:
            h, w = chunk.shape[-2:]
            scale = transform.resize / min(h, w)
            size = (max(1, round(h * scale)), max(1, round(w * scale)))
            chunk = F.interpolate(chunk, size=size, mode="bilinear", antialias=True, align_corners=False)
        if transform.crop is not None:
            h, w = chunk.shape[-2:]
            c = transform.crop
            if c > h or c > w:
                raise RecipeError(f"data: crop {c} is larger than the resized image {h}x{w}; lower 'crop'")
            top, left = (h - c) // 2, (w - c) // 2
            chunk = chunk[..., top : top + c, left : left + c]
        out.append(chunk.numpy())
    return np.ascontiguousarray(np.concatenate(out))


def _normalize(images: np.ndarray, transform: ImageTransform, *, where: str) -> np.ndarray:
    if transform.channels == 3 and images.shape[1] == 1:
        images = np.repeat(images, 3, axis=1)
    elif transform.channels == 1 and images.shape[1] == 3:
        images = (images * np.array([0.299, 0.587, 0.114], np.float32)[None, :, None, None]).sum(1, keepdims=True)
    channels = images.shape[1]
    for name in ("mean", "std"):
        values = getattr(transform, name)
        if values is not None and len(values) not in (1, channels):
            raise RecipeError(f"{where}: '{name}' has {len(values)} values but the images have {channels} channels")
    if transform.mean is not None:
        images = images - np.asarray(transform.mean, np.float32).reshape(1, -1, 1, 1)
    if transform.std is not None:
        images = images / np.asarray(transform.std, np.float32).reshape(1, -1, 1, 1)
    return images.astype(np.float32, copy=False)


def load_fashion_mnist_split(spec: FashionMnistData, base_dir: Path, seed: int, *, where: str) -> tuple[np.ndarray, np.ndarray]:
    from optimizer.data.idx import load_fashion_mnist

    root = Path(spec.root).expanduser()
    root = root if root.is_absolute() else base_dir / root
    images, labels = load_fashion_mnist(root, spec.split)
    index = draw_indices(len(labels), spec.samples, seed, where=where)
    x = images[index].astype(np.float32)[:, None, :, :] / 255.0
    x = _resize_crop(x, spec)
    return _normalize(x, spec, where=where), labels[index]


def load_image_folder(spec: ImageFolderData, base_dir: Path, seed: int, *, where: str) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    root = Path(spec.root).expanduser()
    root = root if root.is_absolute() else base_dir / root
    if not root.is_dir():
        raise InputRejected(f"{where}: image folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [(f, label) for label, name in enumerate(classes) for f in sorted((root / name).iterdir())
             if f.suffix.lower() in IMAGE_SUFFIXES]
    index = draw_indices(len(files), spec.samples, seed, where=where)
    mode = "L" if spec.channels == 1 else "RGB"
    arrays = []
    for i in index:
        path = files[i][0]
        try:
            with Image.open(path) as image:
                image = image.convert(mode)
                if spec.resize is not None:
                    w, h = image.size
                    scale = spec.resize / min(w, h)
                    image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
                if spec.crop is not None:
                    w, h = image.size
                    c = spec.crop
                    left, top = (w - c) // 2, (h - c) // 2
                    image = image.crop((left, top, left + c, top + c))
                array = np.asarray(image, dtype=np.float32) / 255.0
        except OSError as exc:
            raise InputRejected(f"{where}: cannot read image {path} ({exc})") from None
        arrays.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise InputRejected(f"{where}: images in {root} have different sizes {sorted(shapes)[:3]}; set 'resize' and 'crop'")
    x = np.stack(arrays)
    labels = np.array([files[i][1] for i in index], dtype=np.int64)
    no_resize = spec.model_copy(update={"resize": None, "crop": None})
    return _normalize(x, no_resize, where=where), labels


def load_npz(spec: NpzData, base_dir: Path, seed: int, input_names: list[str], *, where: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    path = Path(spec.path).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if not path.is_file():
        raise InputRejected(f"{where}: npz file {path} does not exist")
    keys = spec.inputs if isinstance(spec.inputs, dict) else {input_names[0]: spec.inputs}
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in [*keys.values(), spec.labels] if k not in archive.files]
            if missing:
                raise InputRejected(f"{where}: {path} has no array {missing[0]!r}; it has {archive.files}")
            labels = archive[spec.labels]
            index = draw_indices(len(labels), spec.samples, seed, where=where)
            inputs = {name: np.ascontiguousarray(archive[key][index]) for name, key in keys.items()}
    except ValueError as exc:  # object arrays need pickle, which we never allow
        raise InputRejected(f"{where}: {path} cannot be read without pickle ({exc}); save plain arrays") from None
    if len(inputs) == 1:  # the recipe schema refuses image options with several inputs
        name = next(iter(inputs))
        inputs[name] = _prepare_npz_images(inputs[name], spec, where=f"{where} array {keys[name]!r}")
    return inputs, label_array(labels[index], where=f"{where} array {spec.labels!r}")


def _prepare_npz_images(x: np.ndarray, spec: NpzData, *, where: str) -> np.ndarray:
    """Apply the npz entry's layout and image options; without any, the array is returned as stored."""
    if spec.layout == "nhwc":
        if x.ndim != 4:
            raise InputRejected(f"{where}: 'layout: nhwc' needs images of shape [N, H, W, C], the array has shape "
                                f"{list(x.shape)}; drop 'layout' or save 4-dimensional images")
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    if not spec.transforms_images():
        return x
    option = next(n for n in ("resize", "crop", "channels", "mean", "std") if getattr(spec, n) is not None)
    if x.ndim == 3:
        x = x[:, None]  # [N, H, W]: gray images without a channel axis
    if x.ndim != 4:
        raise InputRejected(f"{where}: '{option}' needs images of shape [N, C, H, W] or [N, H, W], the array has "
                            f"shape {list(x.shape)}; drop the image options or save images")
    if x.dtype == np.uint8:
        # The same scale as the image data sets, so one mean/std serves both.
        x = x.astype(np.float32) / 255.0
    elif np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    else:
        raise InputRejected(f"{where}: '{option}' needs uint8 pixels or floats in [0, 1], the array is {x.dtype}; "
                            "convert it before saving, or drop the image options")
    return _normalize(_resize_crop(x, spec), spec, where=where)


def load_python_dataset(spec: PythonData, seed: int, input_names: list[str], *,
                        where: str) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Inputs (samples of different sizes padded with zeros to the largest), labels, each sample's own shape per
    input (``[n, ndim]``) and the data set's index of each sample."""
    from optimizer.registry import import_object

    factory = import_object(spec.dataset.removeprefix("python:"), where=where)
    if not callable(factory):
        raise RecipeError(f"{where}: {spec.dataset} is not callable")
    dataset = factory(**spec.kwargs)
    try:
        total = len(dataset)
    except TypeError:
        raise InputRejected(f"{where}: {spec.dataset} returned an object without len(); return a map-style Dataset") from None
    index = draw_indices(total, spec.samples, seed, where=where)
    columns: dict[str, list[np.ndarray]] = {name: [] for name in input_names}
    own_shapes: dict[str, list[tuple[int, ...]]] = {name: [] for name in input_names}
    labels = []
    for i in index:
        item = dataset[int(i)]
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise InputRejected(f"{where}: {spec.dataset} items must be (inputs, label) pairs")
        x, y = item
        parts = x if isinstance(x, dict) else dict(zip(input_names, x if isinstance(x, (tuple, list)) else [x]))
        for name in input_names:
            if name not in parts:
                raise InputRejected(f"{where}: dataset item has no input '{name}'")
            columns[name].append(_to_numpy(parts[name]))
            own_shapes[name].append(columns[name][-1].shape)
        labels.append(_to_numpy(y))
    try:
        stacked = np.stack(labels)
    except ValueError:
        raise InputRejected(f"{where}: {spec.dataset} labels differ in shape; give every sample a label of one "
                            "shape") from None
    sizes = {name: np.asarray(shapes, dtype=np.int64).reshape(len(index), -1) for name, shapes in own_shapes.items()}
    return ({name: _stack_padded(values, name, index, where=where) for name, values in columns.items()},
            label_array(stacked, where=where), sizes, index)


def _stack_padded(values: list[np.ndarray], name: str, index: np.ndarray, *, where: str) -> np.ndarray:
    """Stack samples; samples of different sizes (a tokenizer that pads each to its own length) are padded
    with zeros at the end of each axis to the largest, and their own sizes recovered by sample_lengths."""
    shapes = {v.shape for v in values}
    if len(shapes) == 1:
        return np.stack(values)
    if len({len(s) for s in shapes}) > 1:
        raise InputRejected(f"{where}: input '{name}' has samples with different numbers of dimensions "
                            f"(sample {int(index[0])}: {list(values[0].shape)})")
    size = tuple(max(s[d] for s in shapes) for d in range(len(next(iter(shapes)))))
    out = np.zeros((len(values), *size), dtype=np.result_type(*values))
    for row, value in enumerate(values):
        out[(row, *(slice(0, n) for n in value.shape))] = value
    return out


def label_array(labels: np.ndarray, *, where: str) -> np.ndarray:
    """Class labels as int64, one per sample (whole numbers stored as floats too, as always); labels that are
    not (a regression target, a vector per sample) keep their float values, for a python: accuracy metric."""
    if labels.dtype.kind == "f" and not (labels.size == len(labels) and np.all(np.isfinite(labels))
                                         and np.all(labels == np.round(labels))):
        return labels
    if labels.dtype.kind in "biuf":
        # One integer per sample, even when each is stored as a 1-element array.
        return labels.reshape(len(labels)).astype(np.int64) if labels.size == len(labels) else labels.astype(np.int64)
    raise InputRejected(f"{where}: labels must be numbers, received dtype {labels.dtype}; store integer classes "
                        "or float targets")


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def load_dataset(spec: Any, *, inputs: list[InputSpec], base_dir: Path, seed: int, where: str) -> ArrayData:
    """Load a recipe data entry and check it against the model's input spec."""
    names = [spec_.name for spec_ in inputs]
    sizes: dict[str, np.ndarray] = {}
    index: np.ndarray | None = None
    if isinstance(spec, FashionMnistData):
        x, y = load_fashion_mnist_split(spec, base_dir, seed, where=where)
        arrays = {names[0]: x}
    elif isinstance(spec, ImageFolderData):
        x, y = load_image_folder(spec, base_dir, seed, where=where)
        arrays = {names[0]: x}
    elif isinstance(spec, NpzData):
        arrays, y = load_npz(spec, base_dir, seed, names, where=where)
    elif isinstance(spec, PythonData):
        arrays, y, sizes, index = load_python_dataset(spec, seed, names, where=where)
    else:  # pragma: no cover - the recipe schema admits no other kind
        raise RecipeError(f"{where}: unsupported dataset {spec!r}")
    if len(arrays) != len(inputs) or set(arrays) != set(names):
        raise InputRejected(f"{where}: data provides inputs {sorted(arrays)}, the model expects {names}")
    for spec_ in inputs:
        check_against_spec(arrays[spec_.name], spec_, where=where)
    axes = length_axes(inputs)
    lengths = sample_lengths(arrays, axes, sizes, index, where=where)
    return ArrayData(inputs={n: arrays[n] for n in names}, labels=y, axes=axes, lengths=lengths)


def sample_lengths(arrays: dict[str, np.ndarray], axes: dict[str, LengthAxis], sizes: dict[str, np.ndarray],
                   index: np.ndarray | None, *, where: str) -> dict[str, np.ndarray]:
    """Each sample's own length on every dynamic axis, checked against the axis's bounds (exit 3, naming the
    sample). Samples stored at one size (an npz, a tokenizer that pads to a fixed length) all have that size."""
    lengths: dict[str, np.ndarray] = {}
    for name, axis in axes.items():
        found: np.ndarray | None = None
        for input_name, dim in axis.places:
            own = (sizes[input_name][:, dim - 1] if input_name in sizes  # per-sample shapes have no batch axis
                   else np.full(len(arrays[input_name]), arrays[input_name].shape[dim], dtype=np.int64))
            if found is not None and not np.array_equal(found, own):
                bad = int(np.flatnonzero(found != own)[0])
                raise InputRejected(f"{where}: sample {_sample_id(index, bad)} has length {int(found[bad])} in one input "
                                    f"and {int(own[bad])} in '{input_name}', which share the dynamic axis '{name}'")
            found = own
        assert found is not None
        outside = np.flatnonzero((found < axis.min) | (found > axis.max))
        if len(outside):
            bad = int(outside[0])
            raise InputRejected(f"{where}: sample {_sample_id(index, bad)} has length {int(found[bad])} on dynamic axis "
                                f"'{name}', outside the declared bounds {axis.min}..{axis.max} ({len(outside)} such "
                                "samples); truncate the data or widen model.inputs[].dynamic")
        lengths[name] = found
    return lengths


def _sample_id(index: np.ndarray | None, position: int) -> int:
    """The data set's own index of a loaded sample (a drawn subset keeps the data set's numbering)."""
    return int(index[position]) if index is not None else position


def check_against_spec(array: np.ndarray, spec: InputSpec, *, where: str) -> None:
    """Refuse data whose per-sample shape or dtype differs from the model's input spec."""
    # A dynamic axis may have any size; its bounds are checked per sample (sample_lengths).
    expected = tuple(spec.shape[1:])
    received = tuple(array.shape[1:])
    if spec.dynamic and len(received) == len(expected):
        expected = tuple(received[d - 1] if d in spec.dynamic else n for d, n in enumerate(spec.shape[1:], start=1))
    if received != expected:
        hint = ""
        if len(expected) == 3 and received == (expected[1], expected[2], expected[0]):
            hint = " (the data looks channels-last, NHWC; the model expects NCHW)"
        raise InputRejected(
            f"{where}: input '{spec.name}' expects samples of shape {list(expected)}, received {list(received)}{hint}"
        )
    if array.dtype != np.dtype(spec.dtype):
        raise InputRejected(
            f"{where}: input '{spec.name}' expects dtype {spec.dtype}, received {array.dtype}; "
            "fix the data or the recipe's model.input.dtype"
        )
