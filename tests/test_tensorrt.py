"""compile.tensorrt and the TensorRT runtime.

Everything that decides what happens around an engine (profiles, the manifest, when an engine may be
loaded and when it is rebuilt, error messages, Q/DQ preparation, recipe validation) runs here without
TensorRT or a GPU. The tests marked ``gpu`` build real engines and skip, naming what is missing, elsewhere.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from optimizer.errors import (
    InputRejected,
    MissingDependency,
    RecipeError,
    ResourceFailure,
    StageError,
)
from optimizer.recipe import InputSpec
from optimizer.tensorrt_support import (
    ENGINE_FILE,
    MANIFEST_FILE,
    SOURCE_ONNX,
    BuildPlan,
    BuildSettings,
    EngineManifest,
    HostInfo,
    InputProfile,
    ParserIssue,
    build_failure_error,
    build_profiles,
    check_batch_range,
    check_engine_compatible,
    check_profiles_against_onnx,
    check_qdq_for_int8,
    decide_engine_action,
    inspect_qdq,
    onnx_input_dims,
    parse_trtexec_summary,
    parse_version,
    plan_precision,
    read_manifest,
    refuse_engine_input,
    require_cuda_gpu,
    require_tensorrt,
    resolve_engine,
    retype_uint8_qdq,
    sha256_bytes,
    shapes_argument,
    write_manifest,
)
from tests.conftest import REPO, quickstart_dict

IMAGES = InputSpec(name="images", shape=[1, 1, 28, 28])
HOST = HostInfo("10.13.0.35", "NVIDIA H100 80GB HBM3", "9.0")


def _gpu_skip_reason() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "needs the tensorrt package (pip install 'optimizer[tensorrt]')"
    import torch

    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    return None


GPU_SKIP = _gpu_skip_reason()
needs_gpu = pytest.mark.skipif(GPU_SKIP is not None, reason=GPU_SKIP or "")


# ------------------------------------------------------------------------------------------ profiles


def test_batch_range_accepts_ordered_sizes_and_names_the_broken_bound() -> None:
    assert check_batch_range(1, 8, 64) is None
    assert check_batch_range(4, 4, 4) is None
    assert check_batch_range(8, 4, 64).startswith("min_batch 8 is above opt_batch 4")
    assert check_batch_range(1, 128, 64).startswith("opt_batch 128 is above max_batch 64")
    assert check_batch_range(0, 1, 1).startswith("min_batch must be at least 1")


def test_profiles_take_the_batch_from_the_config_and_other_axes_from_the_input_spec() -> None:
    mask = InputSpec(name="mask", shape=[2, 16], dtype="int64")
    profiles = build_profiles([IMAGES, mask], min_batch=1, opt_batch=8, max_batch=32, stage="trt")
    assert profiles == [
        InputProfile("images", (1, 1, 28, 28), (8, 1, 28, 28), (32, 1, 28, 28)),
        InputProfile("mask", (1, 16), (8, 16), (32, 16)),
    ]
    assert InputProfile.from_dict(profiles[0].to_dict()) == profiles[0]
    assert shapes_argument(profiles, 4) == "images:4x1x28x28,mask:4x16"


def test_an_invalid_profile_names_the_stage_and_the_field() -> None:
    with pytest.raises(RecipeError, match=r"stage 'trt': with\.opt_batch: opt_batch 128 is above max_batch 64"):
        build_profiles([IMAGES], min_batch=1, opt_batch=128, max_batch=64, stage="trt")
    with pytest.raises(RecipeError, match=r"stage 'trt': with\.min_batch"):
        build_profiles([IMAGES], min_batch=9, opt_batch=8, max_batch=64, stage="trt")


def test_a_profile_must_fit_the_onnx_model() -> None:
    profiles = build_profiles([IMAGES], min_batch=1, opt_batch=1, max_batch=8, stage="trt")
    check_profiles_against_onnx(profiles, {"images": [None, 1, 28, 28]}, stage="trt")
    with pytest.raises(RecipeError, match="fixed batch of 1; set min_batch, opt_batch and max_batch to 1"):
        check_profiles_against_onnx(profiles, {"images": [1, 1, 28, 28]}, stage="trt")
    with pytest.raises(InputRejected, match="axis 2 is 32 but the recipe shape says 28"):
        check_profiles_against_onnx(profiles, {"images": [None, 1, 32, 28]}, stage="trt")
    with pytest.raises(InputRejected, match=r"inputs \['input'\] differ from the recipe's inputs \['images'\]"):
        check_profiles_against_onnx(profiles, {"input": [None, 1, 28, 28]}, stage="trt")
    with pytest.raises(InputRejected, match="rank 3"):
        check_profiles_against_onnx(profiles, {"images": [None, 28, 28]}, stage="trt")


# -------------------------------------------------------------------------- tiny ONNX models (CPU)


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    """An untrained small_resnet exported with a dynamic batch axis (for plumbing, not accuracy)."""
    import torch

    from optimizer.zoo import small_resnet

    torch.manual_seed(0)
    model = small_resnet().eval()
    path = tmp_path_factory.mktemp("tiny") / "model.onnx"
    torch.onnx.export(model, (torch.randn(2, 1, 28, 28),), str(path), input_names=["images"],
                      output_names=["output"], opset_version=17, dynamo=False,
                      dynamic_axes={"images": {0: "batch"}, "output": {0: "batch"}})
    return path


@pytest.fixture(scope="module")
def nncf_onnx(tiny_onnx: Path, tmp_path_factory) -> Path:
    """The tiny model quantized by NNCF as quantize.nncf does it (signed and unsigned Q/DQ)."""
    import logging

    import nncf
    import onnx

    nncf.set_log_level(logging.ERROR)
    rng = np.random.default_rng(0)
    items = [{"images": rng.standard_normal((1, 1, 28, 28)).astype(np.float32)} for _ in range(32)]
    quantized = nncf.quantize(onnx.load(str(tiny_onnx)), nncf.Dataset(items), subset_size=32)
    path = tmp_path_factory.mktemp("nncf") / "model.onnx"
    onnx.save(quantized, str(path))
    return path


def test_onnx_input_dims_reports_a_dynamic_batch_as_none(tiny_onnx: Path) -> None:
    import onnx

    assert onnx_input_dims(onnx.load(str(tiny_onnx))) == {"images": [None, 1, 28, 28]}


def test_int8_needs_a_qdq_model(tiny_onnx: Path) -> None:
    import onnx

    report = inspect_qdq(onnx.load(str(tiny_onnx)))
    assert not report.has_qdq
    with pytest.raises(RecipeError, match="stage 'trt': precision int8 needs a Q/DQ ONNX model.*quantize.nncf"):
        check_qdq_for_int8(report, stage="trt")


def test_asymmetric_qdq_is_refused_for_tensorrt() -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    scale = numpy_helper.from_array(np.array(0.1, dtype=np.float32), "scale")
    zero = numpy_helper.from_array(np.array(128, dtype=np.uint8), "zero")
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"], name="q0"),
         helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["y"], name="dq0")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])], [scale, zero])
    report = inspect_qdq(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert report.asymmetric == ["q0", "dq0"]
    with pytest.raises(InputRejected, match="2 Q/DQ nodes have non-zero zero points.*only runs symmetric INT8"):
        check_qdq_for_int8(report, stage="trt")
    assert onnx.TensorProto.UINT8 == 2  # the constant tensorrt_support hard-codes


def test_unsigned_nncf_quantizers_become_signed_ones_with_the_same_range(nncf_onnx: Path) -> None:
    """TensorRT reads UINT8 zero points as INT8, clipping [0, 255] at 127; the rewrite keeps the range."""
    import onnx
    import onnxruntime as ort

    original = onnx.load(str(nncf_onnx))
    before = inspect_qdq(original)
    assert before.uint8_zero, "NNCF is expected to put unsigned quantizers after ReLU"
    check_qdq_for_int8(before, stage="trt")

    model = onnx.load(str(nncf_onnx))
    assert retype_uint8_qdq(model) == len(before.uint8_zero)
    after = inspect_qdq(model)
    assert not after.uint8_zero and len(after.int8_symmetric) == before.quantize + before.dequantize
    onnx.checker.check_model(model, full_check=True)

    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 1, 28, 28)).astype(np.float32)

    def run(proto) -> np.ndarray:
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {"images": x})[0]

    reference, retyped = run(original), run(model)
    scale = np.abs(reference).max()
    # Same range, about half the resolution on non-negative tensors: small differences only.
    assert np.abs(reference - retyped).max() <= 0.1 * scale
    assert (reference.argmax(1) == retyped.argmax(1)).mean() >= 0.9


# ------------------------------------------------------------------------------------- build plans


def test_precision_plans_follow_the_tensorrt_version() -> None:
    assert plan_precision("fp32", 10) == plan_precision("fp32", 11)
    assert plan_precision("fp32", 10).disable_tf32 and plan_precision("fp32", 10).strongly_typed

    fp16_10 = plan_precision("fp16", 10)
    assert not fp16_10.strongly_typed and fp16_10.flags == ("FP16",) and fp16_10.autocast is None
    fp16_11 = plan_precision("fp16", 11)  # TensorRT 11 removed BuilderFlag.FP16
    assert fp16_11.strongly_typed and fp16_11.flags == () and fp16_11.autocast == "fp16"
    assert plan_precision("bf16", 10).flags == ("BF16",)
    assert plan_precision("bf16", 11).autocast == "bf16"

    int8_10 = plan_precision("int8", 10)
    assert not int8_10.strongly_typed and int8_10.flags == ("INT8", "FP16")
    assert plan_precision("int8", 10, int8_fallback="fp32") == BuildPlan(
        strongly_typed=True, note=plan_precision("int8", 10, int8_fallback="fp32").note)
    int8_11 = plan_precision("int8", 11)
    assert int8_11.strongly_typed and int8_11.flags == () and int8_11.autocast == "fp16"
    for precision in ("fp32", "fp16", "bf16", "int8"):
        assert not set(plan_precision(precision, 11).flags), "no precision flags exist in TensorRT 11"
    assert BuildPlan.from_dict(int8_10.to_dict()) == int8_10
    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        plan_precision("int4", 10)


def test_version_parsing() -> None:
    assert parse_version("10.13.0.35") == (10, 13, 0, 35)
    assert parse_version("11.1.0rc1") == (11, 1, 0)
    assert parse_version("") == ()


# ---------------------------------------------------------------------------------------- manifest


def _manifest(engine: bytes = b"engine-bytes", source: bytes = b"onnx-bytes", **changes) -> EngineManifest:
    profiles = tuple(build_profiles([IMAGES], min_batch=1, opt_batch=1, max_batch=64, stage="trt"))
    fields = dict(
        tensorrt_version=HOST.tensorrt_version, gpu_name=HOST.gpu_name, compute_capability=HOST.compute_capability,
        engine_sha256=sha256_bytes(engine), source_onnx_sha256=sha256_bytes(source), precision="fp16",
        settings=BuildSettings("fp16", profiles, workspace_mb=1024), plan=plan_precision("fp16", 10),
        outputs=["output"],
    )
    fields.update(changes)
    return EngineManifest(**fields)


def test_manifest_round_trip(tmp_path: Path) -> None:
    manifest = _manifest()
    write_manifest(tmp_path / MANIFEST_FILE, manifest)
    data = json.loads((tmp_path / MANIFEST_FILE).read_text())
    for key in ("tensorrt_version", "gpu_name", "compute_capability", "engine_sha256", "source_onnx_sha256",
                "precision", "profile"):
        assert key in data
    assert data["profile"] == [{"name": "images", "min": [1, 1, 28, 28], "opt": [1, 1, 28, 28],
                                "max": [64, 1, 28, 28]}]
    assert read_manifest(tmp_path / MANIFEST_FILE) == manifest
    assert not list(tmp_path.glob("*.tmp")), "written atomically, no temporary file left"


def test_unreadable_manifests_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InputRejected, match="no engine manifest"):
        read_manifest(tmp_path / MANIFEST_FILE)
    (tmp_path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(InputRejected, match="not a readable engine manifest"):
        read_manifest(tmp_path / MANIFEST_FILE)
    data = _manifest().to_dict()
    data["engine_file"] = "../elsewhere.engine"  # a manifest never points outside its folder
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(InputRejected, match="not a plain file name"):
        read_manifest(tmp_path / MANIFEST_FILE)


def test_engine_compatibility_needs_the_same_tensorrt_gpu_and_compute_capability() -> None:
    manifest = _manifest()
    assert check_engine_compatible(manifest, "10.13.0.35", "NVIDIA H100 80GB HBM3", (9, 0)) is None
    assert "TensorRT 10.13.0.35, this machine has 10.14.1.48" in check_engine_compatible(
        manifest, "10.14.1.48", HOST.gpu_name, "9.0")
    assert "compute capability 9.0, this GPU has 8.9" in check_engine_compatible(
        manifest, HOST.tensorrt_version, "NVIDIA L4", (8, 9))
    assert "built on NVIDIA H100 80GB HBM3, this GPU is NVIDIA H100 PCIe" in check_engine_compatible(
        manifest, HOST.tensorrt_version, "NVIDIA H100 PCIe", "9.0")


def test_engine_decision() -> None:
    manifest = _manifest()
    common = dict(current_trt_version=HOST.tensorrt_version, current_gpu_name=HOST.gpu_name, current_cc="9.0")
    ok = decide_engine_action(manifest, engine_sha256=manifest.engine_sha256,
                              source_onnx_sha256=manifest.source_onnx_sha256, **common)
    assert ok.action == "load"
    tampered = decide_engine_action(manifest, engine_sha256=sha256_bytes(b"other"),
                                    source_onnx_sha256=manifest.source_onnx_sha256, **common)
    assert tampered.action == "rebuild" and "does not match the sha256" in tampered.reason
    missing = decide_engine_action(manifest, engine_sha256=None, source_onnx_sha256=manifest.source_onnx_sha256,
                                   **common)
    assert missing.action == "rebuild"
    with pytest.raises(InputRejected, match="source.onnx changed since the engine was built"):
        decide_engine_action(manifest, engine_sha256=manifest.engine_sha256,
                             source_onnx_sha256=sha256_bytes(b"edited"), **common)
    with pytest.raises(InputRejected, match="source.onnx is missing"):
        decide_engine_action(manifest, engine_sha256=manifest.engine_sha256, source_onnx_sha256=None, **common)


class _Rebuilder:
    """Stands in for the TensorRT build: records calls, returns fresh bytes."""

    def __init__(self) -> None:
        self.calls: list[Path] = []

    def __call__(self, manifest: EngineManifest, source: Path) -> bytes:
        assert source.name == SOURCE_ONNX and source.is_file()
        self.calls.append(source)
        return b"rebuilt-for-this-machine"


def _artifact_folder(tmp_path: Path, engine: bytes = b"engine-bytes", **changes) -> Path:
    folder = tmp_path / "artifact"
    folder.mkdir()
    (folder / ENGINE_FILE).write_bytes(engine)
    (folder / SOURCE_ONNX).write_bytes(b"onnx-bytes")
    write_manifest(folder / MANIFEST_FILE, _manifest(engine, **changes))
    return folder


def test_an_engine_built_here_is_loaded_as_is(tmp_path: Path) -> None:
    rebuild = _Rebuilder()
    resolved = resolve_engine(_artifact_folder(tmp_path), HOST, rebuild=rebuild, cache_dir=tmp_path / "cache")
    assert resolved.origin == "artifact" and resolved.data == b"engine-bytes"
    assert rebuild.calls == []


@pytest.mark.parametrize("foreign", [
    {"tensorrt_version": "10.9.0.34"},
    {"gpu_name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"},
    {"gpu_name": "NVIDIA H100 PCIe"},
], ids=["other-tensorrt", "other-gpu", "same-cc-other-model"])
def test_a_foreign_engine_is_rebuilt_never_returned_for_loading(tmp_path: Path, foreign: dict) -> None:
    folder = _artifact_folder(tmp_path, engine=b"foreign-engine", **foreign)
    rebuild = _Rebuilder()
    resolved = resolve_engine(folder, HOST, rebuild=rebuild, cache_dir=tmp_path / "cache")
    assert resolved.origin == "rebuilt" and resolved.data == b"rebuilt-for-this-machine"
    assert b"foreign" not in resolved.data and len(rebuild.calls) == 1
    assert resolved.manifest.tensorrt_version == HOST.tensorrt_version
    assert resolved.manifest.gpu_name == HOST.gpu_name
    assert (folder / ENGINE_FILE).read_bytes() == b"foreign-engine", "the artifact folder is left untouched"

    again = resolve_engine(folder, HOST, rebuild=rebuild, cache_dir=tmp_path / "cache")
    assert again.origin == "cache" and again.data == b"rebuilt-for-this-machine" and len(rebuild.calls) == 1


def test_a_tampered_engine_is_rebuilt_and_a_tampered_cache_too(tmp_path: Path) -> None:
    folder = _artifact_folder(tmp_path)
    (folder / ENGINE_FILE).write_bytes(b"swapped after the build")
    rebuild = _Rebuilder()
    resolved = resolve_engine(folder, HOST, rebuild=rebuild, cache_dir=tmp_path / "cache")
    assert resolved.origin == "rebuilt" and "does not match the sha256" in resolved.reason
    cached_engine = next((tmp_path / "cache").rglob(ENGINE_FILE))
    cached_engine.write_bytes(b"swapped in the cache")
    again = resolve_engine(folder, HOST, rebuild=rebuild, cache_dir=tmp_path / "cache")
    assert again.origin == "rebuilt" and again.data == b"rebuilt-for-this-machine" and len(rebuild.calls) == 2


def test_an_edited_source_onnx_is_refused_not_rebuilt(tmp_path: Path) -> None:
    folder = _artifact_folder(tmp_path, tensorrt_version="9.0.0")
    (folder / SOURCE_ONNX).write_bytes(b"edited")
    rebuild = _Rebuilder()
    with pytest.raises(InputRejected, match="changed since the engine was built"):
        resolve_engine(folder, HOST, rebuild=rebuild, cache_dir=tmp_path / "cache")
    assert rebuild.calls == []


def test_an_engine_without_manifest_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "foreign"
    folder.mkdir()
    (folder / ENGINE_FILE).write_bytes(b"someone else's engine")
    with pytest.raises(InputRejected, match="no engine manifest"):
        resolve_engine(folder, HOST, rebuild=_Rebuilder(), cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("name", ["model.engine", "resnet.plan", "model.TRT"])
def test_engine_files_are_not_accepted_as_model_inputs(name: str) -> None:
    with pytest.raises(InputRejected, match="TensorRT engines .* are not accepted as model inputs"):
        refuse_engine_input(Path("/models") / name)
    refuse_engine_input("/models/model.onnx")  # other inputs pass through


# ------------------------------------------------------------------------------------ error mapping


def test_parser_errors_become_input_rejected_naming_the_node() -> None:
    error = build_failure_error("trt", parser_errors=[
        ParserIssue("No importer registered for op: FancyOp", "node_7", "FancyOp"),
        ParserIssue("second problem"),
    ])
    assert isinstance(error, InputRejected)
    assert str(error).startswith("stage 'trt': TensorRT's ONNX parser rejected the model: node 'node_7' (FancyOp): "
                                 "No importer registered for op: FancyOp (+1 more)")


def test_out_of_memory_becomes_a_resource_failure() -> None:
    from_log = build_failure_error("trt", log_messages=[
        "[W] some warning", "Error Code 1: Cuda Runtime (out of memory)"])
    assert isinstance(from_log, ResourceFailure)
    assert "stage 'trt': TensorRT ran out of GPU memory" in str(from_log) and "lower max_batch" in str(from_log)
    assert isinstance(build_failure_error("trt", exc=MemoryError()), ResourceFailure)
    assert isinstance(build_failure_error("trt", exc=RuntimeError("cudaErrorMemoryAllocation")), ResourceFailure)


def test_other_build_failures_are_stage_errors_on_one_line() -> None:
    error = build_failure_error("trt", log_messages=["first", "IBuilder::buildSerializedNetwork: Error Code 4:\n"
                                                     "Internal Error (could not find any implementation)"])
    assert isinstance(error, StageError)
    message = str(error)
    assert "\n" not in message
    assert message.startswith("stage 'trt': TensorRT could not build the engine: IBuilder::buildSerializedNetwork")
    assert "returned no engine" in str(build_failure_error("trt"))


# ------------------------------------------------------------------------------------- dependencies


@pytest.mark.skipif(GPU_SKIP is None, reason="tensorrt and a GPU are present")
def test_missing_tensorrt_or_gpu_says_what_to_install_or_where_to_run() -> None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(MissingDependency) as info:
            require_tensorrt("trt")
        message = str(info.value)
        assert message.startswith("stage 'trt': compile.tensorrt needs the TensorRT Python package")
        assert "pip install 'optimizer[tensorrt]'" in message and "\n" not in message
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(MissingDependency, match=r"stage 'trt': compile.tensorrt needs an NVIDIA CUDA GPU"):
            require_cuda_gpu("trt")


def test_no_gpu_message(monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    with pytest.raises(MissingDependency, match=r"none is visible here \(torch.cuda.is_available\(\) is False\); "
                                                "run this recipe on a machine with an NVIDIA GPU"):
        require_cuda_gpu("trt")
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(MissingDependency, match="CPU-only build"):
        require_cuda_gpu("trt")


def test_trtexec_summary_is_parsed() -> None:
    text = """[11/29/2026-10:00:00] [I] === Performance summary ===
[11/29/2026-10:00:00] [I] Throughput: 21534.7 qps
[11/29/2026-10:00:00] [I] Latency: min = 0.0419 ms, max = 0.21 ms, mean = 0.0452 ms, median = 0.0449 ms, \
percentile(90%) = 0.0461 ms, percentile(99%) = 0.0512 ms
[11/29/2026-10:00:00] [I] Enqueue Time: min = 0.002 ms, max = 0.03 ms, mean = 0.0031 ms, median = 0.003 ms
[11/29/2026-10:00:00] [I] H2D Latency: min = 0.001 ms, max = 0.01 ms, mean = 0.002 ms, median = 0.002 ms
[11/29/2026-10:00:00] [I] GPU Compute Time: min = 0.0403 ms, max = 0.2 ms, mean = 0.0437 ms, \
median = 0.0435 ms, percentile(90%) = 0.0446 ms
[11/29/2026-10:00:00] [I] D2H Latency: min = 0.001 ms, max = 0.01 ms, mean = 0.002 ms, median = 1.5e-3 ms
"""
    assert parse_trtexec_summary(text) == {"throughput_qps": 21534.7, "latency_median_ms": 0.0449,
                                           "gpu_compute_median_ms": 0.0435}
    assert parse_trtexec_summary("no summary here") == {}


# --------------------------------------------------------------------------- pass, recipes, runtime


def test_the_pass_is_registered_with_its_forms_and_checks_its_config() -> None:
    from optimizer.registry import get_pass

    cls = get_pass("compile.tensorrt")
    assert cls.name == "compile.tensorrt" and cls.input_forms == ("onnx",) and cls.output_form == "tensorrt"
    config = cls.Config.model_validate({})
    assert (config.precision, config.min_batch, config.opt_batch, config.max_batch) == ("fp16", 1, 1, 64)
    with pytest.raises(ValueError, match="opt_batch 128 is above max_batch 64"):
        cls.Config.model_validate({"opt_batch": 128})
    with pytest.raises(ValueError, match="precision"):
        cls.Config.model_validate({"precision": "int4"})


@pytest.mark.parametrize("recipe", ["gpu_tensorrt_fp16.yaml", "gpu_tensorrt_int8.yaml"])
def test_the_gpu_recipes_validate_without_tensorrt(recipe: str, tiny_checkpoint: Path, capsys) -> None:
    from optimizer.cli import main

    code = main(["validate", str(REPO / "recipes" / recipe), "--set", f"model.checkpoint={tiny_checkpoint}"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "-> tensorrt" in out and "valid" in out


def test_validate_names_the_profile_field_at_fault(tiny_checkpoint: Path, capsys) -> None:
    from optimizer.cli import main

    code = main(["validate", str(REPO / "recipes" / "gpu_tensorrt_fp16.yaml"),
                 "--set", f"model.checkpoint={tiny_checkpoint}", "--set", "stages.1.with.opt_batch=512"])
    assert code == 2
    err = capsys.readouterr().err
    assert "stages.1.with.max_batch: opt_batch 512 is above max_batch 256" in err


def _onnx_artifact(path: Path):
    from optimizer.artifact import Artifact

    return Artifact("onnx", path.parent, path.name, [IMAGES], meta={"opset": 17}, facts={"precision": "fp32"})


def _context(tmp_path: Path):
    from optimizer.passes.base import PassContext
    from optimizer.progress import Progress

    work = tmp_path / "work"
    work.mkdir(parents=True)
    recipe = SimpleNamespace(resolve=lambda p: (tmp_path / p).resolve())
    return PassContext(stage="trt", work_dir=work, recipe=recipe, data=None, progress=Progress(quiet=True),
                       threads=1, seed=0)


@pytest.mark.skipif(GPU_SKIP is None, reason="tensorrt and a GPU are present")
def test_without_tensorrt_the_stage_stops_with_one_line_and_writes_nothing(tiny_onnx: Path, tmp_path: Path) -> None:
    from optimizer.passes.compile_tensorrt import CompileTensorRT

    ctx = _context(tmp_path)
    with pytest.raises(MissingDependency) as info:
        CompileTensorRT({"precision": "fp16"}).run(_onnx_artifact(tiny_onnx), ctx)
    message = str(info.value)
    assert message.startswith("stage 'trt': ") and "\n" not in message
    assert "pip install 'optimizer[tensorrt]'" in message or "NVIDIA CUDA GPU" in message
    assert list(ctx.work_dir.iterdir()) == []


def test_recipe_problems_are_reported_before_looking_for_tensorrt(tiny_onnx: Path, nncf_onnx: Path,
                                                                   tmp_path: Path) -> None:
    from optimizer.passes.compile_tensorrt import CompileTensorRT

    with pytest.raises(RecipeError, match="precision int8 needs a Q/DQ ONNX model"):
        CompileTensorRT({"precision": "int8"}).run(_onnx_artifact(tiny_onnx), _context(tmp_path / "a"))
    with pytest.raises(RecipeError, match="the input model is quantized.*precision: int8"):
        CompileTensorRT({"precision": "fp16"}).run(_onnx_artifact(nncf_onnx), _context(tmp_path / "b"))


def test_opening_a_tensorrt_artifact_without_tensorrt_is_a_one_line_error(tmp_path: Path) -> None:
    if GPU_SKIP is None:
        pytest.skip("tensorrt and a GPU are present")
    from optimizer.artifact import Artifact
    from optimizer.runtimes.base import open_runtime

    folder = _artifact_folder(tmp_path)
    artifact = Artifact("tensorrt", folder, ENGINE_FILE, [IMAGES], lineage={"stage": "fp16"})
    with pytest.raises(MissingDependency, match="stage 'fp16': the TensorRT runtime needs"):
        open_runtime(artifact, threads=1)


# ------------------------------------------------------------------------------------- GPU (skipped)


def _gpu_recipe(name: str, checkpoint: Path) -> dict:
    recipe = yaml.safe_load((REPO / "recipes" / name).read_text())
    base = quickstart_dict(checkpoint, eval_samples=2000)
    recipe["model"]["checkpoint"] = str(checkpoint)
    recipe["evaluate"] = base["evaluate"]
    recipe["data"]["eval"]["samples"] = 2000
    return recipe


def _skip_without_modelopt(precision: str, fallback: str = "fp16") -> None:
    import tensorrt

    if parse_version(tensorrt.__version__)[0] >= 11 and plan_precision(precision, 11, int8_fallback=fallback).autocast:
        pytest.importorskip("modelopt.onnx.autocast", reason="TensorRT 11 needs nvidia-modelopt for reduced precision")


def _check_engine_against_onnx(out: Path, stage: str, onnx_stage: str, atol: float) -> None:
    from optimizer.artifact import Artifact
    from optimizer.data.idx import load_fashion_mnist
    from optimizer.runtimes.onnxruntime_cpu import OnnxRuntime
    from optimizer.runtimes.tensorrt_gpu import TensorRTRuntime, time_cuda_events
    from tests.conftest import FASHION_ROOT

    engine_artifact = Artifact.load(out / "artifacts" / stage, verify=True)
    onnx_artifact = Artifact.load(out / "artifacts" / onnx_stage)
    images, _ = load_fashion_mnist(FASHION_ROOT, "test")
    x = ((images[:300].astype(np.float32) / 255.0 - 0.2860) / 0.3530)[:, None]  # the recipes' normalization
    runtime = TensorRTRuntime(engine_artifact, threads=1)
    try:
        assert runtime.origin == "artifact", runtime.reason
        got = runtime.run({"images": x})  # 300 > max_batch 256: split in two
        want = OnnxRuntime(onnx_artifact, threads=1).run({"images": x})
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= atol * max(1.0, float(np.abs(want).max()))
        assert (got.argmax(1) == want.argmax(1)).mean() >= 0.97
        import torch

        batch = {"images": torch.from_numpy(x[:1]).cuda()}
        times = time_cuda_events(lambda: runtime.execute_device(batch), iterations=50, warmup=10,
                                 stream=runtime.stream)
        assert len(times) == 50 and min(times) > 0
        settings = runtime.settings()
        assert settings["runtime"] == "tensorrt" and settings["precision"] == engine_artifact.facts["precision"]
    finally:
        runtime.close()


@pytest.mark.gpu
@needs_gpu
def test_fp16_engine_of_the_example_matches_onnx(example_checkpoint: Path, tmp_path: Path) -> None:
    from optimizer import run_recipe

    _skip_without_modelopt("fp16")
    report = run_recipe(_gpu_recipe("gpu_tensorrt_fp16.yaml", example_checkpoint), out=tmp_path / "o")
    stage = report.stage("fp16")
    assert stage["status"] == "ok" and stage["form"] == "tensorrt" and stage["precision"] == "fp16"
    assert stage["details"]["fidelity"]["within_tolerance"]
    assert stage["runtime"]["runtime"] == "tensorrt"
    assert report.stage("baseline")["accuracy"]["value"] - stage["accuracy"]["value"] <= 0.01
    manifest = read_manifest(tmp_path / "o" / "artifacts" / "fp16" / MANIFEST_FILE)
    assert manifest.precision == "fp16" and manifest.profiles[0].max == (256, 1, 28, 28)
    _check_engine_against_onnx(tmp_path / "o", "fp16", "export", atol=0.05)


@pytest.mark.gpu
@needs_gpu
def test_int8_engine_of_the_example_matches_onnx(example_checkpoint: Path, tmp_path: Path) -> None:
    from optimizer import run_recipe

    _skip_without_modelopt("int8")
    report = run_recipe(_gpu_recipe("gpu_tensorrt_int8.yaml", example_checkpoint), out=tmp_path / "o")
    stage = report.stage("trt_int8")
    assert stage["status"] == "ok" and stage["precision"] == "int8"
    assert stage["details"]["tensorrt"]["uint8_qdq_retyped"] > 0
    assert report.stage("baseline")["accuracy"]["value"] - stage["accuracy"]["value"] <= 0.015
    _check_engine_against_onnx(tmp_path / "o", "trt_int8", "int8", atol=0.1)


@pytest.mark.gpu
@needs_gpu
def test_an_engine_marked_for_another_gpu_is_rebuilt_on_load(example_checkpoint: Path, tmp_path: Path) -> None:
    from optimizer import run_recipe
    from optimizer.artifact import Artifact
    from optimizer.runtimes.tensorrt_gpu import TensorRTRuntime

    recipe = _gpu_recipe("gpu_tensorrt_fp16.yaml", example_checkpoint)
    recipe["stages"][1]["with"].update({"precision": "fp32", "max_batch": 8})
    run_recipe(recipe, out=tmp_path / "o")
    folder = tmp_path / "copy"
    shutil.copytree(tmp_path / "o" / "artifacts" / "fp16", folder)
    data = json.loads((folder / MANIFEST_FILE).read_text())
    data["gpu_name"] = "Some Other GPU"
    (folder / MANIFEST_FILE).write_text(json.dumps(data))
    runtime = TensorRTRuntime(Artifact.load(folder), threads=1, cache_dir=str(tmp_path / "cache"))
    try:
        assert runtime.origin == "rebuilt" and "Some Other GPU" in runtime.reason
        out = runtime.run({"images": np.zeros((3, 1, 28, 28), np.float32)})
        assert out.shape == (3, 10) and np.isfinite(out).all()
    finally:
        runtime.close()


# ------------------------------------------------ the build and the pass against a TensorRT stand-in
#
# The stand-in has only the attributes the TensorRT 10/11 Python bindings document and that the build
# uses (TensorRT 11 lacks the precision builder flags), and records what was set, so the build's control
# flow, error mapping and file handling are checked here; the real engine is checked by the gpu tests.


def _fake_tensorrt(version: str = "10.13.0.35", *, build: bytes | None = b"ENGINE", build_log: tuple = (),
                   parse_errors: tuple = ()):
    import enum
    import types

    import onnx

    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.calls = {"network_flags": None, "set_flags": set(), "cleared_flags": set(), "shapes": {}, "pool": {},
                 "level": None, "timing_cache_in": None}

    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    class ILogger:
        def __init__(self) -> None:
            pass

    ILogger.Severity = Severity
    trt.ILogger = ILogger
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 1})
    flags = {"TF32": 7} if parse_version(version)[0] >= 11 else {"FP16": 0, "INT8": 1, "BF16": 17, "TF32": 7}
    trt.BuilderFlag = enum.IntEnum("BuilderFlag", flags)
    trt.MemoryPoolType = enum.IntEnum("MemoryPoolType", {"WORKSPACE": 0})

    class Network:
        def __init__(self) -> None:
            self.inputs: list[str] = []
            self.outputs: list[str] = []

        num_inputs = property(lambda self: len(self.inputs))
        num_outputs = property(lambda self: len(self.outputs))

        def get_input(self, i):
            return SimpleNamespace(name=self.inputs[i])

        def get_output(self, i):
            return SimpleNamespace(name=self.outputs[i])

    class OnnxParser:
        def __init__(self, network: Network, logger) -> None:
            self.network = network

        def parse_from_file(self, path: str) -> bool:
            if parse_errors:
                return False
            graph = onnx.load(path, load_external_data=False).graph
            initializers = {i.name for i in graph.initializer}
            self.network.inputs = [v.name for v in graph.input if v.name not in initializers]
            self.network.outputs = [v.name for v in graph.output]
            return True

        num_errors = property(lambda self: len(parse_errors))

        def get_error(self, i):
            desc, node, op = parse_errors[i]
            return SimpleNamespace(desc=lambda: desc, node_name=lambda: node, node_operator=lambda: op)

    class TimingCache:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def serialize(self) -> bytes:
            return b"CACHE:" + self.data

    class Config:
        def __init__(self) -> None:
            self.cache = None

        def set_memory_pool_limit(self, pool, size: int) -> None:
            trt.calls["pool"][pool.name] = size

        def set_flag(self, flag) -> None:
            trt.calls["set_flags"].add(flag.name)

        def clear_flag(self, flag) -> None:
            trt.calls["cleared_flags"].add(flag.name)

        def add_optimization_profile(self, profile) -> int:
            return 0

        def create_timing_cache(self, data: bytes) -> TimingCache:
            trt.calls["timing_cache_in"] = bytes(data)
            return TimingCache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

        @property
        def builder_optimization_level(self):
            return trt.calls["level"]

        @builder_optimization_level.setter
        def builder_optimization_level(self, value: int) -> None:
            trt.calls["level"] = value

    class Profile:
        def set_shape(self, name: str, min, opt, max) -> None:  # noqa: A002 - the binding's argument names
            trt.calls["shapes"][name] = (tuple(min), tuple(opt), tuple(max))

    class Builder:
        def __init__(self, logger) -> None:
            self.logger = logger

        def create_network(self, flags: int = 0) -> Network:
            trt.calls["network_flags"] = flags
            return Network()

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network, config):
            for message in build_log:
                self.logger.log(Severity.ERROR, message)
            return None if build is None else bytearray(build)

    trt.Builder, trt.OnnxParser = Builder, OnnxParser
    return trt


@pytest.fixture
def fake_gpu(monkeypatch):
    """Install a TensorRT stand-in and pretend a GPU is present (only the build code runs)."""
    import optimizer.passes.compile_tensorrt as compile_module

    def install(**kwargs):
        trt = _fake_tensorrt(**kwargs)
        monkeypatch.setitem(__import__("sys").modules, "tensorrt", trt)
        monkeypatch.setattr(compile_module, "require_cuda_gpu", lambda stage, what="": None)
        monkeypatch.setattr(compile_module, "current_gpu", lambda device=0: ("NVIDIA H100 80GB HBM3", "9.0"))
        return trt

    return install


def _settings(precision: str, **kw) -> BuildSettings:
    profiles = tuple(build_profiles([IMAGES], min_batch=1, opt_batch=4, max_batch=32, stage="trt"))
    return BuildSettings(precision, profiles, **kw)


@pytest.mark.parametrize("version, precision, fallback, strongly_typed, flags", [
    ("10.13.0.35", "fp32", "fp16", True, set()),
    ("10.13.0.35", "fp16", "fp16", False, {"FP16"}),
    ("10.13.0.35", "int8", "fp16", False, {"INT8", "FP16"}),
    ("10.13.0.35", "int8", "fp32", True, set()),
    ("11.1.0.14", "fp32", "fp16", True, set()),
    ("11.1.0.14", "int8", "fp32", True, set()),
])
def test_build_sets_the_documented_network_and_builder_flags(fake_gpu, tiny_onnx: Path, tmp_path: Path, version,
                                                             precision, fallback, strongly_typed, flags) -> None:
    from optimizer.passes.compile_tensorrt import build_engine

    trt = fake_gpu(version=version)
    cache = tmp_path / "caches" / "timing.cache"
    built = build_engine(tiny_onnx, _settings(precision, int8_fallback=fallback, workspace_mb=512,
                                              builder_optimization_level=4), stage="trt", timing_cache=cache)
    assert built.data == b"ENGINE" and built.outputs == ["output"] and built.tensorrt_version == version
    strongly = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert trt.calls["network_flags"] == (strongly if strongly_typed else 0)
    assert trt.calls["set_flags"] == flags
    assert trt.calls["cleared_flags"] == ({"TF32"} if precision == "fp32" else set())
    assert trt.calls["shapes"] == {"images": ((1, 1, 28, 28), (4, 1, 28, 28), (32, 1, 28, 28))}
    assert trt.calls["pool"] == {"WORKSPACE": 512 << 20} and trt.calls["level"] == 4
    assert trt.calls["timing_cache_in"] == b"" and cache.read_bytes() == b"CACHE:"
    build_engine(tiny_onnx, _settings(precision, int8_fallback=fallback), stage="trt", timing_cache=cache)
    assert trt.calls["timing_cache_in"] == b"CACHE:", "the cache written by one build is read by the next"


def test_reduced_precision_on_tensorrt_11_needs_modelopt(fake_gpu, tiny_onnx: Path) -> None:
    from optimizer.passes.compile_tensorrt import build_engine

    try:
        import modelopt.onnx.autocast  # noqa: F401
        pytest.skip("nvidia-modelopt is installed")
    except ImportError:
        pass
    fake_gpu(version="11.1.0.14")
    with pytest.raises(MissingDependency, match=r"stage 'trt': fp16 on TensorRT 11 or newer needs the ONNX graph "
                                                r"converted first .*pip install 'nvidia-modelopt\[onnx\]'"):
        build_engine(tiny_onnx, _settings("fp16"), stage="trt")


def test_build_failures_map_to_our_errors(fake_gpu, tiny_onnx: Path) -> None:
    from optimizer.passes.compile_tensorrt import build_engine

    fake_gpu(parse_errors=(("Unsupported operator", "conv_3", "FancyConv"),))
    with pytest.raises(InputRejected, match=r"parser rejected the model: node 'conv_3' \(FancyConv\)"):
        build_engine(tiny_onnx, _settings("fp16"), stage="trt")
    fake_gpu(build=None, build_log=("Error Code 2: OutOfMemory (Requested size was 8589934592 bytes.)",))
    with pytest.raises(ResourceFailure, match="stage 'trt': TensorRT ran out of GPU memory"):
        build_engine(tiny_onnx, _settings("fp16"), stage="trt")
    fake_gpu(build=None, build_log=("Error Code 10: Internal Error (Could not find any implementation)",))
    with pytest.raises(StageError, match="could not build the engine: Error Code 10"):
        build_engine(tiny_onnx, _settings("fp16"), stage="trt")


def _eval_context(tmp_path: Path, count: int = 40):
    from optimizer.data.datasets import ArrayData

    ctx = _context(tmp_path)
    rng = np.random.default_rng(3)
    data = ArrayData({"images": rng.standard_normal((count, 1, 28, 28)).astype(np.float32)},
                     np.zeros(count, dtype=np.int64))
    ctx.data = SimpleNamespace(eval=lambda: data)
    return ctx


def _fake_engine_runtime(monkeypatch, noise: float) -> list:
    """The TensorRT runtime replaced by onnxruntime on the artifact's source.onnx, plus noise."""
    import optimizer.runtimes.tensorrt_gpu as runtime_module
    from optimizer.artifact import Artifact
    from optimizer.runtimes.onnxruntime_cpu import OnnxRuntime

    opened = []

    class EngineStandIn:
        def __init__(self, artifact, *, threads: int) -> None:
            assert (artifact.path / ENGINE_FILE).read_bytes() == b"ENGINE"
            source = Artifact("onnx", artifact.path, SOURCE_ONNX, list(artifact.inputs))
            self.inner = OnnxRuntime(source, threads=threads)
            opened.append(self)

        def run_batched(self, inputs, batch_size: int):
            out = self.inner.run_batched(inputs, batch_size)
            return out + noise * np.abs(out).max()

        def close(self) -> None:
            self.closed = True

    monkeypatch.setattr(runtime_module, "TensorRTRuntime", EngineStandIn)
    return opened


def test_the_pass_writes_engine_source_and_manifest_after_a_good_build(fake_gpu, monkeypatch, tiny_onnx: Path,
                                                                       tmp_path: Path) -> None:
    from optimizer.passes.compile_tensorrt import CompileTensorRT

    fake_gpu()
    opened = _fake_engine_runtime(monkeypatch, noise=1e-4)
    ctx = _eval_context(tmp_path)
    result = CompileTensorRT({"precision": "fp16", "max_batch": 16}).run(_onnx_artifact(tiny_onnx), ctx)
    assert result.form == "tensorrt" and result.entry == ENGINE_FILE and result.facts["precision"] == "fp16"
    assert sorted(p.name for p in ctx.work_dir.iterdir()) == [MANIFEST_FILE, ENGINE_FILE, SOURCE_ONNX]
    manifest = read_manifest(ctx.work_dir / MANIFEST_FILE)
    assert manifest.engine_sha256 == sha256_bytes(b"ENGINE")
    assert manifest.source_onnx_sha256 == sha256_bytes(tiny_onnx.read_bytes())
    assert (manifest.gpu_name, manifest.compute_capability, manifest.tensorrt_version) == (
        "NVIDIA H100 80GB HBM3", "9.0", "10.13.0.35")
    assert manifest.profiles[0].max == (16, 1, 28, 28) and manifest.outputs == ["output"]
    assert ctx.details["fidelity"]["within_tolerance"] and ctx.details["fidelity"]["samples"] == 40
    assert ctx.details["tensorrt"]["plan"] == plan_precision("fp16", 10).note
    assert opened and opened[0].closed
    result.finalize()  # the runner hashes the folder: nothing besides the artifact's files is there
    assert set(result.files) == {MANIFEST_FILE, ENGINE_FILE, SOURCE_ONNX}


def test_a_failed_build_leaves_the_stage_folder_empty(fake_gpu, tiny_onnx: Path, tmp_path: Path) -> None:
    from optimizer.passes.compile_tensorrt import CompileTensorRT

    fake_gpu(build=None, build_log=("Error Code 10: Internal Error",))
    ctx = _eval_context(tmp_path)
    with pytest.raises(StageError, match="stage 'trt': TensorRT could not build the engine"):
        CompileTensorRT({"precision": "fp16"}).run(_onnx_artifact(tiny_onnx), ctx)
    assert list(ctx.work_dir.iterdir()) == []


def test_an_engine_that_drifts_from_onnxruntime_fails_the_gate(fake_gpu, monkeypatch, tiny_onnx: Path,
                                                                tmp_path: Path) -> None:
    from optimizer.errors import GateFailed
    from optimizer.passes.compile_tensorrt import CompileTensorRT

    fake_gpu()
    _fake_engine_runtime(monkeypatch, noise=0.5)
    ctx = _eval_context(tmp_path)
    with pytest.raises(GateFailed, match=r"stage 'trt': the fp16 engine differs from onnxruntime beyond tolerance"):
        CompileTensorRT({"precision": "fp16"}).run(_onnx_artifact(tiny_onnx), ctx)
    assert not ctx.details["fidelity"]["within_tolerance"]


def test_an_nncf_model_is_retyped_for_tensorrt_before_the_build(fake_gpu, monkeypatch, nncf_onnx: Path,
                                                                tmp_path: Path) -> None:
    import onnx

    from optimizer.passes.compile_tensorrt import CompileTensorRT

    trt = fake_gpu()
    _fake_engine_runtime(monkeypatch, noise=0.0)
    ctx = _eval_context(tmp_path)
    CompileTensorRT({"precision": "int8", "min_top1_agreement": 0.0}).run(_onnx_artifact(nncf_onnx), ctx)
    assert trt.calls["set_flags"] == {"INT8", "FP16"}
    assert ctx.details["tensorrt"]["uint8_qdq_retyped"] == len(inspect_qdq(onnx.load(str(nncf_onnx))).uint8_zero)
    source = inspect_qdq(onnx.load(str(ctx.work_dir / SOURCE_ONNX)))
    assert source.has_qdq and not source.uint8_zero
    assert "fidelity" in ctx.details
