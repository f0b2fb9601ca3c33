"""Number and table formatting shared by the report's text modules."""
from __future__ import annotations

import math

from ..studies.preregistered import ALPHA as TEST_LEVEL  # both studies' level (preregistered2.ALPHA is the same)


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


# A p-value that rounds onto the test level at 2 digits gets more digits, up to this many.
P_MAX_DIGITS = 6


def p_value(p: float) -> str:
    """A p-value: 2 significant digits, scientific below 1e-4; more digits (up to :data:`P_MAX_DIGITS`) where 2
    would round it onto :data:`TEST_LEVEL`, so the side of the level it lies on stays readable (0.0502, not 0.05)."""
    if p < 1e-4:
        return f"{p:.1e}"
    digits = 2
    while digits < P_MAX_DIGITS and p != TEST_LEVEL and float(f"{p:.{digits}g}") == TEST_LEVEL:
        digits += 1
    return f"{p:.{digits}g}"


def pct(x) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


def table(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
