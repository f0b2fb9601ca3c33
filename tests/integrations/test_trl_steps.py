"""PromaGRPOTrainer across optimizer steps and its logged metrics, each judged by something independent of the
trainer's own bookkeeping: the oracle's float64 case of the second step, a plain ("none") run for excluded
parameters, TRL's own trainer for empty completions, and the Gram rank every projected tensor must have.

Tiny Qwen3 of trl_testkit: 2 microbatches of b = 4 completions per optimizer step.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("trl")

from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from proma.integrations.trl import PromaGRPOConfig, PromaGRPOTrainer  # noqa: E402
from verification.trl_testkit import config, run  # noqa: E402
from verification import load_cases  # noqa: E402
from verification.oracle.trl import OracleCaseWriter  # noqa: E402
from verification.tolerances import FLOAT32_RTOL  # noqa: E402

MICROBATCHES = 2         # trl_testkit.config: gradient_accumulation_steps
SEQUENCES = 4            # trl_testkit.config: per_device_train_batch_size
EXCLUDED = ["model.norm.weight", "model.layers.0.self_attn.q_proj.weight"]


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _proma_logs(trainer) -> list:
    return [{k: v for k, v in rec.items() if k.startswith("proma/")} for rec in trainer.state.log_history
            if "reward" in rec]


def test_second_optimizer_step_starts_a_new_window(tokenizer, policy, tmp_path):
    """Two optimizer steps: after the second, acc.stats() counts that step's microbatches only, and the
    gradient of the second step is PROMA of its own microbatches from zero (the oracle's float64 case of
    step 2, expected from the NumPy reference), not a continuation of the first step's window."""
    writer = OracleCaseWriter(tmp_path / "cases", step=2, log=lambda line: None)
    trainer, _ = run(PromaGRPOTrainer, config(PromaGRPOConfig, tmp_path / "run", max_steps=2), tokenizer,
                     copy.deepcopy(policy), callbacks=[writer])
    summary = trainer.accumulator.stats()["summary"]
    assert summary["microbatches"] == MICROBATCHES and summary["projected"] > 0
    logs = _proma_logs(trainer)
    assert len(logs) == 2 and all(0 < rec["proma/removed_ratio"] < 1 for rec in logs)
    (case,), _ = load_cases(tmp_path / "cases")
    assert case.n_microbatches == MICROBATCHES
    step2 = trainer.grad_history[1]
    for k, layer in enumerate(case.layers):
        want = case.array(f"mb{MICROBATCHES - 1}/layer{k}/G_out")
        assert _rel(step2[layer.name].numpy(), want) <= FLOAT32_RTOL, layer.name


def test_exclude_and_the_logged_metrics(tokenizer, policy, tmp_path):
    """With proma_exclude: the excluded tensors get TRL's plain gradient (equal to a "none" run's), the others
    are projected; proma/gram_rank_mean is the mean over the projected tensors only, each of Gram rank b = 4
    at microbatch 2 (4 distinct completions); proma/removed_ratio is microbatch 2's (the first has nothing to
    project against), i.e. the ratio acc.stats() reports after the step."""
    trainer, g_ex = run(PromaGRPOTrainer, config(PromaGRPOConfig, tmp_path / "ex", proma_exclude=EXCLUDED), tokenizer,
                        copy.deepcopy(policy))
    _, g_none = run(PromaGRPOTrainer, config(PromaGRPOConfig, tmp_path / "none", proma_variant="none"), tokenizer,
                    copy.deepcopy(policy))
    for name in EXCLUDED:
        assert _rel(g_ex[name].numpy(), g_none[name].numpy()) <= FLOAT32_RTOL, name
    projected = [n for n in g_none if n not in EXCLUDED]
    assert max(_rel(g_ex[n].numpy(), g_none[n].numpy()) for n in projected) > FLOAT32_RTOL
    stats = trainer.accumulator.stats()
    ranks = {n: d["gram_rank"] for n, d in stats["params"].items()}
    assert {n for n, r in ranks.items() if r is None} == set(EXCLUDED)
    assert all(r == SEQUENCES for n, r in ranks.items() if n not in EXCLUDED)
    (logs,) = _proma_logs(trainer)
    assert logs["proma/gram_rank_mean"] == SEQUENCES
    assert logs["proma/removed_ratio"] == pytest.approx(stats["summary"]["removed_ratio"], rel=FLOAT32_RTOL)
    assert logs["proma/removed_ratio"] > 0


def test_intra_logs_under_its_own_key(tokenizer, policy, tmp_path):
    trainer, _ = run(PromaGRPOTrainer, config(PromaGRPOConfig, tmp_path, proma_variant="intra"), tokenizer,
                     copy.deepcopy(policy))
    (logs,) = _proma_logs(trainer)
    assert set(logs) == {"proma/intra_removed_ratio"} and 0 < logs["proma/intra_removed_ratio"] < 1


def test_empty_completions_equal_trl(tokenizer, policy, tmp_path):
    """mask_truncated_completions=True zeroes the loss mask of every completion cut at max_completion_length
    (most of them here): "none" still equals TRL's own gradient, with those completions weighted 0."""
    opts = dict(mask_truncated_completions=True)
    trl, g_trl = run(GRPOTrainer, config(GRPOConfig, tmp_path / "trl", **opts), tokenizer, copy.deepcopy(policy))
    assert 0 < trl.state.log_history[0]["completions/clipped_ratio"] < 1
    _, g_ours = run(PromaGRPOTrainer, config(PromaGRPOConfig, tmp_path / "ours", proma_variant="none", **opts),
                    tokenizer, copy.deepcopy(policy))
    names = list(g_trl)
    flat = [torch.cat([g[n].reshape(-1) for n in names]).numpy() for g in (g_ours, g_trl)]
    assert np.isfinite(flat[0]).all() and _rel(*flat) <= FLOAT32_RTOL
