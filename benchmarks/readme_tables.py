"""Regenerate the README's result tables from the files the runs wrote; those tables are never edited by hand.

Every generated table sits between two HTML comments, which Markdown renderers hide:

    <!-- table:quickstart source=runs/quickstart/report.md environment=yes -->
    | stage | pass | form | ... |
    |---|---|---|...|
    | baseline | – | torch | ... |

    Environment: AMD EPYC | 2 cpus | ...
    <!-- /table -->

``source`` is relative to the repository root. What is taken from it depends on the file:

* **A run's ``report.md``** (``optimizer run`` writes it): the stage table under ``## Stages``, exactly as
  ``optimizer/report/markdown.py`` printed it. All of its columns by default (the quick start: what a user who
  runs it sees), or the ones named in ``columns="stage; form; top-1 % (95% CI)"`` in the renderer's order, for
  tables that would be too wide for the page next to prose about a few of them. ``environment=yes`` adds the
  report's ``Environment:`` line under the table. These are the tables whose columns ``--check`` (and
  ``tests/test_readme_tables.py``) compare with what the current renderer prints: a renamed, added or
  removed column makes them stale even when no run is at hand, because ``runs/`` is not in git.
* **A benchmark's saved Markdown** (any other ``.md``; ``benchmarks/workloads.py`` writes ``workloads.md``,
  ``benchmarks/latency_prune.py`` writes ``latency_prune.md``,
  ``benchmarks/mobilenet_resolution.py`` ``mobilenet_resolution.md``): the first table after the heading that starts
  with ``section="..."`` (or the file's first table), verbatim. The benchmark's own code prints those columns,
  so there is no separate renderer to compare with.

Benchmarks that only print to the terminal (``benchmarks/prune_distill.py``, ``benchmarks/reference_agreement.py``)
and tables the README assembles from several of a benchmark's figures are not generated: the README names, right
above each of them, the command that printed the figures, and they are refreshed by running it again. The
script leaves everything outside the markers alone.

    python benchmarks/readme_tables.py            # rewrite every marked table whose source exists
    python benchmarks/readme_tables.py --check    # exit 1 if a table differs from its source, or a report
                                                  # table's columns from the current renderer's

A source that does not exist (a run not made on this machine) is listed and skipped; ``--require-sources``
makes that an error too.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

OPEN = re.compile(r"^<!-- table:(?P<name>[\w.+-]+)(?P<attrs>(?:\s+[\w-]+=(?:\"[^\"]*\"|\S+?))*)\s*-->$")
CLOSE = "<!-- /table -->"
ATTRIBUTE = re.compile(r"([\w-]+)=(?:\"([^\"]*)\"|(\S+))")
KNOWN_ATTRIBUTES = {"source", "columns", "environment", "section", "metric"}


class TableError(Exception):
    """A marker, source or table the script cannot use; the message names the README line or the file."""


@dataclass
class Region:
    """One marked table in the README: its attributes and the lines between its two markers."""

    name: str
    attrs: dict[str, str]
    open_line: int              # 0-based index of the opening marker in the README's lines
    close_line: int             # 0-based index of the closing marker
    body: list[str] = field(default_factory=list)

    @property
    def source(self) -> str:
        return self.attrs["source"]

    @property
    def is_report(self) -> bool:
        return Path(self.source).name == "report.md"

    @property
    def columns(self) -> list[str] | None:
        raw = self.attrs.get("columns")
        return None if raw is None else [c.strip() for c in raw.split(";") if c.strip()]

    @property
    def where(self) -> str:
        return f"README line {self.open_line + 1}, table '{self.name}'"


def parse_regions(text: str) -> list[Region]:
    """Every marked region, in order; a marker without its other half, nested markers or an unknown or
    missing attribute is an error (a typo would otherwise leave a table silently unmanaged)."""
    lines = text.split("\n")
    regions: list[Region] = []
    current: Region | None = None
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("<!-- table:"):
            match = OPEN.match(stripped)
            if match is None:
                raise TableError(f"README line {i + 1}: cannot read the marker {stripped!r}")
            if current is not None:
                raise TableError(f"README line {i + 1}: a table marker inside '{current.name}' (line "
                                 f"{current.open_line + 1}), which is not closed")
            attrs = {m.group(1): m.group(2) if m.group(2) is not None else m.group(3)
                     for m in ATTRIBUTE.finditer(match.group("attrs"))}
            unknown = sorted(set(attrs) - KNOWN_ATTRIBUTES)
            if unknown or "source" not in attrs:
                problem = f"unknown attribute(s) {unknown}" if unknown else "no source="
                raise TableError(f"README line {i + 1}: table '{match.group('name')}': {problem} "
                                 f"(known: {sorted(KNOWN_ATTRIBUTES)})")
            current = Region(match.group("name"), attrs, i, -1)
        elif stripped == CLOSE:
            if current is None:
                raise TableError(f"README line {i + 1}: {CLOSE} without an opening marker")
            current.close_line = i
            current.body = lines[current.open_line + 1:i]
            regions.append(current)
            current = None
    if current is not None:
        raise TableError(f"{current.where}: no {CLOSE} after it")
    names = [r.name for r in regions]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise TableError(f"README: table name(s) used twice: {twice}")
    return regions


# ------------------------------------------------------------------------------------------ Markdown tables


def split_row(line: str) -> list[str]:
    """The cells of a Markdown table row; ``\\|`` (how the renderer escapes a bar in a cell) stays in its cell."""
    body = line.strip()
    if body.startswith("|"):
        body = body[1:]
    if body.endswith("|") and not body.endswith("\\|"):
        body = body[:-1]
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", body)]


def join_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def tables_in(lines: list[str]) -> list[tuple[int, list[str]]]:
    """Every table in ``lines`` outside fenced code blocks: (index of its header line, its lines)."""
    found: list[tuple[int, list[str]]] = []
    fenced = False
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and line.lstrip().startswith("|") and i + 1 < len(lines) \
                and re.fullmatch(r"\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*", lines[i + 1]):
            end = i
            while end < len(lines) and lines[end].lstrip().startswith("|"):
                end += 1
            found.append((i, lines[i:end]))
            i = end
            continue
        i += 1
    return found


def first_table(lines: list[str], *, after: str | None, where: str) -> list[str]:
    start = 0
    if after is not None:
        heading = next((i for i, line in enumerate(lines)
                        if line.startswith("#") and line.lstrip("#").strip().startswith(after)), None)
        if heading is None:
            raise TableError(f"{where}: no heading starting with {after!r}")
        start = heading + 1
    found = tables_in(lines[start:])
    if not found:
        raise TableError(f"{where}: no table" + (f" after the heading {after!r}" if after else ""))
    return found[0][1]


# -------------------------------------------------------------------------------------- the stage table


def renderer_columns(metric: str = "top1") -> list[str]:
    """The stage table's columns as ``optimizer/report/markdown.py`` prints them today, for a report scored
    with ``metric``: a report with no stages rendered through it, its header read back."""
    from optimizer.report.markdown import render_markdown

    report: dict[str, Any] = {"passed": True, "stages": [],
                              "recipe": {"name": "columns", "evaluate": {"accuracy": {"metric": metric}}}}
    text = render_markdown(report)
    return split_row(first_table(text.split("\n"), after="Stages", where="the renderer's output")[0])


def stage_table(report_md: str, columns: list[str] | None, *, where: str) -> list[str]:
    """The ``## Stages`` table of a report.md, whole or cut down to ``columns`` (by name, in the given order)."""
    lines = first_table(report_md.split("\n"), after="Stages", where=where)
    header = split_row(lines[0])
    if columns is None:
        return list(lines)
    missing = [c for c in columns if c not in header]
    if missing:
        raise TableError(f"{where}: the report's stage table has no column(s) {missing}; it has {header}")
    index = [header.index(c) for c in columns]
    rows = [split_row(line) for line in lines[2:]]
    return [join_row(columns), "|" + "|".join("---" for _ in columns) + "|",
            *(join_row([row[i] for i in index]) for row in rows)]


def environment_line(report_md: str, *, where: str) -> str:
    line = next((l for l in report_md.split("\n") if l.startswith("Environment: ")), None)
    if line is None:
        raise TableError(f"{where}: no 'Environment:' line")
    return line


def generate(region: Region, root: Path) -> list[str] | None:
    """The lines the region should hold, from its source; None when the source is not there."""
    path = root / region.source
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    where = f"{region.where}: {region.source}"
    if region.is_report:
        body = stage_table(text, region.columns, where=where)
        body.append("")
        if region.attrs.get("environment") == "yes":
            body.append(environment_line(text, where=where))
        return body
    if region.columns is not None or "environment" in region.attrs:
        raise TableError(f"{region.where}: columns= and environment= apply to report.md sources only")
    return [*first_table(text.split("\n"), after=region.attrs.get("section"), where=where), ""]


def column_problems(region: Region) -> list[str]:
    """Why a report table's header is not what the current renderer prints (empty when it is): the whole
    header must equal the renderer's columns, or, with ``columns=``, that selection, which must name
    columns the renderer prints, in its order."""
    if not region.is_report:
        return []
    expected = renderer_columns(region.attrs.get("metric", "top1"))
    tables = tables_in(region.body)
    if len(tables) != 1:
        return [f"{region.where}: {len(tables)} tables between the markers, expected 1"]
    header = split_row(tables[0][1][0])
    problems = []
    if region.columns is None:
        if header != expected:
            problems.append(f"{region.where}: columns {header} are not the renderer's {expected}")
        return problems
    unknown = [c for c in region.columns if c not in expected]
    if unknown:
        problems.append(f"{region.where}: columns= names {unknown}, which the renderer does not print "
                        f"(it prints {expected})")
    elif [c for c in expected if c in region.columns] != region.columns:
        problems.append(f"{region.where}: columns= is not in the renderer's order {expected}")
    if header != region.columns:
        problems.append(f"{region.where}: the table's columns {header} are not its columns= {region.columns}")
    return problems


def readme_column_problems(readme_text: str) -> list[str]:
    """Column problems of every report table as the README holds it now, with no source needed: what the
    tests check, since the runs themselves are not in git."""
    return [problem for region in parse_regions(readme_text) for problem in column_problems(region)]


# ------------------------------------------------------------------------------------------------- main


@dataclass
class Outcome:
    text: str                                           # the README with every available table regenerated
    stale: list[str] = field(default_factory=list)      # tables whose body differs from their source
    missing: list[str] = field(default_factory=list)    # tables whose source is not there
    problems: list[str] = field(default_factory=list)   # column mismatches and unusable sources


def process(readme_text: str, root: Path) -> Outcome:
    regions = parse_regions(readme_text)
    lines = readme_text.split("\n")
    outcome = Outcome(readme_text)
    # From the last region up, so that earlier regions' line numbers stay valid while lines are replaced.
    for region in reversed(regions):
        try:
            body = generate(region, root)
        except TableError as exc:
            outcome.problems.append(str(exc))
            continue
        if body is None:
            outcome.missing.append(f"{region.where}: {region.source} not found; not compared")
            outcome.problems += column_problems(region)
            continue
        if body != region.body:
            outcome.stale.append(f"{region.where}: differs from {region.source}")
        lines[region.open_line + 1:region.close_line] = body
        outcome.problems += column_problems(Region(region.name, region.attrs, region.open_line,
                                                   region.open_line + 1 + len(body), body))
    for items in (outcome.stale, outcome.missing, outcome.problems):
        items.reverse()
    outcome.text = "\n".join(lines)
    return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--readme", type=Path, default=REPO / "README.md")
    parser.add_argument("--root", type=Path, default=REPO, help="folder the sources are relative to")
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 when a table is stale or a report table's columns are not the "
                             "renderer's")
    parser.add_argument("--require-sources", action="store_true", help="a missing source is an error too")
    args = parser.parse_args(argv)
    text = args.readme.read_text(encoding="utf-8")
    try:
        outcome = process(text, args.root)
    except TableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in outcome.missing:
        print(f"skipped: {line}")
    for line in outcome.problems:
        print(f"error: {line}", file=sys.stderr)
    failed = bool(outcome.problems) or (args.require_sources and bool(outcome.missing))
    if args.check:
        for line in outcome.stale:
            print(f"stale: {line}", file=sys.stderr)
        return 1 if failed or outcome.stale else 0
    if outcome.text != text:
        args.readme.write_text(outcome.text, encoding="utf-8")
    for line in outcome.stale:
        print(f"rewritten: {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
