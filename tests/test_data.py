"""Data sets by kind (Fashion-MNIST, npz, image folder, Python), and their check against the model input."""

from __future__ import annotations

import gzip
import os
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest

from optimizer.data.datasets import ArrayData, load_dataset
from optimizer.errors import InputRejected, RecipeError
from tests.conftest import FASHION_ROOT
from optimizer.recipe import FashionMnistData, ImageFolderData, InputSpec, NpzData, PythonData

MEAN, STD = 0.2860, 0.3530
GRAY28 = [InputSpec(name="images", shape=[1, 1, 28, 28])]

def raw_fashion(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """The IDX files read independently of the package: uint8 [N, 28, 28] and labels."""
    prefix = "t10k" if split == "test" else "train"
    with gzip.open(FASHION_ROOT / f"{prefix}-images-idx3-ubyte.gz", "rb") as handle:
        images = np.frombuffer(handle.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FASHION_ROOT / f"{prefix}-labels-idx1-ubyte.gz", "rb") as handle:
        labels = np.frombuffer(handle.read(), np.uint8, offset=8).astype(np.int64)
    return images, labels


def load(spec, inputs=GRAY28, *, base_dir: Path | None = None, seed: int = 0) -> ArrayData:
    return load_dataset(spec, inputs=inputs, base_dir=base_dir or Path.cwd(), seed=seed, where="data.eval")


def fashion(**kwargs) -> FashionMnistData:
    return FashionMnistData(dataset="fashion-mnist", **kwargs)


# ---------------------------------------------------------------------------------- fashion-mnist


def test_fashion_mnist_test_split_whole():
    data = load(fashion(split="test"))
    images, labels = raw_fashion("test")
    x = data.inputs["images"]
    assert x.shape == (10000, 1, 28, 28)
    assert x.dtype == np.float32
    assert data.labels.dtype == np.int64
    np.testing.assert_array_equal(data.labels, labels)
    np.testing.assert_array_equal(np.bincount(data.labels), [1000] * 10)
    # Without mean/std: pixels scaled to [0, 1].
    np.testing.assert_allclose(x[:, 0], images / 255.0, rtol=0, atol=1e-7)
    assert x.min() == 0.0 and x.max() == 1.0


def test_fashion_mnist_normalization_is_applied():
    data = load(fashion(split="test", mean=[MEAN], std=[STD]))
    images, _ = raw_fashion("test")
    x = data.inputs["images"]
    assert x.dtype == np.float32
    np.testing.assert_allclose(x[:, 0], (images / 255.0 - MEAN) / STD, rtol=1e-5, atol=1e-5)
    # The training script's constants standardize the data set.
    assert abs(float(x.mean())) < 0.01
    assert abs(float(x.std()) - 1.0) < 0.01


def test_fashion_mnist_samples_are_drawn_with_the_seed():
    spec = fashion(split="test", samples=200)
    first = load(spec, seed=0)
    again = load(spec, seed=0)
    other = load(spec, seed=1)
    assert first.inputs["images"].shape == (200, 1, 28, 28)
    assert len(first) == 200
    np.testing.assert_array_equal(first.inputs["images"], again.inputs["images"])
    np.testing.assert_array_equal(first.labels, again.labels)
    assert not np.array_equal(first.inputs["images"], other.inputs["images"])

    # Drawn without replacement from the real split, each image keeping its own label.
    images, labels = raw_fashion("test")
    index = {images[i].tobytes(): i for i in range(len(images))}
    drawn = [index[(np.rint(img[0] * 255)).astype(np.uint8).tobytes()] for img in first.inputs["images"]]
    assert len(set(drawn)) == 200
    np.testing.assert_array_equal(first.labels, labels[drawn])


def test_fashion_mnist_train_split():
    data = load(fashion(split="train", samples=500))
    _, labels = raw_fashion("train")
    assert data.inputs["images"].shape == (500, 1, 28, 28)
    assert set(np.unique(data.labels)) <= set(range(10))
    assert len(np.unique(data.labels)) == 10
    assert not np.array_equal(data.labels, labels[:500])


def test_fashion_mnist_resized_to_three_channels():
    spec = fashion(split="test", samples=64, resize=32, channels=3, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    data = load(spec, inputs=[InputSpec(name="x", shape=[1, 3, 32, 32])])
    x = data.inputs["x"]
    assert x.shape == (64, 3, 32, 32)
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x[:, 0], x[:, 1])
    np.testing.assert_array_equal(x[:, 0], x[:, 2])
    # Values stay in the normalized range of [0, 1] pixels (antialiased bilinear does not overshoot much).
    assert x.min() >= (0 - 0.5) / 0.25 - 0.05 and x.max() <= (1 - 0.5) / 0.25 + 0.05


def test_fashion_mnist_resize_then_center_crop():
    data = load(fashion(split="test", samples=8, resize=36, crop=32), inputs=[InputSpec(name="x", shape=[1, 1, 32, 32])])
    x = data.inputs["x"]
    assert x.shape == (8, 1, 32, 32)
    # The same images resized by PIL (bilinear) and center-cropped: 36 - 32 leaves 2 pixels each side.
    from PIL import Image

    images, _ = raw_fashion("test")
    rows = {images[i].tobytes(): i for i in range(len(images))}
    sampled = load(fashion(split="test", samples=8))
    for k, image in enumerate(sampled.inputs["images"]):
        i = rows[np.rint(image[0] * 255).astype(np.uint8).tobytes()]
        reference = np.asarray(Image.fromarray(images[i]).resize((36, 36), Image.BILINEAR), np.float32) / 255
        np.testing.assert_allclose(x[k, 0], reference[2:34, 2:34], atol=2 / 255)


def test_crop_larger_than_the_image_is_a_recipe_error():
    with pytest.raises(RecipeError, match="crop 40 is larger"):
        load(fashion(split="test", samples=4, crop=40), inputs=[InputSpec(name="x", shape=[1, 1, 40, 40])])


def test_mean_with_the_wrong_number_of_values():
    with pytest.raises(RecipeError, match="'mean' has 2 values but the images have 1 channels"):
        load(fashion(split="test", samples=4, mean=[0.1, 0.2]))


def test_fashion_mnist_missing_root(tmp_path):
    with pytest.raises(InputRejected, match="not found"):
        load(fashion(root=str(tmp_path)))


def test_fashion_mnist_relative_root_uses_base_dir(tmp_path):
    link = tmp_path / "fm"
    link.symlink_to(FASHION_ROOT, target_is_directory=True)
    data = load(fashion(root="fm", samples=10), base_dir=tmp_path)
    assert len(data) == 10


def test_fashion_mnist_more_samples_than_exist():
    with pytest.raises(InputRejected, match="asks for 10001 samples but the data set has only 10000"):
        load(fashion(split="test", samples=10001))


def test_fashion_mnist_into_a_model_of_another_size():
    with pytest.raises(InputRejected, match=r"expects samples of shape \[3, 224, 224\], received \[1, 28, 28\]"):
        load(fashion(split="test", samples=4), inputs=[InputSpec(name="x", shape=[1, 3, 224, 224])])


# -------------------------------------------------------------------------------------------- npz


def write_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def small_arrays(n=20, shape=(1, 28, 28), dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, *shape)).astype(dtype), rng.integers(0, 10, n).astype(np.int64)


def test_npz_default_keys(tmp_path):
    x, y = small_arrays()
    write_npz(tmp_path / "d.npz", x=x, y=y)
    data = load(NpzData(dataset="npz", path="d.npz"), base_dir=tmp_path)
    np.testing.assert_array_equal(data.inputs["images"], x)
    np.testing.assert_array_equal(data.labels, y)


def test_npz_configurable_keys_and_samples(tmp_path):
    x, y = small_arrays(n=50)
    write_npz(tmp_path / "d.npz", pixels=x, targets=y.astype(np.int32))
    spec = NpzData(dataset="npz", path=str(tmp_path / "d.npz"), inputs="pixels", labels="targets", samples=10)
    data = load(spec, seed=3)
    again = load(spec, seed=3)
    assert data.inputs["images"].shape == (10, 1, 28, 28)
    assert data.labels.dtype == np.int64
    np.testing.assert_array_equal(data.labels, again.labels)
    # Each drawn sample is a real row with its own label.
    rows = {x[i].tobytes(): i for i in range(len(x))}
    picked = [rows[row.tobytes()] for row in data.inputs["images"]]
    np.testing.assert_array_equal(data.labels, y[picked])


def test_npz_several_inputs(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 100, (12, 16)).astype(np.int64)
    mask = np.ones((12, 16), np.int64)
    write_npz(tmp_path / "d.npz", ids=ids, mask=mask, y=np.zeros(12, np.int64))
    inputs = [InputSpec(name="input_ids", shape=[1, 16], dtype="int64"),
              InputSpec(name="attention_mask", shape=[1, 16], dtype="int64")]
    spec = NpzData(dataset="npz", path=str(tmp_path / "d.npz"), inputs={"input_ids": "ids", "attention_mask": "mask"})
    data = load(spec, inputs=inputs)
    np.testing.assert_array_equal(data.inputs["input_ids"], ids)
    np.testing.assert_array_equal(data.inputs["attention_mask"], mask)
    assert list(data.inputs) == ["input_ids", "attention_mask"]


def test_npz_missing_key(tmp_path):
    x, y = small_arrays()
    write_npz(tmp_path / "d.npz", x=x, labels=y)
    with pytest.raises(InputRejected, match=r"has no array 'y'; it has \['x', 'labels'\]"):
        load(NpzData(dataset="npz", path=str(tmp_path / "d.npz")))


def test_npz_missing_file(tmp_path):
    with pytest.raises(InputRejected, match="does not exist"):
        load(NpzData(dataset="npz", path=str(tmp_path / "nope.npz")))


class _Gadget:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.mark.parametrize("where", ["x", "y"])
def test_npz_object_array_is_refused_without_unpickling(tmp_path, where):
    marker = tmp_path / "MARKER"
    x, y = small_arrays(n=2)
    evil = np.array([_Gadget(marker), _Gadget(marker)], dtype=object)
    arrays = {"x": x, "y": y, where: evil}
    write_npz(tmp_path / "d.npz", **arrays)
    with pytest.raises(InputRejected, match="without pickle"):
        load(NpzData(dataset="npz", path=str(tmp_path / "d.npz")))
    assert not marker.exists()


# ------------------------------------------------------------------------- npz image preprocessing


def fashion_npz(path: Path, *, count: int = 400, layout: str = "nchw", as_float: bool = True,
                three_channels: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The first ``count`` Fashion-MNIST test images (read with the package's IDX reader) saved as an npz
    the way a user would: floats in [0, 1] or raw uint8, channels first or last. Returns the stored arrays."""
    from optimizer.data.idx import load_fashion_mnist

    images, labels = load_fashion_mnist(FASHION_ROOT, "test")
    x = images[:count, None]
    if three_channels:
        # Three different channels, so a transpose that mixes them up cannot go unnoticed.
        x = np.concatenate([x, 255 - x, np.roll(x, 5, axis=-1)], axis=1)
    if layout == "nhwc":
        x = x.transpose(0, 2, 3, 1)
    x = np.ascontiguousarray(x.astype(np.float32) / 255.0 if as_float else x)
    write_npz(path, x=x, y=labels[:count])
    return x, labels[:count]


def test_npz_mean_and_std_normalize_floats_in_unit_range(tmp_path):
    x, y = fashion_npz(tmp_path / "d.npz")
    data = load(NpzData(dataset="npz", path="d.npz", mean=[MEAN], std=[STD]), base_dir=tmp_path)
    out = data.inputs["images"]
    assert out.dtype == np.float32 and out.shape == (400, 1, 28, 28)
    np.testing.assert_allclose(out, (x - MEAN) / STD, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(data.labels, y)
    # Without options the array is used exactly as stored, as before.
    np.testing.assert_array_equal(load(NpzData(dataset="npz", path=str(tmp_path / "d.npz"))).inputs["images"], x)


def test_npz_uint8_pixels_match_the_fashion_mnist_data_set(tmp_path):
    # Raw uint8 [N, 28, 28] with resize, channels, mean and std: the npz path must give exactly what the
    # fashion-mnist data set gives for the same images and options.
    from optimizer.data.datasets import draw_indices
    from optimizer.data.idx import load_fashion_mnist

    options = dict(resize=32, channels=3, mean=[0.5, 0.4, 0.3], std=[0.25, 0.2, 0.3])
    inputs = [InputSpec(name="x", shape=[1, 3, 32, 32])]
    reference = load(fashion(split="test", samples=64, **options), inputs=inputs, seed=5)
    images, labels = load_fashion_mnist(FASHION_ROOT, "test")
    index = draw_indices(len(labels), 64, 5, where="test")
    write_npz(tmp_path / "d.npz", x=images[index], y=labels[index])
    data = load(NpzData(dataset="npz", path=str(tmp_path / "d.npz"), **options), inputs=inputs)
    assert data.inputs["x"].shape == (64, 3, 32, 32)
    np.testing.assert_allclose(data.inputs["x"], reference.inputs["x"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(data.labels, reference.labels)


def test_npz_nhwc_layout_is_transposed_to_nchw(tmp_path):
    nchw, _ = fashion_npz(tmp_path / "first.npz", count=50, three_channels=True)
    nhwc, _ = fashion_npz(tmp_path / "last.npz", count=50, three_channels=True, layout="nhwc")
    assert nhwc.shape == (50, 28, 28, 3)
    rgb = [InputSpec(name="images", shape=[1, 3, 28, 28])]
    # Stored channels-last, the array is refused with a hint unless the layout says so.
    with pytest.raises(InputRejected, match="channels-last"):
        load(NpzData(dataset="npz", path=str(tmp_path / "last.npz")), inputs=rgb)
    transposed = load(NpzData(dataset="npz", path=str(tmp_path / "last.npz"), layout="nhwc"), inputs=rgb)
    np.testing.assert_array_equal(transposed.inputs["images"], nchw)
    assert transposed.inputs["images"].flags.c_contiguous
    # The layout comes before the per-channel normalization: each channel gets its own mean and std.
    mean, std = [0.1, 0.5, 0.9], [0.5, 0.25, 0.125]
    normalized = load(NpzData(dataset="npz", path=str(tmp_path / "last.npz"), layout="nhwc", mean=mean, std=std),
                      inputs=rgb)
    expected = (nchw - np.array(mean, np.float32)[None, :, None, None]) / np.array(std, np.float32)[None, :, None, None]
    np.testing.assert_allclose(normalized.inputs["images"], expected, rtol=1e-6, atol=1e-6)


def test_npz_nhwc_layout_of_an_array_without_channels(tmp_path):
    from optimizer.data.idx import load_fashion_mnist

    images, labels = load_fashion_mnist(FASHION_ROOT, "test")
    flat = write_npz(tmp_path / "flat.npz", x=images[:10], y=labels[:10])
    with pytest.raises(InputRejected, match=r"'layout: nhwc' needs images of shape \[N, H, W, C\].*\[10, 28, 28\]"):
        load(NpzData(dataset="npz", path=str(flat), layout="nhwc"))


def test_npz_image_options_refuse_integer_arrays_other_than_uint8(tmp_path):
    write_npz(tmp_path / "d.npz", x=np.zeros((4, 1, 28, 28), np.int32), y=np.zeros(4, np.int64))
    with pytest.raises(InputRejected,
                       match=r"array 'x': 'mean' needs uint8 pixels or floats in \[0, 1\], the array is int32"):
        load(NpzData(dataset="npz", path=str(tmp_path / "d.npz"), mean=[0.5]))


def test_npz_mean_with_the_wrong_number_of_values(tmp_path):
    fashion_npz(tmp_path / "d.npz", count=10)
    with pytest.raises(RecipeError, match="'std' has 2 values but the images have 1 channels"):
        load(NpzData(dataset="npz", path=str(tmp_path / "d.npz"), std=[0.5, 0.5]))


@pytest.mark.parametrize(("entry", "field", "message"), [
    ("{dataset: npz, path: d.npz, layout: NHWC}", "data.eval.layout", "Input should be 'nchw' or 'nhwc'"),
    ("{dataset: npz, path: d.npz, std: [0.3, 0]}", "data.eval.std", "every standard deviation must be greater than 0"),
    ("{dataset: npz, path: d.npz, mean: []}", "data.eval.mean", "at least 1 item"),
    ("{dataset: npz, path: d.npz, channels: 2}", "data.eval.channels", "Input should be 1 or 3"),
    ("{dataset: npz, path: d.npz, inputs: {a: x, b: z}, mean: [0.5]}", "data.eval",
     "'mean' applies to the single input of an image model, and 'inputs' names 2"),
])
def test_npz_options_are_validated_with_the_field_named(entry, field, message):
    from optimizer.recipe import load_recipe
    from tests.conftest import REPO

    with pytest.raises(RecipeError) as info:
        load_recipe(REPO / "recipes" / "quickstart.yaml", overrides=[f"data.eval={entry}"])
    text = str(info.value)
    assert f": {field}: " in text and message in text, text
    assert "\n" not in text


def test_npz_options_pass_validation_with_one_named_input():
    spec = NpzData(dataset="npz", path="d.npz", inputs={"images": "x"}, layout="nhwc", mean=[0.5], std=[0.5])
    assert spec.layout == "nhwc" and spec.transforms_images()


# ---------------------------------------------------------------------------------- image folder


def make_image_folder(root: Path, classes: dict[str, int], size=(30, 40), count=3) -> Path:
    """One folder per class; every image of a class is filled with the class's gray value."""
    from PIL import Image

    for name, value in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", size, (value, value, value)).save(root / name / f"img{i}.png")
    return root


def test_image_folder_labels_follow_sorted_folder_names(tmp_path):
    root = make_image_folder(tmp_path / "imgs", {"zebra": 200, "ant": 0, "moth": 100}, size=(28, 28))
    (root / "notes.txt").write_text("not a class")
    (root / "ant" / "readme.txt").write_text("not an image")
    data = load(ImageFolderData(dataset="image-folder", root=str(root), channels=1))
    x = data.inputs["images"]
    assert x.shape == (9, 1, 28, 28) and x.dtype == np.float32
    np.testing.assert_array_equal(np.bincount(data.labels), [3, 3, 3])
    # ant -> 0, moth -> 1, zebra -> 2, whatever order they were created in.
    for label, value in [(0, 0), (1, 100), (2, 200)]:
        np.testing.assert_allclose(x[data.labels == label], value / 255.0, atol=1e-6)


def test_image_folder_resize_crop_and_normalize(tmp_path):
    root = make_image_folder(tmp_path / "imgs", {"a": 51, "b": 204}, size=(40, 30))  # 40 wide, 30 high
    spec = ImageFolderData(dataset="image-folder", root=str(root), resize=20, crop=16,
                           mean=[0.2, 0.2, 0.2], std=[0.5, 0.5, 0.5])
    data = load(spec, inputs=[InputSpec(name="images", shape=[1, 3, 16, 16])])
    x = data.inputs["images"]
    assert x.shape == (6, 3, 16, 16)
    np.testing.assert_allclose(x[data.labels == 0], (51 / 255 - 0.2) / 0.5, atol=1e-5)
    np.testing.assert_allclose(x[data.labels == 1], (204 / 255 - 0.2) / 0.5, atol=1e-5)


def test_image_folder_keeps_the_image_content_in_place(tmp_path):
    from PIL import Image

    root = tmp_path / "imgs"
    (root / "only").mkdir(parents=True)
    array = np.zeros((8, 8, 3), np.uint8)
    array[0, :, 0] = 255  # a red top row
    Image.fromarray(array).save(root / "only" / "a.png")
    x = load(ImageFolderData(dataset="image-folder", root=str(root)),
             inputs=[InputSpec(name="images", shape=[1, 3, 8, 8])]).inputs["images"]
    assert x.shape == (1, 3, 8, 8)
    np.testing.assert_array_equal(x[0, 0, 0], np.ones(8, np.float32))
    assert float(x[0, 1:].max()) == 0.0 and float(x[0, 0, 1:].max()) == 0.0


def test_image_folder_of_mixed_sizes_needs_resize(tmp_path):
    from PIL import Image

    root = make_image_folder(tmp_path / "imgs", {"a": 10}, size=(28, 28), count=1)
    Image.new("RGB", (32, 32)).save(root / "a" / "big.png")
    with pytest.raises(InputRejected, match="different sizes"):
        load(ImageFolderData(dataset="image-folder", root=str(root)))


def test_image_folder_unreadable_image(tmp_path):
    root = make_image_folder(tmp_path / "imgs", {"a": 10}, size=(28, 28), count=1)
    (root / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(InputRejected, match="cannot read image"):
        load(ImageFolderData(dataset="image-folder", root=str(root), channels=1))


def test_image_folder_missing(tmp_path):
    with pytest.raises(InputRejected, match="does not exist"):
        load(ImageFolderData(dataset="image-folder", root=str(tmp_path / "nope")))


def test_empty_image_folder(tmp_path):
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    with pytest.raises(InputRejected, match="empty"):
        load(ImageFolderData(dataset="image-folder", root=str(tmp_path / "imgs")))


# ----------------------------------------------------------------------------------------- python


@pytest.fixture
def user_datasets(tmp_path, monkeypatch) -> str:
    name = f"user_data_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(
        """
        import numpy as np
        import torch

        class Squares:
            '''Map-style data set: sample i is an image filled with i / n, label i % k.'''

            def __init__(self, n=10, k=3, as_tensor=False):
                self.n, self.k, self.as_tensor = n, k, as_tensor

            def __len__(self):
                return self.n

            def __getitem__(self, i):
                x = np.full((1, 28, 28), i / self.n, np.float32)
                if self.as_tensor:
                    return torch.from_numpy(x), torch.tensor(i % self.k)
                return x, i % self.k

        def pairs(n=4):
            return [({"a": np.full(3, i, np.float32), "b": np.full(2, -i, np.float32)}, i) for i in range(n)]

        def stream():
            return iter([(np.zeros((1, 28, 28), np.float32), 0)])

        def not_pairs():
            return [np.zeros((1, 28, 28), np.float32)]
        """
    ))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


@pytest.mark.parametrize("as_tensor", [False, True])
def test_python_dataset(user_datasets, as_tensor):
    data = load(PythonData(dataset=f"python:{user_datasets}:Squares", kwargs={"n": 12, "as_tensor": as_tensor}))
    x = data.inputs["images"]
    assert x.shape == (12, 1, 28, 28) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, 0, 0, 0], np.arange(12) / 12, rtol=1e-6)
    np.testing.assert_array_equal(data.labels, np.arange(12) % 3)


def test_python_dataset_samples(user_datasets):
    spec = PythonData(dataset=f"python:{user_datasets}:Squares", kwargs={"n": 100}, samples=7)
    a, b, c = load(spec, seed=0), load(spec, seed=0), load(spec, seed=5)
    assert len(a) == 7
    np.testing.assert_array_equal(a.inputs["images"], b.inputs["images"])
    assert not np.array_equal(a.inputs["images"], c.inputs["images"])
    # Labels belong to their samples.
    index = np.rint(a.inputs["images"][:, 0, 0, 0] * 100).astype(int)
    np.testing.assert_array_equal(a.labels, index % 3)


def test_python_dataset_with_named_inputs(user_datasets):
    inputs = [InputSpec(name="a", shape=[1, 3]), InputSpec(name="b", shape=[1, 2])]
    data = load(PythonData(dataset=f"python:{user_datasets}:pairs"), inputs=inputs)
    np.testing.assert_array_equal(data.inputs["a"][:, 0], [0, 1, 2, 3])
    np.testing.assert_array_equal(data.inputs["b"][:, 1], [0, -1, -2, -3])


def test_python_dataset_without_len(user_datasets):
    with pytest.raises(InputRejected, match="without len"):
        load(PythonData(dataset=f"python:{user_datasets}:stream"))


def test_python_dataset_items_must_be_pairs(user_datasets):
    with pytest.raises(InputRejected, match=r"\(inputs, label\) pairs"):
        load(PythonData(dataset=f"python:{user_datasets}:not_pairs"))


def test_python_dataset_unknown_module():
    with pytest.raises(RecipeError, match="cannot import module"):
        load(PythonData(dataset="python:no_such_module_xyz:data"))


# ------------------------------------------------------------------------------------- spec checks


def test_wrong_sample_shape_shows_expected_and_received(tmp_path):
    x, y = small_arrays(shape=(1, 32, 32))
    write_npz(tmp_path / "d.npz", x=x, y=y)
    with pytest.raises(InputRejected) as info:
        load(NpzData(dataset="npz", path=str(tmp_path / "d.npz")))
    message = str(info.value)
    assert "data.eval" in message and "'images'" in message
    assert "expects samples of shape [1, 28, 28], received [1, 32, 32]" in message
    assert "channels-last" not in message


def test_channels_last_data_gets_a_hint(tmp_path):
    x, y = small_arrays(shape=(32, 32, 3))
    write_npz(tmp_path / "d.npz", x=x, y=y)
    with pytest.raises(InputRejected, match=r"received \[32, 32, 3\] \(the data looks channels-last, NHWC"):
        load(NpzData(dataset="npz", path=str(tmp_path / "d.npz")), inputs=[InputSpec(name="images", shape=[1, 3, 32, 32])])


@pytest.mark.parametrize("dtype", [np.float64, np.uint8, np.float16])
def test_wrong_dtype_is_refused(tmp_path, dtype):
    x, y = small_arrays(dtype=dtype)
    write_npz(tmp_path / "d.npz", x=x, y=y)
    with pytest.raises(InputRejected, match=f"expects dtype float32, received {np.dtype(dtype).name}"):
        load(NpzData(dataset="npz", path=str(tmp_path / "d.npz")))


def test_more_samples_than_exist(tmp_path):
    x, y = small_arrays(n=5)
    write_npz(tmp_path / "d.npz", x=x, y=y)
    with pytest.raises(InputRejected, match="asks for 6 samples but the data set has only 5"):
        load(NpzData(dataset="npz", path=str(tmp_path / "d.npz"), samples=6))
    assert len(load(NpzData(dataset="npz", path=str(tmp_path / "d.npz"), samples=5))) == 5


def test_empty_data_set(tmp_path):
    write_npz(tmp_path / "d.npz", x=np.zeros((0, 1, 28, 28), np.float32), y=np.zeros(0, np.int64))
    with pytest.raises(InputRejected, match="the data set is empty"):
        load(NpzData(dataset="npz", path=str(tmp_path / "d.npz")))


def test_data_missing_a_model_input(tmp_path):
    x, y = small_arrays()
    write_npz(tmp_path / "d.npz", x=x, y=y)
    inputs = GRAY28 + [InputSpec(name="extra", shape=[1, 4])]
    with pytest.raises(InputRejected, match=r"data provides inputs \['images'\], the model expects \['images', 'extra'\]"):
        load(NpzData(dataset="npz", path=str(tmp_path / "d.npz")), inputs=inputs)


def test_batches_cover_the_data_in_order():
    data = load(fashion(split="test", samples=70))
    seen_x, seen_y = [], []
    for batch, labels in data.batches(32):
        assert len(batch["images"]) == len(labels) <= 32
        seen_x.append(batch["images"])
        seen_y.append(labels)
    assert [len(y) for y in seen_y] == [32, 32, 6]
    np.testing.assert_array_equal(np.concatenate(seen_x), data.inputs["images"])
    np.testing.assert_array_equal(np.concatenate(seen_y), data.labels)
