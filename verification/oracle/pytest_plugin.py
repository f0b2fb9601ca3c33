"""The ``pytest11`` plugin: every golden oracle case as a pytest parameter, and an assertion helper.

An outside project that has installed ``proma`` writes, in its own test suite::

    def test_my_proma(proma_case, proma_check):
        outputs = my_accumulate(proma_case)                 # outputs[m][k], None for layers not handled
        proma_check(proma_case, outputs, allow_missing=True)

and ``pytest`` runs that test once per case (ids are the case ids). Cases come from ``--proma-cases DIR``
(or the ini option ``proma_cases``), a directory written by ``proma-verify cases``; without one the plugin
copies the shipped synthetic golden set once per session into a temporary directory. Loaded only when a test asks
for ``proma_case``; otherwise it costs nothing.

The objects a test sees (FORMAT.md, "Using the oracle from pytest"):

- ``proma_case``: a :class:`verification.oracle.format.Case`: ``.id``, ``.description``, ``.tags``,
  ``.settings`` (a :class:`~verification.oracle.settings.Settings`: ``variant``, ``solver``, ``passes``,
  ``ridge``, ``relative_bound``, ``shrinkage``, ``intra_rank``, ``intra_form``, and ``.label()``), ``.layers``
  (one :class:`~verification.oracle.settings.Layer` per parameter tensor: ``.name`` e.g. ``"fc1.weight"``,
  ``.shape`` a tuple such as ``(o, i)``, ``.uses`` a tuple of ``"linear"`` / ``"dense"``, ``.size``),
  ``.n_microbatches``, ``.batch_size(m)``, ``.weights(m)`` (b_m,), ``.use(m, k, u)`` (``{"X", "D", "seq"}`` or
  ``{"seq_grads"}``) and ``.expected(m, k, name)`` with name ``"G_in"``, ``"pg"`` or ``"G_out"``;
- ``proma_check(case, outputs, *, allow_missing=False, dtype=None)``: returns the
  :class:`~verification.oracle.verdicts.CheckResult` when every checked array passes, skips the test when
  nothing was checked, and otherwise raises AssertionError with the per-case and per-layer table, each FAIL
  line followed by the case's description (the plugin's own frames are hidden from the traceback).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

OPTION, INI = "--proma-cases", "proma_cases"


def pytest_addoption(parser):
    parser.addoption(OPTION, default=None, metavar="DIR",
                     help="PROMA oracle case directory for the proma_case fixture (default: the synthetic set, "
                          "copied once per session)")
    parser.addini(INI, "PROMA oracle case directory for the proma_case fixture", default="")


def _cases_dir(config) -> Path:
    chosen = config.getoption(OPTION) or config.getini(INI)
    if chosen:
        return Path(chosen)
    cached = getattr(config, "_proma_cases_dir", None)
    if cached is None:
        from .golden import default_cases

        cached = Path(tempfile.mkdtemp(prefix="proma-cases-"))
        default_cases(cached, real=False, log=lambda *a: None)  # the shipped synthetic set, copied
        config._proma_cases_dir = cached
    return cached


def _load(config):
    loaded = getattr(config, "_proma_loaded", None)
    if loaded is None:
        from .format import load_cases

        loaded = load_cases(_cases_dir(config))
        config._proma_loaded = loaded
    return loaded


def pytest_generate_tests(metafunc):
    if "proma_case" in metafunc.fixturenames:
        cases, _ = _load(metafunc.config)
        metafunc.parametrize("proma_case", cases, ids=[c.id for c in cases])


@pytest.fixture
def proma_check(request):
    """``check(case, outputs, *, allow_missing=False, dtype=None)``: assert ``outputs`` match the case.

    ``outputs[m][k]``: the running gradient of layer k after microbatch m (``None`` for a layer not handled,
    with ``allow_missing=True``); ``dtype`` picks the tolerance class (default: the outputs' own dtype).
    """
    from .check import check_outputs

    _, manifest = _load(request.config)

    def check(case, outputs, *, allow_missing=False, dtype=None):
        __tracebackhide__ = True  # the failure is the caller's: pytest shows the test's line, then the table
        result = check_outputs(case, outputs, manifest["tolerances"], dtype=dtype, allow_missing=allow_missing)
        if result.exit_code == 0:
            return result
        if result.n_checked() == 0 and result.exit_code == 1:
            pytest.skip(f"{case.id}: no array checked (every layer absent)")
        raise AssertionError("PROMA oracle check failed:\n" + result.table(verbose=True))

    return check
