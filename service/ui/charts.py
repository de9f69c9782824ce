"""Inline SVG line charts for the job page (no JavaScript, no external assets).

``line_chart`` draws one or more series of ``(x, y)`` points on shared axes; the page embeds the
returned markup as is. Values are escaped; non-finite points are dropped.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2")


@dataclass(frozen=True)
class Chart:
    title: str
    svg: str
    points: int  # how many points were drawn, all series together


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if hi <= lo:
        return [lo]
    return [lo + (hi - lo) * i / n for i in range(n + 1)]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 0.01:
        return f"{v:.2g}"
    return f"{v:.3g}"


def line_chart(
    title: str,
    series: Mapping[str, Sequence[tuple[float, float]]],
    *,
    width: int = 420,
    height: int = 220,
) -> Chart:
    """An SVG chart with one polyline per series (a legend when there are several)."""
    clean = {
        name: [(float(x), float(y)) for x, y in pts if math.isfinite(float(x)) and math.isfinite(float(y))]
        for name, pts in series.items()
    }
    clean = {k: v for k, v in clean.items() if v}
    left, right, top, bottom = 48, 12, 24, 30
    pw, ph = width - left - right, height - top - bottom
    esc = html.escape
    parts = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{esc(title)}">',
        f'<text x="{left}" y="15" class="chart-title">{esc(title)}</text>',
    ]
    total = sum(len(v) for v in clean.values())
    if not clean:
        parts.append(f'<text x="{left}" y="{top + ph / 2:.0f}" class="chart-empty">no data</text></svg>')
        return Chart(title, "".join(parts), 0)
    xs = [x for pts in clean.values() for x, _ in pts]
    ys = [y for pts in clean.values() for _, y in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        pad = abs(y0) * 0.1 or 1.0
        y0, y1 = y0 - pad, y1 + pad
    else:
        pad = (y1 - y0) * 0.05
        y0, y1 = y0 - pad, y1 + pad

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * ph

    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="chart-frame"/>')
    for t in _ticks(y0, y1):
        parts.append(
            f'<line x1="{left}" x2="{left + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" class="chart-grid"/>'
            f'<text x="{left - 4}" y="{sy(t) + 4:.1f}" class="chart-tick" text-anchor="end">{_fmt(t)}</text>'
        )
    for t in _ticks(x0, x1):
        parts.append(
            f'<text x="{sx(t):.1f}" y="{top + ph + 14}" class="chart-tick" text-anchor="middle">'
            f"{_fmt(t)}</text>"
        )
    parts.append(f'<text x="{left + pw}" y="{height - 2}" class="chart-tick" text-anchor="end">step</text>')
    for i, (name, pts) in enumerate(clean.items()):
        color = PALETTE[i % len(PALETTE)]
        d = " ".join(f"{'M' if j == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for j, (x, y) in enumerate(pts))
        parts.append(
            f'<path class="series" data-series="{esc(name)}" data-points="{len(pts)}" d="{d}" '
            f'fill="none" stroke="{color}" stroke-width="2"/>'
        )
        if len(pts) == 1:
            parts.append(f'<circle cx="{sx(pts[0][0]):.1f}" cy="{sy(pts[0][1]):.1f}" r="3" fill="{color}"/>')
        if len(clean) > 1:
            ly = top + 12 + i * 14
            parts.append(
                f'<line x1="{left + pw - 110}" x2="{left + pw - 96}" y1="{ly - 4}" y2="{ly - 4}" '
                f'stroke="{color}" stroke-width="2"/>'
                f'<text x="{left + pw - 92}" y="{ly}" class="chart-tick">{esc(name)}</text>'
            )
    parts.append("</svg>")
    return Chart(title, "".join(parts), total)
