"""The base install (NumPy/SciPy, no torch): the commands that train a policy refuse with the extra to install."""
from __future__ import annotations

import pytest

from verification import cli


@pytest.fixture
def without_torch(monkeypatch):
    monkeypatch.setattr(cli, "missing_modules", lambda names=cli.RL_MODULES: ["torch"])


def test_report_names_the_missing_extra(without_torch, tmp_path, capsys):
    assert cli.main(["report", "--smoke", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "[rl] extra" in err and "torch" in err and "pip install 'proma[rl]'" in err
    assert not (tmp_path / "r").exists()


def test_real_cases_name_the_missing_extra_and_the_way_around_it(without_torch, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"--no-real.*\[rl\] extra|\[rl\] extra.*--no-real"):
        cli._real_cases(0, None)


def test_the_check_is_not_vacuous():
    assert cli.missing_modules(("torch", "surely_not_a_module_xyz")) == ["surely_not_a_module_xyz"]
