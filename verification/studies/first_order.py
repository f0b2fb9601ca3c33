"""The first-order check of PROMA's mechanism on a real microbatch chain, and local KL against its estimate.

Notation: microbatches 1..M of one minibatch with per-sequence weights w, g_i = d log pi(y_i) / d theta,
pg_M = sum_{j in M} w_j g_j (the last microbatch's own gradient), G_M the accumulated gradient of a setting
(plain: sum of every pg_m). Exact PROMA guarantees g_i . G_M = g_i . pg_M for every i in the last microbatch,
so under plain SGD theta' = theta - lr G_M the change of those sequences' log-probabilities is

    delta_i(lr) = log pi_theta'(y_i) - log pi_theta(y_i) = -lr g_i . pg_M + O(lr^2)      (exact PROMA)
    delta_i(lr) = -lr g_i . pg_M - lr g_i . (G_M - pg_M) + O(lr^2)                        (otherwise)

The check measures r(lr) = ||delta(lr) + lr (g . pg_M)||_2 over the last microbatch's sequences at step sizes
lr = h ||theta|| / ||G_M|| (h = the step's relative length ||dtheta|| / ||theta||) and fits the slope of
log r against log h: 2 for exact PROMA, 1 where the guarantee does not hold. g_i . v is computed exactly by
forward-mode AD
(``proma.rl.metrics.directional_derivatives``), never forming g_i.

Adam from a fresh state: its first step is theta' = theta - lr P G_M with P = diag(1 / (|G_M| + eps)) (bias
corrections make m = G, v = G^2), so the guarantee would need g_i . P (G_M - pg_M) = 0, which projection in
the Euclidean metric does not give. ``violation`` = ||g . D(G_M - pg_M)|| / ||g . D pg_M|| with D = identity
(SGD) or P (Adam); ``adam_survival`` = 1 - violation_adam(setting) / violation_adam(plain).

Local KL of a step (every minibatch sequence): exact = mean over sequences of the summed per-token
KL(pi_before || pi_after) over the vocabulary (``local_kl_seq`` of the harness), second-order estimate =
0.5 mean_i (g_i . dtheta)^2 (``local_kl_2nd_order``). :func:`kl_bound_summary` tells, over a run's records,
how often and by how much the exact KL exceeds the estimate.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch

from proma.options import PUBLISHED_SETTINGS

# Settings of the accumulator compared (ProjectedAccumulator keyword arguments); "plain" = no projection.
# "paper" (the published settings) keeps the key of the committed report data (reports/data/first_order.json).
SETTINGS = {
    "plain": dict(variant="none"),
    "exact": dict(variant="proma", solver="exact"),
    "paper": dict(PUBLISHED_SETTINGS),
    "ridge": dict(variant="proma", solver="ridge"),
}
LABELS = {
    "plain": "plain accumulation",
    "exact": "exact PROMA (layer-wise)",
    "paper": "the published settings (Gram-Schmidt 2 passes on unit-normalised g_i, removal capped at 0.5 x ‖pg_m‖)",
    "ridge": "ridge solve, regulariser 1e-2 (the default)",
}
# A fitted slope of log residual against log step at or above this counts as second order (exact: 2).
SECOND_ORDER_SLOPE = 1.8
# Step lengths ||dtheta|| / ||theta|| of the SGD steps (float64): small enough that the O(lr^3) terms do not
# blur the slopes, large enough that rounding (~1e-15 of a sequence log-probability) stays far below O(lr^2).
STEP_LENGTHS = (1e-4, 1e-5, 1e-6, 1e-7)
ADAM_EPS = 1e-8


def _full_precision_rmsnorm(model) -> None:
    """Make every RMSNorm of ``model`` (a copy) compute in its input dtype.

    Hugging Face's RMSNorm casts its input to float32 and back, which puts a float32 rounding floor (about
    1e-9 of a sequence log-probability) under every float64 forward and hides the O(lr^2) residuals of small
    steps. Same formula: x / sqrt(mean(x^2) + eps) * weight.
    """
    import types

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(forward, module)


def _params(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def accumulated_gradient(model, seq_logp_fn, batches, weights, settings: dict) -> dict:
    """G_M of ``settings`` over the microbatch chain: ``{name: tensor}`` (detached copies of p.grad)."""
    from proma import ProjectedAccumulator

    model.zero_grad(set_to_none=True)
    with ProjectedAccumulator(model, **settings) as acc:
        acc.zero_grad()
        for batch, w in zip(batches, weights):
            seq = seq_logp_fn(model, batch)
            acc.backward(seq, torch.as_tensor(np.asarray(w), dtype=seq.dtype))
        acc.synchronize()
    out = {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
           for n, p in _params(model).items()}
    model.zero_grad(set_to_none=True)
    return out


def _norm(d: dict) -> float:
    return math.sqrt(sum(float((v.double() ** 2).sum()) for v in d.values()))


def _dd(model, batch, theta0: dict, direction: dict) -> torch.Tensor:
    from proma.rl.metrics import directional_derivatives

    return directional_derivatives(model, batch, theta0, direction).detach().double()


def _set(model, theta: dict) -> None:
    with torch.no_grad():
        for n, p in _params(model).items():
            p.copy_(theta[n])


def _seq_kl(model, batches, theta0, theta1) -> float:
    """Exact sequence-level KL(pi_theta0 || pi_theta1) averaged over every sequence of ``batches``."""
    from proma.rl.losses import token_logprobs
    from proma.rl.metrics import categorical_kl

    kls = []
    with torch.no_grad():
        for batch in batches:
            rows = (batch["score_mask"][:, 1:] > 0).nonzero()[:, 0]
            _set(model, theta0)
            _, before = token_logprobs(model, batch, full=True)
            _set(model, theta1)
            _, after = token_logprobs(model, batch, full=True)
            per_seq = torch.zeros(batch["input_ids"].shape[0], dtype=torch.float64)
            kls.append(per_seq.index_add_(0, rows, categorical_kl(before.double(), after.double())))
    _set(model, theta0)
    return float(torch.cat(kls).mean())


def _slope(h, r) -> float:
    """Least-squares slope of log r against log h."""
    return float(np.polyfit(np.log(h), np.log(np.maximum(r, 1e-300)), 1)[0])


def check_setting(model, seq_logp_fn, batches, weights, settings: dict, pg_last: dict, *,
                  step_lengths=STEP_LENGTHS) -> dict:
    """SGD residuals at every step length, their log-log slope, the Adam violation and the step's local KLs."""
    theta0 = {n: p.detach().clone() for n, p in _params(model).items()}
    G = accumulated_gradient(model, seq_logp_fn, batches, weights, settings)
    last = batches[-1]
    a_pg, a_G = _dd(model, last, theta0, pg_last), _dd(model, last, theta0, G)
    a_all = torch.cat([_dd(model, b, theta0, G) for b in batches])
    with torch.no_grad():
        base = seq_logp_fn(model, last).double()
    gnorm, tnorm, rows = _norm(G), _norm(theta0), []
    for h in step_lengths:
        lr = h * tnorm / gnorm
        theta1 = {n: theta0[n] - lr * G[n] for n in theta0}
        _set(model, theta1)
        with torch.no_grad():
            delta = seq_logp_fn(model, last).double() - base
        _set(model, theta0)
        rows.append({"h": h, "lr": lr, "residual": float((delta + lr * a_pg).norm()),
                     "taylor_remainder": float((delta + lr * a_G).norm()),
                     "prediction": float((lr * a_pg).norm()),
                     "local_kl": _seq_kl(model, batches, theta0, theta1),
                     "local_kl_2nd_order": 0.5 * lr ** 2 * float((a_all ** 2).mean())})
    P = {n: 1.0 / (G[n].abs() + ADAM_EPS) for n in G}
    diff = {n: G[n] - pg_last[n] for n in G}
    adam_pg = _dd(model, last, theta0, {n: P[n] * pg_last[n] for n in G})
    adam_diff = _dd(model, last, theta0, {n: P[n] * diff[n] for n in G})
    sgd_diff = a_G - a_pg
    return {"grad_norm": gnorm, "steps": rows,
            "slope": _slope([r["h"] for r in rows], [r["residual"] for r in rows]),
            "violation_sgd": float(sgd_diff.norm() / a_pg.norm()),
            "violation_adam": float(adam_diff.norm() / adam_pg.norm()),
            "adam_step_check": _adam_step_residual(model, seq_logp_fn, last, theta0, G, adam_pg, adam_diff,
                                                   h=step_lengths[-1] * tnorm)}


def _adam_step_residual(model, seq_logp_fn, last, theta0, G, adam_pg, adam_diff, *, h: float) -> dict:
    """One torch Adam step of length about ``h`` from a fresh state: delta vs its first-order terms."""
    lr = h / math.sqrt(sum(p.numel() for p in G.values()))  # |step_j| = lr where |G_j| >> eps
    params = list(_params(model).values())
    opt = torch.optim.Adam(params, lr=lr, eps=ADAM_EPS)
    with torch.no_grad():
        base = seq_logp_fn(model, last).double()
    for (n, p) in _params(model).items():
        p.grad = G[n].clone()
    opt.step()
    with torch.no_grad():
        delta = seq_logp_fn(model, last).double() - base
    model.zero_grad(set_to_none=True)
    _set(model, theta0)
    first = -lr * (adam_pg + adam_diff)
    return {"lr": lr, "delta_norm": float(delta.norm()), "first_order_error": float((delta - first).norm()),
            "guarantee_residual": float((delta + lr * adam_pg).norm()), "prediction": float((lr * adam_pg).norm())}


def first_order_check(model, seq_logp_fn, batches, weights, *, settings=SETTINGS, step_lengths=STEP_LENGTHS) -> dict:
    """Every setting of ``settings`` on the microbatch chain, on a float64 copy of ``model``."""
    if len(batches) < 2 or len(batches) != len(weights):
        raise ValueError(f"batches/weights: need >= 2 microbatches with one weight vector each; got "
                         f"{len(batches)} and {len(weights)}")
    model = copy.deepcopy(model).double().eval()
    _full_precision_rmsnorm(model)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("sdpa")  # eager attention gives NaN on left-padded float64 batches
    from proma.rl.metrics import forward_ad_attention

    # every forward in SDPA's "math" backend, the one the forward-mode derivatives run in
    with forward_ad_attention(model):
        pg_last = accumulated_gradient(model, seq_logp_fn, batches[-1:], weights[-1:], SETTINGS["plain"])
        out = {name: check_setting(model, seq_logp_fn, batches, weights, kw, pg_last, step_lengths=step_lengths)
               for name, kw in settings.items()}
    if "plain" in out:
        for res in out.values():
            res["adam_survival"] = 1.0 - res["violation_adam"] / out["plain"]["violation_adam"]
    return out


def kl_bound_summary(records) -> dict:
    """How often and by how much the exact sequence-level local KL exceeds its second-order estimate.

    ``records``: a run's metrics records with ``local_kl_seq`` and ``local_kl_2nd_order``. Returns the number
    of steps, the fraction with exact > estimate, and the median and maximum of exact / estimate.
    """
    pairs = [(r["local_kl_seq"], r["local_kl_2nd_order"]) for r in records
             if r.get("local_kl_seq") is not None and r.get("local_kl_2nd_order")]
    if not pairs:
        raise ValueError("records: no record has both local_kl_seq and a positive local_kl_2nd_order")
    ratio = np.array([a / b for a, b in pairs])
    return {"steps": len(pairs), "exceeded_frac": float((ratio > 1).mean()),
            "ratio_median": float(np.median(ratio)), "ratio_max": float(ratio.max())}


def markdown(result: dict, *, where: str = "") -> str:
    """The first-order section: slopes and residuals per setting, the Adam survival, and local KL vs estimate."""
    lines = ["### First-order check" + (f" ({where})" if where else ""), "",
             "| setting | slope of log residual vs log step | residual / prediction at smallest step | "
             "SGD violation ‖g·(G−pg_M)‖/‖g·pg_M‖ | Adam violation | Adam: guarantee kept |",
             "|---|---|---|---|---|---|"]
    for name, r in result.items():
        small = r["steps"][-1]
        lines.append(f"| {name} | {r['slope']:.2f} | {small['residual'] / small['prediction']:.2e} | "
                     f"{r['violation_sgd']:.2e} | {r['violation_adam']:.2e} | "
                     f"{r.get('adam_survival', float('nan')):.1%} |")
    lines += ["", "| setting | step length h | exact local KL | second-order estimate | exact / estimate |",
              "|---|---|---|---|---|"]
    for name, r in result.items():
        for s in r["steps"]:
            lines.append(f"| {name} | {s['h']:g} | {s['local_kl']:.3e} | {s['local_kl_2nd_order']:.3e} | "
                         f"{s['local_kl'] / s['local_kl_2nd_order']:.3f} |")
    lines += ["", "Residual = ‖Δlog π + lr g·pg_M‖ over the last microbatch's sequences (SGD θ − lr G_M, "
              "float64); slope 2 = the guarantee holds to first order, 1 = it does not. Adam: one step from a "
              "fresh state is θ − lr P G_M, P = diag(1/(|G_M|+eps)); 'kept' = 1 − violation / plain's violation. "
              "Settings: " + "; ".join(f"{k} = {LABELS.get(k, k)}" for k in result) + "."]
    return "\n".join(lines) + "\n"


def reading(result: dict) -> list:
    """Sentences on ``result`` (:func:`first_order_check`), each quoting the numbers it rests on."""
    out = []
    for name, r in result.items():
        holds = r["slope"] >= SECOND_ORDER_SLOPE
        out.append(f"- {name}: residual slope {r['slope']:.2f}, SGD violation {r['violation_sgd']:.2g}: the first-order "
                   + ("guarantee holds (the residual is O(lr²))." if holds else "guarantee does not hold (the residual "
                      "is O(lr))."))
    plain = result.get("plain")
    for name, r in result.items():
        if plain is None or name == "plain":
            continue
        kept = r.get("adam_survival", math.nan)
        out.append(f"- With Adam's first step, {name}'s violation is {r['violation_adam']:.3g} against plain's "
                   f"{plain['violation_adam']:.3g}: "
                   + (f"it removes {kept:.0%} of plain accumulation's violation (the 'kept' column) but does not "
                      "satisfy the guarantee: Adam's per-coordinate rescaling is not the metric it was projected in."
                      if kept > 0 else f"it violates the guarantee more than plain accumulation does (kept {kept:.0%})."))
    ratios = [s["local_kl"] / s["local_kl_2nd_order"] for r in result.values() for s in r["steps"][-2:]]
    if ratios:
        out.append(f"- At the two smallest steps exact local KL / second-order estimate lies in "
                   f"{min(ratios):.3g}-{max(ratios):.3g} for every setting: constant in the step, as a second-order "
                   "quantity must be, but not 1, because the estimate averages (g_i · dθ)² over the sampled sequences "
                   "instead of taking the expectation over the policy (an empirical, not the exact, Fisher).")
    return out


def real_first_order(*, seed: int = 0, cache_dir=None, settings=SETTINGS, step_lengths=STEP_LENGTHS,
                     log=print) -> dict:
    """The check on a real GSM8K-calc minibatch chain of the real-case policy (``verification.studies.realcase``)."""
    from proma.rl.losses import completion_logprobs

    from .realcase import real_rollout

    s, step, batches, weights = real_rollout(seed=seed, cache_dir=cache_dir, log=log)
    result = first_order_check(s.model, completion_logprobs, batches, weights, settings=settings,
                               step_lengths=step_lengths)
    n_params = sum(p.numel() for p in s.model.parameters())
    where = (f"real GSM8K-calc microbatches of the oracle's real-case policy (`verification.studies.realcase`, a "
             f"shrunk Qwen3 with {n_params:,} parameters), rollout step {step}, seed {seed}, "
             f"{len(batches)} microbatches of {[len(w) for w in weights]} sequences")
    return {"where": where, "result": result}
