"""The batch-size sweep and in-run profiling on a real run of the built-in example, and the commands that
read finished runs (`optimizer report`, `optimizer compare`, `optimizer profile`) from the command line.

The renderings of these sections are tested on synthetic reports in test_report_html.py and
test_compare.py; here the figures come from real measurements, and the commands run as users run them.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from optimizer.errors import EXIT_USAGE
from tests.conftest import quickstart_dict, write_recipe
from tests.test_end_to_end import run_cli, sha256_tree
from tests.test_report_html import svg_blocks

BATCH_SIZES = [1, 4, 16]
STAGES = ["baseline", "export", "int8"]
TOOLS = {"baseline": "torch.profiler", "export": "onnxruntime", "int8": "onnxruntime"}
# Inside the run, the torch baseline of a recipe ending on ONNX is timed and profiled on onnxruntime through a
# throwaway export (evaluate.latency.runtime: auto); `optimizer profile` profiles each stage's own artifact.
IN_RUN_TOOLS = {**TOOLS, "baseline": "onnxruntime"}


def _recipe(checkpoint: Path) -> dict:
    """The quick start at test size: 500 eval images, quick latency mode, a small calibration subset."""
    recipe = quickstart_dict(checkpoint, eval_samples=500)
    recipe["stages"][1]["with"]["subset_size"] = 100
    return recipe


@pytest.fixture(scope="module")
def sweep_run(example_checkpoint: Path, tmp_path_factory) -> Path:
    """The quick start with a batch-size sweep and profiling switched on, run through the CLI."""
    folder = tmp_path_factory.mktemp("sweep_run")
    recipe = _recipe(example_checkpoint)
    recipe["evaluate"]["latency"]["batch_sizes"] = BATCH_SIZES
    recipe["evaluate"]["profile"] = True
    out = folder / "out"
    result = run_cli("run", str(write_recipe(folder, recipe)), "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def ort_run(example_checkpoint: Path, tmp_path_factory) -> Path:
    """A second recipe on the same model for `compare`: onnxruntime's own INT8 quantizer instead of NNCF."""
    folder = tmp_path_factory.mktemp("ort_run")
    recipe = _recipe(example_checkpoint)
    recipe["name"] = "quickstart_ort"
    recipe["stages"][1] = {"name": "int8", "pass": "quantize.ort", "with": {"subset_size": 100}}
    recipe["budget"] = {"accuracy_drop": 0.03}   # a smoke test of compare, not of this quantizer's accuracy
    out = folder / "out"
    result = run_cli("run", str(write_recipe(folder, recipe)), "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


# ------------------------------------------------------------------------------- sweep and profile


def test_sweep_has_one_point_per_batch_size_for_every_stage(sweep_run: Path) -> None:
    stages = _report(sweep_run)["stages"]
    assert [s["name"] for s in stages] == STAGES
    for stage in stages:
        sweep = stage["latency_sweep"]
        assert [p["batch_size"] for p in sweep] == BATCH_SIZES, stage["name"]
        for point in sweep:
            low, high = point["p50_ci95_ms"]
            assert 0 < low <= point["p50_ms"] <= high, point
            assert isinstance(point["unstable"], bool)
            # Samples per second over the whole timed loop agree with the median batch time (the mean of a
            # loop is at least its median, so the rate sits at or a little below batch / p50).
            ratio = point["samples_per_s"] * point["p50_ms"] / (1000 * point["batch_size"])
            assert 0.3 < ratio < 1.5, (stage["name"], point)
        by_size = {p["batch_size"]: p for p in sweep}
        assert by_size[16]["p50_ms"] > by_size[1]["p50_ms"], sweep   # sixteen images take longer than one
        # The sweep's batch 1 is the single-stream latency measured again: the same order of magnitude.
        assert 1 / 3 < by_size[1]["p50_ms"] / stage["latency"]["p50_ms"] < 3, (sweep, stage["latency"])


def test_profile_lists_operators_whose_times_add_up(sweep_run: Path) -> None:
    for stage in _report(sweep_run)["stages"]:
        profile = stage["profile"]
        name = stage["name"]
        assert profile["tool"] == IN_RUN_TOOLS[name] and profile["iterations"] == 50   # quick mode profiles 50 runs
        by_type, top = profile["by_op_type"], profile["top_ops"]
        assert by_type and top and len(top) <= 10
        # The per-type times are the total, split; the shares are those times over the total.
        assert sum(row["ms"] for row in by_type) == pytest.approx(profile["total_ms"], rel=1e-6)
        assert sum(row["share"] for row in by_type) == pytest.approx(1.0, abs=1e-6)
        assert [row["ms"] for row in by_type] == sorted((row["ms"] for row in by_type), reverse=True)
        assert [op["ms"] for op in top] == sorted((op["ms"] for op in top), reverse=True)
        type_ms = {row["op_type"]: row["ms"] for row in by_type}
        for op in top:
            assert 0 < op["ms"] <= type_ms[op["op_type"]] * (1 + 1e-9), op   # one operator within its type
        assert sum(op["ms"] for op in top) <= profile["total_ms"] * (1 + 1e-9)
        # Operator time per inference is of the order of the measured latency: profiling adds overhead
        # and leaves out the time between operators, but not by a factor of five.
        assert 0.2 < profile["total_ms"] / stage["latency"]["p50_ms"] < 5, (name, profile["total_ms"], stage["latency"])
        # A small ResNet spends most of its time in convolutions, on every runtime.
        assert "conv" in by_type[0]["op_type"].lower(), (name, by_type[:3])
    int8 = _report(sweep_run)["stages"][2]["profile"]
    assert any(row["op_type"].startswith(("QLinear", "ConvInteger", "MatMulInteger")) for row in int8["by_op_type"])


def test_markdown_and_html_show_the_measured_sweep_and_profile(sweep_run: Path) -> None:
    stages = _report(sweep_run)["stages"]
    markdown = (sweep_run / "report.md").read_text()
    page = (sweep_run / "report.html").read_text()

    sweep_md = markdown.split("## Batch-size sweep", 1)[1].split("\n## ", 1)[0]
    assert "| stage | batch 1 | batch 4 | batch 16 |" in sweep_md
    for stage in stages:
        row = next(line for line in sweep_md.splitlines() if line.startswith(f"| {stage['name']} |"))
        for point in stage["latency_sweep"]:
            assert f"{point['p50_ms']:.3f} ms, {point['samples_per_s']:,.0f}/s" in row
    profile_md = markdown.split("## Where the time goes", 1)[1].split("\n## ", 1)[0]
    for stage in stages:
        top = stage["profile"]["by_op_type"][0]
        line = f"- {stage['name']} ({IN_RUN_TOOLS[stage['name']]}): {top['op_type']} {top['share'] * 100:.0f} %"
        assert line in profile_md

    for heading in ("Stages", "Batch-size sweep", "Where the time goes"):
        assert f"<h2>{heading}</h2>" in page
    sweep_html = page.split("<h2>Batch-size sweep</h2>", 1)[1].split("</section>", 1)[0]
    assert all(f'<th scope="col">batch {b}</th>' in sweep_html for b in BATCH_SIZES)
    for stage in stages:
        for point in stage["latency_sweep"]:
            assert f"{point['p50_ms']:.3f} ms" in sweep_html
    assert len(svg_blocks(sweep_html)) >= 2               # latency and throughput against batch size
    profile_html = page.split("<h2>Where the time goes</h2>", 1)[1].split("</section>", 1)[0]
    for stage in stages:
        assert f"<h3>{stage['name']}: slowest operators</h3>" in profile_html
        slowest = stage["profile"]["top_ops"][0]
        assert f"<td>{slowest['op_type']}</td><td>{slowest['ms']:.3f}</td>" in profile_html
    for block in svg_blocks(page):
        ET.fromstring(block)


# ------------------------------------------------------------------------------------ optimizer report


def test_report_command_rewrites_the_pages_the_run_wrote(sweep_run: Path, clean_copy) -> None:
    out = clean_copy(sweep_run)
    written = {name: (out / name).read_bytes() for name in ("report.md", "report.html")}
    report_json = (out / "report.json").read_bytes()
    for name in written:
        (out / name).unlink()
    result = run_cli("report", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == [f"wrote {out / 'report.md'}", f"wrote {out / 'report.html'}"]
    # The same pages, byte for byte, from report.json alone; report.json itself is left as it was.
    for name, content in written.items():
        assert (out / name).read_bytes() == content, name
    assert (out / "report.json").read_bytes() == report_json


def test_report_command_on_a_folder_without_a_run_exits_2(tmp_path: Path) -> None:
    result = run_cli("report", str(tmp_path))
    assert result.returncode == EXIT_USAGE
    assert result.stderr.strip() == (f"optimizer: error: {tmp_path}: no report.json here; give the output folder "
                                     "of a run (its --out)")
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------- optimizer compare


def test_compare_command_prints_and_writes_the_comparison(sweep_run: Path, ort_run: Path, tmp_path: Path) -> None:
    result = run_cli("compare", str(sweep_run), str(ort_run))
    assert result.returncode == 0, result.stderr[-2000:]
    printed = result.stdout
    assert printed.startswith("# Comparison of 2 runs: quickstart, quickstart_ort\n")
    for run in ("quickstart", "quickstart_ort"):
        for stage in STAGES:
            assert re.search(rf"^\| {run} \| {stage}( ★)? \|", printed, flags=re.M), (run, stage)
    assert "not comparable" not in printed          # one machine, one latency setup, one eval set
    assert "Fastest recommended deployable: '" in printed
    # Each row carries its run's measured p50.
    for out in (sweep_run, ort_run):
        for stage in _report(out)["stages"]:
            assert f"{stage['latency']['p50_ms']:.3f} (" in printed

    folder = tmp_path / "cmp"
    result = run_cli("compare", str(sweep_run), str(ort_run), "--out", str(folder))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == [f"wrote {folder / 'compare.md'}", f"wrote {folder / 'compare.html'}"]
    assert (folder / "compare.md").read_text() == printed   # the file holds what the command printed
    page = (folder / "compare.html").read_text()
    assert "<h1>Comparison of 2 runs</h1>" in page and "<h2>Stages of every run</h2>" in page
    chart = next(b for b in svg_blocks(page) if "Top-1 accuracy against p50 latency" in b)
    ET.fromstring(chart)
    assert "quickstart: int8" in chart and "quickstart_ort: int8" in chart
    assert "<script" not in page.lower() and "Content-Security-Policy" in page


def test_compare_command_needs_two_runs(sweep_run: Path, tmp_path: Path) -> None:
    result = run_cli("compare", str(sweep_run))
    assert result.returncode == EXIT_USAGE
    assert result.stderr.strip() == "optimizer: error: compare needs at least two run folders"
    result = run_cli("compare", str(sweep_run), str(tmp_path / "missing"))
    assert result.returncode == EXIT_USAGE and "no report.json" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------- optimizer profile

_PROFILE_HEAD = re.compile(r"^(\w+): (.+), ([\d.]+) ms per inference in operators \(mean of (\d+) runs\)$")
_PROFILE_ROW = re.compile(r"^\s+([\d.]+)%\s+([\d.]+) ms  (\S.*)$")


def _parse_profile(stdout: str) -> dict[str, dict]:
    """`optimizer profile` output: stage -> tool, total ms, runs and (share %, ms, op type) rows."""
    parsed: dict[str, dict] = {}
    current = None
    for line in stdout.splitlines():
        head, row = _PROFILE_HEAD.match(line), _PROFILE_ROW.match(line)
        if head:
            current = parsed[head[1]] = {"tool": head[2], "total_ms": float(head[3]), "runs": int(head[4]),
                                         "rows": []}
        else:
            assert row and current is not None, f"unexpected line: {line!r}"
            current["rows"].append((float(row[1]), float(row[2]), row[3]))
    return parsed


def test_profile_command_times_each_stage_on_its_runtime(sweep_run: Path) -> None:
    before = sha256_tree(sweep_run)
    result = run_cli("profile", str(sweep_run), "--iterations", "20", "--top", "3")
    assert result.returncode == 0, result.stderr[-2000:]
    parsed = _parse_profile(result.stdout)
    assert list(parsed) == STAGES
    for name, profile in parsed.items():
        assert profile["tool"] == TOOLS[name] and profile["runs"] == 20 and profile["total_ms"] > 0
        rows = profile["rows"]
        assert len(rows) == 3                                      # --top 3
        assert [r[1] for r in rows] == sorted((r[1] for r in rows), reverse=True)
        assert sum(r[0] for r in rows) <= 100.2                    # shares of the whole, rounded
        assert all(r[1] <= profile["total_ms"] + 1e-3 for r in rows)
        assert "conv" in rows[0][2].lower(), rows
    assert sha256_tree(sweep_run) == before                        # profiling reads the run, writes nothing there

    result = run_cli("profile", str(sweep_run), "--stage", "int8", "--iterations", "5")
    assert result.returncode == 0, result.stderr[-2000:]
    assert list(_parse_profile(result.stdout)) == ["int8"]


def test_profile_command_errors_are_one_line(sweep_run: Path, tmp_path: Path) -> None:
    result = run_cli("profile", str(sweep_run), "--stage", "nope")
    assert result.returncode == EXIT_USAGE
    assert result.stderr.strip() == (f"optimizer: error: --stage nope: not in {sweep_run / 'report.json'}; "
                                     "stages: baseline, export, int8")
    assert result.stdout == ""                                     # nothing profiled before the refusal
    result = run_cli("profile", str(tmp_path))
    assert result.returncode == EXIT_USAGE
    assert "cannot read the run's report" in result.stderr and len(result.stderr.strip().splitlines()) == 1
