"""A small, dependency-free SVG line plot: a sweep's perplexity against sparsity (log y axis, the dense model's
perplexity as a dashed line). Every text is escaped; the file is a standalone image."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape

W, H = 640, 400
LEFT, RIGHT, TOP, BOTTOM = 64, 24, 32, 48


@dataclass(frozen=True)
class Point:
    x: float  # achieved sparsity, in [0, 1]
    y: float  # perplexity (> 0)
    label: str  # "0.5", "2:4"
    joined: bool = True  # part of the line (unstructured ratios); N:M patterns are labelled points of their own
    marked: bool = False  # exported: drawn filled


def _ticks(lo: float, hi: float) -> list[float]:
    """Powers of ten and their 2x/5x multiples inside [lo, hi] (a log axis), at least the two ends."""
    out = []
    for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
        for m in (1, 2, 5):
            v = m * 10.0**e
            if lo <= v <= hi:
                out.append(v)
    if len(out) > 8:
        out = [v for v in out if math.isclose(math.log10(v) % 1, 0, abs_tol=1e-9)] or out
    return out or [lo, hi]


def _num(v: float) -> str:
    return f"{v:.3g}" if v < 1000 else f"{v:,.0f}"


def perplexity_plot(points: Sequence[Point], dense: float | None = None, title: str = "") -> str:
    """The SVG text. Points without a finite positive y are left out (a model whose perplexity overflowed)."""
    pts = [p for p in points if math.isfinite(p.y) and p.y > 0 and math.isfinite(p.x)]
    ys = [p.y for p in pts] + ([dense] if dense is not None and math.isfinite(dense) and dense > 0 else [])
    lo, hi = (min(ys), max(ys)) if ys else (1.0, 10.0)
    if hi / lo < 10:  # at least a decade shown, centred on the data
        mid = math.sqrt(hi * lo)
        lo, hi = mid / math.sqrt(10), mid * math.sqrt(10)
    ly0, ly1 = math.log10(lo) - 0.05, math.log10(hi) + 0.05
    iw, ih = W - LEFT - RIGHT, H - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + iw * x

    def py(y: float) -> float:
        return TOP + ih * (1 - (math.log10(y) - ly0) / (ly1 - ly0))

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" '
        'font-family="sans-serif" font-size="12">',
        f"<title>{escape(title or 'Perplexity against sparsity')}</title>",
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="14">'
        f"{escape(title or 'Perplexity against sparsity')}</text>",
    ]
    for t in (0, 0.25, 0.5, 0.75, 1):  # x grid
        out.append(f'<line x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{TOP}" y2="{TOP + ih}" stroke="#ddd"/>')
        out.append(f'<text x="{px(t):.1f}" y="{TOP + ih + 16}" text-anchor="middle">{t * 100:g} %</text>')
    for v in _ticks(lo, hi):  # y grid (log)
        out.append(f'<line x1="{LEFT}" x2="{LEFT + iw}" y1="{py(v):.1f}" y2="{py(v):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{LEFT - 6}" y="{py(v) + 4:.1f}" text-anchor="end">{_num(v)}</text>')
    out.append(f'<text x="{LEFT + iw / 2}" y="{H - 8}" text-anchor="middle">achieved sparsity</text>')
    out.append(
        f'<text x="14" y="{TOP + ih / 2}" text-anchor="middle" transform="rotate(-90 14 {TOP + ih / 2})">'
        "perplexity (log scale)</text>"
    )
    if dense is not None and math.isfinite(dense) and dense > 0:
        out.append(
            f'<line class="dense" x1="{LEFT}" x2="{LEFT + iw}" y1="{py(dense):.1f}" y2="{py(dense):.1f}" '
            'stroke="#888" stroke-dasharray="6 4"/>'
        )
        out.append(
            f'<text x="{LEFT + iw - 4}" y="{py(dense) - 5:.1f}" text-anchor="end" fill="#555">dense {_num(dense)}</text>'
        )
    line = sorted((p for p in pts if p.joined), key=lambda p: p.x)
    if len(line) > 1:
        coords = " ".join(f"{px(p.x):.1f},{py(p.y):.1f}" for p in line)
        out.append(f'<polyline class="curve" points="{coords}" fill="none" stroke="#1f6feb" stroke-width="2"/>')
    for p in pts:
        colour = "#1f6feb" if p.joined else "#d4562b"
        fill = colour if p.marked else "white"
        out.append(
            f'<circle class="point" cx="{px(p.x):.1f}" cy="{py(p.y):.1f}" r="4.5" fill="{fill}" stroke="{colour}" '
            f'stroke-width="2"><title>{escape(p.label)}: perplexity {_num(p.y)}</title></circle>'
        )
        if not p.joined:
            out.append(f'<text x="{px(p.x) + 8:.1f}" y="{py(p.y) + 4:.1f}" fill="{colour}">{escape(p.label)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
