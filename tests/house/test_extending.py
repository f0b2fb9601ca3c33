"""docs/extending.md, done from a test module without editing the package: a toy solver ("jacobi") and a toy
layer rule whose contribution is of a new kind (``ElementwiseFactors``), each declared here only.

Done when the reference, the torch code and the oracle agree on them:

- the solver: ``reference.accumulate`` runs it; the oracle's generated cases include it (expected values from
  the reference) and ``ProjectedAccumulator`` passes them; the accumulator's options and the case format
  accept its name while it is declared, and refuse it once removed;
- the rule: ``proma.testing.check_rule`` (Grams on both routes and the accumulated update against per-sequence
  autograd and the reference); the kind's wire form round-trips; an oracle case captured from a model using
  the rule (reference expected values) is passed by the accumulator with the toy solver.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import reference
from proma import ProjectedAccumulator
from proma.layers import register, unregister
from proma.layers.base import Contribution
from proma.layers.tokens import token_keep, unpack_tokens
from proma.solvers import add_solver, normalised_gram, remove_solver
from proma.testing import check_rule
from verification.tolerances import FLOAT64_RTOL

# ------------------------------------------------------------------------------------------ the toy solver
# "jacobi": each unit direction removed on its own, damped by the ridge: c = (N G) / (1 + ridge), R = c^T N.
# (The exact projection when the g_i are orthogonal and ridge = 0; a toy otherwise.)


def jacobi_remove(G, seq_grads, options):
    """NumPy definition (the judge): R = ((N G) / (1 + ridge)) N on the unit rows N of seq_grads."""
    units = reference.solvers.unit_rows(seq_grads)
    return ((units @ G) / (1.0 + options.ridge)) @ units


def jacobi_coefficients(K, h, settings):
    """Torch implementation on the Gram system: a = h' / (1 + ridge) on the unit-normalised rows."""
    s, mask, _ = normalised_gram(K, settings.P)
    a = (h * mask / s) / (1.0 + settings.ridge)
    return a * mask / s, mask.sum().to(torch.int64)


JACOBI = reference.SolverDeclaration("jacobi", "c = (N G) / (1 + ridge) on the unit rows, R = c^T N (a toy)",
                                     jacobi_remove, options=("ridge",), example={"ridge": 0.25})


@pytest.fixture
def jacobi():
    add_solver(JACOBI, jacobi_coefficients)
    try:
        yield JACOBI
    finally:
        remove_solver("jacobi")


# --------------------------------------------------------------------------- the toy rule and its new kind

class Scale(nn.Module):
    """y = x * weight, weight (d,) (a learned per-feature scale)."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * self.weight


class ElementwiseFactors(Contribution):
    """``g_i = sum_{t in i} A_t * B_t`` (elementwise): A (b, n, d) output gradients, B (b, n, d) inputs; parameter (d,).

    A new contribution kind: the three operations, a factored cross Gram (token Grams of the products
    ``A_t * B_t``) and a wire form of its own (kept token rows of A and B).
    """

    wire_name = "toy-elementwise"

    def __init__(self, A, B):
        self.A, self.B = A, B
        self.b, self.n = A.shape[0], A.shape[1]
        self.shape = torch.Size((A.shape[2],))

    @property
    def device(self):
        return self.A.device

    def _g(self, dtype):
        return (self.A.to(dtype) * self.B.to(dtype)).sum(dim=1)

    def materialize(self, r0, r1, dtype):
        return (self.A[:, :, r0:r1].to(dtype) * self.B[:, :, r0:r1].to(dtype)).sum(dim=1)

    def inner(self, G, dtype):
        return self._g(dtype) @ G.to(dtype)

    def add_weighted_(self, out, a):
        out.add_(a.to(out.dtype) @ self._g(out.dtype))

    def materialize_flops(self):
        return float(self.A.numel())

    def factored_flops(self):
        return float(self.A.numel())

    def cross_gram(self, other, dtype, max_elems):
        if not isinstance(other, ElementwiseFactors):
            return NotImplemented
        pu = (self.A.to(dtype) * self.B.to(dtype)).reshape(-1, self.shape[0])
        pv = (other.A.to(dtype) * other.B.to(dtype)).reshape(-1, other.shape[0])
        return (pu @ pv.T).view(self.b, self.n, other.b, other.n).sum(dim=(1, 3))

    def cross_gram_flops(self, other):
        if not isinstance(other, ElementwiseFactors):
            return NotImplemented
        return float(self.b * self.n) * float(other.b * other.n) * self.shape[0]

    def to_wire(self, packer, param, use, work_dtype):
        keep, counts = token_keep(self.A)
        n = int(counts.max()) if self.b else 0
        packer.add(param, use, self.wire_name, self.b, n, 0, counts.to(torch.int32), self.A[keep], self.B[keep])
        return self.b + 2 * int(counts.sum()) * self.shape[0]

    @classmethod
    def from_wire(cls, pieces, shape, work_dtype, device):
        n = max(p.n for p in pieces)
        A = torch.cat([unpack_tokens(p.tensors[0], p.tensors[1].reshape(-1, shape[0]), n, device) for p in pieces])
        B = torch.cat([unpack_tokens(p.tensors[0], p.tensors[2].reshape(-1, shape[0]), n, device) for p in pieces])
        return cls(A, B)


class ScaleRule:
    name = "toy-scale"

    def matches(self, module):
        return isinstance(module, Scale)

    def param_names(self, module):
        return ("weight",)

    def save(self, module, args, output):
        return args[0]

    def contributions(self, module, saved, grad_output, names):
        b, d = grad_output.shape[0], grad_output.shape[-1]
        return {"weight": ElementwiseFactors(grad_output.reshape(b, -1, d), saved.reshape(b, -1, d))}


@pytest.fixture
def scale_rule():
    rule = ScaleRule()
    register(rule)
    try:
        yield rule
    finally:
        unregister(rule)


# ------------------------------------------------------------------------------------------------ the solver

def test_the_declared_solver_is_accepted_everywhere_and_refused_once_removed(jacobi):
    from proma.options import AccumulatorOptions
    from verification.oracle.format import FormatError, Settings

    assert AccumulatorOptions(solver="jacobi").solver == "jacobi"
    Settings(solver="jacobi", ridge=0.5).validate("toy")
    assert Settings(solver="jacobi", ridge=0.5).label() == "proma/jacobi(ridge=0.5)"
    remove_solver("jacobi")
    try:
        with pytest.raises(ValueError, match="solver must be one of"):
            AccumulatorOptions(solver="jacobi")
        with pytest.raises(ValueError, match="solver must be one of"):
            reference.accumulate([(np.ones((1, 2)), np.ones(1))], solver="jacobi")
        with pytest.raises(FormatError, match="settings.solver must be one of"):
            Settings(solver="jacobi").validate("toy")
    finally:
        add_solver(JACOBI, jacobi_coefficients)


def test_the_reference_runs_the_declared_definition(jacobi):
    gen = np.random.default_rng(0)
    G, g = gen.standard_normal(6), gen.standard_normal((3, 6))
    units = g / np.linalg.norm(g, axis=1, keepdims=True)
    want = G - ((units @ G) / 1.5) @ units + np.array([1.0, -2.0, 0.5]) @ g
    got = reference.accumulate_step(G, g, np.array([1.0, -2.0, 0.5]), solver="jacobi", ridge=0.5).after
    np.testing.assert_allclose(got, want, rtol=FLOAT64_RTOL)


def test_the_oracles_generated_cases_cover_the_solver_and_torch_passes_them(jacobi):
    from verification.oracle.cases import _draw_case, default_recipes
    from verification.oracle.check import check_outputs
    from verification.oracle.format import default_tolerances
    from verification.oracle.impls import run_reference, run_torch

    recipes = [r for r in default_recipes() if r.settings.solver == "jacobi" and r.settings.variant == "proma"]
    assert len(recipes) >= 5 and {r.settings.ridge for r in recipes} == {0.25}
    for recipe in recipes:
        case = _draw_case(recipe, 0)
        for outputs in (run_reference(case), run_torch(case)):
            result = check_outputs(case, outputs, default_tolerances())
            assert result.ok, (recipe.id, result.failures())


def test_the_accumulator_and_the_reference_agree_with_a_planted_bug_caught(jacobi):
    """The agreement above is not vacuous: a torch implementation off by the damping factor fails it."""
    from verification.oracle.cases import _draw_case, default_recipes
    from verification.oracle.check import check_outputs
    from verification.oracle.format import default_tolerances
    from verification.oracle.impls import run_torch

    recipe = next(r for r in default_recipes() if r.settings.solver == "jacobi" and r.id.startswith("stress_span"))
    case = _draw_case(recipe, 0)
    remove_solver("jacobi")
    add_solver(JACOBI, lambda K, h, s: (jacobi_coefficients(K, h, s)[0] * (1.0 + s.ridge), jacobi_coefficients(K, h, s)[1]))
    assert not check_outputs(case, run_torch(case), default_tolerances()).ok


# -------------------------------------------------------------------------------------------------- the rule

def _scale_inputs(seed=0, sizes=(3, 2, 4), tokens=5, width=4):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(b, tokens, width, generator=gen, dtype=torch.float64) for b in sizes]
    xs[1][1] = xs[1][0]  # a duplicated sequence: rank-deficient Gram
    return xs


def _scale(width=4, seed=0):
    torch.manual_seed(seed)
    module = Scale(width).double()
    with torch.no_grad():
        module.weight.add_(0.3 * torch.randn(width, dtype=torch.float64))
    return module


def test_check_rule_passes_the_new_kind_on_both_routes_and_with_the_new_solver(scale_rule, jacobi):
    errors = check_rule(_scale(), _scale_inputs(),
                        settings=({"solver": "exact"}, {"solver": "jacobi", "ridge": 0.25, "relative_bound": 0.5}))
    assert any("ghost" in k for k in errors) and any("jacobi" in k for k in errors)


def test_check_rule_catches_a_wrong_new_kind(scale_rule):
    class Doubled(ScaleRule):
        def contributions(self, module, saved, grad_output, names):
            c = super().contributions(module, saved, grad_output, names)["weight"]
            return {"weight": ElementwiseFactors(2.0 * c.A, c.B)}

    wrong = Doubled()
    register(wrong)
    try:
        with pytest.raises(AssertionError, match="gram module.weight microbatch 0"):
            check_rule(_scale(), _scale_inputs())
    finally:
        unregister(wrong)


def test_the_new_kind_travels_in_its_own_wire_form():
    from proma.wire import Packer, merge_pieces, pack_contribution, unpack

    gen = torch.Generator().manual_seed(0)

    def ship(c):
        packer = Packer()
        pack_contribution(packer, 0, 0, c, torch.float64)
        (_, _, piece), = unpack(packer.finish(torch.device("cpu")), len(packer.meta))
        return piece

    A = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    A[0, 2] = 0.0  # a padding token: not sent
    cs = [ElementwiseFactors(A, torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)),
          ElementwiseFactors(torch.randn(3, 5, 4, generator=gen, dtype=torch.float64),
                             torch.randn(3, 5, 4, generator=gen, dtype=torch.float64))]
    merged = merge_pieces([ship(c) for c in cs], torch.Size((4,)), torch.float64, torch.device("cpu"))
    assert isinstance(merged, ElementwiseFactors) and merged.b == 5
    want = torch.cat([c.materialize(0, 4, torch.float64) for c in cs])
    torch.testing.assert_close(merged.materialize(0, 4, torch.float64), want, rtol=FLOAT64_RTOL, atol=0.0)


class ToyModel(nn.Module):
    """Embedding -> Scale (the toy rule) -> tanh -> Linear head."""

    def __init__(self, vocab=7, width=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.scale = Scale(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids):
        return self.head(torch.tanh(self.scale(self.emb(ids))))


def _seq_logp(model, batch):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    lp = torch.log_softmax(model(ids)[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    return (lp * (mask[:, 1:] * mask[:, :-1]).to(lp.dtype)).sum(dim=1)


def test_an_oracle_case_of_a_model_using_the_rule_is_passed_with_the_new_solver(scale_rule, jacobi):
    import copy

    from verification.oracle.model_case import capture_case_arrays
    from verification.oracle.cases import compute_expected
    from verification.oracle.check import check_outputs
    from verification.oracle.format import Case, Settings, default_tolerances

    torch.manual_seed(0)
    model = ToyModel().double()
    with torch.no_grad():
        model.scale.weight.add_(0.3 * torch.randn(4, dtype=torch.float64))
    gen = torch.Generator().manual_seed(1)
    batches, weights = [], []
    for b in (3, 2, 4):
        ids = torch.randint(0, 7, (b, 6), generator=gen)
        mask = (torch.arange(6)[None] < torch.randint(3, 7, (b, 1), generator=gen)).long()
        batches.append({"input_ids": ids, "attention_mask": mask})
        weights.append(torch.randn(b, generator=gen, dtype=torch.float64))
    layers, arrays = capture_case_arrays(copy.deepcopy(model), _seq_logp, batches, [w.numpy() for w in weights])
    assert any(layer.name == "scale.weight" for layer in layers)
    settings = Settings(solver="jacobi", ridge=0.25, relative_bound=0.5)
    bounds = np.cumsum([0] + [w.shape[0] for w in weights]).tolist()
    case = compute_expected(Case("toy_scale_jacobi", "toy rule, toy solver", settings, layers, bounds, arrays))

    outputs = []
    params = dict(model.named_parameters())
    with ProjectedAccumulator(model, solver="jacobi", ridge=0.25, relative_bound=0.5) as acc:
        acc.zero_grad()
        for batch, w in zip(batches, weights):
            acc.backward(_seq_logp(model, batch), w)
            outputs.append([params[layer.name].grad.detach().numpy().copy() for layer in layers])
    assert check_outputs(case, outputs, default_tolerances()).ok
