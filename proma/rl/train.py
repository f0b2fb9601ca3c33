"""The RL training loop: read it top to bottom.

``train(cfg)`` runs ``cfg.steps`` rollout steps of ``cfg.method`` and returns the run directory, which holds
``config.json``, ``metrics.jsonl`` (one record per optimizer step), ``eval.jsonl`` (greedy validation accuracy
on a fixed test subset), ``ckpt.pt`` (resume point) and ``cache/`` (tokenizer + warm-start, unless
``cache_dir`` points elsewhere).

Each rollout step, in this order:
  1. lr               constant after an optional linear warm-up (so resuming with more steps changes nothing)
  2. eval/checkpoint  every ``eval_every`` / ``ckpt_every`` steps (and at the start and the end)
  3. rollout          sample prompts, G completions each (temperature 1, KV cache), rewards, group advantages,
                      rollout-policy log-probs (for GRPO's ratio, ``kl`` and ``entropy``)
  4. per minibatch    micro-step loop -> optimizer step -> diagnostics -> one metrics record

Methods differ only in the micro-step: ``grpo`` backpropagates the token-level clipped surrogate; the others
hand each microbatch's (b,) sequence log-probs and per-sequence weights (see ``losses``) to
``proma.ProjectedAccumulator`` (variant none / proma / intra), which leaves the accumulated gradient in p.grad.

Reproducibility: all randomness of step s is drawn from generators seeded by (seed, s), so a run resumed from a
checkpoint produces the same records as an uninterrupted one, and the same seed gives the same metrics.

Several processes (``torchrun --nproc_per_node W -m proma.rl.cli train ...``; see ``distributed``): each rank
rolls out its 1/W of the step's prompts and trains on local minibatches and microbatches of 1/W of the global
ones; the accumulator (or, for grpo, one all-reduce) averages the gradients, with PROMA projecting against the
union of the ranks' microbatches (``sync="global"``). Rank 0 writes the run directory; every record is global.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import RESUMABLE_CHANGES, TrainConfig
from .data import make_examples, reward
from .distributed import Ranks
from .distributed import init as init_ranks
from .losses import (
    aggregation_coefficients,
    clipped_fraction_tokens,
    group_advantages,
    grpo_loss,
    sequence_logprob,
    sequence_weights,
    token_logprobs,
)
from .metrics import categorical_entropy, categorical_kl, directional_derivatives, second_order_kl
from .policy import build_policy, count_parameters, get_warmstarted, load_policy
from .rollout import generate, pack, select
from .tokenizer import get_tokenizer

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r}: CUDA is not available")
    return dev


def _accumulator_class():
    from proma import ProjectedAccumulator  # the method's public API, nothing else of proma/

    return ProjectedAccumulator


# --------------------------------------------------------------------------------------------------------------
# Setup: data, tokenizer, policy (warm-started), shared by train() and sample_microbatch()
# --------------------------------------------------------------------------------------------------------------

@dataclass
class Setup:
    cfg: TrainConfig
    device: torch.device
    run_dir: Path
    tokenizer: object
    model: torch.nn.Module
    train_examples: list        # the RL prompt pool (cfg.train_pool of the train split)
    eval_examples: list
    warmstart_dir: Path | None


def setup(cfg: TrainConfig, *, log=print) -> Setup:
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    run_dir = Path(cfg.out)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else run_dir / "cache"
    train_examples = make_examples(cfg.task, "train", cfg.data_dir)
    test_examples = make_examples(cfg.task, "test", cfg.data_dir)
    # RL prompt pool: a fixed (seed-independent) subset of the train split, so every run of a grid trains on the
    # same prompts and each is revisited a few times within a short run; the warm-start uses the whole split.
    rl_examples = train_examples
    if cfg.train_pool and cfg.train_pool < len(train_examples):
        pool = np.random.default_rng(54321).permutation(len(train_examples))[: cfg.train_pool]
        rl_examples = [train_examples[i] for i in sorted(pool)]
    # Fixed evaluation subset: a seed-independent shuffle, so every run of a task is scored on the same items.
    order = np.random.default_rng(12345).permutation(len(test_examples))[: cfg.eval_size]
    eval_examples = [test_examples[i] for i in order]
    warm_dir = None
    if cfg.model is not None:
        model, tokenizer = load_policy(cfg.model)
        log(f"policy: loaded {cfg.model}")
    else:
        tokenizer = get_tokenizer(cfg.vocab_size, cache_dir, cfg.data_dir)
        model = build_policy(cfg, tokenizer)
        if cfg.dtype != "float64":  # HF eager attention gives NaN on left-padded float64 batches
            model.set_attn_implementation("eager")  # ~20% faster than SDPA at these sizes on CPU
    model.to(device=device, dtype=DTYPES[cfg.dtype])
    if cfg.model is None and cfg.warmstart_steps > 0:
        warm_dir = get_warmstarted(cfg, model, tokenizer, train_examples, device, cache_dir, log=log)
    log(f"policy: {count_parameters(model):,} parameters, vocab {len(tokenizer)}, device {device}")
    return Setup(cfg, device, run_dir, tokenizer, model, rl_examples, eval_examples, warm_dir)


# --------------------------------------------------------------------------------------------------------------
# Rollout: everything computed once per step from the policy that generates the data
# --------------------------------------------------------------------------------------------------------------

@dataclass
class RolloutBatch:
    batch: dict                 # sequence batch (rollout.py layout) + "old_logp" (n, t) rollout-policy log-probs
    rewards: torch.Tensor       # (n,)
    advantages: torch.Tensor    # (n,)
    n_tokens: torch.Tensor      # (n,) scored tokens per sequence
    rollout_logp: list          # per sequence (n_i, V) rollout-policy log-softmax rows (kl_metrics only)
    entropy: float
    truncated_frac: float
    texts: list


def step_rng(cfg: TrainConfig, step: int, purpose: int) -> np.random.Generator:
    """Generator of step ``step`` for one purpose (0 prompts, 1 sampling seed, 2 minibatch order)."""
    return np.random.default_rng([cfg.seed, step, purpose])


def minibatch_order(cfg: TrainConfig, step: int) -> np.ndarray:
    """Order of the rollout's sequences before slicing into minibatches (a permutation when shuffling)."""
    if not cfg.shuffle:
        return np.arange(cfg.rollout_size)
    return step_rng(cfg, step, 2).permutation(cfg.rollout_size)


def do_rollout(s: Setup, step: int, ranks: Ranks = Ranks()) -> RolloutBatch:
    cfg, model, tok = s.cfg, s.model, s.tokenizer
    idx = step_rng(cfg, step, 0).choice(len(s.train_examples), size=cfg.prompts_per_step, replace=False)
    examples = [s.train_examples[i] for i in idx[ranks.split(cfg.prompts_per_step, "prompts_per_step")]]
    # generate() samples from the global RNG; each rank draws its own stream
    torch.manual_seed(int(step_rng(cfg, step, 1).integers(2**62)) + ranks.rank)
    ro = generate(model, tok, [e.prompt for e in examples], group_size=cfg.group_size,
                  max_new_tokens=cfg.new_tokens, temperature=cfg.temperature, device=s.device)
    answers = [e.answer for e in examples for _ in range(cfg.group_size)]
    rewards = torch.tensor([reward(cfg.task, t, a, format_reward=cfg.format_reward)
                            for t, a in zip(ro.texts, answers)], dtype=torch.float64)
    adv = group_advantages(rewards, cfg.group_size, kind=cfg.advantage, eps=cfg.adv_eps)
    batch = pack(ro.prompt_ids, ro.completion_ids, tok.pad_token_id, s.device)
    # Rollout-policy log-probs, in microbatch-sized chunks to bound memory.
    n = len(ro.texts)
    old_logp = torch.zeros(batch["input_ids"].shape, dtype=torch.float32, device=s.device)
    rollout_logp, ent_sum = [], 0.0
    with torch.no_grad():
        for lo in range(0, n, cfg.microbatch_size):
            rows = list(range(lo, min(n, lo + cfg.microbatch_size)))
            mb = select(batch, rows)
            logp, full = token_logprobs(model, mb, full=cfg.kl_metrics)
            old_logp[rows, : logp.shape[1]] = logp.float()
            if cfg.kl_metrics:
                ent_sum += float(categorical_entropy(full).sum())
                counts = mb["score_mask"][:, 1:].sum(1).long().tolist()
                rollout_logp.extend(torch.split(full.float(), counts))
    batch["old_logp"] = old_logp
    n_tokens = batch["score_mask"].sum(1)
    entropy = ent_sum / float(n_tokens.sum()) if cfg.kl_metrics else float("nan")
    return RolloutBatch(batch, rewards, adv, n_tokens, rollout_logp, entropy,
                        float(np.mean(ro.truncated)), ro.texts)


def reward_stats(cfg: TrainConfig, rewards: torch.Tensor) -> dict:
    groups = rewards.view(-1, cfg.group_size)
    return {
        "reward": float(rewards.mean()),
        "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        "zero_var_frac": float((groups.max(1).values == groups.min(1).values).double().mean()),
    }


# --------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------

def evaluate(s: Setup, batch_size: int = 128, ranks: Ranks = Ranks()) -> float:
    """Greedy exact-match accuracy on the fixed test subset (each rank scores every W-th example)."""
    cfg, hits = s.cfg, 0.0
    mine = s.eval_examples[ranks.rank::ranks.world]
    for lo in range(0, len(mine), batch_size):
        chunk = mine[lo: lo + batch_size]
        ro = generate(s.model, s.tokenizer, [e.prompt for e in chunk], group_size=1,
                      max_new_tokens=cfg.new_tokens, greedy=True, device=s.device)
        hits += sum(reward(cfg.task, t, e.answer) for t, e in zip(ro.texts, chunk))
    return ranks.sum([hits])[0] / max(1, len(s.eval_examples))


# --------------------------------------------------------------------------------------------------------------
# Run directory: config, checkpoints, JSONL logs
# --------------------------------------------------------------------------------------------------------------

def _append_jsonl(path: Path, record: dict):
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_jsonl(path: Path, before_step: int):
    """Keep only records of steps < before_step (records written after the checkpoint are redone)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] < before_step]
    path.write_text("".join(line + "\n" for line in keep))


def _check_same_config(run_dir: Path, cfg: TrainConfig):
    old = json.loads((run_dir / "config.json").read_text())
    new = cfg.to_dict()
    defaults = TrainConfig.from_preset(cfg.preset).to_dict()
    # a field missing from the saved config was added later: it matches when it keeps its default
    diff = [k for k in new if k not in RESUMABLE_CHANGES and old.get(k, defaults.get(k)) != new[k]]
    if diff:
        k = diff[0]
        raise ValueError(
            f"out={cfg.out!r}: run directory holds a run with a different config ({k}: {old.get(k)!r} there, "
            f"{new[k]!r} now); choose another --out or delete it"
        )


def save_checkpoint(run_dir: Path, model, opt, next_step: int, opt_step: int):
    tmp = run_dir / f"ckpt.pt.tmp{os.getpid()}"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "next_step": next_step,
                "opt_step": opt_step}, tmp)
    os.replace(tmp, run_dir / "ckpt.pt")


# --------------------------------------------------------------------------------------------------------------
# One optimizer step's micro-step loop
# --------------------------------------------------------------------------------------------------------------

def microbatches(cfg: TrainConfig, rows: list[int]) -> list[list[int]]:
    return [rows[i: i + cfg.microbatch_size] for i in range(0, len(rows), cfg.microbatch_size)]


def minibatch_weights(cfg: TrainConfig, ro: RolloutBatch, rows: list[int], ranks: Ranks = Ranks()):
    """(per-sequence weights w_i, per-token coefficients c_i) of the minibatch ``rows`` (losses.py)."""
    adv, n_tok = ro.advantages[rows], ro.n_tokens[rows].cpu()
    w, c = sequence_weights(adv, n_tok, cfg.aggregation), aggregation_coefficients(n_tok, cfg.aggregation)
    if cfg.aggregation == "token-mean":  # N is the global minibatch's token count (1 in one process)
        f = ranks.token_mean_factor(float(n_tok.sum()))
        w, c = w * f, c * f
    return w, c


def accumulate_gradient(cfg: TrainConfig, model, ro: RolloutBatch, rows: list[int], *, on_microbatch=None,
                        ranks: Ranks = Ranks()):
    """Run the micro-step loop of minibatch ``rows``; leaves the gradient (averaged over ranks) in p.grad.

    Returns a dict with ``loss`` (the minibatch loss), ``clip_ratio``, ``pre_logp`` (per microbatch, the
    pre-step (n_scored, V) log-softmax rows, when ``cfg.kl_metrics``) and ``proj`` (accumulator stats).
    """
    weights, coef = minibatch_weights(cfg, ro, rows, ranks)
    pos = {r: k for k, r in enumerate(rows)}
    out = {"loss": 0.0, "n_clipped": 0.0, "pre_logp": [], "pre_tok_logp": [], "proj": {}}
    summaries = []
    acc_kwargs = cfg.accumulator_kwargs
    acc = _accumulator_class()(model, **acc_kwargs) if acc_kwargs is not None else None
    try:
        if acc is not None:
            acc.zero_grad()
        for mb_rows in microbatches(cfg, rows):
            mb = select(ro.batch, mb_rows)
            k = [pos[r] for r in mb_rows]
            logp, full = token_logprobs(model, mb, full=cfg.kl_metrics)
            mask, adv = mb["score_mask"], ro.advantages[mb_rows].to(mb["score_mask"].device)
            if acc is None:  # grpo: token-level clipped surrogate, plain backward
                loss, n_clipped = grpo_loss(logp, mb["old_logp"], adv, coef[k].to(mask.device), mask, cfg.clip_eps)
                loss.backward()
            else:  # sequence log-probs and per-sequence weights through the accumulator
                seq_logp = sequence_logprob(logp, mask)
                w = weights[k].to(device=seq_logp.device, dtype=seq_logp.dtype)
                acc.backward(seq_logp, w)
                summaries.append(acc.stats().get("summary", {}))
                loss = (w * seq_logp.detach()).sum()
                n_clipped = clipped_fraction_tokens(logp.detach(), mb["old_logp"], adv, mask, cfg.clip_eps)
            if on_microbatch is not None:
                on_microbatch(mb, weights[k], adv)
            out["loss"] += float(loss.detach())
            out["n_clipped"] += float(n_clipped)
            if cfg.kl_metrics:
                out["pre_logp"].append(full.detach())
                out["pre_tok_logp"].append(logp.detach())
        if acc is not None:
            acc.synchronize()  # the mean over ranks (no-op in one process)
        else:
            ranks.average_gradients(model)
        out["proj"] = summarize_stats(summaries)
    finally:
        if acc is not None:
            acc.close()
    out["clip_ratio"] = out.pop("n_clipped") / max(1.0, float(ro.n_tokens[rows].sum()))
    return out


_COUNT_KEYS = ("projected", "plain", "excluded", "microbatches")


def summarize_stats(summaries: list[dict]) -> dict:
    """``proj/<name>`` floats from the accumulator's per-microbatch ``stats()["summary"]`` dicts.

    ``stats()`` describes the last microbatch only, so it is read after every microbatch: norms and ratios are
    averaged over the minibatch's microbatches (``proj/removed_ratio``; for ``proma`` the first microbatch
    has nothing to project against and contributes 0), ``proj/removed_ratio_max`` is the largest, counts are
    the last microbatch's.
    """
    out = {}
    for key in summaries[0] if summaries else ():
        values = [s.get(key) for s in summaries]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            continue
        out[f"proj/{key}"] = float(values[-1]) if key in _COUNT_KEYS else float(np.mean(values))
        if key == "removed_ratio":
            out["proj/removed_ratio_max"] = float(np.max(values))
    return out


def step_diagnostics(cfg: TrainConfig, model, ro: RolloutBatch, rows: list[int], pre: dict, before: dict | None):
    """Exact local KL, its k1 estimate, KL to the rollout policy and the second-order estimate (metrics.py)."""
    rec = {}
    if cfg.kl_metrics:
        kl_tok, k1_tok, kl_roll, kl_seq = [], [], [], []
        with torch.no_grad():
            for j, mb_rows in enumerate(microbatches(cfg, rows)):
                mb = select(ro.batch, mb_rows)
                logp_after, full_after = token_logprobs(model, mb, full=True)
                sel = mb["score_mask"][:, 1:] > 0
                seq_of_row = sel.nonzero()[:, 0]
                kl = categorical_kl(pre["pre_logp"][j].double(), full_after.double())
                kl_tok.append(kl)
                k1_tok.append((pre["pre_tok_logp"][j][:, 1:][sel] - logp_after[:, 1:][sel]).double())
                kl_seq.append(torch.zeros(len(mb_rows), dtype=torch.float64, device=kl.device)
                              .index_add_(0, seq_of_row, kl))
                roll = torch.cat([ro.rollout_logp[r] for r in mb_rows]).to(full_after.device)
                kl_roll.append(categorical_kl(roll.double(), full_after.double()))
        rec["local_kl"] = float(torch.cat(kl_tok).mean())
        rec["local_kl_seq"] = float(torch.cat(kl_seq).mean())
        rec["local_kl_k1"] = float(torch.cat(k1_tok).mean())
        rec["kl"] = float(torch.cat(kl_roll).mean())
    if before is not None:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        direction = {n: (params[n].detach() - before[n]) for n in before}
        dirs = [directional_derivatives(model, select(ro.batch, mb_rows), before, direction)
                for mb_rows in microbatches(cfg, rows)]
        rec["local_kl_2nd_order"] = second_order_kl(torch.cat(dirs))
    return rec


# --------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------

# Metrics already equal on every rank, and the token means among the others (see Ranks.combine).
GLOBAL_KEYS = ("step", "opt_step", "minibatch", "lr", "grad_norm", "reward", "reward_std", "zero_var_frac",
               "completion_len", "truncated_frac", "entropy")
TOKEN_MEAN_KEYS = ("local_kl", "local_kl_k1", "kl", "clip_ratio")


def train(cfg: TrainConfig, *, log=print) -> Path:
    from tqdm.auto import tqdm

    ranks = init_ranks(resolve_device(cfg.device))  # one process without torchrun
    lcfg = ranks.local_config(cfg)                  # this rank's share of the prompts and of each microbatch
    if not ranks.is_main:
        log = lambda *a, **k: None  # noqa: E731
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    if (run_dir / "config.json").exists():
        _check_same_config(run_dir, cfg)
    # rank 0 builds (and caches) the tokenizer and warm-start first; the others then load them from the cache
    if not ranks.is_main:
        ranks.barrier()
    s = setup(cfg, log=log)
    if ranks.is_main:
        ranks.barrier()
    model = s.model
    if cfg.method != "grpo":
        _accumulator_class()  # fail now, not after the first rollout, if the method's API is missing
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                           weight_decay=cfg.weight_decay)
    start, opt_step = 0, 0
    metrics_path, eval_path = run_dir / "metrics.jsonl", run_dir / "eval.jsonl"
    if (run_dir / "ckpt.pt").exists():
        ck = torch.load(run_dir / "ckpt.pt", map_location=s.device, weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start, opt_step = ck["next_step"], ck["opt_step"]
        log(f"resume: {run_dir / 'ckpt.pt'} at step {start}")
        if start >= cfg.steps:  # already complete: leave its logs as they are
            return run_dir
    ranks.broadcast_(model)
    if ranks.is_main:
        _truncate_jsonl(metrics_path, start)
        _truncate_jsonl(eval_path, start)
        (run_dir / "config.json").write_text(cfg.to_json())

    def write(path, record):
        if ranks.is_main:
            _append_jsonl(path, record)

    def lr_at(k):
        return cfg.lr * min(1.0, (k + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr

    def save_microbatch(mb, w, adv):
        path = run_dir / "microbatch.pt"
        if cfg.save_microbatch and not path.exists():
            torch.save({"input_ids": mb["input_ids"].cpu(), "attention_mask": mb["attention_mask"].cpu(),
                        "score_mask": mb["score_mask"].cpu(), "weights": w.cpu(), "advantages": adv.cpu(),
                        "method": cfg.method, "aggregation": cfg.aggregation, "config": cfg.to_dict(),
                        "model_dir": str(s.warmstart_dir) if s.warmstart_dir else cfg.model}, path)

    bar = tqdm(range(start, cfg.steps), desc=f"{cfg.method}", disable=not (cfg.progress and ranks.is_main),
               initial=start, total=cfg.steps)
    val_acc = None
    for step in bar:
        # eval / checkpoint (before the step: the record of step s describes the policy that starts it)
        if step % cfg.eval_every == 0:
            val_acc = evaluate(s, ranks=ranks)
            write(eval_path, {"step": step, "opt_step": opt_step, "val/accuracy": val_acc})
        if step % cfg.ckpt_every == 0 and step > start and ranks.is_main:
            save_checkpoint(run_dir, model, opt, step, opt_step)

        # rollout
        t0 = time.perf_counter()
        ro = do_rollout(s, step, ranks)
        t_rollout = time.perf_counter() - t0
        common = {"step": step, **reward_stats(cfg, ranks.gather(ro.rewards)),
                  "completion_len": float(ranks.gather(ro.n_tokens.float()).mean()),
                  **ranks.combine({"truncated_frac": ro.truncated_frac, "entropy": ro.entropy},
                                  token_keys=("entropy",), tokens=float(ro.n_tokens.sum()))}
        order = minibatch_order(lcfg, step)

        for m in range(cfg.minibatches):
            rows = [int(r) for r in order[m * lcfg.minibatch_size: (m + 1) * lcfg.minibatch_size]]
            t1 = time.perf_counter()
            for group in opt.param_groups:
                group["lr"] = lr_at(opt_step)
            # micro-step loop
            opt.zero_grad(set_to_none=True)
            pre = accumulate_gradient(lcfg, model, ro, rows, ranks=ranks,
                                      on_microbatch=save_microbatch if (cfg.save_microbatch and m == 0
                                                                        and ranks.is_main) else None)
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            grad_norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads else 0.0
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            before = ({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
                      if cfg.second_order else None)
            # step
            opt.step()
            opt_step += 1
            t2 = time.perf_counter()
            diag = step_diagnostics(lcfg, model, ro, rows, pre, before)
            t3 = time.perf_counter()
            # log
            rec = {**common, "opt_step": opt_step, "minibatch": m, "lr": lr_at(opt_step - 1),
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
    val_acc = evaluate(s, ranks=ranks)
    write(eval_path, {"step": cfg.steps, "opt_step": opt_step, "val/accuracy": val_acc})
    if ranks.is_main:
        save_checkpoint(run_dir, model, opt, cfg.steps, opt_step)
    ranks.barrier()  # the run directory is complete when any rank returns
    return run_dir


# --------------------------------------------------------------------------------------------------------------
# A real microbatch for external checks
# --------------------------------------------------------------------------------------------------------------

def sequence_logprobs(model, batch: dict) -> torch.Tensor:
    """(b,) total log-probability of each sequence's scored (completion) tokens: what PROMA projects."""
    logp, _ = token_logprobs(model, batch)
    return sequence_logprob(logp, batch["score_mask"])


def sample_microbatch(cfg: TrainConfig, *, step: int = 0, minibatch: int = 0, microbatch: int = 0, log=print):
    """A real microbatch of ``cfg``'s run: ``(model, batch, seq_logp_fn, weights)``.

    Builds the (warm-started, cached) policy exactly as ``train`` does, runs rollout ``step`` and returns
    microbatch ``microbatch`` of minibatch ``minibatch``: ``batch`` holds ``input_ids``, ``attention_mask``,
    ``score_mask`` (b, t) and ``old_logp``; ``weights`` (b,) are the aggregation's per-sequence weights of that
    minibatch; ``seq_logp_fn(model, batch) -> (b,)`` the sequence log-probs to pass to
    ``ProjectedAccumulator.backward(seq_logp_fn(model, batch), weights)``.
    """
    s = setup(cfg, log=log)
    ro = do_rollout(s, step)
    order = minibatch_order(cfg, step)
    rows = [int(r) for r in order[minibatch * cfg.minibatch_size: (minibatch + 1) * cfg.minibatch_size]]
    weights, _ = minibatch_weights(cfg, ro, rows)
    mbs = microbatches(cfg, rows)
    mb_rows = mbs[microbatch]
    k = [rows.index(r) for r in mb_rows]
    return s.model, select(ro.batch, mb_rows), sequence_logprobs, weights[k]
