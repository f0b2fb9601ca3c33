"""A TRL user's script with LoRA and PROMA's oracle, run by ``test_trl_oracle.py`` as it would be run by hand.

    python tests/integrations/trl_lora_ranks.py OUT [local|global ...]
    torchrun --nproc_per_node 2 tests/integrations/trl_lora_ranks.py OUT local global   (gloo, CPU)

For each sync mode: the tiny Qwen3 with LoRA adapters on q_proj and v_proj, one optimizer step of two
microbatches, oracle cases in ``OUT/<sync>/cases``; each rank saves the LoRA gradient the optimizer step saw
(after ``acc.synchronize()``) to ``OUT/<sync>/grads<rank>.pt`` and its logged metrics to ``logs<rank>.pt``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch


from verification.trl_testkit import config, run, tiny_policy, tiny_tokenizer  # noqa: E402

# random A and B: PEFT's default B = 0 makes every A gradient zero (an uninformative case)
LORA = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False)


def lora_policy(tokenizer):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(tiny_policy(tokenizer), LoraConfig(**LORA))


def main(out: Path, syncs) -> None:
    from proma.integrations.trl import PromaGRPOConfig, PromaGRPOTrainer

    torch.set_num_threads(1)
    tokenizer = tiny_tokenizer()
    for sync in syncs:
        args = config(PromaGRPOConfig, out / sync / "run", proma_sync=sync, proma_oracle_dir=str(out / sync / "cases"))
        trainer, grads = run(PromaGRPOTrainer, args, tokenizer, lora_policy(tokenizer))
        rank = trainer.accelerator.process_index
        torch.save({n: g for n, g in grads.items() if g is not None}, out / sync / f"grads{rank}.pt")
        torch.save(trainer.state.log_history, out / sync / f"logs{rank}.pt")
    # tear the process group down before exit (as trl_fsdp's script does): gloo's threads left to the interpreter's
    # exit can abort a rank ("terminate called without an active exception", seen once in a full run)
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:] or ["local"])
