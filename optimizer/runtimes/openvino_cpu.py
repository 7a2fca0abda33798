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
        self.compiled = self._compile(self.performance_hint, self.streams)
        self.request = self.compiled.create_infer_request()
        self._infer = bare_infer(self.request)
        # numpy dtype of each input, as the compiled model expects it; and the arrays bound to the request.
        self._dtypes = {port.get_any_name(): np.dtype(port.get_element_type().to_dtype())
                        for port in self.compiled.inputs}
        self._bound: dict[str, tuple[np.ndarray]] = {}
        self._offline: tuple[Any, Any] | None = None

    def _compile(self, hint: str, streams: int | None):
        properties = compile_properties(precision=self.precision, performance_hint=hint, threads=self.threads,
                                        streams=streams)
        return self.core.compile_model(self.model, "CPU", properties)

    @property
    def fixed_batch(self) -> int | None:
        dim = self.model.inputs[0].get_partial_shape()[0]
        return None if dim.is_dynamic else int(dim.get_length())

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        # Inputs are bound to the request as tensors over the caller's memory (no copy), and stay bound while
        # the caller passes the very same arrays again, as the latency loop does: then the call is a bare
        # infer(). Passing a dict to infer() instead wraps every array anew on every call, 26 us per call
        # here, which is 15 % of this example's INT8 inference and what OpenVINO's benchmark_app never pays.
        # Only C-contiguous arrays of the model's dtype are bound: for those the tensor shares the array's
        # memory, so an array changed in place is read as it is now, never from a stale copy.
        for name in self._names:
            array = inputs[name]
            bound = self._bound.get(name)
            if bound is not None and bound[0] is array:
                continue
            if array.flags.c_contiguous and array.dtype == self._dtypes[name]:
                self.request.set_tensor(name, self._ov.Tensor(array, shared_memory=True))
                self._bound[name] = (array,)
            else:
                self.request.set_tensor(name, self._ov.Tensor(np.ascontiguousarray(array, dtype=self._dtypes[name])))
                self._bound.pop(name, None)  # a copy: bind again on the next call
        self._infer()
        # The output memory is reused by the next inference, so it is copied out.
        return np.array(self.request.get_output_tensor(0).data, copy=True)

    def offline_runner(self, inputs: dict[str, np.ndarray]) -> Callable[[], None]:
        """Offline scenario: a second compiled model with the THROUGHPUT hint, the batch split over its
        streams' infer requests, all in flight at once (how OpenVINO serves a batch fastest)."""
        if self._offline is None:
            compiled = self._compile("throughput", None)
            self._offline = (compiled, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
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
        request = self.core.compile_model(self.model, "CPU", properties).create_infer_request()
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
        }
