"""GSM8K loading/validation, task construction and reward functions."""
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proma.rl.data import (
    CHAIN_SEP,
    MAX_CHAIN_STEPS,
    MIN_CHAIN_STEPS,
    calc_reward,
    chain_reward,
    extract_final_answer,
    gsm8k_reward,
    load_gsm8k,
    make_examples,
    hit,
    normalize_number,
    reward,
)


@given(st.text())
def test_rewards_never_raise_on_arbitrary_text(text):
    assert gsm8k_reward(text, "72") in (0.0, 1.0)
    assert gsm8k_reward(text, "72", format_reward=0.1) in (0.0, 0.1, 1.0)
    assert calc_reward(text, "24") in (0.0, 1.0)
    assert chain_reward(text, "48/2=24;24+48=72;72*2=144") in (0.0, 1 / 3, 2 / 3, 1.0)
    got = extract_final_answer(text)
    assert got is None or normalize_number(got) == got


@given(st.text(alphabet="#0123456789-.,$ \nabc", max_size=40))
def test_rewards_never_raise_on_number_like_text(text):
    assert gsm8k_reward(text, "5") in (0.0, 1.0)
    assert calc_reward(text, "5") in (0.0, 1.0)


@given(st.integers(-10**9, 10**9))
def test_integer_with_thousands_commas_and_dollar_matches(n):
    with_commas = f"{n:,}"
    assert gsm8k_reward(f"so the answer is\n#### {with_commas}", str(n)) == 1.0
    assert gsm8k_reward(f"#### ${with_commas}", str(n)) == 1.0
    assert gsm8k_reward(f"#### {n + 1}", str(n)) == 0.0
    assert calc_reward(f" {n}\n", str(n)) == 1.0


@pytest.mark.parametrize("text, expected", [
    ("#### 72", "72"),
    ("#### 1,000", "1000"),
    ("#### $18.00", "18"),
    ("#### $ 5", "5"),
    ("#### -3", "-3"),
    ("#### -0.5", "-0.5"),
    ("#### .25", "0.25"),
    ("#### 72 clips", "72"),
    ("#### 72.", "72"),
    ("#### 10.50", "10.5"),
    ("#### 1 #### 2", "2"),          # the last marker wins
    ("#### -0", "0"),
    ("#### ", None),
    ("the answer is 72", None),      # strict: no marker, no reward
    ("#### seventy", None),
    ("#### 7/2", None),
    ("#### 1e3", None),
    ("#### 1.2.3", None),
])
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


def test_reward_exact_match_only():
    assert reward("gsm8k", "work\n#### 24", "24") == 1.0
    assert reward("gsm8k", "work\n#### 25", "24") == 0.0
    assert reward("gsm8k", "work\n#### 25", "24", format_reward=0.1) == 0.1
    assert reward("gsm8k-calc", "24", "24") == 1.0
    assert reward("gsm8k-calc", "24.0", "24") == 1.0
    assert reward("gsm8k-calc", "240", "24") == 0.0
    assert reward("gsm8k-calc", "0.2", normalize_number(".2")) == 1.0
    with pytest.raises(ValueError, match="task"):
        reward("math", "1", "1")


def test_vendored_data_loads_and_validates():
    train, test = load_gsm8k("train"), load_gsm8k("test")
    assert (len(train), len(test)) == (7473, 1319)
    assert train[0].final == "72"


def test_calc_split_disjoint_by_problem():
    train, test = load_gsm8k("train"), load_gsm8k("test")
    tr, te = make_examples("gsm8k-calc", "train"), make_examples("gsm8k-calc", "test")
    assert len(tr) > 20000 and len(te) > 4000
    train_questions = {train[e.problem].question for e in tr}
    test_questions = {test[e.problem].question for e in te}
    assert not train_questions & test_questions
    # every example is an annotation of its own source problem, and its answer is the annotated result
    for e in tr[:200] + te[:200]:
        src = (train if e in tr[:200] else test)[e.problem]
        assert f"<<{e.prompt}{e.target}>>" in src.answer.replace(" ", "")
        assert calc_reward(e.target, e.answer) == 1.0


def test_gsm8k_task_examples():
    ex = make_examples("gsm8k", "test")
    assert len(ex) == 1319
    assert "####" in ex[0].prompt and ex[0].prompt.endswith("Answer: ")
    assert gsm8k_reward(ex[0].target, ex[0].answer) == 1.0


@pytest.mark.parametrize("line, message", [
    ("not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"question": "q"}), "'answer'"),
    (json.dumps({"question": "q", "answer": "no final line"}), "####"),
    ("", "empty line"),
])
def test_validation_error_names_file_and_line(tmp_path, line, message):
    good = json.dumps({"question": "What is 1+1?", "answer": "1+1=<<1+1=2>>2\n#### 2"})
    (tmp_path / "train.jsonl").write_text("\n".join([good, good, line, good]) + "\n")
    with pytest.raises(ValueError, match=rf"train\.jsonl:3: .*{message}"):
        load_gsm8k("train", tmp_path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="test.jsonl"):
        load_gsm8k("test", tmp_path)


CHAIN_ANSWER = "48/2=24;24+48=72;72*2=144"


@pytest.mark.parametrize("completion, score", [
    ("48/2=24;24+48=72;72*2=144", 1.0),
    (" 48/2 = 24.0;24+48=72;72*2=144 \nanything after the line", 1.0),   # spaces, 24.0 == 24, first line only
    ("48/2=24;24+48=73;72*2=144", 2 / 3),       # one wrong result
    ("48/2=24;24+48=72", 2 / 3),                # a step missing
    ("48/2=24;24*48=72;72*2=144", 2 / 3),       # the expression must be the step's own
    ("24;72;144", 0.0),                         # results without their expressions
    ("48/2=24\n24+48=72;72*2=144", 1 / 3),      # the chain is one line
    ("", 0.0),
])
def test_chain_reward_counts_the_steps_got_right(completion, score):
    assert chain_reward(completion, CHAIN_ANSWER) == pytest.approx(score)
    assert reward("gsm8k-chain", completion, CHAIN_ANSWER) == pytest.approx(score)
    assert hit("gsm8k-chain", completion, CHAIN_ANSWER) == int(score == 1.0)


def test_chain_examples_are_whole_calculator_chains_of_their_own_problem():
    train, test = load_gsm8k("train"), load_gsm8k("test")
    tr, te = make_examples("gsm8k-chain", "train"), make_examples("gsm8k-chain", "test")
    assert len(tr) > 4000 and len(te) > 700
    for split, examples in ((train, tr[:300]), (test, te[:300])):
        for e in examples:
            src = split[e.problem].answer.replace(" ", "")
            steps = e.target.split(CHAIN_SEP)
            assert MIN_CHAIN_STEPS <= len(steps) <= MAX_CHAIN_STEPS
            assert src.count("<<") == len(steps)                     # the whole chain, in order
            assert all(f"<<{step}>>" in src for step in steps)
            assert e.prompt == CHAIN_SEP.join(step.split("=")[0] for step in steps) + "\n"
            assert chain_reward(e.target, e.answer) == 1.0 and hit("gsm8k-chain", e.target, e.answer) == 1


def test_the_other_tasks_score_an_evaluation_hit_as_their_reward():
    assert hit("gsm8k-calc", "24", "24") == 1 and hit("gsm8k-calc", "25", "24") == 0
    assert hit("gsm8k", "#### 72", "72") == 1 and hit("gsm8k", "#### 7", "72") == 0
