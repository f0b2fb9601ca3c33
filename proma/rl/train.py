"""The RL training loop: read it top to bottom.

``train(cfg)`` runs ``cfg.steps`` rollout steps of ``cfg.method`` and returns the run directory, which holds
``config.json``, ``metrics.jsonl`` (one record per optimizer step), ``eval.jsonl`` (greedy validation accuracy
``val/accuracy`` on a fixed test subset, its item count ``val/n`` and binomial standard error ``val/se``),
``ckpt.pt`` (resume point) and ``cache/`` (tokenizer + warm-start, unless ``cache_dir`` points elsewhere).

Each rollout step, in this order:
  1. eval/checkpoint  every ``eval_every`` / ``ckpt_every`` steps (and at the start and the end)
  2. rollout          sample prompts, G completions each (KV cache), rewards, group advantages, rollout-policy
                      log-probs (``sampling``)
  3. per minibatch    lr (constant after an optional linear warm-up, so resuming with more steps changes
                      nothing) -> micro-step loop (``update``) -> optimizer step -> diagnostics -> one record

Methods differ only in the micro-step (see ``update``). The setup lives in ``setup``, the run directory's files
in ``rundir``; this module is the loop and the helpers it alone uses.

Reproducibility: all randomness of step s is drawn from generators seeded by (seed, s), so a run resumed from a
checkpoint produces the same records as an uninterrupted one, and the same seed gives the same metrics.

Several processes (``torchrun --nproc_per_node W -m proma.rl.cli train ...``; see ``distributed``): each rank
rolls out its 1/W of the step's prompts and trains on local minibatches and microbatches of 1/W of the global
ones; the accumulator (or, for grpo, one all-reduce) averages the gradients, with PROMA projecting against the
union of the ranks' microbatches (``sync="global"``). Rank 0 writes the run directory; every record is global.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .config import TrainConfig
from .distributed import Ranks
from .distributed import init as init_ranks
from .evaluation import eval_record
from .rundir import append_jsonl, check_same_config, load_checkpoint, save_checkpoint, truncate_jsonl
from .sampling import RolloutBatch, do_rollout, minibatch_order, minibatch_rows
from .setup import Setup, resolve_device, setup
from .update import accumulate_gradient, accumulator_class, gradient_norm, parameter_snapshot, step_diagnostics

METRICS_FILE, EVAL_FILE = "metrics.jsonl", "eval.jsonl"
# Metrics already equal on every rank, and the token means among the others (see Ranks.combine).
GLOBAL_KEYS = ("step", "opt_step", "minibatch", "lr", "grad_norm", "reward", "reward_std", "zero_var_frac",
               "completion_len", "truncated_frac", "entropy")
TOKEN_MEAN_KEYS = ("local_kl", "local_kl_k1", "kl", "clip_ratio")


def _quiet(*args, **kwargs):
    """The ``log`` of ranks other than 0."""


def open_run(cfg: TrainConfig, ranks: Ranks, log) -> tuple[Setup, torch.optim.Optimizer, int, int]:
    """Run directory, policy and optimizer, resumed from ``ckpt.pt`` if any: ``(setup, opt, start, opt_step)``.

    A finished run (``start >= cfg.steps``) is left as it is; otherwise the logs are cut back to ``start``, the
    config is (re)written and every rank starts from rank 0's weights.
    """
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    if (run_dir / "config.json").exists():
        check_same_config(run_dir, cfg)
    # rank 0 builds (and caches) the tokenizer and warm-start first; the others then load them from the cache
    if not ranks.is_main:
        ranks.barrier()
    s = setup(cfg, log=log)
    if ranks.is_main:
        ranks.barrier()
    if cfg.method != "grpo":
        accumulator_class()  # fail now, not after the first rollout, if the method's API is missing
    opt = torch.optim.Adam(s.model.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                           weight_decay=cfg.weight_decay)
    start, opt_step = 0, 0
    resumed = load_checkpoint(run_dir, s.model, opt, s.device)
    if resumed is not None:
        start, opt_step = resumed
        log(f"resume: {run_dir / 'ckpt.pt'} at step {start}")
        if start >= cfg.steps:
            return s, opt, start, opt_step
    ranks.broadcast_(s.model)
    if ranks.is_main:
        truncate_jsonl(run_dir / METRICS_FILE, start)
        truncate_jsonl(run_dir / EVAL_FILE, start)
        (run_dir / "config.json").write_text(cfg.to_json())
    return s, opt, start, opt_step


def reward_stats(cfg: TrainConfig, rewards: torch.Tensor) -> dict:
    groups = rewards.view(-1, cfg.group_size)
    return {
        "reward": float(rewards.mean()),
        "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        "zero_var_frac": float((groups.max(1).values == groups.min(1).values).double().mean()),
    }


def rollout_record(cfg: TrainConfig, ro: RolloutBatch, step: int, ranks: Ranks) -> dict:
    """The rollout's share of each of its minibatches' records (global over ranks)."""
    return {"step": step, **reward_stats(cfg, ranks.gather(ro.rewards)),
            "completion_len": float(ranks.gather(ro.n_tokens.float()).mean()),
            **ranks.combine({"truncated_frac": ro.truncated_frac, "entropy": ro.entropy},
                            token_keys=("entropy",), tokens=float(ro.n_tokens.sum()))}


def lr_at(cfg: TrainConfig, opt_step: int) -> float:
    """Learning rate of optimizer step ``opt_step`` (0-based): linear warm-up, then constant."""
    return cfg.lr * min(1.0, (opt_step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr


def microbatch_saver(cfg: TrainConfig, s: Setup):
    """``on_microbatch`` callback that saves the first microbatch it sees to ``<out>/microbatch.pt``."""
    def save(mb, w, adv):
        path = s.run_dir / "microbatch.pt"
        if not path.exists():
            torch.save({"input_ids": mb["input_ids"].cpu(), "attention_mask": mb["attention_mask"].cpu(),
                        "score_mask": mb["score_mask"].cpu(), "weights": w.cpu(), "advantages": adv.cpu(),
                        "method": cfg.method, "aggregation": cfg.aggregation, "config": cfg.to_dict(),
                        "model_dir": str(s.warmstart_dir) if s.warmstart_dir else cfg.model}, path)

    return save


def train(cfg: TrainConfig, *, log=print) -> Path:
    from tqdm.auto import tqdm

    ranks = init_ranks(resolve_device(cfg.device))  # one process without torchrun
    lcfg = ranks.local_config(cfg)                  # this rank's share of the prompts and of each microbatch
    log = log if ranks.is_main else _quiet
    s, opt, start, opt_step = open_run(cfg, ranks, log)
    if start >= cfg.steps:  # already complete: leave its logs as they are
        return s.run_dir
    model, metrics_path, eval_path = s.model, s.run_dir / METRICS_FILE, s.run_dir / EVAL_FILE

    def write(path, record):
        if ranks.is_main:
            append_jsonl(path, record)

    save_microbatch = microbatch_saver(cfg, s) if cfg.save_microbatch and ranks.is_main else None
    bar = tqdm(range(start, cfg.steps), desc=f"{cfg.method}", disable=not (cfg.progress and ranks.is_main),
               initial=start, total=cfg.steps)
    val_acc = None
    for step in bar:
        # eval / checkpoint (before the step: the record of step s describes the policy that starts it)
        if step % cfg.eval_every == 0:
            ev = eval_record(s, step, opt_step, ranks)
            val_acc = ev["val/accuracy"]
            write(eval_path, ev)
        if step % cfg.ckpt_every == 0 and step > start and ranks.is_main:
            save_checkpoint(s.run_dir, model, opt, step, opt_step)

        # rollout
        t0 = time.perf_counter()
        ro = do_rollout(s, step, ranks)
        t_rollout = time.perf_counter() - t0
        common = rollout_record(cfg, ro, step, ranks)
        order = minibatch_order(lcfg, step)

        for m in range(cfg.minibatches):
            rows = minibatch_rows(lcfg, order, m)
            t1 = time.perf_counter()
            # lr
            for group in opt.param_groups:
                group["lr"] = lr_at(cfg, opt_step)
            # micro-step loop
            opt.zero_grad(set_to_none=True)
            pre = accumulate_gradient(lcfg, model, ro, rows, ranks=ranks,
                                      on_microbatch=save_microbatch if m == 0 else None)
            grad_norm = gradient_norm(model)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            before = parameter_snapshot(model) if cfg.second_order else None
            # step
            opt.step()
            opt_step += 1
            t2 = time.perf_counter()
            diag = step_diagnostics(lcfg, model, ro, rows, pre, before)
            t3 = time.perf_counter()
            # log
            rec = {**common, "opt_step": opt_step, "minibatch": m, "lr": lr_at(cfg, opt_step - 1),
                   "loss": pre["loss"], **diag, "clip_ratio": pre["clip_ratio"], "grad_norm": grad_norm,
                   **pre["proj"], "time/rollout": t_rollout / cfg.minibatches, "time/train": t2 - t1,
                   "time/metrics": t3 - t2, "step_time": t_rollout / cfg.minibatches + (t3 - t1)}
            # every rank's share -> the global record (token means weighted by the rank's scored tokens)
            rec = ranks.combine(rec, keep=GLOBAL_KEYS, token_keys=TOKEN_MEAN_KEYS, tokens=float(ro.n_tokens[rows].sum()))
            if val_acc is not None and m == 0 and step % cfg.eval_every == 0:
                rec["val/accuracy"] = val_acc
            write(metrics_path, rec)
        if cfg.progress:
            bar.set_postfix(reward=f"{common['reward']:.3f}", val=f"{val_acc:.3f}" if val_acc is not None else "-")

    # final eval and checkpoint
    write(eval_path, eval_record(s, cfg.steps, opt_step, ranks))
    if ranks.is_main:
        save_checkpoint(s.run_dir, model, opt, cfg.steps, opt_step)
    ranks.barrier()  # the run directory is complete when any rank returns
    return s.run_dir
