"""optimizer.testing.check_pass: the built-in passes keep the pass contract, and broken passes are caught
with a message that names the rule they break."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from pydantic import BaseModel

from optimizer import Artifact, Pass, PassConfig, PassContext, run_recipe
from optimizer.registry import get_pass
from optimizer.testing import RULES, check_pass
from tests.conftest import quickstart_dict


@pytest.fixture(scope="module")
def example_run(example_checkpoint: Path, tmp_path_factory) -> tuple[Path, dict]:
    """The example exported to ONNX once (quick latency, 1,000 eval samples): its baseline and export
    artifacts are the inputs of the checks below."""
    recipe = quickstart_dict(example_checkpoint, eval_samples=1000)
    recipe["stages"] = [{"name": "export", "pass": "export.onnx", "with": {"verify_samples": 64}}]
    out = tmp_path_factory.mktemp("contract") / "run"
    run_recipe(recipe, out=out)
    return out, recipe


@pytest.fixture
def exported(example_run) -> Path:
    return example_run[0] / "artifacts" / "export"


# ------------------------------------------------------------------------------------ built-in passes


def test_export_onnx_keeps_the_contract(example_run, tmp_path: Path) -> None:
    out, recipe = example_run
    report = check_pass(get_pass("export.onnx"), {"verify_samples": 64}, source=out / "artifacts" / "baseline",
                        data=recipe, work_dir=tmp_path)
    assert report.ok, str(report)
    assert report.checked == list(RULES)  # every rule ran, none was skipped
    assert (report.input_form, report.output_form) == ("torch", "onnx")
    assert report.output is not None and report.output.entry_path.is_file()  # kept: work_dir was given
    assert report.result("declared-data").detail == "read eval"
    assert report.result("repeatable").detail == "identical files"


def test_quantize_ort_keeps_the_contract(example_run, exported: Path) -> None:
    _, recipe = example_run
    report = check_pass(get_pass("quantize.ort"), {"subset_size": 64}, source=exported, data=recipe)
    assert report.ok and report.checked == list(RULES)
    # Calibration to quantize, eval for the agreement gate with the FP32 input (eval is always allowed).
    assert report.result("declared-data").detail == "read calibration, eval"
    # Without work_dir the runs happen in a temporary folder that is removed afterwards.
    assert report.output is not None and not report.output.path.exists()


def test_compile_openvino_keeps_the_contract(example_run, exported: Path) -> None:
    pytest.importorskip("openvino")
    _, recipe = example_run
    # OpenVINO names generated nodes from a counter that lives as long as the process, so a second
    # conversion in the same process writes the same model under other node names: not byte-identical.
    report = check_pass(get_pass("compile.openvino"), {"verify_samples": 64}, source=exported, data=recipe,
                        deterministic=False)
    assert report.ok and report.checked == list(RULES)
    assert report.output_form == "openvino"
    assert report.result("runtime-loads").detail == "openvino"
    with pytest.raises(AssertionError, match=r"repeatable .*wrote different files: model\.xml"):
        check_pass(get_pass("compile.openvino"), {"verify_samples": 64}, source=exported, data=recipe)


def test_a_recipe_as_source_checks_the_pass_on_its_baseline(example_run) -> None:
    _, recipe = example_run
    report = check_pass(get_pass("export.onnx"), {"verify_samples": 16}, source=recipe, repeat=False)
    assert report.ok
    assert report.result("repeatable").passed is None and report.result("repeatable").detail == "repeat=False"


# ------------------------------------------------------------------------------------ broken passes


class CopyConfig(PassConfig):
    note: str = ""


class CopyPass(Pass):
    """A correct ONNX -> ONNX pass: copies the model. The broken passes below each change one thing."""

    name = "test.copy"
    summary = "copy the model (test)"
    input_forms = ("onnx",)
    output_form = "onnx"
    Config = CopyConfig

    def run(self, artifact: Artifact, ctx: PassContext) -> Artifact:
        shutil.copyfile(artifact.entry_path, ctx.work_dir / "model.onnx")
        return self.new_artifact(artifact, ctx, entry="model.onnx", meta=dict(artifact.meta))


def check_fails(pass_cls: type[Pass], source: Path, rule: str, *, detail: str = "", **kwargs) -> str:
    """check_pass must raise, naming ``rule`` as violated (with ``detail`` in its line); returns the message."""
    with pytest.raises(AssertionError) as info:
        check_pass(pass_cls, source=source, repeat=kwargs.pop("repeat", False), **kwargs)
    message = str(info.value)
    lines = [line for line in message.splitlines() if line.startswith(f"  - {rule} (")]
    assert lines, f"rule '{rule}' not reported as violated:\n{message}"
    assert detail in lines[0], f"'{detail}' not in: {lines[0]}"
    report = info.value.report  # type: ignore[attr-defined]
    assert report.result(rule).passed is False
    return message


def test_a_correct_pass_passes_on_synthetic_data(exported: Path) -> None:
    report = check_pass(CopyPass, {"note": "hi"}, source=exported)
    assert report.ok and report.checked == list(RULES)
    assert report.result("runtime-output").detail.startswith("shape [1, 10], max abs diff vs input 0")
    assert "19 rules kept, 0 violated" in str(report)


def test_writing_next_to_work_dir_is_caught(exported: Path) -> None:
    class StrayWriter(CopyPass):
        def run(self, artifact, ctx):
            (ctx.work_dir.parent / "stray.txt").write_text("left over")
            return super().run(artifact, ctx)

    check_fails(StrayWriter, exported, "writes-confined", detail="stray.txt (left behind)")


def test_writing_into_the_current_folder_is_caught(exported: Path, tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")

    class CwdWriter(CopyPass):
        def run(self, artifact, ctx):
            np.save("calibration_cache.npy", np.zeros(3))  # a relative path: lands in the caller's folder
            return super().run(artifact, ctx)

    check_fails(CwdWriter, exported, "writes-confined", detail="calibration_cache.npy (left behind)")


def test_changing_an_existing_file_elsewhere_is_caught(exported: Path, tmp_path: Path) -> None:
    log = tmp_path / "existing.log"
    log.write_text("before\n")

    class Appender(CopyPass):
        def run(self, artifact, ctx):
            with open(log, "a") as handle:
                handle.write("the pass was here\n")
            return super().run(artifact, ctx)

    check_fails(Appender, exported, "writes-confined", detail=f"{log} (written to)")


def test_scratch_space_removed_before_returning_is_allowed(exported: Path) -> None:
    class ScratchUser(CopyPass):
        def run(self, artifact, ctx):
            # The way quantize.ort pre-processes: a scratch folder next to work_dir, gone when run() returns.
            with tempfile.TemporaryDirectory(dir=ctx.work_dir.parent) as scratch:
                (Path(scratch) / "prepared.onnx").write_bytes(artifact.entry_path.read_bytes())
            with tempfile.NamedTemporaryFile() as handle:
                handle.write(b"scratch")
            return super().run(artifact, ctx)

    assert check_pass(ScratchUser, source=exported, repeat=False).ok


def test_mutating_the_input_is_caught(exported: Path) -> None:
    class Mutator(CopyPass):
        def run(self, artifact, ctx):
            import onnx

            model = onnx.load(str(artifact.entry_path))
            model.doc_string = "edited in place"
            onnx.save(model, str(artifact.entry_path))  # the input artifact, not a copy
            return super().run(artifact, ctx)

    message = check_fails(Mutator, exported, "input-unchanged", detail="model.onnx (changed)")
    assert "writes-confined" in message  # the input lies outside work_dir too
    # check_pass ran the pass on a private copy: the caller's artifact is intact.
    Artifact.load(exported, verify=True)


def test_wrong_output_form_is_caught(exported: Path) -> None:
    class WrongForm(CopyPass):
        def run(self, artifact, ctx):  # announces onnx, returns an ONNX file labelled as OpenVINO
            shutil.copyfile(artifact.entry_path, ctx.work_dir / "model.onnx")
            return self.new_artifact(artifact, ctx, entry="model.onnx", form="openvino")

    check_fails(WrongForm, exported, "output-form",
                detail="returned form 'openvino', but output_form_for('onnx') is 'onnx'")


def test_config_that_accepts_unknown_keys_is_caught(exported: Path) -> None:
    class LooseConfig(BaseModel):  # not a PassConfig: a typo in a recipe would be silently ignored
        note: str = ""

    class Loose(CopyPass):
        Config = LooseConfig

    message = check_fails(Loose, exported, "config-forbids-unknown-keys", detail="accepted the unknown key")
    assert "contract (" in message and "Config must forbid unknown keys" in message


def test_artifact_outside_work_dir_is_caught(exported: Path, tmp_path: Path) -> None:
    class Elsewhere(CopyPass):
        def run(self, artifact, ctx):
            shutil.copyfile(artifact.entry_path, tmp_path / "model.onnx")
            return Artifact("onnx", tmp_path, "model.onnx", list(artifact.inputs))

    message = check_fails(Elsewhere, exported, "artifact-in-work-dir", detail=f"returned an artifact in {tmp_path}")
    assert "writes-confined" in message


def test_missing_lineage_is_caught(exported: Path) -> None:
    class NoLineage(CopyPass):
        def run(self, artifact, ctx):
            shutil.copyfile(artifact.entry_path, ctx.work_dir / "model.onnx")
            return Artifact("onnx", ctx.work_dir, "model.onnx", list(artifact.inputs))  # not self.new_artifact

    check_fails(NoLineage, exported, "lineage", detail="build the result with self.new_artifact")


def test_reading_undeclared_data_is_caught(exported: Path) -> None:
    class Undeclared(CopyPass):  # needs = (): recipe validation would not ask for data.calibration
        def run(self, artifact, ctx):
            ctx.data.calibration()
            return super().run(artifact, ctx)

    check_fails(Undeclared, exported, "declared-data", detail="read data.calibration without declaring it")

    class Declared(Undeclared):
        needs = ("calibration",)

    assert check_pass(Declared, source=exported, repeat=False).ok


def test_non_finite_outputs_are_caught(exported: Path) -> None:
    class Poison(CopyPass):
        def run(self, artifact, ctx):
            import onnx
            from onnx import helper, numpy_helper

            model = onnx.load(str(artifact.entry_path))
            output = model.graph.output[0].name
            model.graph.initializer.append(numpy_helper.from_array(np.array(np.nan, dtype=np.float32), "nan"))
            for node in model.graph.node:
                node.output[:] = [f"{o}_raw" if o == output else o for o in node.output]
            model.graph.node.append(helper.make_node("Mul", [f"{output}_raw", "nan"], [output]))
            onnx.save(model, str(ctx.work_dir / "model.onnx"))
            return self.new_artifact(artifact, ctx, entry="model.onnx")

    check_fails(Poison, exported, "runtime-output", detail="10 of 10 output values are NaN or infinite")


def test_nondeterministic_output_needs_deterministic_false(exported: Path) -> None:
    class Salted(CopyPass):
        def run(self, artifact, ctx):
            (ctx.work_dir / "salt.bin").write_bytes(os.urandom(16))
            return super().run(artifact, ctx)

    check_fails(Salted, exported, "repeatable", detail="wrote different files: salt.bin", repeat=True)
    report = check_pass(Salted, source=exported, deterministic=False)
    assert report.ok and "both are valid" in report.result("repeatable").detail


def test_a_pass_that_raises_is_reported(exported: Path) -> None:
    class Crashes(CopyPass):
        def run(self, artifact, ctx):
            raise RuntimeError("out of ideas")

    message = check_fails(Crashes, exported, "run", detail="raised RuntimeError: out of ideas")
    assert "kept: contract" in message


def test_report_without_raising(exported: Path) -> None:
    class WrongForm(CopyPass):
        def run(self, artifact, ctx):
            shutil.copyfile(artifact.entry_path, ctx.work_dir / "model.onnx")
            return self.new_artifact(artifact, ctx, entry="model.onnx", form="torch")

    report = check_pass(WrongForm, source=exported, repeat=False, raise_on_violation=False)
    assert not report.ok and [r.rule for r in report.violations] == ["output-form"]
    assert "FAIL  output-form" in str(report)
    assert report.result("runtime-loads").passed is None  # not judged on a mislabelled artifact


# ------------------------------------------------------------------------------------ misuse


def test_wrong_calls_are_value_errors(example_run, exported: Path) -> None:
    out, _ = example_run
    with pytest.raises(ValueError, match=r"source is a 'torch' artifact; test.copy takes \['onnx'\]"):
        check_pass(CopyPass, source=out / "artifacts" / "baseline")
    with pytest.raises(ValueError, match="is a run's output folder; give one of its stage artifacts"):
        check_pass(CopyPass, source=out)
    with pytest.raises(ValueError, match="config for test.copy is not valid"):
        check_pass(CopyPass, {"nope": 1}, source=exported)
