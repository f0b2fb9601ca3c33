"""GSM8K loading and validation, the three tasks (``gsm8k``, ``gsm8k-calc``, ``gsm8k-chain``) and their rewards.

The data is vendored at ``data/gsm8k/`` (train.jsonl, test.jsonl, LICENSE, README.md) and loaded from the
project tree: nothing here touches the network. ``PROMA_GSM8K_DIR`` (or ``data_dir=``) points elsewhere.

Tasks
-----
``gsm8k``
    prompt = the question plus an instruction to finish with ``#### <answer>``; target = the worked solution
    (used by the supervised warm-start); reward 1 when the strict ``#### N`` extraction of the completion equals
    the reference final number (commas, ``$`` and surrounding spaces stripped; negatives and decimals compared
    by value, so ``10.00`` equals ``10``), else 0; optional format reward for a parsable ``#### N`` line.
``gsm8k-calc``
    every calculator annotation ``<<48/2=24>>`` of a solution becomes one example, prompt ``"48/2="`` and
    answer ``"24"``; train examples come from GSM8K train problems and test examples from GSM8K test problems,
    so the two never share a source problem (``Example.problem`` records it). Reward 1 when the completion,
    stripped, is a number equal in value to the answer.
``gsm8k-chain``
    a solution's whole calculator chain, for completions of tens of tokens with gsm8k-calc's skill: prompt =
    the chain's expressions ``"48/2;24+48;72*2\n"``, target = each expression with its result
    ``"48/2=24;24+48=72;72*2=144"``. Only problems every calculator annotation of which is a kept gsm8k-calc step,
    with :data:`MIN_CHAIN_STEPS` to :data:`MAX_CHAIN_STEPS` of them. Reward = the fraction of the chain's steps
    whose item in the completion's first line (split at ``;``) repeats the step's expression and gives a number
    equal in value to its result; a greedy evaluation hit (:func:`hit`) needs every step.

Reward functions never raise on any model output (tested with Hypothesis on arbitrary text).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

TASKS = ("gsm8k", "gsm8k-calc", "gsm8k-chain")

GSM8K_INSTRUCTION = "Solve the problem step by step, then give the final answer on a line '#### <answer>'."

# A number as GSM8K writes it once commas and "$" are gone: optional sign, digits with an optional fractional
# part, or a bare fractional part (".25" appears in calculator annotations).
_NUMBER = r"-?(?:\d+(?:\.\d*)?|\.\d+)"
_NUMBER_RE = re.compile(rf"^{_NUMBER}$")
_CALC_RE = re.compile(r"<<([^<>]*)>>")
# Calculator steps kept for gsm8k-calc: arithmetic only (no "%", no words), numeric result.
_CALC_STEP_RE = re.compile(rf"^([0-9+\-*/(). ]+)=({_NUMBER})$")
# gsm8k-chain: calculator steps per example, and the separator of its steps in prompt, target and completion.
MIN_CHAIN_STEPS, MAX_CHAIN_STEPS = 3, 6
CHAIN_SEP = ";"


@dataclass(frozen=True)
class Problem:
    """One GSM8K record.

    ``index`` is the 0-based line in its file; ``final`` the normalised final number of ``answer``.
    """

    index: int
    question: str
    answer: str
    final: str


@dataclass(frozen=True)
class Example:
    """A task example: the model sees ``prompt`` and should continue with ``target`` (then EOS).

    ``answer`` is what the reward compares against (the normalised final number); ``problem`` is the index of
    the source GSM8K problem in its split (several gsm8k-calc examples share one problem).
    """

    prompt: str
    target: str
    answer: str
    problem: int


def default_data_dir() -> Path:
    """``$PROMA_GSM8K_DIR`` if set, else the package's ``gsm8k/`` (package data of a wheel; in a source checkout a
    link to ``<repo>/data/gsm8k``)."""
    env = os.environ.get("PROMA_GSM8K_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent / "gsm8k"


def normalize_number(text: str) -> str | None:
    """Canonical string of a number written GSM8K-style, or None when ``text`` is not one number.

    Strips surrounding whitespace, thousands commas, ``$`` and one trailing period ("72." ends a sentence);
    the value is compared exactly through ``Decimal`` so ``"1,000.00"`` -> ``"1000"``, ``"-.5"`` -> ``"-0.5"``.
    Never raises.
    """
    if not isinstance(text, str):
        return None
    s = text.strip().replace(",", "").replace("$", "").strip()
    if s.endswith("."):
        s = s[:-1]
    if len(s) > 64 or not _NUMBER_RE.match(s):
        return None
    d = Decimal(s)  # the regex admits only what Decimal parses (\d and Decimal both take Unicode digits)
    if d == 0:
        return "0"  # "-0" and "0.00" are zero
    # Plain positional notation without trailing zeros (normalize() alone would give "1E+3").
    s = format(d.normalize(), "f")
    return s


def extract_final_answer(text: str) -> str | None:
    """Strict GSM8K extraction: the first token after the last ``####``, normalised; None when absent.

    The token is the text after ``####`` up to the end of the line, with any trailing words dropped
    (``#### 72 clips`` -> ``72``). Never raises.
    """
    if not isinstance(text, str):
        return None
    if "####" not in text:
        return None
    tokens = text.rsplit("####", 1)[1].split("\n", 1)[0].split()
    if not tokens:
        return None
    # "$ 1,000" writes the currency sign as a separate token.
    token = tokens[1] if tokens[0] == "$" and len(tokens) > 1 else tokens[0]
    return normalize_number(token)


def gsm8k_reward(completion: str, answer: str, *, format_reward: float = 0.0) -> float:
    """1 for an exact match of the strictly extracted final number, else ``format_reward`` if a ``#### N``
    number was found, else 0. Never raises."""
    got = extract_final_answer(completion)
    if got is None:
        return 0.0
    return 1.0 if got == answer else float(format_reward)


def calc_reward(completion: str, answer: str) -> float:
    """1 when the completion (stripped, first line) is a number equal in value to ``answer``. Never raises."""
    if not isinstance(completion, str):
        return 0.0
    line = completion.strip().split("\n", 1)[0] if completion.strip() else ""
    got = normalize_number(line)
    return 1.0 if got is not None and got == answer else 0.0


def chain_reward(completion: str, answer: str) -> float:
    """The fraction of the chain's steps (``answer``: ``"expr=result;..."``, results normalised) that the
    completion's first line gets right, item by item: same expression (spaces ignored), a number equal in value to
    the result. Never raises."""
    steps = [item.split("=", 1) for item in answer.split(CHAIN_SEP)]
    if not isinstance(completion, str) or not steps:
        return 0.0
    line = completion.strip().split("\n", 1)[0] if completion.strip() else ""
    items = line.split(CHAIN_SEP)
    right = 0
    for (expr, result), item in zip(steps, items):
        lhs, eq, rhs = item.partition("=")
        right += int(bool(eq) and lhs.replace(" ", "") == expr and normalize_number(rhs.strip()) == result)
    return right / len(steps)


def reward(task: str, completion: str, answer: str, *, format_reward: float = 0.0) -> float:
    """The task's reward of one completion."""
    if task == "gsm8k":
        return gsm8k_reward(completion, answer, format_reward=format_reward)
    if task == "gsm8k-calc":
        return calc_reward(completion, answer)
    if task == "gsm8k-chain":
        return chain_reward(completion, answer)
    raise ValueError(f"task={task!r}: unknown task (choose from {', '.join(TASKS)})")


def hit(task: str, completion: str, answer: str) -> int:
    """1 when the completion earns the task's full reward (an exact match), else 0: the greedy evaluation's score."""
    return int(reward(task, completion, answer) == 1.0)


def load_gsm8k(split: str, data_dir: str | os.PathLike | None = None) -> list[Problem]:
    """Load and validate ``<data_dir>/<split>.jsonl``.

    Each line must be a JSON object with string fields ``question`` and ``answer``, the answer ending with a
    ``#### <number>`` line. A malformed record raises ``ValueError("<file>:<line>: <what is wrong>")``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}: expected 'train' or 'test'")
    path = Path(data_dir) if data_dir is not None else default_data_dir()
    path = path / f"{split}.jsonl"
    if not path.is_file():
        raise ValueError(
            f"{path}: GSM8K file not found (vendored at data/gsm8k/; set PROMA_GSM8K_DIR or --data-dir)"
        )
    problems: list[Problem] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                raise ValueError(f"{path}:{lineno}: empty line")
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            for key in ("question", "answer"):
                if not isinstance(rec.get(key), str) or not rec[key].strip():
                    raise ValueError(f"{path}:{lineno}: field {key!r} missing or not a non-empty string")
            final = extract_final_answer(rec["answer"])
            if final is None:
                raise ValueError(f"{path}:{lineno}: answer has no '#### <number>' final line")
            problems.append(Problem(len(problems), rec["question"], rec["answer"], final))
    if not problems:
        raise ValueError(f"{path}: no records")
    return problems


def gsm8k_prompt(question: str) -> str:
    return f"Question: {question.strip()}\n{GSM8K_INSTRUCTION}\nAnswer: "


def calc_steps(problem: Problem) -> list[tuple[str, str]]:
    """The arithmetic calculator annotations of a solution as ``(expression, result)`` pairs, in order."""
    out = []
    for body in _CALC_RE.findall(problem.answer):
        m = _CALC_STEP_RE.match(body.strip())
        if m:
            out.append((m.group(1).replace(" ", ""), m.group(2)))
    return out


def make_examples(
    task: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    *,
    max_prompt_chars: int = 16,
    max_answer_chars: int = 8,
) -> list[Example]:
    """Examples of ``task`` on ``split`` (GSM8K train -> task train, GSM8K test -> task test).

    For ``gsm8k-calc`` the expression and result lengths are capped (``max_prompt_chars``,
    ``max_answer_chars``: they keep the short arithmetic of most GSM8K steps and bound the completion length). Repeated
    expressions (``2*3``) are kept: their frequency is part of the task's distribution.
    """
    problems = load_gsm8k(split, data_dir)
    if task == "gsm8k":
        return [
            Example(gsm8k_prompt(p.question), p.answer.strip(), p.final, p.index) for p in problems
        ]
    if task == "gsm8k-calc":
        out = []
        for p in problems:
            for expr, result in calc_steps(p):
                if len(expr) + 1 > max_prompt_chars or len(result) > max_answer_chars:
                    continue
                ans = normalize_number(result)
                if ans is None:
                    continue
                out.append(Example(expr + "=", result, ans, p.index))
        return out
    if task == "gsm8k-chain":
        return [e for e in (chain_example(p, max_prompt_chars, max_answer_chars) for p in problems) if e]
    raise ValueError(f"task={task!r}: unknown task (choose from {', '.join(TASKS)})")


def chain_example(problem: Problem, max_prompt_chars: int, max_answer_chars: int) -> Example | None:
    """The ``gsm8k-chain`` example of one problem, or None when its chain is not whole, too short or too long."""
    steps = calc_steps(problem)
    if len(steps) != len(_CALC_RE.findall(problem.answer)) or not MIN_CHAIN_STEPS <= len(steps) <= MAX_CHAIN_STEPS:
        return None
    results = [normalize_number(r) for _, r in steps]
    if any(len(e) + 1 > max_prompt_chars or len(r) > max_answer_chars or n is None
           for (e, r), n in zip(steps, results)):
        return None
    prompt = CHAIN_SEP.join(e for e, _ in steps) + "\n"
    target = CHAIN_SEP.join(f"{e}={r}" for e, r in steps)
    answer = CHAIN_SEP.join(f"{e}={n}" for (e, _), n in zip(steps, results))
    return Example(prompt, target, answer, problem.index)


def tokenizer_corpus(data_dir: str | os.PathLike | None = None) -> list[str]:
    """The text the tokenizer is trained on: every GSM8K train question and answer, in file order."""
    texts = []
    for p in load_gsm8k("train", data_dir):
        texts.append(p.question)
        texts.append(p.answer)
    return texts
