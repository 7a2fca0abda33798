"""Comparing runs: one table and one chart for several report folders, and a clear warning when the
environments differ so that latency cannot be compared."""

from __future__ import annotations

import copy
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from optimizer.errors import RecipeError
from optimizer.report.compare import compare, write_comparison
from tests.test_report_html import ENVIRONMENT, synthetic_report, write_run


def _two_runs(tmp_path: Path, *, second_environment: dict | None = None) -> tuple[Path, Path]:
    first = write_run(tmp_path / "ort", synthetic_report(optional=True, recipe_name="cpu_ort_int8"))
    second_report = synthetic_report(optional=False, recipe_name="cpu_openvino_int8",
                                     environment=second_environment or ENVIRONMENT)
    for stage in second_report["stages"]:
        stage["latency"]["p50_ms"] *= 0.8
        stage["latency"]["p50_ci95_ms"] = [v * 0.8 for v in stage["latency"]["p50_ci95_ms"]]
    second = write_run(tmp_path / "ov", second_report, raw=False)
    return first, second


def test_compare_puts_both_runs_in_one_table_and_one_chart(tmp_path: Path) -> None:
    markdown, page = compare(_two_runs(tmp_path))
    assert markdown.startswith("# Comparison of 2 runs: cpu_ort_int8, cpu_openvino_int8")
    for run in ("cpu_ort_int8", "cpu_openvino_int8"):
        assert f"| {run} | baseline |" in markdown and f"| {run} | int8 ★ |" in markdown
    assert "not comparable" not in markdown and "not comparable" not in page
    # Same environment: the fastest recommended stage across runs can be named.
    assert "Fastest recommended deployable: 'int8' of cpu_openvino_int8" in markdown
    charts = re.findall(r"<svg\b.*?</svg>", page, flags=re.S)
    assert len([c for c in charts if "Top-1 accuracy against p50 latency" in c]) == 1
    chart = next(c for c in charts if "Top-1 accuracy against p50 latency" in c)
    ET.fromstring(chart)
    assert "cpu_ort_int8: int8" in chart and "cpu_openvino_int8: int8" in chart
    assert "<script" not in page.lower()


def test_compare_says_when_environments_differ(tmp_path: Path) -> None:
    other = copy.deepcopy(ENVIRONMENT)
    other.update(cpu="Other CPU", cpu_flags=["avx2"], threads=4)
    other["packages"]["onnxruntime"] = "1.20.0"
    other["hostname"] = "bench-2"
    markdown, page = compare(_two_runs(tmp_path, second_environment=other))
    assert "**The environments differ: latency figures are not comparable across these runs.**" in markdown
    warning = markdown.split("**The environments differ", 1)[1].split("\n\n", 2)[1]
    for difference in ("cpu: Example CPU @ 3.0GHz vs Other CPU", "cpu_flags:", "threads: 1 vs 4",
                       "onnxruntime: 1.32.0 vs 1.20.0"):
        assert difference in warning
    assert "hostname" not in warning                       # a different host name alone changes nothing
    assert "Fastest recommended deployable" not in markdown  # no ranking across incomparable latencies
    assert "The environments differ: latency figures are not comparable" in page
    assert '<td class="worse">Other CPU</td>' in page       # the differing rows are marked in the table


def test_compare_notices_a_different_latency_setup_and_eval_set(tmp_path: Path) -> None:
    first, second = _two_runs(tmp_path)
    import json

    report = json.loads((second / "report.json").read_text())
    for stage in report["stages"]:
        stage["latency"]["mode"] = "quick"
    report["recipe"]["data"]["eval"]["samples"] = 2000
    (second / "report.json").write_text(json.dumps(report))
    markdown, _ = compare([first, second])
    assert "latency mode: full vs quick" in markdown
    assert "Accuracy was measured on different data" in markdown


def test_compare_labels_runs_of_the_same_recipe_by_folder(tmp_path: Path) -> None:
    a = write_run(tmp_path / "monday", synthetic_report(optional=False))
    b = write_run(tmp_path / "tuesday", synthetic_report(optional=False))
    markdown, _ = compare([a, b])
    assert "| monday | baseline |" in markdown and "| tuesday | baseline |" in markdown


def test_write_comparison_and_its_errors(tmp_path: Path) -> None:
    first, second = _two_runs(tmp_path)
    written = write_comparison([first, second], tmp_path / "cmp")
    assert sorted(p.name for p in written) == ["compare.html", "compare.md"]
    assert all(p.stat().st_size > 1000 for p in written)
    with pytest.raises(RecipeError, match="at least two"):
        compare([first])
    with pytest.raises(RecipeError, match="no report.json"):
        compare([first, tmp_path / "missing"])


# ------------------------------------------------------------------------------------------ metrics


def test_compare_names_the_runs_metric_in_the_accuracy_columns(tmp_path: Path) -> None:
    from tests.test_metrics import _cosine_report

    first = write_run(tmp_path / "emb_nncf", _cosine_report())
    second_report = _cosine_report()
    second_report["recipe"]["name"] = "emb_ort"
    second = write_run(tmp_path / "emb_ort", second_report)
    markdown, page = compare([first, second])
    assert "| cosine agreement (95% CI) | Δ cosine agreement vs run base |" in markdown
    assert "| 0.9931 (0.9911–0.9951) | -0.0069 (p=0.0005) |" in markdown   # in its units, not as a percentage
    assert "Δ cosine agreement are against each run's own baseline" in markdown
    assert "different accuracy metrics" not in markdown
    assert "cosine agreement against p50 latency" in page
    for rendering in (markdown, page):
        assert "top-1" not in rendering and "Top-1" not in rendering


def test_compare_top1_runs_read_as_before(tmp_path: Path) -> None:
    markdown, page = compare(_two_runs(tmp_path))
    assert "| top-1 % (95% CI) | Δ top-1 vs run base |" in markdown
    assert "Speedup and Δ top-1 are against each run's own baseline." in markdown
    assert "top-1 91.10 %" in markdown
    assert "different accuracy metrics" not in markdown and "different accuracy metrics" not in page


def test_compare_warns_when_runs_used_different_metrics(tmp_path: Path) -> None:
    from tests.test_metrics import _cosine_report

    top1 = write_run(tmp_path / "classifier", synthetic_report(optional=True, recipe_name="classifier"))
    cosine_report = _cosine_report()
    cosine_report["recipe"]["name"] = "embedder"
    cosine = write_run(tmp_path / "embedder", cosine_report)
    markdown, page = compare([top1, cosine])
    warning = ("The runs were scored with different accuracy metrics (classifier: top-1; embedder: cosine agreement): "
               "their accuracy is not comparable.")
    assert f"**{warning}**" in markdown and warning in page
    # No column can name both: each figure names its own metric, in its own units.
    assert "| accuracy (95% CI) | Δ accuracy vs run base |" in markdown
    assert "| classifier | int8 ★ | onnx | int8 | 0.23 | 91.10 % top-1 (90.54–91.66) |" in markdown
    assert "| embedder | int8 ★ | onnx | int8 | 0.23 | 0.9931 cosine agreement (0.9911–0.9951) |" in markdown
    assert "Speedup and Δ accuracy are against each run's own baseline." in markdown
    # One axis cannot hold both: no chart, and the page says why.
    assert "against p50 latency" not in page
    assert "No chart: the runs were scored with different accuracy metrics" in page


def test_compare_tells_python_metrics_apart_by_module(tmp_path: Path) -> None:
    runs = []
    for module in ("a", "b"):
        report = synthetic_report(optional=False, recipe_name=f"run_{module}")
        for stage in report["stages"]:
            stage["accuracy"].update(metric=f"python:{module}.metrics:score", name="score", interval="wilson",
                                     higher_is_better=True)
        runs.append(write_run(tmp_path / module, report))
    markdown, _ = compare(runs)
    assert ("different accuracy metrics (run_a: score (python:a.metrics:score); run_b: score "
            "(python:b.metrics:score))") in markdown


def test_compare_puts_every_runs_input_size_sweep_in_one_chart_and_table(tmp_path: Path) -> None:
    """Runs that swept evaluate.latency.shapes: one line per run and stage, sizes either run measured."""
    reports = []
    for name, sizes, scale in (("fixed", (16, 32), 1.0), ("buckets", (16, 32, 64), 0.6)):
        report = copy.deepcopy(synthetic_report(optional=False, recipe_name=name))  # the template is shared
        for stage in report["stages"]:
            stage["shape_sweep"] = [{"size": s, "p50_ms": scale * s / 16, "p50_ci95_ms": [scale * s / 17, scale * s / 15],
                                     "shape": {"input_ids": [1, s]}} for s in sizes]
        reports.append(write_run(tmp_path / name, report, raw=False))
    markdown, page = compare(reports)
    assert "## Latency against input size" in markdown
    assert "| run: stage | size 16 | size 32 | size 64 |" in markdown
    row = next(line for line in markdown.splitlines() if line.startswith("| fixed: int8 |"))
    assert row.rstrip().endswith("| – |")  # the fixed run did not measure 64
    assert "| buckets: int8 | 0.600 ms" in markdown
    chart = next(c for c in re.findall(r"<svg\b.*?</svg>", page, flags=re.S) if "Latency against input size" in c)
    ET.fromstring(chart)
    assert "fixed: int8" in page and "buckets: baseline" in page
    # Reports without a sweep leave the section out.
    plain = []
    for name in ("a", "b"):
        report = copy.deepcopy(synthetic_report(optional=False, recipe_name=name))
        for stage in report["stages"]:
            stage.pop("shape_sweep", None)
        plain.append(write_run(tmp_path / "plain" / name, report, raw=False))
    markdown, page = compare(plain)
    assert "Latency against input size" not in markdown and "Latency against input size" not in page
