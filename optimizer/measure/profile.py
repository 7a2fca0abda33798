"""Where the time goes inside one stage: per-operator times from each runtime's own profiler.

Each runtime collects (operator name, operator type, microseconds) entries over a number of inferences
with its native tool (PyTorch profiler, onnxruntime's profiling JSON, OpenVINO performance counters);
this module turns them into the report's shape. Profiling slows inference down, so it runs on a separate
session or compiled model after the latency measurement and its times are never used as latency figures.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

TOP_OPERATORS = 10


def summarize_profile(tool: str, entries: Iterable[tuple[str, str, float]], iterations: int) -> dict:
    """``entries``: (name, op_type, microseconds) summed over ``iterations`` inferences."""
    by_type: dict[str, float] = defaultdict(float)
    by_name: dict[tuple[str, str], float] = defaultdict(float)
    for name, op_type, micros in entries:
        by_type[op_type] += micros
        by_name[(name, op_type)] += micros
    total = sum(by_type.values())
    per_iteration_ms = 1e-3 / max(iterations, 1)
    return {
        "tool": tool,
        "iterations": iterations,
        "total_ms": total * per_iteration_ms,
        "by_op_type": [
            {"op_type": op_type, "ms": micros * per_iteration_ms, "share": micros / total if total else 0.0}
            for op_type, micros in sorted(by_type.items(), key=lambda item: -item[1])
        ],
        "top_ops": [
            {"name": name, "op_type": op_type, "ms": micros * per_iteration_ms}
            for (name, op_type), micros in sorted(by_name.items(), key=lambda item: -item[1])[:TOP_OPERATORS]
        ],
    }
