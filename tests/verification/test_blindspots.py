"""Tests for planted bugs that no earlier test caught (issue 24, "blind spots"). Each was planted in the code,
seen to fail here, and removed; the docstrings name the bug.

- the coverage check weakened to check only modules without any captured call;
- the 16-bit gradient store remembering its float32 buffer instead of the ``p.grad`` it wrote;
- the reference's intra rank ignoring its singular-value cutoff;
- the case loader accepting a sequence index equal to b;
- ``check_candidate(..., step=True)`` judging in chain mode.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reference
from proma import ProjectedAccumulator, capture_factors
from verification.oracle.check import check_candidate, write_candidate
from verification.oracle.format import FormatError, load_cases, save_cases, use_key
from verification.oracle.impls import run_reference_step
from verification.oracle.verdicts import MODE_STEP, STEP_HINT
from verification.tolerances import FLOAT64_RTOL

# bfloat16's unit roundoff (8 significand bits): one rounding of the float32 sum to bfloat16 is within it
BF16_UNIT_ROUNDOFF = 2.0 ** -8


# ---- coverage: a captured call and an uncaptured use of the same weight in one expression -------------------
class _TwoReads(nn.Module):
    """``fc`` is called (captured) and its weight is also read by ``F.linear``; both meet in one sum."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3, bias=False)

    def forward(self, x):
        return self.fc(x) + F.linear(x, self.fc.weight)


def test_captured_call_plus_uncaptured_use_of_the_same_weight_is_refused():
    """Bug: check_uses skipping every parameter whose module had a captured call (only modules never called
    were checked). ``fc`` is called, so the weakened check let its second, invisible use through."""
    torch.manual_seed(0)
    model = _TwoReads().double()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"fc\.weight.*outside every captured module call"):
        capture_factors(model, lambda: model(x).sum(dim=(1, 2)))
    # and the same model without the second read passes (the refusal is about that read)
    calls = capture_factors(model, lambda: model.fc(x).sum(dim=(1, 2)))
    assert [c.name for c in calls] == ["fc"]


# ---- 16-bit running gradient over many small microbatch contributions ---------------------------------------
def test_bf16_running_gradient_keeps_small_contributions_like_float32_accumulation():
    """Bug: the gradient store remembering the float32 buffer (not the bf16 ``p.grad`` it wrote) as "written",
    so every microbatch took ``p.grad`` for an outside write and restarted from its bf16 rounding: contributions
    below half a bf16 ulp of G were then rounded away one by one.

    Microbatch 0 makes G about 1; 63 more add about 1e-3 each, below bf16's half ulp of G. Accumulated in float32
    and rounded once, p.grad is within one bf16 rounding of the exact float64 sum (here about 1.06 G_0); the bug
    leaves G_0.
    """
    gen = torch.Generator().manual_seed(0)
    model = nn.Linear(6, 3, bias=False).to(torch.bfloat16)
    n_small, small_weight, b, t = 63, 1e-3, 2, 4
    # bf16-representable positive inputs: every entry of every contribution has the same sign
    xs = [(torch.rand(b, t, 6, generator=gen) * 0.5 + 0.5).to(torch.bfloat16) for _ in range(1 + n_small)]
    weights = [torch.full((b,), 1.0)] + [torch.full((b,), small_weight)] * n_small
    with ProjectedAccumulator(model, variant="proma", solver="none") as acc:
        acc.zero_grad()
        for x, w in zip(xs, weights):
            acc.backward(model(x).float().sum(dim=(1, 2)), w)
        got = model.weight.grad.double()
    # d/dW of sum_{j,t,o} y_jto with y = x W^T: every row of W gets sum_{j,t} w_j x_jt
    exact = sum((w.double()[:, None, None] * x.double()).sum(dim=(0, 1)) for x, w in zip(xs, weights))
    exact = exact.expand(3, 6)
    first = (weights[0].double()[:, None, None] * xs[0].double()).sum(dim=(0, 1)).expand(3, 6)
    assert model.weight.grad.dtype == torch.bfloat16
    assert torch.all((exact - first).abs() / exact > 2 * BF16_UNIT_ROUNDOFF)  # the small part is visible
    assert torch.all((got - exact).abs() <= BF16_UNIT_ROUNDOFF * exact.abs())


# ---- the reference's intra cutoff on a rank-deficient example ------------------------------------------------
def test_reference_intra_rank_stops_at_the_cutoff():
    """Bug: ``_top_right_singular`` taking ``rank`` directions whatever the singular values (the cutoff
    ignored). X has rank 1, so with intra_rank 2 only one activation direction exists; a second would be
    rounding noise, an arbitrary direction the projection must not remove."""
    x = np.array([1.0, 2.0, 2.0]) / 3.0                            # unit row direction
    X = np.outer([1.0, -2.0, 0.5, 3.0], x)                          # (t=4, i=3), rank 1
    D = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, -1.0]])  # (t=4, o=2), rank 2
    U, V = reference.intra_subspaces(X, D, rank=2)
    assert U.shape == (2, 2) and V.shape == (3, 1)
    np.testing.assert_allclose(np.abs(V[:, 0]), x, rtol=FLOAT64_RTOL)
    grad = np.arange(6.0).reshape(2, 3) - 2.0
    want = (np.eye(2) - U @ U.T) @ grad @ (np.eye(3) - np.outer(x, x))
    np.testing.assert_allclose(reference.intra_project(grad, X, D, rank=2), want, atol=FLOAT64_RTOL)


# ---- the case loader: a sequence index equal to b ------------------------------------------------------------
def test_sequence_index_equal_to_b_is_refused(cases_dir, tmp_path):
    """Bug: an off-by-one in the loader's check (``seq.max() > b``), accepting index b of a b-sequence
    microbatch (a token of a sequence that does not exist)."""
    cases, _ = load_cases(cases_dir, only=["none_plain"])
    case = cases[0]
    b, key = case.batch_size(0), use_key(0, 0, 0, "seq")
    seq = case.arrays[key].copy()
    seq[0] = b
    case.arrays[key] = seq
    with pytest.raises(FormatError, match=rf"holds sequence indices outside 0..{b - 1}"):
        save_cases(tmp_path / "bad", [case])
    seq[0] = b - 1  # the largest valid index passes
    save_cases(tmp_path / "good", [case])


# ---- check_candidate(..., step=True) -------------------------------------------------------------------------
def test_step_candidate_is_judged_in_step_mode(cases_dir, tmp_path):
    """Bug: ``check_candidate`` building its result in chain mode whatever ``step`` says: the table then
    blames later microbatches on the first and prints the chain hint for a candidate that was computed from
    the stored G_in."""
    cases, _ = load_cases(cases_dir, only=["exact_many_microbatches"])
    case = cases[0]
    outputs = [run_reference_step(case, m, [case.expected(m, k, "G_in") for k in range(len(case.layers))])
               for m in range(case.n_microbatches)]
    outputs[0][0] = outputs[0][0] + 1e-3 * np.linalg.norm(outputs[0][0])  # wrong at mb0 only
    path = write_candidate(tmp_path / "step.npz", {case.id: outputs})
    result = check_candidate(cases_dir, path, only=[case.id], step=True)
    assert result.mode == MODE_STEP and result.to_json()["mode"] == MODE_STEP
    assert [a.m for a in result.results[0].failing()] == [0]
    table = result.table()
    assert "(step mode: each microbatch from the stored G_in)" in table
    assert STEP_HINT not in table and "carry its error forward" not in table
    chain = check_candidate(cases_dir, path, only=[case.id])
    assert STEP_HINT in chain.table()
