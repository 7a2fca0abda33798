"""Dynamic input axes: trimming varied-length batches, routing inputs to shape buckets, choosing buckets.

A recipe declares a non-batch axis dynamic with bounds (``model.inputs[].dynamic``); inputs that share the
axis name share one length (MiniLM's ``input_ids`` and ``attention_mask``: ``seq``). Data sets keep their
samples padded to a common size in memory, with each sample's own length alongside; a batch is cut to the
longest sample in it. A bucketed model runs every input in a static-shape copy of the model at the smallest
bucket that holds it, padded to that length. No torch or runtime imports (numpy and the recipe schema only): the
measurement worker and the deploy loader import this.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from optimizer.errors import InputRejected
from optimizer.recipe import InputSpec


@dataclass(frozen=True)
class LengthAxis:
    """One symbolic length and where it appears: ``places`` is (input name, axis) pairs."""

    name: str
    min: int
    max: int
    places: tuple[tuple[str, int], ...]


def length_axes(inputs: Sequence[InputSpec]) -> dict[str, LengthAxis]:
    """The declared dynamic axes, grouped by symbolic name (the schema already made shared names agree)."""
    found: dict[str, LengthAxis] = {}
    for spec in inputs:
        for axis, dyn in sorted(spec.dynamic.items()):
            known = found.get(dyn.name)
            places = (*(known.places if known else ()), (spec.name, int(axis)))
            found[dyn.name] = LengthAxis(dyn.name, dyn.min, dyn.max, places)
    return found


def trim(batch: dict[str, np.ndarray], axes: dict[str, LengthAxis], lengths: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Cut each dynamic axis to the longest sample of the batch (samples are stored padded to a common size).

    ``lengths`` holds the batch's own lengths per axis name; an axis without lengths is left as it is."""
    if not axes or not lengths:
        return batch
    out = dict(batch)
    for name, axis in axes.items():
        own = lengths.get(name)
        if own is None or len(own) == 0:
            continue
        longest = int(own.max())
        for input_name, index in axis.places:
            array = out[input_name]
            if array.shape[index] > longest:
                cut = [slice(None)] * array.ndim
                cut[index] = slice(0, longest)
                out[input_name] = np.ascontiguousarray(array[tuple(cut)])
    return out


def current_length(inputs: dict[str, np.ndarray], axis: LengthAxis, *, where: str) -> int:
    """The size of ``axis`` in this batch; every input that shares it must agree."""
    sizes = {name: int(inputs[name].shape[index]) for name, index in axis.places if name in inputs}
    if len(set(sizes.values())) > 1:
        raise InputRejected(f"{where}: inputs that share the dynamic axis '{axis.name}' differ in length {sizes}; "
                            "give them the same length")
    return next(iter(sizes.values()))


def check_bounds(inputs: dict[str, np.ndarray], axes: dict[str, LengthAxis], *, where: str) -> dict[str, int]:
    """The length of every dynamic axis, refused with the bounds when outside them (exit 3)."""
    found = {}
    for name, axis in axes.items():
        length = current_length(inputs, axis, where=where)
        if not axis.min <= length <= axis.max:
            raise InputRejected(f"{where}: length {length} of dynamic axis '{name}' is outside the model's bounds "
                                f"{axis.min}..{axis.max}; truncate the input or re-export with a wider bound")
        found[name] = length
    return found


def pick_bucket(buckets: Sequence[int], length: int) -> int:
    """The smallest bucket that holds ``length`` (buckets sorted ascending; the caller checked the bound)."""
    for size in buckets:
        if length <= size:
            return int(size)
    raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")


def pad_into(buffer: np.ndarray, array: np.ndarray, axis: int, value: float) -> np.ndarray:
    """Copy ``array`` into the start of ``buffer`` along ``axis`` and fill the rest with ``value``."""
    length = array.shape[axis]
    head = [slice(None)] * array.ndim
    head[axis] = slice(0, length)
    tail = [slice(None)] * array.ndim
    tail[axis] = slice(length, None)
    buffer[tuple(head)] = array
    buffer[tuple(tail)] = value
    return buffer


def auto_buckets(lengths: np.ndarray, count: int, maximum: int, *, multiple: int = 8) -> list[int]:
    """``count`` bucket sizes that minimize the summed padded length of ``lengths`` (the padded length stands in
    for time, which grows with length), from sizes rounded up to ``multiple``; the largest is always ``maximum``,
    so every length within the bounds has a bucket.

    Exact: a dynamic programme over the candidate sizes (at most maximum / multiple of them)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    candidates = sorted({min(maximum, int(-(-int(v) // multiple) * multiple)) for v in lengths} | {maximum})
    if len(candidates) <= count:
        return candidates
    # cost[i][j]: padded total of the samples longer than candidates[i] and at most candidates[j], served by j.
    values = np.sort(lengths)
    def served(low: int, high: int) -> int:
        n = int(np.searchsorted(values, high, side="right") - np.searchsorted(values, low, side="right"))
        return n * high
    m = len(candidates)
    inf = float("inf")
    # best[k][j]: least cost of serving every sample <= candidates[j] with k buckets, the largest candidates[j].
    best = [[inf] * m for _ in range(count + 1)]
    choice = [[-1] * m for _ in range(count + 1)]
    for j in range(m):
        best[1][j] = served(0, candidates[j])
    for k in range(2, count + 1):
        for j in range(m):
            for i in range(j):
                cost = best[k - 1][i] + served(candidates[i], candidates[j])
                if cost < best[k][j]:
                    best[k][j], choice[k][j] = cost, i
    k = min(range(1, count + 1), key=lambda c: best[c][m - 1])
    picked, j = [], m - 1
    while j >= 0 and k >= 1:
        picked.append(candidates[j])
        j, k = choice[k][j], k - 1
    return sorted(picked)
