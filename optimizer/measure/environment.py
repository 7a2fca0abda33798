"""A fingerprint of the machine and software that produced a set of numbers."""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

CPU_FLAGS_THAT_MATTER = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
PACKAGES = ("torch", "torchvision", "onnx", "onnxruntime", "onnxscript", "nncf", "openvino", "torch-pruning", "tensorrt", "numpy")
# A wedged driver can hang nvidia-smi, and a slow network file system git; neither may stall a run.
PROBE_TIMEOUT_S = 5.0


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


@functools.lru_cache(maxsize=1)
def _nvidia_smi() -> tuple[tuple[str, ...], str | None]:
    """(GPU names, driver version) from nvidia-smi; empty when it is missing, fails or hangs. Cached: the
    driver does not change under a running process, and the call takes a noticeable fraction of a second."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return (), None
    try:
        done = subprocess.run([binary, "--query-gpu=name,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return (), None
    if done.returncode != 0:
        return (), None
    rows = [[part.strip() for part in line.rsplit(",", 1)] for line in done.stdout.splitlines() if "," in line]
    return tuple(name for name, _ in rows), (rows[0][1] if rows else None)


def _torch_cuda_build() -> str | None:
    """The CUDA version torch was built with, read from torch/version.py when torch is not imported yet:
    importing it for one string would cost seconds, and the answer must not depend on whether it was."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return getattr(getattr(torch, "version", None), "cuda", None)
    try:
        spec = importlib.util.find_spec("torch")
        folders = list(spec.submodule_search_locations or []) if spec else []
        tree = ast.parse((Path(folders[0]) / "version.py").read_text(encoding="utf-8")) if folders else None
    except (ImportError, ValueError, OSError, SyntaxError):
        return None
    for node in tree.body if tree else []:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
        if isinstance(target, ast.Name) and target.id == "cuda" and isinstance(node.value, ast.Constant):
            return node.value.value if isinstance(node.value.value, str) else None
    return None


def gpu_facts() -> dict[str, Any] | None:
    """NVIDIA GPUs, driver and the CUDA version torch was built with; None when no GPU is found.

    nvidia-smi names the GPUs and the driver. Without it, torch names the GPUs, but only when torch is
    already imported (a fingerprint imports no heavy library); the driver is then unknown.
    """
    names, driver = _nvidia_smi()
    torch = sys.modules.get("torch")
    if not names and torch is not None:
        try:
            if torch.cuda.is_available():
                names = tuple(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        except Exception:  # noqa: BLE001 - a broken CUDA set-up means "no usable GPU" here, never a failed run
            names = ()
    if not names:
        return None
    return {"names": list(names), "driver": driver, "cuda": _torch_cuda_build()}


def toolkit_revision() -> dict[str, Any] | None:
    """The git commit this package was loaded from, and whether its files differ from it; None when the
    package is not a tracked part of a git checkout (an installed wheel, a venv inside someone's repository)."""
    folder = Path(__file__).resolve().parents[1]

    def git(*args: str) -> subprocess.CompletedProcess | None:
        try:
            return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True,
                                  timeout=PROBE_TIMEOUT_S, check=False)
        except (OSError, subprocess.SubprocessError):
            return None

    # Tracked files only: a package installed inside another project's checkout is not that project's code.
    tracked = git("ls-files", "--error-unmatch", "--", "__init__.py")
    head = git("rev-parse", "HEAD") if tracked is not None and tracked.returncode == 0 else None
    if head is None or head.returncode != 0 or not head.stdout.strip():
        return None
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    modified = None if status is None or status.returncode != 0 else bool(status.stdout.strip())
    return {"commit": head.stdout.strip(), "modified": modified}


def fingerprint(threads: int | None = None) -> dict[str, Any]:
    """Collected without importing any heavy library (versions come from package metadata, GPU facts from
    nvidia-smi or an already imported torch)."""
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
        "gpu": gpu_facts(),
        "toolkit_revision": toolkit_revision(),
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
    gpu = env.get("gpu")
    if gpu:
        parts.append(describe_gpu(gpu))
    revision = env.get("toolkit_revision")
    if revision:
        parts.append(f"optimizer {revision['commit'][:12]}{' (modified)' if revision.get('modified') else ''}")
    return " | ".join(str(p) for p in parts)


def describe_gpu(gpu: dict[str, Any]) -> str:
    return (f"{', '.join(gpu.get('names') or ['?'])}, driver {gpu.get('driver') or '?'}, "
            f"CUDA {gpu.get('cuda') or '?'}")


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """What differs between two environments in ways that change latency."""
    diffs = []
    for key in ("cpu", "cpu_flags", "cpus_usable", "threads", "machine", "gpu"):
        if a.get(key) != b.get(key):
            diffs.append(f"{key}: {a.get(key)} vs {b.get(key)}")
    for name in set(a.get("packages", {})) | set(b.get("packages", {})):
        va, vb = a.get("packages", {}).get(name), b.get("packages", {}).get(name)
        if va != vb:
            diffs.append(f"{name}: {va} vs {vb}")
    return diffs
