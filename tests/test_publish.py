"""Ship the best, not the last: final/ holds the stage the report recommends (publish: recommended), or the
last stage (publish: last); latency budgets decide what is within budget; publish_stage republishes a run's
stage elsewhere. Real runs of the trained example; which stage qualifies is set by budgets, never by which
stage happened to be faster on this machine."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest

from optimizer import run_recipe
from optimizer.errors import EXIT_GATE_FAILED, GateFailed, InputRejected, RecipeError
from optimizer.publish import publish_stage
from optimizer.report.verdict import budget_breaches, choose_publish, recommend, verdict
from tests.conftest import quickstart_dict

# A p50 no model reaches: the stage it applies to is outside its budget on any machine.
UNREACHABLE_MS = 1e-6


def sha256_tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def model_hash(folder: Path) -> str:
    return hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def recipe(example_checkpoint: Path) -> dict:
    """export -> int8 (onnxruntime static INT8); the int8 stage's own budget holds it to an unreachable p50."""
    recipe = quickstart_dict(example_checkpoint, eval_samples=300)
    recipe["budget"] = {"accuracy_drop": 0.05}
    recipe["stages"] = [
        {"name": "export", "pass": "export.onnx"},
        {"name": "int8", "pass": "quantize.ort", "with": {"subset_size": 100},
         "budget": {"latency_p50_ms": UNREACHABLE_MS}},
    ]
    return recipe


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One stage cache for every run here: the runs differ in budgets and policy, which measure nothing anew."""
    return tmp_path_factory.mktemp("publish_cache")


@pytest.fixture(scope="module")
def recommended_run(recipe: dict, cache: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("recommended") / "out"
    run_recipe(recipe, out=out, resume=True, cache=cache)
    return out


def test_recommended_publishes_the_earlier_stage_within_budget(recommended_run: Path) -> None:
    out = recommended_run
    report = json.loads((out / "report.json").read_text())
    int8 = report["stages"][2]
    assert int8["budget"]["latency_p50_ms"] == UNREACHABLE_MS
    assert budget_breaches(int8) == [f"p50 {int8['latency']['p50_ms']:.3f} ms over the budget of 1e-06 ms"]
    assert report["passed"] is True and report["final"] == "final"
    assert report["publish"]["policy"] == "recommended" and report["publish"]["stage"] == "export"
    assert model_hash(out / "final") == model_hash(out / "artifacts" / "export")
    assert model_hash(out / "final") != model_hash(out / "artifacts" / "int8")

    manifest = json.loads((out / "final" / "manifest.json").read_text())
    assert manifest["manifest_version"] == 2
    assert manifest["stage"] == "export"
    assert manifest["publish"] == report["publish"]
    reason = manifest["publish"]["reason"]
    assert reason.startswith(f"fastest within budget: p50 {report['stages'][1]['latency']['p50_ms']:.3f} ms")
    assert "the last stage, 'int8', is outside its budget (p50 " in reason
    assert manifest["latency"]["p50_ms"] == report["stages"][1]["latency"]["p50_ms"]
    # The lineage ends at the published stage: int8 came after it and is not part of it.
    assert manifest["lineage"] == [report["stages"][0]["sha256"], report["stages"][1]["sha256"]]
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((out / "final" / name).read_bytes()).hexdigest() == digest


def test_the_verdict_and_all_three_reports_name_the_published_stage(recommended_run: Path) -> None:
    report = json.loads((recommended_run / "report.json").read_text())
    # One chooser: what the verdict recommends is what final/ holds.
    assert choose_publish(report).stage["name"] == "export"
    rec = recommend(report)
    assert rec is not None and rec.stage["name"] == "export" and rec.in_final
    said = f"Published to final/: 'export' (publish: recommended): {report['publish']['reason']}."
    assert said in verdict(report).sentences
    markdown = (recommended_run / "report.md").read_text()
    html = (recommended_run / "report.html").read_text()
    assert "Published to final/: 'export' (publish: recommended)" in markdown
    assert "Deployable artifact: `final/`: stage 'export'" in markdown
    assert "Published to final/: &#x27;export&#x27; (publish: recommended)" in html \
        or "Published to final/: 'export' (publish: recommended)" in html


def test_publish_last_publishes_the_last_stage_and_says_what_recommended_would(
        recipe: dict, cache: Path, tmp_path: Path) -> None:
    last = copy.deepcopy(recipe)
    last["publish"] = "last"
    out = tmp_path / "out"
    report = run_recipe(last, out=out, resume=True, cache=cache)
    assert report.passed
    assert report.data["publish"]["stage"] == "int8" and report.data["publish"]["policy"] == "last"
    assert model_hash(out / "final") == model_hash(out / "artifacts" / "int8")
    manifest = json.loads((out / "final" / "manifest.json").read_text())
    assert manifest["stage"] == "int8" and manifest["publish"]["policy"] == "last"
    reason = manifest["publish"]["reason"]
    assert reason.startswith("the recipe's last stage, although it is outside its budget (p50 ")
    assert "publish: recommended would ship 'export'" in reason
    # The verdict still recommends the stage within budget, and says final/ holds one that is not.
    result = verdict(report.data)
    assert result.recommendation.stage["name"] == "export" and not result.recommendation.in_final
    assert f"Published to final/: 'int8' (publish: last): {reason}." in result.sentences
    assert "Published to final/: 'int8' (publish: last)" in (out / "report.md").read_text()


def test_nothing_within_budget_fails_the_gate_and_keeps_the_previous_final(
        recipe: dict, cache: Path, recommended_run: Path, clean_copy) -> None:
    out = clean_copy(recommended_run)
    before = sha256_tree(out / "final")
    strict = copy.deepcopy(recipe)
    strict["budget"]["latency_p90_ms"] = UNREACHABLE_MS
    with pytest.raises(GateFailed) as caught:
        run_recipe(strict, out=out, resume=True, cache=cache)
    message = str(caught.value)
    assert caught.value.exit_code == EXIT_GATE_FAILED
    assert "\n" not in message
    assert message.startswith("publish: recommended: no stage other than the baseline and intermediate stages is "
                              "within its budget ('export' p90 ")
    assert "final/ was not updated" in message
    assert sha256_tree(out / "final") == before
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is False and report["final"] is None
    assert report["publish"]["stage"] is None
    assert "Nothing was published (publish: recommended)" in (out / "report.md").read_text()
    assert not any(p.name.startswith((".staging", ".old", ".lock")) for p in out.iterdir())


def test_a_recipe_of_intermediate_stages_publishes_nothing_under_recommended(recipe: dict, cache: Path,
                                                                           tmp_path: Path) -> None:
    experiment = copy.deepcopy(recipe)
    for stage in experiment["stages"]:
        stage["intermediate"] = True
    with pytest.raises(GateFailed, match="every stage of the recipe is intermediate") as caught:
        run_recipe(experiment, out=tmp_path / "out", resume=True, cache=cache)
    assert "publish: last ships the last stage regardless" in str(caught.value)
    assert not (tmp_path / "out" / "final").exists()
    experiment["publish"] = "last"
    report = run_recipe(experiment, out=tmp_path / "out", resume=True, cache=cache)
    assert report.passed and report.data["publish"]["stage"] == "int8"


def test_publish_stage_copies_a_chosen_stage_with_extra_manifest_fields(recommended_run: Path,
                                                                        tmp_path: Path) -> None:
    destination = tmp_path / "search" / "final"
    manifest = publish_stage(recommended_run, destination, stage="int8", policy="search",
                             reason="trial 3: best on the front", extra={"search": {"trial": 3}})
    assert manifest["stage"] == "int8" and manifest["search"] == {"trial": 3}
    assert manifest["publish"] == {"policy": "search", "stage": "int8", "reason": "trial 3: best on the front"}
    assert manifest["source_run"] == str(recommended_run)
    assert json.loads((destination / "manifest.json").read_text()) == json.loads(json.dumps(manifest, default=str))
    assert model_hash(destination) == model_hash(recommended_run / "artifacts" / "int8")
    before = sha256_tree(destination)

    # Failures leave the published folder as it was, and nothing behind.
    with pytest.raises(RecipeError, match="no stage 'nope'"):
        publish_stage(recommended_run, destination, stage="nope")
    with pytest.raises(ValueError, match="may not replace stage"):
        publish_stage(recommended_run, destination, stage="export", extra={"stage": "x"})
    with pytest.raises(InputRejected, match="report.json"):
        publish_stage(tmp_path, destination)
    with pytest.raises(RecipeError, match="use 'recommended' or 'last'"):
        publish_stage(recommended_run, destination, policy="best")
    assert sha256_tree(destination) == before
    assert sorted(p.name for p in destination.parent.iterdir()) == ["final"]

    # Without a stage, the run's own chooser picks, as `optimizer run` did.
    chosen = publish_stage(recommended_run, destination)
    assert chosen["stage"] == "export" and chosen["publish"]["policy"] == "recommended"
    assert chosen["publish"]["reason"].startswith("fastest within budget")
    assert model_hash(destination) == model_hash(recommended_run / "artifacts" / "export")
    assert publish_stage(recommended_run, destination, policy="last")["stage"] == "int8"
    assert model_hash(destination) == model_hash(recommended_run / "artifacts" / "int8")
