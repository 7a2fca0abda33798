"""The search report: search.json (every figure), search.md and a self-contained search.html.

Every trial with its parameters, status, accuracy with its interval, p50/p90 with theirs, and a link to its own
run report; the Pareto front over all trials with the budget lines; the full re-measures; the chosen trial and
why; Optuna's parameter importance.
"""

from __future__ import annotations

import json
import math
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from optimizer.search.driver import _Search

SCHEMA = "optimizer-search/1"
FILES = ("search.json", "search.md", "search.html")


def build_search_report(search: "_Search", *, interrupted: bool) -> dict[str, Any]:
    recipe = search.loaded.recipe
    trials = search.trials()
    for row in trials:
        if row.get("report"):
            row["report_link"] = _relative(Path(row["report"]).with_suffix(".html"), search.out)
    full = []
    for number, outcome in sorted(search.full.items()):
        row = {k: v for k, v in outcome.items() if k != "params"}
        row["meets_budgets"] = search._meets(outcome)
        if outcome.get("report"):
            row["report_link"] = _relative(Path(outcome["report"]).with_suffix(".html"), search.out)
        full.append(row)
    baseline = next((t.get("baseline_accuracy") for t in trials if t.get("baseline_accuracy") is not None), None)
    chosen = search.chosen
    return {
        "schema": SCHEMA,
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "recipe": recipe.name,
        "recipe_file": str(search.loaded.source) if search.loaded.source else None,
        "objective": search.objective,
        "budgets": search.limits,
        "metric": recipe.evaluate.accuracy.metric,
        "higher_is_better": search.higher,
        "fraction_metric": recipe.evaluate.accuracy.is_fraction,
        "baseline_accuracy": baseline,
        "executor": search.executor_description,
        "screening": recipe.search.screening.model_dump(),
        "interrupted": interrupted,
        "wall_s": round(search.wall_s, 3),
        "trials": trials,
        "candidates": [r["number"] for r in search.candidates(trials)],
        "full": full,
        "chosen": None if chosen is None else {
            "trial": chosen["number"], "label": search.space.describe(search._params_of(chosen["number"])),
            "params": search._params_of(chosen["number"]), "why": search.why,
            "accuracy": chosen["accuracy"], "accuracy_ci95": chosen.get("accuracy_ci95"),
            "p50_ms": chosen["p50_ms"], "p50_ci95_ms": chosen.get("p50_ci95_ms"),
            "p90_ms": chosen.get("p90_ms"), "p90_ci95_ms": chosen.get("p90_ci95_ms"),
            "stage": chosen.get("stage"), "final": "final",
        },
        "cache": cache_summary(trials),
        "importance": importance(search),
    }


def cache_summary(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """What the shared stage cache saved: the trials' total time against the same trials with nothing cached
    (each cached stage counted at what it cost when it was stored), and against as many runs of the recipe as
    written (trial 0) with nothing cached."""
    timed = [t for t in trials if t.get("seconds") is not None]
    total = sum(t["seconds"] for t in timed)
    summary: dict[str, Any] = {"trials_timed": len(timed), "total_s": round(total, 3),
                               "stages_cached": sum(t.get("stages_cached") or 0 for t in timed),
                               "stages_run": sum(t.get("stages_run") or 0 for t in timed)}
    estimates = [t.get("uncached_seconds") for t in timed]
    if timed and all(e is not None for e in estimates):
        without = sum(estimates)
        summary.update({"without_cache_s": round(without, 3),
                        "saved_fraction": round(1 - total / without, 4) if without > 0 else None})
    first = next((t for t in timed if t["number"] == 0 and t.get("uncached_seconds") is not None), None)
    if first is not None:
        summary.update({"full_run_s": first["uncached_seconds"],
                        "trials_times_full_run_s": round(first["uncached_seconds"] * len(timed), 3)})
    return summary


def importance(search: "_Search") -> dict[str, Any]:
    """Optuna's parameter importance (fANOVA) for the objective (accuracy first for a Pareto search)."""
    import optuna

    complete = [t for t in search.study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if len(complete) < 3 or not any(t.params for t in complete):
        return {"values": {}, "note": "too few finished trials for parameter importance (3 or more)"}
    target = None if len(search.study.directions) == 1 else (lambda t: t.values[0])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "some regimes have less than 2 trials": the note says how many ran
            values = optuna.importance.get_param_importances(search.study, target=target)
    except Exception as exc:  # a search space Optuna cannot rank (one value per parameter, say)
        return {"values": {}, "note": f"not computed ({type(exc).__name__}: {str(exc)[:160]})"}
    what = "accuracy" if search.objective in ("accuracy", "pareto") else "p50 latency"
    return {"values": {k: round(float(v), 4) for k, v in values.items()}, "note": f"fANOVA importance for {what}"}


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------------- text


def _acc(report: dict[str, Any], value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value * 100:.2f} %" if report["fraction_metric"] else f"{value:.4g}"


def _acc_ci(report: dict[str, Any], interval: list[float] | None) -> str:
    if not interval:
        return ""
    if report["fraction_metric"]:
        return f"{interval[0] * 100:.2f}–{interval[1] * 100:.2f}"
    return f"{interval[0]:.4g}–{interval[1]:.4g}"


def _ms(value: float | None, interval: list[float] | None = None) -> str:
    if value is None:
        return "–"
    return f"{value:.4f}" + (f" ({interval[0]:.4f}–{interval[1]:.4f})" if interval else "")


def _status(row: dict[str, Any]) -> str:
    if row["state"] == "running":
        return "open (interrupted)"
    status = row.get("status") or row["state"]
    if status == "stopped":
        return f"stopped at {row.get('stage')}"
    if status == "ok" and not row.get("feasible"):
        return "over budget"
    return status


def trial_table_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for row in report["trials"]:
        acc = _acc(report, row.get("accuracy"))
        ci = _acc_ci(report, row.get("accuracy_ci95"))
        rows.append([
            str(row["number"]) + (" ★" if report["chosen"] and report["chosen"]["trial"] == row["number"] else ""),
            row["label"], _status(row), acc + (f" ({ci})" if ci else ""),
            _ms(row.get("p50_ms"), row.get("p50_ci95_ms")), _ms(row.get("p90_ms"), row.get("p90_ci95_ms")),
            f"{row['seconds']:.1f}" if row.get("seconds") is not None else "–",
            (row.get("error") or "")[:160],
        ])
    return rows


def render_markdown(report: dict[str, Any]) -> str:
    from optimizer.report.markdown import md, table

    lines = [f"# Search: {md(report['recipe'])}", ""]
    budgets = ", ".join(f"{k} {v:g}" for k, v in report["budgets"].items()) or "none"
    lines += [f"Objective: **{report['objective']}**; budgets: {budgets}; {len(report['trials'])} trials on "
              f"{md(report['executor'])}; screening: {report['screening']['eval_samples'] or 'all'} eval samples, "
              f"{report['screening']['latency']} latency.", ""]
    if report["interrupted"]:
        lines += ["**Interrupted**: re-run with `--resume` to continue.", ""]
    chosen = report["chosen"]
    if chosen:
        lines += [f"**Chosen: trial {chosen['trial']}** ({md(chosen['label'])}): {_acc(report, chosen['accuracy'])}"
                  f" ({_acc_ci(report, chosen['accuracy_ci95'])}), p50 {_ms(chosen['p50_ms'], chosen['p50_ci95_ms'])}"
                  f" ms. Why: {md(chosen['why'])}. Artifact: `final/`.", ""]
    elif not report["interrupted"]:
        lines += ["**No trial meets the budgets**; the closest are at the top of the table by their excess.", ""]
    lines += ["## Trials", "", f"Accuracy ({md(report['metric'])}) and latency from the screening runs, with 95 % "
              "intervals; ★ the chosen trial.", ""]
    columns = ["trial", "parameters", "status", "accuracy", "p50 ms", "p90 ms", "seconds", "error"]
    rows = [[md(cell, cell=True) for cell in row] for row in trial_table_rows(report)]
    for row, trial in zip(rows, report["trials"]):
        if trial.get("report_link"):
            row[0] = f"[{row[0]}]({trial['report_link']})"
    lines += table(columns, rows) + [""]
    if report["full"]:
        lines += ["## Candidates re-measured in full", ""]
        full_rows = [[str(r["number"]), r.get("status", "–"), _acc(report, r.get("accuracy")) +
                      f" ({_acc_ci(report, r.get('accuracy_ci95'))})",
                      _ms(r.get("p50_ms"), r.get("p50_ci95_ms")), _ms(r.get("p90_ms"), r.get("p90_ci95_ms")),
                      "yes" if r["meets_budgets"] else "no"] for r in report["full"]]
        lines += table(["trial", "status", "accuracy", "p50 ms", "p90 ms", "meets budgets"],
                       [[md(c, cell=True) for c in row] for row in full_rows]) + [""]
    values = report["importance"].get("values") or {}
    lines += ["## Parameter importance", ""]
    lines += ([f"- `{k}`: {v:.3f}" for k, v in values.items()] + ["", f"{report['importance']['note']}."]
              if values else [f"{report['importance']['note']}."])
    cache = report["cache"]
    lines += ["", "## Stage cache", "", _cache_sentence(cache), ""]
    return "\n".join(lines) + "\n"


def _cache_sentence(cache: dict[str, Any]) -> str:
    text = (f"{cache['stages_cached']} stages came from the shared cache and {cache['stages_run']} were run; the "
            f"trials took {cache['total_s']:.1f} s in all")
    if cache.get("without_cache_s"):
        text += (f", against {cache['without_cache_s']:.1f} s for the same trials with nothing cached (saved "
                 f"{cache['saved_fraction'] * 100:.0f} %)")
    if cache.get("trials_times_full_run_s"):
        text += (f"; {cache['trials_timed']} runs of the recipe as written ({cache['full_run_s']:.1f} s uncached) "
                 f"would take {cache['trials_times_full_run_s']:.1f} s")
    return text + "."


# ---------------------------------------------------------------------------------------------- html


def pareto_chart(report: dict[str, Any], *, width: int = 760, height: int = 440) -> str:
    """Accuracy against p50 of every measured trial; the front as a staircase, the budgets as dashed lines."""
    from optimizer.report.svg import (
        BAD, BAD_TEXT, GOOD, INK, MUTED, NEUTRAL, Scale, axis_x, axis_y, line, marker, nice_ticks, padded_domain, svg_open, text,
    )
    from optimizer.report.verdict import pareto_front

    left, right, top, bottom = 62, 24, 34, 52
    scale = 100.0 if report["fraction_metric"] else 1.0
    sign = 1.0 if report["higher_is_better"] else -1.0
    rows = [r for r in report["trials"] if r.get("accuracy") is not None and r.get("p50_ms") is not None
            and math.isfinite(r["accuracy"]) and math.isfinite(r["p50_ms"])]
    out = [svg_open(width, height, "Trials: accuracy against p50 latency")]
    if not rows:
        out.append(text(width / 2, height / 2, "no measured trials", anchor="middle", fill=MUTED))
        return "".join(out) + "</svg>"
    budgets = report["budgets"]
    floor = None
    if "accuracy_drop" in budgets and report["baseline_accuracy"] is not None:
        floor = report["baseline_accuracy"] - sign * budgets["accuracy_drop"]
    # The intervals are drawn too: the domain holds their ends, so no error bar leaves the plot.
    xs = [v for r in rows for v in (r["p50_ms"], *(r.get("p50_ci95_ms") or []))]
    xs += [budgets[k] for k in ("latency_p50_ms",) if k in budgets]
    ys = [v * scale for r in rows for v in (r["accuracy"], *(r.get("accuracy_ci95") or []))]
    ys += [floor * scale] if floor is not None else []
    x0, x1 = padded_domain(xs, pad=0.12, floor=0.0)
    y0, y1 = padded_domain(ys, pad=0.12)
    sx = Scale(x0, x1, left, width - right)
    sy = Scale(y0, y1, height - bottom, top)
    metric = report["metric"]
    out += axis_y(sy, nice_ticks(y0, y1, 6), left, width - right,
                  f"{metric}{' %' if report['fraction_metric'] else ''} (screening)")
    out += axis_x(sx, nice_ticks(x0, x1, 7), height - bottom, top, "p50 latency, ms (screening)")
    if "latency_p50_ms" in budgets:
        bx = sx(budgets["latency_p50_ms"])
        out.append(line(bx, top, bx, height - bottom, stroke=BAD, width=1.2, dash="6 4"))
        out.append(text(bx + 4, top + 12, f"p50 budget {budgets['latency_p50_ms']:g} ms", fill=BAD_TEXT, size=10))
    if floor is not None:
        by = sy(floor * scale)
        out.append(line(left, by, width - right, by, stroke=BAD, width=1.2, dash="6 4"))
        out.append(text(width - right - 4, by - 4, "accuracy budget", anchor="end", fill=BAD_TEXT, size=10))
    coords = [(sx(r["p50_ms"]), sy(r["accuracy"] * scale)) for r in rows]
    front = pareto_front([(r["p50_ms"], sign * r["accuracy"]) for r in rows])
    if len(front) > 1:
        path = f"M{coords[front[0]][0]:.1f},{coords[front[0]][1]:.1f}"
        for i in front[1:]:
            path += f" H{coords[i][0]:.1f} V{coords[i][1]:.1f}"
        out.append(f'<path d="{path}" fill="none" stroke="{INK}" stroke-width="1.2" stroke-dasharray="5 4"/>')
    chosen = report["chosen"]["trial"] if report["chosen"] else None
    on_front = set(front)
    for i, (r, (px, py)) in enumerate(zip(rows, coords)):
        feasible = r.get("feasible")
        color = GOOD if feasible else NEUTRAL
        if r.get("p50_ci95_ms"):
            out.append(line(sx(r["p50_ci95_ms"][0]), py, sx(r["p50_ci95_ms"][1]), py, stroke=color, width=1.2,
                            opacity=0.6))
        if r.get("accuracy_ci95"):
            out.append(line(px, sy(r["accuracy_ci95"][0] * scale), px, sy(r["accuracy_ci95"][1] * scale),
                            stroke=color, width=1.2, opacity=0.6))
        if r["number"] == chosen:
            out.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="9" fill="none" stroke="{INK}" stroke-width="1.5"/>')
        tip = (f"trial {r['number']} ({r['label']}): p50 {r['p50_ms']:.4f} ms, {metric} "
               f"{_acc(report, r['accuracy'])}; {_status(r)}")
        out.append(marker(0, px, py, fill=color if i in on_front else "#fff", stroke=color, r=5, title=tip))
        out.append(text(px + 7, py - 6, str(r["number"]), size=10, fill=MUTED))
    return "".join(out) + "</svg>"


def render_html(report: dict[str, Any]) -> str:
    from optimizer.report.html import page
    from optimizer.report.svg import esc

    chosen = report["chosen"]
    budgets = ", ".join(f"{esc(k)} {v:g}" for k, v in report["budgets"].items()) or "none"
    head = (f"<h1>Search: {esc(report['recipe'])}</h1><p>Objective <b>{esc(report['objective'])}</b>; budgets: "
            f"{budgets}; {len(report['trials'])} trials on {esc(report['executor'])}; screening on "
            f"{esc(report['screening']['eval_samples'] or 'all')} eval samples with {esc(report['screening']['latency'])}"
            f" latency; wall time {report['wall_s']:.1f} s.</p>")
    if report["interrupted"]:
        head += "<p><b>Interrupted</b>: re-run with <code>--resume</code> to continue.</p>"
    if chosen:
        head += (f"<p><b>Chosen: trial {chosen['trial']}</b> ({esc(chosen['label'])}): "
                 f"{esc(_acc(report, chosen['accuracy']))} ({esc(_acc_ci(report, chosen['accuracy_ci95']))}), p50 "
                 f"{esc(_ms(chosen['p50_ms'], chosen['p50_ci95_ms']))} ms. Why: {esc(chosen['why'])}. "
                 "Artifact: <code>final/</code>.</p>")
    elif not report["interrupted"]:
        head += "<p><b>No trial meets the budgets.</b></p>"
    body_rows = []
    for row, trial in zip(trial_table_rows(report), report["trials"]):
        cells = [esc(c) for c in row]
        if trial.get("report_link"):
            cells[0] = f'<a href="{esc(trial["report_link"])}">{cells[0]}</a>'
        body_rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    columns = ["trial", "parameters", "status", "accuracy (95 % CI)", "p50 ms (CI)", "p90 ms (CI)", "seconds", "error"]
    table = ("<table><thead><tr>" + "".join(f"<th>{c}</th>" for c in columns) + "</tr></thead><tbody>"
             + "".join(body_rows) + "</tbody></table>")
    full = ""
    if report["full"]:
        rows = "".join(
            f"<tr><td>{r['number']}</td><td>{esc(r.get('status'))}</td><td>{esc(_acc(report, r.get('accuracy')))} "
            f"({esc(_acc_ci(report, r.get('accuracy_ci95')))})</td><td>{esc(_ms(r.get('p50_ms'), r.get('p50_ci95_ms')))}"
            f"</td><td>{esc(_ms(r.get('p90_ms'), r.get('p90_ci95_ms')))}</td><td>{'yes' if r['meets_budgets'] else 'no'}"
            "</td></tr>" for r in report["full"])
        full = ("<section><h2>Candidates re-measured in full</h2><table><thead><tr><th>trial</th><th>status</th>"
                "<th>accuracy (CI)</th><th>p50 ms (CI)</th><th>p90 ms (CI)</th><th>meets budgets</th></tr></thead>"
                f"<tbody>{rows}</tbody></table></section>")
    values = report["importance"].get("values") or {}
    importance_html = ("<ul>" + "".join(f"<li><code>{esc(k)}</code>: {v:.3f}</li>" for k, v in values.items())
                       + "</ul>" if values else "") + f"<p>{esc(report['importance']['note'])}.</p>"
    body = (head + "<section><h2>Pareto front</h2>" + pareto_chart(report)
            + "<p>Filled: on the front; blue: within the budgets, grey: over one or stopped; dashed: the budgets; "
            "ringed: chosen. Bars: 95 % intervals.</p>"
            "</section><section><h2>Trials</h2>" + table + "</section>" + full
            + "<section><h2>Parameter importance</h2>" + importance_html + "</section>"
            + f"<section><h2>Stage cache</h2><p>{esc(_cache_sentence(report['cache']))}</p></section>"
            + "<footer>search.json in the same folder holds every figure on this page.</footer>")
    return page(f"{report['recipe']}: search report", body)


def write_search_report(report: dict[str, Any], folder: Path) -> None:
    from optimizer.atomic import write_text_atomic

    write_text_atomic(folder / "search.json", json.dumps(report, indent=2, default=str) + "\n")
    write_text_atomic(folder / "search.md", render_markdown(report))
    write_text_atomic(folder / "search.html", render_html(report))
