"""Deploy what was measured: open a run's ``final/`` folder and run inputs the way the measurement did.

    from optimizer.deploy import open_final
    model = open_final("runs/minilm/final")
    logits = model.run({"input_ids": ids, "attention_mask": mask})   # batch first, any length in the bounds

The folder's files are checked against its manifest first (a changed file is refused, exit 3). The artifact
is opened on the runtime it was measured on, with the settings it carries (OpenVINO's precision and
performance hints); a shape-bucketed OpenVINO artifact runs each input (unpadded, at its own length) in the
smallest of the manifest's buckets that holds it, and a length outside the declared bounds is refused with the bounds (exit 3).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from optimizer.artifact import Artifact, verify_files
from optimizer.errors import InputRejected
from optimizer.publish import MANIFEST_FILE


class DeployedModel:
    """A published artifact, opened on its runtime. ``run`` takes inputs by name (batch first)."""

    def __init__(self, folder: Path, manifest: dict[str, Any], artifact: Artifact, runtime: Any):
        self.folder = folder
        self.manifest = manifest
        self.artifact = artifact
        self.runtime = runtime

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.artifact.inputs]

    @property
    def buckets(self) -> list[int]:
        """The static lengths inputs are padded to (empty for a model without shape buckets)."""
        return list((self.manifest.get("buckets") or {}).get("sizes", []))

    def bucket_for(self, inputs: dict[str, np.ndarray]) -> int | None:
        """The bucket ``inputs`` would run in (None without buckets); refuses lengths outside the bounds."""
        route = getattr(self.runtime, "route", None)
        return route(self._checked(inputs))[0] if callable(route) and self.buckets else None

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """The model's first output for a batch of inputs."""
        return self.runtime.run(self._checked(inputs))

    def _checked(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [name for name in self.input_names if name not in inputs]
        if missing:
            raise InputRejected(f"{self.folder}: input '{missing[0]}' is missing; the model takes "
                                f"{', '.join(self.input_names)}")
        out = {}
        for spec in self.artifact.inputs:
            array = np.asarray(inputs[spec.name])
            if array.ndim != len(spec.shape):
                raise InputRejected(f"{self.folder}: input '{spec.name}' has {array.ndim} dimensions, the model takes "
                                    f"{len(spec.shape)} (batch first, e.g. {spec.shape})")
            out[spec.name] = np.ascontiguousarray(array, dtype=spec.dtype)
        return out

    def close(self) -> None:
        self.runtime.close()

    def __enter__(self) -> "DeployedModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_final(folder: str | Path, *, threads: int = 1, verify: bool = True) -> DeployedModel:
    """Open a ``final/`` folder (an ``optimizer run`` or ``optimizer search`` output) for inference.

    ``threads``: the runtime's thread count (the recipe's latency was measured with ``evaluate.latency.threads``,
    recorded in the manifest's ``runtime``). ``verify``: check every file against the manifest's sha256.
    """
    from optimizer.runtimes.base import open_runtime

    folder = Path(folder)
    manifest_path = folder / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputRejected(f"{manifest_path}: not a readable manifest ({exc}); point at a run's final/ folder") from None
    if verify:
        # Against the manifest, written when final/ was published, rather than the artifact.json beside the files.
        verify_files(folder, manifest.get("files") or {}, changed="since it was published; publish the run again")
    artifact = Artifact.load(folder)
    if manifest.get("buckets") and manifest["buckets"] != artifact.meta.get("buckets"):
        raise InputRejected(f"{manifest_path}: its buckets differ from those in artifact.json; publish the run again")
    return DeployedModel(folder, manifest, artifact, open_runtime(artifact, threads=threads))
