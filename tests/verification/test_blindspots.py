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
from verification.tolerances import FLOAT32_RTOL, FLOAT64_RTOL

# Monte-Carlo check of a power: 20k simulated t-tests, standard error <= 0.0036 (at power 0.5), tolerance ~4 SE
MC_TRIALS, MC_TOL = 20_000, 0.015
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


# =============================================================================================================
# Issue 33's blind spots: each test below was seen to fail with the bug its docstring names planted.
# =============================================================================================================

# ---- coverage: a captured call whose own node also reads another covered parameter ---------------------------
class _ReadsAnother(nn.Module):
    """A user module with a registered rule (:class:`_ReadsAnotherRule`) whose forward also reads another
    module's weight: ``F.linear(x, self.weight + other.weight)``."""

    def __init__(self, other: nn.Linear):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4))
        self.bias = None
        self._other = [other]   # not a submodule: the weight belongs to ``other`` alone

    def forward(self, x):
        return F.linear(x, self.weight + self._other[0].weight)


class _ReadsAnotherRule:
    """The linear rule's factors for ``_ReadsAnother`` (right for its own weight; blind to the other's use)."""

    name = "reads-another"

    def __init__(self):
        from proma.layers import LinearRule

        self._linear = LinearRule()

    def matches(self, module):
        return isinstance(module, _ReadsAnother)

    def param_names(self, module):
        return ("weight",)

    def save(self, module, args, output):
        return self._linear.save(module, args, output)

    def contributions(self, module, saved, grad_output, names):
        return self._linear.contributions(module, saved, grad_output, names)


class _Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.other = nn.Linear(4, 3, bias=False)
        self.mixed = _ReadsAnother(self.other)

    def forward(self, x):
        return self.mixed(x) + self.other(x)


def test_a_captured_call_reading_a_different_covered_parameter_is_refused():
    """Bug: ``check_uses`` weakened from "the parameter is not among the node's owners" to "the node has no
    owner". The sum ``mixed.weight + other.weight`` is owned by mixed's captured call, so the weakened check
    let ``other.weight``'s use inside it (invisible to other's rule) through."""
    from proma.layers import register, unregister

    torch.manual_seed(0)
    model = _Mixed().double()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    rule = _ReadsAnotherRule()
    register(rule)
    try:
        with pytest.raises(ValueError, match=r"parameter 'other\.weight' is used by AddBackward0, an operation "
                                             r"outside every captured module call"):
            capture_factors(model, lambda: model(x).sum(dim=(1, 2)))
        # the same model whose module reads only its own weight passes (the refusal is about the other's read)
        model.mixed.forward = lambda x: F.linear(x, model.mixed.weight)
        calls = capture_factors(model, lambda: model(x).sum(dim=(1, 2)))
        assert sorted(c.name for c in calls) == ["mixed", "other"]
    finally:
        unregister(rule)


# ---- fsdp: a running gradient held by some ranks only -------------------------------------------------------
_FSDP_ONE_RANK = """
import copy, json, sys
import torch, torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from proma import ProjectedAccumulator

dist.init_process_group("gloo", init_method=f"file://{sys.argv[1]}", rank=0, world_size=1)
try:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    whole = copy.deepcopy(model)
    mesh = init_device_mesh("cpu", (1,))
    for m in (model[0], model[2], model):
        fully_shard(m, mesh=mesh)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(b, 2, 4, generator=gen, dtype=torch.float64),
                torch.randn(b, generator=gen, dtype=torch.float64)) for b in (3, 2)]

    def seq_logp(net, x):
        return torch.log_softmax(net(x), -1)[..., 0].sum(1)

    with ProjectedAccumulator(model, variant="none", process_group=mesh.get_group()) as acc:
        acc.zero_grad()
        for x, w in batches:
            acc.backward(seq_logp(model, x), w)
        acc.synchronize()
    got = [None if p.grad is None else p.grad.full_tensor().tolist() for p in model.parameters()]
    loss = sum((w * seq_logp(whole, x)).sum() for x, w in batches)
    want = [g.tolist() for g in torch.autograd.grad(loss, list(whole.parameters()))]
    print(json.dumps({"got": got, "want": want}))
finally:
    dist.destroy_process_group()
"""


@pytest.mark.slow
def test_fsdp_keeps_a_gradient_that_only_some_ranks_hold(tmp_path):
    """Bug: ``FsdpRoute._held_somewhere`` keeping parameters held by more than one rank (``h > 1``) instead of by
    any (``h > 0``). On a one-rank mesh every running gradient is held by exactly one rank: the bug dropped all
    of them (``p.grad`` None). Judged against autograd's gradient of the same weighted loss on an unsharded copy
    (variant "none": the accumulated gradient is that sum)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import proma

    root = Path(proma.__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", _FSDP_ONE_RANK, str(tmp_path / "store")], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(g is not None for g in out["got"]), "a parameter's gradient was dropped"
    for got, want in zip(out["got"], out["want"]):
        assert np.linalg.norm(np.subtract(got, want)) <= FLOAT64_RTOL * np.linalg.norm(want)


# ---- wire: alignment padding of pieces whose byte length is not a multiple of 8 -----------------------------
@pytest.mark.parametrize("first", [
    torch.tensor([1.5, -2.25, 3.0], dtype=torch.float16),           # 6 bytes
    torch.tensor([True, False, True, True, False]),                 # 5 bytes
    torch.tensor([0.5, 1.0, -4.0], dtype=torch.bfloat16),           # 6 bytes
])
def test_wire_pieces_after_an_odd_length_piece_stay_aligned_and_intact(first):
    """Bug: the packer's alignment padding with the wrong sign (``raw.numel() % 8`` instead of ``-raw.numel() % 8``):
    after a 6-byte float16 or 5-byte bool piece the next piece starts at a byte offset that is not a multiple of 8,
    so a 64-bit piece cannot be viewed in place (and the offsets stop meaning what the format says)."""
    from proma import wire
    from proma.wire import KIND_DENSE, Packer, unpack

    after = [torch.tensor([1.0, -2.0, 3.5], dtype=torch.float64), torch.tensor([7, -9], dtype=torch.int64),
             torch.tensor([0.25, 8.0], dtype=torch.float32)]
    packer = Packer()
    for k, t in enumerate([first, first[:1], *after]):
        packer.add(0, k, KIND_DENSE, 1, 0, 0, t)
    offsets = [row[wire._FIXED + 1] for row in packer.meta]  # the first slot's (dtype, offset, numel)
    assert all(offset % 8 == 0 for offset in offsets), offsets
    pieces = unpack(packer.finish("cpu"), len(packer.meta))
    for (_, _, piece), t in zip(pieces, [first, first[:1], *after]):
        assert piece.tensors[0].dtype == t.dtype and torch.equal(piece.tensors[0], t)


# ---- subspace: block Lanczos (k > 1) on an invariant Krylov space ------------------------------------------------
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("right, shape", [(True, (400, 192)), (False, (180, 600))])
def test_block_lanczos_breakdown_guard_for_k_above_1(k, right, shape):
    """Bug: the breakdown guard removed for block size k > 1 (every QR direction kept, rounding included). On a
    masked factor of rank 60 with singular values 10^(-j/3), the Krylov space turns invariant before the last
    block; without the guard the top-k Ritz values came out about 7e-4 (relative) off in float64. Judged against
    NumPy's dense eigenvalues of the kept rows' Gram."""
    from proma import subspace

    gen = torch.Generator().manual_seed(0)
    t, d = shape
    U = torch.linalg.qr(torch.randn(t, 60, generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(d, 60, generator=gen, dtype=torch.float64))[0]
    M = (U * 10.0 ** (-torch.arange(60, dtype=torch.float64) / 3)) @ V.T
    mask = (torch.rand(t, generator=gen) < 0.5).to(torch.float64)
    kept = M.numpy()[mask.numpy() == 1]
    lam = np.linalg.eigvalsh(kept.T @ kept if right else kept @ kept.T)[::-1][:k]
    n = d if right else t
    theta, _, _ = subspace._lanczos(M, k, right, mask, min(63, n // k))
    assert np.max(np.abs(theta.numpy() - lam)) <= FLOAT64_RTOL * lam[0]


# ---- TRL: per-token coefficients that are not one weight per sequence ------------------------------------------
def test_trl_refuses_per_token_coefficients_two_percent_off():
    """Bug: ``WEIGHT_RTOL`` loosened 1000x (1e-4 -> 0.1): per-token loss coefficients 2% off ``w_i * mask`` were
    folded into one weight per sequence instead of refused. Rounding-level deviations (float32) still pass."""
    from proma.integrations.trl import sequence_weights

    gen = torch.Generator().manual_seed(0)
    b, K = 4, 7
    w = torch.tensor([0.5, -1.0, 0.25, 2.0], dtype=torch.float64)
    mask = (torch.rand(b, K, generator=gen) < 0.8).double()
    mask[:, 0] = 1.0
    exact = (w[:, None] * mask).float()   # TRL's float32 expression: rounding only
    assert torch.allclose(sequence_weights(exact, mask), w, rtol=FLOAT32_RTOL, atol=0)
    wobble = 1 + 0.02 * torch.where(torch.rand(b, K, generator=gen) < 0.5, -1.0, 1.0).double()
    with pytest.raises(ValueError, match="not a per-sequence weighted sum"):
        sequence_weights((w[:, None] * mask * wobble).float(), mask)


# ---- oracle format: schema versions ----------------------------------------------------------------------------
@pytest.mark.parametrize("version", [0, -1, 3])
def test_schema_versions_outside_the_readable_ones_are_refused(cases_dir, tmp_path, version):
    """Bug: the manifest reader accepting any integer schema version up to the current one (0 and -1 among
    them): a file from no version of the format was read as if it were one."""
    import json
    import shutil

    from verification.oracle.format import MANIFEST, read_manifest

    copy = tmp_path / "cases"
    copy.mkdir()
    shutil.copy(cases_dir / MANIFEST, copy / MANIFEST)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["schema_version"] = version
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match=f"schema_version {version} is not supported"):
        read_manifest(copy)


# ---- stats: both rejection tails of the power calculation ------------------------------------------------------
def test_power_counts_both_rejection_tails():
    """Bug: ``paired_t_power`` without its lower tail (``nct.cdf(-crit)``): the power for a negative effect of
    the same size fell to about 0, and at effect 0 the test's size came out alpha / 2. Judged against a Monte-Carlo
    simulation of the two-sided paired t-test."""
    from scipy import stats as sps

    from verification.studies import stats

    rng = np.random.default_rng(3)
    n, sd, alpha, trials = 10, 1.0, 0.05, MC_TRIALS
    crit = sps.t.ppf(1 - alpha / 2, n - 1)
    for effect in (-0.8, 0.0, 0.8):
        x = effect + sd * rng.standard_normal((trials, n))
        t = x.mean(1) / (x.std(1, ddof=1) / np.sqrt(n))
        simulated = float(np.mean(np.abs(t) > crit))
        assert stats.paired_t_power(effect, sd, n, alpha) == pytest.approx(simulated, abs=MC_TOL)
    assert stats.paired_t_power(0.0, sd, n, alpha) == pytest.approx(alpha, rel=FLOAT64_RTOL)
    assert stats.paired_t_power(-0.8, sd, n, alpha) == pytest.approx(stats.paired_t_power(0.8, sd, n, alpha))


# ---- secondary: leave-one-out keeps only subsets on the full data's side ---------------------------------------
def test_leave_one_out_does_not_keep_a_subset_that_flips_direction():
    """Bug: ``leave_one_out`` counting a subset as kept whenever its p is below 0.05, whatever the direction of
    its estimate. Here 14 seeds say PROMA's KL is 10% *higher* than GRPO's and one huge outlier turns the full
    mean the other way: leaving the outlier out is significant, but against the full data's direction."""
    from verification.studies import preregistered as P
    from verification.studies import secondary

    rng = np.random.default_rng(0)
    d = 0.1 + 0.01 * rng.standard_normal(15)
    d[7] = -20.0
    grpo = 1.0 + 0.1 * np.arange(15)
    runs = {}
    for s in range(15):
        runs[("grpo", 1e-4, s)] = {"local_kl_mean": float(grpo[s])}
        runs[("proma", 1e-4, s)] = {"local_kl_mean": float(grpo[s] * np.exp(d[s]))}
    results = {"learn-240": runs}
    outcome = P.test(next(h for h in P.family() if h.id == "KL-G-L"), results)
    assert outcome.supports and outcome.p > 0.05
    loo = secondary.leave_one_out(results, outcome)
    assert loo["subsets"] == 15
    assert loo["p"][0] < 1e-10                     # the subset without the outlier: significant ...
    assert loo["kept"] == 0                        # ... but against the full data's direction: not kept
