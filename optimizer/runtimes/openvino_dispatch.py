"""Shape buckets inside one OpenVINO model: an If per bucket routes each input to a static-shape copy.

Why one model and not one compiled model per bucket: real traffic alternates between buckets, and
alternating between separately compiled models is slow (each has its own stream thread, memory and repacked
copy of the weights). benchmarks/workloads.py --workloads minilm-lengths times both over the real MiniLM test
snippets in a seeded random order: its `buckets-apart` row (the same IR and buckets, one compiled model each)
was 1.03-1.32x slower than this one model in every run (README, "Inputs of varied length"). The bodies do not
share weights either: each still holds its own repacked copy.

The graph, for buckets b1 < b2 < ... < bn over a length axis with bounds min..max:

    If(length <= b1, then: body(b1), else: If(length <= b2, then: body(b2), else: ... body(bn)))

Each body is the IR with every input made static at (batch, bucket); its inputs arrive at their own length
(any in the bounds), are padded with the input's pad value (Concat with a constant) and cut to the bucket
(Slice), so everything after that Slice has static shapes and runs on OpenVINO's static-shape kernels. The
padding happens in the graph, so callers pass inputs unpadded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from optimizer.shapes import LengthAxis


def dispatch_model(ov: Any, base: Any, sizes: Sequence[int], axis: LengthAxis, batch: int,
                   pad_values: dict[str, float]) -> Any:
    """An ``ov.Model`` with the inputs of ``base`` (batch fixed, ``axis`` bounded) that runs each input in the
    smallest of ``sizes`` that holds it. ``base`` is left unchanged."""
    ops = ov.opset13
    sizes = sorted(int(s) for s in sizes)
    names = [port.get_any_name() for port in base.inputs]
    # What callers feed: the batch fixed, the bucketed axis bounded, every other dimension as in the IR.
    outer_shapes = fixed_shapes(ov, base, axis, ov.Dimension(axis.min, axis.max), batch)

    def parameters() -> list[Any]:
        params = []
        for port in base.inputs:
            name = port.get_any_name()
            param = ops.parameter(outer_shapes[name], port.get_element_type(), name=name)
            param.output(0).get_tensor().set_names({name})
            params.append(param)
        return params

    def routed(remaining: list[int]) -> Any:
        """A model over fresh parameters that serves lengths up to remaining[-1] with the buckets in it."""
        body = _bucket_body(ov, base, remaining[0], axis, batch, pad_values, parameters())
        if len(remaining) == 1:
            return body
        rest = routed(remaining[1:])
        params = parameters()
        length_input, length_index = axis.places[0]
        shape = ops.shape_of(params[names.index(length_input)], output_type="i64")
        length = ops.gather(shape, np.array(length_index, dtype=np.int64), np.array(0, dtype=np.int64))
        branch = ops.if_op(ops.less_equal(length, np.array(remaining[0], dtype=np.int64)).output(0))
        branch.set_then_body(body)
        branch.set_else_body(rest)
        for param, then_param, else_param in zip(params, body.get_parameters(), rest.get_parameters()):
            branch.set_input(param.output(0), then_param, else_param)
        outputs = [branch.set_output(then_result, else_result)
                   for then_result, else_result in zip(body.get_results(), rest.get_results())]
        results = []
        for output, original in zip(outputs, base.outputs):
            result = ops.result(output)
            result.output(0).get_tensor().set_names(set(original.get_names()))
            results.append(result)
        return ov.Model(results, params, f"buckets_from_{remaining[0]}")

    return routed(sizes)


def fixed_shapes(ov: Any, model: Any, axis: LengthAxis, size: Any, batch: int | None) -> dict[str, Any]:
    """Each input's shape with ``axis`` at ``size`` (a length, or an ``ov.Dimension`` such as bounds) and the batch
    at ``batch`` (None: as in the IR)."""
    shapes = {}
    for port in model.inputs:
        dims = list(port.get_partial_shape())
        if batch is not None:
            dims[0] = ov.Dimension(batch)
        for input_name, index in axis.places:
            if input_name == port.get_any_name():
                dims[index] = size if isinstance(size, ov.Dimension) else ov.Dimension(size)
        shapes[port.get_any_name()] = ov.PartialShape(dims)
    return shapes


def _bucket_body(ov: Any, base: Any, size: int, axis: LengthAxis, batch: int, pad_values: dict[str, float],
                 params: list[Any]) -> Any:
    """The IR at (batch, size), fed by ``params`` of any length in the bounds: padded, then cut to ``size``."""
    ops = ov.opset13
    model = base.clone()
    static = fixed_shapes(ov, model, axis, size, batch)
    model.reshape(static)
    for old, new in zip(model.get_parameters(), params):
        name = old.output(0).get_any_name()
        value = new.output(0)
        index = next((i for input_name, i in axis.places if input_name == name), None)
        if index is not None:
            # Concat a block of pad values as long as the bucket, then keep the bucket's first `size` positions:
            # the result's length is `size` for every length in the bounds, which OpenVINO infers statically.
            pad_shape = [d.get_length() for d in static[name]]
            pad = np.full(pad_shape, pad_values.get(name, 0.0), dtype=old.get_element_type().to_dtype())
            joined = ops.concat([value, ops.constant(pad)], index)
            value = ops.slice(joined, np.array([0]), np.array([size]), np.array([1]), np.array([index])).output(0)
        for target in list(old.output(0).get_target_inputs()):
            target.replace_source_output(value)
    return ov.Model(model.get_results(), params, f"bucket_{size}")
