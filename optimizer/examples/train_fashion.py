"""Train the reference ``small_resnet`` on Fashion-MNIST and save a safetensors checkpoint.

    python -m optimizer.examples.train_fashion --out checkpoints/fashion_resnet.safetensors

Writes ``<out>`` (the state dict) and ``<out>.json`` (how to rebuild the model and feed it: factory,
kwargs, input normalization, plus epochs, seed, test accuracy and training seconds). A recipe that
evaluates this checkpoint must normalize inputs with the same mean/std recorded in the sidecar.

Only torch and numpy are imported at module import; safetensors is imported when saving.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from optimizer.data.idx import load_fashion_mnist
from optimizer.examples.checkpoint_io import save_checkpoint
from optimizer.zoo import small_resnet

FACTORY = "optimizer.zoo:small_resnet"
MODEL_KWARGS: dict[str, Any] = {"num_classes": 10, "in_channels": 1, "width": 24, "blocks": [1, 1, 1]}
# Pixels are scaled to [0, 1], then (x - MEAN) / STD: the Fashion-MNIST train-set statistics.
MEAN = 0.2860
STD = 0.3530
DEFAULT_ROOT = Path(os.environ.get("FASHION_MNIST_ROOT", "/usr/share/datasets/fashion-mnist"))
DEFAULT_EPOCHS = 3
# Small batches: in a 3-epoch budget more optimizer steps beat better-averaged gradients.
BATCH_SIZE = 64
MAX_LR = 3e-3
WEIGHT_DECAY = 0.05
EVAL_BATCH = 1000


def normalize(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float32 [N, 1, 28, 28], scaled to [0, 1] then standardized."""
    x = torch.from_numpy(images).to(torch.float32).div_(255.0)
    return x.sub_(MEAN).div_(STD).unsqueeze(1)


@torch.inference_mode()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in eval mode (BatchNorm running statistics)."""
    model.eval()
    correct = 0
    for start in range(0, len(images), EVAL_BATCH):
        x = images[start:start + EVAL_BATCH].contiguous(memory_format=torch.channels_last)
        correct += int((model(x).argmax(1) == labels[start:start + EVAL_BATCH]).sum())
    return correct / len(images)


def train_fashion_resnet(out: Path, *, epochs: int = DEFAULT_EPOCHS, seed: int = 0, root: Path = DEFAULT_ROOT,
                         threads: int = 2, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train ``small_resnet(**MODEL_KWARGS)``, save ``out`` and ``<out>.json``, return the sidecar dict."""
    out = Path(out)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)

    train_x, train_y = load_fashion_mnist(Path(root), "train")
    test_x, test_y = load_fashion_mnist(Path(root), "test")
    train_images, train_labels = normalize(train_x), torch.from_numpy(train_y)
    test_images, test_labels = normalize(test_x), torch.from_numpy(test_y)

    model = small_resnet(**MODEL_KWARGS)
    # channels_last makes oneDNN convolutions ~30% faster for training on CPU; the saved
    # state dict is converted back to contiguous tensors below.
    model = model.to(memory_format=torch.channels_last)
    # No weight decay on BN parameters and biases: decaying them only hurts at this scale.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    # AdamW rather than SGD: with only a few epochs it converges faster and is far less
    # sensitive to the peak learning rate (SGD at lr 0.1 stalled near 89% in 3 epochs).
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=MAX_LR)
    steps_per_epoch = len(train_images) // BATCH_SIZE  # drop the ragged last batch
    # OneCycle: warm-up then cosine anneal to ~0 is what makes a 3-epoch schedule converge.
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=MAX_LR, epochs=epochs,
                                                    steps_per_epoch=steps_per_epoch, pct_start=0.2)

    log(f"training small_resnet{MODEL_KWARGS} on {len(train_images)} images, {epochs} epochs, "
        f"batch {BATCH_SIZE}, {threads} threads, seed {seed}")
    started = time.perf_counter()
    accuracy = 0.0
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.from_numpy(rng.permutation(len(train_images)))
        total_loss = 0.0
        for step in range(steps_per_epoch):
            index = order[step * BATCH_SIZE:(step + 1) * BATCH_SIZE]
            # No augmentation: in a few epochs this model underfits, so extra regularization only costs accuracy.
            x = train_images[index].contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(x), train_labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.detach().item()
        accuracy = evaluate(model, test_images, test_labels)
        log(f"epoch {epoch}/{epochs}  loss {total_loss / steps_per_epoch:.4f}  "
            f"test acc {accuracy:.4f}  elapsed {time.perf_counter() - started:.1f}s")
    train_seconds = time.perf_counter() - started

    info: dict[str, Any] = {
        "factory": FACTORY,
        "kwargs": MODEL_KWARGS,
        "normalization": {"scale": 1.0 / 255.0, "mean": MEAN, "std": STD},
        "input_shape": [1, 1, 28, 28],
        "epochs": epochs,
        "seed": seed,
        "test_accuracy": accuracy,
        "train_seconds": round(train_seconds, 1),
    }
    sidecar = save_checkpoint(model, out, info)
    log(f"saved {out} and {sidecar.name}: test accuracy {accuracy:.4f}, {train_seconds:.1f}s training")
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="checkpoint path (.safetensors)")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="Fashion-MNIST IDX folder")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    train_fashion_resnet(args.out, epochs=args.epochs, seed=args.seed, root=args.root, threads=args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
