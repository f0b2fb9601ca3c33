"""End-to-end runs of the smoke configuration: every method, determinism, resume, --model PATH, bad options."""
import json
import math

import pytest
import torch

from proma.rl.batching import sample_microbatch
from proma.rl.cli import main
from proma.rl.config import METHODS, TrainConfig
from proma.rl.tokenizer import get_tokenizer
from proma.rl.train import train

from rl_testing import rewarding_parity, tiny_qwen3

TIME_KEYS = ("time/rollout", "time/train", "time/metrics", "step_time")
REQUIRED = ("step", "opt_step", "reward", "reward_std", "zero_var_frac", "completion_len", "entropy", "local_kl",
            "local_kl_k1", "kl", "local_kl_2nd_order", "clip_ratio", "grad_norm", "step_time", "lr", "loss")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One tokenizer + warm-start cache shared by the runs of this module (as the verification runs do)."""
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(autouse=True)
def parity_reward():
    """The smoke policy never solves a task, so every advantage would be 0 and every update empty; reward the
    parity of the completion's length instead so that runs actually move the policy."""
    with rewarding_parity():
        yield


def smoke(tmp_path, cache, name="run", **changes):
    return TrainConfig.from_preset("smoke", out=str(tmp_path / name), cache_dir=cache, **changes)


def records(run_dir, name="metrics.jsonl"):
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


def without_time(recs):
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in recs]


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_smoke_run_of_every_method(tmp_path, cache, method):
    cfg = smoke(tmp_path, cache, method=method, save_microbatch=True)
    run_dir = train(cfg)
    recs = records(run_dir)
    assert len(recs) == cfg.steps * cfg.minibatches
    assert [r["opt_step"] for r in recs] == list(range(1, len(recs) + 1))
    for r in recs:
        assert set(REQUIRED) <= set(r)
        assert all(math.isfinite(r[k]) for k in REQUIRED)
        assert r["local_kl"] >= 0 and r["kl"] >= -1e-6 and r["local_kl_2nd_order"] >= 0
    assert any(r["grad_norm"] > 0 and r["local_kl"] > 0 for r in recs)
    if method in ("proma", "proma-paper", "intra"):
        assert any(k.startswith("proj/") for k in recs[0])
    evals = records(run_dir, "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 2]
    for e in evals:  # item count and binomial standard error of the accuracy
        assert e["val/n"] == cfg.eval_size
        assert e["val/se"] == pytest.approx(math.sqrt(e["val/accuracy"] * (1 - e["val/accuracy"]) / cfg.eval_size))
    assert TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text())) == cfg
    mb = torch.load(run_dir / "microbatch.pt", weights_only=False)
    assert mb["input_ids"].shape == mb["score_mask"].shape and mb["weights"].shape == (cfg.microbatch_size,)


@pytest.mark.slow
def test_smoke_run_of_the_chain_task(tmp_path, cache):
    from proma.rl.build import build_run

    assert TrainConfig(task="gsm8k-chain").new_tokens == 64   # a chain target runs to tens of tokens
    cfg = smoke(tmp_path, cache, task="gsm8k-chain")
    s = build_run(cfg, log=lambda *a, **k: None)
    assert all(e.prompt.endswith("\n") and e.prompt.count(";") >= 2 for e in s.eval_examples)
    run_dir = train(cfg)
    recs = records(run_dir)
    assert len(recs) == cfg.steps * cfg.minibatches and all(math.isfinite(r["loss"]) for r in recs)
    assert [e["step"] for e in records(run_dir, "eval.jsonl")] == [0, cfg.steps]


@pytest.mark.slow
def test_same_seed_same_metrics_and_resume(tmp_path, cache):
    full = records(train(smoke(tmp_path, cache, "a", steps=3)))
    again = records(train(smoke(tmp_path, cache, "b", steps=3)))
    assert without_time(full) == without_time(again)
    other = records(train(smoke(tmp_path, cache, "c", steps=3, seed=1)))
    assert without_time(other) != without_time(full)
    # resume: 2 steps, then the same run directory continued to 3 steps == the uninterrupted 3-step run
    train(smoke(tmp_path, cache, "d", steps=2, ckpt_every=5))
    resumed = train(smoke(tmp_path, cache, "d", steps=3, ckpt_every=5))
    assert without_time(records(resumed)) == without_time(full)
    assert records(resumed, "eval.jsonl") == records(tmp_path / "a", "eval.jsonl")
    # a finished run is left as it is
    train(smoke(tmp_path, cache, "d", steps=3, ckpt_every=5))
    assert without_time(records(resumed)) == without_time(full)
    assert records(resumed, "eval.jsonl") == records(tmp_path / "a", "eval.jsonl")
    # a different configuration in the same directory is refused
    with pytest.raises(ValueError, match="different config.*lr"):
        train(smoke(tmp_path, cache, "d", steps=4, lr=0.5))


@pytest.mark.slow
def test_model_path(tmp_path, cache, capsys):
    tok = get_tokenizer(300, cache)
    model = tiny_qwen3(vocab_size=len(tok), dtype=torch.float32)
    model_dir = tmp_path / "tiny-qwen3"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path / "run"
    assert main(["train", "--smoke", "--method", "grpo", "--model", str(model_dir), "--out", str(out),
                 "--cache-dir", cache, "--steps", "1"]) == 0
    recs = records(out)
    assert len(recs) == 2 and recs[0]["grad_norm"] > 0
    assert "run directory" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--method", "ppo"], "method='ppo': unknown method"),
    (["--microbatch-size", "3"], "microbatch_size=3: does not divide the minibatch size 8"),
    (["--minibatches", "3"], "minibatches=3: does not divide the rollout batch"),
    (["--model", "/nonexistent/model"], "model='/nonexistent/model': not a local Hugging Face checkpoint"),
    (["--task", "math"], "task='math'"),
    (["--group-size", "1"], "group_size=1"),
])
def test_bad_options_exit_with_a_clear_message(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(["train", "--smoke", "--out", str(tmp_path / "x"), *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_option_type_is_rejected(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--steps", "many"])
    assert e.value.code == 2 and "--steps" in capsys.readouterr().err


def test_from_preset_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown option"):
        TrainConfig.from_preset("smoke", stepz=3)


@pytest.mark.slow
def test_sample_microbatch(tmp_path, cache):
    cfg = smoke(tmp_path, cache, method="proma")
    model, batch, seq_logp_fn, weights = sample_microbatch(cfg, log=lambda *a: None)
    assert batch["input_ids"].shape[0] == cfg.microbatch_size == weights.shape[0]
    seq_logp = seq_logp_fn(model, batch)
    assert seq_logp.shape == (cfg.microbatch_size,) and bool((seq_logp < 0).all())
    assert type(model).__name__ == "Qwen3ForCausalLM" and model.config.tie_word_embeddings


@pytest.mark.slow
def test_train_pool_is_a_fixed_subset_shared_by_seeds(tmp_path, cache):
    from proma.rl.build import build_run

    quiet = dict(log=lambda *a: None)
    a = build_run(smoke(tmp_path, cache, "a", train_pool=16, seed=0), **quiet).train_examples
    b = build_run(smoke(tmp_path, cache, "b", train_pool=16, seed=1), **quiet).train_examples
    full = build_run(smoke(tmp_path, cache, "c", train_pool=0), **quiet).train_examples
    assert a == b and len(a) == 16 and set(a) <= set(full) and len(full) > 20000
    with pytest.raises(ValueError, match="train_pool=2"):
        smoke(tmp_path, cache, train_pool=2)


@pytest.mark.slow
def test_summary_command(tmp_path, cache, capsys):
    run_dir = train(smoke(tmp_path, cache, method="grpo"))
    assert main(["summary", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "| run |" in out and "| grpo |" in out


@pytest.mark.slow
def test_evaluate_per_item_hits_average_to_the_accuracy(tmp_path, cache, monkeypatch):
    import proma.rl.data
    from proma.rl.build import build_run
    from proma.rl.evaluation import evaluate

    # a hit decided by the item (the parity of its answer's characters), so that items differ
    monkeypatch.setattr(proma.rl.data, "reward", lambda task, text, answer, **kw: float(sum(map(ord, answer)) % 2))
    s = build_run(smoke(tmp_path, cache, eval_size=12), log=lambda *a, **k: None)
    acc, hits = evaluate(s, batch_size=5, per_item=True)  # 3 generation calls, the last one partial
    expected = [sum(map(ord, e.answer)) % 2 for e in s.eval_examples]
    assert hits.tolist() == expected and 0 < sum(expected) < 12  # some hits, not all: the check can fail
    assert acc == hits.mean() == evaluate(s)
