"""Number and table formatting shared by the report's text modules."""
from __future__ import annotations

import math


def f(x, digits: int = 3) -> str:
    """Compact number: 3 significant digits, scientific when small or large, '-' for missing."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    x = float(x)
    if x == 0:
        return "0"
    if abs(x) < 1e-3 or abs(x) >= 1e5:
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def p_value(p: float) -> str:
    """A p-value: 2 significant digits, scientific below 1e-4."""
    return f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}"


def pct(x) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


def table(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
