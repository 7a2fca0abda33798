"""Nothing lost, nothing let in: unsafe inputs refused, outputs atomic, interrupts and resumes, numeric
faults, concurrent runs.

Runs use a one-layer linear model (fast to export and measure, and its predictions vary with the input,
unlike an untrained ResNet's) on 200 real Fashion-MNIST images in quick latency mode. Most tests start from
a copy of one finished run and pass --resume, so only the stage under test is computed.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from optimizer import Artifact, Pass, PassConfig
from optimizer.cli import main
from optimizer.errors import (
    EXIT_GATE_FAILED,
    EXIT_INPUT_REJECTED,
    EXIT_INTERRUPTED,
    EXIT_LOCKED,
    EXIT_OK,
    EXIT_RESOURCE,
    EXIT_USAGE,
    InputRejected,
)
from tests.conftest import REPO, default_sigint, quickstart_dict, write_recipe

FACTORY = "tests.test_faults:tiny_linear"
LEFTOVER_MARKS = (".staging-", ".old-", ".publish.json", ".tmp-", ".write-probe")
DiskUsage = collections.namedtuple("DiskUsage", "total used free")


# ------------------------------------------------------------------------------- model and passes


def tiny_linear():
    """784 -> 10, seeded: exports in a second, and different images get different classes."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))


class SlowCopyConfig(PassConfig):
    seconds: float = 0.0


class SlowCopy(Pass):
    """Copies a torch artifact unchanged, taking ``seconds``: a stage long enough to interrupt."""

    name = "faults.slow_copy"
    summary = "Copy the model, slowly (test pass)."
    input_forms = ("torch",)
    output_form = "torch"
    Config = SlowCopyConfig

    def run(self, artifact: Artifact, ctx) -> Artifact:
        for name in artifact.files:
            shutil.copyfile(artifact.path / name, ctx.work_dir / name)
        deadline = time.monotonic() + self.config.seconds
        while time.monotonic() < deadline:
            time.sleep(0.05)
        return self.new_artifact(artifact, ctx, entry=artifact.entry, meta=dict(artifact.meta))


class FillWeightsConfig(PassConfig):
    value: float = 0.0


class FillWeights(Pass):
    """Sets every weight matrix of an ONNX model to one value: 0 makes the output the bias alone (one
    class for every input); NaN makes every output NaN."""

    name = "faults.fill_weights"
    summary = "Overwrite the ONNX weight matrices (test pass)."
    input_forms = ("onnx",)
    output_form = "onnx"
    Config = FillWeightsConfig

    def run(self, artifact: Artifact, ctx) -> Artifact:
        import numpy as np
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(artifact.entry_path))
        for init in model.graph.initializer:
            array = numpy_helper.to_array(init)
            if array.ndim == 2:
                filled = np.full_like(array, self.config.value)
                init.CopyFrom(numpy_helper.from_array(filled, init.name))
        onnx.save(model, str(ctx.work_dir / "model.onnx"))
        return self.new_artifact(artifact, ctx, entry="model.onnx")


class ComparesNothing(Pass):
    """A pass whose fidelity check ran over zero samples and therefore 'passed'."""

    name = "faults.compares_nothing"
    summary = "Copy the model and report an empty fidelity check (test pass)."
    input_forms = ("torch",)
    output_form = "torch"

    def run(self, artifact: Artifact, ctx) -> Artifact:
        for name in artifact.files:
            shutil.copyfile(artifact.path / name, ctx.work_dir / name)
        ctx.details["fidelity"] = {"max_abs_diff": 0.0, "max_rel_diff": 0.0, "top1_agreement": 1.0, "samples": 0,
                                   "atol": 1e-4, "rtol": 1e-3, "within_tolerance": True}
        return self.new_artifact(artifact, ctx, entry=artifact.entry, meta=dict(artifact.meta))


# --------------------------------------------------------------------------- running and inspecting


def linear_recipe(checkpoint: Path, stages: list[dict] | None = None) -> dict:
    recipe = quickstart_dict(checkpoint, eval_samples=200)
    recipe["model"].update(factory=FACTORY, kwargs={})
    recipe["budget"] = {}
    recipe["stages"] = stages or [{"name": "export", "pass": "export.onnx"}]
    return recipe


def cli(*args: str) -> tuple[int, str]:
    """``optimizer ARGS`` in this process: (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 1
    return code, err.getvalue()


def spawn(*args: str, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "optimizer", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_sigint, **kwargs)


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "optimizer", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert lines and lines[-1].startswith("optimizer: "), stderr[-3000:]
    return lines[-1]


def published_hashes(out: Path) -> dict[str, str]:
    """sha256 of every published file (the cache and the lock are not outputs)."""
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and not p.relative_to(out).parts[0].startswith(".")}


def leftovers(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if any(m in p.name for m in LEFTOVER_MARKS))


def report_of(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def linear_checkpoint(tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("linear") / "linear.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_linear().state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def finished_run(linear_checkpoint: Path, tmp_path_factory) -> tuple[Path, Path]:
    """(recipe, OUT) of one passed run: baseline -> export, with its stage cache in OUT/.cache."""
    folder = tmp_path_factory.mktemp("finished")
    recipe = write_recipe(folder, linear_recipe(linear_checkpoint))
    out = folder / "out"
    code, stderr = cli("run", str(recipe), "--out", str(out), "--quiet")
    assert code == EXIT_OK, stderr
    return recipe, out


@pytest.fixture
def previous(finished_run, tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """A private copy of the finished run: (recipe, OUT, sha256 of every published file)."""
    recipe, out = finished_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    return recipe, copy, published_hashes(copy)


def recipe_with(tmp_path: Path, checkpoint: Path, stages: list[dict], name: str = "variant.yaml") -> Path:
    return write_recipe(tmp_path, linear_recipe(checkpoint, stages), name=name)


# =========================================================================== 1. untrusted input files


def _safetensors(header: dict, data: bytes, *, header_len: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return (header_len if header_len is not None else len(raw)).to_bytes(8, "little") + raw + data


def _good_header() -> tuple[dict, bytes]:
    return ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
             "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, bytes(16))


CRAFTED_SAFETENSORS = {
    "shorter than 8 bytes": lambda: b"\x01\x02",
    "header length past the end": lambda: _safetensors(_good_header()[0], bytes(16), header_len=10_000),
    "header length over the limit": lambda: (1 << 40).to_bytes(8, "little") + b"{}",
    "header not JSON": lambda: _safetensors({}, b"")[:8] + b"{{{{",
    "header not an object": lambda: _safetensors([1, 2], b""),  # type: ignore[arg-type]
    "duplicate tensor names": lambda: (lambda raw: len(raw).to_bytes(8, "little") + raw + bytes(8))(
        b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'),
    "unknown dtype": lambda: _safetensors({"a": {"dtype": "OBJ", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
    "negative dimension": lambda: _safetensors({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}},
                                               bytes(8)),
    "size does not match shape": lambda: _safetensors({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
                                                      bytes(8)),
    "overlapping tensors": lambda: _safetensors({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
                                                bytes(12)),
    "gap between tensors": lambda: _safetensors({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}},
                                                bytes(20)),
    "truncated data": lambda: _safetensors(*_good_header())[:-4],
    "bytes after the last tensor": lambda: _safetensors(*_good_header()) + b"junk",
    "offsets reversed": lambda: _safetensors({"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}, bytes(8)),
}


@pytest.mark.parametrize("case", sorted(CRAFTED_SAFETENSORS))
def test_crafted_safetensors_are_refused_with_exit_3(case: str, tmp_path: Path) -> None:
    from optimizer.models import read_state_dict

    path = tmp_path / "crafted.safetensors"
    path.write_bytes(CRAFTED_SAFETENSORS[case]())
    with pytest.raises(InputRejected, match="not a valid safetensors file") as caught:
        read_state_dict(path)
    assert caught.value.exit_code == EXIT_INPUT_REJECTED
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_well_formed_safetensors_passes_the_header_check(tmp_path: Path) -> None:
    from optimizer.models import check_safetensors_header, read_state_dict

    path = tmp_path / "good.safetensors"
    path.write_bytes(_safetensors(*_good_header()))
    check_safetensors_header(path)
    assert set(read_state_dict(path)) == {"a", "b"}


def test_overlapping_safetensors_checkpoint_stops_a_run_with_exit_3(linear_checkpoint: Path, tmp_path: Path) -> None:
    bad = tmp_path / "overlap.safetensors"
    bad.write_bytes(CRAFTED_SAFETENSORS["overlapping tensors"]())
    recipe = write_recipe(tmp_path, linear_recipe(bad))
    out = tmp_path / "out"
    code, stderr = cli("run", str(recipe), "--out", str(out))
    assert code == EXIT_INPUT_REJECTED, stderr
    line = one_error_line(stderr)
    assert "overlap.safetensors" in line and "overlap tensor 'a'" in line
    assert not out.exists()
    code, stderr = cli("validate", str(recipe))
    assert code == EXIT_INPUT_REJECTED and "overlap" in one_error_line(stderr)


class _TouchesMarker:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _legacy(path: Path, marker: Path) -> None:
    import torch

    torch.save({"1.weight": _TouchesMarker(marker)}, path, _use_new_zipfile_serialization=False)


def _raw_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"1.weight": _TouchesMarker(marker)}, protocol=2))


def _zip_pickle(path: Path, marker: Path) -> None:
    import torch

    torch.save({"1.weight": _TouchesMarker(marker)}, path)


@pytest.mark.parametrize("writer", [_legacy, _raw_pickle, _zip_pickle])
def test_malicious_pickles_are_refused_and_their_payload_never_runs(writer, tmp_path: Path) -> None:
    marker = tmp_path / "PAYLOAD_RAN"
    evil = tmp_path / "evil.pt"
    writer(evil, marker)
    out = tmp_path / "out"
    code, stderr = cli("run", str(write_recipe(tmp_path, linear_recipe(evil))), "--out", str(out))
    assert code == EXIT_INPUT_REJECTED, stderr
    line = one_error_line(stderr)
    assert "evil.pt" in line and "refused" in line
    assert "weights_only=False" not in stderr
    assert not marker.exists(), "the pickle's payload ran"
    assert not out.exists()


def test_legacy_state_dict_without_payload_is_refused_too(tmp_path: Path) -> None:
    import torch

    from optimizer.models import read_state_dict

    path = tmp_path / "old.pth"
    torch.save(tiny_linear().state_dict(), path, _use_new_zipfile_serialization=False)
    with pytest.raises(InputRejected, match="refused: not a zip-format PyTorch file.*safetensors"):
        read_state_dict(path)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated, and still what attackers ship
def test_torchscript_archive_is_refused(tmp_path: Path) -> None:
    import torch

    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(tiny_linear()), str(path))
    code, stderr = cli("run", str(write_recipe(tmp_path, linear_recipe(path))), "--out", str(tmp_path / "out"))
    assert code == EXIT_INPUT_REJECTED, stderr
    assert "TorchScript archive" in one_error_line(stderr)


@pytest.mark.parametrize("suffix", [".engine", ".plan", ".trt"])
def test_tensorrt_engine_is_never_model_input(suffix: str, linear_checkpoint: Path, tmp_path: Path) -> None:
    engine = tmp_path / f"model{suffix}"
    engine.write_bytes(b"ftrt" + os.urandom(64))
    recipe = write_recipe(tmp_path, linear_recipe(engine))
    for args in (["run", str(recipe), "--out", str(tmp_path / "out")],
                 ["validate", str(recipe)],
                 ["run", str(write_recipe(tmp_path, linear_recipe(linear_checkpoint), name="ok.yaml")),
                  "--checkpoint", str(engine), "--out", str(tmp_path / "out")]):
        code, stderr = cli(*args)
        assert code == EXIT_INPUT_REJECTED, (args, stderr)
        assert "TensorRT engines" in one_error_line(stderr)
    assert not (tmp_path / "out").exists()


def test_recipe_with_a_python_tag_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "TAG_RAN"
    recipe = tmp_path / "tagged.yaml"
    recipe.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\nstages: []\n")
    for command in ("run", "validate"):
        code, stderr = cli(command, str(recipe))
        assert code == EXIT_USAGE, stderr
        assert "tag not allowed" in one_error_line(stderr)
    assert not marker.exists()


# ============================================================================ 2. atomic outputs


def test_atomic_write_leaves_the_old_file_when_the_disk_fills(tmp_path: Path, monkeypatch) -> None:
    from optimizer.atomic import write_text_atomic

    target = tmp_path / "report.json"
    target.write_text("previous")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        write_text_atomic(target, "new " * 1000)
    assert target.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_no_room_for_the_run_exits_5_before_any_work(previous, monkeypatch) -> None:
    recipe, out, before = previous
    monkeypatch.setattr(shutil, "disk_usage", lambda path: DiskUsage(10**12, 10**12 - 10**6, 10**6))
    code, stderr = cli("run", str(recipe), "--out", str(out), "--quiet")
    assert code == EXIT_RESOURCE, stderr
    line = one_error_line(stderr)
    assert str(out) in line and "needed" in line and "1.0 MB free" in line
    assert published_hashes(out) == before
    assert leftovers(out) == []


def test_no_room_for_a_stage_exits_5_naming_it(previous, linear_checkpoint: Path, tmp_path: Path,
                                               monkeypatch) -> None:
    _, out, before = previous
    recipe = recipe_with(tmp_path, linear_checkpoint, [{"name": "copy", "pass": "python:tests.test_faults:SlowCopy"}])
    calls = []

    def usage(path):
        calls.append(path)
        free = 10**12 if len(calls) == 1 else 10**6  # room at the start, none before the stage
        return DiskUsage(10**12, 10**12 - free, free)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    code, stderr = cli("run", str(recipe), "--out", str(out), "--quiet", "--resume")
    assert code == EXIT_RESOURCE, stderr
    assert "for stage 'copy'" in one_error_line(stderr)
    assert published_hashes(out) == before
    assert leftovers(out) == []


def test_output_folder_that_cannot_be_written_exits_5(finished_run, tmp_path: Path) -> None:
    recipe, _ = finished_run
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, stderr = cli("run", str(recipe), "--out", str(blocker / "out"), "--quiet")
    assert code == EXIT_RESOURCE, stderr
    line = one_error_line(stderr)
    assert str(blocker / "out") in line and "choose another --out" in line


def _fail_fsync_of(suffix: str, monkeypatch) -> list[str]:
    """Make fsync report ENOSPC for the temp file of ``suffix`` (as a full disk with delayed allocation
    does); everything else syncs normally."""
    real = os.fsync
    failed: list[str] = []

    def fsync(fd: int) -> None:
        try:
            name = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            name = ""
        if f".{suffix}.tmp-" in name:
            failed.append(name)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return failed


def test_disk_full_writing_the_manifest_exits_5_and_keeps_previous_outputs(previous, monkeypatch) -> None:
    recipe, out, before = previous
    failed = _fail_fsync_of("manifest.json", monkeypatch)
    code, stderr = cli("run", str(recipe), "--out", str(out), "--quiet", "--resume")
    assert failed, "the injected fault did not trigger"
    assert code == EXIT_RESOURCE, stderr
    assert "disk full" in one_error_line(stderr)
    assert published_hashes(out) == before
    assert leftovers(out) == []


def test_disk_full_while_publishing_rolls_back_to_previous_outputs(previous, monkeypatch) -> None:
    recipe, out, before = previous
    real = os.replace
    failed: list[str] = []

    def replace(src, dst, *args, **kwargs):
        # artifacts/ is already swapped in when measurements/ fails: the rollback must undo it.
        if Path(dst) == out / "measurements" and not failed:
            failed.append(str(dst))
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    code, stderr = cli("run", str(recipe), "--out", str(out), "--quiet", "--resume")
    assert failed, "the injected fault did not trigger"
    assert code == EXIT_RESOURCE, stderr
    assert "disk full" in one_error_line(stderr)
    assert published_hashes(out) == before
    assert leftovers(out) == []


CRASH_MID_PUBLISH = """
import os, signal, sys
from pathlib import Path
from optimizer import output_folder
out = Path(sys.argv[1])
real, calls = os.replace, []
def replace(src, dst, *args, **kwargs):
    calls.append(dst)
    if len(calls) == 4:  # journal, artifacts aside, artifacts in: then the power goes
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst, *args, **kwargs)
os.replace = replace
output_folder.publish(out / ".staging-test", out, ["artifacts", "measurements", "report.json", "final"])
"""


def test_publish_killed_half_way_is_rolled_back_by_the_next_run(tmp_path: Path) -> None:
    from optimizer import output_folder

    out = tmp_path / "out"
    for name, text in (("artifacts/a.bin", "old a"), ("measurements/m.npy", "old m"), ("report.json", "old")):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    before = published_hashes(out)
    staging = out / ".staging-test"
    for name, text in (("artifacts/a.bin", "new a"), ("measurements/m.npy", "new m"), ("report.json", "new"),
                       ("final/model.onnx", "new final")):
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / name).write_text(text)

    crashed = subprocess.run([sys.executable, "-c", CRASH_MID_PUBLISH, str(out)], cwd=REPO,
                             env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=120)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    assert (out / output_folder.JOURNAL_NAME).exists()
    assert (out / "artifacts" / "a.bin").read_text() == "new a"  # half published: new artifacts, old rest

    notes: list[str] = []
    output_folder.recover(out, notes.append)
    assert published_hashes(out) == before
    assert leftovers(out) == []
    assert any("restored" in note for note in notes)


# ====================================================================== 3. interrupt and resume


def test_resume_reuses_unchanged_stages_and_recomputes_changed_ones(previous) -> None:
    recipe, out, _ = previous
    first = report_of(out)
    code, stderr = cli("run", str(recipe), "--out", str(out), "--quiet", "--resume", "--set",
                       "stages.0.with.verify_samples=50")
    assert code == EXIT_OK, stderr
    report = report_of(out)
    baseline, export = report["stages"]
    assert baseline["cached"] is True and export["cached"] is False
    # Not re-measured: the noisy latency figures are the very same numbers.
    assert baseline["latency"] == first["stages"][0]["latency"]
    assert baseline["accuracy"] == first["stages"][0]["accuracy"]
    assert report["cache"]["reused"] == ["baseline"]
    assert (out / "measurements" / "baseline" / "latency_ms.npy").is_file()

    # The same again: now everything comes from the cache, and the published outputs match the cache.
    code, stderr = cli("run", str(recipe), "--out", str(out), "--quiet", "--resume", "--set",
                       "stages.0.with.verify_samples=50")
    assert code == EXIT_OK, stderr
    again = report_of(out)
    assert [s["cached"] for s in again["stages"]] == [True, True]
    assert again["stages"][1]["latency"] == report["stages"][1]["latency"]
    assert (out / "final" / "manifest.json").is_file()


def test_without_resume_every_stage_is_recomputed(previous) -> None:
    recipe, out, _ = previous
    code, stderr = cli("run", str(recipe), "--out", str(out), "--quiet")
    assert code == EXIT_OK, stderr
    assert [s["cached"] for s in report_of(out)["stages"]] == [False, False]


def _entry_of(out: Path, stage: str) -> Path:
    for entry in (out / ".cache").iterdir():
        manifest = entry / "entry.json"
        if manifest.is_file() and json.loads(manifest.read_text())["body"]["stage"] == stage:
            return entry
    raise AssertionError(f"no cache entry for {stage}")


@pytest.mark.parametrize("tamper", ["artifact", "measurement", "entry"])
def test_tampered_cache_entry_is_recomputed_with_a_message(previous, tamper: str) -> None:
    recipe, out, _ = previous
    entry = _entry_of(out, "export")
    if tamper == "artifact":
        with open(entry / "artifact" / "model.onnx", "ab") as handle:
            handle.write(b"\0")
    elif tamper == "measurement":
        (entry / "measurements" / "latency_ms.npy").write_bytes(b"not the measured times")
    else:
        document = json.loads((entry / "entry.json").read_text())
        document["body"]["metrics"]["accuracy"]["value"] = 1.0  # a better number, written by hand
        (entry / "entry.json").write_text(json.dumps(document))
    code, stderr = cli("run", str(recipe), "--out", str(out), "--quiet", "--resume")
    assert code == EXIT_OK, stderr
    report = report_of(out)
    assert [s["cached"] for s in report["stages"]] == [True, False]
    recomputed = report["cache"]["recomputed"]
    assert [r["stage"] for r in recomputed] == ["export"]
    assert any("export" in note and "recomputing" in note for note in report["notes"])
    assert report["stages"][1]["accuracy"]["value"] < 1.0
    # The bad entry was replaced by a good one.
    code, _ = cli("run", str(recipe), "--out", str(out), "--quiet", "--resume")
    assert code == EXIT_OK and [s["cached"] for s in report_of(out)["stages"]] == [True, True]


def test_cache_key_changes_with_everything_a_stage_depends_on(linear_checkpoint: Path, monkeypatch) -> None:
    from optimizer import stage_cache
    from optimizer.passes.export_onnx import ExportOnnx
    from optimizer.recipe import load_recipe

    loaded = load_recipe(linear_recipe(linear_checkpoint))
    artifact = Artifact("torch", linear_checkpoint.parent, linear_checkpoint.name, list(loaded.recipe.model.inputs),
                        files={"model.safetensors": "0" * 64})
    common = stage_cache.common_key_parts(loaded)

    def key(**change) -> str:
        parts = stage_cache.stage_key_parts("export", change.pop("pass_cls", ExportOnnx),
                                            change.pop("config", {"opset": 18}), change.pop("artifact", artifact),
                                            {}, change.pop("common", common))
        return stage_cache.key_of(parts)

    base = key()
    assert key() == base  # stable
    other_input = Artifact("torch", artifact.path, artifact.entry, artifact.inputs,
                           files={"model.safetensors": "1" * 64})
    assert key(artifact=other_input) != base
    assert key(config={"opset": 17}) != base

    class NewerExport(ExportOnnx):
        version = "2"

    assert key(pass_cls=NewerExport) != base
    # A change to any module of the toolkit (the training loop, the latency tables...) re-runs the stage too.
    monkeypatch.setattr(stage_cache, "_TOOLKIT_DIGEST", "another revision of the package")
    assert key() != base
    monkeypatch.undo()
    assert key() == base
    for section, value in (("libraries", {**common["libraries"], "onnxruntime": "0.0.1"}),
                           ("hardware", {**common["hardware"], "cpu_flags": ["avx2", "a-flag-no-cpu-has"]}),
                           ("evaluate", {**common["evaluate"], "latency": {"threads": 4}}),
                           ("data", {**common["data"], "eval": {"spec": {"samples": 10}}}),
                           ("seed", 1)):
        assert key(common={**common, section: value}) != base, section
    # Library versions come from package metadata, without importing the libraries.
    monkeypatch.setattr(stage_cache.metadata, "version", lambda name: "9.9" if name == "torch" else "1.0")
    assert stage_cache.library_versions()["torch"] == "9.9"


def test_cache_key_changes_with_the_gpu_driver_and_cuda_version(linear_checkpoint: Path, monkeypatch) -> None:
    from optimizer import stage_cache
    from optimizer.measure import environment
    from optimizer.passes.export_onnx import ExportOnnx
    from optimizer.recipe import load_recipe

    loaded = load_recipe(linear_recipe(linear_checkpoint))
    artifact = Artifact("torch", linear_checkpoint.parent, linear_checkpoint.name, list(loaded.recipe.model.inputs),
                        files={"model.safetensors": "0" * 64})

    def key_with(gpu: dict | None) -> str:
        # The whole collection path: common_key_parts -> hardware -> fingerprint -> gpu_facts.
        monkeypatch.setattr(environment, "gpu_facts", lambda: gpu)
        common = stage_cache.common_key_parts(loaded)
        assert common["hardware"]["gpu"] == gpu
        return stage_cache.key_of(stage_cache.stage_key_parts("export", ExportOnnx, {"opset": 18}, artifact, {},
                                                              common))

    h200 = {"names": ["NVIDIA H200"], "driver": "570.86.15", "cuda": "12.8"}
    keys = [key_with(None), key_with(h200), key_with({**h200, "names": ["NVIDIA A100-SXM4-80GB"]}),
            key_with({**h200, "driver": "575.51.03"}), key_with({**h200, "cuda": "13.0"})]
    assert len(set(keys)) == len(keys), keys
    assert key_with(dict(h200)) == keys[1]  # the same facts give the same key


def _store_entry(root: str, source: str, measurements: str) -> str:
    """One process storing a cache entry (several run this at once)."""
    from optimizer.stage_cache import StageCache

    artifact = Artifact.load(source)
    cache = StageCache(Path(root), read=False, shared=True)
    cache.store("k" * 64, {"stage": "s"}, "s", artifact, Path(measurements), {"accuracy": {"value": 0.5}}, {}, 1.0)
    return "ok"


def test_concurrent_stores_of_one_entry_all_succeed_and_leave_a_valid_entry(previous, tmp_path: Path) -> None:
    from concurrent.futures import ProcessPoolExecutor

    from optimizer.stage_cache import StageCache

    _, out, _ = previous
    root = tmp_path / "shared-cache"
    with ProcessPoolExecutor(4) as pool:
        results = list(pool.map(_store_entry, [str(root)] * 8, [str(out / "artifacts" / "export")] * 8,
                                [str(out / "measurements" / "export")] * 8))
    assert results == ["ok"] * 8
    assert sorted(p.name for p in root.iterdir()) == ["k" * 64]
    cache = StageCache(root, read=True, shared=True)
    hit = cache.lookup("k" * 64, "s", tmp_path / "a", tmp_path / "m")
    assert hit is not None and hit.metrics["accuracy"]["value"] == 0.5


def test_two_runs_sharing_one_cache_both_succeed(linear_checkpoint: Path, tmp_path: Path) -> None:
    recipe = recipe_with(tmp_path, linear_checkpoint, [{"name": "copy", "pass": "python:tests.test_faults:SlowCopy"}])
    cache = tmp_path / "shared"
    runs = [spawn("run", str(recipe), "--out", str(tmp_path / f"out{i}"), "--cache", str(cache), "--quiet")
            for i in range(2)]
    results = [(p.wait(timeout=600), p.communicate()[1]) for p in runs]
    assert [code for code, _ in results] == [EXIT_OK, EXIT_OK], results
    entries = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 2 and all((e / "entry.json").is_file() for e in entries)
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]
    # A third output folder resumes entirely from the shared cache.
    code, stderr = cli("run", str(recipe), "--out", str(tmp_path / "out3"), "--cache", str(cache), "--quiet",
                       "--resume")
    assert code == EXIT_OK, stderr
    assert [s["cached"] for s in report_of(tmp_path / "out3")["stages"]] == [True, True]
    assert not (tmp_path / "out3" / ".cache").exists()


def test_cache_inside_a_published_folder_is_refused(finished_run, tmp_path: Path) -> None:
    recipe, _ = finished_run
    code, stderr = cli("run", str(recipe), "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "out/final/c"))
    assert code == EXIT_USAGE and "--cache" in one_error_line(stderr)


def _wait_for_stage(process: subprocess.Popen, stage: str,
                    timeout: float = 300) -> tuple[list[str], threading.Thread]:
    """Read the run's progress lines until ``stage`` starts; return them (still growing) and the reader."""
    seen: list[str] = []
    found = threading.Event()

    def reader() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            seen.append(line)
            if f"] {stage}:" in line:
                found.set()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    assert found.wait(timeout), "".join(seen)[-3000:]
    return seen, thread


def test_running_run_locks_out_a_second_then_sigint_exits_130_keeping_previous_outputs(
        previous, linear_checkpoint: Path, tmp_path: Path) -> None:
    _, out, before = previous
    earlier = report_of(out)
    slow = recipe_with(tmp_path, linear_checkpoint,
                       [{"name": "slow", "pass": "python:tests.test_faults:SlowCopy", "with": {"seconds": 120}},
                        {"name": "export", "pass": "export.onnx"}])
    first = spawn("run", str(slow), "--out", str(out))
    try:
        seen, reader = _wait_for_stage(first, "slow")

        # 5. A second run on the same folder is refused at once, naming the holder.
        started = time.monotonic()
        second = run_cli("run", str(slow), "--out", str(out), timeout=120)
        assert second.returncode == EXIT_LOCKED, second.stderr[-2000:]
        line = one_error_line(second.stderr)
        assert f"pid {first.pid}" in line and str(out) in line
        assert time.monotonic() - started < 60

        # 3. SIGINT in the middle of stage 'slow'.
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=120) == EXIT_INTERRUPTED, "".join(seen)[-3000:]
    finally:
        first.kill()
        first.wait()
    reader.join(timeout=30)
    stderr = "".join(seen)
    assert "interrupted during stage 'slow'" in stderr and "--resume" in stderr
    assert "Traceback" not in stderr
    assert published_hashes(out) == before
    assert leftovers(out) == [] and not (out / ".lock").exists()

    # Resuming reuses the baseline measured before (not re-measured) and finishes the run.
    code, stderr = cli("run", str(slow), "--out", str(out), "--quiet", "--resume", "--set",
                       "stages.0.with.seconds=0")
    assert code == EXIT_OK, stderr
    report = report_of(out)
    # The copy produced the baseline's very bytes, so 'export' has the input it had in the earlier run: the
    # key follows content, and its cached result is reused as well.
    assert [s["cached"] for s in report["stages"]] == [True, False, True]
    assert report["stages"][0]["latency"] == earlier["stages"][0]["latency"]
    assert report["stages"][1]["sha256"] == report["stages"][0]["sha256"]


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_message(previous) -> None:
    recipe, out, _ = previous
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".lock").write_text(f"{dead.pid}\n")
    result = run_cli("run", str(recipe), "--out", str(out), "--resume")
    assert result.returncode == EXIT_OK, result.stderr[-2000:]
    assert f"stale lock left by pid {dead.pid}" in " ".join(result.stderr.split())  # rich may wrap the line
    assert not (out / ".lock").exists()
    assert any(f"pid {dead.pid}" in note for note in report_of(out)["notes"])


def test_lock_file_of_a_live_process_is_respected(previous) -> None:
    recipe, out, before = previous
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(f"{live.pid}\n")
        code, stderr = cli("run", str(recipe), "--out", str(out), "--quiet", "--resume")
    finally:
        live.kill()
        live.wait()
    assert code == EXIT_LOCKED
    assert f"pid {live.pid}" in one_error_line(stderr)
    assert published_hashes(out) == before


# ========================================================================= 4. numerical faults


def test_constant_predictions_fail_the_stage_even_within_budget(previous, linear_checkpoint: Path,
                                                                tmp_path: Path) -> None:
    _, out, before = previous
    recipe = linear_recipe(linear_checkpoint, [{"name": "export", "pass": "export.onnx"},
                                               {"name": "flat", "pass": "python:tests.test_faults:FillWeights"}])
    recipe["budget"] = {"accuracy_drop": 1.0}  # any accuracy passes the budget
    code, stderr = cli("run", str(write_recipe(tmp_path, recipe)), "--out", str(out), "--quiet", "--resume")
    assert code == EXIT_GATE_FAILED, stderr
    line = one_error_line(stderr)
    assert "stage 'flat'" in line and "eval predictions are class" in line
    report = report_of(out)
    assert report["passed"] is False and report["stages"][-1]["status"] == "failed"
    final = {k: v for k, v in before.items() if k.startswith("final/")}
    assert {k: v for k, v in published_hashes(out).items() if k.startswith("final/")} == final


def test_nan_outputs_fail_the_stage(previous, linear_checkpoint: Path, tmp_path: Path) -> None:
    _, out, _ = previous
    recipe = recipe_with(tmp_path, linear_checkpoint,
                         [{"name": "export", "pass": "export.onnx"},
                          {"name": "nan", "pass": "python:tests.test_faults:FillWeights", "with": {"value": "nan"}}])
    code, stderr = cli("run", str(recipe), "--out", str(out), "--quiet", "--resume")
    assert code == EXIT_GATE_FAILED, stderr
    assert "stage 'nan'" in one_error_line(stderr) and "NaN" in one_error_line(stderr)


def test_fidelity_check_that_compared_nothing_fails(previous, linear_checkpoint: Path, tmp_path: Path) -> None:
    _, out, _ = previous
    recipe = recipe_with(tmp_path, linear_checkpoint,
                         [{"name": "unchecked", "pass": "python:tests.test_faults:ComparesNothing"}])
    code, stderr = cli("run", str(recipe), "--out", str(out), "--quiet", "--resume")
    assert code == EXIT_GATE_FAILED, stderr
    assert "compared no samples" in one_error_line(stderr)
