"""The house's layout rules, read from the source with ``ast``: no import circle among the packages' modules,
nothing outside ``proma/rl`` imports the training loop, no test module imports another test module, and the
benchmarks import no test code."""
from __future__ import annotations

from pathlib import Path

import pytest

from house_testkit import ROOT, imported_modules, module_name
PACKAGES = ("reference", "proma", "verification")


def _package_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports. A module's own ancestor packages are left out: Python imports
    them before the module anyway, so ``from . import x`` in ``proma/a.py`` is no edge back to ``proma``."""
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    return {name: {m for m in imported_modules(path) if m in files and m != name and not name.startswith(m + ".")}
            for name, path in files.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_packages_have_no_import_cycle():
    graph = _package_graph()
    assert "verification.report_text" in graph["verification.report"]  # the graph sees relative imports
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_only_proma_rl_imports_the_training_loop():
    graph = _package_graph()
    users = sorted(m for m, deps in graph.items() if "proma.rl.train" in deps and not m.startswith("proma.rl"))
    assert users == []


def _test_modules() -> dict[str, Path]:
    return {p.stem: p for p in (ROOT / "tests").rglob("*.py")}


def test_no_test_module_imports_another_test_module():
    names = _test_modules()
    found = set()
    for path in names.values():
        for mod in imported_modules(path):
            if mod.split(".")[0].startswith("test_") and mod.split(".")[0] in names:
                found.add((str(path.relative_to(ROOT)), mod.split(".")[0]))
    assert found == set(), "move shared helpers to a testkit module"


@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks").glob("*.py")), ids=lambda p: p.name)
def test_benchmarks_import_no_test_code(path):
    test_names = set(_test_modules())
    text = path.read_text()
    assert "tests" not in {part for line in text.splitlines() if "sys.path" in line for part in line.split('"')}
    assert {m.split(".")[0] for m in imported_modules(path)} & test_names == set()
