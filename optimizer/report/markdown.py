"""report.md: the verdict and the stage table, for terminals and pull requests."""

from __future__ import annotations

from typing import Any

from optimizer.measure.environment import describe
from optimizer.report.rows import columns, notes, stage_rows
from optimizer.report.verdict import verdict


def md(text: object, *, cell: bool = False) -> str:
    """Text from a report inside Markdown: stage names and error messages must not turn into HTML on a
    code-hosting site that renders the file, nor (``cell``) close a table cell."""
    out = str(text).replace("<", "&lt;").replace(">", "&gt;").replace("\r", " ").replace("\n", " ")
    return out.replace("\\", "\\\\").replace("|", "\\|") if cell else out


def table(columns: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(md(c, cell=True) for c in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(md(value, cell=True) for value in row) + " |" for row in rows]
    return lines


def verdict_paragraph(report: dict[str, Any]) -> list[str]:
    result = verdict(report)
    return [f"**{md(result.headline)}**", "", " ".join(md(s) for s in result.sentences)]


def _sweep(report: dict[str, Any]) -> list[str]:
    series = [(s["name"], s["latency_sweep"]) for s in report["stages"] if s.get("latency_sweep")]
    if not series:
        return []
    sizes = sorted({int(p["batch_size"]) for _, pts in series for p in pts if p.get("batch_size")})
    rows = []
    for name, pts in series:
        by_size = {int(p["batch_size"]): p for p in pts if p.get("batch_size")}
        row = [name]
        for b in sizes:
            p = by_size.get(b)
            if p is None or p.get("p50_ms") is None:
                row.append("–")
                continue
            cell = f"{p['p50_ms']:.3f} ms, {p.get('samples_per_s', 0):,.0f}/s"
            row.append(cell + (" unstable" if p.get("unstable") else ""))
        rows.append(row)
    return ["", "## Batch-size sweep", "", "p50 latency per batch and samples per second.", "",
            *table(["stage", *(f"batch {b}" for b in sizes)], rows)]


def _shapes(report: dict[str, Any]) -> list[str]:
    """evaluate.latency.shapes: p50 (with its interval) and, where measured, accuracy per stage and size."""
    from optimizer.report.rows import shape_table

    sizes, rows, notes_ = shape_table(report)
    if not rows:
        return []
    body = [[name] + [c.latency + (" unstable" if c.unstable else "") + (f"; {c.accuracy}" if c.accuracy else "")
                      + (" (error)" if c.error else "") for c in cells] for name, cells in rows]
    return ["", "## Latency against input size", "",
            "p50 latency (95 % interval) and, where the data was loaded at that size, accuracy.", "",
            *table(["stage", *(f"size {size}" for size in sizes)], body), "", *(f"- {md(n)}" for n in notes_)]


def _profile(report: dict[str, Any]) -> list[str]:
    lines = []
    for s in report["stages"]:
        profile = s.get("profile")
        if not isinstance(profile, dict) or not profile.get("by_op_type"):
            continue
        ranked = sorted(profile["by_op_type"], key=lambda e: -float(e.get("ms") or 0))[:5]
        shares = ", ".join(f"{md(e.get('op_type', '?'))} {float(e.get('share') or 0) * 100:.0f} %" for e in ranked)
        lines.append(f"- {md(s['name'])} ({md(profile.get('tool', '?'))}): {shares}")
    return ["", "## Where the time goes", "", *lines] if lines else []


def _latency_allocation(report: dict[str, Any]) -> list[str]:
    from optimizer.passes.latency_allocation import ms_at_width

    lines = []
    for s in report["stages"]:
        pruning = (s.get("details") or {}).get("pruning") or {}
        info = pruning.get("latency")
        if not isinstance(info, dict) or not info.get("table"):
            continue
        macs = pruning.get("macs_ratio")
        lines += ["", f"### {md(s['name'])}: latency-allocated pruning on {md(info.get('runtime'))} "
                      f"{md(info.get('precision'))}, {info.get('threads')} thread(s)", "",
                  f"Unpruned {info['base_ms']:.4f} ms, target {info['target_ms']:.4f} ms, predicted "
                  f"{info['predicted_ms']:.4f} ms, measured {info['measured_ms']:.4f} ms: "
                  f"{info['measured_speedup']:.2f}× measured speedup"
                  + (f" for {macs:.2f}× fewer MACs" if macs else "") + ".", ""]
        rows = [[md(name, cell=True), md(g.get("block", ""), cell=True), str(g["channels"]), str(g["chosen"]),
                 f"{g['ms'][0]:.4f}", f"{ms_at_width(g['widths'], g['ms'], g['chosen']):.4f}"]
                for name, g in info["table"].items()]
        lines += table(["group", "block", "channels", "kept", "block ms full", "block ms kept"], rows)
        for k in info.get("kept_groups") or []:
            lines.append(f"- kept at full width: {md(k.get('group'))} ({k.get('channels')} channels): {md(k.get('reason'))}")
    return ["", "## Latency-allocated pruning", *lines] if lines else []


def render_markdown(report: dict[str, Any]) -> str:
    recipe = report.get("recipe") or {}
    lines = [
        f"# {md(recipe.get('name', 'run'))}: optimization report",
        "",
        f"**{'PASSED' if report.get('passed') else 'FAILED'}** · {md(report.get('finished', '?'))} · "
        f"{report.get('duration_s', '?')} s",
        "",
        *verdict_paragraph(report),
        "",
        "## Stages",
        "",
        *table(columns(report), stage_rows(report)),
        "",
    ]
    for note in notes(report):
        lines.append(f"- {md(note)}")
    lines += _sweep(report)
    lines += _shapes(report)
    lines += _latency_allocation(report)
    lines += _profile(report)
    lines += ["", f"Environment: {md(describe(report.get('environment') or {}))}"]
    if report.get("final"):
        stage = (report.get("publish") or {}).get("stage")
        held = f": stage '{md(stage)}'" if stage else ""
        lines += ["", f"Deployable artifact: `final/`{held} (see `final/manifest.json`)."]
    return "\n".join(lines) + "\n"
