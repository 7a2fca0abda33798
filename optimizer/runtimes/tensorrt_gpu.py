"""TensorRT on an NVIDIA GPU, with torch providing device memory, streams and events.

The engine is deserialized only after ``engine.json`` says it was built with this TensorRT for this GPU
and its bytes hash to the recorded sha256; otherwise it is rebuilt from the artifact's ``source.onnx``
(and cached for this machine). Inputs are copied to the GPU as torch tensors, bound by address, and run
with ``execute_async_v3`` on a torch CUDA stream. ``tensorrt`` and ``torch.cuda`` are only touched when a
runtime is opened.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from optimizer.artifact import Artifact
from optimizer.errors import InputRejected, StageError
from optimizer.runtimes.base import Runtime
from optimizer.tensorrt_support import (
    EngineManifest,
    HostInfo,
    current_gpu,
    make_tensorrt_logger,
    require_cuda_gpu,
    require_tensorrt,
    resolve_engine,
)

if TYPE_CHECKING:
    import torch

# TensorRT DataType member name -> torch dtype name.
TENSORRT_TO_TORCH_DTYPE = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT8": "int8",
    "UINT8": "uint8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
}


def time_cuda_events(fn: Callable[[], object], *, iterations: int = 200, warmup: int = 20,
                     stream: "torch.cuda.Stream | None" = None) -> list[float]:
    """Milliseconds of GPU time per call of ``fn``, measured with CUDA events on ``stream``.

    ``fn`` must enqueue its work on ``stream`` (the current stream when None) without waiting for it;
    events bracket each call, so host overhead between calls is not counted.
    """
    import torch

    stream = stream or torch.cuda.current_stream()
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iterations):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        times.append(float(start.elapsed_time(end)))
    return times


class TensorRTRuntime(Runtime):
    name = "tensorrt"

    def __init__(self, artifact: Artifact, *, threads: int, device: int = 0, cache_dir: str | None = None):
        super().__init__(artifact, threads=threads)
        stage = str(artifact.lineage.get("stage") or artifact.path.name)
        trt = require_tensorrt(stage, what="the TensorRT runtime")
        require_cuda_gpu(stage, what="the TensorRT runtime")
        import torch

        self._trt = trt
        self._torch = torch
        self.device = torch.device("cuda", device)
        # TensorRT works on the current CUDA device; make it the one we allocate on.
        torch.cuda.set_device(self.device)
        gpu_name, cc = current_gpu(device)
        self.host = HostInfo(str(trt.__version__), gpu_name, cc)

        def rebuild(manifest: EngineManifest, source: Path) -> bytes:
            from optimizer.passes.compile_tensorrt import build_engine

            return build_engine(source, manifest.settings, stage=stage).data

        resolved = resolve_engine(artifact.path, self.host, rebuild=rebuild,
                                  cache_dir=Path(cache_dir) if cache_dir else None)
        self.manifest = resolved.manifest
        self.origin = resolved.origin
        self.reason = resolved.reason

        self._logger = make_tensorrt_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(resolved.data)
        if self.engine is None:
            cause = self._logger.errors[-1] if self._logger.errors else "deserialize_cuda_engine returned None"
            raise StageError(f"stage '{stage}': TensorRT could not load the engine ({cause}); re-run the stage")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(device=self.device)

        self._inputs: list[str] = []
        self._outputs: list[str] = []
        self._dtypes: dict[str, torch.dtype] = {}
        for index in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(index)
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self._inputs.append(name)
            else:
                self._outputs.append(name)
            dtype = self.engine.get_tensor_dtype(name)
            torch_name = TENSORRT_TO_TORCH_DTYPE.get(getattr(dtype, "name", str(dtype).rsplit(".", 1)[-1]))
            if torch_name is None:
                raise InputRejected(f"{artifact.path}: engine tensor '{name}' has type {dtype}, which this runtime "
                                    "cannot bind")
            self._dtypes[name] = getattr(torch, torch_name)
        expected = sorted(spec.name for spec in artifact.inputs)
        if sorted(self._inputs) != expected:
            raise InputRejected(f"{artifact.path}: engine inputs {sorted(self._inputs)} differ from the recipe's "
                                f"inputs {expected}")
        first = self.manifest.outputs[0] if self.manifest.outputs else None
        self._output = first if first in self._outputs else self._outputs[0]
        self._min_batch = max(p.min[0] for p in self.manifest.profiles)
        self._max_batch = min(p.max[0] for p in self.manifest.profiles)

    # -- execution --------------------------------------------------------------------------------
    def execute_device(self, inputs: dict[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
        """Enqueue one inference on ``self.stream`` for inputs already on the GPU; does not wait.

        Outputs are allocated on the same stream, so the caching allocator orders their reuse after the
        kernels that write them.
        """
        torch = self._torch
        context = self.context
        # Inputs may come from the caller's stream: order this inference after that work.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            bound = {}
            for name in self._inputs:
                tensor = inputs[name]
                if tensor.dtype != self._dtypes[name] or not tensor.is_contiguous():
                    tensor = tensor.to(self._dtypes[name]).contiguous()
                if not context.set_input_shape(name, tuple(tensor.shape)):
                    raise InputRejected(f"{self.artifact.path}: input '{name}' of shape {tuple(tensor.shape)} is "
                                        "outside the engine's optimization profile (see engine.json)")
                context.set_tensor_address(name, tensor.data_ptr())
                bound[name] = tensor
            outputs = {}
            for name in self._outputs:
                shape = tuple(context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise StageError(f"{self.artifact.path}: output '{name}' has a data-dependent shape {shape}, "
                                     "which this runtime does not support")
                out = torch.empty(shape, dtype=self._dtypes[name], device=self.device)
                context.set_tensor_address(name, out.data_ptr())
                outputs[name] = out
            if not context.execute_async_v3(self.stream.cuda_stream):
                raise StageError(f"{self.artifact.path}: TensorRT execute_async_v3 failed")
        self._bound = bound  # keep converted inputs alive until the next call
        return outputs

    def _run_chunk(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        torch = self._torch
        with torch.cuda.stream(self.stream):
            device_inputs = {
                name: torch.from_numpy(np.ascontiguousarray(arrays[name])).to(self.device, dtype=self._dtypes[name])
                for name in self._inputs
            }
        outputs = self.execute_device(device_inputs)
        with torch.cuda.stream(self.stream):
            result = outputs[self._output].float().cpu()  # .cpu() waits for the stream
        return result.numpy()

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Any batch size: split above the profile's max batch, padded (then trimmed) below its min."""
        total = len(next(iter(inputs.values())))
        results = []
        for start in range(0, total, self._max_batch):
            part = {name: array[start : start + self._max_batch] for name, array in inputs.items()}
            count = len(next(iter(part.values())))
            if count < self._min_batch:
                part = {name: np.concatenate([a, np.repeat(a[-1:], self._min_batch - count, axis=0)])
                        for name, a in part.items()}
            results.append(self._run_chunk(part)[:count])
        return results[0] if len(results) == 1 else np.concatenate(results)

    def settings(self) -> dict[str, Any]:
        return {
            "runtime": self.name,
            "threads": self.threads,
            "tensorrt": self.host.tensorrt_version,
            "gpu": self.host.gpu_name,
            "compute_capability": self.host.compute_capability,
            "device": self.device.index,
            "precision": self.manifest.precision,
            "plan": self.manifest.plan.note,
            "profile": [p.to_dict() for p in self.manifest.profiles],
            "engine_origin": self.origin,
            "engine_check": self.reason,
        }

    def close(self) -> None:
        if getattr(self, "stream", None) is not None:
            self.stream.synchronize()
        for attribute in ("_bound", "context", "engine", "_runtime"):
            if hasattr(self, attribute):
                delattr(self, attribute)
