"""compile.openvino and the OpenVINO runtime on the trained example: accuracy, latency, reload, safety."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from optimizer import run_recipe
from optimizer.artifact import Artifact
from optimizer.errors import InputRejected, RecipeError
from optimizer.recipe import load_recipe
from optimizer.validate import validate_recipe
from tests.conftest import REPO, quickstart_dict

pytest.importorskip("openvino", reason="OpenVINO is not installed: pip install 'optimizer[openvino]'")


def openvino_recipe(checkpoint: Path, stages: list[dict] | None = None, eval_samples: int = 2000) -> dict:
    recipe = yaml.safe_load((REPO / "recipes" / "cpu_openvino_int8.yaml").read_text())
    recipe["model"]["checkpoint"] = str(checkpoint)
    recipe["evaluate"]["latency"]["mode"] = "quick"
    recipe["data"]["eval"]["samples"] = eval_samples
    if stages is not None:
        recipe["stages"] = stages
    return recipe


@pytest.fixture(scope="module")
def int8_run(example_checkpoint: Path, tmp_path_factory):
    """recipes/cpu_openvino_int8.yaml as shipped (export -> NNCF INT8 -> OpenVINO), test-sized measurement."""
    out = tmp_path_factory.mktemp("ov_int8") / "out"
    return run_recipe(openvino_recipe(example_checkpoint), out=out), out


@pytest.fixture(scope="module")
def fp32_run(example_checkpoint: Path, tmp_path_factory):
    """export -> compile.openvino (f32) -> quantize.nncf on the IR."""
    stages = [
        {"name": "export", "pass": "export.onnx"},
        {"name": "openvino", "pass": "compile.openvino", "with": {"precision_hint": "f32"}},
        {"name": "int8", "pass": "quantize.nncf", "with": {"subset_size": 300}},
    ]
    out = tmp_path_factory.mktemp("ov_fp32") / "out"
    return run_recipe(openvino_recipe(example_checkpoint, stages), out=out), out


def test_openvino_int8_stage_keeps_onnx_accuracy_and_is_measured(int8_run) -> None:
    report, out = int8_run
    assert report.passed
    int8, ov = report.stage("int8"), report.stage("openvino")
    assert ov["form"] == "openvino" and ov["precision"] == "int8"
    assert abs(ov["accuracy"]["value"] - int8["accuracy"]["value"]) <= 0.005
    assert ov["latency"]["p50_ms"] > 0 and ov["throughput"]["samples_per_s"] > 0
    # The precision actually in force is read back from the compiled model and recorded.
    assert ov["runtime"]["runtime"] == "openvino"
    assert ov["runtime"]["properties"]["INFERENCE_PRECISION_HINT"] == "f32"
    assert ov["runtime"]["properties"]["PERFORMANCE_HINT"] == "LATENCY"
    assert ov["runtime"]["properties"]["INFERENCE_NUM_THREADS"] == "1"
    assert ov["details"]["fidelity"]["top1_agreement"] >= 0.98
    # A classifier's check is top-1 agreement alone, as it always was: no cosine figures.
    assert "cosine_mean" not in ov["details"]["fidelity"] and "cosine_mean" not in int8["details"]["fidelity"]
    # final/ holds the stage the report recommends (publish: recommended, the recipe's default): the INT8 ONNX
    # model or its IR, whichever measured significantly faster here; its manifest names it.
    manifest = json.loads((out / "final" / "manifest.json").read_text())
    published = report.data["publish"]["stage"]
    assert manifest["stage"] == published and published in ("int8", "openvino")
    entry = {"openvino": {"model.xml", "model.bin"}, "onnx": {"model.onnx"}}[report.stage(published)["form"]]
    assert entry <= {p.name for p in (out / "final").iterdir()}


def test_openvino_ir_reloads_in_a_fresh_process_with_identical_outputs(int8_run) -> None:
    _, out = int8_run
    folder = out / "artifacts" / "openvino"
    artifact = Artifact.load(folder, verify=True)
    from optimizer.runtimes.openvino_cpu import OpenVinoRuntime

    inputs = {"images": np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)}
    here = OpenVinoRuntime(artifact, threads=1).run(inputs)
    np.save(out / "inputs.npy", inputs["images"])
    script = (
        "import sys, numpy as np\n"
        "from optimizer.artifact import Artifact\n"
        "from optimizer.runtimes.openvino_cpu import OpenVinoRuntime\n"
        f"a = Artifact.load({str(folder)!r}, verify=True)\n"
        f"x = np.load({str(out / 'inputs.npy')!r})\n"
        f"np.save({str(out / 'fresh.npy')!r}, OpenVinoRuntime(a, threads=1).run({{'images': x}}))\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO, env=dict(os.environ))
    np.testing.assert_array_equal(np.load(out / "fresh.npy"), here)


def test_fp32_openvino_matches_onnx_and_nncf_quantizes_the_ir(fp32_run) -> None:
    report, out = fp32_run
    assert report.passed
    export, ov, int8 = report.stage("export"), report.stage("openvino"), report.stage("int8")
    assert ov["precision"] == "fp32" and ov["details"]["fidelity"]["elementwise_checked"]
    assert ov["details"]["fidelity"]["within_tolerance"]
    assert abs(ov["accuracy"]["value"] - export["accuracy"]["value"]) <= 0.002
    # quantize.nncf keeps the OpenVINO form: the IR gains FakeQuantize nodes and stays within a point.
    assert int8["form"] == "openvino" and int8["precision"] == "int8"
    assert int8["details"]["quantization"]["fake_quantize_nodes"] > 0
    assert export["accuracy"]["value"] - int8["accuracy"]["value"] <= 0.01
    # Its agreement gate compared the IR with the FP32 IR, both on OpenVINO.
    fidelity = int8["details"]["fidelity"]
    assert fidelity["reference"] == "the FP32 input (openvino)" and fidelity["top1_agreement"] >= 0.97
    assert int8["runtime"]["properties"]["INFERENCE_PRECISION_HINT"] == "f32"


@pytest.mark.slow  # kept out of the fast suite for time (about 15-35 s); runs in the slow suite
def test_accuracy_control_on_the_ir_names_the_operations_it_reverted(example_checkpoint: Path, tmp_path: Path) -> None:
    """The IR path of accuracy control (the MiniLM recipe's): calibration images at half the model's scale make
    plain INT8 lose points on data.validation; the operations NNCF gives back to float are named, and they
    are float in the IR deployed."""
    stages = [
        {"name": "export", "pass": "export.onnx"},
        {"name": "openvino", "pass": "compile.openvino", "with": {"precision_hint": "f32"}},
        {"name": "int8", "pass": "quantize.nncf",
         "with": {"subset_size": 300, "max_drop": 0.01, "accuracy_control_samples": 500}},
    ]
    recipe = openvino_recipe(example_checkpoint, stages, eval_samples=500)
    recipe["data"]["calibration"]["std"] = [0.706]
    recipe["data"]["validation"] = {"dataset": "fashion-mnist", "split": "train", "samples": 500,
                                    "mean": [0.2860], "std": [0.3530]}
    recipe["publish"] = "last"  # the INT8 IR is the one deployed, whether or not the FP32 IR timed faster here
    report = run_recipe(recipe, out=tmp_path / "o")
    control = report.stage("int8")["details"]["accuracy_control"]
    assert control["plain_int8_drop"] > 0.03 and control["controlled_drop"] <= 0.01
    assert control["reverted"] and all(r["type"] == "Convolution" for r in control["reverted"])
    import openvino as ov

    from optimizer.passes.accuracy_control import quantized_operations

    ir = ov.Core().read_model(str(tmp_path / "o" / "final" / "model.xml"))
    remaining = quantized_operations(ir)
    assert remaining and not {r["name"] for r in control["reverted"]} & set(remaining)


def test_offline_measurement_uses_a_throughput_hinted_model(fp32_run) -> None:
    from optimizer.runtimes.openvino_cpu import OpenVinoRuntime, property_text

    _, out = fp32_run
    runtime = OpenVinoRuntime(Artifact.load(out / "artifacts" / "openvino"), threads=1)
    batch = {"images": np.zeros((8, 1, 28, 28), np.float32)}
    run_all = runtime.offline_runner(batch)
    run_all()
    compiled, _ = runtime._offline
    assert property_text(compiled.get_property("PERFORMANCE_HINT")) == "THROUGHPUT"
    assert property_text(compiled.get_property("INFERENCE_PRECISION_HINT")) == "f32"


def test_bound_inputs_follow_the_callers_arrays(fp32_run) -> None:
    """The runtime keeps an array bound to its request between calls (the latency loop's bare infer()): it
    must still read the array's current contents, and take any layout, dtype and batch it is given."""
    from optimizer.runtimes.openvino_cpu import OpenVinoRuntime

    _, out = fp32_run
    runtime = OpenVinoRuntime(Artifact.load(out / "artifacts" / "openvino"), threads=1)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((2, 1, 28, 28), dtype=np.float32)
    first = runtime.run({"images": images})
    again = runtime.run({"images": images})
    np.testing.assert_array_equal(first, again)
    images[:] = rng.standard_normal(images.shape, dtype=np.float32)  # changed in place, same object
    changed = runtime.run({"images": images})
    np.testing.assert_allclose(changed, runtime.run({"images": images.copy()}), rtol=1e-5, atol=1e-5)
    assert not np.allclose(changed, first)
    odd = np.asfortranarray(images[:1].astype(np.float64))  # copied, not bound
    np.testing.assert_allclose(runtime.run({"images": odd}), changed[:1], rtol=1e-4, atol=1e-4)


def test_a_timed_call_skips_the_public_infer_wrapper(fp32_run, monkeypatch) -> None:
    """OpenVINO's public InferRequest.infer() dispatches inputs and copies every output into a new dict on
    each call: 5 % of the example's INT8 latency that benchmark_app never pays. The runtime's call must go
    straight to the binding's infer and still return the public method's outputs."""
    import openvino

    from optimizer.runtimes.openvino_cpu import OpenVinoRuntime

    _, out = fp32_run
    runtime = OpenVinoRuntime(Artifact.load(out / "artifacts" / "openvino"), threads=1)
    images = np.random.default_rng(1).standard_normal((3, 1, 28, 28), dtype=np.float32)
    public = runtime.request.infer({"images": images})[0].copy()
    calls = []
    original = openvino.InferRequest.infer
    monkeypatch.setattr(openvino.InferRequest, "infer", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    for _ in range(3):
        np.testing.assert_array_equal(runtime.run({"images": images}), public)
    assert calls == []


def test_compile_properties_leave_nothing_to_defaults() -> None:
    from optimizer.runtimes.openvino_cpu import compile_properties

    latency = compile_properties(precision="f32", performance_hint="latency", threads=2)
    assert latency["INFERENCE_PRECISION_HINT"] == "f32" and latency["NUM_STREAMS"] == 1
    assert latency["INFERENCE_NUM_THREADS"] == 2 and latency["PERFORMANCE_HINT"] == "LATENCY"
    throughput = compile_properties(precision="bf16", performance_hint="throughput", threads=1)
    assert "NUM_STREAMS" not in throughput and throughput["INFERENCE_PRECISION_HINT"] == "bf16"
    with pytest.raises(ValueError, match="precision hint"):
        compile_properties(precision="fp32", performance_hint="latency", threads=1)


def test_ir_weights_outside_the_artifact_folder_are_refused(int8_run, tmp_path: Path) -> None:
    import shutil

    from optimizer.runtimes.openvino_cpu import OpenVinoRuntime

    _, out = int8_run
    folder = tmp_path / "ir"
    shutil.copytree(out / "artifacts" / "openvino", folder)
    outside = tmp_path / "elsewhere.bin"
    (folder / "model.bin").rename(outside)
    (folder / "model.bin").symlink_to(outside)
    with pytest.raises(InputRejected, match="outside"):
        OpenVinoRuntime(Artifact.load(folder), threads=1)


def test_shipped_recipe_validates_and_forms_chain(example_checkpoint: Path) -> None:
    loaded = load_recipe(REPO / "recipes" / "cpu_openvino_int8.yaml")
    checks = {check.what: check.detail for check in validate_recipe(loaded)}
    assert checks["forms"] == "torch -> onnx -> onnx -> openvino"


def test_compile_openvino_on_a_torch_model_is_a_recipe_error(example_checkpoint: Path) -> None:
    recipe = quickstart_dict(example_checkpoint)
    recipe["stages"] = [{"name": "openvino", "pass": "compile.openvino"}]
    with pytest.raises(RecipeError, match="takes onnx but receives torch"):
        validate_recipe(load_recipe(recipe))


def test_every_runtime_profiles_per_operator_in_a_fresh_process(int8_run) -> None:
    from optimizer.measure.profile import format_profile, profile_artifact

    _, out = int8_run
    tools = {}
    for stage in ("baseline", "export", "int8", "openvino"):
        profile = profile_artifact(out / "artifacts" / stage, threads=1, iterations=5)
        assert profile["by_op_type"] and profile["total_ms"] > 0
        assert sum(row["share"] for row in profile["by_op_type"]) == pytest.approx(1.0)
        tools[stage] = profile["tool"]
        assert stage in format_profile(stage, profile)
    assert tools == {"baseline": "torch.profiler", "export": "onnxruntime", "int8": "onnxruntime",
                     "openvino": "openvino perf counters"}
    # The INT8 models run integer kernels: the profile shows where the quantized time goes.
    assert any("QLinear" in row["op_type"] or "Integer" in row["op_type"]
               for row in profile_artifact(out / "artifacts" / "int8", threads=1, iterations=5)["by_op_type"])
