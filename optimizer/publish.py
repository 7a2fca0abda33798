"""final/: one stage's artifact, copied with a manifest that names the stage, why it was chosen and how to check it.

``optimizer run`` builds final/ inside its staging folder (``build_final``) and publishes it together with the
report. ``publish_stage`` does the same for a run that already finished: it copies a chosen stage of a run
folder into a ``final/`` elsewhere (a search's output, say), with extra manifest fields, all or nothing, so a
failure leaves the previous ``final/`` as it was.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

from optimizer.artifact import METADATA_FILE, Artifact, sha256_file
from optimizer.atomic import fsync_tree, write_text_atomic
from optimizer.errors import GateFailed, InputRejected, RecipeError

MANIFEST_FILE = "manifest.json"
# Version 2: the published stage may be any stage, not only the last; "publish" says which policy chose it.
MANIFEST_VERSION = 2
# Keys extra fields may not replace: a deployer's checks read them.
_CORE_KEYS = {"manifest_version", "form", "entry", "inputs", "files", "artifact_sha256", "stage", "publish",
              "accuracy", "latency", "budget", "runtime", "library_versions", "environment", "recipe", "lineage"}


def build_final(artifact: Artifact, stage: dict[str, Any], folder: Path, *, report: dict[str, Any],
                publish: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Copy ``artifact`` into ``folder`` (which must not exist) and write its manifest; returns the manifest.

    ``stage`` is the artifact's record in ``report`` (report.json's form), ``publish`` the choice as
    ``{"policy", "stage", "reason"}``; ``extra`` adds top-level manifest fields (it may not replace the core ones).
    """
    from optimizer.measure.environment import package_versions  # imports the runtimes' version probes

    clash = sorted(set(extra or {}) & _CORE_KEYS)
    if clash:
        raise ValueError(f"extra manifest fields may not replace {', '.join(clash)}")
    shutil.copytree(artifact.path, folder)
    files = {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}
    stages = report.get("stages") or []
    # The chain of artifacts that led to this one: the stages up to the published one, not those after it.
    names = [s.get("name") for s in stages]
    upto = stages[: names.index(stage["name"]) + 1] if stage["name"] in names else stages
    latency = stage.get("latency")
    manifest: dict[str, Any] = {
        "manifest_version": MANIFEST_VERSION,
        "form": artifact.form,
        "entry": artifact.entry,
        # An input without dynamic axes is written as before they existed: a manifest of a fixed-shape model is unchanged.
        "inputs": [spec.model_dump(exclude=None if spec.dynamic else {"dynamic"}) for spec in artifact.inputs],
        "files": {name: digest for name, digest in files.items() if name != METADATA_FILE},
        "artifact_sha256": artifact.sha256,
        "stage": stage["name"],
        "publish": dict(publish),
        "accuracy": stage.get("accuracy"),
        "latency": {k: latency[k] for k in ("batch_size", "p50_ms", "p90_ms", "p99_ms")} if latency else None,
        "budget": stage.get("budget"),
        "runtime": stage.get("runtime"),
        "library_versions": package_versions(),
        "environment": report.get("environment"),
        "recipe": report.get("recipe"),
        "lineage": [s.get("sha256") for s in upto],
        # Shape buckets (compile.openvino): the static lengths the artifact was measured with; optimizer.deploy
        # routes every input through them, as the measurement did.
        **({"buckets": artifact.meta["buckets"]} if artifact.meta.get("buckets") else {}),
        **(extra or {}),
    }
    write_text_atomic(folder / MANIFEST_FILE, json.dumps(manifest, indent=2, default=str) + "\n")
    fsync_tree(folder)  # the copied model files too: final/ is published by renaming this folder
    return manifest


def publish_stage(run_dir: str | Path, destination: str | Path, *, stage: str | None = None,
                  policy: str | None = None, reason: str | None = None, extra: dict[str, Any] | None = None,
                  lock: bool = True) -> dict[str, Any]:
    """Publish one stage of a finished run as ``destination`` (a ``final/`` folder), all or nothing.

    ``run_dir`` is an ``optimizer run`` output folder (report.json and artifacts/). ``stage`` names the stage
    to publish; None lets report/verdict.choose_publish pick it under ``policy`` ("recommended", the default,
    or "last"), the same choice ``optimizer run`` makes. With a ``stage``, ``policy`` is only recorded (default
    "explicit"; a caller may name its own, e.g. "search"). ``reason`` replaces the chooser's one-sentence
    reason (say why a caller chose the stage); ``extra`` adds top-level manifest fields, e.g.
    ``{"search": {...}}``. The manifest's ``publish`` is ``{"policy", "stage", "reason"}``.
    The artifact is checked against the hashes recorded when it was written and against report.json.

    ``destination``'s parent folder is the output folder: it is locked for the publish (``OutputLock``)
    unless ``lock=False``, for a caller that holds that lock already. Returns the manifest written. Raises
    InputRejected (exit 3) for a folder that is not a readable run or a changed artifact, RecipeError (exit 2)
    for a stage the run does not have or did not measure, GateFailed (exit 4) when the policy finds nothing to
    publish; in every case the previous ``destination`` is left as it was.
    """
    from optimizer.output_folder import STAGING_PREFIX, OutputLock, publish, recover
    from optimizer.report.verdict import PublishChoice, choose_publish, measured

    run = Path(run_dir).expanduser().resolve()
    target = Path(destination).expanduser().resolve()
    try:
        report = json.loads((run / "report.json").read_text(encoding="utf-8"))
        stages = report["stages"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputRejected(f"{run}: not a finished run folder with a readable report.json ({exc})") from None
    if stage is None:
        policy = policy or "recommended"
        if policy not in ("recommended", "last"):
            raise RecipeError(f"publish policy '{policy}': use 'recommended' or 'last', or name the stage")
        choice = choose_publish(report, policy)
        if choice.stage is None:
            raise GateFailed(f"{run}: nothing to publish (publish: {policy}): {choice.reason}")
    else:
        found = [s for s in stages if s.get("name") == stage]
        if not found:
            names = ", ".join(str(s.get("name")) for s in stages)
            raise RecipeError(f"{run}: no stage '{stage}' in report.json; stages: {names}")
        if not measured(found[0]) or not found[0].get("artifact"):
            raise RecipeError(f"{run}: stage '{stage}' did not finish with an artifact and measurements; "
                              "choose another stage")
        choice = PublishChoice(policy or "explicit", found[0], reason or f"stage '{stage}' chosen by the caller")
    record = choice.stage
    assert record is not None
    chosen = choice.to_dict() | ({"reason": reason} if reason else {})
    artifact = Artifact.load(run / record["artifact"], verify=True)
    if record.get("sha256") and artifact.sha256 != record["sha256"]:
        raise InputRejected(f"{run / record['artifact']}: not the artifact report.json describes for stage "
                            f"'{record['name']}'; re-run the recipe")
    manifest_extra = {"source_run": str(run), **(extra or {})}

    folder = target.parent
    folder.mkdir(parents=True, exist_ok=True)

    def write_and_publish() -> dict[str, Any]:
        staging = folder / f"{STAGING_PREFIX}{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            manifest = build_final(artifact, record, staging / target.name, report=report, publish=chosen,
                                   extra=manifest_extra)
            publish(staging, folder, [target.name])
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return manifest

    if not lock:
        return write_and_publish()
    with OutputLock(folder):
        recover(folder)
        return write_and_publish()
