"""Every value ``proma train`` logs, recomputed independently from the run's own rollout and parameters.

One smoke run (float64, microbatches of 2 sequences against groups of 4, a tiny clip range and a large step
so that PPO clipping would be active on the second minibatch) is observed through the training loop's seams:
the rollout it drew, and the parameters before and after each optimizer step. Every logged value is then
recomputed from those with plain autograd and ``reference`` (advantages, KL, entropy), never with the harness's
own helpers.
"""
import copy
import json

import numpy as np
import pytest
import torch
from scipy.special import log_softmax

import proma.rl.train as train_module
import reference
from proma.rl.config import TrainConfig
from verification.testkit import per_sequence_grads
from verification.tolerances import FLOAT32_RTOL, FLOAT64_ATOL, FLOAT64_RTOL

from rl_testing import rewarding_parity

# Microbatches of 2 sequences in groups of 4 completions: a grouping by microbatch differs from the true one.
OBSERVED = dict(method="reinforce", dtype="float64", steps=1, microbatch_size=2, group_size=4, clip_eps=0.01,
                lr=0.05, shuffle=True, warmstart_steps=1, train_pool=16)
TIME_KEYS = ("time/rollout", "time/train", "time/metrics", "step_time")
CHECKED = {"step", "opt_step", "minibatch", "lr", "loss", "grad_norm", "clip_ratio", "reward", "reward_std",
           "zero_var_frac", "completion_len", "truncated_frac", "entropy", "local_kl", "local_kl_seq",
           "local_kl_k1", "kl", "local_kl_2nd_order", "val/accuracy", *TIME_KEYS, "proj/removed_norm",
           "proj/incoming_norm", "proj/removed_ratio", "proj/removed_ratio_max", "proj/projected", "proj/plain",
           "proj/excluded", "proj/microbatches"}


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    """(cfg, records, the rollout, eos id, the model, [(rows, params before, params after)] per optimizer step)."""
    seen = {"steps": []}
    orig = {k: getattr(train_module, k) for k in ("collect_rollout", "minibatch_gradient", "step_diagnostics")}

    def collect_rollout(s, step, ranks):
        seen["policy"], seen["eos"], seen["model"] = _params(s.model), s.tokenizer.eos_token_id, s.model
        seen["ro"] = orig["collect_rollout"](s, step, ranks)
        return seen["ro"]

    def minibatch_gradient(cfg, model, ro, rows, acc, **kw):
        seen["steps"].append([list(rows), _params(model), None])
        return orig["minibatch_gradient"](cfg, model, ro, rows, acc, **kw)

    def step_diagnostics(cfg, model, ro, rows, pre, before):
        seen["steps"][-1][2] = _params(model)
        return orig["step_diagnostics"](cfg, model, ro, rows, pre, before)

    tmp = tmp_path_factory.mktemp("values")
    cfg = TrainConfig.from_preset("smoke", out=str(tmp / "run"), cache_dir=str(tmp / "cache"), **OBSERVED)
    mp = pytest.MonkeyPatch()
    try:
        for name in orig:
            mp.setattr(train_module, name, locals()[name])
        with rewarding_parity():
            run_dir = train_module.train(cfg)
    finally:
        mp.undo()
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    model = copy.deepcopy(seen["model"])
    return cfg, recs, evals, seen["ro"], seen["eos"], model, seen["policy"], seen["steps"]


def test_rollout_advantages_are_grouped_by_prompt_not_by_microbatch(observed):
    cfg, _, _, ro, *_ = observed
    assert cfg.microbatch_size != cfg.group_size
    rewards = ro.rewards.numpy()
    groups = rewards.reshape(-1, cfg.group_size)
    assert np.any(groups.max(1) > groups.min(1)), "every group constant: the grouping would not matter"
    want = reference.group_advantages(rewards, cfg.group_size, eps=cfg.adv_eps, scale="std")
    np.testing.assert_allclose(ro.advantages.numpy(), want, rtol=FLOAT64_RTOL, atol=FLOAT64_ATOL)


def _forward(model, params, batch, rows):
    """Logits (b, t-1, V) at ``params`` of ``rows``, and the index of the scored positions."""
    model.load_state_dict(params, strict=False)
    ids, am = batch["input_ids"][rows], batch["attention_mask"][rows]
    logits = model(input_ids=ids, attention_mask=am).logits[:, :-1]
    return logits, ids[:, 1:], batch["score_mask"][rows][:, 1:] > 0


def _token_logp(logits, targets):
    return torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _expected_record(cfg, ro, eos, model, policy, rows, before, after):
    """Every non-rollout value of one optimizer step's record, computed independently."""
    adv = reference.group_advantages(ro.rewards.numpy(), cfg.group_size, eps=cfg.adv_eps, scale="std")[rows]
    logits, targets, sel = _forward(model, before, ro.batch, rows)
    tok = _token_logp(logits, targets) * sel
    seq = tok.sum(1)
    n_tok = float(sel.sum())
    w = torch.from_numpy(-adv / n_tok)  # token-mean REINFORCE: L = -(1/N) sum_i A_i sum_t logp_it
    model.zero_grad(set_to_none=True)
    (w * seq).sum().backward(retain_graph=True)
    grad_norm = float(torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in model.parameters()])))
    # the fraction of scored tokens on which PPO's clipped branch would be the minimum (its definition)
    ratio = torch.exp(tok.detach() - ro.batch["old_logp"][rows][:, 1:].double())
    a = torch.from_numpy(adv)[:, None]
    clipped = torch.minimum(ratio * a, ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps) * a) < ratio * a
    direction = torch.from_numpy(np.concatenate([(after[n] - before[n]).reshape(-1).numpy()
                                                 for n, p in model.named_parameters()]))
    g = per_sequence_grads(model, seq, list(model.named_parameters()))
    with torch.no_grad():
        pre = logits.detach()[sel].numpy()
        logits_after, _, _ = _forward(model, after, ro.batch, rows)
        post = logits_after[sel].numpy()
        roll, _, _ = _forward(model, policy, ro.batch, rows)
        roll = roll[sel].numpy()
    kl = reference.categorical_kl(pre, post)
    picked = targets[sel].numpy()
    k1 = log_softmax(pre, -1)[np.arange(len(picked)), picked] - log_softmax(post, -1)[np.arange(len(picked)), picked]
    kl_seq = np.zeros(len(rows))
    np.add.at(kl_seq, sel.nonzero()[:, 0].numpy(), kl)
    return {"loss": float((w * seq.detach()).sum()), "grad_norm": grad_norm,
            "clip_ratio": float((clipped & sel).sum()) / n_tok, "local_kl": kl.mean(), "local_kl_seq": kl_seq.mean(),
            "local_kl_k1": k1.mean(), "kl": reference.categorical_kl(roll, post).mean(),
            "local_kl_2nd_order": 0.5 * float(np.mean((g @ direction.numpy()) ** 2))}


def test_every_logged_value_matches_an_independent_computation(observed):
    cfg, recs, evals, ro, eos, model, policy, steps = observed
    assert len(recs) == len(steps) == cfg.minibatches
    rewards = ro.rewards.numpy()
    groups = rewards.reshape(-1, cfg.group_size)
    n_tokens = ro.batch["score_mask"].sum(1).numpy()
    last = ro.batch["input_ids"][torch.arange(len(n_tokens)), ro.batch["attention_mask"].sum(1) - 1]
    with torch.no_grad():
        logits, _, sel = _forward(model, policy, ro.batch, list(range(len(n_tokens))))
    rollout = {"step": 0, "reward": rewards.mean(), "reward_std": rewards.std(ddof=1),
               "zero_var_frac": float(np.mean(groups.max(1) == groups.min(1))), "completion_len": n_tokens.mean(),
               "truncated_frac": float((last != eos).double().mean()),
               "entropy": reference.categorical_entropy(logits[sel].numpy()).mean()}
    for m, (rec, (rows, before, after)) in enumerate(zip(recs, steps)):
        assert set(rec) == CHECKED - ({"val/accuracy"} if m else set()), "a logged metric without a value check"
        # reinforce = the accumulator's variant "none": every parameter tensor accumulated plainly, nothing removed
        proj = {"proj/removed_norm": 0.0, "proj/incoming_norm": 0.0, "proj/removed_ratio": 0.0,
                "proj/removed_ratio_max": 0.0, "proj/projected": 0, "proj/excluded": 0,
                "proj/plain": len(list(model.parameters())), "proj/microbatches": len(rows) // cfg.microbatch_size}
        want = {**rollout, **proj, "opt_step": m + 1, "minibatch": m, "lr": cfg.lr,
                **_expected_record(cfg, ro, eos, model, policy, rows, before, after)}
        for key, value in want.items():
            # float32 level: HF's RMSNorm normalises in float32 even in a float64 model
            np.testing.assert_allclose(rec[key], value, rtol=FLOAT32_RTOL, atol=FLOAT64_ATOL, err_msg=key)
        assert all(rec[k] >= 0 for k in TIME_KEYS)
        np.testing.assert_allclose(rec["step_time"], sum(rec[k] for k in TIME_KEYS[:3]), rtol=FLOAT64_RTOL)
    assert recs[1]["clip_ratio"] > 0, "clipping never active: the clip-ratio check would not bite"
    assert recs[0]["val/accuracy"] == evals[0]["val/accuracy"] and evals[0]["step"] == 0
    assert (recs[0]["val/accuracy"] * cfg.eval_size) == pytest.approx(round(recs[0]["val/accuracy"] * cfg.eval_size))
