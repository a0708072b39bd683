"""Small SVG drawings for the pages: a lineage graph, bars over time, a heatmap. Drawn on
the server as text (no plotting library, no script), so a page renders as it arrives."""

from __future__ import annotations

from html import escape

PALETTE = ("#2f6f4f", "#3b6ea8", "#b4562c", "#7a4fa0", "#a08a2a", "#3a8f8f", "#8f3a5b")
MAX_NODES = 14


def _box(x: float, y: float, w: float, label: str, link: str | None, strong: bool = False) -> str:
    text = escape(label if len(label) <= 44 else label[:41] + "...")
    fill = "#2f6f4f" if strong else "#ffffff"
    ink = "#ffffff" if strong else "#1d232a"
    rect = (f'<rect x="{x}" y="{y}" width="{w}" height="26" rx="5" fill="{fill}" '
            f'stroke="#9aa7b2"/><text x="{x + 8}" y="{y + 17}" fill="{ink}">{text}</text>')
    return f'<a href="{escape(link)}">{rect}</a>' if link else rect


def lineage(inputs: list[tuple[str, str | None]], name: str,
            outputs: list[tuple[str, str | None]], href) -> str:
    """What an entry came from (left), the entry, what was made from it (right)."""
    more_in, more_out = len(inputs) - MAX_NODES, len(outputs) - MAX_NODES
    inputs = inputs[:MAX_NODES] + ([(f"... and {more_in} more", None)] if more_in > 0 else [])
    outputs = outputs[:MAX_NODES] + ([(f"... and {more_out} more", None)] if more_out > 0 else [])
    width, column, gap = 960, 290, 36
    rows = max(len(inputs), len(outputs), 1)
    height = rows * gap + 20
    mid_y = height / 2 - 13
    parts = [f'<svg class="lineage" width="{width}" height="{height}" role="img" '
             f'aria-label="lineage of {escape(name)}">']
    for i, (label, target) in enumerate(inputs):
        y = 10 + i * gap
        parts.append(f'<line x1="{column + 10}" y1="{y + 13}" x2="{335}" y2="{mid_y + 13}" '
                     f'stroke="#9aa7b2"/>')
        parts.append(_box(10, y, column, label, href("entry", target) if target else None))
    for i, (label, target) in enumerate(outputs):
        y = 10 + i * gap
        parts.append(f'<line x1="{335 + column}" y1="{mid_y + 13}" x2="{660}" y2="{y + 13}" '
                     f'stroke="#9aa7b2"/>')
        parts.append(_box(660, y, column, label, href("entry", target) if target else None))
    parts.append(_box(335, mid_y, column, name, None, strong=True))
    if not inputs and not outputs:
        parts.append('<text x="10" y="15" fill="#5f6b76">no recorded lineage</text>')
    parts.append("</svg>")
    return "".join(parts)


def bars(labels: list[str], series: dict[str, list[float]], title: str) -> str:
    """Grouped bars: one group per label (a day), one bar per series (a tenant)."""
    width, height, left, bottom = 560, 240, 50, 40
    top = max([max(values) for values in series.values() if values] or [1]) or 1
    group = (width - left - 10) / max(len(labels), 1)
    bar = max(2.0, group * 0.8 / max(len(series), 1))
    parts = [f'<svg width="{width}" height="{height}" role="img" aria-label="{escape(title)}">',
             f'<text x="{left}" y="14">{escape(title)}</text>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - 10}" '
             f'y2="{height - bottom}" stroke="#9aa7b2"/>',
             f'<text x="4" y="{30}" fill="#5f6b76">{top:.0f}</text>']
    for s, (name, values) in enumerate(sorted(series.items())):
        color = PALETTE[s % len(PALETTE)]
        for i, value in enumerate(values):
            h = (height - bottom - 30) * value / top
            x = left + i * group + s * bar
            parts.append(f'<rect x="{x:.1f}" y="{height - bottom - h:.1f}" width="{bar:.1f}" '
                         f'height="{h:.1f}" fill="{color}"><title>{escape(name)} '
                         f'{escape(labels[i])}: {value:.0f}</title></rect>')
        parts.append(f'<rect x="{left + 120 * s}" y="{height - 14}" width="10" height="10" '
                     f'fill="{color}"/><text x="{left + 14 + 120 * s}" y="{height - 5}">'
                     f'{escape(name)}</text>')
    for i, label in enumerate(labels):
        if len(labels) <= 8 or i % max(1, len(labels) // 8) == 0:
            parts.append(f'<text x="{left + i * group:.1f}" y="{height - bottom + 14}" '
                         f'fill="#5f6b76">{escape(label[5:])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def heatmap(matrix: list[list[float]], title: str, ranks: tuple[int, int]) -> str:
    """phi(i, j) as cells from white (0) to green (1), the value in each cell's tooltip."""
    rows, cols = len(matrix), len(matrix[0]) if matrix else 0
    cell = max(10, min(36, 300 // max(rows, cols, 1)))
    width, height = cols * cell + 60, rows * cell + 50
    parts = [f'<svg width="{width}" height="{height}" role="img" aria-label="{escape(title)}">',
             f'<text x="0" y="14">{escape(title)}</text>']
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            shade = int(255 - 200 * max(0.0, min(1.0, value)))
            parts.append(f'<rect x="{40 + j * cell}" y="{24 + i * cell}" width="{cell}" '
                         f'height="{cell}" fill="rgb({shade},{min(255, shade + 40)},{shade})">'
                         f'<title>phi({i + 1},{j + 1}) = {value:.3f}</title></rect>')
    parts.append(f'<text x="40" y="{height - 6}" fill="#5f6b76">j: 1..{ranks[1]} · i: '
                 f'1..{ranks[0]}</text></svg>')
    return "".join(parts)
