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
