"""The layering of the packages, read from the source with ``ast`` (lazy imports inside functions count too):

- the library ``proma`` never imports ``verification``;
- ``reference`` (the judge) imports neither ``proma`` nor ``verification``;
- the oracle ``verification.oracle`` imports nothing of ``proma.rl``, and of the rest of ``verification`` only
  the named tolerances (the studies, the report and the real cases built from the RL harness sit above it);
- the studies ``verification.studies`` may import the oracle but not the report (which sits above them) nor the
  command line.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from house_testkit import ROOT, imported_modules
# what the oracle may import from verification outside its own subpackage
ORACLE_MAY_IMPORT = ("verification.tolerances",)


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def offenders(folder: str, forbidden, allowed=(), root: Path = ROOT) -> list[str]:
    """``file: module`` for every import under ``folder`` of a module within ``forbidden`` and not ``allowed``."""
    out = []
    for path in sorted((root / folder).rglob("*.py")):
        for mod in sorted(imported_modules(path, root)):
            if any(_within(mod, f) for f in forbidden) and not any(_within(mod, a) for a in allowed):
                out.append(f"{path.relative_to(root)}: {mod}")
    return out


def test_the_resolver_sees_relative_and_lazy_imports():
    pkg = ROOT / "verification" / "oracle"
    names = imported_modules(pkg / "format.py") | imported_modules(pkg / "cli.py")
    assert "verification.tolerances" in names  # format's lazy ``from ..tolerances import``
    assert "verification.oracle.golden" in names  # cli's lazy ``from .golden import``


@pytest.mark.parametrize("folder, forbidden, allowed", [
    ("proma", ("verification",), ()),
    ("reference", ("proma", "verification", "torch"), ()),
    ("verification/oracle", ("proma.rl", "verification"), ("verification.oracle",) + ORACLE_MAY_IMPORT),
    ("verification/studies", ("verification.report", "verification.cli"), ()),
], ids=["proma-never-imports-verification", "reference-imports-neither", "oracle-imports-no-rl-no-studies",
        "studies-import-no-report"])
def test_layering(folder, forbidden, allowed):
    assert offenders(folder, forbidden, allowed) == []


def test_a_planted_import_is_caught(tmp_path):
    """The check is not vacuous: an oracle module importing the RL harness lazily is reported."""
    planted = tmp_path / "verification" / "oracle" / "probe.py"
    planted.parent.mkdir(parents=True)
    planted.write_text("def f():\n    from proma.rl import sampling\n    from ..report import generate_report\n"
                       "    from ..tolerances import FLOAT64_RTOL\n    from .format import Case\n")
    found = offenders("verification/oracle", ("proma.rl", "verification"),
                      ("verification.oracle",) + ORACLE_MAY_IMPORT, root=tmp_path)
    assert found == ["verification/oracle/probe.py: proma.rl", "verification/oracle/probe.py: proma.rl.sampling",
                     "verification/oracle/probe.py: verification.report",
                     "verification/oracle/probe.py: verification.report.generate_report"]


def test_a_planted_report_import_in_the_studies_is_caught(tmp_path):
    """The studies' rule is not vacuous either: a study importing the report (lazily, relatively) is reported."""
    planted = tmp_path / "verification" / "studies" / "probe.py"
    planted.parent.mkdir(parents=True)
    planted.write_text("def f():\n    from ..report.markdown import table\n    from ..oracle.format import Case\n"
                       "    from .stats import t_interval\n")
    found = offenders("verification/studies", ("verification.report", "verification.cli"), root=tmp_path)
    assert found == ["verification/studies/probe.py: verification.report.markdown",
                     "verification/studies/probe.py: verification.report.markdown.table"]
