"""A Runtime loads an artifact and runs numpy batches; accuracy and latency both go through it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np

from optimizer.artifact import Artifact


class Runtime(ABC):
    """One per artifact form. ``run`` takes inputs by name and returns the first output."""

    name: str

    def __init__(self, artifact: Artifact, *, threads: int):
        self.artifact = artifact
        self.threads = threads

    @abstractmethod
    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray: ...

    @property
    def fixed_batch(self) -> int | None:
        """The batch size the model was compiled for, or None when the batch axis is dynamic."""
        return None

    def run_batched(self, inputs: dict[str, np.ndarray], batch_size: int) -> np.ndarray:
        """Run any number of samples, in chunks of ``batch_size`` (or the model's fixed batch)."""
        size = self.fixed_batch or batch_size
        total = len(next(iter(inputs.values())))
        outputs = [self.run({k: v[i : i + size] for k, v in inputs.items()}) for i in range(0, total, size)]
        return np.concatenate(outputs)

    def offline_runner(self, inputs: dict[str, np.ndarray]) -> Callable[[], None]:
        """A call that processes the whole batch ``inputs`` once, for the offline (throughput) scenario.

        The default runs it as one batch; a runtime with a better way to serve a batch (several streams,
        asynchronous requests) overrides this.
        """
        return lambda: self.run(inputs)

    def profile(self, inputs: dict[str, np.ndarray], iterations: int) -> dict[str, Any] | None:
        """Time per operator over ``iterations`` runs (see measure/profile.py); None when not supported."""
        return None

    def settings(self) -> dict[str, Any]:
        """Runtime settings recorded with every measurement."""
        return {"runtime": self.name, "threads": self.threads}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources; the default does nothing."""


RUNTIME_BY_FORM = {
    "torch": "optimizer.runtimes.torch_eager:TorchEagerRuntime",
    "onnx": "optimizer.runtimes.onnxruntime_cpu:OnnxRuntime",
    "openvino": "optimizer.runtimes.openvino_cpu:OpenVinoRuntime",
    "tensorrt": "optimizer.runtimes.tensorrt_gpu:TensorRTRuntime",
}


def open_runtime(artifact: Artifact, *, threads: int, options: dict[str, Any] | None = None) -> Runtime:
    """Open the runtime an artifact of this form is deployed on."""
    from optimizer.errors import RecipeError
    from optimizer.registry import import_object

    target = RUNTIME_BY_FORM.get(artifact.form)
    if target is None:
        raise RecipeError(f"{artifact.path}: no runtime for the '{artifact.form}' form in this version")
    cls = import_object(target, where=f"runtime for {artifact.form}")
    # Options are keyed by form ({"onnx": {"providers": [...]}}): each runtime takes only its own.
    return cls(artifact, threads=threads, **(options or {}).get(artifact.form, {}))  # type: ignore[operator]
