"""PromaGRPOTrainer against TRL's own GRPOTrainer (trl==1.16.0) on a tiny local Qwen3, CPU.

Every run: 8 prompts x 4 generations, 2 microbatches of 4 completions per optimizer step, 1 step, TRL's
default gradient checkpointing (non-reentrant). Gradients are compared just before the optimizer step.
"""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("trl")

from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from proma.integrations.trl import PromaGRPOConfig, PromaGRPOTrainer  # noqa: E402
from verification.trl_testkit import config, run  # noqa: E402
from verification.tolerances import FLOAT32_RTOL  # noqa: E402

LOSS_TYPES = {
    "dapo": {}, "grpo": {}, "bnpo": {}, "dr_grpo": {}, "sapo": {}, "vespo": {},
    "cispo": {"epsilon_high": 5.0},
    "luspo": {"importance_sampling_level": "sequence"},
}


def _flat(grads, names):
    return torch.cat([grads[n].reshape(-1) for n in names])


def _rel(a, b):
    return float((a - b).norm() / b.norm())


class UnfusedGRPOTrainer(GRPOTrainer):
    """TRL's trainer, unchanged but for the unfused LM head PROMA uses (same log-probability code)."""

    _get_per_token_logps_and_entropies = PromaGRPOTrainer._get_per_token_logps_and_entropies


class FusedPromaTrainer(PromaGRPOTrainer):
    """PROMA fed by TRL's fused head, which reads the tied weight without calling lm_head."""

    _get_per_token_logps_and_entropies = GRPOTrainer._get_per_token_logps_and_entropies


def test_none_equals_trl_over_two_optimizer_steps(tokenizer, policy, tmp_path):
    """TRL's defaults (dapo, gradient checkpointing): zero_grad / synchronize follow the optimizer steps."""
    trl, _ = run(GRPOTrainer, config(GRPOConfig, tmp_path / "trl", max_steps=2), tokenizer, copy.deepcopy(policy))
    ours, _ = run(PromaGRPOTrainer, config(PromaGRPOConfig, tmp_path / "ours", max_steps=2, proma_variant="none"),
                  tokenizer, copy.deepcopy(policy))
    assert len(trl.grad_history) == len(ours.grad_history) == 2
    for g_trl, g_ours in zip(trl.grad_history, ours.grad_history):
        names = list(g_trl)
        assert _rel(_flat(g_ours, names), _flat(g_trl, names)) <= FLOAT32_RTOL


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if t != "dapo"])
def test_none_reproduces_trl_gradient(loss_type, tokenizer, policy, tmp_path):
    opts = dict(loss_type=loss_type, **LOSS_TYPES[loss_type])
    trl, g_trl = run(GRPOTrainer, config(GRPOConfig, tmp_path / "trl", **opts), tokenizer, copy.deepcopy(policy))
    ours, g_ours = run(PromaGRPOTrainer, config(PromaGRPOConfig, tmp_path / "ours", proma_variant="none", **opts),
                       tokenizer, copy.deepcopy(policy))
    lengths = trl.state.log_history[0]
    assert lengths["completions/min_length"] < lengths["completions/max_length"]  # ragged: normalisations differ
    names = [n for n, g in g_trl.items() if g is not None]
    assert sorted(names) == sorted(n for n, g in g_ours.items() if g is not None)
    assert _rel(_flat(g_ours, names), _flat(g_trl, names)) <= FLOAT32_RTOL


def test_bf16_autocast_path(tokenizer, policy, tmp_path):
    """bf16=True (autocast on CPU): "none" equals TRL with the same unfused head; exact PROMA runs and logs."""
    _, g_trl = run(UnfusedGRPOTrainer, config(GRPOConfig, tmp_path / "trl", bf16=True), tokenizer,
                   copy.deepcopy(policy))
    _, g_none = run(PromaGRPOTrainer, config(PromaGRPOConfig, tmp_path / "none", bf16=True, proma_variant="none"),
                    tokenizer, copy.deepcopy(policy))
    names = list(g_trl)
    assert _rel(_flat(g_none, names), _flat(g_trl, names)) <= FLOAT32_RTOL
    ours, g_exact = run(PromaGRPOTrainer, config(PromaGRPOConfig, tmp_path / "exact", bf16=True), tokenizer,
                        copy.deepcopy(policy))
    logs = ours.state.log_history[0]
    assert 0 < logs["proma/removed_ratio"] < 1 and logs["proma/gram_rank_mean"] >= 1
    assert torch.isfinite(_flat(g_exact, names)).all()


def test_fused_head_is_caught(tokenizer, policy, tmp_path):
    with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight.*outside every captured module call"):
        run(FusedPromaTrainer, config(PromaGRPOConfig, tmp_path), tokenizer, copy.deepcopy(policy))


@pytest.mark.parametrize("opts,match", [
    (dict(beta=0.04), "beta=0.04"),
    (dict(num_iterations=2), "num_iterations=2"),
    (dict(steps_per_generation=4), "steps_per_generation=4"),
    (dict(top_entropy_quantile=0.5), "top_entropy_quantile"),
    (dict(entropy_coef=0.01), "entropy bonus"),
])
def test_unsupported_options_raise(opts, match, tokenizer, policy, tmp_path):
    from verification.trl_testkit import dataset, length_reward

    with pytest.raises(ValueError, match=match):
        PromaGRPOTrainer(model=copy.deepcopy(policy), reward_funcs=length_reward, train_dataset=dataset(),
                         args=config(PromaGRPOConfig, tmp_path, **opts), processing_class=tokenizer)


def test_none_equals_trl_with_lora(tokenizer, policy, tmp_path):
    """A PEFT model (TRL patches the base model's forward with its fused head): "none" gives TRL's gradient of
    the LoRA tensors, the only ones with a gradient."""
    from peft import LoraConfig, get_peft_model
    from trl_lora_ranks import LORA

    lora = get_peft_model(copy.deepcopy(policy), LoraConfig(**LORA))   # random A and B, drawn once
    grads = []
    for cls, cfg_cls, opts in ((GRPOTrainer, GRPOConfig, {}), (PromaGRPOTrainer, PromaGRPOConfig,
                                                              {"proma_variant": "none"})):
        grads.append(run(cls, config(cfg_cls, tmp_path / cls.__name__, **opts), tokenizer, copy.deepcopy(lora))[1])
    names = [n for n, g in grads[0].items() if g is not None]
    assert names and all("lora_" in n for n in names)
    assert sorted(names) == sorted(n for n, g in grads[1].items() if g is not None)
    assert _rel(_flat(grads[1], names), _flat(grads[0], names)) <= FLOAT32_RTOL
