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
    assert "verification.report.render" in graph["verification.report.generate"]  # the graph sees relative imports
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


# docs/layout.md's sections and the package folder each describes (a subfolder without its own section, such as
# proma/layers/ or verification/oracle/, is described in its parent's)
LAYOUT_SECTIONS = {"`reference/`": "reference", "`proma/`": "proma", "`proma/rl/`": "proma/rl",
                   "`verification/`": "verification"}


def _layout_sections(text: str) -> dict[str, str]:
    out, current = {}, None
    for line in text.splitlines():
        if line.startswith("## "):
            current = next((folder for head, folder in LAYOUT_SECTIONS.items() if head in line), None)
            out.setdefault(current, "")
        elif current is not None:
            out[current] += line + "\n"
    return out


def _layout_problems(root: Path) -> list[str]:
    import re

    sections = _layout_sections((root / "docs" / "layout.md").read_text())
    problems = []
    for folder in LAYOUT_SECTIONS.values():
        text = sections.get(folder, "")
        own = [p for p in (root / folder).rglob("*.py") if p.name != "__init__.py"
               and not any(p.is_relative_to(root / other) for other in LAYOUT_SECTIONS.values()
                           if other != folder and other.startswith(folder + "/"))]
        for path in own:
            if not re.search(rf"`(?:[\w/]*/)?{re.escape(path.name)}`|[`, ]{re.escape(path.name)}[`,) ]", text):
                problems.append(f"{path.relative_to(root)} is not in docs/layout.md")
        names = {p.name for p in (root / folder).rglob("*.py")}
        for named in sorted(set(re.findall(r"([\w]+\.py)", text))):
            if named not in names:
                problems.append(f"docs/layout.md names {named} under {folder}/, which has no such file")
    return problems


def test_layout_doc_names_every_module_and_no_other():
    assert _layout_problems(ROOT) == []


def test_layout_check_catches_a_missing_and_a_stale_module(tmp_path):
    for folder in LAYOUT_SECTIONS.values():
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
    (tmp_path / "proma" / "new_module.py").write_text("")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "layout.md").write_text("## `proma/`: x\n\n| `gone.py` | old |\n")
    assert _layout_problems(tmp_path) == ["proma/new_module.py is not in docs/layout.md",
                                          "docs/layout.md names gone.py under proma/, which has no such file"]
