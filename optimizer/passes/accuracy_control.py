"""Accuracy-controlled INT8 for quantize.nncf: the held-out data it selects on and what it reverted.

``nncf.quantize_with_accuracy_control`` quantizes, then reverts the operations that cost the most accuracy to
float until the drop on its validation data is within ``max_drop``. That is a selection by accuracy, so it
must not see the eval split: an eval figure of the chosen model would be optimistic. The validation data is
``data.validation`` when the recipe has it, else the ``data.calibration`` samples that calibration does not
use; samples identical to eval samples are counted, and a validation set made only of them is refused.

NNCF returns just the model. The plain INT8 model it started from is saved through its documented
``intermediate_model_dir`` option; the operations reverted are those with fewer int8 inputs in the result
than there (found from the two graphs, so they do not depend on the wording of NNCF's log), and the drop NNCF
measured after reverting each is read from its log, the only place it reports it.
"""

from __future__ import annotations

import hashlib
import logging
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from optimizer.errors import GateFailed, InputRejected, RecipeError, StageError

if TYPE_CHECKING:
    from optimizer.data.datasets import ArrayData
    from optimizer.passes.base import PassContext

# Drops are differences of sample fractions: 0.928 - 0.918 is 0.010000000000000009 in floating point, and
# that is not over a max_drop of 0.01.
DROP_TOLERANCE = 1e-9
MIN_VALIDATION_SAMPLES = 10


@dataclass
class ValidationSet:
    items: list[tuple[dict[str, np.ndarray], int]]
    """One (inputs, label) pair per sample, each input a batch of one."""
    record: dict[str, Any]
    """Where the samples come from, for the stage's details."""


def _digests(data: "ArrayData", index: np.ndarray) -> list[bytes]:
    """A digest of each sample's inputs: equal samples, equal digests, whichever split they come from."""
    names = sorted(data.inputs)
    out = []
    for i in index:
        h = hashlib.blake2b(digest_size=16)
        for name in names:
            h.update(np.ascontiguousarray(data.inputs[name][i]).tobytes())
        out.append(h.digest())
    return out


def choose_validation(ctx: "PassContext", calibration: "ArrayData", calibration_index: np.ndarray,
                      requested: int) -> ValidationSet:
    """Up to ``requested`` samples drawn with the seed from data.validation, else from the calibration
    samples outside ``calibration_index``; never fewer than MIN_VALIDATION_SAMPLES."""
    if ctx.data.has("validation"):
        data = ctx.data.validation()
        pool = np.arange(len(data))
        source = "data.validation"
        short = (f"data.validation has {len(data)} samples; give it at least {MIN_VALIDATION_SAMPLES}")
    else:
        data = calibration
        pool = np.setdiff1d(np.arange(len(data)), calibration_index)
        source = "data.calibration, held out from calibration"
        short = (f"data.calibration has {len(data)} samples and calibration uses {len(calibration_index)} "
                 f"(subset_size), which leaves {len(pool)} for accuracy control; add data.validation, or raise "
                 "data.calibration.samples or lower subset_size")
    if len(pool) < MIN_VALIDATION_SAMPLES:
        raise InputRejected(f"stage '{ctx.stage}': accuracy control needs at least {MIN_VALIDATION_SAMPLES} "
                            f"validation samples; {short}")
    count = min(requested, len(pool))
    index = np.sort(np.random.default_rng(ctx.seed + 7).choice(pool, size=count, replace=False))

    eval_data = ctx.data.eval()
    in_eval = set(_digests(eval_data, np.arange(len(eval_data))))
    shared = sum(d in in_eval for d in _digests(data, index))
    if shared == count:
        field = "data.validation" if source == "data.validation" else "data.calibration"
        raise RecipeError(
            f"stage '{ctx.stage}': all {count} accuracy-control samples ({field}) are also in data.eval, so "
            "accuracy control would choose on the eval set and the reported accuracy would be optimistic; give "
            "data.validation a split that data.eval does not use"
        )
    if shared:
        ctx.progress.log(f"{shared} of {count} accuracy-control samples are also in data.eval")
    items = [({n: a[i : i + 1] for n, a in data.inputs.items()}, int(data.labels[i])) for i in index]
    record = {"source": source, "samples": count, "requested": requested, "available": int(len(pool)),
              "shared_with_eval": shared}
    if source != "data.validation":
        record["disjoint_from_calibration_subset"] = True
    return ValidationSet(items, record)


def top1_validator(threads: int) -> Callable[[Any, Any], tuple[float, list[float]]]:
    """NNCF's validation function: top-1 of a candidate (ONNX ModelProto, OpenVINO Model or the CompiledModel
    NNCF makes of one) over (inputs, label) items, with the per-item results it ranks operations by."""

    def validate(candidate: Any, data_items: Any) -> tuple[float, list[float]]:
        if hasattr(candidate, "SerializeToString"):  # an ONNX ModelProto
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            session = ort.InferenceSession(candidate.SerializeToString(), options,
                                           providers=["CPUExecutionProvider"])
            output = session.get_outputs()[0].name
            infer = lambda x: session.run([output], x)[0]  # noqa: E731
        else:
            if hasattr(candidate, "get_ops"):  # an OpenVINO Model: compiled as NNCF does, f32 on the CPU
                import openvino as ov

                from optimizer.runtimes.openvino_cpu import compile_properties

                candidate = ov.Core().compile_model(
                    candidate, "CPU", compile_properties(precision="f32", performance_hint="latency", threads=threads))
            compiled = candidate
            infer = lambda x: compiled(x)[0]  # noqa: E731
        per_item = [float(infer(x).argmax() == y) for x, y in data_items]
        return (float(np.mean(per_item)) if per_item else 0.0), per_item

    return validate


# Ops a quantizer's value passes through before it reaches the operation it quantizes: the layout ops
# between a weight's DequantizeLinear and a MatMul, and OpenVINO's weight decompression (Convert, Subtract
# the zero point, Multiply by the scale) between an int8 Constant and a Convolution.
_ONNX_PASS_THROUGH = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Cast"}
_OV_PASS_THROUGH = {"Convert", "Subtract", "Multiply", "Reshape", "Transpose", "Squeeze", "Unsqueeze"}
_OV_LOW_PRECISION = {"i8", "u8", "i4", "u4"}


def quantized_operations(model: Any) -> dict[str, tuple[str, int]]:
    """{name: (type, quantized inputs)} of the operations that take a quantized input: one fed by a
    DequantizeLinear (ONNX) or a FakeQuantize or int8 weights (OpenVINO IR), through layout ops."""
    out: dict[str, tuple[str, int]] = {}
    if hasattr(model, "graph"):  # ONNX
        producer = {o: node for node in model.graph.node for o in node.output}

        def quantized_onnx(name: str) -> bool:
            node = producer.get(name)
            while node is not None and node.op_type in _ONNX_PASS_THROUGH:
                node = producer.get(node.input[0])
            return node is not None and node.op_type == "DequantizeLinear"

        for node in model.graph.node:
            if node.op_type in _ONNX_PASS_THROUGH or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
                continue
            count = sum(quantized_onnx(i) for i in node.input if i)
            if count:
                out[node.name] = (node.op_type, count)
        return out

    def quantized_ov(op: Any) -> bool:
        while op.get_type_name() in _OV_PASS_THROUGH:
            op = op.input_value(0).get_node()
        if op.get_type_name() == "Constant":
            return op.get_element_type().get_type_name() in _OV_LOW_PRECISION
        return op.get_type_name() == "FakeQuantize"

    for op in model.get_ops():
        kind = op.get_type_name()
        if kind in _OV_PASS_THROUGH or kind in ("FakeQuantize", "Constant", "Parameter", "Result"):
            continue
        count = sum(quantized_ov(port.get_node()) for port in op.input_values())
        if count:
            out[op.get_friendly_name()] = (kind, count)
    return out


class _StepLog(logging.Handler):
    """NNCF's log lines of the revert loop: 'Reverted N operations ...' with the names, then the drop it
    measured with them in float ('Accuracy drop with the new quantization scope is X', or 'Algorithm
    completed: achieved required accuracy drop X')."""

    DROP = re.compile(r"(?:new quantization scope is|achieved required accuracy drop) (-?[0-9.]+(?:e-?[0-9]+)?)")

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.steps: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if text.startswith("Reverted ") and "floating-point precision" in text:
            names = [line.strip() for line in text.splitlines()[1:] if line.strip()]
            self.steps.append({"operations": names, "drop": None})
            return
        found = self.DROP.search(text)
        if found and self.steps and self.steps[-1]["drop"] is None:
            self.steps[-1]["drop"] = float(found.group(1))


@contextmanager
def _nncf_steps() -> Iterator[_StepLog]:
    """Collect NNCF's INFO records while the block runs; what the console shows is left as it was set
    (nncf.set_log_level sets its handlers' levels too, so a quiet run stays quiet)."""
    logger = logging.getLogger("nncf")
    handler = _StepLog()
    level = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def quantize_with_accuracy_control(nncf: Any, model: Any, calibration: Any, validation: ValidationSet,
                                   options: dict[str, Any], ctx: "PassContext", max_drop: float) -> Any:
    """The controlled model; ``ctx.details['accuracy_control']`` gets the validation source, the top-1 of the
    float, plain INT8 and controlled models on it, and the operations reverted to float."""
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    validate = top1_validator(ctx.threads)
    record: dict[str, Any] = {"max_drop": max_drop, "metric": "top1", "validation": validation.record}
    ctx.details["accuracy_control"] = record
    dataset = nncf.Dataset(validation.items, lambda item: item[0])
    with tempfile.TemporaryDirectory(dir=ctx.work_dir.parent) as scratch, _nncf_steps() as log:
        controlled = nncf.quantize_with_accuracy_control(
            model, calibration, dataset, validate, max_drop=max_drop, drop_type=nncf.DropType.ABSOLUTE,
            advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(intermediate_model_dir=scratch),
            **options,
        )
        # Used inside the block: OpenVINO may map the IR's weights file rather than read it.
        plain = _read_plain(Path(scratch), onnx_form=hasattr(model, "graph"), stage=ctx.stage)
        ctx.progress.update("accuracy control: float, plain INT8 and controlled INT8 on the validation samples")
        items = validation.items
        top1 = {name: validate(m, items)[0]
                for name, m in (("float", model), ("plain", plain), ("controlled", controlled))}
        before, after = quantized_operations(plain), quantized_operations(controlled)
        del plain
    drop_after = {name: step["drop"] for step in log.steps for name in step["operations"]}
    reverted = [{"name": name, "type": kind, "drop_after": drop_after.get(name)}
                for name, (kind, count) in before.items() if after.get(name, (kind, 0))[1] < count]
    record.update(
        float_top1=top1["float"], plain_int8_top1=top1["plain"], controlled_top1=top1["controlled"],
        plain_int8_drop=top1["float"] - top1["plain"], controlled_drop=top1["float"] - top1["controlled"],
        operations_with_int8_inputs=len(before), reverted=reverted,
    )
    if record["controlled_drop"] > max_drop + DROP_TOLERANCE:
        raise GateFailed(
            f"stage '{ctx.stage}': accuracy control could not hold the top-1 drop within max_drop {max_drop:g} on "
            f"{len(items)} validation samples ({validation.record['source']}): plain INT8 dropped "
            f"{record['plain_int8_drop'] * 100:.2f} points and, with {len(reverted)} of {len(before)} quantized "
            f"operations in float, {record['controlled_drop'] * 100:.2f}; raise max_drop, or calibrate on more "
            "samples (subset_size)"
        )
    return controlled


def _read_plain(folder: Path, *, onnx_form: bool, stage: str) -> Any:
    """The fully quantized model NNCF started the revert loop from (written by intermediate_model_dir)."""
    path = folder / ("intermediate_model.onnx" if onnx_form else "intermediate_model.xml")
    if not path.is_file():
        raise StageError(f"stage '{stage}': NNCF wrote no {path.name}, so the operations accuracy control "
                         "reverted cannot be named; use an NNCF release with intermediate_model_dir")
    if onnx_form:
        import onnx

        return onnx.load(str(path))
    import openvino as ov

    return ov.Core().read_model(str(path))
