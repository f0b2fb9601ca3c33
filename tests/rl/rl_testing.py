"""Helpers of the RL harness tests (imported as a plain module: tests/ has no packages): a tiny float64 Qwen3 and synthetic rollouts."""
import torch

from proma.rl.losses import group_advantages, token_logprobs
from proma.rl.rollout import pack
from proma.rl.train import RolloutBatch


def tiny_qwen3(vocab_size=64, dtype=torch.float64, seed=0, attn="eager"):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
                      tie_word_embeddings=True, eos_token_id=1, pad_token_id=0, bos_token_id=1)
    model = Qwen3ForCausalLM(cfg)
    model.set_attn_implementation(attn)
    return model.to(dtype)


def synthetic_rollout(model, *, n_prompts=4, group_size=4, seed=0, vocab_size=64) -> RolloutBatch:
    """Random prompts/completions of varied lengths, random 0/1 rewards, rollout log-probs of ``model``."""
    g = torch.Generator().manual_seed(seed)
    n = n_prompts * group_size
    prompts = [torch.randint(2, vocab_size, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    completions = [torch.randint(2, vocab_size, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist()
                   for _ in range(n)]
    batch = pack(prompts, completions, 0, "cpu")
    rewards = torch.randint(0, 2, (n,), generator=g).double()
    with torch.no_grad():
        old, full = token_logprobs(model, batch, full=True)
    batch["old_logp"] = old
    counts = batch["score_mask"][:, 1:].sum(1).long().tolist()
    return RolloutBatch(batch=batch, rewards=rewards, advantages=group_advantages(rewards, group_size),
                        n_tokens=batch["score_mask"].sum(1), rollout_logp=list(torch.split(full, counts)),
                        entropy=0.0, truncated_frac=0.0, texts=[""] * n)
