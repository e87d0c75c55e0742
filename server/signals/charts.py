"""Inline SVG charts for the dashboard: no JavaScript, no external assets, no fonts to fetch.

Each chart is one `<svg role="img">` with a `<title>`; every data mark (`<circle>`, `<rect>`)
carries its numbers in `data-*` attributes, so a reader's tools (and the browser test) can
check what is drawn against what the API returns. All text is escaped here.

A chart is drawn only when it compares something: a bar chart needs at least `MIN_BARS` bars
(callers show a single value as text instead), and an interval chart at least `MIN_BARS` cells
with a value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

WIDTH, HEIGHT = 320, 240  # calibration and bar charts
MARGIN = 36  # room for axis labels
ROW_HEIGHT = 18  # interval charts: one row per table cell
LABEL_WIDTH = 150
INTERVAL_WIDTH = 460
POINT_RADIUS = 4
MAX_POINT_RADIUS = 9
TICKS = 5
MIN_BARS = 2
"""Fewest values a bar or interval chart compares: with fewer, show the value as text."""
HIDDEN_TEXT = "too few to show"
"""What an interval chart writes in place of a cell without a value (callers say why, e.g. the threshold)."""


@dataclass(frozen=True)
class CalibrationPoint:
    """One calibration bin: mean predicted probability, observed rate, and its weight."""

    predicted: float
    observed: float
    count: float = 1.0


@dataclass(frozen=True)
class Interval:
    """One estimate with its 95% interval; `value` None means the cell is hidden (too few records)."""

    label: str
    value: float | None
    low: float | None = None
    high: float | None = None


def _num(value: float) -> str:
    return f"{value:.4g}"


def _svg(width: int, height: int, title: str, body: list[str], kind: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" role="img" class="chart" data-chart="{escape(kind)}" '
            f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" aria-label="{escape(title)}">'
            f"<title>{escape(title)}</title>{''.join(body)}</svg>")


def _unit_axes(x_label: str, y_label: str) -> list[str]:
    """Axes and ticks for [0, 1] x [0, 1] in a WIDTH x HEIGHT box."""
    x0, y0, x1, y1 = MARGIN, HEIGHT - MARGIN, WIDTH - 8, 8
    parts = [f'<line class="axis" x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}"/>',
             f'<line class="axis" x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}"/>']
    for i in range(TICKS + 1):
        t = i / TICKS
        x, y = x0 + t * (x1 - x0), y0 - t * (y0 - y1)
        parts.append(f'<text class="tick" x="{x:.1f}" y="{y0 + 14}" text-anchor="middle">{t:.1f}</text>')
        parts.append(f'<text class="tick" x="{x0 - 4}" y="{y + 4:.1f}" text-anchor="end">{t:.1f}</text>')
    parts.append(f'<text class="axis-label" x="{(x0 + x1) / 2:.0f}" y="{HEIGHT - 4}" '
                 f'text-anchor="middle">{escape(x_label)}</text>')
    parts.append(f'<text class="axis-label" x="10" y="{(y0 + y1) / 2:.0f}" text-anchor="middle" '
                 f'transform="rotate(-90 10 {(y0 + y1) / 2:.0f})">{escape(y_label)}</text>')
    return parts


def calibration_chart(points: Sequence[CalibrationPoint], title: str = "Calibration") -> str:
    """Observed rate against mean predicted probability per bin; the diagonal is perfect calibration.
    Circle area grows with the bin's weight."""
    x0, y0, x1, y1 = MARGIN, HEIGHT - MARGIN, WIDTH - 8, 8
    body = _unit_axes("predicted probability", "observed rate")
    body.append(f'<line class="reference" x1="{x0}" y1="{y0}" x2="{x1}" y2="{y1}"/>')
    heaviest = max((p.count for p in points), default=1.0) or 1.0
    for p in points:
        if not (math.isfinite(p.predicted) and math.isfinite(p.observed)):
            continue
        px, py = min(max(p.predicted, 0.0), 1.0), min(max(p.observed, 0.0), 1.0)
        r = POINT_RADIUS + (MAX_POINT_RADIUS - POINT_RADIUS) * math.sqrt(max(p.count, 0.0) / heaviest)
        body.append(f'<circle class="mark" cx="{x0 + px * (x1 - x0):.1f}" cy="{y0 - py * (y0 - y1):.1f}" '
                    f'r="{r:.1f}" data-predicted="{_num(p.predicted)}" data-observed="{_num(p.observed)}" '
                    f'data-count="{_num(p.count)}"><title>predicted {p.predicted:.3f}, observed '
                    f"{p.observed:.3f} ({p.count:,.0f})</title></circle>")
    return _svg(WIDTH, HEIGHT, title, body, "calibration")


def bar_chart(bars: Sequence[tuple[str, float]], title: str, *, low: float = 0.0, high: float = 1.0,
              reference: float | None = None) -> str:
    """Vertical bars on [low, high] (e.g. AUC per release, with 0.5 as the reference line). Only for
    `MIN_BARS` or more bars: a single bar compares nothing (ValueError)."""
    if len(bars) < MIN_BARS:
        raise ValueError(f"a bar chart compares at least {MIN_BARS} values; show {len(bars)} as text")
    x0, y0, x1, y1 = MARGIN, HEIGHT - MARGIN, WIDTH - 8, 8
    span = (high - low) or 1.0
    body = [f'<line class="axis" x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}"/>',
            f'<line class="axis" x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}"/>']
    for i in range(TICKS + 1):
        v = low + span * i / TICKS
        y = y0 - (y0 - y1) * i / TICKS
        body.append(f'<text class="tick" x="{x0 - 4}" y="{y + 4:.1f}" text-anchor="end">{v:.2g}</text>')
    if reference is not None:
        y = y0 - (y0 - y1) * (reference - low) / span
        body.append(f'<line class="reference" x1="{x0}" y1="{y:.1f}" x2="{x1}" y2="{y:.1f}"/>')
    slot = (x1 - x0) / max(len(bars), 1)
    for i, (label, value) in enumerate(bars):
        if not math.isfinite(value):
            continue
        frac = min(max((value - low) / span, 0.0), 1.0)
        x, h = x0 + i * slot + slot * 0.15, (y0 - y1) * frac
        body.append(f'<rect class="mark" x="{x:.1f}" y="{y0 - h:.1f}" width="{slot * 0.7:.1f}" height="{h:.1f}" '
                    f'data-label="{escape(label)}" data-value="{_num(value)}"><title>{escape(label)}: '
                    f"{value:.3f}</title></rect>")
        body.append(f'<text class="tick" x="{x + slot * 0.35:.1f}" y="{y0 + 14}" text-anchor="middle">'
                    f"{escape(label[:14])}</text>")
    return _svg(WIDTH, HEIGHT, title, body, "bars")


def interval_chart(rows: Sequence[Interval], title: str, *, hidden_text: str = HIDDEN_TEXT) -> str:
    """One row per cell: the estimate as a dot, its 95% interval as a bar; a cell without a value
    says `hidden_text` in its place (class "suppressed", as the stylesheet and tests know it)."""
    finite = [v for r in rows for v in (r.value, r.low, r.high) if v is not None and math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 1.0, hi + 1.0
    x0, x1 = LABEL_WIDTH, INTERVAL_WIDTH - 12
    height = ROW_HEIGHT * len(rows) + 2 * ROW_HEIGHT

    def x(v: float) -> float:
        return x0 + (x1 - x0) * (v - lo) / (hi - lo)

    body = [f'<line class="axis" x1="{x0}" y1="{height - ROW_HEIGHT}" x2="{x1}" y2="{height - ROW_HEIGHT}"/>',
            f'<text class="tick" x="{x0}" y="{height - 4}" text-anchor="start">{_num(lo)}</text>',
            f'<text class="tick" x="{x1}" y="{height - 4}" text-anchor="end">{_num(hi)}</text>']
    for i, r in enumerate(rows):
        y = ROW_HEIGHT * (i + 0.5) + 4
        body.append(f'<text class="tick" x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end">{escape(r.label[:24])}</text>')
        if r.value is None or not math.isfinite(r.value):
            body.append(f'<text class="suppressed" x="{x0 + 4}" y="{y + 4:.1f}" data-label="{escape(r.label)}">'
                        f"{escape(hidden_text)}</text>")
            continue
        low = r.low if r.low is not None and math.isfinite(r.low) else r.value
        high = r.high if r.high is not None and math.isfinite(r.high) else r.value
        body.append(f'<rect class="interval" x="{x(low):.1f}" y="{y - 2:.1f}" width="{max(x(high) - x(low), 1):.1f}" '
                    f'height="4" data-label="{escape(r.label)}" data-low="{_num(low)}" data-high="{_num(high)}"/>')
        body.append(f'<circle class="mark" cx="{x(r.value):.1f}" cy="{y:.1f}" r="{POINT_RADIUS}" '
                    f'data-label="{escape(r.label)}" data-value="{_num(r.value)}" data-low="{_num(low)}" '
                    f'data-high="{_num(high)}"><title>{escape(r.label)}: {_num(r.value)} '
                    f"(95% interval {_num(low)} to {_num(high)})</title></circle>")
    return _svg(INTERVAL_WIDTH, height, title, body, "intervals")
