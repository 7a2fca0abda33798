"""onnxruntime with the CPU execution provider."""

from __future__ import annotations

from typing import Any

import numpy as np

from optimizer.artifact import Artifact
from optimizer.runtimes.base import Runtime


PROVIDER_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                  "tensorrt": "TensorrtExecutionProvider"}


def session_providers(requested: list[str], available: list[str]) -> list[str]:
    """onnxruntime provider names for the recipe's list, CPU last as the fallback for unsupported nodes.

    A provider the recipe asks for but this onnxruntime lacks is an error, not a silent CPU run: the
    report would otherwise show CPU figures under a GPU label.
    """
    from optimizer.errors import MissingDependency

    names = []
    for short in requested:
        name = PROVIDER_NAMES[short]
        if name not in available:
            raise MissingDependency(
                f"onnxruntime has no {name} here (available: {', '.join(available)}); install onnxruntime-gpu "
                "on a machine with an NVIDIA GPU (and TensorRT for 'tensorrt'), or set "
                "evaluate.onnxruntime.providers to [cpu]"
            )
        names.append(name)
    if "CPUExecutionProvider" not in names:
        names.append("CPUExecutionProvider")
    return names


class OnnxRuntime(Runtime):
    name = "onnxruntime"

    def __init__(self, artifact: Artifact, *, threads: int, graph_optimization: str = "all",
                 providers: list[str] | None = None):
        super().__init__(artifact, threads=threads)
        import onnxruntime as ort

        from optimizer.models import check_onnx_external_data

        # Checked again here: an artifact folder may have been edited since it was written.
        check_onnx_external_data(artifact.entry_path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }[graph_optimization]
        self._graph_optimization = graph_optimization
        self._providers = session_providers(providers or ["cpu"], ort.get_available_providers())
        self.session = ort.InferenceSession(str(artifact.entry_path), options, providers=self._providers)
        self._version = ort.__version__
        self._names = [i.name for i in self.session.get_inputs()]
        self._output = self.session.get_outputs()[0].name
        expected = [spec.name for spec in artifact.inputs]
        if sorted(self._names) != sorted(expected):
            from optimizer.errors import InputRejected

            raise InputRejected(
                f"{artifact.entry_path}: model inputs {self._names} differ from the recipe's inputs {expected}"
            )

    @property
    def fixed_batch(self) -> int | None:
        first = self.session.get_inputs()[0].shape[0]
        return first if isinstance(first, int) else None

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([self._output], {name: inputs[name] for name in self._names})[0]

    def profile(self, inputs: dict[str, np.ndarray], iterations: int) -> dict[str, Any] | None:
        import json
        import tempfile
        from pathlib import Path

        import onnxruntime as ort

        from optimizer.measure.profile import summarize_profile

        # A separate session: profiling slows every run, and the measured session must stay untouched.
        with tempfile.TemporaryDirectory(prefix="ort-profile-") as folder:
            options = ort.SessionOptions()
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            options.graph_optimization_level = self.session.get_session_options().graph_optimization_level
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(folder) / "profile")
            session = ort.InferenceSession(str(self.artifact.entry_path), options, providers=self._providers)
            feed = {name: inputs[name] for name in self._names}
            for _ in range(iterations + 1):
                session.run([self._output], feed)
            events = json.loads(Path(session.end_profiling()).read_text())
        # Each executed node logs an event named '<node>_kernel_time' with its op type and duration (us).
        kernels = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
        if not kernels:
            return None
        per_run = len(kernels) // (iterations + 1)
        entries = [(e["name"][: -len("_kernel_time")], e.get("args", {}).get("op_name", "?"), float(e["dur"]))
                   for e in kernels[per_run:]]  # the first run is warm-up (allocations, caches)
        return summarize_profile("onnxruntime", entries, iterations)

    def settings(self) -> dict[str, Any]:
        return {
            "runtime": self.name,
            "threads": self.threads,
            "providers": self.session.get_providers(),
            "graph_optimization": self._graph_optimization,
            "onnxruntime": self._version,
        }
