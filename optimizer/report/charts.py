"""The report's charts as inline SVG strings: trade-off scatter, waterfalls, latency distributions, the
batch-size and input-size sweeps and the operator profile. Inputs are plain values; every text is escaped in svg.py."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from optimizer.report.svg import (
    BAD, BAD_TEXT, FONT_SIZE, GOOD, GRID, INK, MUTED, NEUTRAL, OTHER, PALETTE, Box, Scale, axis_x, axis_y, esc, fmt,
    line, log_ticks, marker, nice_ticks, padded_domain, place_labels, rect, shorten, svg_open, text, text_width,
)
from optimizer.report.verdict import pareto_front


def swatch(color: str, *, kind: str = "box", shape: int = 0, hollow: bool = False) -> str:
    """A small legend key: a box (filled, pale or outlined), a marker, a line, a dashed line or a ring."""
    head = '<svg xmlns="http://www.w3.org/2000/svg" width="22" height="14" viewBox="0 0 22 14" aria-hidden="true">'
    body = {
        "box": lambda: rect(3, 2, 16, 10, fill=color),
        "pale": lambda: rect(3, 2, 16, 10, fill=color, opacity=0.45),
        "outline": lambda: rect(3, 2, 16, 10, fill="#fff", stroke=color),
        "line": lambda: line(1, 7, 21, 7, stroke=color, width=1.5),
        "dashed": lambda: line(1, 7, 21, 7, stroke=color, width=2, dash="5 3"),
        "ring": lambda: f'<circle cx="11" cy="7" r="6" fill="none" stroke="{color}" stroke-width="1.5"/>',
        "point": lambda: marker(shape, 11, 7, fill="#fff" if hollow else color, stroke=color, r=4),
        "marker": lambda: line(1, 7, 21, 7, stroke=color, width=1.5)
        + marker(shape, 11, 7, fill="#fff" if hollow else color, stroke=color, r=4),
    }[kind]()
    return head + body + "</svg>"


def legend(items: Sequence[tuple[str, str]]) -> str:
    """HTML legend under a chart: wraps on narrow screens, unlike a legend drawn inside the SVG."""
    return '<p class="legend">' + "".join(f"<span>{key}{esc(label)}</span>" for key, label in items) + "</p>"


def _contrast_text(color: str) -> str:
    """Black or white, whichever reads better on ``color`` (relative luminance, WCAG formula)."""
    r, g, b = (int(color[i:i + 2], 16) / 255 for i in (1, 3, 5))

    def channel(c: float) -> float:
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    luminance = 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b)
    return "#000" if luminance > 0.22 else "#fff"


# ------------------------------------------------------------------------------ accuracy vs latency


@dataclass(frozen=True)
class TradeoffPoint:
    label: str
    latency_ms: float
    latency_ci: tuple[float, float]
    accuracy: float                     # fraction (or the metric's own units when the chart says so)
    accuracy_ci: tuple[float, float]
    series: int = 0                     # which run, when several are compared
    recommended: bool = False


def tradeoff_chart(points: Sequence[TradeoffPoint], *, batch_size: int | None = None,
                   several_series: bool = False, width: int = 640, height: int = 420, metric: str = "top-1",
                   percent: bool = True, higher_is_better: bool = True) -> str:
    """Accuracy against p50 latency, with 95 % intervals as error bars and the Pareto front as a staircase.
    Points on the front are filled; dominated points are hollow, because some other stage is at least as
    fast and at least as accurate. ``metric`` names the accuracy metric; ``percent``: its values are fractions
    shown in percent (else plotted as they are); ``higher_is_better`` sets which way the front faces."""
    left, right, top, bottom = 62, 24, 34, 52
    title = "Top-1 accuracy against p50 latency" if metric == "top-1" else f"{metric} against p50 latency"
    scale = 100.0 if percent else 1.0
    sign = 1.0 if higher_is_better else -1.0
    out = [svg_open(width, height, title)]
    # A figure that is not a finite number cannot be placed (and "nan" coordinates are SVG errors).
    points = [p for p in points if all(math.isfinite(v) for v in (p.latency_ms, p.accuracy, *p.latency_ci,
                                                                   *p.accuracy_ci))]
    if not points:
        out.append(text(width / 2, height / 2, "no measured stages", anchor="middle", fill=MUTED))
        return "".join(out) + "</svg>"
    x0, x1 = padded_domain([v for p in points for v in (*p.latency_ci, p.latency_ms)], pad=0.12, floor=0.0)
    y0, y1 = padded_domain([v * scale for p in points for v in (*p.accuracy_ci, p.accuracy)], pad=0.12)
    if percent:
        y1 = min(y1, 100.0 + (y1 - y0) * 0.02)
    sx = Scale(x0, x1, left, width - right)
    sy = Scale(y0, y1, height - bottom, top)
    batch = f", batch {batch_size}" if batch_size else ""
    direction = "higher is better ↑" if higher_is_better else "lower is better ↓"
    out += axis_y(sy, nice_ticks(y0, y1, 6), left, width - right, f"{metric}{' %' if percent else ''}  ({direction})")
    out += axis_x(sx, nice_ticks(x0, x1, 7), height - bottom, top, f"p50 latency, ms{batch}  (lower is better ←)")
    out.append(text(left + 8, top + 14, "← better", fill=MUTED, size=10))

    coords = [(sx(p.latency_ms), sy(p.accuracy * scale)) for p in points]
    front = pareto_front([(p.latency_ms, sign * p.accuracy) for p in points])
    if len(front) > 1:
        path = f"M{coords[front[0]][0]:.1f},{coords[front[0]][1]:.1f}"
        for i in front[1:]:
            path += f" H{coords[i][0]:.1f} V{coords[i][1]:.1f}"
        out.append(f'<path d="{path}" fill="none" stroke="{INK}" stroke-width="1.3" stroke-dasharray="5 4"/>')
    on_front = set(front)
    for i, (p, (px, py)) in enumerate(zip(points, coords)):
        color = PALETTE[p.series % len(PALETTE)] if several_series else (GOOD if i in on_front else NEUTRAL)
        out.append(line(sx(p.latency_ci[0]), py, sx(p.latency_ci[1]), py, stroke=color, width=1.4, opacity=0.6))
        out.append(line(px, sy(p.accuracy_ci[0] * scale), px, sy(p.accuracy_ci[1] * scale), stroke=color,
                        width=1.4, opacity=0.6))
    for i, (p, (px, py)) in enumerate(zip(points, coords)):
        color = PALETTE[p.series % len(PALETTE)] if several_series else (GOOD if i in on_front else NEUTRAL)
        tip = (f"{p.label}: p50 {p.latency_ms:.3f} ms ({p.latency_ci[0]:.3f}–{p.latency_ci[1]:.3f}), "
               + (f"{metric} {p.accuracy * 100:.2f} % ({p.accuracy_ci[0] * 100:.2f}–{p.accuracy_ci[1] * 100:.2f})"
                  if percent else f"{metric} {p.accuracy:.4g} ({p.accuracy_ci[0]:.4g}–{p.accuracy_ci[1]:.4g})")
               + ("" if i in on_front else "; dominated"))
        if p.recommended:
            out.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="9" fill="none" stroke="{INK}" stroke-width="1.5"/>')
        out.append(marker(p.series if several_series else 0, px, py, fill=color if i in on_front else "#fff",
                          stroke=color, r=5, title=tip))
    bounds = Box(left, top, width - left - right, height - top - bottom)
    # Markers (and the wider ring of the recommended stage) are obstacles too: labels never cover a point.
    obstacles = [Box(px - r, py - r, 2 * r, 2 * r) for (px, py), r in
                 ((c, 10.0 if p.recommended else 6.0) for c, p in zip(coords, points))]
    labels = [shorten(p.label, 28) for p in points]
    for (tx, ty, anchor), label, p in zip(place_labels(coords, labels, bounds, obstacles), labels, points):
        out.append(text(tx, ty, label, anchor=anchor, title=p.label))
    return "".join(out) + "</svg>"


def tradeoff_legend(*, series: Sequence[str] = ()) -> str:
    items = [(swatch(GOOD, kind="point"), "on the Pareto front"),
             (swatch(NEUTRAL, kind="point", hollow=True),
              "dominated: another stage is as fast and as accurate, or better"),
             (swatch(INK, kind="dashed"), "Pareto front"),
             (swatch(INK, kind="ring"), "recommended"),
             (swatch(MUTED, kind="line"), "bars: 95 % intervals")]
    if series:
        items = [(swatch(PALETTE[i % len(PALETTE)], kind="point", shape=i), name) for i, name in enumerate(series)]
        items += [(swatch(INK, kind="dashed"), "Pareto front over all runs"),
                  (swatch(INK, kind="point", hollow=True), "hollow: dominated"),
                  (swatch(INK, kind="ring"), "recommended in its run")]
    return legend(items)


# -------------------------------------------------------------------------------------- waterfalls


def waterfall_chart(title: str, unit: str, labels: Sequence[str], levels: Sequence[float], *,
                    lower_is_better: bool, from_zero: bool, significant: Sequence[bool | None] | None = None,
                    digits: int = 3, min_span: float = 0.0, height: int = 250) -> str:
    """The first bar is the baseline's level; each later bar floats from the previous level to its own,
    blue when the stage improved the figure and vermillion when it made it worse. A change that is not
    significant is drawn pale and marked n.s. The chart widens with the number of stages so that the
    change labels above the bars never run into each other."""
    left, right, top, bottom = 56, 10, 30, 46
    width = max(360, left + right + 74 * len(levels))
    slot = (width - left - right) / max(1, len(levels))
    max_chars = max(3, int(slot / (FONT_SIZE * 0.62)))
    rotate = any(len(label) > max_chars for label in labels)
    if rotate:  # slanted stage names need room below the axis
        longest = max(text_width(shorten(label, 16)) for label in labels)
        bottom += int(longest * 0.5)
        height += int(longest * 0.5)
    out = [svg_open(width, height, f"{title}, stage by stage")]
    out.append(text(4, 14, f"{title} ({unit})", weight="600"))
    if not levels:
        out.append(text(width / 2, height / 2, "no data", anchor="middle", fill=MUTED))
        return "".join(out) + "</svg>"
    if from_zero:
        y0, y1 = 0.0, max(levels) * 1.15 or 1.0
    else:
        y0, y1 = padded_domain(levels, pad=0.45, min_span=min_span)
    sy = Scale(y0, y1, height - bottom, top)
    out += axis_y(sy, nice_ticks(y0, y1, 5), left, width - right, "")
    bar = min(46.0, slot * 0.62)
    for i, (label, level) in enumerate(zip(labels, levels)):
        cx = left + slot * (i + 0.5)
        if i == 0:
            top_y = sy(level)
            out.append(rect(cx - bar / 2, sy(y0), bar, top_y - sy(y0), fill=NEUTRAL,
                            title=f"{label}: {fmt(level, digits)} {unit}"))
            out.append(text(cx, top_y - 5, fmt(level, digits), anchor="middle"))
        else:
            previous = levels[i - 1]
            change = level - previous
            improved = change < 0 if lower_is_better else change > 0
            color = NEUTRAL if change == 0 else (GOOD if improved else BAD)
            sig = significant[i] if significant else None
            pale = sig is False
            y_a, y_b = sy(previous), sy(level)
            if abs(y_b - y_a) < 1.5:  # keep a no-change bar visible as a line
                y_b = y_a + (1.5 if y_b >= y_a else -1.5)
            tip = f"{label}: {fmt(previous, digits)} → {fmt(level, digits)} {unit} ({change:+.{digits}g})"
            out.append(rect(cx - bar / 2, y_a, bar, y_b - y_a, fill=color, opacity=0.35 if pale else 1.0,
                            stroke=color if pale else None, title=tip))
            prev_cx = left + slot * (i - 0.5)
            out.append(line(prev_cx + bar / 2, y_a, cx - bar / 2, y_a, stroke=MUTED, dash="2 2"))
            label_y = min(y_a, y_b) - 5
            # As many decimals as the baseline's label shows, so a delta reads against the level it changes.
            decimals = max(0, digits - 1 - math.floor(math.log10(abs(levels[0])))) if levels[0] else 2
            magnitude = f"{abs(change):.{decimals}f}"
            if change and float(magnitude) == 0:
                # A change far below the level's precision (an FP32 export's cosine agreement, 1 - 3e-13) in
                # exponent notation: written out in decimals it would run into the neighbouring labels.
                magnitude = fmt(abs(change), 1) if abs(change) >= 1e-4 else f"{abs(change):.1e}"
            delta = f"{'+' if change > 0 else '−' if change < 0 else '±'}{magnitude}"
            out.append(text(cx, label_y - (11 if pale else 0), delta, anchor="middle",
                            fill=MUTED if color == NEUTRAL else GOOD if improved else BAD_TEXT, weight="600"))
            if pale:
                out.append(text(cx, label_y, "n.s.", anchor="middle", fill=MUTED, size=10))
        shown = shorten(label, 16 if rotate else max_chars)
        if rotate:
            out.append(text(cx + 4, height - bottom + 14, shown, anchor="end", rotate=-30, title=label))
        else:
            out.append(text(cx, height - bottom + 16, shown, anchor="middle", title=label))
    return "".join(out) + "</svg>"


# ------------------------------------------------------------------------------ latency distributions


@dataclass(frozen=True)
class Distribution:
    name: str
    latency: dict[str, Any]             # the stage's latency summary from report.json
    raw: np.ndarray | None              # per-iteration ms, when the .npy file was found


def _histogram(values: np.ndarray, low: float, high: float) -> tuple[np.ndarray, np.ndarray]:
    """Counts over [low, high] with bins sized for this stage's own spread (Freedman–Diaconis, in log
    space to match the axis), so a tight distribution still shows its shape next to a wide one. Values
    past ``high`` are left out here; the chart counts them separately."""
    kept = values[(values >= low) & (values <= high)]
    if kept.size == 0:
        return np.zeros(0, dtype=int), np.array([low])
    logs = np.log(kept)
    q75, q25 = np.percentile(logs, [75, 25])
    width = 2 * (q75 - q25) / len(logs) ** (1 / 3)
    span = float(logs.max() - logs.min())
    count = int(np.clip(span / width, 8, 150)) if width > 0 and span > 0 else 8
    edges = np.exp(np.linspace(logs.min(), logs.min() + max(span, 1e-3), count + 1))
    counts, edges = np.histogram(kept, bins=edges)
    return counts, edges


def _histogram_path(counts: np.ndarray, edges: np.ndarray, sx: Scale, base: float, height: float) -> str:
    """Outline of the non-empty bins only: empty stretches between a distribution and its outliers stay
    blank instead of being drawn as a line along the baseline."""
    peak = counts.max() if counts.size else 0
    if not peak:
        return ""
    path = ""
    open_run = False
    for k, count in enumerate(counts):
        if count:
            top = base - count / peak * height
            if not open_run:
                path += f" M{sx(edges[k]):.1f},{base:.1f}"
                open_run = True
            path += f" V{top:.1f} H{sx(edges[k + 1]):.1f}"
        elif open_run:
            path += f" V{base:.1f} Z"
            open_run = False
    if open_run:
        path += f" V{base:.1f} Z"
    return path.strip()


def distribution_chart(rows: Sequence[Distribution], *, width: int = 1100) -> str:
    """One row per stage on a shared logarithmic millisecond axis (stages differ by multiples, and a log
    axis gives each the same resolution): a histogram of every timed iteration, a box from the 25th to
    the 75th percentile, whiskers from the 1st to the 99th, and the median with its 95 % interval. The
    axis stops a little past the largest p99 so one slow outlier cannot squash the rest; iterations beyond
    it are counted at the row's end."""
    left, right, top, bottom, row_h = 132, 250, 14, 46, 58
    height = top + bottom + row_h * len(rows)
    out = [svg_open(width, height, "Latency distribution per stage")]
    if not rows:
        return "".join(out) + "</svg>"
    lows = [float(r.raw.min()) if r.raw is not None else r.latency["min_ms"] for r in rows]
    x1 = max(r.latency["p99_ms"] for r in rows) * 1.1
    x0 = max(min(lows) / 1.1, 1e-6)
    sx = Scale(x0, x1, left, width - right, log=10)
    ticks = log_ticks(x0, x1)
    out += axis_x(sx, ticks, height - bottom, top, "latency per iteration, ms (log scale)",
                  tick_text=[f"{t:g}" for t in ticks])
    for i, row in enumerate(rows):
        color = PALETTE[i % len(PALETTE)]
        y = top + i * row_h
        lat = row.latency
        out.append(text(left - 10, y + row_h / 2 + 4, shorten(row.name, 18), anchor="end", title=row.name))
        base = y + row_h * 0.58       # the histogram sits above this line, the box below it
        if row.raw is not None:
            counts, edges = _histogram(row.raw, x0, x1)
            path = _histogram_path(counts, edges, sx, base, row_h * 0.48)
            if path:
                out.append(f'<path d="{path}" fill="{color}" fill-opacity="0.35" stroke="{color}" '
                           'stroke-width="0.8"/>')
            q1, q25, q75 = (float(v) for v in np.percentile(row.raw, [1, 25, 75]))
            beyond = int((row.raw > x1).sum())
        else:
            q1, q25, q75, beyond = lat["min_ms"], None, None, 0
        box_mid = base + row_h * 0.2
        whisker_hi = min(lat["p99_ms"], x1)
        out.append(line(sx(q1), box_mid, sx(whisker_hi), box_mid, stroke=INK))
        for end in (q1, whisker_hi):
            out.append(line(sx(end), box_mid - 4, sx(end), box_mid + 4, stroke=INK))
        if q25 is not None and q75 is not None:
            out.append(rect(sx(q25), box_mid - 6, max(1.0, sx(q75) - sx(q25)), 12, fill="#fff", stroke=INK,
                            title=f"25th–75th percentile: {q25:.3f}–{q75:.3f} ms"))
        low, high = lat["p50_ci95_ms"]
        out.append(rect(sx(low), box_mid - 8, max(1.5, sx(high) - sx(low)), 16, fill=color, opacity=0.45,
                        title=f"95 % interval of the median: {low:.3f}–{high:.3f} ms"))
        out.append(line(sx(lat["p50_ms"]), box_mid - 8, sx(lat["p50_ms"]), box_mid + 8, stroke=INK, width=2))
        if beyond:
            out.append(text(width - right - 2, box_mid + 4, f"{beyond} ›", anchor="end", fill=MUTED, size=10,
                            title=f"{beyond} iterations slower than {x1:.3f} ms (max {lat['max_ms']:.3f} ms)"))
        summary = f"p50 {lat['p50_ms']:.3f} · p99 {lat['p99_ms']:.3f} ms · cv {lat.get('cv', 0) * 100:.1f} %"
        count = f"n {lat.get('iterations', '?')}" + ("" if row.raw is not None else " · summary only")
        out.append(text(width - right + 12, y + row_h / 2, summary))
        out.append(text(width - right + 12, y + row_h / 2 + 15, count, fill=MUTED))
        if lat.get("unstable"):
            out.append(text(width - right + 12 + text_width(count) + 8, y + row_h / 2 + 15, "unstable",
                            fill=BAD_TEXT, weight="600"))
        if i:
            out.append(line(left, y, width - right, y, stroke=GRID))
    return "".join(out) + "</svg>"


def distribution_legend() -> str:
    return legend([(swatch(PALETTE[0], kind="pale"), "histogram of every timed iteration"),
                   (swatch(INK, kind="outline"), "25th–75th percentile"),
                   (swatch(INK, kind="line"), "whiskers: 1st–99th percentile"),
                   (swatch(PALETTE[0], kind="pale"), "median (black bar) and its 95 % interval")])


# ------------------------------------------------------------------------------- batch-size and input-size sweeps

# Margins (left, right, top, bottom) of the two sweep charts, which sit side by side in the page.
SWEEP_MARGINS = (70, 16, 30, 52)


def _no_sweep_data(out: list[str], width: int, height: int) -> str:
    out.append(text(width / 2, height / 2, "no sweep data", anchor="middle", fill=MUTED))
    return "".join(out) + "</svg>"


def _sweep_lines(series: Sequence[tuple[str, Sequence[dict[str, Any]]]], sx: Scale, sy: Scale, *,
                 x: Callable[[dict[str, Any]], float], y: Callable[[dict[str, Any]], float],
                 interval: Callable[[dict[str, Any]], tuple[float, float] | None],
                 tip: Callable[[str, dict[str, Any]], str], hollow: Callable[[dict[str, Any]], bool]) -> list[str]:
    """One line per stage through its points (filtered and sorted by the caller), each point a marker with its
    interval as a whisker and a tooltip. A stage's color and marker shape follow its place in ``series``, as in
    ``sweep_legend``, also when it has no point."""
    out = []
    for k, (name, pts) in enumerate(series):
        if not pts:
            continue
        color = PALETTE[k % len(PALETTE)]
        path = " ".join(f"{'M' if j == 0 else 'L'}{sx(x(p)):.1f},{sy(y(p)):.1f}" for j, p in enumerate(pts))
        out.append(f'<path d="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        for p in pts:
            px, py = sx(x(p)), sy(y(p))
            ci = interval(p)
            if ci is not None:
                out.append(line(px, sy(ci[0]), px, sy(ci[1]), stroke=color, width=1.3))
            out.append(marker(k, px, py, fill="#fff" if hollow(p) else color, stroke=color, r=4, title=tip(name, p)))
    return out


def sweep_chart(series: Sequence[tuple[str, Sequence[dict[str, Any]]]], *, metric: str,
                width: int = 540, height: int = 300) -> str:
    """p50 latency (``metric="p50_ms"``, with its 95 % interval) or throughput (``"samples_per_s"``)
    against batch size on a log2 axis, one line per stage. Unstable points are hollow."""
    left, right, top, bottom = SWEEP_MARGINS
    latency = metric == "p50_ms"
    title = "p50 latency per batch, ms" if latency else "throughput, samples/s"
    out = [svg_open(width, height, f"Batch-size sweep: {title}")]
    sizes = sorted({int(p["batch_size"]) for _, points in series for p in points if p.get("batch_size")})
    if not sizes:
        return _no_sweep_data(out, width, height)
    highs = [(p.get("p50_ci95_ms") or [p[metric]] * 2)[1] if latency else p[metric]
             for _, points in series for p in points if p.get(metric) is not None]
    y1 = (max(highs) if highs else 1.0) * 1.12 or 1.0
    if latency:
        # Batch latency spans orders of magnitude (batch 1 of the fastest stage to batch N of the slowest):
        # a log axis keeps the small figures readable.
        lows = [(p.get("p50_ci95_ms") or [p[metric]] * 2)[0] for _, points in series for p in points
                if p.get(metric) is not None and p[metric] > 0]
        y0 = (min(lows) if lows else y1 / 10) / 1.25
        sy = Scale(y0, y1, height - bottom, top, log=10)
        ticks = log_ticks(y0, y1)
        tick_text = [f"{t:g}" for t in ticks]
        title += " (log scale)"
    else:
        y0 = 0.0
        sy = Scale(0.0, y1, height - bottom, top)
        ticks, tick_text = nice_ticks(0.0, y1, 5), None
    lo_b, hi_b = sizes[0], sizes[-1]
    if lo_b == hi_b:
        lo_b, hi_b = lo_b / 2, hi_b * 2
    sx = Scale(lo_b / 1.3, hi_b * 1.3, left, width - right, log=2)
    out += axis_y(sy, ticks, left, width - right, title, tick_text=tick_text)
    out += axis_x(sx, sizes, height - bottom, top, "batch size (log scale)", tick_text=[str(s) for s in sizes])
    points = [(name, sorted((p for p in pts if p.get(metric) is not None and p.get("batch_size")),
                            key=lambda p: p["batch_size"])) for name, pts in series]

    def interval(p: dict[str, Any]) -> tuple[float, float] | None:
        ci = p.get("p50_ci95_ms") if latency else None
        return (ci[0], ci[1]) if ci and None not in ci else None

    def tip(name: str, p: dict[str, Any]) -> str:
        return (f"{name}, batch {p['batch_size']}: p50 {p.get('p50_ms', float('nan')):.3f} ms, "
                f"{p.get('samples_per_s', float('nan')):,.0f} samples/s" + (" (unstable)" if p.get("unstable") else ""))

    out += _sweep_lines(points, sx, sy, x=lambda p: p["batch_size"], y=lambda p: p[metric], interval=interval,
                        tip=tip, hollow=lambda p: bool(p.get("unstable")))
    return "".join(out) + "</svg>"


def sweep_legend(names: Sequence[str]) -> str:
    items = [(swatch(PALETTE[k % len(PALETTE)], kind="marker", shape=k), name) for k, name in enumerate(names)]
    items.append((swatch(INK, kind="point", hollow=True), "hollow: unstable figure"))
    return legend(items)


def shape_chart(series: Sequence[tuple[str, Sequence[dict[str, Any]]]], *, metric: str = "p50_ms",
                percent: bool = True, size_label: str = "input size", width: int = 540, height: int = 300) -> str:
    """p50 latency (``metric="p50_ms"``, with its 95 % interval) or accuracy (``"accuracy"``, with its interval)
    against input size, one line per stage, from ``evaluate.latency.shapes``. Both axes are linear from zero
    for latency, so the chart shows how cost grows with size. Unstable points are hollow."""
    left, right, top, bottom = SWEEP_MARGINS
    latency = metric == "p50_ms"
    title = "p50 latency, ms" if latency else ("accuracy, %" if percent else "accuracy")
    out = [svg_open(width, height, f"Latency against input size: {title}" if latency
                    else f"Accuracy against input size: {title}")]
    scale = 100.0 if percent and not latency else 1.0

    def value(p: dict[str, Any]) -> float | None:
        if latency:
            return p.get("p50_ms")
        acc = p.get("accuracy") or {}
        return None if acc.get("value") is None else acc["value"] * scale

    def interval(p: dict[str, Any]) -> tuple[float, float] | None:
        if latency:
            ci = p.get("p50_ci95_ms")
        else:
            acc = p.get("accuracy") or {}
            ci = acc.get("ci95") or acc.get("interval")
            ci = [c * scale for c in ci] if ci else None
        return (ci[0], ci[1]) if ci and None not in ci else None

    def tip(name: str, p: dict[str, Any]) -> str:
        tip = f"{name}, size {p['size']}: p50 {p['p50_ms']:.3f} ms" if p.get("p50_ms") is not None else \
            f"{name}, size {p['size']}"
        acc = (p.get("accuracy") or {}).get("value")
        tip += (f", accuracy {acc * scale:.2f}{' %' if percent else ''}" if acc is not None else "")
        return tip + (" (unstable)" if latency and p.get("unstable") else "")

    points = [(name, sorted((p for p in pts if value(p) is not None), key=lambda p: p["size"]))
              for name, pts in series]
    sizes = sorted({int(p["size"]) for _, pts in points for p in pts})
    if not sizes:
        return _no_sweep_data(out, width, height)
    highs = [(interval(p) or (value(p), value(p)))[1] for _, pts in points for p in pts]
    lows = [(interval(p) or (value(p), value(p)))[0] for _, pts in points for p in pts]
    if latency:
        y0, y1 = 0.0, max(highs) * 1.1 or 1.0
    else:
        y0, y1 = padded_domain(lows + highs, floor=0.0)
    sy = Scale(y0, y1, height - bottom, top)
    span = max(sizes[-1] - sizes[0], 1)
    sx = Scale(sizes[0] - span * 0.06, sizes[-1] + span * 0.06, left, width - right)
    out += axis_y(sy, nice_ticks(y0, y1, 5), left, width - right, title)
    out += axis_x(sx, sizes, height - bottom, top, size_label, tick_text=[str(s) for s in sizes])
    out += _sweep_lines(points, sx, sy, x=lambda p: p["size"], y=value, interval=interval, tip=tip,
                        hollow=lambda p: bool(latency and p.get("unstable")))
    return "".join(out) + "</svg>"


# ---------------------------------------------------------------------------------------- profile


def profile_op_types(profiles: Sequence[tuple[str, dict[str, Any]]], named: int = 7) -> list[str]:
    """The op types that get their own colour: the largest by total time over all stages."""
    totals: dict[str, float] = {}
    for _, profile in profiles:
        for entry in profile.get("by_op_type") or []:
            op = str(entry.get("op_type", "?"))
            totals[op] = totals.get(op, 0.0) + float(entry.get("ms") or 0.0)
    return sorted(totals, key=lambda k: -totals[k])[:named]


def profile_chart(profiles: Sequence[tuple[str, dict[str, Any]]], *, width: int = 1100) -> str:
    """Per stage, a bar split by the share of time each op type took. The same op type keeps its colour
    in every row; op types outside the largest few are pooled as "other"."""
    left, right, top, row_h = 132, 130, 8, 34
    height = top + row_h * len(profiles) + 8
    out = [svg_open(width, height, "Share of inference time by op type")]
    named = profile_op_types(profiles)
    colors = {op: PALETTE[i % len(PALETTE)] for i, op in enumerate(named)}
    span = width - left - right
    for r, (name, profile) in enumerate(profiles):
        y = top + r * row_h
        entries = profile.get("by_op_type") or []
        total_ms = sum(float(e.get("ms") or 0.0) for e in entries)
        shares: dict[str, float] = {}
        for e in entries:
            op = str(e.get("op_type", "?"))
            key = op if op in colors else "other"
            share = e.get("share")
            if share is None:
                share = float(e.get("ms") or 0.0) / total_ms if total_ms else 0.0
            shares[key] = shares.get(key, 0.0) + float(share)
        out.append(text(left - 10, y + row_h / 2 + 4, shorten(name, 18), anchor="end", title=name))
        x = float(left)
        for op in [*named, "other"]:
            share = shares.get(op, 0.0)
            if share <= 0:
                continue
            w = share * span
            color = colors.get(op, OTHER)
            out.append(rect(x, y + 5, w, row_h - 10, fill=color, title=f"{name}: {op} {share * 100:.1f} %"))
            caption = f"{op} {share * 100:.0f}%"
            if text_width(caption, 10) + 6 < w:
                out.append(text(x + w / 2, y + row_h / 2 + 4, caption, anchor="middle", size=10,
                                fill=_contrast_text(color)))
            elif text_width(f"{share * 100:.0f}%", 10) + 4 < w:
                out.append(text(x + w / 2, y + row_h / 2 + 4, f"{share * 100:.0f}%", anchor="middle", size=10,
                                fill=_contrast_text(color)))
            x += w
        out.append(text(width - right + 10, y + row_h / 2 + 4, f"{total_ms:.3f} ms", fill=MUTED))
    return "".join(out) + "</svg>"


def profile_legend(profiles: Sequence[tuple[str, dict[str, Any]]]) -> str:
    named = profile_op_types(profiles)
    items = [(swatch(PALETTE[i % len(PALETTE)]), op) for i, op in enumerate(named)]
    items.append((swatch(OTHER), "other"))
    return legend(items)



# ---------------------------------------------------------------------------------- latency table


def latency_table_chart(table: dict[str, dict[str, Any]], *, width: int = 1100, height: int = 340) -> str:
    """Measured block latency against kept width (as a fraction of the block's full width), one line per
    pruning group, with the width the allocator chose drawn as a large filled marker."""
    left, right, top, bottom = 70, 16, 30, 52
    out = [svg_open(width, height, "Latency table: block latency against kept width, chosen widths marked")]
    groups = [(name, g) for name, g in table.items() if g.get("widths") and g.get("ms")]
    if not groups:
        out.append(text(width / 2, height / 2, "no latency table", anchor="middle", fill=MUTED))
        return "".join(out) + "</svg>"
    fractions = [w / g["channels"] for _, g in groups for w in g["widths"]]
    times = [ms for _, g in groups for ms in g["ms"]]
    x0 = min(fractions) - 0.05
    sx = Scale(x0, 1.05, left, width - right)
    y1 = max(times) * 1.1 or 1.0
    sy = Scale(0.0, y1, height - bottom, top)
    out += axis_y(sy, nice_ticks(0.0, y1, 5), left, width - right, "block latency, ms")
    out += axis_x(sx, nice_ticks(max(0.0, x0), 1.0, 5), height - bottom, top, "kept width (fraction of the block's channels)")
    for k, (name, g) in enumerate(groups):
        color = PALETTE[k % len(PALETTE)]
        pts = [(w / g["channels"], ms) for w, ms in zip(g["widths"], g["ms"])]
        path = " ".join(f"{'M' if j == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for j, (x, y) in enumerate(pts))
        out.append(f'<path d="{path}" fill="none" stroke="{color}" stroke-width="1.5" opacity="0.8"/>')
        for w, (x, y) in zip(g["widths"], pts):
            chosen = w == g.get("chosen")
            tip = f"{name} ({g.get('block', '')}): {w} of {g['channels']} channels, {y:.4f} ms" + (" (chosen)" if chosen else "")
            out.append(marker(k, sx(x), sy(y), fill=color if chosen else "#fff", stroke=color, r=6 if chosen else 3,
                              title=tip))
    return "".join(out) + "</svg>"
