"""The out-of-sample local KL (``oos_kl_prompts``): fresh held-out completions, an exact KL, training untouched."""
import json

import numpy as np
import torch

import reference
from proma.rl import run
from proma.rl.build import build_run
from proma.rl.config import TrainConfig
from proma.rl.data import make_examples
from proma.rl.heldout_probe import probe_kl, probe_seed, sample_probe
from verification.tolerances import FLOAT64_ATOL, FLOAT64_RTOL

from rl_testing import rewarding_parity

PROMPTS = 4
TIME_KEYS = ("time/rollout", "time/train", "time/metrics", "time/probe", "step_time")
PROBE_KEYS = ("oos_local_kl",)


def _records(cfg):
    with rewarding_parity():
        run_dir = run(cfg, log=lambda *a, **k: None)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_is_the_same_with_and_without_the_probe(tmp_path):
    base = dict(method="proma", steps=2, cache_dir=str(tmp_path / "cache"), second_order=False)
    off = _records(TrainConfig.from_preset("smoke", out=str(tmp_path / "off"), **base))
    on = _records(TrainConfig.from_preset("smoke", out=str(tmp_path / "on"), oos_kl_prompts=PROMPTS, **base))
    drop = set(TIME_KEYS) | set(PROBE_KEYS)
    assert [{k: v for k, v in r.items() if k not in drop} for r in off] == \
           [{k: v for k, v in r.items() if k not in drop} for r in on]
    assert all("oos_local_kl" not in r for r in off)
    assert all(r["oos_local_kl"] >= 0 and np.isfinite(r["oos_local_kl"]) for r in on)
    assert any(r["oos_local_kl"] > 0 for r in on)


def test_probe_prompts_are_held_out_and_the_same_for_every_method(tmp_path):
    cfg = TrainConfig.from_preset("smoke", out=str(tmp_path / "r"), cache_dir=str(tmp_path / "cache"),
                                  oos_kl_prompts=PROMPTS, dtype="float64")
    parts = build_run(cfg, log=lambda *a, **k: None)
    # the held-out prompts are the task's test split (never trained on; the pool is the train split's)
    assert parts.heldout_examples == make_examples(cfg.task, "test", cfg.data_dir)
    probe = sample_probe(cfg, parts.model, parts.tokenizer, parts.heldout_examples, 3, parts.device)
    idx = probe_seed(cfg.seed, 3).choice(len(parts.heldout_examples), size=PROMPTS, replace=False)
    prompts = [parts.heldout_examples[i].prompt for i in idx]
    ids = parts.tokenizer(prompts, add_special_tokens=False)["input_ids"]
    for row, want in zip(probe.batch["input_ids"].tolist(), ids):
        assert row[: len(want)] == want
    # another method at the same seed and step draws the same prompts (the generator ignores the method)
    other = sample_probe(cfg.replace(method="grpo"), parts.model, parts.tokenizer, parts.heldout_examples, 3,
                         parts.device)
    assert torch.equal(other.batch["input_ids"], probe.batch["input_ids"])


def test_probe_kl_is_the_exact_categorical_kl(tmp_path):
    cfg = TrainConfig.from_preset("smoke", out=str(tmp_path / "r"), cache_dir=str(tmp_path / "cache"),
                                  oos_kl_prompts=PROMPTS, dtype="float64")
    parts = build_run(cfg, log=lambda *a, **k: None)
    model = parts.model
    probe = sample_probe(cfg, model, parts.tokenizer, parts.heldout_examples, 0, parts.device)
    assert probe_kl(model, probe) == 0.0  # no step: no change
    with torch.no_grad():
        before = model(input_ids=probe.batch["input_ids"], attention_mask=probe.batch["attention_mask"]).logits
        for p in model.parameters():
            p.add_(1e-2 * torch.randn_like(p))
        after = model(input_ids=probe.batch["input_ids"], attention_mask=probe.batch["attention_mask"]).logits
    sel = probe.batch["score_mask"][:, 1:] > 0
    expected = reference.categorical_kl(before[:, :-1][sel].numpy(), after[:, :-1][sel].numpy()).mean()
    assert expected > 0
    np.testing.assert_allclose(probe_kl(model, probe), expected, rtol=FLOAT64_RTOL, atol=FLOAT64_ATOL)
