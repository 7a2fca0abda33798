"""Latency on the data's real inputs (evaluate.latency.inputs) and across input sizes (evaluate.latency.shapes).

The timed runtime is the real one (PyTorch eager on the example ResNet, trained on Fashion-MNIST); a thin
wrapper records what each timed call received, so the tests check which inputs were timed, never how fast.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import quickstart_dict

QUICK = {"mode": "quick", "trials": 1, "warmup_s": 0.0, "min_iterations": 10, "min_duration_s": 0.0,
         "max_duration_s": 5.0}


class Recording:
    """The real runtime, with every input it is handed kept (copied) for the test to read back."""

    def __init__(self, runtime) -> None:
        self.runtime = runtime
        self.seen: list[dict[str, np.ndarray]] = []

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        self.seen.append({name: np.array(array) for name, array in inputs.items()})
        return self.runtime.run(inputs)


@pytest.fixture(scope="module")
def eager_runtime(example_checkpoint: Path, tmp_path_factory):
    from optimizer.baseline import make_baseline
    from optimizer.recipe import load_recipe
    from optimizer.runtimes.base import open_runtime

    loaded = load_recipe(quickstart_dict(example_checkpoint))
    artifact = make_baseline(loaded, tmp_path_factory.mktemp("baseline") / "baseline").finalize()
    runtime = open_runtime(artifact, threads=1)
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def eval_images() -> dict[str, np.ndarray]:
    from optimizer.data.datasets import load_fashion_mnist_split
    from optimizer.recipe import FashionMnistData

    spec = FashionMnistData(dataset="fashion-mnist", split="test", samples=37, mean=[0.2860], std=[0.3530])
    x, _ = load_fashion_mnist_split(spec, Path("."), 0, where="data.eval")
    return {"images": x}


def _index_of(sample: np.ndarray, pool: np.ndarray) -> int:
    matches = np.flatnonzero((pool == sample).reshape(len(pool), -1).all(axis=1))
    assert len(matches) >= 1, "the timed runtime received an input that is no eval sample"
    return int(matches[0])


def test_eval_inputs_time_every_eval_sample_round_robin_in_a_seeded_order(eager_runtime, eval_images) -> None:
    from optimizer.measure.worker import time_latency

    recording = Recording(eager_runtime)
    latency, raw = time_latency(recording, eval_images, {**QUICK, "inputs": "eval"}, 1, seed=5)
    images = eval_images["images"]
    seen = [_index_of(s["images"][0], images) for s in recording.seen]
    assert all(s["images"].shape == (1, *images.shape[1:]) for s in recording.seen)
    # Warm-up and timed calls walk one permutation of the eval set, again and again.
    order = np.random.default_rng(5).permutation(len(images))
    assert seen == [int(order[i % len(images)]) for i in range(len(seen))]
    assert len(seen) > len(images) and set(seen) == set(range(len(images)))
    assert latency["inputs"] == "eval" and latency["input_samples"] == len(images)
    assert latency["batch_size"] == 1 and len(raw) == latency["iterations"]
    # Another seed, another order.
    other = Recording(eager_runtime)
    time_latency(other, eval_images, {**QUICK, "inputs": "eval"}, 1, seed=6)
    assert [_index_of(s["images"][0], images) for s in other.seen][:len(images)] != seen[:len(images)]


def test_fixed_inputs_time_one_batch_again_and_again(eager_runtime, eval_images) -> None:
    from optimizer.measure.worker import time_latency

    recording = Recording(eager_runtime)
    latency, _ = time_latency(recording, eval_images, QUICK, 1, seed=5)
    seen = {_index_of(s["images"][0], eval_images["images"]) for s in recording.seen}
    assert len(seen) == 1 and latency["inputs"] == "fixed" and "input_samples" not in latency


def test_eval_inputs_at_a_larger_batch_cycle_batches_of_eval_samples(eager_runtime, eval_images) -> None:
    from optimizer.measure.worker import time_latency

    recording = Recording(eager_runtime)
    latency, _ = time_latency(recording, eval_images, {**QUICK, "inputs": "eval"}, 4, seed=5)
    images = eval_images["images"]
    batches = [tuple(_index_of(row, images) for row in s["images"]) for s in recording.seen]
    assert all(len(b) == 4 for b in batches)
    distinct = sorted(set(batches))
    assert len(distinct) == len(images) // 4  # 9 batches of 4 from 37 samples, cycled
    assert len({i for b in distinct for i in b}) == 36 and latency["input_samples"] == 36
