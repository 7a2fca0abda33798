"""PyTorch eager execution on the CPU."""

from __future__ import annotations

from typing import Any

import numpy as np

from optimizer.artifact import Artifact
from optimizer.runtimes.base import Runtime


def load_torch_module(artifact: Artifact):
    """Rebuild the module of a torch artifact: factory (+ structure patch) + safetensors weights, or an
    exported program."""
    from optimizer.models import build_architecture, load_program, load_weights, read_state_dict

    kind = artifact.meta.get("kind")
    if kind == "factory":
        module = build_architecture(artifact.meta["factory"], artifact.meta.get("kwargs", {}),
                                    where=f"{artifact.path}: factory")
        state = read_state_dict(artifact.entry_path)
        if artifact.meta.get("structure"):
            # A pruned model: reshape the fresh build to the stored structure before loading weights.
            from optimizer.torch_structure import apply_structure

            apply_structure(module, artifact.meta["structure"], {k: tuple(v.shape) for k, v in state.items()})
        load_weights(module, state, where=str(artifact.entry_path))
    elif kind == "program":
        module = load_program(artifact.entry_path)
    else:
        raise ValueError(f"{artifact.path}: unknown torch artifact kind {kind!r}")
    return module.eval() if hasattr(module, "eval") and kind == "factory" else module


class TorchEagerRuntime(Runtime):
    name = "torch-eager"

    def __init__(self, artifact: Artifact, *, threads: int):
        super().__init__(artifact, threads=threads)
        import torch

        torch.set_num_threads(threads)
        self._torch = torch
        self.module = load_torch_module(artifact)
        self._names = [spec.name for spec in artifact.inputs]

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            args = [torch.from_numpy(np.ascontiguousarray(inputs[name])) for name in self._names]
            out = self.module(*args)
        if isinstance(out, (tuple, list)):
            out = out[0]
        elif isinstance(out, dict):
            out = next(iter(out.values()))
        return out.detach().numpy()

    def profile(self, inputs: dict[str, np.ndarray], iterations: int) -> dict[str, Any] | None:
        from torch.profiler import ProfilerActivity, profile

        from optimizer.measure.profile import summarize_profile

        self.run(inputs)  # outside the profile: first-call allocations are not the model's steady state
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(iterations):
                self.run(inputs)
        # Self time: an aten op's own time without its children, so nested ops are not counted twice.
        entries = [(event.key, event.key, float(event.self_cpu_time_total)) for event in prof.key_averages()
                   if event.self_cpu_time_total > 0]
        return summarize_profile("torch.profiler", entries, iterations)

    def settings(self) -> dict[str, Any]:
        torch = self._torch
        return {"runtime": self.name, "threads": torch.get_num_threads(), "torch": torch.__version__}
