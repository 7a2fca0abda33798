"""The stage table as cells, shared by the Markdown, HTML and terminal renderings.

A cell keeps its value, its interval or test result, and whether the change is significant apart, so
the HTML page can style them while Markdown and the terminal print them as one string.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from optimizer.measure.latency import TimingPlan
from optimizer.report.metric import TOP1, MetricView, report_metric

COLUMNS = ["stage", "pass", "form", "precision", "size MB", "params", "MMACs", "top-1 % (95% CI)", "Δ top-1 vs base",
           "Δ top-1 vs prev", "p50 ms (95% CI)", "p90 ms (95% CI)", "p99 ms (95% CI)", "speedup vs base",
           "speedup vs prev", "samples/s (95% CI)", "status"]

# The accuracy columns: named after the report's metric (these are top-1's names).
ACCURACY_COLUMNS = ("top-1 % (95% CI)", "Δ top-1 vs base", "Δ top-1 vs prev")


def columns(report: dict[str, Any]) -> list[str]:
    """COLUMNS with the accuracy columns named after the report's metric; same order and length."""
    view = report_metric(report)
    names = dict(zip(ACCURACY_COLUMNS, (view.column, view.delta_column("base"), view.delta_column("prev"))))
    return [names.get(c, c) for c in COLUMNS]


# Marks on a cell: a significant improvement or regression, a change that is not significant, a figure
# too noisy to trust.
BETTER, WORSE, NOT_SIGNIFICANT, UNSTABLE = "better", "worse", "ns", "unstable"


@dataclass(frozen=True)
class Cell:
    value: str
    detail: str = ""            # interval or test result: in brackets in text, under the value in HTML
    suffix: str = ""            # a word that must stay visible next to the value ("unstable")
    mark: str | None = None
    title: str | None = None    # a longer explanation (tooltip in HTML)

    @property
    def text(self) -> str:
        out = self.value + (f" ({self.detail})" if self.detail else "")
        return out + (f" {self.suffix}" if self.suffix else "")


DASH = Cell("–")


def interval_text(interval: list[float | None], digits: int) -> str:
    """``low–high``; a bound that no order statistic reaches (too few iterations) shows as 0 or ∞."""
    low, high = interval
    return (f"{'0' if low is None else f'{low:.{digits}f}'}–"
            f"{'∞' if high is None else f'{high:.{digits}f}'}")


def percentile_cell(lat: dict[str, Any], q: int) -> Cell:
    """p50, p90 or p99 with its 95 % interval and the unstable mark; a report from before the tail intervals
    existed shows the bare figure."""
    value = lat.get(f"p{q}_ms")
    if value is None:
        return DASH
    interval = lat.get(f"p{q}_ci95_ms")
    if not interval:
        return Cell(f"{value:.3f}")
    unstable = bool(lat.get("unstable" if q == 50 else f"p{q}_unstable"))
    # The median's interval always has both bounds; a tail's may not, with few iterations.
    why = ("the 95 % interval of the median is wider than 10 % of it" if q == 50 else
           f"the 95 % interval of the p{q} is wider than 10 % of it or has no bound (too few iterations)")
    why += ", or the trials' medians spread by more than 10 %"
    return Cell(f"{value:.3f}", interval_text(interval, 3), "unstable" if unstable else "",
                mark=UNSTABLE if unstable else None, title=why if unstable else None)


def throughput_cell(throughput: dict[str, Any] | None) -> Cell:
    """Samples per second with the 95 % interval across trials, when there were several."""
    value = (throughput or {}).get("samples_per_s")
    if value is None:
        return DASH
    interval = throughput.get("samples_per_s_ci95")
    unstable = bool(throughput.get("unstable"))
    return Cell(f"{value:.0f}", interval_text(interval, 0) if interval else "", "unstable" if unstable else "",
                mark=UNSTABLE if unstable else None,
                title="the 95 % interval across trials is wider than 10 % of the figure" if unstable else None)


def _pct(value: float) -> str:
    return f"{value * 100:.2f}"


def speed_cell(change: dict[str, Any] | None) -> Cell:
    if not change or change.get("speedup") is None:
        return DASH
    speedup = change["speedup"]
    if not change.get("latency_significant"):
        return Cell(f"{speedup:.2f}×", "n.s.", mark=NOT_SIGNIFICANT,
                    title="not significant: the 95 % intervals of the medians overlap or one side is unstable")
    return Cell(f"{speedup:.2f}×", mark=BETTER if speedup > 1 else WORSE)


def accuracy_delta_cell(change: dict[str, Any] | None, view: MetricView = TOP1) -> Cell:
    """Change in top-1 points (or the metric's units), with the paired test's p-value when the report has it:
    McNemar's for right-or-wrong scores, the sign-flip permutation test for others."""
    if not change or change.get("accuracy_delta") is None:
        return DASH
    value = view.delta(change["accuracy_delta"])
    test = change.get("accuracy_test")
    if not test or test.get("p_value") is None:
        return Cell(value)
    p = f"p={test['p_value']:.2g}"
    if test.get("test") == "sign-flip":
        low, high = test.get("difference_ci95") or (None, None)
        counts = (f"sign-flip permutation test of the paired differences ({test.get('resamples')} resamples)"
                  + (f"; 95 % bootstrap interval {view.delta(low)} to {view.delta(high)}" if low is not None else ""))
    else:
        counts = (f"McNemar: {test.get('only_baseline_right')} samples right only before, "
                  f"{test.get('only_stage_right')} right only after")
    if not test.get("significant"):
        return Cell(value, f"{p}, n.s.", mark=NOT_SIGNIFICANT, title=counts)
    return Cell(value, p, mark=BETTER if view.improved(change["accuracy_delta"]) else WORSE, title=counts)


def previous_change(stage: dict[str, Any], previous_is_baseline: bool) -> dict[str, Any] | None:
    """``vs_previous``, with the baseline's paired test when the previous stage is the baseline: the two
    comparisons are then the same one, and reports carry the test only in ``vs_baseline``."""
    change = stage.get("vs_previous")
    test = (stage.get("vs_baseline") or {}).get("accuracy_test")
    if change and previous_is_baseline and test and not change.get("accuracy_test"):
        return {**change, "accuracy_test": test}
    return change


def stage_cells(report: dict[str, Any]) -> list[list[Cell]]:
    view = report_metric(report)
    rows = []
    ok_before = 0   # stages with status ok so far: vs_previous compares with the last of them
    for s in report["stages"]:
        if "accuracy" in s and "latency" in s:
            acc = s["accuracy"]
            lat = s["latency"]
            low, high = acc["ci95"]
            row = [
                Cell(s["name"]), Cell(s.get("pass") or "–"), Cell(s.get("form") or "–"),
                Cell(s.get("precision") or "–"),
                Cell(f"{s['size_bytes'] / 1e6:.2f}") if s.get("size_bytes") is not None else DASH,
                Cell(f"{s['params']:,}") if s.get("params") is not None else DASH,
                Cell(f"{s['macs'] / 1e6:.1f}") if s.get("macs") else DASH,
                Cell(view.value(acc["value"]), view.interval(low, high)),
                accuracy_delta_cell(s.get("vs_baseline"), view),
                accuracy_delta_cell(previous_change(s, ok_before == 1), view),
                percentile_cell(lat, 50), percentile_cell(lat, 90), percentile_cell(lat, 99),
                speed_cell(s.get("vs_baseline")), speed_cell(s.get("vs_previous")),
                throughput_cell(s.get("throughput")),
                Cell(s["status"], mark=None if s["status"] == "ok" else WORSE),
            ]
        else:
            row = [Cell(s["name"]), Cell(s.get("pass") or "–"), Cell(s.get("form") or "–")]
            row += [DASH] * (len(COLUMNS) - 4) + [Cell(s["status"], mark=None if s["status"] == "ok" else WORSE)]
        rows.append(row)
        ok_before += s.get("status") == "ok"
    return rows


def stage_rows(report: dict[str, Any]) -> list[list[str]]:
    return [[cell.text for cell in row] for row in stage_cells(report)]


def _accuracy_note(report: dict[str, Any]) -> str:
    view = report_metric(report)
    if view.is_top1:
        return ("Δ top-1 is in points; p is McNemar's exact test on the per-sample results of the same eval "
                "set (n.s.: p ≥ 0.05, the change may be chance).")
    what = {"top5": "top-5: the label is among the 5 largest outputs",
            "agreement": ("top-1 agreement: the arg-max class is the baseline's" if view.percent else
                          "cosine agreement: mean cosine similarity of each sample's output to the baseline's")}
    direction = "higher is better" if view.higher_is_better else "lower is better"
    text = what.get(view.metric, f"{view.name}: mean of the per-sample scores of {view.metric} ({direction})")
    if view.metric == "agreement":
        text += " (the baseline's is 1 by definition)"
    unit = "points" if view.percent else "the metric's units"
    tests = ("p is a sign-flip permutation test of the per-sample differences against the baseline on the same eval "
             "set, and the intervals are bootstrap intervals of the mean" if view.bootstrap else
             "p is McNemar's exact test on the per-sample results of the same eval set")
    return f"Accuracy is {text}. Δ {view.name} is in {unit}; {tests} (n.s.: p ≥ 0.05, the change may be chance)."


RUNTIME_NAMES = {"torch-eager": "PyTorch eager", "onnxruntime": "onnxruntime", "openvino": "OpenVINO",
                 "tensorrt": "TensorRT"}


def runtime_label(stage: dict[str, Any]) -> str:
    """The runtime a stage's latency was timed on, for people: 'onnxruntime', 'OpenVINO f32', 'PyTorch eager'.

    Reports from before ``latency.runtime`` existed name it only in the stage's runtime settings."""
    settings = stage.get("runtime") or {}
    name = (stage.get("latency") or {}).get("runtime") or settings.get("runtime") or "?"
    label = RUNTIME_NAMES.get(name, name)
    hint = settings.get("precision_hint")
    return f"{label} {hint}" if name == "openvino" and hint else label


def timing_note(stages: list[dict[str, Any]]) -> str:
    """Which runtime timed each stage: the waterfall compares like with like only where it is one runtime."""
    groups: list[tuple[str, list[str]]] = []
    for s in stages:
        lat = s.get("latency")
        if not lat:
            continue
        label = runtime_label(s)
        if lat.get("timed_via") == "export":
            label += (f" through a throwaway export, in the torch stage's own precision "
                      f"({str(s.get('precision') or 'fp32').upper()})")
        if groups and groups[-1][0] == label:
            groups[-1][1].append(s["name"])
        else:
            groups.append((label, [s["name"]]))
    text = "Latency timed on: " + "; ".join(f"{', '.join(names)} on {label}" for label, names in groups) + "."
    if any((s.get("latency") or {}).get("timed_via") == "export" for s in stages):
        text += " Accuracy of those torch stages is measured on the torch model itself."
    timed = [s for s in stages if s.get("latency")]
    # Eager by choice (not a failed export): the speedup of the first stage after it mixes two effects.
    eager = [i for i, s in enumerate(timed)
             if runtime_label(s) == "PyTorch eager" and not s["latency"].get("deploy_fallback")]
    if eager and any(runtime_label(s) != "PyTorch eager" for s in timed[eager[0]:]):
        text += (" The first stage timed on another runtime than PyTorch eager also carries the change of runtime "
                 "in its speedup; evaluate.latency.runtime: deploy times torch stages on the deployment runtime.")
    return text


def inputs_note(stages: list[dict[str, Any]]) -> str:
    """What the single-stream latency was timed on (``evaluate.latency.inputs``); reports from before the setting
    timed one fixed batch."""
    timed = [s for s in stages if s.get("latency")]
    kinds = {(s["latency"].get("inputs") or "fixed") for s in timed}
    if kinds == {"eval"}:
        counts = sorted({int(s["latency"].get("input_samples") or 0) for s in timed})
        many = f"{counts[0]:,}" if len(counts) == 1 else f"{counts[0]:,}–{counts[-1]:,}"
        return (f"Latency inputs: real eval samples ({many} distinct), each stage fed them in turn, round-robin in a "
                "seeded order (evaluate.latency.inputs: eval): p50, p90 and p99 are over the inputs users send.")
    if kinds == {"fixed"}:
        return ("Latency inputs: one fixed batch of eval samples drawn by seed, run again and again "
                "(evaluate.latency.inputs: fixed).")
    each = ", ".join(f"{s['name']} {s['latency'].get('inputs') or 'fixed'}" for s in timed)
    return f"Latency inputs differ between stages (evaluate.latency.inputs): {each}."


def notes(report: dict[str, Any]) -> list[str]:
    out = []
    stages = report["stages"]
    base = stages[0] if stages else {}
    if "latency" in base:
        lat = base["latency"]
        plan = ((report.get("recipe") or {}).get("evaluate") or {}).get("latency") or {}
        if lat.get("mode") == "quick":
            # Quick mode replaces the recipe's timing settings; describe the ones that were used.
            quick = TimingPlan.from_spec({"mode": "quick"})
            plan = {**plan, "warmup_s": quick.warmup_s, "min_iterations": quick.min_iterations,
                    "min_duration_s": quick.min_duration_s}
        counts = ", ".join(f"{s['name']} {s['latency']['iterations']}" for s in stages if "latency" in s)
        out.append(
            f"Latency: batch {lat['batch_size']}, {plan.get('threads', '?')} thread(s), each stage in its own process; "
            f"warm-up of at least 10 iterations and {plan.get('warmup_s', '?')} s, then timed for at least "
            f"{plan.get('min_iterations', '?')} iterations and {plan.get('min_duration_s', '?')} s "
            f"(iterations: {counts}). Throughput at batch {(base.get('throughput') or {}).get('batch_size', '?')}. "
            "A speedup marked (n.s.) is not significant: the 95 % intervals of the medians overlap "
            "or one side is unstable."
        )
        out.append(timing_note(stages))
        out.append(inputs_note(stages))
        if "p99_ci95_ms" in lat:
            trials = (base.get("throughput") or {}).get("trials")
            out.append(
                "The intervals of p50, p90 and p99 are distribution-free, from order statistics (∞: too few "
                "iterations to bound that percentile from above); the interval of samples/s is Student's t across "
                f"the {trials or '?'} throughput trials (none with a single trial)."
            )
        if any((s.get("vs_baseline") or {}).get("accuracy_test") for s in stages):
            out.append(_accuracy_note(report))
        if lat.get("mode") == "quick":
            out.append("QUICK MODE: few iterations; these latency figures are for smoke tests, not for decisions.")
    for s in stages:
        if s["status"] != "ok":
            out.append(f"Stage '{s['name']}' failed: {s.get('error')}")
        fallback = (s.get("latency") or {}).get("deploy_fallback")
        if fallback:
            out.append(f"Stage '{s['name']}' was timed on PyTorch eager, not on the deployment runtime: {fallback}.")
        fidelity = (s.get("details") or {}).get("fidelity")
        if fidelity:
            reference = fidelity.get("reference", "PyTorch")
            # The arg-max of an embedding or a regression is no class: its agreement is left out under such metrics.
            classes = report_metric(report).percent
            # Under those metrics the check compares directions instead: the cosine figures, when recorded.
            cosine = ""
            if "cosine_mean" in fidelity:
                cosine = (f", mean cosine similarity {fidelity['cosine_mean']:.4f} (lowest "
                          f"{fidelity['cosine_min']:.4f})" if fidelity.get("cosine_over") == "sample"
                          else f", cosine similarity over the eval samples {fidelity['cosine_mean']:.4f}")
            out.append(f"Stage '{s['name']}' fidelity vs {reference} on {fidelity['samples']} eval samples: max abs diff "
                       f"{fidelity['max_abs_diff']:.2e}, max rel diff {fidelity['max_rel_diff']:.2e}"
                       + (f", top-1 agreement {fidelity['top1_agreement'] * 100:.1f} %." if classes else f"{cosine}."))
        control = (s.get("details") or {}).get("accuracy_control")
        if control and "controlled_drop" in control:
            validation = control["validation"]
            reverted = ", ".join(f"{r['name']} ({r['type']})" for r in control["reverted"]) or "none"
            out.append(f"Stage '{s['name']}' accuracy control on {validation['samples']} validation samples "
                       f"({validation['source']}; {validation['shared_with_eval']} also in the eval set): plain INT8 "
                       f"dropped {control['plain_int8_drop'] * 100:.2f} points, controlled "
                       f"{control['controlled_drop'] * 100:.2f} (max_drop {control['max_drop'] * 100:g} points); "
                       f"reverted to float: {reverted}.")
        training = (s.get("details") or {}).get("training")
        if training and "steps" in training:
            out.append(f"Stage '{s['name']}' trained {training['steps']} steps on {training['world_size']} process(es) "
                       f"in {training['seconds']:.0f} s; best selection top-1 {training['best_eval_acc'] * 100:.1f} % "
                       f"at step {training['best_step']} ({training['selection']}).")
        pruning = (s.get("details") or {}).get("pruning")
        if pruning and pruning.get("macs_before") and pruning.get("macs_after"):
            out.append(f"Stage '{s['name']}' pruning: MACs {pruning['macs_before'] / 1e6:.1f} M -> "
                       f"{pruning['macs_after'] / 1e6:.1f} M ({pruning['macs_before'] / pruning['macs_after']:.2f}x fewer), "
                       f"params {pruning['params_before']:,} -> {pruning['params_after']:,}.")
        out += details_lines(s)
        change = s.get("vs_previous")
        if change and change.get("speedup") and change["speedup"] < 1 and change.get("latency_significant"):
            out.append(f"Stage '{s['name']}' is slower than the stage before it ({change['speedup']:.2f}×).")
    if not report["passed"]:
        out.append("The run did not pass: final/ was not updated.")
    return out


# ctx.details keys that have a sentence of their own above, and what that sentence needs to be written.
DETAILS_WITH_A_LINE: dict[str, tuple[str, ...]] = {
    "fidelity": ("samples", "max_abs_diff", "max_rel_diff"),
    "accuracy_control": ("controlled_drop",),
    "training": ("steps",),
    "pruning": ("macs_before", "macs_after"),
}
DETAIL_ITEMS = 12  # values shown per key; the rest is in report.json
DETAIL_CHARS = 400


def details_lines(stage: dict[str, Any]) -> list[str]:
    """One line per key a pass put into ``ctx.details`` that has no sentence of its own (custom passes' facts,
    quantization counts, compile settings): its plain values, nested ones by dotted name, long lists counted.
    Shared by report.md and report.html, so everything in a stage's details shows in both."""
    out: list[str] = []
    for key, value in (stage.get("details") or {}).items():
        needs = DETAILS_WITH_A_LINE.get(key)
        if needs is not None and isinstance(value, dict) and all(n in value for n in needs):
            continue
        out.append(f"Stage '{stage['name']}' {key}: {_detail_text(value)}.")
    return out


def _detail_text(value: Any) -> str:
    if not isinstance(value, dict):
        return _detail_value(value)
    items = list(_flatten(value))
    shown = []
    for name, item in items[:DETAIL_ITEMS]:
        shown.append(f"{name} {item}")
        if sum(len(x) + 2 for x in shown) > DETAIL_CHARS:
            break
    text = ", ".join(shown) or "(empty)"
    if len(shown) < len(items):
        text += f"; {len(items) - len(shown)} more in report.json"
    return text


def _flatten(value: dict[str, Any], prefix: str = "", depth: int = 0):
    for name, item in value.items():
        if isinstance(item, dict) and item and depth < 1:
            yield from _flatten(item, f"{prefix}{name}.", depth + 1)
        else:
            yield f"{prefix}{name}", _detail_value(item)


def _detail_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "true" if value is True else "false" if value is False else "none"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (int, str)):
        text = str(value)
        return text if len(text) <= 80 else text[:77] + "..."
    if isinstance(value, list):
        if len(value) <= 6 and all(isinstance(v, (bool, int, float, str)) or v is None for v in value):
            return "[" + ", ".join(_detail_value(v) for v in value) + "]"
        return f"{len(value)} items"
    if isinstance(value, dict):
        return f"{len(value)} entries"
    return _detail_value(str(value))


# ------------------------------------------------------------------------------- input-size sweep


@dataclass(frozen=True)
class ShapeCell:
    latency: str      # "0.865 ms (0.863–0.873)", or "–"
    accuracy: str     # "91.60 %", or "" where not measured
    unstable: bool
    error: str | None


def shape_series(report: dict[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    """(stage, its evaluate.latency.shapes points) for every stage that has them."""
    return [(s["name"], s["shape_sweep"]) for s in report.get("stages") or [] if s.get("shape_sweep")]


def shape_table(report: dict[str, Any]) -> tuple[list[int], list[tuple[str, list[ShapeCell]]], list[str]]:
    """The input-size sweep as (sizes, a row of cells per stage, notes on how each size was measured)."""
    series = shape_series(report)
    view = report_metric(report)
    sizes = sorted({int(p["size"]) for _, points in series for p in points})
    rows = []
    for name, points in series:
        by_size = {int(p["size"]): p for p in points}
        cells = []
        for size in sizes:
            p = by_size.get(size) or {}
            latency = "–"
            if p.get("p50_ms") is not None:
                ci = p.get("p50_ci95_ms") or [None, None]
                bounds = f" ({ci[0]:.3f}–{ci[1]:.3f})" if None not in ci else ""
                latency = f"{p['p50_ms']:.3f} ms{bounds}"
            acc = p.get("accuracy") or {}
            accuracy = (f"{view.value(acc['value'])}{' %' if view.percent else ''}" if acc.get("value") is not None
                        else "")
            cells.append(ShapeCell(latency, accuracy, bool(p.get("unstable")), p.get("error")))
        rows.append((name, cells))
    notes_out = []
    first = series[0][1] if series else []
    for p in sorted(first, key=lambda p: p["size"]):
        shape = ", ".join(f"{k} {v}" for k, v in (p.get("shape") or {}).items())
        notes_out.append(f"size {p['size']}: {shape}; {p.get('source', '?')}")
    batchnorm = sorted({str(p["batchnorm"]) for _, points in series for p in points if p.get("batchnorm")})
    if batchnorm:
        notes_out.append("BatchNorm statistics at each size: " + "; ".join(batchnorm) + " (the stage's artifact is "
                         "unchanged)")
    inputs = sorted({str(p.get("inputs")) for _, points in series for p in points if p.get("inputs")})
    if inputs:
        notes_out.append(f"p50 at batch {((report['stages'][0].get('latency') or {}).get('batch_size', '?'))} on "
                         + ("the eval samples in turn" if inputs == ["eval"] else "one fixed batch" if inputs == ["fixed"]
                            else " and ".join(inputs)) + ", with the 95 % interval of the median")
    for name, points in series:
        for p in points:
            if p.get("error"):
                notes_out.append(f"stage '{name}' at size {p['size']}: {p['error']}")
    return sizes, rows, notes_out
