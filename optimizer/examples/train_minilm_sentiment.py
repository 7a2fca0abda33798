"""Fine-tune the MiniLM sentiment classifier on the Rotten Tomatoes train split and save a safetensors checkpoint.

    python -m optimizer.examples.train_minilm_sentiment --out checkpoints/minilm_sentiment.safetensors

Starts from the pretrained all-MiniLM-L6-v2 encoder (optimizer/examples/minilm_sentiment.py), trains its
last ``--trainable-layers`` Transformer layers and the linear head on the 10,201 train snippets, then
reports top-1 accuracy on the 2,551 held-out test snippets. Writes ``<out>`` (the full state dict, so the
recipe's factory + checkpoint rebuild the model) and ``<out>.json`` (factory, kwargs, data split, seed,
test accuracy, seconds).

Why only the top layers: a CPU run must stay within a few minutes, and the full encoder's backward pass
costs about three forward passes per epoch. The frozen lower layers are run once over the train split and
their output is cached; each epoch then runs only the trainable layers. Batches are grouped by length and
padded to the longest snippet in the batch (27 word pieces on average instead of 64): padding is masked
out, so no result changes, and less than half the tokens are computed.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from optimizer.examples.checkpoint_io import save_checkpoint
from optimizer.examples.minilm_sentiment import (
    DEFAULT_MAX_LENGTH,
    TEST_FRACTION,
    MiniLMClassifier,
    data_sha256,
    find_rotten_tomatoes,
    minilm_classifier,
    rotten_tomatoes,
)

FACTORY = "optimizer.examples.minilm_sentiment:minilm_classifier"
DATASET = "python:optimizer.examples.minilm_sentiment:rotten_tomatoes"
NUM_LAYERS = 6
DEFAULT_TRAINABLE_LAYERS = 2
DEFAULT_EPOCHS = 2
BATCH_SIZE = 64
# Pretrained layers move little (lower rate); the fresh head starts from random and needs more.
ENCODER_LR = 2e-4
HEAD_LR = 3e-3
WEIGHT_DECAY = 0.01
EVAL_BATCH = 128


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (ids or hidden states, attention mask, labels)


def length_batches(input_ids: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray, batch_size: int,
                   rng: np.random.Generator | None = None) -> list[Batch]:
    """Batches of similar length, each trimmed to its longest sequence (padding is masked, so no result changes).

    With ``rng``, snippets of equal length are shuffled before sorting, so batch composition varies with the
    seed; without, the order is deterministic (evaluation).
    """
    lengths = attention_mask.sum(1)
    tie_break = rng.permutation(len(lengths)) if rng is not None else np.arange(len(lengths))
    order = tie_break[np.argsort(lengths[tie_break], kind="stable")]
    batches = []
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        width = int(lengths[index].max())
        batches.append((torch.from_numpy(input_ids[index, :width]), torch.from_numpy(attention_mask[index, :width]),
                        torch.from_numpy(labels[index])))
    return batches


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, L] 0/1 mask -> [B, 1, 1, L] additive mask (0 keeps a key, the dtype's minimum removes it).

    The form BertModel hands its layers for both eager and SDPA attention, so a slice of layers can be run
    on cached hidden states exactly as inside the full model.
    """
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def run_layers(model: MiniLMClassifier, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int,
               stop: int) -> torch.Tensor:
    mask = additive_mask(attention_mask, hidden.dtype)
    for layer in model.encoder.encoder.layer[start:stop]:
        out = layer(hidden, attention_mask=mask)
        hidden = out[0] if isinstance(out, tuple) else out  # a tuple in transformers 4, a tensor in 5
    return hidden


def pool_and_classify(model: MiniLMClassifier, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The classifier's forward after the encoder: masked mean pooling, dropout, head (as in its forward)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return model.head(model.dropout((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)))


@torch.no_grad()
def cache_frozen(model: MiniLMClassifier, batches: list[Batch], frozen_layers: int,
                 log: Callable[[str], None]) -> list[Batch]:
    """Embeddings + the first ``frozen_layers`` layers, run once (eval mode, no dropout) per batch."""
    model.eval()
    cached = []
    started = time.perf_counter()
    for i, (ids, mask, labels) in enumerate(batches):
        hidden = model.encoder.embeddings(input_ids=ids)
        cached.append((run_layers(model, hidden, mask, 0, frozen_layers), mask, labels))
        if (i + 1) % 50 == 0:
            log(f"  frozen layers: {i + 1}/{len(batches)} batches, {time.perf_counter() - started:.0f}s")
    return cached


@torch.inference_mode()
def evaluate(model: torch.nn.Module, input_ids: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of the whole model's forward (eval mode) on length-grouped batches."""
    model.eval()
    correct = 0
    for ids, mask, y in length_batches(input_ids, attention_mask, labels, EVAL_BATCH):
        correct += int((model(ids, mask).argmax(1) == y).sum())
    return correct / len(labels)


def train_minilm_sentiment(out: Path, *, epochs: int = DEFAULT_EPOCHS,
                           trainable_layers: int = DEFAULT_TRAINABLE_LAYERS, seed: int = 0, split_seed: int = 0,
                           max_length: int = DEFAULT_MAX_LENGTH, threads: int = 2,
                           train_samples: int | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fine-tune, save ``out`` and ``<out>.json``, and return the sidecar dict (with ``test_accuracy``)."""

    if not 0 <= trainable_layers <= NUM_LAYERS:
        raise ValueError(f"--trainable-layers must be in 0..{NUM_LAYERS}, not {trainable_layers}")
    if epochs < 1:
        raise ValueError(f"--epochs must be at least 1, not {epochs}")
    out = Path(out)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    # CPU seconds as well as wall seconds: on a shared machine the wall time mostly measures the neighbours,
    # while CPU seconds / threads roughly estimates the run on idle cores.
    cpu_started = time.process_time()

    train = rotten_tomatoes("train", max_length=max_length, seed=split_seed)
    test = rotten_tomatoes("test", max_length=max_length, seed=split_seed)
    train_index = np.arange(len(train))
    if train_samples is not None and train_samples < len(train):
        train_index = np.sort(rng.choice(len(train), train_samples, replace=False))

    # SDPA (PyTorch's fused attention) computes the same function as "eager"; the weights do not depend on
    # it, and the recipe rebuilds the model with the default "eager", whose export is plain MatMul/Softmax.
    model = minilm_classifier(num_classes=2, max_length=max_length, pretrained=True, attn_implementation="sdpa")
    frozen_layers = NUM_LAYERS - trainable_layers
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    trainable = [*model.encoder.encoder.layer[frozen_layers:].parameters()]
    for parameter in [*trainable, *model.head.parameters()]:
        parameter.requires_grad_(True)

    log(f"fine-tuning MiniLM-L6 (last {trainable_layers} of {NUM_LAYERS} layers + head) on {len(train_index)} "
        f"Rotten Tomatoes snippets, {epochs} epoch(s), batch {BATCH_SIZE}, {threads} threads, seed {seed}")
    batches = length_batches(train.input_ids[train_index], train.attention_mask[train_index],
                             train.labels[train_index], BATCH_SIZE, rng)
    cached = cache_frozen(model, batches, frozen_layers, log)
    cache_seconds = time.perf_counter() - started
    log(f"  frozen layers cached: {cache_seconds:.0f}s")

    optimizer = torch.optim.AdamW([{"params": trainable, "lr": ENCODER_LR},
                                   {"params": model.head.parameters(), "lr": HEAD_LR}], weight_decay=WEIGHT_DECAY)
    # Short warm-up then cosine decay: one or two epochs converge without a tuned step count.
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[ENCODER_LR, HEAD_LR],
                                                    total_steps=epochs * len(cached), pct_start=0.1)
    for epoch in range(1, epochs + 1):
        model.train()  # dropout in the trainable layers and before the head
        total_loss = 0.0
        for step, b in enumerate(rng.permutation(len(cached)), start=1):
            hidden, mask, labels = cached[b]
            hidden = run_layers(model, hidden, mask, frozen_layers, NUM_LAYERS)
            loss = F.cross_entropy(pool_and_classify(model, hidden, mask), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item()
            if step % 100 == 0:
                log(f"  epoch {epoch}: step {step}/{len(cached)}  loss {total_loss / step:.4f}  "
                    f"elapsed {time.perf_counter() - started:.0f}s")
        log(f"epoch {epoch}/{epochs}  loss {total_loss / len(cached):.4f}  elapsed {time.perf_counter() - started:.0f}s")
    del cached
    train_seconds = time.perf_counter() - started

    accuracy = evaluate(model, test.input_ids, test.attention_mask, test.labels)
    total_seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started
    log(f"held-out test accuracy {accuracy:.4f} on {len(test)} snippets "
        f"(training {train_seconds:.0f}s, with evaluation {total_seconds:.0f}s wall, {cpu_seconds:.0f} CPU-s)")

    info: dict[str, Any] = {
        "factory": FACTORY,
        # pretrained: false, because the checkpoint holds every weight; the encoder files are not read twice.
        "kwargs": {"num_classes": 2, "max_length": max_length, "pretrained": False},
        "inputs": [{"name": "input_ids", "shape": [1, max_length], "dtype": "int64"},
                   {"name": "attention_mask", "shape": [1, max_length], "dtype": "int64"}],
        "labels": {"0": "rotten", "1": "fresh"},
        "data": {"dataset": DATASET, "file": find_rotten_tomatoes().name, "csv_sha256": data_sha256(),
                 "split_seed": split_seed, "test_fraction": TEST_FRACTION, "train": len(train_index),
                 "test": len(test)},
        "trainable_layers": trainable_layers,
        "epochs": epochs,
        "batch_size": BATCH_SIZE,
        "seed": seed,
        "threads": threads,
        "test_accuracy": accuracy,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(total_seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),
    }
    sidecar = save_checkpoint(model, out, info)
    log(f"saved {out} and {sidecar.name}")
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="checkpoint path (.safetensors)")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--trainable-layers", type=int, default=DEFAULT_TRAINABLE_LAYERS,
                        help=f"top Transformer layers trained with the head (0..{NUM_LAYERS}; 0: head only)")
    parser.add_argument("--seed", type=int, default=0, help="initialization and batch order")
    parser.add_argument("--split-seed", type=int, default=0, help="train/test partition (keep the recipe's)")
    parser.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH)
    parser.add_argument("--train-samples", type=int, default=None, help="train on a seeded subset (quick runs)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        train_minilm_sentiment(args.out, epochs=args.epochs, trainable_layers=args.trainable_layers, seed=args.seed,
                               split_seed=args.split_seed, max_length=args.max_length, threads=args.threads,
                               train_samples=args.train_samples)
    except (FileNotFoundError, ImportError, ValueError) as exc:
        parser.exit(2, f"error: {exc}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
