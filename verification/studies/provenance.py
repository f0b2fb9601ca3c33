"""Where a run came from besides its config: the code it executed and the machine and libraries that rounded it.

Recorded in every study run's JSON (:func:`verification.studies.seeds.run_one`): ``"code"`` (:func:`code_version`)
and ``"environment"`` (:func:`environment`).
"""
from __future__ import annotations

import subprocess
from pathlib import Path


def code_version() -> dict:
    """The code a run executes: ``{"commit", "dirty", "root"}`` of the checkout that holds the loaded ``proma``.

    ``dirty`` is True when tracked files of ``proma/``, ``reference/`` or ``verification/`` differ from the commit
    (the run then executes code that no commit holds); ``commit`` is None outside a git checkout.
    """
    import proma

    root = Path(proma.__file__).resolve().parent.parent

    def git(*args):
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", "proma", "reference", "verification"))
    return {"commit": commit, "dirty": dirty if commit else None, "root": str(root)}


def environment() -> dict:
    """What a run's float32 rounding depends on besides the code: ``{"python", "torch", "transformers", "numpy",
    "cpu_capability", "cpu"}`` (the same commit on another CPU or library set rounds differently:
    ``reports/PREREGISTRATION-2.md``, record 2)."""
    import platform

    import numpy
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": numpy.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu": cpu_model()}


def cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    import platform

    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"
