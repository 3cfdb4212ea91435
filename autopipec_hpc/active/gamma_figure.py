"""The selection's one figure, ``gamma.svg``: a row of max-gamma counts per config_type.

Written as SVG by hand rather than with matplotlib: importing matplotlib and drawing one
figure cost about 0.8 s, a third of a 700-candidate ``select`` and most of what kept it
slower than pacemaker's ``pace_select``. The figure is a table of coloured cells (a
config_type per row, a shared log-spaced gamma bin per column, the count written in each
non-empty cell) with the thresholds as vertical lines; a browser or any image viewer
shows it.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from pathlib import Path

import numpy as np

from autopipec_hpc.files import atomic_write_text

BINS = 30
# viridis at 0, 1/4, 1/2, 3/4, 1: the cells' colour ramp (few to many candidates)
_RAMP = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], dtype=float)
_LEFT, _CELL_W, _ROW_H, _TOP, _BOTTOM = 300, 14, 18, 40, 52


def _colour(fraction: float) -> str:
    position = min(max(fraction, 0.0), 1.0) * (len(_RAMP) - 1)
    low = int(np.floor(position))
    high = min(low + 1, len(_RAMP) - 1)
    rgb = _RAMP[low] + (position - low) * (_RAMP[high] - _RAMP[low])
    return "#" + "".join(f"{int(round(c)):02x}" for c in rgb)


def write_gamma_figure(
    path: Path,
    rows: Sequence[tuple[str, np.ndarray]],
    title: str,
    thresholds: Sequence[tuple[float, str]],
) -> bool:
    """Write the figure of ``rows`` (label, max gamma of each candidate) to ``path``;
    ``thresholds`` are (gamma, name) drawn as vertical lines. False (nothing written)
    where no row has a candidate."""
    rows = [(label, np.asarray(g, dtype=float)) for label, g in rows if len(g)]
    if not rows:
        return False
    every = np.concatenate([g for _, g in rows])
    lo, hi = np.log10(max(every.min(), 1e-3)), np.log10(max(every.max(), 1e-2) * 1.01)
    edges = np.linspace(lo, hi, BINS + 1)
    counts = np.array([np.histogram(np.log10(np.maximum(g, 1e-3)), bins=edges)[0] for _, g in rows])
    most = max(int(counts.max()), 1)
    width = _LEFT + BINS * _CELL_W + 20
    height = _TOP + len(rows) * _ROW_H + _BOTTOM

    def x_of(log_gamma: float) -> float:
        return _LEFT + (log_gamma - lo) / (hi - lo) * BINS * _CELL_W

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2:.0f}" y="22" text-anchor="middle" font-size="13">{escape(title)}</text>']
    for i, (label, _) in enumerate(rows):
        y = _TOP + i * _ROW_H
        out.append(f'<text x="{_LEFT - 6}" y="{y + 13}" text-anchor="end">{escape(label)}</text>')
        for j, n in enumerate(counts[i]):
            if n:
                x = _LEFT + j * _CELL_W
                fill = _colour(np.log1p(n) / np.log1p(most))
                ink = "black" if np.log1p(n) / np.log1p(most) > 0.6 else "white"
                out.append(f'<rect x="{x}" y="{y}" width="{_CELL_W}" height="{_ROW_H - 1}" fill="{fill}">'
                           f'<title>{int(n)}</title></rect>')
                out.append(f'<text x="{x + _CELL_W / 2}" y="{y + 12}" text-anchor="middle" font-size="7" '
                           f'fill="{ink}">{int(n)}</text>')
    axis_y = _TOP + len(rows) * _ROW_H + 2
    out.append(f'<line x1="{_LEFT}" y1="{axis_y}" x2="{_LEFT + BINS * _CELL_W}" y2="{axis_y}" stroke="black"/>')
    for decade in np.arange(np.ceil(lo), np.floor(hi) + 1):
        x = x_of(decade)
        out.append(f'<line x1="{x:.1f}" y1="{axis_y}" x2="{x:.1f}" y2="{axis_y + 4}" stroke="black"/>')
        out.append(f'<text x="{x:.1f}" y="{axis_y + 15}" text-anchor="middle">{10 ** decade:g}</text>')
    dashes = ["6,3", "2,2", "6,2,2,2"]
    names = []
    for k, (gamma, name) in enumerate(thresholds):
        if gamma > 0 and lo <= np.log10(gamma) <= hi:
            x = x_of(np.log10(gamma))
            out.append(f'<line x1="{x:.1f}" y1="{_TOP - 4}" x2="{x:.1f}" y2="{axis_y}" stroke="red" '
                       f'stroke-dasharray="{dashes[k % len(dashes)]}"/>')
        names.append(f"{name} {gamma:g}")
    out.append(f'<text x="{_LEFT + BINS * _CELL_W / 2:.0f}" y="{axis_y + 32}" text-anchor="middle">'
               f'structure max gamma (log bins; red lines: {escape(", ".join(names))}); '
               f'cell: candidates</text>')
    out.append("</svg>\n")
    atomic_write_text(path, "\n".join(out))
    return True
