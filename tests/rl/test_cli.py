"""``proma train --help`` explains itself: choices of every enumerated option, a help line for every option."""
import re
from dataclasses import fields

import pytest

from proma.rl.cli import build_parser
from proma.rl.config import CHOICES, TrainConfig, field_comments


@pytest.fixture(scope="module")
def train_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["train"]
    return sub.format_help(), {a.dest: a for a in sub._actions}


def test_every_enumerated_option_lists_its_choices(train_help):
    text, actions = train_help
    for name, choices in CHOICES.items():
        flag = "--" + name.replace("_", "-")
        assert f"{flag} {{{','.join(choices)}}}" in text or f"{flag} {{{','.join(sorted(choices))}}}" in text, flag


def test_every_option_has_a_one_line_help_from_the_config(train_help):
    text, actions = train_help
    comments = field_comments()
    assert set(comments) == {f.name for f in fields(TrainConfig)}
    for f in fields(TrainConfig):
        action = actions[f.name]
        assert action.help and "\n" not in action.help, f.name
        assert action.help.startswith(comments[f.name]), f.name
    assert "(default: None)" not in text and "None" not in re.sub(r"\s+", " ", text)


def test_bad_choice_names_the_option_and_its_choices(capsys):
    from proma.rl.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--smoke", "--strategy", "fast"])
    assert e.value.code == 2
    assert "strategy='fast': unknown strategy (choose from auto, materialize, ghost)" in capsys.readouterr().err
