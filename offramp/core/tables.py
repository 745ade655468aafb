"""Plain fixed-width text tables, as every command and benchmark prints them."""
from __future__ import annotations

from typing import Any

import numpy as np


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain fixed-width table; numbers right-aligned."""
    cells = [[h for h in headers]] + [[_fmt(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for j, r in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if j and _is_num(rows[j - 1][i]) else c.ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    if isinstance(v, int) and abs(v) >= 10_000:
        return f"{v / 1e6:.2f}M" if abs(v) >= 1_000_000 else f"{v / 1e3:.1f}k"
    return str(v)
