"""The house's layout rules, read from the source with ``ast``: no import circle among the packages' modules,
nothing outside ``proma/rl`` imports the training loop, no test module imports another test module, and the
benchmarks import no test code."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("reference", "proma", "verification")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports (at any depth: lazy imports count too)."""
    is_pkg = path.name == "__init__.py"
    package = _module_name(path).split(".") if is_pkg else _module_name(path).split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out.add(mod)
            out.update(f"{mod}.{alias.name}" for alias in node.names)  # "from . import data" names a module
    return out


def _package_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports. A module's own ancestor packages are left out: Python imports
    them before the module anyway, so ``from . import x`` in ``proma/a.py`` is no edge back to ``proma``."""
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    return {name: {m for m in _imports(path) if m in files and m != name and not name.startswith(m + ".")}
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
        for mod in _imports(path):
            if mod.split(".")[0].startswith("test_") and mod.split(".")[0] in names:
                found.add((str(path.relative_to(ROOT)), mod.split(".")[0]))
    assert found == set(), "move shared helpers to a testkit module"


@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks").glob("*.py")), ids=lambda p: p.name)
def test_benchmarks_import_no_test_code(path):
    test_names = set(_test_modules())
    text = path.read_text()
    assert "tests" not in {part for line in text.splitlines() if "sys.path" in line for part in line.split('"')}
    assert {m.split(".")[0] for m in _imports(path)} & test_names == set()
