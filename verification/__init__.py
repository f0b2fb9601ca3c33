"""Verification: the PROMA oracle (golden cases, checker, Python entry point) and generated reports.

- ``verification.format``: the case format of FORMAT.md (schema version 1): load, validate, save.
- ``verification.cases``: golden cases from the NumPy reference (``proma-verify cases``).
- ``verification.check``: compare a candidate file or a callable with the cases (``proma-verify check``).
- ``verification.impls``: this project's implementations as callables (``--impl reference|torch``).
- ``verification.report``: the GSM8K report (``proma-verify report``).

Use as an oracle from another test suite::

    from verification import check_callable
    check_callable("cases/", my_fn).raise_if_failed()   # my_fn(case) -> outputs[m][k]
"""
__version__ = "0.1.0"

from .check import CheckResult, check_callable, check_candidate, read_candidate, write_candidate  # noqa: E402
from .format import Case, FormatError, Layer, Settings, load_cases, save_cases  # noqa: E402

__all__ = [
    "__version__", "Case", "Layer", "Settings", "FormatError", "load_cases", "save_cases",
    "check_callable", "check_candidate", "read_candidate", "write_candidate", "CheckResult",
]
