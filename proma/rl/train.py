"""The RL training loop: read it top to bottom.

``train(cfg)`` runs ``cfg.steps`` rollout steps of ``cfg.method`` and returns the run directory, which holds
``config.json``, ``metrics.jsonl`` (one record per optimizer step), ``eval.jsonl`` (greedy validation accuracy
``val/accuracy`` on a fixed test subset, its item count ``val/n`` and binomial standard error ``val/se``),
``ckpt.pt`` (resume point) and ``cache/`` (tokenizer + warm-start, unless ``cache_dir`` points elsewhere).

One ``ProjectedAccumulator`` serves the whole run (none for grpo). Each rollout step, in this order (the body of
``train``'s loop, the last function of this module; the helpers it calls are defined above it, in about the order
it calls them):
  1. eval/checkpoint  every ``eval_every`` / ``ckpt_every`` steps (and at the start and the end)
  2. rollout          sample prompts, G completions each (KV cache), rewards, group advantages, rollout-policy
                      log-probs (``rollout``)
  3. per minibatch    lr (constant after an optional linear warm-up, so resuming with more steps changes
                      nothing) -> the out-of-sample probe's completions (``oos_kl_prompts``) -> the micro-step
                      loop (``minibatch_gradient``: ``acc.backward`` per microbatch, or grpo's
                      ``loss.backward()``) -> optimizer step -> diagnostics -> one record

The loop reads one config, ``cfg``: this rank's share of the run (``Ranks.local_config``: the prompts and
microbatch size divided by the number of processes; the run's own config in one process). The run's config as
written to ``config.json`` is ``parts.cfg``, which the rollout, the evaluation and the saved microbatch read.

Methods differ only in the micro-step. What a run is built from lives in ``build``, the slicing of a rollout
in ``batching``, the run directory's files in ``rundir``; this module is the loop and the helpers it alone uses.

Reproducibility: all randomness of step s is drawn from generators seeded by (seed, s), so a run resumed from a
checkpoint produces the same records as an uninterrupted one, and the same seed gives the same metrics.

Several processes (``torchrun --nproc_per_node W -m proma.rl.cli train ...``; see ``distributed``): each rank
rolls out its 1/W of the step's prompts and trains on local minibatches and microbatches of 1/W of the global
ones; the accumulator (or, for grpo, one all-reduce) averages the gradients, with PROMA projecting against the
union of the ranks' microbatches (``sync="global"``). Rank 0 writes the run directory; every record is global.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from proma import ProjectedAccumulator

from .batching import microbatches, minibatch_order, minibatch_rows, minibatch_weights
from .build import RunParts, build_run, resolve_device
from .config import PUBLISHED_CODE_NAME, TrainConfig
from .step_diagnostics import gradient_norm, parameter_snapshot, step_diagnostics, summarize_stats
from .distributed import Ranks
from .distributed import init as init_ranks
from .evaluation import eval_record
from .generation import select
from .heldout_probe import Probe, probe_kl, sample_probe
from .losses import clipped_fraction_tokens, grpo_loss, sum_scored_logprobs, token_logprobs
from .published_code import PublishedCode
from .rollout import RolloutBatch, collect_rollout
from .rundir import (append_jsonl, check_same_config, load_checkpoint, lock_run_dir, save_checkpoint, truncate_jsonl,
                     write_config)

METRICS_FILE, EVAL_FILE = "metrics.jsonl", "eval.jsonl"
# Metrics already equal on every rank, and the token means among the others (see Ranks.combine).
GLOBAL_KEYS = ("step", "opt_step", "minibatch", "lr", "grad_norm", "reward", "reward_std", "zero_var_frac",
               "completion_len", "truncated_frac", "entropy", "oos_local_kl")
TOKEN_MEAN_KEYS = ("local_kl", "local_kl_k1", "kl", "clip_ratio")


def _quiet(*args, **kwargs):
    """The ``log`` of ranks other than 0."""


def open_run(cfg: TrainConfig, ranks: Ranks, log) -> tuple[RunParts, torch.optim.Optimizer, int, int]:
    """Run directory, policy and optimizer, resumed from ``ckpt.pt`` if any:
    ``(parts, optimizer, start_step, opt_step)``.

    A finished run (``start_step >= cfg.steps``) is left as it is; otherwise the logs are cut back to
    ``start_step``, the config is (re)written and every rank starts from rank 0's weights.
    """
    ranks.local_config(cfg)  # a config the ranks cannot share out is refused before the run directory is touched
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    if ranks.is_main:
        lock_run_dir(run_dir)  # the one writer of the run directory until this process exits
    if (run_dir / "config.json").exists():
        check_same_config(run_dir, cfg)
    # rank 0 builds (and caches) the tokenizer and warm-start first; the others then load them from the cache
    if not ranks.is_main:
        ranks.barrier()
    parts = build_run(cfg, log=log)
    if ranks.is_main:
        ranks.barrier()
    optimizer = torch.optim.Adam(parts.model.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                 weight_decay=cfg.weight_decay)
    start_step, opt_step = 0, 0
    resumed = load_checkpoint(run_dir, parts.model, optimizer, parts.device)
    if resumed is not None:
        start_step, opt_step = resumed
        log(f"resume: {run_dir / 'ckpt.pt'} at step {start_step}")
        if start_step >= cfg.steps:
            return parts, optimizer, start_step, opt_step
    ranks.broadcast_(parts.model)
    if ranks.is_main:
        truncate_jsonl(run_dir / METRICS_FILE, start_step)
        truncate_jsonl(run_dir / EVAL_FILE, start_step)
        write_config(run_dir, cfg)
    return parts, optimizer, start_step, opt_step


def microbatch_saver(parts: RunParts):
    """``on_microbatch`` callback that saves the first microbatch it sees to ``<out>/microbatch.pt`` (with the run's
    config, ``parts.cfg``)."""
    cfg = parts.cfg

    def save(batch, weights, advantages):
        path = parts.run_dir / "microbatch.pt"
        if not path.exists():
            torch.save({"input_ids": batch["input_ids"].cpu(), "attention_mask": batch["attention_mask"].cpu(),
                        "score_mask": batch["score_mask"].cpu(), "weights": weights.cpu(),
                        "advantages": advantages.cpu(), "method": cfg.method, "aggregation": cfg.aggregation,
                        "config": cfg.to_dict(),
                        "model_dir": str(parts.warmstart_dir) if parts.warmstart_dir else cfg.model}, path)

    return save


def method_accumulator(cfg: TrainConfig, model):
    """Context giving the run's one ``ProjectedAccumulator`` with ``cfg.method``'s options (its hooks removed on
    exit), or None for grpo, whose token-level loss is back-propagated as it is; for proma-code the
    ``PublishedCode`` micro-step around its accumulator."""
    options = cfg.accumulator_kwargs
    if options is None:
        return contextlib.nullcontext()
    if cfg.method == PUBLISHED_CODE_NAME:
        return PublishedCode(model, options, clip_eps=cfg.clip_eps)
    return ProjectedAccumulator(model, **options)


def paused(acc):
    """``acc.paused()``: forwards that are no microbatch (the probe's sampling, the diagnostics) are not captured;
    nothing to pause for grpo (``acc`` None)."""
    return acc.paused() if acc is not None else contextlib.nullcontext()


def reward_stats(cfg: TrainConfig, rewards: torch.Tensor) -> dict:
    groups = rewards.view(-1, cfg.group_size)
    return {
        "reward": float(rewards.mean()),
        "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        "zero_var_frac": float((groups.max(1).values == groups.min(1).values).double().mean()),
    }


def rollout_record(cfg: TrainConfig, rollout: RolloutBatch, step: int, ranks: Ranks) -> dict:
    """The rollout's share of each of its minibatches' records (global over ranks)."""
    return {"step": step, **reward_stats(cfg, ranks.gather(rollout.rewards)),
            "completion_len": float(ranks.gather(rollout.n_tokens.float()).mean()),
            **ranks.combine({"truncated_frac": rollout.truncated_frac, "entropy": rollout.entropy},
                            token_keys=("entropy",), tokens=float(rollout.n_tokens.sum()))}


def lr_at(cfg: TrainConfig, opt_step: int) -> float:
    """Learning rate of optimizer step ``opt_step`` (0-based): linear warm-up, then constant."""
    return cfg.lr * min(1.0, (opt_step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr


def minibatch_gradient(cfg: TrainConfig, model, rollout: RolloutBatch, rows: list[int], acc, *,
                       ranks: Ranks = Ranks(), on_microbatch=None) -> dict:
    """The micro-step loop of minibatch ``rows``: leaves its gradient (the mean over ranks) in p.grad.

    ``cfg`` is this rank's share of the run (``Ranks.local_config``), as in ``train``'s loop.

    grpo (``acc`` None) back-propagates each microbatch's token-level PPO-clip surrogate; the other methods hand
    each microbatch's (b,) sequence log-probs and per-sequence weights (``losses``) to the run's accumulator.
    Returns ``loss`` (the minibatch loss), ``clip_ratio``, ``proj`` (the accumulator's statistics) and, per
    microbatch, the pre-step log-softmax rows ``pre_logp`` (n_scored, V) and token log-probs ``pre_tok_logp``
    (b, t) (both empty unless ``cfg.kl_metrics``).
    """
    weights, token_coef = minibatch_weights(cfg, rollout, rows, ranks)
    position = {row: k for k, row in enumerate(rows)}
    loss_sum, n_clipped, pre_logp, pre_tok_logp, summaries = 0.0, 0.0, [], [], []
    if acc is not None:
        acc.zero_grad()
    for mb_rows in microbatches(cfg, rows):
        batch, k = select(rollout.batch, mb_rows), [position[r] for r in mb_rows]
        token_logp, full_logp = token_logprobs(model, batch, full=cfg.kl_metrics)
        mask, adv = batch["score_mask"], rollout.advantages[mb_rows].to(batch["score_mask"].device)
        if acc is None:  # grpo: PPO-clip surrogate per token against the rollout policy, plain backward
            loss, clipped = grpo_loss(token_logp, batch["old_logp"], adv, token_coef[k].to(mask.device), mask,
                                      cfg.clip_eps)
            loss.backward()
        else:            # the others: sum_i w_i logp_i through the accumulator (PROMA projects here)
            seq_logp = sum_scored_logprobs(token_logp, mask)
            w = weights[k].to(device=seq_logp.device, dtype=seq_logp.dtype)
            if cfg.method == PUBLISHED_CODE_NAME:  # the fork's all-ones gradient beside the Linear projection
                acc.backward(model, batch, seq_logp, w, token_coef[k])
            else:
                acc.backward(seq_logp, w)
            summaries.append(acc.stats().get("summary", {}))  # stats() describes the last microbatch only
            loss = (w * seq_logp.detach()).sum()
            clipped = clipped_fraction_tokens(token_logp.detach(), batch["old_logp"], adv, mask, cfg.clip_eps)
        if on_microbatch is not None:
            on_microbatch(batch, weights[k], adv)
        loss_sum += float(loss.detach())
        n_clipped += float(clipped)
        if cfg.kl_metrics:
            pre_logp.append(full_logp.detach())
            pre_tok_logp.append(token_logp.detach())
    if acc is not None:
        acc.synchronize()  # the mean over ranks (no-op in one process)
        if cfg.method == PUBLISHED_CODE_NAME:
            acc.finish()
    else:
        ranks.average_gradients(model)
    return {"loss": loss_sum, "clip_ratio": n_clipped / max(1.0, float(rollout.n_tokens[rows].sum())),
            "proj": summarize_stats(summaries), "pre_logp": pre_logp, "pre_tok_logp": pre_tok_logp}


def optimizer_step(cfg: TrainConfig, parts, optimizer, acc, ranks, rollout, order, minibatch: int, opt_step: int, *,
                   shared: dict, rollout_seconds: float, on_microbatch=None) -> dict:
    """One optimizer step on one minibatch of the rollout (the probe before it, the gradient, the step, the
    diagnostics of the step taken); returns the global record: the rollout's ``shared`` fields, then the step's."""
    rows = minibatch_rows(cfg, order, minibatch)
    lr = lr_at(cfg, opt_step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    # the out-of-sample probe: fresh held-out completions from the policy before this step
    probe, probe_seconds = None, 0.0
    if cfg.oos_kl_prompts:
        t_probe = time.perf_counter()
        with paused(acc):
            probe = sample_probe(cfg, parts.model, parts.tokenizer, parts.heldout_examples, opt_step, parts.device)
        probe_seconds = time.perf_counter() - t_probe
    # the micro-step loop: acc.backward per microbatch, the minibatch's gradient left in p.grad
    t_train = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    pre_step = minibatch_gradient(cfg, parts.model, rollout, rows, acc, ranks=ranks, on_microbatch=on_microbatch)
    grad_norm = gradient_norm(parts.model)
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(parts.model.parameters(), cfg.grad_clip)
    before = parameter_snapshot(parts.model) if cfg.second_order else None
    optimizer.step()
    t_stepped = time.perf_counter()
    # diagnostics of the step just taken (their forwards are no microbatch: not captured)
    with paused(acc):
        diagnostics = step_diagnostics(cfg, parts.model, rollout, rows, pre_step, before)
        if probe is not None:
            diagnostics["oos_local_kl"] = probe_kl(parts.model, probe)
    train_seconds, metrics_seconds = t_stepped - t_train, time.perf_counter() - t_stepped
    # log: every rank's share -> the global record (token means weighted by the rank's scored tokens)
    record = {**shared, "opt_step": opt_step + 1, "minibatch": minibatch, "lr": lr, "loss": pre_step["loss"],
              **diagnostics, "clip_ratio": pre_step["clip_ratio"], "grad_norm": grad_norm, **pre_step["proj"],
              "time/rollout": rollout_seconds, "time/train": train_seconds, "time/metrics": metrics_seconds,
              "step_time": rollout_seconds + train_seconds + metrics_seconds + probe_seconds}
    if probe is not None:
        record["time/probe"] = probe_seconds
    return ranks.combine(record, keep=GLOBAL_KEYS, token_keys=TOKEN_MEAN_KEYS,
                         tokens=float(rollout.n_tokens[rows].sum()))
    return record


def train(cfg: TrainConfig, *, log=print) -> Path:
    """Run ``cfg`` (resuming from its checkpoint, if any) and return its run directory."""
    from tqdm.auto import tqdm

    ranks = init_ranks(resolve_device(cfg.device))  # one process without torchrun
    if cfg.method == PUBLISHED_CODE_NAME and ranks.active:
        raise ValueError(f"method={PUBLISHED_CODE_NAME!r} runs in one process (it reproduces a single-process "
                         f"measurement of the published code); got {ranks.world} processes")
    log = log if ranks.is_main else _quiet
    parts, optimizer, start_step, opt_step = open_run(cfg, ranks, log)
    if start_step >= cfg.steps:  # already complete: leave its logs as they are
        return parts.run_dir
    cfg = ranks.local_config(cfg)  # from here on the one config: this rank's share (the run's is parts.cfg)
    model, run_dir = parts.model, parts.run_dir

    def write(file_name, record):
        if ranks.is_main:
            append_jsonl(run_dir / file_name, record)

    save_microbatch = microbatch_saver(parts) if cfg.save_microbatch and ranks.is_main else None
    bar = tqdm(range(start_step, cfg.steps), desc=cfg.method, disable=not (cfg.progress and ranks.is_main),
               initial=start_step, total=cfg.steps)
    val_acc = None
    with method_accumulator(cfg, model) as acc:
        for step in bar:
            # 1. eval / checkpoint (before the step: the record of step s describes the policy that starts it)
            if step % cfg.eval_every == 0:
                evaluation = eval_record(parts, step, opt_step, ranks)
                val_acc = evaluation["val/accuracy"]
                write(EVAL_FILE, evaluation)
            if step % cfg.ckpt_every == 0 and step > start_step and ranks.is_main:
                save_checkpoint(run_dir, model, optimizer, step, opt_step)
            # 2. rollout
            t_rollout = time.perf_counter()
            rollout = collect_rollout(parts, step, ranks)
            rollout_seconds = (time.perf_counter() - t_rollout) / cfg.minibatches  # each minibatch's share
            shared = rollout_record(cfg, rollout, step, ranks)
            order = minibatch_order(cfg, step)
            # 3. per minibatch: one optimizer step, one record
            for minibatch in range(cfg.minibatches):
                record = optimizer_step(cfg, parts, optimizer, acc, ranks, rollout, order, minibatch, opt_step,
                                        shared=shared, rollout_seconds=rollout_seconds,
                                        on_microbatch=save_microbatch if minibatch == 0 else None)
                opt_step += 1
                if val_acc is not None and minibatch == 0 and step % cfg.eval_every == 0:
                    record["val/accuracy"] = val_acc
                write(METRICS_FILE, record)
            if cfg.progress:
                bar.set_postfix(reward=f"{shared['reward']:.3f}", val=f"{val_acc:.3f}" if val_acc is not None else "-")

    # final eval and checkpoint
    write(EVAL_FILE, eval_record(parts, cfg.steps, opt_step, ranks))
    if ranks.is_main:
        save_checkpoint(run_dir, model, optimizer, cfg.steps, opt_step)
    ranks.barrier()  # the run directory is complete when any rank returns
    return run_dir
