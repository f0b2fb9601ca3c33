"""examples/trl_grpo_proma.py: the harness's policy, prompts and reward in PromaGRPOTrainer, smallest settings."""
from __future__ import annotations

import math

import pytest
import torch

from verification.testkit import load_example

pytest.importorskip("trl")

SMALLEST = ["--preset", "smoke", "--steps", "1", "--prompts-per-step", "2", "--group-size", "4",
            "--microbatch-size", "4", "--max-completion-length", "4"]


@pytest.fixture(scope="module")
def example():
    return load_example("trl_grpo_proma.py")


def test_reward_function_is_the_harness_calc_reward(example):
    assert example.calc_reward(["24", " 7\n", "24 apples", "-0.50"], answer=["24", "8", "24", "-0.5"]) == [
        1.0, 0.0, 0.0, 1.0]


def test_options_are_checked(example):
    with pytest.raises(SystemExit):
        example.parse_args(["--variant", "sgd"])
    with pytest.raises(SystemExit):   # 3 x 4 completions do not split into microbatches of 8
        example.parse_args(["--prompts-per-step", "3", "--group-size", "4", "--microbatch-size", "8"])


@pytest.mark.slow
def test_example_trains_from_the_cached_warmstart_and_logs_proma_stats(example, tmp_path, monkeypatch):
    """The harness's smoke warm-start, cached beforehand, is the policy; one step logs finite PROMA stats.

    The reward is swapped for one that differs within every group (the warm-started smoke policy scores 0 on
    GSM8K-calc, so all advantages would vanish and PROMA would remove nothing): the second microbatch must then
    remove a part of the first one's gradient.
    """
    from proma.rl.config import TrainConfig
    from proma.rl.data import make_examples
    from proma.rl.model import build_policy, get_warmstarted
    from proma.rl.tokenizer import get_tokenizer

    cache = tmp_path / "cache"
    cfg = TrainConfig.from_preset("smoke", cache_dir=str(cache))
    tok = get_tokenizer(cfg.vocab_size, cache)
    get_warmstarted(cfg, build_policy(cfg, tok), tok, make_examples("gsm8k-calc", "train"), torch.device("cpu"),
                    cache, log=lambda *_: None)
    monkeypatch.setattr(example, "calc_reward", lambda completions, **kw: [float(len(c) % 3) for c in completions])
    lines = []
    records = example.main(SMALLEST + ["--cache-dir", str(cache), "--out", str(tmp_path / "out")], log=lines.append)
    assert any("policy: the harness's warm-start" in line for line in lines), lines
    assert [r["step"] for r in records] == [1]
    (rec,) = records
    assert math.isfinite(rec["reward"]) and math.isfinite(rec["proma/gram_rank_mean"])
    assert math.isfinite(rec["proma/removed_ratio"]) and rec["proma/removed_ratio"] > 0
    assert any(line.startswith("step   1  reward") for line in lines) and lines[-1].startswith("done: 1 steps")
