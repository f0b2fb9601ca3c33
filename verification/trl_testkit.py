"""A tiny local GRPO setup for the TRL integration tests: Qwen3 (2 layers, 64 wide), a BPE tokenizer trained
on a few lines, an in-memory prompt dataset and a length reward. No network."""
from __future__ import annotations

import warnings

import torch

PROMPTS = ["1+2=", "3+4=", "5+6=", "7+8=", "2*3=", "4*5=", "6-1=", "9-3="]
# added to the EOS embedding row (tied to the head) so that some sampled completions end early: ragged lengths
# make the loss types' normalisations differ
EOS_BOOST = 0.5
CORPUS = PROMPTS + ["the answer is 3", "the answer is 7", "11 12 30 20 5 6 = + - *"] * 3


def tiny_tokenizer():
    from proma.rl.tokenizer import train_bpe, wrap

    return wrap(train_bpe(CORPUS, vocab_size=300))


def tiny_policy(tokenizer, seed=0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                      tie_word_embeddings=True, bos_token_id=tokenizer.eos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight[tokenizer.eos_token_id] += EOS_BOOST
    return model


def dataset(prompts=PROMPTS):
    from datasets import Dataset

    return Dataset.from_dict({"prompt": list(prompts)})


def length_reward(completions, **kwargs):
    """Reward differing across a group: so advantages are non-zero."""
    return [float(len(c) % 5) for c in completions]


def config(cls, out_dir, **overrides):
    """A 2-microbatch (gradient_accumulation_steps=2), 1-step, CPU config of ``cls`` (GRPOConfig or subclass)."""
    kw = dict(output_dir=str(out_dir), per_device_train_batch_size=4, num_generations=4, gradient_accumulation_steps=2,
              max_completion_length=6, max_steps=1, learning_rate=1e-3, logging_steps=1, report_to="none",
              use_cpu=True, bf16=False, save_strategy="no", seed=0, beta=0.0, max_grad_norm=0.0,
              disable_tqdm=True, dataloader_num_workers=0)
    kw.update(overrides)
    return cls(**kw)


def run(trainer_cls, args, tokenizer, model, callbacks=(), prompts=PROMPTS):
    """Train; return (trainer, {parameter name: gradient before the first optimizer step}).

    ``trainer.grad_history`` keeps that dict for every optimizer step.
    """
    from transformers import TrainerCallback

    history = []

    class Snapshot(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kw):
            history.append({n: None if p.grad is None else p.grad.detach().double().clone()
                            for n, p in model.named_parameters()})

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trainer_cls(model=model, reward_funcs=length_reward, args=args, train_dataset=dataset(prompts),
                              processing_class=tokenizer, callbacks=[Snapshot(), *callbacks])
        trainer.train()
    trainer.grad_history = history
    return trainer, history[0]
