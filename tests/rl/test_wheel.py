"""A wheel install can run the harness: the vendored GSM8K (with its license) is package data.

Builds the wheel from a copy of the source (``pip wheel``, no network: the build backend is the installed
setuptools), installs it with ``--no-deps`` into a fresh venv that sees the installed torch and transformers
(``--system-site-packages``: nothing is downloaded), and runs ``proma train --smoke`` from outside the repo.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "reference", "proma", "verification", "data/gsm8k")
PACKAGED_GSM8K = ("proma/rl/gsm8k/train.jsonl", "proma/rl/gsm8k/test.jsonl", "proma/rl/gsm8k/LICENSE",
                  "proma/rl/gsm8k/README.md")


def _copy_sources(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, symlinks=True, ignore=ignore)
        else:
            shutil.copy2(src, dest / name)


def _run(cmd, cwd, env, timeout=600):
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.mark.slow
def test_a_wheel_install_trains_from_outside_the_repo(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PROMA_GSM8K_DIR")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    src, wheels = tmp_path / "src", tmp_path / "wheels"
    src.mkdir()
    _copy_sources(src)
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(wheels),
          str(src)], tmp_path, env)
    (wheel,) = wheels.glob("proma-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert set(PACKAGED_GSM8K) <= names, sorted(n for n in names if "gsm8k" in n)

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], tmp_path, env)
    python = venv / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", str(wheel)], tmp_path, env)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    where = _run([str(python), "-c", "import proma.rl.data as d; print(d.__file__); print(d.default_data_dir())"],
                 outside, env).split()
    assert all(Path(p).is_relative_to(venv) for p in where), where  # the wheel's copy, not the source tree's
    _run([str(venv / "bin" / "proma"), "train", "--smoke", "--out", str(outside / "run")], outside, env)
    records = [json.loads(line) for line in (outside / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records and all("reward" in r for r in records)
