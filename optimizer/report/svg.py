"""Small SVG building blocks for the report's charts: scales, ticks, escaped text, label placement.

Charts are drawn in Python as inline SVG so that report.html stays one self-contained file that opens
offline, with no JavaScript and nothing fetched from the network.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

# Okabe-Ito: distinguishable under the common forms of colour blindness. Yellow goes last because it has
# too little contrast on white for thin lines.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#000000", "#F0E442")
GOOD = "#0072B2"     # an improvement (blue)
BAD = "#D55E00"      # a regression (vermillion): blue and vermillion stay apart for every kind of colour vision
BAD_TEXT = "#B04A00"  # vermillion darkened to 5.5:1 on white, for text
NEUTRAL = "#8a8a8a"
INK = "#222222"
MUTED = "#5f5f5f"    # 6.1:1 on white, enough for small text
GRID = "#e4e4e4"
OTHER = "#bdbdbd"    # the "other" share in stacked bars

FONT_SIZE = 11
# Average advance width of the sans-serif faces browsers pick, as a share of the font size. Used to keep
# labels apart without measuring text in a browser; errs wide so estimates overlap less, not more.
CHAR_WIDTH = 0.62


def esc(value: object) -> str:
    """Escape text for HTML and for SVG inside HTML (quotes too, so it is safe inside attributes)."""
    return html.escape(str(value), quote=True)


def text_width(text: str, size: float = FONT_SIZE) -> float:
    return len(text) * size * CHAR_WIDTH


def shorten(text: str, max_chars: int) -> str:
    """Cut a label that would not fit; the full text stays available in a <title> tooltip."""
    if len(text) <= max_chars:
        return text
    return text[: max(1, max_chars - 1)] + "…"


def fmt(value: float, digits: int = 3) -> str:
    """A number with about ``digits`` significant digits, without exponent notation for ordinary sizes."""
    if value == 0 or not math.isfinite(value):
        return "0" if value == 0 else str(value)
    magnitude = math.floor(math.log10(abs(value)))
    decimals = max(0, digits - 1 - magnitude)
    return f"{value:,.{decimals}f}"


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5, 5 × 10^k) covering [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return [low]
    raw = (high - low) / max(1, count)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.ceil(low / step - 1e-9) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    return ticks


def padded_domain(values: Iterable[float], *, pad: float = 0.08, floor: float | None = None,
                  min_span: float = 0.0) -> tuple[float, float]:
    """The range of ``values`` widened by ``pad`` on each side; never empty, never below ``floor``, and
    at least ``min_span`` wide so that equal values do not blow tiny noise up to the full height."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return (0.0, 1.0)
    low, high = min(finite), max(finite)
    if high - low < min_span:
        middle = (low + high) / 2
        low, high = middle - min_span / 2, middle + min_span / 2
    span = high - low
    if span == 0:
        span = abs(high) * 0.1 or 1.0
    low, high = low - span * pad, high + span * pad
    if floor is not None:
        low = max(floor, low)
    return low, high


def log_ticks(low: float, high: float) -> list[float]:
    """Ticks for a logarithmic axis: 1-2-5 steps per decade, or finer when the range is under a decade."""
    if low <= 0 or high <= low:
        return [high]
    for mantissas in ((1,), (1, 2, 5), (1, 1.5, 2, 3, 5, 7), (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9)):
        ticks = []
        for exponent in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1):
            ticks += [m * 10 ** exponent for m in mantissas if low <= m * 10 ** exponent <= high]
        if len(ticks) >= 4:
            return [round(t, 12) for t in ticks]
    return [round(t, 12) for t in ticks] or [low, high]


@dataclass(frozen=True)
class Scale:
    """Maps a data interval onto a pixel interval: linear, or logarithmic (base 2 for batch sizes,
    base 10 for latencies that differ by multiples)."""

    d0: float
    d1: float
    r0: float
    r1: float
    log: int = 0        # 0: linear; else the base (only for labels: positions do not depend on it)

    def __call__(self, value: float) -> float:
        d0, d1, v = self.d0, self.d1, value
        if self.log:
            d0, d1, v = math.log(d0), math.log(d1), math.log(max(value, 1e-12))
        if d1 == d0:
            return (self.r0 + self.r1) / 2
        return self.r0 + (v - d0) / (d1 - d0) * (self.r1 - self.r0)


@dataclass(frozen=True)
class Box:
    x: float
    y: float
    w: float
    h: float

    def overlaps(self, other: "Box", margin: float = 1.0) -> float:
        """Overlapping area (0 when apart), with a small margin so labels do not touch."""
        dx = min(self.x + self.w, other.x + other.w) - max(self.x, other.x) + margin
        dy = min(self.y + self.h, other.y + other.h) - max(self.y, other.y) + margin
        return dx * dy if dx > 0 and dy > 0 else 0.0

    def outside(self, bounds: "Box") -> float:
        """How far (in pixels, summed) the box sticks out of ``bounds``."""
        return (max(0.0, bounds.x - self.x) + max(0.0, self.x + self.w - bounds.x - bounds.w)
                + max(0.0, bounds.y - self.y) + max(0.0, self.y + self.h - bounds.y - bounds.h))


def place_labels(anchors: Sequence[tuple[float, float]], labels: Sequence[str], bounds: Box,
                 obstacles: Sequence[Box] = (), size: float = FONT_SIZE) -> list[tuple[float, float, str]]:
    """Greedy placement of point labels: for each point, the first of a few positions around it that
    overlaps nothing placed so far; failing that, the position with the least overlap.

    Returns (x, y, text-anchor) per label, y being the text baseline. Points are handled left to right so
    that crowded clusters resolve the same way every time.
    """
    gap = 9.0
    height = size * 1.15
    placed: list[Box] = list(obstacles)
    result: list[tuple[float, float, str]] = [(0.0, 0.0, "start")] * len(anchors)
    order = sorted(range(len(anchors)), key=lambda i: (anchors[i][0], anchors[i][1]))
    for i in order:
        x, y = anchors[i]
        w = text_width(labels[i], size)
        # (box left, box top, text x, text anchor): right, left, above, below, then the four diagonals,
        # then further out above and below for dense clusters.
        candidates = [
            (x + gap, y - height / 2, x + gap, "start"),
            (x - gap - w, y - height / 2, x - gap, "end"),
            (x - w / 2, y - gap - height, x, "middle"),
            (x - w / 2, y + gap, x, "middle"),
            (x + gap * 0.7, y - gap * 0.7 - height, x + gap * 0.7, "start"),
            (x + gap * 0.7, y + gap * 0.7, x + gap * 0.7, "start"),
            (x - gap * 0.7 - w, y - gap * 0.7 - height, x - gap * 0.7, "end"),
            (x - gap * 0.7 - w, y + gap * 0.7, x - gap * 0.7, "end"),
            (x - w / 2, y - 2.4 * gap - height, x, "middle"),
            (x - w / 2, y + 2.4 * gap, x, "middle"),
            (x + gap, y - 2.4 * gap - height, x + gap, "start"),
            (x + gap, y + 2.4 * gap, x + gap, "start"),
        ]
        best: tuple[float, Box, tuple[float, float, str]] | None = None
        for left, top, tx, anchor in candidates:
            box = Box(left, top, w, height)
            cost = sum(box.overlaps(other) for other in placed) + 50 * box.outside(bounds)
            if best is None or cost < best[0]:
                best = (cost, box, (tx, top + height * 0.8, anchor))
            if cost == 0:
                break
        assert best is not None
        placed.append(best[1])
        result[i] = best[2]
    return result


def svg_open(width: float, height: float, label: str) -> str:
    # role/aria-label: screen readers announce the chart's purpose instead of reading out tick labels.
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width:.0f} {height:.0f}" '
            f'width="{width:.0f}" height="{height:.0f}" role="img" aria-label="{esc(label)}" '
            f'font-family="system-ui,-apple-system,Segoe UI,Roboto,sans-serif" font-size="{FONT_SIZE}">'
            f"<title>{esc(label)}</title>")


def text(x: float, y: float, content: str, *, anchor: str = "start", size: float | None = None,
         fill: str = INK, weight: str | None = None, rotate: float | None = None, title: str | None = None) -> str:
    attrs = f'x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" fill="{fill}"'
    if size is not None:
        attrs += f' font-size="{size}"'
    if weight:
        attrs += f' font-weight="{weight}"'
    if rotate is not None:
        attrs += f' transform="rotate({rotate:.0f} {x:.1f} {y:.1f})"'
    inner = esc(content) + (f"<title>{esc(title)}</title>" if title else "")
    return f"<text {attrs}>{inner}</text>"


def line(x1: float, y1: float, x2: float, y2: float, *, stroke: str = INK, width: float = 1.0,
         dash: str | None = None, opacity: float | None = None) -> str:
    extra = f' stroke-dasharray="{dash}"' if dash else ""
    extra += f' stroke-opacity="{opacity}"' if opacity is not None else ""
    return (f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{stroke}" '
            f'stroke-width="{width}"{extra}/>')


def rect(x: float, y: float, w: float, h: float, *, fill: str, opacity: float | None = None,
         stroke: str | None = None, title: str | None = None) -> str:
    if h < 0:
        y, h = y + h, -h
    if w < 0:
        x, w = x + w, -w
    extra = f' fill-opacity="{opacity}"' if opacity is not None else ""
    extra += f' stroke="{stroke}"' if stroke else ""
    inner = f"<title>{esc(title)}</title>" if title else ""
    return f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" fill="{fill}"{extra}>{inner}</rect>'


def marker(shape: int, x: float, y: float, *, fill: str, stroke: str, r: float = 4.5, title: str | None = None) -> str:
    """One of four marker shapes, so series differ by more than colour."""
    inner = f"<title>{esc(title)}</title>" if title else ""
    style = f'fill="{fill}" stroke="{stroke}" stroke-width="1.5"'
    kind = shape % 4
    if kind == 0:
        return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}" {style}>{inner}</circle>'
    if kind == 1:
        return f'<rect x="{x - r:.1f}" y="{y - r:.1f}" width="{2 * r}" height="{2 * r}" {style}>{inner}</rect>'
    if kind == 2:
        points = f"{x:.1f},{y - r * 1.2:.1f} {x + r * 1.1:.1f},{y + r * 0.8:.1f} {x - r * 1.1:.1f},{y + r * 0.8:.1f}"
        return f'<polygon points="{points}" {style}>{inner}</polygon>'
    points = f"{x:.1f},{y - r * 1.2:.1f} {x + r * 1.2:.1f},{y:.1f} {x:.1f},{y + r * 1.2:.1f} {x - r * 1.2:.1f},{y:.1f}"
    return f'<polygon points="{points}" {style}>{inner}</polygon>'


def axis_x(scale: Scale, ticks: Sequence[float], y: float, top: float, label: str, *,
           tick_text: Sequence[str] | None = None) -> list[str]:
    """Bottom axis with vertical grid lines up to ``top``."""
    parts = [line(scale.r0, y, scale.r1, y, stroke=MUTED)]
    for i, tick in enumerate(ticks):
        px = scale(tick)
        parts.append(line(px, top, px, y, stroke=GRID))
        parts.append(line(px, y, px, y + 4, stroke=MUTED))
        parts.append(text(px, y + 16, tick_text[i] if tick_text else fmt(tick), anchor="middle", fill=MUTED))
    parts.append(text((scale.r0 + scale.r1) / 2, y + 32, label, anchor="middle"))
    return parts


def axis_y(scale: Scale, ticks: Sequence[float], x: float, right: float, label: str, *,
           tick_text: Sequence[str] | None = None) -> list[str]:
    """Left axis with horizontal grid lines across to ``right``; the label sits above the axis, read
    horizontally, rather than rotated along it."""
    parts = [line(x, scale.r0, x, scale.r1, stroke=MUTED)]
    for i, tick in enumerate(ticks):
        py = scale(tick)
        parts.append(line(x, py, right, py, stroke=GRID))
        parts.append(line(x - 4, py, x, py, stroke=MUTED))
        parts.append(text(x - 6, py + 4, tick_text[i] if tick_text else fmt(tick), anchor="end", fill=MUTED))
    parts.append(text(4, min(scale.r0, scale.r1) - 10, label, anchor="start"))
    return parts
