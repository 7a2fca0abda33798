"""Several runs (two recipes on one model, one recipe on two machines) in one table and one chart.

Latency is only comparable between runs measured the same way on the same machine and software, so
the comparison lists every difference in the environments and in the latency settings, and says
plainly when the figures should not be ranked against each other. Accuracy is named after the runs'
metric (``evaluate.accuracy.metric``); runs scored with different metrics are flagged, each figure is
named after its own metric, and they share no chart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from optimizer.errors import InputRejected, RecipeError
from optimizer.measure.environment import differences
from optimizer.report import charts
from optimizer.report.html import cell_html, environment_rows, page
from optimizer.report.markdown import md, table
from optimizer.report.metric import MetricView, report_metric
from optimizer.report.render import load_report
from optimizer.report.rows import (
    Cell,
    accuracy_delta_cell,
    percentile_cell,
    runtime_label,
    speed_cell,
    throughput_cell,
)
from optimizer.report.svg import esc
from optimizer.report.verdict import Recommendation, latency_differs, measured, pareto_front, verdict
from optimizer.report.write import write_atomic

COLUMNS = ["run", "stage", "form", "precision", "size MB", "top-1 % (95% CI)", "Δ top-1 vs run base",
           "p50 ms (95% CI)", "p99 ms (95% CI)", "speedup vs run base", "samples/s (95% CI)", "status"]
# Where the accuracy columns are; columns() names them after the runs' metric (these are top-1's names).
ACCURACY, ACCURACY_DELTA = 5, 6


def _metric_key(view: MetricView) -> tuple[str, str, bool]:
    # The interval kind may differ between runs of one python: metric; what is measured does not.
    return view.metric, view.name, view.higher_is_better


def shared_metric(views: Sequence[MetricView]) -> MetricView | None:
    """The metric every run was scored with, or None when they differ."""
    return views[0] if len({_metric_key(v) for v in views}) == 1 else None


def columns(views: Sequence[MetricView]) -> list[str]:
    """COLUMNS with the accuracy columns named after the runs' metric; 'accuracy' when the runs differ (each
    cell then names its own metric)."""
    shared = shared_metric(views)
    out = list(COLUMNS)
    out[ACCURACY] = shared.column if shared else "accuracy (95% CI)"
    out[ACCURACY_DELTA] = shared.delta_column("run base") if shared else "Δ accuracy vs run base"
    return out


def metric_warning(labels: Sequence[str], views: Sequence[MetricView]) -> str | None:
    """One sentence when the runs were scored with different metrics, naming each run's."""
    if shared_metric(views) is not None:
        return None
    each = "; ".join(f"{label}: {_metric_label(view)}" for label, view in zip(labels, views))
    return f"The runs were scored with different accuracy metrics ({each}): their accuracy is not comparable."


def _metric_label(view: MetricView) -> str:
    text = view.name if view.metric in ("top1", "top5", "agreement") else f"{view.name} ({view.metric})"
    return text if view.higher_is_better else f"{text}, lower is better"


def run_labels(run_dirs: Sequence[Path], reports: Sequence[dict[str, Any]]) -> list[str]:
    """Recipe names when they tell the runs apart, else folder names, else numbered."""
    names = [str((r.get("recipe") or {}).get("name") or d.name) for d, r in zip(run_dirs, reports)]
    if len(set(names)) == len(names):
        return names
    folders = [Path(d).resolve().name for d in run_dirs]
    if len(set(folders)) == len(folders):
        return folders
    return [f"{name} ({i + 1})" for i, name in enumerate(names)]


def _latency_plan(report: dict[str, Any]) -> dict[str, Any]:
    base = next((s for s in report.get("stages") or [] if "latency" in s), {})
    lat = base.get("latency") or {}
    return {"latency batch size": lat.get("batch_size"), "latency mode": lat.get("mode"),
            "throughput batch size": (base.get("throughput") or {}).get("batch_size"),
            # Speedups are relative to the baseline: one timed on eager and one on onnxruntime are not comparable.
            "baseline timed on": runtime_label(base) if lat else None}


def comparability(labels: Sequence[str], reports: Sequence[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """(latency warnings, accuracy-data warnings): what differs between the first run and each other one."""
    latency, accuracy = [], []
    first_env = reports[0].get("environment") or {}
    first_plan = _latency_plan(reports[0])
    first_eval = ((reports[0].get("recipe") or {}).get("data") or {}).get("eval")
    shared = shared_metric([report_metric(r) for r in reports])
    measured_as = shared.name if shared else "accuracy"
    for label, report in zip(labels[1:], reports[1:]):
        env = report.get("environment") or {}
        diffs = differences(first_env, env)
        if first_env.get("governor") != env.get("governor"):
            diffs.append(f"governor: {first_env.get('governor')} vs {env.get('governor')}")
        plan = _latency_plan(report)
        diffs += [f"{k}: {first_plan[k]} vs {plan[k]}" for k in plan if plan[k] != first_plan[k]]
        if diffs:
            latency.append(f"{labels[0]} vs {label}: " + "; ".join(sorted(diffs)))
        eval_spec = ((report.get("recipe") or {}).get("data") or {}).get("eval")
        if eval_spec != first_eval:
            accuracy.append(f"{labels[0]} vs {label}: the eval data settings differ, so {measured_as} was "
                            "measured on different samples")
    return latency, accuracy


def _rows(labels: Sequence[str], reports: Sequence[dict[str, Any]], recs: Sequence[Recommendation | None],
          views: Sequence[MetricView]) -> list[tuple[str, list[Cell], bool, bool]]:
    """(run label, cells, recommended in its run, failed) per stage of every run. Each run's figures are
    formatted in its own metric; under differing metrics each accuracy cell also names it."""
    named = shared_metric(views) is None
    out = []
    for label, report, rec, view in zip(labels, reports, recs, views):
        for s in report.get("stages") or []:
            if "accuracy" in s and "latency" in s:
                acc, lat = s["accuracy"], s["latency"]
                # '91.20 % top-1', '0.9967 cosine agreement': a figure whose column cannot name its metric.
                unit = ((" %" if view.percent else "") + f" {view.name}") if named else ""
                cells = [
                    Cell(label), Cell(s["name"]), Cell(s.get("form") or "–"), Cell(s.get("precision") or "–"),
                    Cell(f"{s['size_bytes'] / 1e6:.2f}") if s.get("size_bytes") else Cell("–"),
                    Cell(view.value(acc["value"]) + unit, view.interval(*acc["ci95"])),
                    accuracy_delta_cell(s.get("vs_baseline"), view),
                    percentile_cell(lat, 50), percentile_cell(lat, 99), speed_cell(s.get("vs_baseline")),
                    throughput_cell(s.get("throughput")), Cell(s.get("status", "?")),
                ]
            else:
                cells = [Cell(label), Cell(s["name"]), Cell(s.get("form") or "–")]
                cells += [Cell("–")] * (len(COLUMNS) - 4) + [Cell(s.get("status", "?"))]
            recommended = rec is not None and rec.stage is s
            out.append((label, cells, recommended, s.get("status") != "ok"))
    return out


def _fastest_overall(labels: Sequence[str], reports: Sequence[dict[str, Any]],
                     recs: Sequence[Recommendation | None]) -> str | None:
    """Across runs, the fastest recommended stage, and whether it is significantly faster than the next."""
    chosen = [(label, rec.stage, report_metric(report))
              for label, report, rec in zip(labels, reports, recs) if rec is not None]
    if len(chosen) < 2:
        return None
    chosen.sort(key=lambda item: item[1]["latency"]["p50_ms"])
    (best_label, best, view), (next_label, runner_up, _) = chosen[0], chosen[1]
    sig = latency_differs(best["latency"], runner_up["latency"])
    accuracy = f"{view.name} {view.value(best['accuracy']['value'])}{' %' if view.percent else ''}"
    return (f"Fastest recommended deployable: '{best['name']}' of {best_label} "
            f"({best['latency']['p50_ms']:.3f} ms p50, {accuracy}), "
            + (f"significantly faster than '{runner_up['name']}' of {next_label}." if sig else
               f"not significantly faster than '{runner_up['name']}' of {next_label} "
               f"({runner_up['latency']['p50_ms']:.3f} ms)."))


def _delta_note(views: Sequence[MetricView]) -> str:
    shared = shared_metric(views)
    return f"Speedup and Δ {shared.name if shared else 'accuracy'} are against each run's own baseline."


def _shape_rows(labels: Sequence[str], reports: Sequence[dict[str, Any]]) -> tuple[list[int], list[tuple[str, list[Any]]]]:
    """evaluate.latency.shapes of every run that swept sizes: (every size any run measured, a row of cells per
    run and stage, '–' where that run did not measure the size)."""
    from optimizer.report.rows import ShapeCell, shape_table

    tables = [(label, *shape_table(report)[:2]) for label, report in zip(labels, reports)]
    sizes = sorted({size for _, run_sizes, _ in tables for size in run_sizes})
    missing = ShapeCell("–", "", False, None)
    rows = []
    for label, run_sizes, run_rows in tables:
        for name, cells in run_rows:
            by_size = dict(zip(run_sizes, cells))
            rows.append((f"{label}: {name}", [by_size.get(size, missing) for size in sizes]))
    return sizes, rows


def _shapes_markdown(labels: Sequence[str], reports: Sequence[dict[str, Any]], latency_warn: Sequence[str]) -> list[str]:
    sizes, rows = _shape_rows(labels, reports)
    if not rows:
        return []
    body = [[name] + [c.latency + (" unstable" if c.unstable else "") + (f"; {c.accuracy}" if c.accuracy else "")
                      for c in cells] for name, cells in rows]
    caveat = ["", "The environments differ: compare latency across sizes only within a run."] if latency_warn else []
    return ["", "## Latency against input size", "",
            "p50 latency (95 % interval) per run and stage and, where the data was loaded at that size, accuracy.",
            "", *table(["run: stage", *(f"size {size}" for size in sizes)], body), *caveat]


def _shapes_html(labels: Sequence[str], reports: Sequence[dict[str, Any]], latency_warn: Sequence[str]) -> str:
    from optimizer.report.rows import shape_series

    sizes, rows = _shape_rows(labels, reports)
    if not rows:
        return ""
    series = [(f"{label}: {name}", points) for label, report in zip(labels, reports)
              for name, points in shape_series(report)]
    head = "".join(f'<th scope="col">size {size}</th>' for size in sizes)
    body = "".join(f"<tr><td>{esc(name)}</td>" + "".join(
        f"<td>{esc(c.latency)}" + (f"<small>{esc(c.accuracy)}</small>" if c.accuracy else "") + "</td>" for c in cells)
        + "</tr>" for name, cells in rows)
    caveat = " The environments differ: compare latency across sizes only within a run." if latency_warn else ""
    return ('<section id="shapes"><h2>Latency against input size</h2><figure>'
            + charts.shape_chart(series, metric="p50_ms", width=1100, height=420)
            + "</figure>" + charts.sweep_legend([name for name, _ in series])
            + f"<figcaption>p50 latency at each input size (with the 95 % interval of the median), one line per run "
              f"and stage.{esc(caveat)}</figcaption>"
            + f'<div class="scroll"><table class="sweep"><thead><tr><th scope="col">run: stage</th>{head}</tr>'
              f"</thead><tbody>{body}</tbody></table></div></section>")


def _markdown(labels, reports, recs, rows, latency_warn, accuracy_warn, views) -> str:
    lines = [f"# Comparison of {len(reports)} runs: {', '.join(md(label) for label in labels)}", ""]
    if latency_warn:
        lines += ["**The environments differ: latency figures are not comparable across these runs.**", ""]
        lines += [f"- {md(w)}" for w in latency_warn] + [""]
    metric_warn = metric_warning(labels, views)
    if metric_warn:
        lines += [f"**{md(metric_warn)}**", ""]
    if accuracy_warn:
        lines += ["**Accuracy was measured on different data:**", ""] + [f"- {md(w)}" for w in accuracy_warn] + [""]
    for label, report in zip(labels, reports):
        lines.append(f"- {md(label)}: {md(verdict(report).headline)}")
    overall = _fastest_overall(labels, reports, recs)
    if overall and not latency_warn:
        lines += ["", md(overall)]
    lines += ["", *table(columns(views), [[c.text + (" ★" if i == 1 and rec else "") for i, c in enumerate(cells)]
                                          for _, cells, rec, _ in rows]), "",
              f"★ recommended deployable of its run. {_delta_note(views)}"]
    lines += _shapes_markdown(labels, reports, latency_warn)
    return "\n".join(lines) + "\n"


def _env_table(labels: Sequence[str], reports: Sequence[dict[str, Any]]) -> str:
    per_run = [dict(environment_rows(r.get("environment") or {})) for r in reports]
    keys = list(dict.fromkeys(k for rows in per_run for k in rows))
    head = "".join(f'<th scope="col">{esc(label)}</th>' for label in labels)
    body = []
    for key in keys:
        values = [rows.get(key, "–") for rows in per_run]
        # Host and timestamp always differ and say nothing about speed; do not flag them.
        differs = len(set(values)) > 1 and key not in ("host", "recorded", "load average (1, 5, 15 min)")
        css = ' class="worse"' if differs else ""
        body.append(f'<tr><th scope="row">{esc(key)}</th>' + "".join(f"<td{css}>{esc(v)}</td>" for v in values)
                    + "</tr>")
    return (f'<div class="scroll"><table class="kv"><thead><tr><th></th>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _html(labels, reports, recs, rows, latency_warn, accuracy_warn, views) -> str:
    parts = [f"<header><h1>Comparison of {len(reports)} runs</h1>"
             f"<p class=\"meta\">{esc(', '.join(labels))}</p></header>"]
    if latency_warn:
        items = "".join(f"<li>{esc(w)}</li>" for w in latency_warn)
        parts.append('<div class="warn"><b>The environments differ: latency figures are not comparable across '
                     f"these runs.</b> Compare latency only within a run.<ul>{items}</ul></div>")
    metric_warn = metric_warning(labels, views)
    if metric_warn:
        parts.append(f'<div class="warn"><b>{esc(metric_warn)}</b></div>')
    if accuracy_warn:
        items = "".join(f"<li>{esc(w)}</li>" for w in accuracy_warn)
        parts.append(f'<div class="warn"><b>Accuracy was measured on different data.</b><ul>{items}</ul></div>')
    headlines = "".join(f"<li><b>{esc(label)}</b>: {esc(verdict(r).headline)}</li>"
                        for label, r in zip(labels, reports))
    overall = _fastest_overall(labels, reports, recs)
    parts.append(f'<section class="verdict"><ul>{headlines}</ul>'
                 + (f"<p>{esc(overall)}</p>" if overall and not latency_warn else "") + "</section>")

    head = "".join(f'<th scope="col">{esc(c)}</th>' for c in columns(views))
    body = []
    for _, cells, rec, failed in rows:
        css = " ".join(c for c, on in (("rec", rec), ("failed", failed)) if on)
        star = " ★" if rec else ""
        body.append(f'<tr class="{css}"><td>{esc(cells[0].value)}</td><td>{esc(cells[1].value)}{star}</td>'
                    + "".join(cell_html(c) for c in cells[2:]) + "</tr>")
    parts.append('<section><h2>Stages of every run</h2><div class="scroll"><table class="stages compare">'
                 f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"
                 f'<p class="notes">★ recommended deployable of its run. {esc(_delta_note(views))}</p></section>')

    shared = shared_metric(views)
    if shared is None:
        # One vertical axis cannot hold figures in different metrics (nor different units).
        parts.append("<section><h2>Accuracy against latency</h2><p>No chart: the runs were scored with different "
                     "accuracy metrics, which one axis cannot compare.</p></section>")
        parts.append(_shapes_html(labels, reports, latency_warn))
        parts.append("<section><h2>Environments</h2>" + _env_table(labels, reports) + "</section>")
        return page(f"Comparison: {', '.join(labels)}", "".join(parts))
    points = []
    for k, (label, report, rec) in enumerate(zip(labels, reports, recs)):
        for s in report.get("stages") or []:
            if measured(s):
                points.append(charts.TradeoffPoint(f"{label}: {s['name']}", s["latency"]["p50_ms"],
                                                   tuple(s["latency"]["p50_ci95_ms"]), s["accuracy"]["value"],
                                                   tuple(s["accuracy"]["ci95"]), series=k,
                                                   recommended=rec is not None and rec.stage is s))
    sign = 1.0 if shared.higher_is_better else -1.0  # the front keeps the better metric, whichever way that is
    front = pareto_front([(p.latency_ms, sign * p.accuracy) for p in points])
    caveat = (" The environments differ, so the horizontal positions of different runs are not comparable."
              if latency_warn else "")
    parts.append("<section><h2>Accuracy against latency</h2><figure>"
                 + charts.tradeoff_chart(points, several_series=True, width=1100, height=520, metric=shared.name,
                                         percent=shared.percent, higher_is_better=shared.higher_is_better)
                 + charts.tradeoff_legend(series=labels)
                 + f"<figcaption>On the Pareto front: {esc(', '.join(points[i].label for i in front))}.{esc(caveat)}"
                   "</figcaption></figure></section>")
    parts.append(_shapes_html(labels, reports, latency_warn))
    parts.append("<section><h2>Environments</h2>" + _env_table(labels, reports) + "</section>")
    return page(f"Comparison: {', '.join(labels)}", "".join(parts))


def compare(run_dirs: Sequence[Path | str]) -> tuple[str, str]:
    """(Markdown, HTML) comparing the runs in ``run_dirs``, each an output folder with report.json."""
    given = [Path(d) for d in run_dirs]
    if len(given) < 2:
        raise RecipeError("compare needs at least two run folders")
    dirs = [search_run(d) or d for d in given]
    reports = [load_report(d) for d in dirs]
    labels = run_labels(dirs, reports)
    # A search stands for its chosen trial's full run, labelled as the search.
    labels = [f"{g.resolve().name} (search, trial {int(d.name)})" if d != g else label
              for g, d, label in zip(given, dirs, labels)]
    recs = [verdict(r).recommendation for r in reports]
    views = [report_metric(r) for r in reports]
    rows = _rows(labels, reports, recs, views)
    latency_warn, accuracy_warn = comparability(labels, reports)
    return (_markdown(labels, reports, recs, rows, latency_warn, accuracy_warn, views),
            _html(labels, reports, recs, rows, latency_warn, accuracy_warn, views))


def search_run(folder: Path) -> Path | None:
    """For an `optimizer search` folder (search.json, no report.json): the run folder of its chosen trial's full
    re-measure, the one whose artifact the search published. None for any other folder."""
    if (folder / "report.json").is_file() or not (folder / "search.json").is_file():
        return None
    try:
        search = json.loads((folder / "search.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputRejected(f"{folder / 'search.json'}: not readable as JSON ({exc})") from exc
    chosen = search.get("chosen") if isinstance(search, dict) else None
    if not chosen:
        raise RecipeError(f"{folder}: the search there chose no trial (none met its budgets, or it was interrupted); "
                          "compare its trials' folders (trials/NNNN) instead")
    full = next((r for r in search.get("full") or [] if r.get("number") == chosen["trial"]), None)
    run = Path(full["out"]) if full and full.get("out") else folder / "full" / f"{chosen['trial']:04d}"
    # The search folder may have moved since: its runs are inside it.
    return run if run.is_dir() else folder / run.parent.name / run.name


def write_comparison(run_dirs: Sequence[Path | str], out_dir: Path | str) -> list[Path]:
    """compare.md and compare.html in ``out_dir``, each written atomically."""
    markdown_text, html_text = compare(run_dirs)
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in (("compare.md", markdown_text), ("compare.html", html_text)):
        write_atomic(folder / name, content)
        written.append(folder / name)
    return written
