"""What caching the frozen front (``cache_frozen_prefix``) saves per distillation step, on MobileNetV2.

    python benchmarks/frozen_prefix.py [--train-only '^features\\.1[4-8]\\.' '^classifier\\.'] [--batch 64]
                                       [--steps 10] [--threads 2]

The example MobileNetV2 (checkpoints/mobilenet_fashion.safetensors) with only the parameters ``--train-only``
names training, as ``distill.kd`` sets it up (frozen BatchNorm layers in eval mode, channels-last), on a batch
of real Fashion-MNIST training images at 224x224. In one process, alternating rounds:

* full step: forward through the whole network, backward, optimizer step (what every step costs without the cache);
* cached step: the same step on the trained part only, from the frozen front's output computed beforehand
  (what every step costs with the cache; the front then runs once per sample, before training).

Prints the median milliseconds of each, their ratio, and the front's forward time per batch (its one-off cost).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CHECKPOINT = REPO / "checkpoints" / "mobilenet_fashion.safetensors"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-only", nargs="+", default=[r"^features\.1[4-8]\.", r"^classifier\."])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per kind (alternating)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if not CHECKPOINT.is_file():
        print(f"{CHECKPOINT} is missing; train it first:\n  python -m optimizer.examples.train_mobilenet_fashion "
              "--out checkpoints/mobilenet_fashion.safetensors", file=sys.stderr)
        return 2

    import torch

    from optimizer.data.idx import load_fashion_mnist
    from optimizer.examples.mobilenet_fashion import DEFAULT_FASHION_ROOT, mobilenet_v2_fashion, preprocess
    from optimizer.frozen_prefix import split_frozen_prefix
    from optimizer.measure.environment import describe, fingerprint
    from optimizer.models import load_weights, read_state_dict
    from optimizer.training import _frozen_batchnorms

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = mobilenet_v2_fashion(num_classes=10)
    load_weights(model, read_state_dict(CHECKPOINT), where=str(CHECKPOINT))
    patterns = [re.compile(p) for p in args.train_only]
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(any(p.search(name) for p in patterns))
    model.to(memory_format=torch.channels_last)
    frozen_bns = _frozen_batchnorms(model)
    images, labels = load_fashion_mnist(Path(DEFAULT_FASHION_ROOT), "train")
    x = torch.from_numpy(preprocess(images[:args.batch])).contiguous(memory_format=torch.channels_last)
    y = torch.from_numpy(labels[:args.batch].astype("int64"))

    split = split_frozen_prefix(model, frozen_bns, [x[:2]], where="benchmark")
    split.prefix.eval()
    with torch.no_grad():
        front = split.prefix(x)
    front = [t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in front]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def train_mode(module) -> None:
        module.train()
        for bn in frozen_bns:
            bn.eval()

    def full_step() -> None:
        train_mode(model)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def cached_step() -> None:
        train_mode(split.suffix)
        loss = torch.nn.functional.cross_entropy(split.suffix(*front), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def front_forward() -> None:
        with torch.no_grad():
            split.prefix(x)

    kinds = {"full step": full_step, "cached step": cached_step, "front forward (once per sample)": front_forward}
    for run in kinds.values():  # warm-up
        run()
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(args.steps):
        for kind, run in kinds.items():
            start = time.perf_counter()
            run()
            times[kind].append((time.perf_counter() - start) * 1e3)
    medians = {k: statistics.median(v) for k, v in times.items()}
    print(f"Environment: {describe(fingerprint(args.threads))}")
    print(f"MobileNetV2, batch {args.batch} at 224x224, training {' '.join(args.train_only)}; "
          f"front hands {split.bytes_per_sample} bytes per sample to the trained part")
    for kind, value in medians.items():
        print(f"  {kind}: {value:.0f} ms (median of {args.steps})")
    print(f"cached / full step: {medians['cached step'] / medians['full step']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
