"""Latency tables: what a block costs at a given width, measured on the runtime that will deploy it.

MACs are not time. Operator fusion, SIMD widths and per-kernel overheads make a layer's cost depend on the
runtime, the precision and the CPU, and they make per-operator times non-additive. So pruning decisions
read *measured* times of whole blocks (the smallest module that contains every layer of a pruning group:
a MobileNetV2 inverted residual, a ResNet basic block), each exported on its own, quantized when the
deployment is INT8, compiled and timed in a fresh process on the deployment runtime with the deployment's
thread count.

Every figure is cached on disk, keyed by everything that changes it: the block's structure (its module
tree with every width, kernel and stride) and input shape, the runtime, the precision, the threads, the CPU
(model and the instruction-set flags that pick kernels) and the versions of the runtime libraries. A second
recipe, or a search over pruning targets, reuses the table; a change of runtime, precision or CPU misses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from optimizer.errors import StageError

Runtime = Literal["openvino", "onnxruntime"]
Precision = Literal["fp32", "int8"]

CACHE_ENV = "OPTIMIZER_CACHE_DIR"
TABLE_VERSION = 1  # bump when the way a block is timed changes: old entries then miss


def cache_root() -> Path:
    """``$OPTIMIZER_CACHE_DIR/latency_tables``, else ``~/.cache/optimizer/latency_tables``."""
    base = os.environ.get(CACHE_ENV)
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "optimizer"
    return root / "latency_tables"


@dataclass(frozen=True)
class Target:
    """Where the measured figures are valid: runtime, precision, threads and the machine's CPU."""

    runtime: Runtime
    precision: Precision
    threads: int
    cpu: str
    cpu_flags: tuple[str, ...]
    versions: tuple[tuple[str, str | None], ...]
    # NNCF's model type for INT8 ("transformer" keeps LayerNorm and residual adds in float and quantizes
    # differently): it changes which kernels run, so it is part of the key.
    quantization: str = "default"

    @classmethod
    def here(cls, runtime: Runtime, precision: Precision, threads: int, quantization: str = "default") -> "Target":
        from optimizer.measure.environment import _cpu_info, package_versions

        cpu = _cpu_info()
        packages = package_versions()
        wanted = ("onnxruntime", "nncf", "onnx") + (("openvino",) if runtime == "openvino" else ())
        return cls(runtime=runtime, precision=precision, threads=int(threads), cpu=str(cpu["model"]),
                   cpu_flags=tuple(cpu["flags"]), versions=tuple((k, packages.get(k)) for k in wanted),
                   quantization=quantization if precision == "int8" else "default")

    def as_dict(self) -> dict[str, Any]:
        out = {"runtime": self.runtime, "precision": self.precision, "threads": self.threads, "cpu": self.cpu,
               "cpu_flags": list(self.cpu_flags), "versions": dict(self.versions)}
        if self.quantization != "default":  # absent for the default: keys of earlier tables stay valid
            out["quantization"] = self.quantization
        return out


def entry_key(signature: str, target: Target) -> str:
    """The cache key of one timed block: its structure signature and the target, hashed."""
    text = json.dumps({"v": TABLE_VERSION, "signature": signature, "target": target.as_dict()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


class LatencyCache:
    """One small JSON file per measured block, written atomically; safe to share between runs."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else cache_root()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        path = self._path(key)
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(entry, dict) or not isinstance(entry.get("p50_ms"), (int, float)):
            return None
        return entry

    def put(self, key: str, entry: dict[str, Any]) -> None:
        from optimizer.atomic import write_text_atomic

        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(entry, sort_keys=True))


def module_signature(module: Any, input_shapes: list[tuple[int, ...]], input_dtypes: list[str]) -> str:
    """The block's module tree (every width, kernel, stride, activation) and its inputs, as one text.

    Two blocks with the same signature compile to the same kernels, so one measurement serves both.
    """
    return json.dumps({"module": repr(module), "shapes": [list(s) for s in input_shapes], "dtypes": input_dtypes})


@dataclass
class BlockToTime:
    """One ONNX file to time: a block at one width, or a whole model."""

    key: str
    onnx: Path
    label: str
    inputs: Path
    """An .npz of the block's real inputs (in0, in1...): calibration values for INT8 and the values timed.
    Token ids and attention masks need real values (a mask of 7s overflows the additive mask to inf)."""


def export_for_timing(module: Any, args: tuple, path: Path) -> None:
    """ONNX for timing only, with the TorchScript exporter (opset 17): a block needs no torch.export program,
    only its operators. Inputs are named in0, in1..."""
    import warnings

    import torch

    names = [f"in{i}" for i in range(len(args))]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), args, str(path), dynamo=False, opset_version=17, input_names=names,
                          output_names=["out"], do_constant_folding=True)


def measure_blocks(blocks: list[BlockToTime], target: Target, *, where: str, timeout_s: float = 1800) -> dict[str, dict]:
    """Time every block in one fresh process (so the timings never share thread pools with this one).

    Returns ``{key: {"p50_ms", "p50_ci95_ms", "iterations"}}``.
    """
    if not blocks:
        return {}
    from optimizer.measure.evaluate import worker_environment

    with tempfile.TemporaryDirectory(prefix="optimizer-latency-table-") as scratch:
        request = Path(scratch) / "request.json"
        result = Path(scratch) / "result.json"
        request.write_text(json.dumps({
            "target": target.as_dict(),
            "blocks": [{"key": b.key, "onnx": str(b.onnx), "label": b.label,
                        "inputs": str(b.inputs)} for b in blocks],
            "result": str(result),
        }))
        env = worker_environment(target.threads, [Path.cwd()])
        try:
            done = subprocess.run([sys.executable, "-m", "optimizer.measure.latency_table_worker", str(request)],
                                  env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise StageError(f"{where}: timing {len(blocks)} blocks for the latency table took over "
                             f"{timeout_s:.0f} s; the machine may be overloaded") from None
        if not result.is_file():
            lines = [l for l in (done.stderr or "").splitlines() if l.strip()]
            detail = next((l for l in reversed(lines) if "Error" in l), lines[-1] if lines else f"exit {done.returncode}")
            raise StageError(f"{where}: the latency-table worker failed: {detail.strip()[:300]}")
        payload = json.loads(result.read_text())
    if not payload.get("ok"):
        raise StageError(f"{where}: the latency-table worker failed on {payload.get('label')}: {payload.get('error')}")
    return payload["timings"]
