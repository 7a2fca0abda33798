"""The pass contract enforced where passes run: the runner, not only check_pass, stops a pass that writes
outside ctx.work_dir, changes its input, or returns no entry file (exit 7, naming what it did), and publishes
nothing from a run whose earlier stages a pass changed. Runs on the Fashion example with 200 eval images in
quick latency mode; the passes under test are defined here and named as python:tests.test_contract_enforced:X.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
from pathlib import Path

import pytest

from optimizer import Artifact, Pass, PassConfig
from optimizer.cli import main
from optimizer.errors import EXIT_CONTRACT, EXIT_OK, EXIT_STAGE_ERROR
from tests.conftest import quickstart_dict, write_recipe

HERE = "tests.test_contract_enforced"


class CopyConfig(PassConfig):
    scribble: str = "none"  # where to write an extra file: none, input, elsewhere, temp, cache
    target: str = ""
    write_entry: bool = True


class Copy(Pass):
    """Copies a torch artifact; ``scribble`` makes it also write one small file somewhere."""

    name = "contract.copy"
    summary = "Copy the model, writing one extra file where told (test pass)."
    input_forms = ("torch",)
    output_form = "torch"
    Config = CopyConfig

    def run(self, artifact: Artifact, ctx) -> Artifact:
        cfg: CopyConfig = self.config  # type: ignore[assignment]
        if cfg.write_entry:
            for name in artifact.files:
                shutil.copyfile(artifact.path / name, ctx.work_dir / name)
        where = {"input": artifact.path / "notes.txt", "elsewhere": Path(cfg.target),
                 "temp": Path(cfg.target), "cache": Path(cfg.target)}.get(cfg.scribble)
        if where is not None:
            where.parent.mkdir(parents=True, exist_ok=True)
            where.write_text("written by a pass\n")
        ctx.details["copy"] = {"files": len(artifact.files), "scribble": cfg.scribble, "share": 0.125,
                               "limits": {"bytes": 4096}}
        return self.new_artifact(artifact, ctx, entry=artifact.entry, meta=dict(artifact.meta))


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    """One stage cache for the module's runs: the baseline is measured once."""
    return tmp_path_factory.mktemp("contract-cache")


def cli(*args: str, cache: Path | None = None) -> tuple[int, str]:
    """``optimizer ARGS`` in this process, reusing cached stages from ``cache``: (exit code, stderr)."""
    err = io.StringIO()
    extra = ["--resume", "--cache", str(cache)] if cache is not None else []
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([*args, *extra])
    return code, err.getvalue()


def recipe_file(folder: Path, checkpoint: Path, **with_) -> Path:
    recipe = quickstart_dict(checkpoint, eval_samples=200)
    recipe["budget"] = {}
    recipe["publish"] = "last"
    recipe["stages"] = [{"name": "copy", "pass": f"python:{HERE}:Copy", "with": with_}]
    return write_recipe(folder, recipe)


def last_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr[-3000:]
    return lines[-1]


def test_pass_writing_into_its_input_folder_exits_7_and_publishes_nothing(example_checkpoint: Path,
                                                                            shared_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, stderr = cli("run", str(recipe_file(tmp_path, example_checkpoint, scribble="input")), "--out", str(out),
                       "--quiet", cache=shared_cache)
    line = last_line(stderr)
    assert code == EXIT_CONTRACT, stderr[-3000:]
    assert "stage 'copy'" in line and "broke the pass contract" in line
    assert "artifacts/baseline/notes.txt (added)" in line and "check_pass" in line
    assert ".staging" not in line
    # The earlier stage was changed after it was measured: nothing of the run is published.
    assert not (out / "report.json").exists() and not (out / "artifacts").exists()


@pytest.fixture
def system_temp(tmp_path: Path, monkeypatch) -> Path:
    """A private system temp folder: tmp_path itself lies in the real one, where leftovers are allowed."""
    folder = tmp_path / "system-temp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_pass_writing_elsewhere_fails_its_stage_with_exit_7(example_checkpoint: Path, shared_cache: Path,
                                                            tmp_path: Path, system_temp: Path) -> None:
    stray = tmp_path / "elsewhere" / "stray.txt"
    out = tmp_path / "out"
    code, stderr = cli("run", str(recipe_file(tmp_path, example_checkpoint, scribble="elsewhere",
                                              target=str(stray))), "--out", str(out), "--quiet", cache=shared_cache)
    line = last_line(stderr)
    assert code == EXIT_CONTRACT, stderr[-3000:]
    assert f"wrote outside ctx.work_dir ({stray} (left behind)" in line or f"{stray.parent} (left behind)" in line
    # Nothing of the run's own was touched: the report is published, showing the stage that failed.
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is False and report["stages"][-1]["status"] == "failed"
    assert "broke the pass contract" in report["stages"][-1]["error"]
    assert not (out / "final").exists()


def test_missing_entry_file_is_a_contract_error_naming_the_work_dir(example_checkpoint: Path, shared_cache: Path,
                                                                    tmp_path: Path) -> None:
    code, stderr = cli("run", str(recipe_file(tmp_path, example_checkpoint, write_entry=False)), "--out",
                       str(tmp_path / "out"), "--quiet", cache=shared_cache)
    line = last_line(stderr)
    assert code == EXIT_CONTRACT and code != EXIT_STAGE_ERROR, stderr[-3000:]
    assert "entry file 'model.safetensors'" in line and "ctx.work_dir" in line and "check_pass" in line
    assert ".staging" not in line and "FileNotFoundError" not in line


def test_library_caches_and_temp_files_are_allowed(example_checkpoint: Path, shared_cache: Path, tmp_path: Path,
                                                   system_temp: Path, monkeypatch) -> None:
    """Files left in the system temp folder or the user's cache folder belong to no artifact: the run passes."""
    cache = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    for scribble, target in (("temp", system_temp / "library-leftover.bin"),
                             ("cache", cache / "some-library" / "table.json")):
        code, stderr = cli("run", str(recipe_file(tmp_path, example_checkpoint, scribble=scribble, target=str(target))),
                           "--out", str(tmp_path / f"out-{scribble}"), "--quiet", cache=shared_cache)
        assert code == EXIT_OK, stderr[-3000:]
        assert target.is_file()


def test_custom_details_show_in_report_md_and_html(example_checkpoint: Path, shared_cache: Path,
                                                   tmp_path: Path) -> None:
    """What a pass puts into ctx.details is in report.md and report.html, not only in report.json."""
    out = tmp_path / "out"
    code, stderr = cli("run", str(recipe_file(tmp_path, example_checkpoint)), "--out", str(out), "--quiet",
                       cache=shared_cache)
    assert code == EXIT_OK, stderr[-3000:]
    details = json.loads((out / "report.json").read_text())["stages"][1]["details"]["copy"]
    assert details == {"files": 1, "scribble": "none", "share": 0.125, "limits": {"bytes": 4096}}
    line = "Stage 'copy' copy: files 1, scribble none, share 0.125, limits.bytes 4096."
    assert line in (out / "report.md").read_text()
    assert line.replace("'", "&#x27;") in (out / "report.html").read_text()
