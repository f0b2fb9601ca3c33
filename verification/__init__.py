"""Verification: the PROMA oracle (:mod:`verification.oracle`) and the generated reports and studies.

- ``verification.oracle``: golden cases, FORMAT.md's format, the checker, verdicts, pytest plugin, impls.
- ``verification.realcase``: oracle cases captured from the RL harness's real Qwen3 / GSM8K microbatch.
- ``verification.report`` and the ``study_*`` modules: the GSM8K report (``proma-verify report``).
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
