"""evaluate.latency.runtime: torch stages timed on the deployment runtime through a throwaway export.

Runs on the built-in example with small eval sets and quick latency: a recipe that ends on ONNX (or OpenVINO)
times its torch baseline there by default, ``native`` keeps PyTorch eager, the torch artifacts stay as they
were, the report names each stage's runtime, and a stage that cannot be exported falls back to eager with
the reason shown.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from optimizer import Artifact, run_recipe
from optimizer.errors import RecipeError
from tests.conftest import quickstart_dict

EVAL_SAMPLES = 300


def onnx_recipe(checkpoint: Path, runtime: str | None = None, *, openvino: dict | None = None) -> dict:
    """baseline -> export (TorchScript, opset 17: the throwaway must follow these) [-> compile.openvino]."""
    recipe = quickstart_dict(checkpoint, eval_samples=EVAL_SAMPLES)
    recipe["stages"] = [{"name": "export", "pass": "export.onnx", "with": {"exporter": "torchscript", "opset": 17}}]
    if openvino is not None:
        recipe["stages"].append({"name": "openvino", "pass": "compile.openvino", "with": openvino})
    if runtime is not None:
        recipe["evaluate"]["latency"]["runtime"] = runtime
    return recipe


def report_of(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def tree_hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def print_waterfall(title: str, report: dict) -> None:
    """The p50 waterfall as the run measured it (shown with pytest -s)."""
    stages = report["stages"]
    steps = [f"{s['name']} {s['latency']['p50_ms']:.3f} ms on {s['latency']['runtime']}"
             + (f" ({s['vs_previous']['speedup']:.2f}x vs prev)" if s.get("vs_previous") else "") for s in stages]
    print(f"\n{title}: " + " -> ".join(steps))


@pytest.fixture(scope="module")
def onnx_runs(example_checkpoint: Path, tmp_path_factory) -> dict[str, Path]:
    """The same ONNX-ending recipe with the default runtime setting and with ``native``."""
    folder = tmp_path_factory.mktemp("deploy-timing")
    outs = {}
    for name, runtime in (("default", None), ("native", "native")):
        outs[name] = folder / name
        report = run_recipe(onnx_recipe(example_checkpoint, runtime), out=outs[name])
        assert report.passed
        print_waterfall(f"waterfall ({name})", report.data)
    return outs


def test_onnx_recipe_times_the_torch_baseline_on_onnxruntime_by_default(onnx_runs: dict[str, Path]) -> None:
    report = report_of(onnx_runs["default"])
    assert report["recipe"]["evaluate"]["latency"]["runtime"] == "auto"
    baseline, export = report["stages"]
    assert baseline["form"] == "torch"
    assert baseline["latency"]["runtime"] == "onnxruntime" and baseline["latency"]["timed_via"] == "export"
    assert "deploy_fallback" not in baseline["latency"]
    assert baseline["runtime"]["runtime"] == "onnxruntime"
    # Accuracy is still the torch model's own, scored by PyTorch.
    assert baseline["accuracy_runtime"]["runtime"] == "torch-eager"
    assert baseline["accuracy"] == report_of(onnx_runs["native"])["stages"][0]["accuracy"]
    assert export["latency"]["runtime"] == "onnxruntime" and export["latency"]["timed_via"] == "artifact"
    assert baseline["latency"]["iterations"] >= 30


def test_native_keeps_torch_stages_on_pytorch_eager(onnx_runs: dict[str, Path]) -> None:
    baseline, export = report_of(onnx_runs["native"])["stages"]
    assert baseline["latency"]["runtime"] == "torch-eager" and baseline["latency"]["timed_via"] == "artifact"
    assert baseline["runtime"]["runtime"] == "torch-eager" and "accuracy_runtime" not in baseline
    assert export["latency"]["runtime"] == "onnxruntime"


def test_the_throwaway_export_leaves_the_torch_artifact_unchanged(onnx_runs: dict[str, Path]) -> None:
    default, native = (report_of(onnx_runs[name])["stages"][0] for name in ("default", "native"))
    assert default["sha256"] == native["sha256"]
    for name in ("default", "native"):
        folder = onnx_runs[name] / "artifacts" / "baseline"
        artifact = Artifact.load(folder, verify=True)
        assert artifact.form == "torch" and sorted(artifact.files) == ["model.safetensors"]
        assert set(tree_hashes(folder)) == {"model.safetensors", "artifact.json"}
    assert tree_hashes(onnx_runs["default"] / "artifacts" / "baseline") == \
        tree_hashes(onnx_runs["native"] / "artifacts" / "baseline")
    # Nothing of the throwaway is published.
    assert not list(onnx_runs["default"].rglob("deploy-timing"))


def test_reports_name_the_runtime_each_stage_was_timed_on(onnx_runs: dict[str, Path]) -> None:
    markdown = (onnx_runs["default"] / "report.md").read_text()
    assert ("Latency timed on: baseline on onnxruntime through a throwaway export, in the torch stage's own "
            "precision (FP32); export on onnxruntime.") in markdown
    html = (onnx_runs["default"] / "report.html").read_text()
    assert "baseline on onnxruntime through a throwaway export" in html
    native = (onnx_runs["native"] / "report.md").read_text()
    assert "Latency timed on: baseline on PyTorch eager; export on onnxruntime." in native
    assert "evaluate.latency.runtime: deploy" in native  # the runtime switch sits in the export's speedup


def test_openvino_recipe_times_the_torch_baseline_on_openvino_f32(example_checkpoint: Path, tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    report = run_recipe(onnx_recipe(example_checkpoint, openvino={"performance_hint": "latency"}),
                        out=tmp_path / "out").data
    print_waterfall("waterfall (OpenVINO, default)", report)
    baseline, export, openvino = report["stages"]
    assert baseline["latency"]["runtime"] == "openvino" and baseline["latency"]["timed_via"] == "export"
    # The compile stage's explicit precision hint (f32 by default), never OpenVINO's own choice.
    assert baseline["runtime"]["precision_hint"] == "f32"
    assert baseline["runtime"]["properties"]["INFERENCE_PRECISION_HINT"] == "f32"
    assert baseline["runtime"]["properties"]["PERFORMANCE_HINT"] == "LATENCY"
    assert baseline["accuracy_runtime"]["runtime"] == "torch-eager"
    assert export["latency"]["runtime"] == "onnxruntime"  # an ONNX stage stays on its own runtime
    assert openvino["latency"]["runtime"] == "openvino"
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "baseline on OpenVINO f32 through a throwaway export, in the torch stage's own precision (FP32)" in markdown


@pytest.mark.parametrize("failure", ["export", "timing"])
def test_a_torch_stage_that_cannot_be_timed_there_falls_back_to_eager(
        failure: str, example_checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    from optimizer import runner

    if failure == "export":
        def broken(*args, **kwargs):
            raise RuntimeError("Exporting the operator 'aten::made_up' is not supported")
    else:
        def broken(artifact, timing, folder, samples, **kwargs):
            # An export the runtime cannot load: the timing process fails, the stage must not.
            folder.mkdir(parents=True)
            (folder / "model.onnx").write_bytes(b"not an onnx model")
            return Artifact("onnx", folder, "model.onnx", list(artifact.inputs)).finalize()

    monkeypatch.setattr(runner, "throwaway_artifact", broken)
    report = run_recipe(onnx_recipe(example_checkpoint), out=tmp_path / "out")
    assert report.passed
    latency = report.stage("baseline")["latency"]
    assert latency["runtime"] == "torch-eager" and latency["timed_via"] == "artifact"
    expected = "aten::made_up" if failure == "export" else "timing the throwaway export failed"
    assert expected in latency["deploy_fallback"]
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "Stage 'baseline' was timed on PyTorch eager, not on the deployment runtime" in markdown
    assert expected in markdown


def test_runtime_setting_resolves_against_the_recipe(example_checkpoint: Path) -> None:
    from optimizer.measure.deploy_timing import deploy_timing
    from optimizer.recipe import load_recipe

    def timing(recipe: dict):
        return deploy_timing(load_recipe(recipe).recipe)

    onnx = timing(onnx_recipe(example_checkpoint))
    assert onnx.runtime == "onnxruntime" and onnx.openvino is None
    assert (onnx.export["exporter"], onnx.export["opset"]) == ("torchscript", 17)
    assert timing(onnx_recipe(example_checkpoint, "native")) is None
    openvino = timing(onnx_recipe(example_checkpoint, "deploy", openvino={"precision_hint": "bf16", "batch": 1}))
    assert openvino.runtime == "openvino"
    assert openvino.openvino["precision_hint"] == "bf16" and openvino.openvino["batch"] == 1

    torch_only = quickstart_dict(example_checkpoint)
    torch_only["stages"] = [{"name": "prune", "pass": "prune.structured", "with": {"ratio": 0.5}}]
    assert timing(torch_only) is None  # auto: nothing to deploy to
    torch_only["evaluate"]["latency"]["runtime"] = "deploy"
    with pytest.raises(RecipeError) as caught:
        timing(torch_only)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("evaluate.latency.runtime: 'deploy'")
    assert "ends on torch" in message and "'native' or 'auto'" in message


def test_cache_key_covers_where_torch_stages_are_timed(example_checkpoint: Path) -> None:
    from optimizer import stage_cache
    from optimizer.passes.export_onnx import ExportOnnx
    from optimizer.recipe import load_recipe

    artifact = Artifact("torch", example_checkpoint.parent, example_checkpoint.name, [],
                        files={"model.safetensors": "0" * 64})

    def keys(recipe: dict) -> tuple[str, str]:
        loaded = load_recipe(recipe)
        common = stage_cache.common_key_parts(loaded)
        baseline = stage_cache.key_of(stage_cache.baseline_key_parts(loaded, common))
        export = stage_cache.key_of(stage_cache.stage_key_parts("export", ExportOnnx, {"opset": 17}, artifact, {},
                                                                common))
        return baseline, export

    auto = keys(onnx_recipe(example_checkpoint, openvino={"precision_hint": "f32"}))
    assert keys(onnx_recipe(example_checkpoint, openvino={"precision_hint": "f32"})) == auto
    assert keys(onnx_recipe(example_checkpoint, "native", openvino={"precision_hint": "f32"}))[0] != auto[0]
    # The compile stage's precision hint changes how the torch baseline is timed, not the ONNX export's figures.
    bf16 = keys(onnx_recipe(example_checkpoint, openvino={"precision_hint": "bf16"}))
    assert bf16[0] != auto[0] and bf16[1] == auto[1]
    # 'auto' is keyed by what it resolves to: appending a stage that ends the recipe elsewhere re-times the baseline.
    assert keys(onnx_recipe(example_checkpoint))[0] != auto[0]
