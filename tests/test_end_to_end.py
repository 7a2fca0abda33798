"""End to end: the quick start recipe on the trained example, through the CLI and the Python API."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from optimizer import Artifact, Pass, PassConfig, register_pass, run_recipe
from optimizer.errors import EXIT_GATE_FAILED, EXIT_INPUT_REJECTED, EXIT_LOCKED, EXIT_USAGE, GateFailed
from tests.conftest import REPO, default_sigint, quickstart_dict, write_recipe

STAGE_KEYS = {"name", "pass", "form", "artifact", "sha256", "size_bytes", "params", "accuracy", "latency",
              "throughput", "status"}


def run_cli(*args: str, cwd: Path = REPO, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "optimizer", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def sha256_tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def quickstart_run(example_checkpoint: Path, tmp_path_factory) -> Path:
    """The quick start through the CLI: full 10,000-image eval set, quick latency mode."""
    folder = tmp_path_factory.mktemp("quickstart")
    recipe = write_recipe(folder, quickstart_dict(example_checkpoint, eval_samples=None))
    out = folder / "out"
    result = run_cli("run", str(recipe), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "quickstart: PASSED" in result.stdout
    return out


def test_report_json_has_every_field(quickstart_run: Path) -> None:
    report = json.loads((quickstart_run / "report.json").read_text())
    assert report["schema_version"] == 1
    assert report["passed"] is True
    assert report["recipe"]["name"] == "quickstart"
    assert report["environment"]["python"] and report["environment"]["packages"]["onnxruntime"]
    assert [s["name"] for s in report["stages"]] == ["baseline", "export", "int8"]
    assert [s["form"] for s in report["stages"]] == ["torch", "onnx", "onnx"]
    for stage in report["stages"]:
        assert STAGE_KEYS <= stage.keys(), STAGE_KEYS - stage.keys()
        assert stage["status"] == "ok"
        assert stage["accuracy"]["metric"] == "top1" and stage["accuracy"]["n"] == 10_000
        low, high = stage["accuracy"]["ci95"]
        assert low < stage["accuracy"]["value"] < high
        latency = stage["latency"]
        assert latency["batch_size"] == 1 and latency["iterations"] >= 30
        assert 0 < latency["p50_ms"] <= latency["p90_ms"] <= latency["p99_ms"]
        assert stage["throughput"]["batch_size"] == 32 and stage["throughput"]["samples_per_s"] > 0
        assert stage["size_bytes"] > 0 and stage["params"] > 0
        assert (quickstart_run / stage["artifact"] / "artifact.json").is_file()
        raw = np.load(quickstart_run / stage["raw_latency_file"])
        assert len(raw) == latency["iterations"]
    assert report["stages"][0]["pass"] is None
    assert report["stages"][1]["details"]["fidelity"]["within_tolerance"] is True


def test_example_is_accurate_and_int8_stays_within_one_point(quickstart_run: Path) -> None:
    stages = json.loads((quickstart_run / "report.json").read_text())["stages"]
    baseline, export, int8 = (s["accuracy"]["value"] for s in stages)
    assert baseline >= 0.90
    assert abs(export - baseline) < 0.001
    assert baseline - int8 <= 0.01


def test_int8_model_holds_quantized_nodes(quickstart_run: Path) -> None:
    model = onnx.load(str(quickstart_run / "artifacts" / "int8" / "model.onnx"))
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("QuantizeLinear") > 5 and ops.count("DequantizeLinear") > 5
    int8_weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert int8_weights, "convolution weights should be stored as int8"


def test_final_folder_is_deployable_and_matches_its_manifest(quickstart_run: Path) -> None:
    final = quickstart_run / "final"
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["form"] == "onnx" and manifest["entry"] == "model.onnx"
    assert manifest["inputs"] == [{"name": "images", "shape": [1, 1, 28, 28], "dtype": "float32"}]
    assert manifest["library_versions"]["onnxruntime"]
    assert manifest["recipe"]["name"] == "quickstart"
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((final / name).read_bytes()).hexdigest() == digest
    import onnxruntime as ort

    session = ort.InferenceSession(str(final / "model.onnx"), providers=["CPUExecutionProvider"])
    out = session.run(None, {"images": np.zeros((3, 1, 28, 28), np.float32)})[0]
    assert out.shape == (3, 10)  # the batch axis stayed dynamic


def test_markdown_and_html_reports_show_every_stage(quickstart_run: Path) -> None:
    markdown = (quickstart_run / "report.md").read_text()
    html = (quickstart_run / "report.html").read_text()
    for name in ("baseline", "export", "int8"):
        assert f"| {name} |" in markdown
        assert f"<td>{name}</td>" in html
    assert "speedup vs base" in markdown and "QUICK MODE" in markdown


def test_onnx_model_as_input_starts_at_the_onnx_form(quickstart_run: Path, tmp_path: Path) -> None:
    recipe = quickstart_dict(quickstart_run / "artifacts" / "export" / "model.onnx", eval_samples=500)
    recipe["model"].pop("factory")
    recipe["model"].pop("kwargs")
    recipe["stages"] = [{"name": "int8", "pass": "quantize.ort", "with": {"subset_size": 100}}]
    recipe["budget"] = {"accuracy_drop": 0.03}
    report = run_recipe(recipe, out=tmp_path / "out")
    assert [s["form"] for s in report.stages] == ["onnx", "onnx"]
    assert report.stage("int8")["accuracy"]["value"] > 0.85

    recipe["stages"] = [{"name": "export", "pass": "export.onnx"}]
    result = run_cli("validate", str(write_recipe(tmp_path, recipe)))
    assert result.returncode == EXIT_USAGE
    assert "takes torch but receives onnx" in result.stderr


# ------------------------------------------------------------------------------------ custom passes


class BreakClassifierConfig(PassConfig):
    scale: float = 0.0


@register_pass
class BreakClassifier(Pass):
    """Scales the ONNX model's last weight matrix: a stand-in for a pass that destroys accuracy."""

    name = "test.break_classifier"
    summary = "Scale the final Gemm weights (test pass)."
    input_forms = ("onnx",)
    output_form = "onnx"
    Config = BreakClassifierConfig

    def run(self, artifact: Artifact, ctx) -> Artifact:
        from onnx import numpy_helper

        model = onnx.load(str(artifact.entry_path))
        gemm = [n for n in model.graph.node if n.op_type in ("Gemm", "MatMul")][-1]
        for init in model.graph.initializer:
            if init.name in gemm.input:
                array = numpy_helper.to_array(init)
                if array.ndim == 2:
                    init.CopyFrom(numpy_helper.from_array((array * self.config.scale).astype(array.dtype), init.name))
        onnx.save(model, str(ctx.work_dir / "model.onnx"))
        return self.new_artifact(artifact, ctx, entry="model.onnx", facts=dict(artifact.facts))


def test_custom_pass_by_decorator_runs_inside_a_recipe(tiny_checkpoint: Path, tmp_path: Path) -> None:
    recipe = quickstart_dict(tiny_checkpoint, eval_samples=300)
    recipe["budget"] = {}
    recipe["stages"] = [{"name": "export", "pass": "export.onnx"},
                        {"name": "custom", "pass": "test.break_classifier", "with": {"scale": 1.0}}]
    report = run_recipe(recipe, out=tmp_path / "out")
    custom = report.stage("custom")
    assert custom["pass"] == "test.break_classifier" and custom["status"] == "ok"
    assert custom["config"] == {"scale": 1.0}
    # Scale 1.0 changes nothing, so both ONNX stages predict identically.
    assert custom["accuracy"]["correct"] == report.stage("export")["accuracy"]["correct"]


def test_budget_gate_stops_the_run_writes_the_report_and_keeps_the_previous_final(
        example_checkpoint: Path, quickstart_run: Path, tmp_path: Path, clean_copy) -> None:
    out = clean_copy(quickstart_run)
    final_before = sha256_tree(out / "final")
    recipe = quickstart_dict(example_checkpoint, eval_samples=500)
    recipe["stages"] = [{"name": "export", "pass": "export.onnx"},
                        {"name": "broken", "pass": "test.break_classifier", "with": {"scale": 0.0}},
                        {"name": "never", "pass": "quantize.ort"}]
    with pytest.raises(GateFailed) as caught:
        run_recipe(recipe, out=out)
    assert "broken" in str(caught.value) and "budget" in str(caught.value)
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is False
    assert [s["name"] for s in report["stages"]] == ["baseline", "export", "broken"]
    assert report["stages"][-1]["status"] == "failed"
    assert sha256_tree(out / "final") == final_before
    assert not any(p.name.startswith((".staging", ".old", ".lock")) for p in out.iterdir())


@pytest.mark.slow  # kept out of the fast suite for time (about 15-35 s); runs in the slow suite
def test_budget_failure_exit_code_from_the_cli(example_checkpoint: Path, tmp_path: Path) -> None:
    recipe = quickstart_dict(example_checkpoint, eval_samples=300)
    recipe["stages"] = [{"name": "export", "pass": "export.onnx"},
                        {"name": "broken", "pass": "python:tests.test_end_to_end:BreakClassifier"}]
    result = run_cli("run", str(write_recipe(tmp_path, recipe)), "--out", str(tmp_path / "out"))
    assert result.returncode == EXIT_GATE_FAILED, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("optimizer: error: stage 'broken'")
    assert "FAILED" in result.stdout


# --------------------------------------------------------------------------------------- failures


class Drifting:
    """A module with Python-side randomness: the exporter bakes one draw in as a constant, so the
    exported model cannot match eager execution (the kind of silent export bug the check exists for)."""

    source = '''
import random

import torch
from torch import nn

class Drifting(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(784, 10)
        self.rng = random.Random()

    def forward(self, x):
        return self.fc(x.flatten(1)) + 10.0 * self.rng.random()

def build():
    torch.manual_seed(0)
    return Drifting()
'''


def test_export_verification_catches_a_broken_export(tmp_path: Path) -> None:
    (tmp_path / "drifting_model.py").write_text(Drifting.source)
    sys.path.insert(0, str(tmp_path))
    try:
        import torch
        from safetensors.torch import save_file

        import drifting_model

        save_file(drifting_model.build().state_dict(), str(tmp_path / "drift.safetensors"))
        recipe = quickstart_dict(tmp_path / "drift.safetensors", eval_samples=200)
        recipe["model"].update(factory="drifting_model:build", kwargs={})
        recipe["budget"] = {}
        recipe["stages"] = [{"name": "export", "pass": "export.onnx"}]
        with pytest.raises(GateFailed, match="differs from PyTorch beyond tolerance"):
            run_recipe(recipe, out=tmp_path / "out")
        report = json.loads((tmp_path / "out" / "report.json").read_text())
        fidelity = report["stages"][1]["details"]["fidelity"]
        assert fidelity["within_tolerance"] is False and fidelity["max_abs_diff"] > 1e-3
        assert not (tmp_path / "out" / "final").exists()
        del torch
    finally:
        sys.path.remove(str(tmp_path))


def test_pickle_checkpoint_that_runs_code_is_refused_with_exit_3(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import torch

    torch.save({"conv.weight": Payload()}, tmp_path / "evil.pt")
    recipe = quickstart_dict(tmp_path / "evil.pt", eval_samples=100)
    result = run_cli("run", str(write_recipe(tmp_path, recipe)), "--out", str(tmp_path / "out"))
    assert result.returncode == EXIT_INPUT_REJECTED, result.stderr[-2000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("optimizer: error:") and "evil.pt" in error and "could run code" in error
    assert "weights_only=False" not in result.stderr
    assert not marker.exists()
    assert not (tmp_path / "out" / "report.json").exists()


def test_missing_checkpoint_and_misspelled_key_fail_before_any_work(tmp_path: Path) -> None:
    recipe = quickstart_dict(tmp_path / "nope.safetensors")
    result = run_cli("run", str(write_recipe(tmp_path, recipe)), "--out", str(tmp_path / "out"))
    assert result.returncode == EXIT_USAGE
    assert "nope.safetensors" in result.stderr and len(result.stderr.strip().splitlines()) == 1

    recipe = quickstart_dict(tmp_path / "nope.safetensors")
    recipe["stages"][0]["with"] = {"opset": 18, "dynamic_bach": True}
    result = run_cli("run", str(write_recipe(tmp_path, recipe)), "--out", str(tmp_path / "out"))
    assert result.returncode == EXIT_USAGE
    assert "did you mean 'dynamic_batch'" in result.stderr
    assert not (tmp_path / "out").exists()


def test_opset_override_out_of_range_exits_2_before_work(tmp_path: Path) -> None:
    result = run_cli("run", "recipes/quickstart.yaml", "--set", "stages.0.with.opset=99", "--out",
                     str(tmp_path / "out"))
    assert result.returncode == EXIT_USAGE
    assert "stages.0.with.opset" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_output_locked_by_a_live_run_exits_6(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(str(sleeper.pid))
        recipe = quickstart_dict(tiny_checkpoint, eval_samples=100)
        recipe["budget"] = {}
        result = run_cli("run", str(write_recipe(tmp_path, recipe)), "--out", str(out))
        assert result.returncode == EXIT_LOCKED
        assert "another run" in result.stderr
    finally:
        sleeper.kill()
        sleeper.wait()


def test_ctrl_c_exits_130_naming_the_stage_and_leaves_no_partial_output(tiny_checkpoint: Path, tmp_path: Path) -> None:
    import signal
    import time

    recipe = quickstart_dict(tiny_checkpoint, quick=False, eval_samples=200)
    recipe["budget"] = {}
    recipe["evaluate"]["latency"].update(min_duration_s=30, max_duration_s=60)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    process = subprocess.Popen([sys.executable, "-m", "optimizer", "run", str(write_recipe(tmp_path, recipe)),
                                "--out", str(out)], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True,
                               preexec_fn=default_sigint)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "measurements").exists() and not any(out.glob(".staging-*/measurements")):
        time.sleep(0.2)
    time.sleep(2)  # inside the baseline's latency loop by now
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "interrupted during stage 'baseline'" in stderr
    leftovers = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert not leftovers, leftovers
