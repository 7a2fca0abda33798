"""Shared fixtures: the built-in example checkpoint (trained here on real Fashion-MNIST) and recipes."""

from __future__ import annotations

import os
import signal
import shutil
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
FASHION_ROOT = Path(os.environ.get("FASHION_MNIST_ROOT", "/usr/share/datasets/fashion-mnist"))
EXAMPLE_CHECKPOINT = REPO / "checkpoints" / "fashion_resnet.safetensors"


def pytest_collection_modifyitems(config, items):
    if not (FASHION_ROOT / "t10k-images-idx3-ubyte.gz").is_file():
        raise pytest.UsageError(
            f"Fashion-MNIST not found in {FASHION_ROOT}: install the Debian package dataset-fashion-mnist "
            "(scripts/test.sh does) or set FASHION_MNIST_ROOT"
        )


@pytest.fixture(scope="session")
def example_checkpoint() -> Path:
    """The quick start's checkpoint; trained once (a few minutes on 2 cores) when it is not there yet."""
    if not EXAMPLE_CHECKPOINT.is_file():
        from optimizer.examples.train_fashion import train_fashion_resnet

        train_fashion_resnet(EXAMPLE_CHECKPOINT, root=FASHION_ROOT)
    return EXAMPLE_CHECKPOINT


@pytest.fixture(scope="session")
def example_onnx(example_checkpoint: Path, tmp_path_factory) -> Path:
    """The example exported to ONNX once per session, for the tests of the passes that take ONNX."""
    from optimizer import run_recipe

    recipe = quickstart_dict(example_checkpoint, eval_samples=1000)
    recipe["stages"] = [{"name": "export", "pass": "export.onnx"}]
    out = tmp_path_factory.mktemp("exported") / "out"
    run_recipe(recipe, out=out)
    return out / "final" / "model.onnx"


def quickstart_dict(checkpoint: Path, *, quick: bool = True, eval_samples: int | None = 2000) -> dict:
    """The quick start recipe as a mapping, pointed at ``checkpoint``, with test-sized measurement."""
    recipe = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    recipe["model"]["checkpoint"] = str(checkpoint)
    if quick:
        recipe["evaluate"]["latency"]["mode"] = "quick"
    if eval_samples is not None:
        recipe["data"]["eval"]["samples"] = eval_samples
    return recipe


def write_recipe(folder: Path, recipe: dict, name: str = "recipe.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    """Untrained small_resnet weights: for tests of plumbing that claim no accuracy."""
    import torch
    from safetensors.torch import save_file

    from optimizer.zoo import small_resnet

    torch.manual_seed(0)
    model = small_resnet()
    path = tmp_path / "untrained.safetensors"
    save_file({k: v.contiguous().clone() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture
def clean_copy(tmp_path: Path):
    def copy(path: Path) -> Path:
        target = tmp_path / path.name
        shutil.copytree(path, target) if path.is_dir() else shutil.copyfile(path, target)
        return target

    return copy


def default_sigint() -> None:
    """In the child, before exec: SIGINT delivered and handled by default, as under a terminal.

    A process started with SIGINT ignored (a background job of a non-interactive shell) or blocked passes
    that on to its children, and Python keeps it: the child would never see the test's Ctrl-C.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
