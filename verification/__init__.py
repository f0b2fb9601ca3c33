"""Verification: three wings with one job each, the oracle, the studies and the report.

- ``verification.oracle``: golden cases, FORMAT.md's format, the checker, verdicts, pytest plugin, impls
  (imports neither the studies nor the report, nor ``proma.rl``).
- ``verification.studies``: the GSM8K studies and their statistics (seed studies, pre-registered verdicts, the
  single-seed grid, projection error, the first-order check, the oracle cases of a real microbatch).
- ``verification.report``: the GSM8K report (``proma-verify report``), built from the studies.
- ``verification.testkit``, ``verification.tolerances``: the tiny-model testkit and named tolerances.

Use as an oracle from another test suite::

    from verification import check_callable
    check_callable("cases/", my_fn).raise_if_failed()   # my_fn(case) -> outputs[m][k]
    check_callable("cases/", my_step, step=True)        # my_step(case, m, G_in) -> per-layer G_out
"""
from .oracle import (  # noqa: F401
    Case,
    CheckResult,
    FormatError,
    Layer,
    Settings,
    __all__,
    __version__,
    check_callable,
    check_candidate,
    check_outputs,
    load_cases,
    read_candidate,
    write_candidate,
    save_cases,
)
