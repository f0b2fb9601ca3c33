"""The pytest plugin, used by a tiny outside project (tests/verification/outside_project) in a subprocess."""
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROJECT = Path(__file__).parent / "outside_project"


def _run_outside(tmp_path, *args, plant=None):
    """pytest in a copy of the outside project; ``plant=(old, new)`` edits its implementation first."""
    project = tmp_path / "outside"
    shutil.copytree(PROJECT, project)
    if plant:
        impl = project / "tinyproma.py"
        impl.write_text(impl.read_text().replace(*plant))
    # an installed entry point (the current one or, before reinstalling, verification.pytest_plugin) loads it
    installed = any(ep.name == "proma_verify" for ep in entry_points(group="pytest11"))
    plugin = [] if installed else ["-p", "verification.oracle.pytest_plugin"]  # worktree without the installed entry point
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *plugin, *args],
                          cwd=project, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_outside_project_runs_every_case_through_the_plugin(cases_dir, tmp_path):
    run = _run_outside(tmp_path, f"--proma-cases={cases_dir}", "-rs")
    assert run.returncode == 0, run.stdout + run.stderr
    counts = dict((k, int(v)) for v, k in re.findall(r"(\d+) (passed|skipped|failed)", run.stdout))
    from verification.oracle.format import load_cases

    cases, _ = load_cases(cases_dir)
    supported = [c for c in cases if c.settings.variant == "none" or (
        c.settings.variant == "proma" and c.settings.solver == "exact" and c.settings.relative_bound is None
        and c.settings.shrinkage == 1.0)]
    with_linear = [c for c in supported if any(layer.uses == ("linear",) for layer in c.layers)]
    assert counts.get("failed", 0) == 0
    assert counts["passed"] == len(with_linear) * 2
    assert counts["passed"] + counts["skipped"] == 2 * len(cases)


@pytest.mark.slow
def test_plugin_reports_a_failing_case_with_its_layer_table(cases_dir, tmp_path):
    run = _run_outside(tmp_path, f"--proma-cases={cases_dir}", "-k", "matches and exact_single_microbatch",
                       plant=("G[k] = Gk + sign * pg", "G[k] = Gk + sign * pg * 1.001"))
    assert run.returncode == 1, run.stdout + run.stderr
    assert "PROMA oracle check failed" in run.stdout and "fc1.weight" in run.stdout and "rel err" in run.stdout
    # the case's description follows its FAIL lines; neither the case's arrays nor the plugin's frame is shown
    assert "  exact_single_microbatch is: exact PROMA" in run.stdout
    assert "arrays=" not in run.stdout and "pytest_plugin.py" not in run.stdout
    assert "proma_case = Case('exact_single_microbatch', proma/exact, 1 microbatches," in run.stdout
