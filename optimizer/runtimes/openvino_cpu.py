"""OpenVINO on the CPU, with every setting that changes its speed or its numbers set explicitly.

OpenVINO picks the inference precision itself when not told: on CPUs with AMX or AVX-512 BF16 it runs
bf16, so a model called "FP32" would be timed and scored in bf16. The precision hint therefore always
comes from the artifact (written by compile.openvino from the recipe) and the value the compiled model
actually reports is recorded next to every measurement.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from optimizer.artifact import Artifact
from optimizer.errors import InputRejected, MissingDependency
from optimizer.runtimes.base import Runtime
from optimizer.shapes import check_bounds, length_axes, pad_into, pick_bucket

PRECISION_HINTS = ("f32", "bf16", "f16")
PERFORMANCE_HINTS = ("latency", "throughput")

# What the runtime records: property names as OpenVINO spells them.
RECORDED_PROPERTIES = ("INFERENCE_PRECISION_HINT", "PERFORMANCE_HINT", "NUM_STREAMS", "INFERENCE_NUM_THREADS",
                       "EXECUTION_MODE_HINT", "OPTIMAL_NUMBER_OF_INFER_REQUESTS")


def import_openvino(where: str):
    try:
        import openvino
    except ImportError:
        raise MissingDependency(f"{where}: OpenVINO is not installed; pip install 'optimizer[openvino]'") from None
    return openvino


def compile_properties(*, precision: str, performance_hint: str, threads: int,
                       streams: int | None = None) -> dict[str, Any]:
    """The CPU plugin's configuration; nothing is left to OpenVINO's defaults that changes results or speed."""
    if precision not in PRECISION_HINTS:
        raise ValueError(f"precision hint {precision!r}; use one of {PRECISION_HINTS}")
    if performance_hint not in PERFORMANCE_HINTS:
        raise ValueError(f"performance hint {performance_hint!r}; use one of {PERFORMANCE_HINTS}")
    properties: dict[str, Any] = {
        "INFERENCE_PRECISION_HINT": precision,
        "PERFORMANCE_HINT": performance_hint.upper(),
        "INFERENCE_NUM_THREADS": int(threads),
        # ACCURACY keeps the hinted precision everywhere; PERFORMANCE may lower it further on its own.
        "EXECUTION_MODE_HINT": "ACCURACY",
        # Keep the CPU plugin from sharing threads with other plugins' pools or pinning differently per stage.
        "ENABLE_CPU_PINNING": True,
    }
    if streams is not None:
        properties["NUM_STREAMS"] = int(streams)
    elif performance_hint == "latency":
        properties["NUM_STREAMS"] = 1
    return properties


def property_text(value: Any) -> str:
    """OpenVINO returns properties as strings, ints, enums or element types; record them as plain text."""
    if hasattr(value, "to_string"):  # openvino.Type: 'f32', 'bf16'
        return str(value.to_string())
    if hasattr(value, "name") and not isinstance(value, (str, int)):  # enums: ExecutionMode.ACCURACY
        return str(value.name)
    return str(value)


def check_ir_files(artifact: Artifact) -> tuple[Any, Any]:
    """The IR's .xml and .bin, both inside the artifact folder and listed in its manifest."""
    xml = artifact.entry_path
    weights = xml.with_suffix(".bin")
    folder = artifact.path.resolve()
    for path in (xml, weights):
        if path.name not in artifact.files and artifact.files:
            raise InputRejected(f"{artifact.path}: {path.name} is not listed in artifact.json; re-run the stage")
        if path.is_symlink() or path.resolve().parent != folder or not path.is_file():
            raise InputRejected(f"{path}: the IR file is missing or lies outside {folder}; re-run the stage")
    return xml, weights


def bare_infer(request: Any) -> Callable[[], object]:
    """One synchronous inference on the inputs already bound to ``request``, with nothing else per call.

    The public ``InferRequest.infer()`` passes its (absent) inputs through OpenVINO's Python data dispatcher,
    copies every output into a new array and wraps them in a dict: about 1.5 us per call here, which
    ``benchmark_app`` (timing the request from C++) never pays and which the toolkit's run() then pays again
    when it copies the one output it returns. The binding's own ``infer`` with an empty input dict and shared
    outputs is the request and nothing more. Older or newer bindings without that signature get the public
    method (a slightly slower call, never a different result).
    """
    try:
        from openvino._pyopenvino import InferRequest as Binding
    except ImportError:
        return request.infer
    binding_infer = getattr(Binding, "infer", None)
    if binding_infer is None or not isinstance(request, Binding):
        return request.infer

    state = {"call": None}

    def binding_call() -> object:
        return binding_infer(request, {}, True, True)  # inputs (already bound), share_outputs, decode_strings

    def infer() -> object:
        if state["call"] is not None:
            return state["call"]()
        try:  # the first call settles which method later calls use
            result = binding_call()
            state["call"] = binding_call
        except TypeError:  # a binding with another signature
            result = request.infer()
            state["call"] = request.infer
        return result

    return infer


class OpenVinoRuntime(Runtime):
    name = "openvino"

    def __init__(self, artifact: Artifact, *, threads: int, performance_hint: str | None = None):
        super().__init__(artifact, threads=threads)
        ov = import_openvino(str(artifact.path))
        xml, weights = check_ir_files(artifact)
        settings = artifact.meta.get("runtime", {})
        self.precision = settings.get("precision_hint", "f32")
        self.performance_hint = performance_hint or settings.get("performance_hint", "latency")
        self.streams = settings.get("streams")
        self._ov = ov
        self.core = ov.Core()
        self.model = self.core.read_model(str(xml), str(weights))
        self._names = [port.get_any_name() for port in self.model.inputs]
        expected = [spec.name for spec in artifact.inputs]
        if sorted(self._names) != sorted(expected):
            raise InputRejected(f"{xml}: model inputs {self._names} differ from the recipe's inputs {expected}")
        # Declared dynamic axes: lengths outside their bounds are refused here, with the bounds, rather than
        # by OpenVINO deep in its shape inference.
        self.axes = length_axes(artifact.inputs)
        buckets = artifact.meta.get("buckets")
        self.buckets: list[int] = sorted(int(b) for b in buckets["sizes"]) if buckets else []
        self._bucket_axis = self.axes.get(buckets["axis"]) if buckets else None
        if buckets and self._bucket_axis is None:
            raise InputRejected(f"{xml}: artifact.json lists buckets on '{buckets['axis']}', which is no dynamic axis "
                                "of the inputs; re-run the compile stage")
        self._pad_values = {name: float(v) for name, v in (buckets or {}).get("pad_values", {}).items()}
        # Buckets: one compiled model per batch size in which an If routes each input to a fully static copy of
        # the IR at the smallest bucket that holds it (optimizer/runtimes/openvino_dispatch.py says why one model
        # and not one per bucket). The batch is fixed too: a dimension left dynamic keeps OpenVINO on its slower
        # dynamic-shape path. Batch 1 (deployment, latency) is compiled and every bucket run once here, so that
        # no timed call ever compiles or prepares a bucket; other batch sizes (the accuracy pass) on first use.
        batch_dim = self.model.inputs[0].get_partial_shape()[0]
        self._ir_batch = None if batch_dim.is_dynamic else int(batch_dim.get_length())
        self._slots: dict[int | None, _Slot] = {}
        if self.buckets:
            first = self._bucket_slot(self._ir_batch or 1)
        else:
            first = self._slots[None] = _Slot(self._compile(self.performance_hint, self.streams))
        self.compiled = first.compiled
        self.request = first.request
        # numpy dtype of each input, as the compiled model expects it.
        self._dtypes = {port.get_any_name(): np.dtype(port.get_element_type().to_dtype())
                        for port in self.compiled.inputs}
        # The throughput-hinted model per bucket; _offline is the one used last.
        self._offline_by_bucket: dict[int | None, tuple[Any, Any]] = {}
        self._offline: tuple[Any, Any] | None = None

    def _reshaped(self, size: int, batch: int | None) -> Any:
        """The IR with the bucket's length fixed, and the batch too unless ``batch`` is None (kept as in the IR)."""
        from optimizer.runtimes.openvino_dispatch import fixed_shapes

        assert self._bucket_axis is not None
        model = self.model.clone()
        model.reshape(fixed_shapes(self._ov, model, self._bucket_axis, size, batch))
        return model

    def _bucket_slot(self, batch: int) -> "_Slot":
        """The compiled model holding every bucket at this batch size (compiled, and each bucket run once, on
        first use)."""
        slot = self._slots.get(batch)
        if slot is None:
            from optimizer.runtimes.openvino_dispatch import dispatch_model, fixed_shapes

            axis = self._bucket_axis
            assert axis is not None
            model = dispatch_model(self._ov, self.model, self.buckets, axis, batch, self._pad_values)
            slot = self._slots[batch] = _Slot(self._compile(self.performance_hint, self.streams, model))
            for size in self.buckets:  # the first call into a bucket prepares it: never inside a timed call
                shapes = fixed_shapes(self._ov, model, axis, size, batch)
                slot.request.infer({port.get_any_name(): np.full(
                    shapes[port.get_any_name()].to_shape(), self._pad_values.get(port.get_any_name(), 0.0),
                    dtype=port.get_element_type().to_dtype()) for port in model.inputs})
        return slot

    def _compile(self, hint: str, streams: int | None, model: Any = None):
        properties = compile_properties(precision=self.precision, performance_hint=hint, threads=self.threads,
                                        streams=streams)
        return self.core.compile_model(self.model if model is None else model, "CPU", properties)

    def route(self, inputs: dict[str, np.ndarray]) -> tuple[int | None, int | None]:
        """(bucket, length) for this batch: bounds checked (exit 3 outside them), the smallest bucket that holds
        the length, or (None, length) for a model without buckets."""
        lengths = check_bounds(inputs, self.axes, where=f"{self.artifact.path.name} (OpenVINO)")
        if not self.buckets:
            return None, None
        length = lengths[self._bucket_axis.name]  # type: ignore[union-attr]
        return pick_bucket(self.buckets, length), length

    def padded(self, inputs: dict[str, np.ndarray], bucket: int) -> dict[str, np.ndarray]:
        """``inputs`` padded to ``bucket`` (a copy; see run() for the bound buffers the hot path reuses)."""
        axis = self._bucket_axis
        assert axis is not None
        out = dict(inputs)
        for name, index in axis.places:
            shape = list(inputs[name].shape)
            shape[index] = bucket
            out[name] = pad_into(np.empty(shape, dtype=self._dtypes[name]), inputs[name], index,
                                 self._pad_values.get(name, 0.0))
        return out

    @property
    def fixed_batch(self) -> int | None:
        dim = self.model.inputs[0].get_partial_shape()[0]
        return None if dim.is_dynamic else int(dim.get_length())

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        if self.axes:  # bounds checked here, with the bounds in the message; the graph picks the bucket
            check_bounds(inputs, self.axes, where=f"{self.artifact.path.name} (OpenVINO)")
        if self.buckets:
            return self._bucket_slot(self._ir_batch or len(next(iter(inputs.values())))).run(self, inputs)
        return self._slots[None].run(self, inputs)

    def _run_slot(self, slot: "_Slot", inputs: dict[str, np.ndarray]) -> np.ndarray:
        # Inputs are bound to the request as tensors over the caller's memory (no copy), and stay bound while
        # the caller passes the very same arrays again, as the latency loop does: then the call is a bare
        # infer(). Passing a dict to infer() instead wraps every array anew on every call, 26 us per call
        # here, which is 15 % of this example's INT8 inference and what OpenVINO's benchmark_app never pays.
        # Only C-contiguous arrays of the model's dtype are bound: for those the tensor shares the array's
        # memory, so an array changed in place is read as it is now, never from a stale copy.
        for name in self._names:
            array = inputs[name]
            bound = slot.bound.get(name)
            if bound is not None and bound[0] is array:
                continue
            if array.flags.c_contiguous and array.dtype == self._dtypes[name]:
                slot.request.set_tensor(name, self._ov.Tensor(array, shared_memory=True))
                slot.bound[name] = (array,)
            else:
                slot.request.set_tensor(name, self._ov.Tensor(np.ascontiguousarray(array, dtype=self._dtypes[name])))
                slot.bound.pop(name, None)  # a copy: bind again on the next call
        slot.infer()
        # The output memory is reused by the next inference, so it is copied out.
        return np.array(slot.request.get_output_tensor(0).data, copy=True)

    def offline_runner(self, inputs: dict[str, np.ndarray]) -> Callable[[], None]:
        """Offline scenario: a second compiled model with the THROUGHPUT hint, the batch split over its
        streams' infer requests, all in flight at once (how OpenVINO serves a batch fastest)."""
        bucket, length = self.route(inputs) if self.axes else (None, None)
        if bucket is not None and length != bucket:
            inputs = self.padded(inputs, bucket)
        if bucket not in self._offline_by_bucket:
            # The batch is split over the streams' requests below, so this copy keeps the IR's batch dimension.
            compiled = self._compile("throughput", None, self._reshaped(bucket, None) if bucket is not None else None)
            self._offline_by_bucket[bucket] = (compiled, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self._offline = self._offline_by_bucket[bucket]
        compiled, requests = self._offline
        total = len(next(iter(inputs.values())))
        parts = max(1, min(requests, total)) if self.fixed_batch is None else 1
        bounds = np.linspace(0, total, parts + 1).astype(int)
        chunks = [{n: np.ascontiguousarray(inputs[n][a:b]) for n in self._names} for a, b in zip(bounds, bounds[1:])]
        queue = self._ov.AsyncInferQueue(compiled, len(chunks))

        def run_all() -> None:
            for chunk in chunks:
                queue.start_async(chunk)
            queue.wait_all()

        return run_all

    def profile(self, inputs: dict[str, np.ndarray], iterations: int) -> dict[str, Any] | None:
        from optimizer.measure.profile import summarize_profile

        # Performance counters are a compile-time property: profile a separate compiled model.
        properties = compile_properties(precision=self.precision, performance_hint=self.performance_hint,
                                        threads=self.threads, streams=self.streams)
        properties["PERF_COUNT"] = True
        bucket, length = self.route(inputs) if self.axes else (None, None)
        if bucket is not None and length != bucket:
            inputs = self.padded(inputs, bucket)
        model = self._reshaped(bucket, len(next(iter(inputs.values())))) if bucket is not None else self.model
        request = self.core.compile_model(model, "CPU", properties).create_infer_request()
        feed = {name: inputs[name] for name in self._names}
        request.infer(feed)  # warm-up
        entries: list[tuple[str, str, float]] = []
        for _ in range(iterations):
            request.infer(feed)
            # exec_type names the kernel OpenVINO chose (e.g. 'jit_avx512_I8'): kept with the layer type.
            entries += [(info.node_name, f"{info.node_type} ({info.exec_type})",
                         info.real_time.total_seconds() * 1e6)
                        for info in request.profiling_info if info.real_time.total_seconds() > 0]
        return summarize_profile("openvino perf counters", entries, iterations)

    def settings(self) -> dict[str, Any]:
        recorded: dict[str, Any] = {}
        for key in RECORDED_PROPERTIES:
            try:
                recorded[key] = property_text(self.compiled.get_property(key))
            except RuntimeError:  # a property this plugin version does not report
                continue
        return {
            "runtime": self.name,
            "threads": self.threads,
            "device": "CPU",
            "device_name": str(self.core.get_property("CPU", "FULL_DEVICE_NAME")),
            "precision_hint": self.precision,
            "properties": recorded,
            "openvino": self._ov.__version__ if hasattr(self._ov, "__version__") else self._ov.get_version(),
            **({"buckets": list(self.buckets), "bucket_axis": self._bucket_axis.name} if self.buckets else {}),  # type: ignore[union-attr]
        }


class _Slot:
    """One compiled model (every bucket of one batch size, or the only model) with its infer request and the
    arrays bound to it."""

    def __init__(self, compiled: Any):
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.infer = bare_infer(self.request)
        self.bound: dict[str, tuple[np.ndarray]] = {}

    def run(self, runtime: OpenVinoRuntime, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return runtime._run_slot(self, inputs)
