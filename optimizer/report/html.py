"""report.html: one self-contained page (inline CSS and SVG, no script, nothing fetched) that shows the
verdict first, then the stage table and the charts that explain it.

A Content-Security-Policy that forbids every external resource and every script is part of the page, so
a browser that renders it proves it is self-contained: anything that tried to load would be blocked and
logged.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from optimizer.measure.environment import describe_gpu
from optimizer.report import charts
from optimizer.report.rows import (
    BETTER, COLUMNS, NOT_SIGNIFICANT, UNSTABLE, WORSE, Cell, columns, notes, previous_change, stage_cells,
    timing_note,
)
from optimizer.report.metric import report_metric
from optimizer.report.samples import load_raw_latencies
from optimizer.report.svg import esc
from optimizer.report.verdict import (
    Verdict, accuracy_change, latency_differs, measured, pareto_front, speedup_range, verdict,
)

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"

STYLE = """
:root{--ink:#222;--muted:#5f5f5f;--line:#d9d9d9;--good:#0072B2;--bad:#B44A00;--bg:#f6f7f9}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--ink);margin:0;background:#fff}
main{max-width:1180px;margin:0 auto;padding:1.5rem 1.25rem 3rem}
h1{font-size:1.55rem;margin:0 0 .25rem}
h2{font-size:1.15rem;margin:2rem 0 .6rem;padding-bottom:.25rem;border-bottom:1px solid var(--line)}
h3{font-size:.95rem;margin:1rem 0 .4rem}
p{margin:.4rem 0}
.meta{color:var(--muted)}
.badge{display:inline-block;padding:.05rem .5rem;border-radius:3px;font-weight:700;color:#fff}
.badge.pass{background:#1a7f37}.badge.fail{background:#b42318}
.warn{border-left:4px solid #b42318;background:#fdf3f2;padding:.5rem .8rem;margin:.8rem 0}
.verdict{background:var(--bg);border:1px solid var(--line);border-radius:6px;padding:1rem 1.2rem;margin-top:1rem}
.verdict h2{border:0;margin:0 0 .6rem;padding:0;font-size:1.25rem}
.tiles{display:flex;flex-wrap:wrap;gap:.8rem;margin:.4rem 0 .8rem}
.tile{background:#fff;border:1px solid var(--line);border-radius:6px;padding:.5rem .8rem;min-width:10rem}
.tile b{display:block;font-size:1.35rem;line-height:1.2}
.tile span{display:block;font-size:.82rem}
.tile small{display:block;color:var(--muted);font-size:.76rem}
.tile.good b{color:var(--good)}.tile.bad b{color:var(--bad)}
.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:.82rem;font-variant-numeric:tabular-nums}
th,td{border-bottom:1px solid var(--line);padding:.3rem .4rem;text-align:right;vertical-align:top}
th{background:var(--bg);font-weight:600;border-top:1px solid var(--line)}
.stages{font-size:.78rem}
.stages th{min-width:3.6rem}
.stages th:nth-child(-n+2),.stages td:nth-child(-n+2){text-align:left}
.stages td:first-child{overflow-wrap:break-word}
table.compare th:nth-child(-n+4),table.compare td:nth-child(-n+4){text-align:left}
td small,th small{display:block;color:var(--muted);font-size:.72rem;white-space:nowrap}
th small{font-weight:400}
tr.failed td{background:#fdf3f2}
tr.rec td:first-child{font-weight:700}
tr.rec td:first-child::after{content:" ★";color:var(--good)}
table.compare tr.rec td:first-child{font-weight:400}
table.compare tr.rec td:first-child::after{content:none}
table.compare tr.rec td:nth-child(2){font-weight:700}
td.better{color:var(--good);font-weight:600}
td.worse{color:var(--bad);font-weight:600}
td.ns{color:var(--muted)}
td.unstable{color:var(--bad)}
.notes{color:var(--muted);font-size:.85rem;padding-left:1.1rem}
.row{display:flex;flex-wrap:wrap;gap:1rem;align-items:flex-start}
figure{margin:0}
figure.chart{flex:0 1 auto}
figure.tradeoff{flex:0 1 640px}
figcaption{color:var(--muted);font-size:.82rem;max-width:60rem}
svg{max-width:100%;height:auto;display:block}
.legend{display:flex;flex-wrap:wrap;gap:.3rem 1rem;font-size:.8rem;color:var(--muted);margin:.3rem 0}
.legend span{display:inline-flex;align-items:center;gap:.3rem}
.legend svg{display:inline-block}
.aside{flex:1;min-width:16rem;font-size:.88rem}
.aside ul{padding-left:1.1rem;margin:.3rem 0}
.sweep td:first-child,.sweep th:first-child{text-align:left}
.kv th{text-align:left;background:none;border-top:0;color:var(--muted);font-weight:500;white-space:nowrap}
.kv td{text-align:left}
.ops{display:flex;flex-wrap:wrap;gap:1.5rem}
.ops td:first-child,.ops th:first-child,.ops td:nth-child(2),.ops th:nth-child(2){text-align:left}
.ops td:first-child{max-width:22rem;overflow-wrap:anywhere}
footer{margin-top:2.5rem;color:var(--muted);font-size:.8rem}
"""

_MARK_CLASS = {BETTER: "better", WORSE: "worse", NOT_SIGNIFICANT: "ns", UNSTABLE: "unstable"}


def cell_html(cell: Cell) -> str:
    """One table cell: the value, its interval or test on a second line, a class for its mark."""
    css = f' class="{_MARK_CLASS[cell.mark]}"' if cell.mark in _MARK_CLASS else ""
    title = f' title="{esc(cell.title)}"' if cell.title else ""
    suffix = f" {esc(cell.suffix)}" if cell.suffix else ""
    detail = f"<small>{esc(cell.detail)}</small>" if cell.detail else ""
    return f"<td{css}{title}>{esc(cell.value)}{suffix}{detail}</td>"


# Left out of the page's table so that it fits a laptop screen; report.md and report.json keep them.
_HIDDEN = {"params", "p90 ms (95% CI)"}
# Shown on a second line under the pass, not as columns of their own: two short words that would each
# cost a column's width and padding (report.md keeps them as columns).
_FOLDED = ("form", "precision")


def _pass_html(cells: list[Cell]) -> str:
    """The pass with the stage's form and precision under it. A long name ('python:module:Class') may
    wrap after its dots and colons rather than widen the table."""
    name = esc(cells[COLUMNS.index("pass")].value).replace(".", ".<wbr>").replace(":", ":<wbr>")
    what = " · ".join(v for v in (cells[COLUMNS.index(c)].value for c in _FOLDED) if v != "–")
    return f"<td>{name}<small>{esc(what)}</small></td>" if what else f"<td>{name}</td>"


def _column_title(column: str) -> str:
    """A column title with its qualifier ('95% CI', 'vs base') on a second, smaller line: on one line the
    titles, not the figures, would set the widths of most columns."""
    if column == "pass":
        return f"pass<small>{' · '.join(_FOLDED)}</small>"
    found = re.fullmatch(r"(.+?) (?:\((.+)\)|(vs .+))", column)
    if not found:
        return esc(column)
    return f"{esc(found[1])}<small>{esc(found[2] or found[3])}</small>"


def _stage_table(report: dict[str, Any], recommended: str | None) -> str:
    shown = [i for i, c in enumerate(COLUMNS) if c not in _HIDDEN and c not in _FOLDED]
    titles = columns(report)  # the accuracy columns named after the report's metric
    head = "".join(f'<th scope="col">{_column_title(titles[i])}</th>' for i in shown)
    body = []
    for stage, cells in zip(report["stages"], stage_cells(report)):
        row = [cells[i] for i in shown]
        classes = []
        if stage.get("status") != "ok":
            classes.append("failed")
        if stage["name"] == recommended:
            classes.append("rec")
        css = f' class="{" ".join(classes)}"' if classes else ""
        # The stage name cell stays a plain <td>: its text is the stage name, nothing else.
        body.append(f"<tr{css}><td>{esc(row[0].value)}</td>{_pass_html(cells)}"
                    + "".join(cell_html(c) for c in row[2:]) + "</tr>")
    # The wrapper scrolls only on screens narrower than a laptop's; at 1280 px the table fits.
    return (f'<div class="scroll"><table class="stages"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


# ------------------------------------------------------------------------------------------ header


def _tiles(verdict_: Verdict, baseline: dict[str, Any]) -> str:
    """The numbers a reader wants first, against the baseline: speedup, accuracy change, size, throughput."""
    rec = verdict_.recommendation
    if rec is None or rec.stage is baseline:
        return ""
    stage = rec.stage
    tiles: list[tuple[str, str, str, str]] = []      # (class, big number, what it is, interval / test)
    lat, ref = stage["latency"], baseline["latency"]
    if lat["p50_ms"] > 0:
        speedup = ref["p50_ms"] / lat["p50_ms"]
        bounds = speedup_range(stage, baseline)
        sig = latency_differs(lat, ref)
        span = f"{bounds[0]:.2f}–{bounds[1]:.2f}× · " if bounds else ""
        tiles.append(("good" if sig and speedup > 1 else "bad" if sig else "", f"{speedup:.2f}×", "p50 speedup",
                      f"{span}{'significant' if sig else 'not significant'}"))
    test = (stage.get("vs_baseline") or {}).get("accuracy_test")
    change = accuracy_change(stage, baseline, test)
    sig_acc = bool(test and test.get("significant"))
    view = report_metric({"stages": [baseline, stage]})
    interval = f"{view.delta(change.low)} to {view.delta(change.high)} · " if math.isfinite(change.low) else ""
    judged = (f"p = {test['p_value']:.2g}, " + ("significant" if sig_acc else "not significant")) if test \
        else "no paired test"
    tiles.append(("bad" if sig_acc and not view.improved(change.delta) else "good" if sig_acc else "",
                  f"{view.delta(change.delta)}{' pts' if view.percent else ''}", f"{view.name} change",
                  f"{interval}{judged}"))
    if stage.get("size_bytes") and baseline.get("size_bytes"):
        ratio = stage["size_bytes"] / baseline["size_bytes"]
        tiles.append(("good" if ratio < 1 else "", f"{ratio:.2f}×", "size",
                      f"{stage['size_bytes'] / 1e6:.2f} MB vs {baseline['size_bytes'] / 1e6:.2f} MB"))
    thr, ref_thr = stage.get("throughput") or {}, baseline.get("throughput") or {}
    if thr.get("samples_per_s") and ref_thr.get("samples_per_s"):
        interval = thr.get("samples_per_s_ci95")
        span = f" ({interval[0]:,.0f}–{interval[1]:,.0f})" if interval else ""
        tiles.append(("", f"{thr['samples_per_s'] / ref_thr['samples_per_s']:.2f}×", "throughput",
                      f"{thr['samples_per_s']:,.0f}{span} samples/s at batch {thr.get('batch_size', '?')}"))
    return '<div class="tiles">' + "".join(
        f'<div class="tile {css}"><b>{esc(big)}</b><span>{esc(what)}</span><small>{esc(detail)}</small></div>'
        for css, big, what, detail in tiles) + "</div>"


def _header(report: dict[str, Any], verdict_: Verdict) -> str:
    recipe = report.get("recipe") or {}
    name = recipe.get("name", "run")
    badge = ('<span class="badge pass">PASSED</span>' if report.get("passed")
             else '<span class="badge fail">FAILED</span>')
    tool = report.get("tool") or {}
    meta = " · ".join(esc(x) for x in (report.get("finished"), f"{report.get('duration_s', '?')} s",
                                        f"{tool.get('name', 'optimizer')} {tool.get('version', '')}".strip(),
                                        report.get("recipe_file")) if x)
    quick = any((s.get("latency") or {}).get("mode") == "quick" for s in report.get("stages") or [])
    warn = ('<p class="warn"><b>Quick mode:</b> few timed iterations; the latency figures are for smoke tests, '
            "not for decisions.</p>") if quick else ""
    stages = report.get("stages") or []
    tiles = _tiles(verdict_, stages[0]) if stages else ""
    sentences = "".join(f"<p>{esc(s)}</p>" for s in verdict_.sentences)
    return (f"<header><h1>{esc(name)}: optimization report</h1><p class=\"meta\">{badge} {meta}</p>{warn}"
            f'<section class="verdict" aria-label="verdict"><h2>{esc(verdict_.headline)}</h2>{tiles}{sentences}'
            "</section></header>")


# ------------------------------------------------------------------------------------------ charts


def _tradeoff(report: dict[str, Any], recommended: str | None) -> str:
    stages = [s for s in report["stages"] if measured(s)]
    if not stages:
        return ""
    points = [charts.TradeoffPoint(s["name"], s["latency"]["p50_ms"], tuple(s["latency"]["p50_ci95_ms"]),
                                   s["accuracy"]["value"], tuple(s["accuracy"]["ci95"]),
                                   recommended=s["name"] == recommended) for s in stages]
    view = report_metric(report)
    sign = 1.0 if view.higher_is_better else -1.0  # the front keeps the better metric, whichever way that is
    front = pareto_front([(p.latency_ms, sign * p.accuracy) for p in points])
    on = [stages[i]["name"] for i in front]
    off = [s["name"] for i, s in enumerate(stages) if i not in front]
    failed = [s["name"] for s in report["stages"] if s.get("status") != "ok"]
    aside = [f"<p><b>On the Pareto front</b> (no other stage is both faster and at least as accurate):</p>"
             f"<ul>{''.join(f'<li>{esc(n)}</li>' for n in on)}</ul>"]
    if off:
        aside.append(f"<p><b>Dominated</b> (some other stage is as fast and as accurate, or better):</p>"
                     f"<ul>{''.join(f'<li>{esc(n)}</li>' for n in off)}</ul>")
    if failed:
        aside.append(f"<p>Not plotted (failed): {esc(', '.join(failed))}.</p>")
    aside.append("<p>The front uses the point estimates; where intervals overlap, the order of two stages may be "
                 f"chance. Error bars are 95 % intervals: {'bootstrap' if view.bootstrap else 'Wilson'} for "
                 f"{esc(view.name)}, order statistics for the median.</p>")
    batch = stages[0]["latency"].get("batch_size")
    return ("<section><h2>Accuracy against latency</h2><div class=\"row\"><figure class=\"tradeoff\">"
            + charts.tradeoff_chart(points, batch_size=batch, metric=view.name, percent=view.percent,
                                    higher_is_better=view.higher_is_better) + charts.tradeoff_legend()
            + f"</figure><div class=\"aside\">{''.join(aside)}</div></div></section>")


def _waterfalls(report: dict[str, Any]) -> str:
    stages = [s for s in report["stages"] if "latency" in s and "accuracy" in s]
    if len(stages) < 2:
        return ""
    names = [s["name"] for s in stages]
    view = report_metric(report)
    latency_sig: list[bool | None] = [None] + [latency_differs(a["latency"], b["latency"])
                                               for a, b in zip(stages, stages[1:])]
    accuracy_sig: list[bool | None] = [None]
    for i, s in enumerate(stages[1:], start=1):
        test = (previous_change(s, i == 1) or {}).get("accuracy_test")
        accuracy_sig.append(bool(test["significant"]) if test and "significant" in test else None)
    sized = [s for s in stages if s.get("size_bytes")]
    figures = [
        charts.waterfall_chart("p50 latency", "ms", names, [s["latency"]["p50_ms"] for s in stages],
                               lower_is_better=True, from_zero=True, significant=latency_sig),
        charts.waterfall_chart(view.name, "%" if view.percent else "mean", names,
                               [s["accuracy"]["value"] * (100 if view.percent else 1) for s in stages],
                               lower_is_better=not view.higher_is_better, from_zero=False,
                               significant=accuracy_sig, digits=4, min_span=0.5 if view.percent else 0.0),
        charts.waterfall_chart("size", "MB", [s["name"] for s in sized], [s["size_bytes"] / 1e6 for s in sized],
                               lower_is_better=True, from_zero=True),
    ]
    test_name = "the sign-flip test's" if view.bootstrap else "McNemar"
    caption = ("The first bar is the baseline; each later bar runs from the stage before to this stage. Blue: "
               "better, vermillion: worse; pale with n.s.: not significant (latency: the medians' 95 % intervals "
               f"overlap or one is unstable; {view.name}: {test_name} p ≥ 0.05, when the report has the test). The "
               f"{view.name} axis does not start at zero.")
    caption += " " + timing_note(stages)  # a latency bar between two runtimes also measures the switch
    return ("<section><h2>What each stage did</h2><div class=\"row\">"
            + "".join(f"<figure>{f}</figure>" for f in figures)
            + f"</div><figcaption>{esc(caption)}</figcaption></section>")


def _distributions(report: dict[str, Any], raw: dict[str, np.ndarray]) -> str:
    rows = [charts.Distribution(s["name"], s["latency"], raw.get(s["name"]))
            for s in report["stages"] if "latency" in s]
    if not rows:
        return ""
    batch = rows[0].latency.get("batch_size")
    missing = [r.name for r in rows if r.raw is None]
    caption = (f"Batch {batch}, one row per stage, on one axis. " if batch else "") + (
        f"Raw timings not found for {', '.join(missing)}: drawn from the summary in report.json." if missing else "")
    return ("<section><h2>Latency distributions</h2><figure>" + charts.distribution_chart(rows)
            + charts.distribution_legend() + f"<figcaption>{esc(caption)}</figcaption></figure></section>")


def _sweep(report: dict[str, Any]) -> str:
    series = [(s["name"], s["latency_sweep"]) for s in report["stages"] if s.get("latency_sweep")]
    if not series:
        return ""
    sizes = sorted({int(p["batch_size"]) for _, pts in series for p in pts if p.get("batch_size")})
    head = "".join(f'<th scope="col">batch {b}</th>' for b in sizes)
    body = []
    for name, pts in series:
        by_size = {int(p["batch_size"]): p for p in pts if p.get("batch_size")}
        cells = []
        for b in sizes:
            p = by_size.get(b)
            if p is None:
                cells.append("<td>–</td>")
                continue
            lat = f"{p['p50_ms']:.3f} ms" if p.get("p50_ms") is not None else "–"
            thr = f"{p['samples_per_s']:,.0f}/s" if p.get("samples_per_s") is not None else "–"
            css = ' class="unstable" title="unstable: wide interval of the median"' if p.get("unstable") else ""
            cells.append(f"<td{css}>{esc(lat)}<small>{esc(thr)}</small></td>")
        body.append(f"<tr><td>{esc(name)}</td>{''.join(cells)}</tr>")
    table = (f'<div class="scroll"><table class="sweep"><thead><tr><th scope="col">stage</th>{head}</tr></thead>'
             f"<tbody>{''.join(body)}</tbody></table></div>")
    return ("<section><h2>Batch-size sweep</h2><div class=\"row\">"
            f"<figure>{charts.sweep_chart(series, metric='p50_ms')}</figure>"
            f"<figure>{charts.sweep_chart(series, metric='samples_per_s')}</figure></div>"
            + charts.sweep_legend([n for n, _ in series])
            + "<figcaption>p50 latency of one batch (with the 95 % interval of the median) and samples per second, "
              "per batch size.</figcaption>" + table + "</section>")


def _shapes(report: dict[str, Any]) -> str:
    """evaluate.latency.shapes: the "latency against input size" chart (one line per stage), accuracy against size
    where it was measured, and the table."""
    from optimizer.report.rows import shape_series, shape_table

    sizes, rows, notes_ = shape_table(report)
    if not rows:
        return ""
    series = shape_series(report)
    view = report_metric(report)
    inputs = (((report.get("recipe") or {}).get("model") or {}).get("inputs")) or []
    tokens = any(str(spec.get("dtype", "float32")).startswith(("int", "uint8", "bool")) for spec in inputs
                 if isinstance(spec, dict) and len(spec.get("shape") or []) < 4)
    size_label = "sequence length" if tokens else "input size (image side, px)"
    head = "".join(f'<th scope="col">size {size}</th>' for size in sizes)
    body = []
    for name, cells in rows:
        tds = []
        for c in cells:
            css = ' class="unstable" title="unstable: wide interval of the median"' if c.unstable else ""
            extra = f"<small>{esc(c.accuracy)}</small>" if c.accuracy else ""
            extra += f'<small title="{esc(c.error)}">error</small>' if c.error else ""
            tds.append(f"<td{css}>{esc(c.latency)}{extra}</td>")
        body.append(f"<tr><td>{esc(name)}</td>{''.join(tds)}</tr>")
    table = (f'<div class="scroll"><table class="sweep"><thead><tr><th scope="col">stage</th>{head}</tr></thead>'
             f"<tbody>{''.join(body)}</tbody></table></div>")
    figures = f"<figure>{charts.shape_chart(series, metric='p50_ms', size_label=size_label)}</figure>"
    if any((p.get("accuracy") or {}).get("value") is not None for _, points in series for p in points):
        figures += (f"<figure>{charts.shape_chart(series, metric='accuracy', percent=view.percent, size_label=size_label)}"
                    "</figure>")
    note_items = "".join(f"<li>{esc(n)}</li>" for n in notes_)
    return ('<section id="shapes"><h2>Latency against input size</h2><div class="row">' + figures + "</div>"
            + charts.sweep_legend([n for n, _ in series])
            + "<figcaption>p50 latency at each input size (with the 95 % interval of the median), one line per "
              f"stage; {esc(view.name)} where the data was loaded at that size.</figcaption>" + table
            + f'<ul class="notes">{note_items}</ul></section>')


def _latency_tables(report: dict[str, Any]) -> str:
    """Latency-allocated pruning: the measured table as a chart, and prediction against measurement."""
    sections = []
    for stage in report["stages"]:
        info = ((stage.get("details") or {}).get("pruning") or {}).get("latency")
        if not isinstance(info, dict) or not info.get("table"):
            continue
        macs_ratio = (stage.get("details") or {}).get("pruning", {}).get("macs_ratio")
        facts = [("runtime", f"{info.get('runtime')} {info.get('precision')}, {info.get('threads')} thread(s)"),
                 ("unpruned", f"{info.get('base_ms', 0):.4f} ms"), ("target", f"{info.get('target_ms', 0):.4f} ms"),
                 ("predicted", f"{info.get('predicted_ms', 0):.4f} ms"),
                 ("measured", f"{info.get('measured_ms', 0):.4f} ms"),
                 ("measured speedup", f"{info.get('measured_speedup', 0):.2f}×"),
                 ("MAC ratio", f"{macs_ratio:.2f}×" if macs_ratio else "–")]
        facts_html = "".join(f"<tr><th scope=\"row\">{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in facts)
        kept = "".join(f"<li>{esc(k.get('group'))} ({esc(k.get('channels'))} channels): {esc(k.get('reason'))}</li>"
                       for k in info.get("kept_groups") or [])
        sections.append(
            f"<h3>{esc(stage['name'])}</h3><figure>{charts.latency_table_chart(info['table'])}"
            "<figcaption>Each line is one pruning group's block, timed alone at its candidate widths on the "
            "deployment runtime; the large filled marker is the width chosen.</figcaption></figure>"
            f"<table class=\"facts\"><tbody>{facts_html}</tbody></table>"
            + (f"<details><summary>groups left at full width</summary><ul>{kept}</ul></details>" if kept else ""))
    if not sections:
        return ""
    return "<section><h2>Latency-allocated pruning</h2>" + "".join(sections) + "</section>"


def _profile(report: dict[str, Any]) -> str:
    profiles = [(s["name"], s["profile"]) for s in report["stages"]
                if isinstance(s.get("profile"), dict) and s["profile"].get("by_op_type")]
    if not profiles:
        return ""
    tools = sorted({str(p.get("tool")) for _, p in profiles if p.get("tool")})
    tables = []
    for name, profile in profiles:
        top = (profile.get("top_ops") or [])[:8]
        if not top:
            continue
        rows = "".join(f"<tr><td>{esc(op.get('name', '?'))}</td><td>{esc(op.get('op_type', '?'))}</td>"
                       f"<td>{float(op.get('ms') or 0):.3f}</td></tr>" for op in top)
        tables.append(f"<div><h3>{esc(name)}: slowest operators</h3><table><thead><tr><th>operator</th>"
                      f"<th>op type</th><th>ms</th></tr></thead><tbody>{rows}</tbody></table></div>")
    caption = "Share of the profiled inference time by op type" + (f" ({', '.join(tools)})" if tools else "") + \
              "; the figure at the right is the summed operator time."
    return ("<section><h2>Where the time goes</h2><figure>" + charts.profile_chart(profiles)
            + charts.profile_legend(profiles) + f"<figcaption>{esc(caption)}</figcaption></figure>"
            + f"<div class=\"ops\">{''.join(tables)}</div></section>")


# ------------------------------------------------------------------------------------- environment


def environment_rows(env: dict[str, Any]) -> list[tuple[str, str]]:
    """The environment as (label, value) rows; keys a report lacks are left out."""
    packages = env.get("packages") or {}
    load = env.get("load_average")
    revision = env.get("toolkit_revision")
    rows = [
        ("CPU", env.get("cpu")),
        ("CPU flags", ", ".join(env.get("cpu_flags") or []) or "none of the tracked ones"),
        ("CPUs usable / present", f"{env.get('cpus_usable')} / {env.get('cpu_count')}"
         if env.get("cpu_count") is not None else None),
        ("threads", env.get("threads")),
        ("frequency governor", env.get("governor")),
        ("load average (1, 5, 15 min)", ", ".join(f"{v:.2f}" for v in load) if load else None),
        ("OS / machine", " / ".join(str(v) for v in (env.get("os"), env.get("machine")) if v) or None),
        ("host", env.get("hostname")),
        # A report from before GPUs were recorded lacks the key; one that looked and found none says so.
        ("GPU", (describe_gpu(env["gpu"]) if env["gpu"] else "none found") if "gpu" in env else None),
        ("Python", env.get("python")),
        ("packages", ", ".join(f"{k} {v}" for k, v in packages.items() if v) or None),
        ("optimizer revision", f"{revision['commit']}{' (files modified since)' if revision.get('modified') else ''}"
         if revision else None),
        ("recorded", env.get("timestamp")),
    ]
    return [(k, str(v)) for k, v in rows if v not in (None, "")]


def _environment(report: dict[str, Any]) -> str:
    env = report.get("environment") or {}
    if not env:
        return ""
    rows = "".join(f'<tr><th scope="row">{esc(k)}</th><td>{esc(v)}</td></tr>' for k, v in environment_rows(env))
    warnings = []
    if env.get("governor") and env["governor"] != "performance":
        warnings.append(f"The CPU frequency governor was '{env['governor']}', not 'performance': clock changes "
                        "add latency noise.")
    load, usable = env.get("load_average"), env.get("cpus_usable")
    if load and usable and load[0] > 0.5 * usable:
        warnings.append(f"The machine was busy (1-minute load {load[0]:.1f} on {usable} CPUs): latency may be "
                        "inflated.")
    notes_html = "".join(f"<p class=\"meta\">{esc(w)}</p>" for w in warnings)
    return f'<section><h2>Environment</h2><table class="kv"><tbody>{rows}</tbody></table>{notes_html}</section>'


# -------------------------------------------------------------------------------------------- page


def page(title: str, body: str) -> str:
    """The document around a body: charset, viewport, the no-external-resources policy, the style."""
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f"<title>{esc(title)}</title><style>{STYLE}</style></head><body><main>{body}</main></body></html>\n")


def render_html(report: dict[str, Any], run_dir: Path | None = None) -> str:
    """The page for one run. ``run_dir`` is the folder report.json's relative paths start from (the run's
    output folder, or its staging folder while it is being written); without it, the latency
    distributions are drawn from the summaries alone."""
    verdict_ = verdict(report)
    rec = verdict_.recommendation
    recommended = rec.stage["name"] if rec else None
    raw = load_raw_latencies(report, run_dir)
    note_items = "".join(f"<li>{esc(n)}</li>" for n in notes(report))
    body = (
        _header(report, verdict_)
        + "<section><h2>Stages</h2>" + _stage_table(report, recommended)
        + f'<ul class="notes">{note_items}</ul></section>'
        + _tradeoff(report, recommended)
        + _waterfalls(report)
        + _distributions(report, raw)
        + _sweep(report)
        + _shapes(report)
        + _latency_tables(report)
        + _profile(report)
        + _environment(report)
        + "<footer>report.json in the same folder holds every figure on this page.</footer>"
    )
    name = (report.get("recipe") or {}).get("name", "run")
    return page(f"{name}: optimization report", body)
