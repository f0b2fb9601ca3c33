"""The reference's contract: never imports torch, and bad input raises ValueError naming the argument."""
import ast
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import reference
from reference import accumulate, accumulate_history, accumulate_step, project_out

PACKAGE = pathlib.Path(reference.__file__).parent
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def test_modules_are_all_found():
    assert {"projection", "accumulation", "intra", "factors", "policy", "diagnostics", "blocks"} <= set(MODULES)


def test_importing_every_module_does_not_import_torch():
    imports = ", ".join(["reference", *(f"reference.{m}" for m in MODULES)])
    code = f"import sys, {imports}; assert 'torch' not in sys.modules, 'torch was imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr


def test_no_source_file_mentions_a_torch_import():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in (
                    "__import__", "import_module"):
                names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            offenders += [f"{path.name}:{node.lineno} {n}" for n in names if n.split(".")[0] == "torch"]
    assert offenders == []


GOOD = (np.ones((2, 3)), np.ones(2))
BAD_INPUT = [
    ("mismatched weights", lambda: accumulate([(np.ones((2, 3)), np.ones(3))]), "weights of microbatches\\[0\\]"),
    ("mismatched n", lambda: accumulate([GOOD, (np.ones((2, 4)), np.ones(2))]), "seq_grads of microbatches\\[1\\]"),
    ("1-D seq_grads", lambda: accumulate([(np.ones(3), np.ones(1))]), "seq_grads of microbatches\\[0\\]"),
    ("NaN seq_grads", lambda: accumulate([(np.full((2, 3), np.nan), np.ones(2))]), "seq_grads.*NaN"),
    ("inf weights", lambda: accumulate([(np.ones((2, 3)), np.array([1.0, np.inf]))]), "weights.*NaN or inf"),
    ("not a pair", lambda: accumulate([np.ones((2, 3))]), "microbatches\\[0\\]"),
    ("no microbatches", lambda: accumulate([]), "microbatches"),
    ("string data", lambda: accumulate([(np.array([["a"]]), np.ones(1))]), "seq_grads"),
    ("complex data", lambda: accumulate([(np.ones((1, 2)) * 1j, np.ones(1))]), "seq_grads"),
    ("unknown solver", lambda: accumulate([GOOD], solver="qr"), "solver"),
    ("passes 0", lambda: accumulate([GOOD], solver="gram_schmidt", passes=0), "passes"),
    ("passes float", lambda: accumulate([GOOD], passes=2.0), "passes"),
    ("ridge 0", lambda: accumulate([GOOD], solver="ridge", ridge=0.0), "ridge"),
    ("ridge NaN", lambda: accumulate([GOOD], ridge=float("nan")), "ridge"),
    ("negative bound", lambda: accumulate([GOOD], relative_bound=-0.1), "relative_bound"),
    ("inf shrinkage", lambda: accumulate([GOOD], shrinkage=float("inf")), "shrinkage"),
    ("negative rcond", lambda: accumulate([GOOD], rcond=-1.0), "rcond"),
    ("blocks too short", lambda: accumulate([GOOD], blocks=[1, 1]), "blocks"),
    ("blocks overlap", lambda: accumulate([GOOD], blocks=[slice(0, 2), slice(1, 3)]), "blocks"),
    ("step G shape", lambda: accumulate_step(np.ones(4), *GOOD), "seq_grads"),
    ("step G NaN", lambda: accumulate_step(np.full(3, np.nan), *GOOD), "G"),
    ("history solver", lambda: accumulate_history([GOOD], solver="Exact"), "solver"),
    ("basis shape", lambda: project_out(np.ones(3), np.ones((2, 4))), "basis"),
    ("basis 1-D", lambda: project_out(np.ones(3), np.ones(3)), "basis"),
    ("v 3-D", lambda: project_out(np.ones((1, 1, 3)), np.ones((2, 3))), "v"),
    ("v NaN", lambda: project_out(np.array([1.0, np.nan]), np.ones((1, 2))), "v"),
    ("basis inf", lambda: project_out(np.ones(2), np.array([[1.0, np.inf]])), "basis"),
    ("project blocks", lambda: project_out(np.ones(3), np.ones((1, 3)), blocks=[4]), "blocks"),
]


@pytest.mark.parametrize("call, name", [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_bad_input_raises_value_error_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()
