"""optimizer search on the built-in Fashion-MNIST example: the search space's checks, the study loop with its
shared stage cache, failed trials, resume, the budgets, the Ray executor, the search report and final/.

Trials are kept tiny (200 eval samples for screening, 400 for the full re-measure, quick latency with few
iterations, ONNX export and onnxruntime INT8 only), so a trial takes seconds; nothing here asserts speed.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from optimizer import Pass, PassConfig
from optimizer.artifact import Artifact
from optimizer.cli import main
from tests.conftest import FASHION_ROOT, REPO, default_sigint, write_recipe

QUICK_LATENCY = {"threads": 1, "batch_size": 1, "throughput_batch_size": 8, "mode": "quick", "trials": 1,
                 "min_iterations": 10, "min_duration_s": 0, "warmup_s": 0, "max_duration_s": 2}


# A pass for the failure tests: passes its ONNX input through, or raises when told to.
class BoomConfig(PassConfig):
    explode: bool = False
    kill: bool = False  # SIGKILL its own process, as the kernel's OOM killer would
    disk_full_while: str | None = None  # raise ENOSPC while this file exists (a disk that fills, then is freed)


class Boom(Pass):
    name = "test.boom"
    summary = "pass the model through, or raise (test)"
    input_forms = ("onnx",)
    output_form = "onnx"
    Config = BoomConfig

    def run(self, artifact, ctx):
        if self.config.explode:
            raise RuntimeError("boom: the test pass was told to explode")
        if self.config.kill:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.config.disk_full_while and os.path.exists(self.config.disk_full_while):
            raise OSError(errno.ENOSPC, "No space left on device", str(ctx.work_dir / artifact.entry))
        shutil.copyfile(artifact.entry_path, ctx.work_dir / artifact.entry)
        return Artifact(form="onnx", path=ctx.work_dir, entry=artifact.entry, inputs=artifact.inputs)


def search_recipe(checkpoint: Path, **search) -> dict:
    """export -> int8 (onnxruntime INT8, optional, per-tensor or per-channel), screening on 200 samples."""
    return {
        "name": "search-test",
        "seed": 0,
        "model": {"factory": "optimizer.zoo:small_resnet", "kwargs": {"num_classes": 10, "in_channels": 1},
                  "checkpoint": str(checkpoint), "input": {"name": "images", "shape": [1, 1, 28, 28]}},
        "data": {
            "eval": {"dataset": "fashion-mnist", "split": "test", "root": str(FASHION_ROOT), "samples": 400,
                     "mean": [0.2860], "std": [0.3530]},
            "calibration": {"dataset": "fashion-mnist", "split": "train", "root": str(FASHION_ROOT),
                            "samples": 200, "mean": [0.2860], "std": [0.3530]},
        },
        "evaluate": {"accuracy": {"metric": "top1", "batch_size": 200}, "latency": dict(QUICK_LATENCY)},
        "budget": {"accuracy_drop": 0.05},
        "stages": [
            {"name": "export", "pass": "export.onnx", "with": {"opset": 18}},
            {"name": "int8", "pass": "quantize.ort",
             "with": {"subset_size": 100, "verify_samples": 50}},
        ],
        "search": {"trials": 4, "remeasure": 1, "objective": "accuracy", "screening": {"eval_samples": 200, "latency": "quick"},
                   "stages": {"int8": {"optional": True, "parameters": {"per_channel": {"choice": [True, False]}}}},
                   **search},
    }


def _run(recipe_path: Path, out: Path, *extra: str) -> int:
    return main(["search", str(recipe_path), "--out", str(out), "--quiet", *extra])


def _journal_trials(out: Path) -> list:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    import optuna

    storage = JournalStorage(JournalFileBackend(str(out / "study.journal")))
    return optuna.load_study(study_name="search", storage=storage).get_trials(deepcopy=False)


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s["stages"]["int8"].update(optinal=True), r"search\.stages\.int8\.optinal: unknown key"),
        (lambda s: s["stages"]["int8"]["parameters"].update(per_channel={"choice": []}), "an empty choice"),
        (lambda s: s["stages"].update(compile={"optional": True}), r"no stage named 'compile'"),
        (lambda s: s["stages"]["int8"]["parameters"].update(per_chanel={"choice": [True]}),
         r"'per_chanel' is not a setting of pass 'quantize.ort'; did you mean 'per_channel'"),
        (lambda s: s["stages"]["int8"]["parameters"].update(subset_size={"int": [0, 100]}),
         r"rejects subset_size=0"),
        (lambda s: s["stages"]["int8"].update(alternatives=[{"pass": "quantize.nnfc"}]), r"unknown pass"),
        (lambda s: s["stages"]["int8"]["parameters"].update(subset_size={"log_float": [0, 1]}),
         r"low bound must be greater than 0"),
    ],
)
def test_invalid_search_space_exits_2_before_any_work(example_checkpoint, tmp_path, capsys, change, message):
    recipe = search_recipe(example_checkpoint)
    change(recipe["search"])
    path = write_recipe(tmp_path, recipe)
    out = tmp_path / "out"
    assert _run(path, out) == 2
    err = capsys.readouterr().err
    assert f"{path}:" in err and len(err.strip().splitlines()) == 1
    import re

    assert re.search(message, err), err
    assert not out.exists()


def test_search_needs_a_search_section_and_sane_options(example_checkpoint, tmp_path, capsys):
    recipe = search_recipe(example_checkpoint)
    path = write_recipe(tmp_path, recipe)
    assert _run(path, tmp_path / "out", "--workers", "0") == 2
    del recipe["search"]
    assert _run(write_recipe(tmp_path, recipe, "plain.yaml"), tmp_path / "out") == 2
    assert "has no 'search:' section" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_search_folder_in_use_exits_6(example_checkpoint, tmp_path, capsys):
    from optimizer.output_folder import OutputLock

    out = tmp_path / "out"
    out.mkdir()
    with OutputLock(out):
        assert _run(write_recipe(tmp_path, search_recipe(example_checkpoint)), out) == 6
    assert "another run" in capsys.readouterr().err
    assert not (out / "study.journal").exists()


# --------------------------------------------------------------------------------- a search, locally


@pytest.fixture(scope="module")
def local_search(example_checkpoint, tmp_path_factory):
    """A 4-trial search with 2 local workers (shared by the tests below; the Ray test compares with it)."""
    folder = tmp_path_factory.mktemp("search")
    path = write_recipe(folder, search_recipe(example_checkpoint))
    out = folder / "out"
    code = _run(path, out, "--workers", "2")
    return path, out, code


def test_search_runs_trials_through_the_runner_and_publishes_the_choice(local_search):
    _, out, code = local_search
    assert code == 0
    report = json.loads((out / "search.json").read_text())
    assert [t["number"] for t in report["trials"]] == [0, 1, 2, 3]
    # The first trial is the recipe as written.
    assert report["trials"][0]["params"] == {"int8.enabled": True, "int8.per_channel": True}
    for trial in report["trials"]:
        assert trial["state"] == "complete" and trial["status"] == "ok"
        assert trial["accuracy_n"] == 200 and trial["latency_mode"] == "quick"
        assert (out / trial["report_link"]).is_file()
        assert trial["p50_ci95_ms"][0] <= trial["p50_ms"] <= trial["p50_ci95_ms"][1]
    # Trials share the stage cache: after the first batch (2 trials at once), the baseline and the export come
    # from it.
    assert all(t["stages_cached"] >= 2 for t in report["trials"][2:])
    # The Pareto trial was re-measured in full (400 samples) before it was chosen.
    assert report["full"] and report["full"][0]["accuracy_n"] == 400
    chosen = report["chosen"]
    assert chosen["trial"] in report["candidates"]
    manifest = json.loads((out / "final" / "manifest.json").read_text())
    assert manifest["search"]["trial"] == chosen["trial"]
    assert manifest["search"]["params"] == chosen["params"]
    assert (out / manifest["search"]["trial_folder"] / "report.json").is_file()
    assert manifest["search"]["objective"] == "accuracy"
    assert (out / "final" / manifest["entry"]).is_file()
    html = (out / "search.html").read_text()
    assert "<svg" in html and "Pareto front" in html and "http" not in html.split("<body>")[1].replace(
        "http://www.w3.org/2000/svg", "")
    assert "## Parameter importance" in (out / "search.md").read_text()


def test_resume_continues_with_no_trial_repeated(local_search, tmp_path):
    path, out, _ = local_search
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    before = {p.parent.name: p.stat().st_mtime_ns for p in (copy / "trials").glob("*/report.json")}
    # Without --resume the folder's search is protected.
    assert _run(path, copy, "--trials", "5") == 2
    assert _run(path, copy, "--trials", "5", "--resume") == 0
    assert [t.number for t in _journal_trials(copy)] == [0, 1, 2, 3, 4]
    after = {p.parent.name: p.stat().st_mtime_ns for p in (copy / "trials").glob("*/report.json")}
    assert set(after) == {"0000", "0001", "0002", "0003", "0004"}
    assert all(after[name] == stamp for name, stamp in before.items())  # earlier trials were not run again
    # A resume with another budget is another search: refused.
    assert _run(path, copy, "--resume", "--set", "budget.accuracy_drop=0.02") == 2


@pytest.mark.slow  # kept out of the fast suite for time (about 15-35 s); runs in the slow suite
def test_a_trial_that_raises_is_recorded_and_the_search_goes_on(example_checkpoint, tmp_path):
    recipe = search_recipe(example_checkpoint, trials=3)
    recipe["stages"].insert(1, {"name": "boom", "pass": "python:tests.test_search:Boom", "with": {"explode": True}})
    recipe["search"]["stages"] = {"boom": {"parameters": {"explode": {"choice": [True, False]}}},
                                  "int8": {"optional": True}}
    out = tmp_path / "out"
    assert _run(write_recipe(tmp_path, recipe), out) == 0
    report = json.loads((out / "search.json").read_text())
    failed = [t for t in report["trials"] if t["state"] == "fail"]
    assert report["trials"][0] in failed  # the recipe as written explodes
    assert "boom: the test pass was told to explode" in failed[0]["error"]
    assert any(t["state"] == "complete" for t in report["trials"])
    assert len(report["trials"]) == 3 and report["chosen"]


@pytest.mark.slow
def test_a_killed_trial_process_is_a_failed_trial_and_the_journal_stays_usable(example_checkpoint, tmp_path):
    recipe = search_recipe(example_checkpoint, trials=2)
    recipe["stages"].insert(1, {"name": "boom", "pass": "python:tests.test_search:Boom", "with": {"kill": True}})
    recipe["search"]["stages"] = {"boom": {"parameters": {"kill": {"choice": [True, False]}}}}
    path = write_recipe(tmp_path, recipe)
    out = tmp_path / "out"
    assert _run(path, out) == 0
    first = json.loads((out / "search.json").read_text())["trials"][0]
    assert first["state"] == "fail" and "SIGKILL" in first["error"]
    # The journal reads back, and a resumed search goes on from it.
    assert _run(path, out, "--resume", "--trials", "3") == 0
    assert [t.state.name for t in _journal_trials(out)][0] == "FAIL" and len(_journal_trials(out)) == 3


def test_unreachable_budget_exits_4_listing_the_closest_trials(example_checkpoint, tmp_path, capsys):
    recipe = search_recipe(example_checkpoint, trials=2)
    out = tmp_path / "out"
    code = _run(write_recipe(tmp_path, recipe), out, "--set", "budget.latency_p50_ms=0.0001")
    assert code == 4
    err = capsys.readouterr().err
    assert "no trial meets the budgets" in err and "closest: trial" in err
    report = json.loads((out / "search.json").read_text())
    assert report["objective"] == "accuracy" and report["chosen"] is None
    assert all(t["constraints"]["latency_p50_ms"] > 0 for t in report["trials"])
    assert not (out / "final").exists()


def test_a_trial_over_budget_at_an_intermediate_stage_stops_there(example_checkpoint, tmp_path, capsys):
    recipe = search_recipe(example_checkpoint, trials=1)
    recipe["evaluate"]["latency"]["runtime"] = "native"
    # Pruning 60 % of every layer without recovery costs far more than the 5-point budget.
    recipe["stages"].insert(0, {"name": "prune", "pass": "prune.structured", "with": {"ratio": 0.6}})
    recipe["search"]["stages"] = {"prune": {"parameters": {"ratio": {"choice": [0.6]}}}}
    out = tmp_path / "out"
    assert _run(write_recipe(tmp_path, recipe), out) == 4
    assert "closest: trial 0" in capsys.readouterr().err
    trial = json.loads((out / "search.json").read_text())["trials"][0]
    assert trial["status"] == "stopped" and trial["stage"] == "prune" and not trial["feasible"]
    assert trial["constraints"]["accuracy_drop"] > 0
    run = json.loads((out / "trials" / "0000" / "report.json").read_text())
    assert [s["name"] for s in run["stages"]] == ["baseline", "prune"]  # export and int8 never ran


def test_compare_takes_a_search_folder_for_its_chosen_trial(local_search, tmp_path, capsys):
    _, out, _ = local_search
    assert main(["compare", str(out), str(out / "trials" / "0000")]) == 0
    text = capsys.readouterr().out
    chosen = json.loads((out / "search.json").read_text())["chosen"]["trial"]
    assert f"{out.name} (search, trial {chosen})" in text


# ------------------------------------------------------------------------------------------- Ray


def test_ray_local_gives_the_same_trials_and_choice_as_the_local_executor(local_search, tmp_path):
    pytest.importorskip("ray")
    path, local_out, _ = local_search
    out = tmp_path / "ray"
    assert _run(path, out, "--workers", "2", "--ray", "local") == 0
    local = json.loads((local_out / "search.json").read_text())
    ray = json.loads((out / "search.json").read_text())
    assert "Ray" in ray["executor"]
    assert [t["params"] for t in ray["trials"]] == [t["params"] for t in local["trials"]]
    assert [t["accuracy"] for t in ray["trials"]] == [t["accuracy"] for t in local["trials"]]
    # The objective is accuracy, which the same artifacts measure the same: timing noise cannot change the choice.
    assert ray["chosen"]["params"] == local["chosen"]["params"]
    assert ray["chosen"]["accuracy"] == local["chosen"]["accuracy"]


# ------------------------------------------------------------------------------------------- Ctrl-C


def _signalled_search(checkpoint: Path, tmp_path: Path, out: Path, *, trials: int, once: str, then: float,
                      signum: int) -> list[str]:
    """Start a search in its own process, send it ``signum`` ``then`` seconds after a file matching ``once`` (a
    glob under ``out``) appears, and check it stopped as interrupted (exit 130, the resume hint). Returns the
    command, for a resume."""
    path = write_recipe(tmp_path, search_recipe(checkpoint, trials=trials))
    command = [sys.executable, "-m", "optimizer", "search", str(path), "--out", str(out)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               preexec_fn=default_sigint)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list(out.glob(once)):
        time.sleep(0.2)
    time.sleep(then)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert b"--resume" in err
    return command


@pytest.mark.slow
def test_sigint_mid_search_then_resume_repeats_no_trial(example_checkpoint, tmp_path):
    out = tmp_path / "out"
    command = _signalled_search(example_checkpoint, tmp_path, out, trials=4, once="trials/0001/report.json",
                                then=1.0, signum=signal.SIGINT)  # into the next trial
    finished = {t.number: t.datetime_complete for t in _journal_trials(out) if t.state.is_finished()}
    assert finished
    assert subprocess.run(command + ["--resume"], cwd=REPO, capture_output=True).returncode == 0
    trials = _journal_trials(out)
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert all(t.state.is_finished() for t in trials)
    for number, completed in finished.items():
        assert trials[number].datetime_complete == completed  # told once, never run again
    assert (out / "final" / "manifest.json").is_file()


def test_sigterm_mid_trial_stops_the_search_and_its_trial_like_ctrl_c(example_checkpoint, tmp_path):
    """A scheduler's SIGTERM: exit 130 with the resume hint, and no trial process left running (trials run in
    their own process group, which a signal to the search alone never reaches)."""
    out = tmp_path / "out"
    _signalled_search(example_checkpoint, tmp_path, out, trials=2, once=".work/*0000.request.json", then=2.0,
                      signum=signal.SIGTERM)  # the trial's process is running its chain
    left = subprocess.run(["pgrep", "-f", str(out / ".work")], capture_output=True, text=True).stdout.split()
    assert not left, f"trial processes still running: {left}"
    assert not (out / "final").exists()


# ------------------------------------------------------------------------------- resume and the choice


def _search_manifest(out: Path) -> dict:
    """final/'s manifest search section, less the paths that name the folder."""
    search = json.loads((out / "final" / "manifest.json").read_text())["search"]
    return {k: v for k, v in search.items() if k not in ("study", "recipe")}


@pytest.mark.slow  # two more searches; test_resume_continues_with_no_trial_repeated stays in the fast suite
def test_a_search_stopped_early_then_resumed_publishes_the_same_choice_as_one_run(local_search, tmp_path):
    path, whole, code = local_search
    assert code == 0
    out = tmp_path / "out"
    # Stopped after 2 of the 4 trials (same seed, same workers), then continued to 4 with --resume.
    assert _run(path, out, "--workers", "2", "--trials", "2") == 0
    assert [t.number for t in _journal_trials(out)] == [0, 1]
    assert _run(path, out, "--workers", "2", "--resume") == 0
    one_run = json.loads((whole / "search.json").read_text())
    resumed = json.loads((out / "search.json").read_text())
    assert [t["params"] for t in resumed["trials"]] == [t["params"] for t in one_run["trials"]]
    assert resumed["chosen"]["trial"] == one_run["chosen"]["trial"]
    assert resumed["chosen"]["params"] == one_run["chosen"]["params"]
    assert _search_manifest(out) == _search_manifest(whole)
    assert _search_manifest(out)["trial"] == one_run["chosen"]["trial"]


# ------------------------------------------------------------------------------------------- disk full


def test_disk_full_publishing_the_choice_exits_5_keeps_final_and_the_journal(local_search, tmp_path, capsys,
                                                                              monkeypatch):
    import errno

    from tests.test_faults import LEFTOVER_MARKS, one_error_line

    path, whole, _ = local_search
    out = tmp_path / "out"
    shutil.copytree(whole, out)
    final_before = {p.relative_to(out).as_posix(): p.read_bytes() for p in (out / "final").rglob("*") if p.is_file()}
    real = os.replace
    failed: list[str] = []

    def replace(src, dst, *args, **kwargs):
        # The new final/ cannot be moved in: the disk is full (the old one is already set aside).
        if Path(dst) == out / "final" and not failed:
            failed.append(str(dst))
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    capsys.readouterr()
    code = _run(path, out, "--trials", "5", "--resume")
    err = capsys.readouterr().err
    assert failed, "the injected fault did not trigger"
    assert code == 5, err
    line = one_error_line(err)
    assert len(err.strip().splitlines()) == 1 and "disk full" in line and "--resume" in line
    # The previous final/ is intact, with no half-published folder beside it.
    after = {p.relative_to(out).as_posix(): p.read_bytes() for p in (out / "final").rglob("*") if p.is_file()}
    assert after == final_before
    assert not [p for p in out.rglob("*") if any(m in p.name for m in LEFTOVER_MARKS)]
    # The journal holds the 5 trials, and a resumed search publishes from it without running any again.
    monkeypatch.setattr(os, "replace", real)
    trials = _journal_trials(out)
    assert [t.number for t in trials] == [0, 1, 2, 3, 4] and all(t.state.is_finished() for t in trials)
    stamps = {p.parent.name: p.stat().st_mtime_ns for p in (out / "trials").glob("*/report.json")}
    assert _run(path, out, "--trials", "5", "--resume") == 0
    assert {p.parent.name: p.stat().st_mtime_ns for p in (out / "trials").glob("*/report.json")} == stamps
    chosen = json.loads((out / "search.json").read_text())["chosen"]
    assert _search_manifest(out)["trial"] == chosen["trial"] and _search_manifest(out)["trials"] == 5


@pytest.mark.slow  # kept out of the fast suite for time (about 15-35 s); runs in the slow suite
def test_disk_full_mid_search_exits_5_and_resume_finishes_it(example_checkpoint, tmp_path, capsys, monkeypatch):
    from tests.test_faults import _fail_fsync_of, one_error_line

    path = write_recipe(tmp_path, search_recipe(example_checkpoint, trials=2))
    out = tmp_path / "out"
    # The report written after the first trial cannot be synced: the disk is full.
    real_fsync = os.fsync
    failed = _fail_fsync_of("search.json", monkeypatch)
    code = _run(path, out)
    err = capsys.readouterr().err
    assert failed, "the injected fault did not trigger"
    assert code == 5, err
    line = one_error_line(err)
    assert len(err.strip().splitlines()) == 1 and "disk full" in line and "--resume" in line
    assert not (out / "final").exists()
    finished = {t.number: t.datetime_complete for t in _journal_trials(out) if t.state.is_finished()}
    assert finished
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert _run(path, out, "--resume") == 0
    trials = _journal_trials(out)
    assert [t.number for t in trials] == [0, 1] and all(t.state.is_finished() for t in trials)
    for number, completed in finished.items():
        assert trials[number].datetime_complete == completed  # not run again
    assert (out / "final" / "manifest.json").is_file()


def test_a_search_sharing_a_runs_stage_cache_reuses_its_stages(example_checkpoint, tmp_path):
    """`optimizer run --cache C` of the recipe as written, then `optimizer search --cache C` screened on the
    recipe's own eval set: the first trial (the recipe as written) takes every stage from the run's entries,
    and the search keeps no cache of its own in its folder."""
    recipe = search_recipe(example_checkpoint, trials=1)
    recipe["search"]["screening"] = {"eval_samples": None, "latency": "full"}  # the run's own measurements
    path = write_recipe(tmp_path, recipe)
    cache = tmp_path / "shared-cache"
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--cache", str(cache), "--quiet"]) == 0
    out = tmp_path / "search"
    assert _run(path, out, "--cache", str(cache)) == 0
    trial = json.loads((out / "search.json").read_text())["trials"][0]
    assert trial["stages_cached"] == 3  # baseline, export, int8
    assert not (out / ".cache").exists()
    manifest = json.loads((out / "final" / "manifest.json").read_text())
    assert (out / manifest["search"]["trial_folder"] / "report.json").is_file()


def test_disk_full_inside_a_trial_stops_the_search_with_exit_5_and_resume_reruns_that_trial(
        example_checkpoint, tmp_path, capsys):
    """A full disk is not the trial's fault, and every later trial would meet it too: as in `optimizer run`, one
    line and exit 5; the trial stays open in the journal (not failed) and --resume runs it once the disk is freed."""
    from tests.test_faults import one_error_line

    flag = tmp_path / "disk-is-full"
    flag.write_text("")
    recipe = search_recipe(example_checkpoint, trials=2)
    recipe["stages"].insert(1, {"name": "boom", "pass": "python:tests.test_search:Boom",
                                "with": {"disk_full_while": str(flag)}})
    path = write_recipe(tmp_path, recipe)
    out = tmp_path / "out"
    code = _run(path, out)
    err = capsys.readouterr().err
    assert code == 5, err
    line = one_error_line(err)
    assert len(err.strip().splitlines()) == 1 and "disk full" in line and "trial 0" in line and "--resume" in line
    assert [t.state.name for t in _journal_trials(out)] == ["RUNNING"]
    assert not (out / "final").exists()
    flag.unlink()  # space freed
    assert _run(path, out, "--resume") == 0
    trials = _journal_trials(out)
    assert [t.number for t in trials] == [0, 1] and [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert (out / "final" / "manifest.json").is_file()
