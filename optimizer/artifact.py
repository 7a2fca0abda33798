"""The Artifact: a model in one form, always on disk, with what is needed to load and trace it.

An artifact is a folder: the model's files plus ``artifact.json`` (form, entry file, per-file sha256,
input spec, lineage and facts). Forms: ``torch`` (safetensors weights + the factory that builds the
architecture, or a ``torch.export`` program), ``onnx`` (the model plus any external-data files), and,
by the same rules, ``openvino`` and ``tensorrt``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optimizer.atomic import write_text_atomic
from optimizer.errors import InputRejected
from optimizer.recipe import InputSpec

FORMS = ("torch", "onnx", "openvino", "tensorrt")
METADATA_FILE = "artifact.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_files(folder: Path, files: dict[str, str], *, changed: str) -> None:
    """Check each of ``files`` (name -> sha256) in ``folder``; the first missing or different one is refused
    (InputRejected, exit 3) as "<file>: missing or changed <changed>", which says since when and what to do."""
    for name, expected in files.items():
        file = folder / name
        if not file.is_file() or sha256_file(file) != expected:
            raise InputRejected(f"{file}: missing or changed {changed}")


@dataclass
class Artifact:
    """Handle to a model on disk. Passes receive one and return a new one; nothing is kept in memory."""

    form: str
    path: Path
    entry: str
    inputs: list[InputSpec]
    meta: dict[str, Any] = field(default_factory=dict)
    lineage: dict[str, Any] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise ValueError(f"unknown artifact form '{self.form}'; known: {', '.join(FORMS)}")
        self.path = Path(self.path)

    @property
    def entry_path(self) -> Path:
        return self.path / self.entry

    @property
    def size_bytes(self) -> int:
        return sum((self.path / name).stat().st_size for name in self.files)

    @property
    def sha256(self) -> str:
        """One hash over every file's name and hash: equal artifacts have equal ids."""
        digest = hashlib.sha256()
        for name in sorted(self.files):
            digest.update(f"{name}\0{self.files[name]}\n".encode())
        return digest.hexdigest()

    def finalize(self) -> "Artifact":
        """Hash every file in the folder and write artifact.json. Call once the files are complete."""
        if not self.entry_path.is_file():
            raise FileNotFoundError(f"{self.entry_path}: the artifact's entry file was not written")
        self.files = {
            p.relative_to(self.path).as_posix(): sha256_file(p)
            for p in sorted(self.path.rglob("*"))
            if p.is_file() and p.name != METADATA_FILE
        }
        # Atomic and synced: a reader (the measurement process, a resumed run) never sees half a description.
        write_text_atomic(self.path / METADATA_FILE, json.dumps(self.to_dict(), indent=2, sort_keys=True))
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "form": self.form,
            "entry": self.entry,
            "inputs": [spec.model_dump() for spec in self.inputs],
            "meta": self.meta,
            "lineage": self.lineage,
            "facts": self.facts,
            "files": self.files,
        }

    @classmethod
    def load(cls, path: str | Path, *, verify: bool = False) -> "Artifact":
        folder = Path(path)
        meta_path = folder / METADATA_FILE
        try:
            data = json.loads(meta_path.read_text(encoding="utf-8"))
            artifact = cls(
                form=data["form"],
                path=folder,
                entry=data["entry"],
                inputs=[InputSpec.model_validate(spec) for spec in data["inputs"]],
                meta=data.get("meta", {}),
                lineage=data.get("lineage", {}),
                facts=data.get("facts", {}),
                files=data.get("files", {}),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputRejected(f"{meta_path}: not a readable artifact description ({exc})") from None
        if verify:
            artifact.verify()
        return artifact

    def verify(self) -> None:
        """Check every file against the hash recorded when the artifact was written."""
        verify_files(self.path, self.files, changed="since the artifact was written; re-run the stage")
