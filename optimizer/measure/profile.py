"""Where the time goes inside one stage: per-operator times from each runtime's own profiler.

Each runtime collects (operator name, operator type, microseconds) entries over a number of inferences
with its native tool (PyTorch profiler, onnxruntime's profiling JSON, OpenVINO performance counters);
this module turns them into the report's shape. Profiling slows inference down, so it runs on a separate
session or compiled model after the latency measurement and its times are never used as latency figures.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

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


def format_profile(stage: str, profile: dict, top: int = 8) -> str:
    """A plain-text table of the operator types that take the most time."""
    lines = [f"{stage}: {profile['tool']}, {profile['total_ms']:.3f} ms per inference in operators "
             f"(mean of {profile['iterations']} runs)"]
    for row in profile["by_op_type"][:top]:
        lines.append(f"  {row['share']:6.1%}  {row['ms']:9.4f} ms  {row['op_type']}")
    return "\n".join(lines)


def profile_artifact(folder: Path, *, threads: int, iterations: int, batch_size: int = 1) -> dict | None:
    """Profile one artifact in a fresh process (thread pools of different runtimes must not share one)."""
    import json
    import subprocess
    import sys

    from optimizer.errors import StageError
    from optimizer.measure.evaluate import worker_environment

    done = subprocess.run(
        [sys.executable, "-m", "optimizer.measure.profile", str(folder), str(threads), str(iterations),
         str(batch_size)],
        capture_output=True, text=True, env=worker_environment(threads, [Path.cwd()]),
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise StageError(f"{folder}: profiling failed: {last[:300]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _main(argv: list[str]) -> int:
    import json

    import numpy as np

    from optimizer.artifact import Artifact
    from optimizer.runtimes.base import open_runtime

    folder, threads, iterations, batch_size = Path(argv[0]), int(argv[1]), int(argv[2]), int(argv[3])
    artifact = Artifact.load(folder, verify=True)
    runtime = open_runtime(artifact, threads=threads)
    batch = runtime.fixed_batch or batch_size
    rng = np.random.default_rng(0)
    # Seeded synthetic inputs of the artifact's spec: operator times depend on shapes, not on values
    # (integer inputs such as token ids are drawn in a small valid range).
    inputs = {
        spec.name: (rng.integers(0, 100, size=[batch, *spec.shape[1:]]) if "int" in spec.dtype
                    else rng.standard_normal([batch, *spec.shape[1:]])).astype(spec.dtype)
        for spec in artifact.inputs
    }
    print(json.dumps(runtime.profile(inputs, iterations)))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(_main(sys.argv[1:]))
