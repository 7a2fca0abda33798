"""A fingerprint of the machine and software that produced a set of numbers."""

from __future__ import annotations

import os
import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

CPU_FLAGS_THAT_MATTER = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
PACKAGES = ("torch", "torchvision", "onnx", "onnxruntime", "onnxscript", "nncf", "openvino", "torch-pruning", "tensorrt", "numpy")


def _cpu_info() -> dict[str, Any]:
    info: dict[str, Any] = {"model": platform.processor() or platform.machine(), "flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name":
            info["model"] = value.strip()
        elif key == "flags":
            present = set(value.split())
            info["flags"] = [f for f in CPU_FLAGS_THAT_MATTER if f in present]
            break
    return info


def _governor() -> str | None:
    try:
        return Path("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor").read_text().strip()
    except OSError:
        return None


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def fingerprint(threads: int | None = None) -> dict[str, Any]:
    """Collected without importing any heavy library (versions come from package metadata)."""
    cpu = _cpu_info()
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "cpu": cpu["model"],
        "cpu_flags": cpu["flags"],
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "governor": _governor(),
        "load_average": load,
        "python": sys.version.split()[0],
        "packages": package_versions(),
        "threads": threads,
    }


def describe(env: dict[str, Any]) -> str:
    """One line for tables and notes."""
    packages = env.get("packages", {})
    parts = [
        env.get("cpu", "?"),
        f"{env.get('cpus_usable')} cpus",
        "flags " + ",".join(env.get("cpu_flags", [])),
        f"python {env.get('python')}",
        *(f"{k} {v}" for k, v in packages.items() if v and k in ("torch", "onnxruntime", "nncf", "openvino")),
        f"threads {env.get('threads')}",
    ]
    return " | ".join(str(p) for p in parts)


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """What differs between two environments in ways that change latency."""
    diffs = []
    for key in ("cpu", "cpu_flags", "cpus_usable", "threads", "machine"):
        if a.get(key) != b.get(key):
            diffs.append(f"{key}: {a.get(key)} vs {b.get(key)}")
    for name in set(a.get("packages", {})) | set(b.get("packages", {})):
        va, vb = a.get("packages", {}).get(name), b.get("packages", {}).get(name)
        if va != vb:
            diffs.append(f"{name}: {va} vs {vb}")
    return diffs
