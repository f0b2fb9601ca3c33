"""Verification: the PROMA oracle (golden cases, checker, Python entry point) and generated reports.

- ``verification.format``: the case format of FORMAT.md (schema version 2): load, validate, save.
- ``verification.cases``: golden cases from the NumPy reference (``proma-verify cases``).
- ``verification.check``: compare a candidate file or a callable with the cases (``proma-verify check``).
- ``verification.verdicts``: per-array / per-case / per-check verdicts, their tables and JSON.
- ``verification.pytest_plugin``: the ``pytest11`` plugin (fixtures ``proma_case``, ``proma_check``).
- ``verification.impls``: this project's implementations as callables (``--impl reference|torch``).
- ``verification.report``: the GSM8K report (``proma-verify report``).

Use as an oracle from another test suite::

    from verification import check_callable
    check_callable("cases/", my_fn).raise_if_failed()   # my_fn(case) -> outputs[m][k]
    check_callable("cases/", my_step, step=True)        # my_step(case, m, G_in) -> per-layer G_out
"""
__version__ = "0.1.0"

from .check import check_callable, check_candidate, check_outputs, read_candidate, write_candidate  # noqa: E402
from .format import Case, FormatError, Layer, Settings, load_cases, save_cases  # noqa: E402
from .verdicts import CheckResult  # noqa: E402

__all__ = [
    "__version__", "Case", "Layer", "Settings", "FormatError", "load_cases", "save_cases",
    "check_callable", "check_candidate", "check_outputs", "read_candidate", "write_candidate", "CheckResult",
]
