"""The PROMA oracle: golden cases, their format, the checker, verdicts, the pytest plugin and the CLI parts.

- ``format`` (with ``settings``): the case format of ``verification/FORMAT.md`` (schema version 2): load, validate, save.
- ``cases``: golden cases from the NumPy reference (``proma-verify cases``).
- ``golden``: the default case set generated once, versioned, checksummed and cached per version.
- ``check``: compare a candidate file or a callable with the cases (``proma-verify check``).
- ``verdicts``: per-array / per-case / per-check verdicts, their tables and JSON.
- ``pytest_plugin``: the ``pytest11`` plugin (fixtures ``proma_case``, ``proma_check``).
- ``impls``: this project's implementations as callables (``--impl reference|torch``).
- ``model_case``: an oracle case from a torch model, float64 factors and per-sequence gradients (independent of
  ``proma``'s own hooks in :mod:`proma.capture`).
- ``settings``: a case's settings; a solver is valid when declared in ``reference.solvers``.

Layering (``tests/house/test_layering.py``): this subpackage imports ``reference``, NumPy, and (lazily, for
``impls``, ``model_case`` and ``trl``) torch and ``proma``; never ``proma.rl`` nor the studies and report of
``verification``. Cases taken from the RL harness live in :mod:`verification.studies.realcase`, outside.
"""
__version__ = "0.1.0"

from .check import check_callable, check_candidate, check_outputs, read_candidate, write_candidate  # noqa: E402
from .format import Case, FormatError, Layer, Settings, load_cases, save_cases  # noqa: E402
from .verdicts import CheckResult  # noqa: E402

__all__ = [
    "__version__", "Case", "Layer", "Settings", "FormatError", "load_cases", "save_cases",
    "check_callable", "check_candidate", "check_outputs", "read_candidate", "write_candidate", "CheckResult",
]
