"""report.html: a standalone page with the stage table (no external assets)."""

from __future__ import annotations

import html
from typing import Any

from optimizer.measure.environment import describe
from optimizer.report.rows import COLUMNS, notes, stage_rows

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem;color:#222}
table{border-collapse:collapse;font-size:.9rem}
th,td{border:1px solid #ccc;padding:.3rem .5rem;text-align:right}
th{background:#f3f3f3}
td:first-child,td:nth-child(2),td:nth-child(3){text-align:left}
.failed{background:#fde2e2}.passed{color:#176b2c}.fail{color:#a11}
"""


def render_html(report: dict[str, Any]) -> str:
    recipe = report["recipe"]
    status = '<b class="passed">PASSED</b>' if report["passed"] else '<b class="fail">FAILED</b>'
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = []
    for row in stage_rows(report):
        css = ' class="failed"' if row[-1] != "ok" else ""
        body.append(f"<tr{css}>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>")
    items = "".join(f"<li>{html.escape(n)}</li>" for n in notes(report))
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(recipe['name'])}</title>"
        f"<style>{_STYLE}</style></head><body>"
        f"<h1>{html.escape(recipe['name'])}: optimization report</h1>"
        f"<p>{status} · {html.escape(report['finished'])} · {report['duration_s']} s</p>"
        f"<p>Environment: {html.escape(describe(report['environment']))}</p>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
        f"<ul>{items}</ul></body></html>\n"
    )
