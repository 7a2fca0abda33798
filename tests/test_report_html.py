"""The readable reports: the HTML page (checked in headless Chromium on a real quick start run), the
Markdown verdict, the Pareto front, escaping, re-rendering from report.json, and tolerance of reports
that lack the optional fields."""

from __future__ import annotations

import copy
import html
import json
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from optimizer.errors import InputRejected, RecipeError
from optimizer.report.html import render_html
from optimizer.report.markdown import render_markdown
from optimizer.report.render import rerender
from optimizer.report.verdict import pareto_front, recommend, verdict
from tests.conftest import quickstart_dict

# ------------------------------------------------------------------------------- synthetic reports


def _latency(p50: float, *, spread: float = 0.04, iterations: int = 400, unstable: bool = False) -> dict[str, Any]:
    return {"batch_size": 1, "p50_ms": p50, "p90_ms": p50 * (1 + 2 * spread), "p99_ms": p50 * (1 + 5 * spread),
            "mean_ms": p50 * (1 + spread), "min_ms": p50 * (1 - spread), "max_ms": p50 * (1 + 12 * spread),
            "cv": spread, "p50_ci95_ms": [p50 * (1 - spread / 4), p50 * (1 + spread / 4)], "iterations": iterations,
            "unstable": unstable, "warmup_iterations": 50, "duration_s": 3.0, "mode": "full"}


def _stage(name: str, pass_name: str | None, form: str, precision: str, p50: float, correct: int, size: int,
           samples_per_s: float) -> dict[str, Any]:
    n = 10_000
    value = correct / n
    half = 1.96 * (value * (1 - value) / n) ** 0.5
    return {
        "name": name, "pass": pass_name, "config": {}, "status": "ok", "seconds": 3.2, "form": form,
        "artifact": f"artifacts/{name}", "sha256": "0" * 64, "size_bytes": size, "params": 173_842,
        "macs": 20_943_168, "precision": precision,
        "accuracy": {"metric": "top1", "value": value, "n": n, "correct": correct,
                     "ci95": [value - half, value + half]},
        "latency": _latency(p50),
        "throughput": {"batch_size": 32, "samples_per_s": samples_per_s, "iterations": 40, "wall_s": 3.0},
        "load_s": 0.1, "first_inference_ms": 2.0, "runtime": {"runtime": "onnxruntime", "threads": 1},
        "non_finite_outputs": 0, "raw_latency_file": f"measurements/{name}/latency_ms.npy",
    }


def _change(stage: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    lat, ref = stage["latency"], reference["latency"]
    separate = lat["p50_ci95_ms"][1] < ref["p50_ci95_ms"][0] or lat["p50_ci95_ms"][0] > ref["p50_ci95_ms"][1]
    return {"accuracy_delta": stage["accuracy"]["value"] - reference["accuracy"]["value"],
            "p50_ratio": lat["p50_ms"] / ref["p50_ms"], "speedup": ref["p50_ms"] / lat["p50_ms"],
            "latency_significant": bool(separate),
            "throughput_ratio": stage["throughput"]["samples_per_s"] / reference["throughput"]["samples_per_s"],
            "size_ratio": stage["size_bytes"] / reference["size_bytes"]}


ENVIRONMENT = {
    "timestamp": "2026-01-01T00:00:00+00:00", "hostname": "bench-1", "os": "Linux 6.1", "machine": "x86_64",
    "cpu": "Example CPU @ 3.0GHz", "cpu_flags": ["avx2", "avx512f", "avx512_vnni"], "cpu_count": 8, "cpus_usable": 8,
    "governor": "performance", "load_average": [0.2, 0.3, 0.3], "python": "3.11.7",
    "packages": {"torch": "2.14.1", "onnxruntime": "1.32.0", "nncf": "3.4.0", "openvino": None, "numpy": "2.4.6"},
    "threads": 1,
}


def synthetic_report(*, optional: bool, names: tuple[str, str, str, str] = ("baseline", "export", "int8", "pruned"),
                     environment: dict[str, Any] | None = None, recipe_name: str = "synthetic") -> dict[str, Any]:
    """A four-stage report with plausible figures. ``optional`` adds the fields newer reports carry
    (McNemar tests, the batch-size sweep, the profile); without it the report is a plain schema-1 one."""
    base, export, int8, pruned = names
    stages = [
        _stage(base, None, "torch", "fp32", 1.114, 9124, 704_216, 1581.0),
        _stage(export, "export.onnx", "onnx", "fp32", 0.493, 9124, 730_000, 2061.0),
        _stage(int8, "quantize.nncf", "onnx", "int8", 0.176, 9110, 226_375, 6368.0),
        _stage(pruned, "prune.structured", "torch", "fp32", 0.612, 9040, 410_000, 2500.0),
    ]
    stages[0]["pass"] = None
    previous = stages[0]
    for stage in stages[1:]:
        stage["vs_baseline"] = _change(stage, stages[0])
        stage["vs_previous"] = _change(stage, previous)
        stage["budget"] = {"accuracy_drop": 0.01, "drop": stages[0]["accuracy"]["value"] - stage["accuracy"]["value"]}
        previous = stage
    if optional:
        tests = {export: (0, 0, 1.0, False), int8: (69, 55, 0.243, False), pruned: (131, 47, 3e-10, True)}
        for stage in stages[1:]:
            b, c, p, significant = tests[stage["name"]]
            stage["vs_baseline"]["accuracy_test"] = {"test": "mcnemar", "only_baseline_right": b,
                                                     "only_stage_right": c, "p_value": p, "significant": significant}
        for k, stage in enumerate(stages):
            p50 = stage["latency"]["p50_ms"]
            stage["latency_sweep"] = [
                {"batch_size": b, "p50_ms": p50 * b ** (0.75 - 0.05 * k),
                 "p50_ci95_ms": [p50 * b ** (0.75 - 0.05 * k) * 0.98, p50 * b ** (0.75 - 0.05 * k) * 1.02],
                 "samples_per_s": 1000 * b / (p50 * b ** (0.75 - 0.05 * k)), "unstable": b == 64 and k == 1}
                for b in (1, 4, 16, 64)
            ]
            # evaluate.latency.shapes: p50 grows with the image's area; accuracy measured on the torch stages
            # only, and the last size refused by one stage's runtime.
            stage["shape_sweep"] = [
                {"size": size, "shape": {"images": [1, 1, size, size]}, "source": f"data.eval loaded at {size}×{size}",
                 "p50_ms": p50 * (size / 28) ** 2, "p50_ci95_ms": [p50 * (size / 28) ** 2 * 0.97,
                                                                  p50 * (size / 28) ** 2 * 1.03],
                 "p90_ms": p50 * (size / 28) ** 2 * 1.2, "iterations": 300, "unstable": size == 40 and k == 2,
                 "inputs": "eval",
                 **({"accuracy": {"value": 0.9 - abs(size - 28) * 0.01, "n": 2000, "ci95": [0.88 - abs(size - 28) * 0.01,
                                                                                              0.92 - abs(size - 28) * 0.01]},
                     "batchnorm": "re-estimated on 640 data.calibration samples"} if k in (0, 3) else {})}
                for size in (20, 28, 40)
            ]
            if k == 1:
                stage["shape_sweep"][-1] = {"size": 40, "shape": {"images": [1, 1, 40, 40]}, "source": "resampled",
                                            "error": "RuntimeException: <shape> [1,1,40,40] out of bounds"}
        for stage in stages[1:3]:
            scale = stage["latency"]["p50_ms"]
            stage["profile"] = {
                "tool": "onnxruntime profiler",
                "by_op_type": [{"op_type": op, "ms": scale * share, "share": share} for op, share in
                               (("Conv", 0.62), ("Relu", 0.12), ("Add", 0.08), ("MaxPool", 0.06),
                                ("QuantizeLinear", 0.05), ("Gemm", 0.04), ("Flatten", 0.02), ("Reshape", 0.01))],
                "top_ops": [{"name": f"/layer{i}/conv/Conv", "op_type": "Conv", "ms": scale * (0.2 - 0.03 * i)}
                            for i in range(5)],
            }
    return {
        "schema_version": 1, "tool": {"name": "optimizer", "version": "0.1.0"},
        "recipe": {"name": recipe_name, "evaluate": {"latency": {"threads": 1, "batch_size": 1, "warmup_s": 1.0,
                                                                 "min_iterations": 1000, "min_duration_s": 3.0}},
                   "data": {"eval": {"dataset": "fashion-mnist", "split": "test"}}},
        "recipe_file": "recipes/synthetic.yaml", "environment": copy.deepcopy(environment or ENVIRONMENT),
        "started": "2026-01-01T00:00:00+00:00", "finished": "2026-01-01T00:01:00+00:00", "duration_s": 60.0,
        "passed": True, "stages": stages, "final": "final",
    }


def write_run(folder: Path, report: dict[str, Any], *, raw: bool = True) -> Path:
    """A run folder: report.json and, with ``raw``, per-iteration latencies for every stage."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    if raw:
        for stage in (s for s in report["stages"] if "latency" in s):
            p50 = stage["latency"]["p50_ms"]
            values = p50 * np.exp(rng.normal(0, 0.03, stage["latency"]["iterations"]))
            values[:3] *= 3  # a few slow outliers, as real runs have
            path = folder / stage["raw_latency_file"]
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, values)
    (folder / "report.json").write_text(json.dumps(report, indent=2))
    return folder


def svg_blocks(page: str) -> list[str]:
    return re.findall(r"<svg\b.*?</svg>", page, flags=re.S)


# ----------------------------------------------------------------------------------- Pareto front


def test_pareto_front_keeps_the_points_nothing_beats_on_both_counts() -> None:
    points = [(1.0, 0.91), (0.5, 0.91), (0.2, 0.90), (0.6, 0.89), (0.2, 0.88), (2.0, 0.95)]
    # (1.0, .91) loses to (0.5, .91); (0.6, .89) to (0.5, .91); (0.2, .88) to (0.2, .90).
    assert pareto_front(points) == [2, 1, 5]


def test_pareto_front_edge_cases() -> None:
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 0.5)]) == [0]
    assert pareto_front([(1.0, 0.5), (1.0, 0.5)]) == [0, 1]        # equal points do not dominate each other
    assert pareto_front([(float("nan"), 0.9), (1.0, 0.5)]) == [1]  # a point without a figure is left out


# --------------------------------------------------------------------------------------- verdict


def test_verdict_recommends_the_final_stage_unless_another_is_significantly_faster() -> None:
    report = synthetic_report(optional=True)
    rec = recommend(report)
    # The last stage (pruned) is in final/, but int8 is within budget and significantly faster.
    assert rec is not None and rec.stage["name"] == "int8" and not rec.in_final
    assert any("final/ holds 'pruned'" in remark for remark in rec.remarks)

    report["stages"] = report["stages"][:3]
    rec = recommend(report)
    assert rec is not None and rec.stage["name"] == "int8" and rec.in_final


def test_verdict_keeps_the_baseline_when_no_stage_is_faster() -> None:
    report = synthetic_report(optional=False)
    for stage in report["stages"][1:]:
        stage["latency"] = _latency(2.0)
    result = verdict(report)
    assert result.recommendation is not None and result.recommendation.stage["name"] == "baseline"
    assert result.headline.startswith("Keep the baseline")


def test_markdown_verdict_states_cost_and_gain_with_intervals() -> None:
    report = synthetic_report(optional=True)
    report["stages"] = report["stages"][:3]
    text = render_markdown(report)
    assert "**Recommended deployable: 'int8' (in final/).**" in text
    # Accuracy: the paired interval and McNemar's verdict; latency: both medians' intervals and the speedup range.
    assert "-0.14 points (95 % CI" in text and "paired" in text
    assert "not significant by McNemar's test (p = 0.24" in text
    assert "p50 0.176 ms (95 % CI 0.174–0.178)" in text and "6.33× faster (speedup between" in text
    assert ", significant." in text
    assert "| int8 | quantize.nncf |" in text and "p=0.24, n.s." in text


# --------------------------------------------------------------------------- optional fields absent / present


def test_html_and_markdown_render_a_report_without_the_optional_fields(tmp_path: Path) -> None:
    report = synthetic_report(optional=False)
    report["environment"] = {}               # an old or hand-made report may have next to nothing here
    for stage in report["stages"]:
        stage["latency"].pop("mode")
    run = write_run(tmp_path / "run", report, raw=False)
    page = render_html(report, run_dir=run)
    assert "<h2>Stages</h2>" in page and "<h2>Accuracy against latency</h2>" in page
    assert "<h2>Latency distributions</h2>" in page and "drawn from the summary" in page
    assert "Batch-size sweep" not in page and "Where the time goes" not in page and "<h2>Environment</h2>" not in page
    assert "no paired test" in page
    for block in svg_blocks(page):
        ET.fromstring(block)                 # every chart is well-formed XML
    markdown = render_markdown(report)
    assert "| pruned |" in markdown and "no paired significance test" in markdown
    assert "Batch-size sweep" not in markdown


def test_html_renders_every_optional_field(tmp_path: Path) -> None:
    report = synthetic_report(optional=True)
    run = write_run(tmp_path / "run", report)
    page = render_html(report, run_dir=run)
    for heading in ("Accuracy against latency", "What each stage did", "Latency distributions", "Batch-size sweep",
                    "Latency against input size", "Where the time goes", "Environment"):
        assert f"<h2>{heading}</h2>" in page
    # The input-size chart: one line per stage, each with its three sizes (the refused size left out).
    shapes = page[page.index("<h2>Latency against input size</h2>"):page.index("<h2>Where the time goes</h2>")]
    latency_chart = next(b for b in svg_blocks(shapes) if 'aria-label="Latency against input size' in b)
    assert latency_chart.count('<path d="M') == 4
    assert 'aria-label="Accuracy against input size' in shapes and "out of bounds" in shapes
    assert "&lt;shape&gt;" in shapes and "<shape>" not in shapes                  # the runtime's text is escaped
    assert "drawn from the summary" not in page                           # the raw .npy files were read
    assert "/layer0/conv/Conv" in page and "onnxruntime profiler" in page
    assert 'class="worse" title="McNemar' in page                         # pruned: significant drop, marked
    assert "p=3e-10" in page and "Example CPU @ 3.0GHz" in page
    assert "<script" not in page.lower() and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    blocks = svg_blocks(page)
    assert len(blocks) >= 7
    for block in blocks:
        ET.fromstring(block)
    markdown = render_markdown(report)
    assert "## Batch-size sweep" in markdown and "| int8 | 0.176 ms, 5,682/s |" in markdown.replace("  ", " ")
    assert "## Where the time goes" in markdown and "Conv 62 %" in markdown
    assert "## Latency against input size" in markdown and "| stage | size 20 | size 28 | size 40 |" in markdown
    assert ("| baseline | 0.568 ms (0.551–0.585); 82.00 % | 1.114 ms (1.081–1.147); 90.00 % | "
            "2.273 ms (2.205–2.342); 78.00 % |") in markdown
    assert "| export | 0.252 ms (0.244–0.259) | 0.493 ms (0.478–0.508) | – (error) |" in markdown
    assert "re-estimated on 640 data.calibration samples" in markdown and "(error)" in markdown


def test_raw_latency_files_outside_the_run_folder_are_not_read(tmp_path: Path) -> None:
    report = synthetic_report(optional=False)
    outside = tmp_path / "elsewhere.npy"
    np.save(outside, np.full(400, 123.0))
    report["stages"][0]["raw_latency_file"] = "../elsewhere.npy"
    run = write_run(tmp_path / "run", report)
    (run / report["stages"][0]["raw_latency_file"]).unlink(missing_ok=True)
    page = render_html(report, run_dir=run)
    assert "drawn from the summary in report.json" in page and "Raw timings not found for baseline" in page


def test_failed_run_renders_with_the_failure_first(tmp_path: Path) -> None:
    report = synthetic_report(optional=True)
    broken = report["stages"][3]
    broken.update(status="failed", error="stage 'pruned': accuracy dropped 0.84 points, over the budget of 0.50")
    broken.pop("vs_baseline")
    broken.pop("vs_previous")
    report["stages"].append({"name": "never", "pass": "quantize.ort", "config": {}, "status": "failed",
                             "seconds": 0.0, "error": "not run"})
    report["passed"], report["final"] = False, None
    page = render_html(report, run_dir=write_run(tmp_path / "run", report))
    assert "The run failed at stage &#x27;pruned&#x27;" in page and "FAILED" in page
    assert '<tr class="failed"><td>never</td>' in page
    markdown = render_markdown(report)
    assert "**FAILED**" in markdown and "final/ was not updated" in markdown


def test_report_whose_baseline_failed_still_renders() -> None:
    report = synthetic_report(optional=False)
    baseline = report["stages"][0]
    report["stages"] = [{key: baseline[key] for key in ("name", "pass", "config", "seconds")}]
    report["stages"][0].update(status="failed", error="checkpoint keys do not match the factory")
    report["passed"], report["final"], report["environment"] = False, None, {}
    page = render_html(report)
    assert "No conclusion: the baseline has no measurements." in page
    assert "checkpoint keys do not match the factory" in page
    assert "Accuracy against latency" not in page and "What each stage did" not in page
    assert "No conclusion" in render_markdown(report)


# ------------------------------------------------------------------------------------------- escaping


def test_text_from_the_report_is_escaped_in_every_rendering() -> None:
    hostile = "<script>alert(1)</script>"
    report = synthetic_report(optional=True, names=("baseline", hostile, "a|b [bold]x[/bold]", "pruned"),
                              recipe_name="<img src=x onerror=alert(2)>")
    report["stages"][1]["profile"]["top_ops"][0]["name"] = "</table><script>"
    report["environment"]["cpu"] = "<b>cpu</b>"
    page = render_html(report)
    assert "<script" not in page.lower() and "<img" not in page.lower() and "<b>cpu" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    for block in svg_blocks(page):
        ET.fromstring(block)                 # an escaped label cannot break the SVG either

    markdown = render_markdown(report)
    assert "<script" not in markdown and "&lt;script&gt;" in markdown
    assert "| a\\|b [bold]x[/bold] |" in markdown      # a pipe cannot split the table row

    from rich.console import Console

    from optimizer.report.terminal import stage_table

    table, notes = stage_table(report)
    console = Console(width=400, record=True)
    console.print(table)
    assert "[bold]x[/bold]" in console.export_text()   # printed as written, not read as rich markup


# ------------------------------------------------------------------------------------------ re-render


def test_rerender_rewrites_both_files_from_report_json(tmp_path: Path) -> None:
    report = synthetic_report(optional=True)
    run = write_run(tmp_path / "run", report)
    (run / "report.html").write_text("stale")
    written = rerender(run)
    assert sorted(p.name for p in written) == ["report.html", "report.md"]
    assert (run / "report.html").read_text() == render_html(report, run_dir=run)
    assert (run / "report.md").read_text() == render_markdown(report)
    assert not [p for p in run.iterdir() if ".tmp" in p.name]

    with pytest.raises(RecipeError, match="no report.json"):
        rerender(tmp_path / "empty")
    (run / "report.json").write_text(json.dumps({**report, "schema_version": 2}))
    with pytest.raises(InputRejected, match="schema_version 2"):
        rerender(run)


# ------------------------------------------------------------------------------- in a real browser

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def _chromium() -> str:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    message = ("headless Chromium not installed: `apt-get install chromium chromium-driver` (Debian) to check "
               "the HTML report in a browser")
    if os.environ.get("REPORT_REQUIRE_CHROMIUM") == "1":  # CI sets this, so a missing browser cannot pass silently
        pytest.fail(message)
    pytest.skip(message)


def _screenshot(page: Path, png: Path, *, height: int = 2400) -> list[str]:
    """Render ``page`` headless, write a screenshot, return the console messages Chromium logged."""
    binary = _chromium()
    profile = png.parent / f".chromium-{png.stem}"
    result = subprocess.run(
        [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--hide-scrollbars", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
         f"--window-size=1280,{height}", f"--screenshot={png}", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=180,
    )
    assert png.is_file(), f"no screenshot written (exit {result.returncode}): {result.stderr[-2000:]}"
    # Chromium logs every console message (errors, CSP violations, failed loads) as "...:CONSOLE...".
    return [line for line in result.stderr.splitlines() if re.search(r"CONSOLE[(:]", line)]


# Appended to a copy of the page: measures the stage table after layout and writes the figures into the
# DOM, where --dump-dom prints them. The copy drops the page's no-script policy; the policy does not
# change layout, and the page itself is still checked with it in place by the screenshot tests.
_LAYOUT_SCRIPT = """<script>
const table = document.querySelector('table.stages'), box = table.parentElement;
const out = document.createElement('pre');
out.id = 'layout';
out.textContent = JSON.stringify({viewport: window.innerWidth, page: document.documentElement.scrollWidth,
  table: table.getBoundingClientRect().width, table_scroll: table.scrollWidth, box: box.clientWidth,
  box_scroll: box.scrollWidth, stage_name_lines: [...table.querySelectorAll('tbody td:first-child')].map(td => {
    const range = document.createRange();
    range.selectNodeContents(td.firstChild);
    return range.getClientRects().length;
  })});
document.body.appendChild(out);
</script>"""


def _stage_table_layout(page: Path, work: Path, *, width: int) -> dict[str, Any]:
    """Widths (CSS px) of the stage table, its scrolling wrapper, the viewport and the page, in headless
    Chromium at ``width`` px."""
    binary = _chromium()
    text = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page.read_text())
    probe = work / f"layout-{width}.html"
    probe.write_text(text.replace("</body>", _LAYOUT_SCRIPT + "</body>"))
    result = subprocess.run(
        [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--hide-scrollbars", f"--user-data-dir={work / f'.chromium-layout-{width}'}", f"--window-size={width},900",
         "--dump-dom", probe.resolve().as_uri()],
        capture_output=True, text=True, timeout=180,
    )
    found = re.search(r'<pre id="layout">(.*?)</pre>', result.stdout, flags=re.S)
    assert found, f"no measurement in the dumped DOM (exit {result.returncode}): {result.stderr[-2000:]}"
    return json.loads(html.unescape(found[1]))


def _assert_stage_table_fits(layout: dict[str, Any], width: int) -> None:
    assert layout["viewport"] == width, layout             # measured at the width asked for
    assert layout["table"] <= layout["box"] + 0.5, layout  # the table does not overflow its wrapper...
    assert layout["box_scroll"] <= layout["box"], layout   # ...so the wrapper has nothing to scroll
    assert layout["page"] <= width, layout                 # and the page does not scroll sideways


def _assert_not_blank(png: Path, width: int, height: int) -> None:
    from PIL import Image

    with Image.open(png) as image:
        assert image.size == (width, height)
        grey = np.asarray(image.convert("L"))
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert (grey < 200).mean() > 0.02, "the page is almost blank"
    assert colours is None or len(colours) > 64, "too few colours for text and charts"
    assert (grey[:200] < 100).any(), "no dark text in the header"


def test_chromium_console_check_sees_errors(tmp_path: Path) -> None:
    """The browser check must be able to fail: a page that logs an error is caught."""
    page = tmp_path / "broken.html"
    page.write_text("<!doctype html><title>x</title><p>x</p><script>console.error('broken page')</script>")
    messages = _screenshot(page, tmp_path / "broken.png", height=300)
    assert any("broken page" in m for m in messages), messages


@pytest.fixture(scope="module")
def quickstart_report(example_checkpoint: Path, tmp_path_factory) -> Path:
    """A real run of the quick start (2,000 eval images, quick latency mode): its report folder."""
    from optimizer import run_recipe

    out = tmp_path_factory.mktemp("report_html") / "out"
    run_recipe(quickstart_dict(example_checkpoint), out=out)
    return out


def test_real_report_loads_in_chromium_without_console_errors(quickstart_report: Path, tmp_path: Path) -> None:
    rerender(quickstart_report)
    page = quickstart_report / "report.html"
    text = page.read_text()
    assert "Recommended deployable" in text and "<h2>Latency distributions</h2>" in text
    assert "drawn from the summary" not in text          # the raw timings of every stage were found
    png = tmp_path / "report.png"
    messages = _screenshot(page, png)
    assert messages == [], "console messages:\n" + "\n".join(messages)
    assert png.stat().st_size > 50_000
    _assert_not_blank(png, 1280, 2400)
    _assert_stage_table_fits(_stage_table_layout(page, tmp_path, width=1280), 1280)
    keep = os.environ.get("REPORT_SCREENSHOT_DIR")  # CI can keep the picture as a build artifact
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, Path(keep) / "report.png")


def test_synthetic_report_with_every_section_loads_in_chromium(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", synthetic_report(optional=True))
    rerender(run)
    assert "<h2>Latency against input size</h2>" in (run / "report.html").read_text()
    png = tmp_path / "full.png"
    messages = _screenshot(run / "report.html", png, height=4000)
    assert messages == [], "console messages:\n" + "\n".join(messages)
    _assert_not_blank(png, 1280, 4000)


def widest_report() -> dict[str, Any]:
    """Six stages with every cell at its widest: tail and throughput intervals (some without an upper
    bound), the unstable mark everywhere, six-digit throughputs, gigabyte sizes, a long custom pass name."""
    report = synthetic_report(optional=True)
    for name in ("reconstruct", "distill"):
        extra = copy.deepcopy(report["stages"][3])
        extra.update(name=name, raw_latency_file=f"measurements/{name}/latency_ms.npy")
        report["stages"].append(extra)
    for k, stage in enumerate(report["stages"]):
        lat, thr = stage["latency"], stage["throughput"]
        for key in ("p50_ms", "p90_ms", "p99_ms"):
            lat[key] *= 10.37
        lat["p50_ci95_ms"] = [lat["p50_ms"] * 0.99, lat["p50_ms"] * 1.01]
        for q in (90, 99):
            lat[f"p{q}_ci95_ms"] = [lat[f"p{q}_ms"] * 0.97, None if k % 2 else lat[f"p{q}_ms"] * 1.3]
            lat[f"p{q}_unstable"] = True
        lat["unstable"] = True
        thr.update(samples_per_s=123_456.0 + k, samples_per_s_ci95=[118_765.0, 128_765.0], unstable=True, trials=3)
        stage.update(size_bytes=1_234_560_000, macs=123_456_700_000)
    report["stages"][4]["pass"] = "python:my_company.passes:ChannelShuffle"
    return report


def test_html_stage_table_folds_form_and_precision_under_the_pass() -> None:
    page = render_html(widest_report())
    table = re.search(r'<table class="stages">.*?</table>', page, flags=re.S)[0]
    heads = re.findall(r'<th scope="col">(.*?)</th>', table)
    assert heads[:2] == ["stage", "pass<small>form · precision</small>"]
    assert "p50 ms<small>95% CI</small>" in heads and "speedup<small>vs base</small>" in heads
    assert not any(h.startswith(("form", "precision", "params", "p90")) for h in heads)
    assert all(len(re.findall(r"<td\b", row)) == len(heads) for row in re.findall(r"<tr\b.*?</tr>", table)[1:])
    assert "<td>quantize.<wbr>nncf<small>onnx · int8</small></td>" in table
    # A long custom pass name may wrap after its dots and colons.
    assert "python:<wbr>my_company.<wbr>passes:<wbr>ChannelShuffle" in table
    markdown = render_markdown(widest_report())
    assert "| stage | pass | form | precision |" in markdown   # report.md keeps every column


def test_stage_table_fits_a_laptop_screen_in_chromium(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", widest_report())
    rerender(run)
    layout = _stage_table_layout(run / "report.html", tmp_path, width=1280)
    _assert_stage_table_fits(layout, 1280)
    assert layout["stage_name_lines"] == [1] * 6, layout   # fitted by wrapping titles, not stage names
    # The measurement sees an overflow where there is one: on a phone-sized screen the wrapper scrolls.
    narrow = _stage_table_layout(run / "report.html", tmp_path, width=600)  # Chromium's narrowest is 500
    assert narrow["box_scroll"] > narrow["box"] and narrow["page"] <= 600, narrow


# ------------------------------------------------------------------------- intervals of tails and throughput


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A real run of a 784 -> 10 linear model (baseline and ONNX export, quick latency mode, 3 trials)."""
    from safetensors.torch import save_file

    from optimizer import run_recipe
    from tests.test_faults import linear_recipe, tiny_linear

    folder = tmp_path_factory.mktemp("tiny_run")
    checkpoint = folder / "linear.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_linear().state_dict().items()}, str(checkpoint))
    out = folder / "out"
    run_recipe(linear_recipe(checkpoint), out=out)
    return out


def test_report_json_and_tables_carry_tail_and_throughput_intervals(tiny_run: Path) -> None:
    from optimizer.measure.latency import summarize
    from optimizer.report.rows import interval_text

    report = json.loads((tiny_run / "report.json").read_text())
    markdown = (tiny_run / "report.md").read_text()
    page = (tiny_run / "report.html").read_text()
    assert [s["name"] for s in report["stages"]] == ["baseline", "export"]
    for stage in report["stages"]:
        lat, thr = stage["latency"], stage["throughput"]
        # The intervals in report.json are those of the saved raw times, and bracket their percentile.
        again = summarize(np.load(tiny_run / stage["raw_latency_file"]))
        for q in (90, 99):
            interval = lat[f"p{q}_ci95_ms"]
            assert interval == again[f"p{q}_ci95_ms"] and isinstance(lat[f"p{q}_unstable"], bool)
            low, high = interval
            assert low is not None and low <= lat[f"p{q}_ms"] and (high is None or lat[f"p{q}_ms"] <= high)
        assert thr["trials"] == 3 and len(thr["trial_samples_per_s"]) == 3
        low, high = thr["samples_per_s_ci95"]
        assert low <= thr["samples_per_s"] <= high and isinstance(thr["unstable"], bool)
        # Shown where p50's interval is shown: the stage table of report.md and report.html.
        p99 = f"{lat['p99_ms']:.3f} ({interval_text(lat['p99_ci95_ms'], 3)})"
        samples = f"{thr['samples_per_s']:.0f} ({interval_text(thr['samples_per_s_ci95'], 0)})"
        row = next(line for line in markdown.splitlines() if line.startswith(f"| {stage['name']} |"))
        assert p99 in row and samples in row
        assert f"{lat['p99_ms']:.3f}" in page and f"<small>{interval_text(lat['p99_ci95_ms'], 3)}</small>" in page
        assert f"<small>{interval_text(thr['samples_per_s_ci95'], 0)}</small>" in page
    assert "| p90 ms (95% CI) | p99 ms (95% CI) |" in markdown and "samples/s (95% CI)" in markdown
