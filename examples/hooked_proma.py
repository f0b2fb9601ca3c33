"""A minimal outside PROMA implementation, written from README's "What PROMA computes", checked by the oracle.

It is what a verl or TRL user would add to a trainer: forward hooks keep every ``nn.Linear``'s input X,
tensor hooks on its output keep the output gradient of the backward of a token-mean policy loss, and after
each microbatch the weight's ``.grad`` becomes ``G - s R + pg`` with R the part of the running gradient G
that lies in the span of the microbatch's per-sequence gradients. It handles single-use ``nn.Linear``
weights only (every other layer is left out of the candidate and skipped by ``--allow-missing``) and runs in
float32. Nothing here imports this project's ``proma`` or ``reference``; ``verification`` is used only to
read the cases and write the candidate.

Run it::

    proma-verify cases --out cases/ --no-real
    python examples/hooked_proma.py --cases cases/ --out candidate.npz
    proma-verify check --cases cases/ --candidate candidate.npz --allow-missing

Loss to weights (FORMAT.md, "From a trainer's loss to the weights"): the token-mean loss
``L = -(1/N) sum_i A_i sum_{t in i} logp_t`` over a microbatch with N scored tokens gives ``w_i = -A_i / N``.
A trainer's output gradients carry that weight and its loss scale; PROMA's directions are the unweighted
``g_i``, so the hooks divide them out again.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import nn

from verification import load_cases, write_candidate

LOSS_SCALE = 2.0 ** 10  # as a mixed-precision loss scaler would apply; divided out below


class LinearCapture:
    """Keeps, per ``nn.Linear``, its input (b, T, i) and the gradient (b, T, o) reaching its output."""

    def __init__(self, linears: dict):
        self.inputs, self.grads, self.handles = {}, {}, []
        for name, mod in linears.items():
            self.handles.append(mod.register_forward_hook(self._forward_hook(name)))

    def _forward_hook(self, name):
        def hook(module, args, output):
            self.inputs[name] = args[0].detach()
            output.register_hook(lambda grad: self.grads.__setitem__(name, grad.detach()))
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def removed_component(G, g, settings):
    """R: the part of G (o, i) that the solver removes against the rows of g (b, o, i).

    The small solves run in float64; the rank decision of "exact" is made on unit rows at the precision
    of the data (g's dtype): rounding makes duplicated sequences differ by ~eps relative to their own
    norm, which must not count as a direction, while a short g_i in a direction of its own still does.
    """
    N = g.reshape(len(g), -1).double()
    Gv = G.reshape(-1).double()
    if settings.variant == "none" or len(N) == 0:
        return torch.zeros_like(G)
    norms = N.norm(dim=1, keepdim=True)
    units = N[norms[:, 0] > 0] / norms[norms[:, 0] > 0]
    if len(units) == 0:
        return torch.zeros_like(G)
    if settings.solver == "exact":  # orthogonal projection onto span{g_i}: SVD of the unit rows
        _, s, vt = torch.linalg.svd(units, full_matrices=False)
        Q = vt[s > max(units.shape) * torch.finfo(g.dtype).eps * s[0]]
        R = Q.T @ (Q @ Gv)
    else:
        if settings.solver == "gram_schmidt":
            after = Gv.clone()
            for _ in range(settings.passes):
                for n in units:
                    after -= (after @ n) * n
            R = Gv - after
        else:  # ridge: c = (N N^T + ridge I)^-1 N G, R = c^T N
            K = units @ units.T + settings.ridge * torch.eye(len(units), dtype=units.dtype)
            R = torch.linalg.solve(K, units @ Gv) @ units
    return R.reshape(G.shape).to(G.dtype)


class HookedProma:
    """Cross-microbatch PROMA for the single-use ``nn.Linear`` weights of a model (float32)."""

    def __init__(self, linears: dict, settings):
        self.linears, self.settings = linears, settings
        self.capture = LinearCapture(linears)

    def backward(self, token_logp, mask, advantages):
        """Backward of the token-mean loss of one microbatch, then PROMA on every hooked weight.

        token_logp (b, T), mask (b, T) of scored tokens, advantages (b,).
        """
        N = mask.sum().clamp(min=1)
        w = -advantages / N                          # per-sequence loss weights
        # a zero-weight sequence still defines a direction: give it a stand-in coefficient so that its
        # output gradients are captured; its contribution is left out of pg below
        coef = torch.where(w != 0, w, torch.ones_like(w) / N)
        running = {}
        for name, mod in self.linears.items():  # take G out of .grad, so that the backward does not add to it
            running[name] = mod.weight.grad if mod.weight.grad is not None else torch.zeros_like(mod.weight)
            mod.weight.grad = None
        loss = LOSS_SCALE * (coef[:, None] * token_logp * mask).sum()
        loss.backward()
        s = self.settings
        for name, mod in self.linears.items():
            X, Dw = self.capture.inputs[name], self.capture.grads[name]
            D = Dw / (LOSS_SCALE * coef[:, None, None])          # unweighted output gradients
            g = torch.einsum("bto,bti->boi", D, X)                 # per-sequence gradients g_i
            pg = torch.einsum("b,boi->oi", w, g)
            G = running[name]
            R = removed_component(G, g, s)
            if s.relative_bound is not None and R.norm() > 0:
                R = R * torch.clamp(s.relative_bound * pg.norm() / R.norm(), max=1.0)
            mod.weight.grad = G - s.shrinkage * R + pg


# --------------------------------------------------------------------------- the oracle's cases as a model
def _padded(rows: np.ndarray, seq: np.ndarray, b: int) -> np.ndarray:
    """Token rows (t, f) laid out as (b, T, f), zero-padded, in each sequence's order."""
    T = max([int((seq == j).sum()) for j in range(b)] + [1])
    out = np.zeros((b, T, rows.shape[1]), dtype=np.float32)
    for j in range(b):
        r = rows[seq == j]
        out[j, :len(r)] = r
    return out


def run_case(case, *, settings=None):
    """Outputs ``[m][k]`` for a case: the weight's grad after each microbatch, None for layers not handled."""
    settings = settings or case.settings
    if settings.variant == "intra":
        return [[None] * len(case.layers) for _ in range(case.n_microbatches)]
    handled = [k for k, layer in enumerate(case.layers) if layer.uses == ("linear",)]
    linears = {k: nn.Linear(case.layers[k].shape[1], case.layers[k].shape[0], bias=False) for k in handled}
    proma = HookedProma(linears, settings)
    outputs = []
    for m in range(case.n_microbatches):
        b = case.batch_size(m)
        # a model whose token log-probs make the case's X the linear inputs and its D their output gradients
        token_logp, mask = None, None
        for k in handled:
            use = case.use(m, k, 0)
            X = torch.from_numpy(_padded(use["X"], use["seq"], b))
            D = torch.from_numpy(_padded(use["D"], use["seq"], b))
            term = (linears[k](X) * D).sum(dim=2)
            token_logp = term if token_logp is None else torch.cat([token_logp, term], dim=1)
        if token_logp is None:
            outputs.append([None] * len(case.layers))
            continue
        mask = torch.ones_like(token_logp)
        N = mask.sum()
        advantages = -torch.from_numpy(case.weights(m).astype(np.float32)) * N   # so that w_i = -A_i / N
        proma.backward(token_logp, mask, advantages)
        outputs.append([linears[k].weight.grad.numpy().copy() if k in linears else None
                        for k in range(len(case.layers))])
    proma.capture.remove()
    return outputs


def main(argv=None):
    parser = argparse.ArgumentParser(description="Run the example implementation on the oracle's cases.")
    parser.add_argument("--cases", required=True, help="case directory written by `proma-verify cases`")
    parser.add_argument("--out", required=True, help="candidate .npz to write")
    args = parser.parse_args(argv)
    cases, _ = load_cases(args.cases)
    path = write_candidate(args.out, {case.id: run_case(case) for case in cases})
    print(f"wrote {path}; check it with: proma-verify check --cases {args.cases} --candidate {path} --allow-missing")


if __name__ == "__main__":
    main()
