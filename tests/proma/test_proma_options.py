"""AccumulatorOptions: validated once, the published preset, options= equals keywords; solver registries agree."""
from __future__ import annotations

import pytest
import torch

import reference
from proma import PUBLISHED, AccumulatorOptions, ProjectedAccumulator, published_options
from proma.options import NO_SOLVER, SOLVERS
from proma.solvers import SOLVER_REGISTRY
from verification.testkit import trainable

from proma_testkit import SeqMLP, make_batch, seq_logp


def test_solver_registries_name_the_same_solvers():
    assert SOLVERS == tuple(SOLVER_REGISTRY)
    assert set(SOLVERS) | {NO_SOLVER} == set(reference.SOLVER_REGISTRY)
    assert reference.SOLVERS == tuple(reference.SOLVER_REGISTRY)


def test_published_preset():
    assert (PUBLISHED.variant, PUBLISHED.solver, PUBLISHED.passes, PUBLISHED.relative_bound,
            PUBLISHED.shrinkage) == ("proma", "gram_schmidt", 2, 0.5, 1.0)
    changed = published_options(strategy="ghost", sync="global")
    assert (changed.strategy, changed.sync, changed.solver) == ("ghost", "global", "gram_schmidt")
    assert published_options() is PUBLISHED
    assert AccumulatorOptions(**PUBLISHED.as_kwargs()) == PUBLISHED


@pytest.mark.parametrize("bad,needle", [
    (dict(variant="x"), "variant"), (dict(solver="qr"), "solver"), (dict(strategy="x"), "strategy"),
    (dict(sync="x"), "sync must be one of"), (dict(variant="intra", sync="global"), "sync='global'"),
    (dict(intra_form="x"), "intra_form"), (dict(passes=0), "passes"), (dict(passes=True), "passes"),
    (dict(intra_rank=-1), "intra_rank"), (dict(ridge=0.0), "ridge"), (dict(ridge=float("inf")), "ridge"),
    (dict(relative_bound=-1.0), "relative_bound"), (dict(shrinkage=float("nan")), "shrinkage"),
])
def test_invalid_options_raise_naming_the_option(bad, needle):
    with pytest.raises(ValueError, match=needle):
        AccumulatorOptions(**bad)


def test_options_are_normalised():
    o = AccumulatorOptions(exclude="fc.bias", ridge=1, relative_bound=1, shrinkage=1)
    assert o.exclude == frozenset({"fc.bias"})
    assert isinstance(o.ridge, float) and isinstance(o.relative_bound, float) and isinstance(o.shrinkage, float)
    with pytest.raises(AttributeError):
        o.solver = "ridge"  # frozen


def _grads(**acc_args):
    torch.manual_seed(0)
    model = SeqMLP(norm="rms", tie=True).double()
    gen = torch.Generator().manual_seed(1)
    with ProjectedAccumulator(model, **acc_args) as acc:
        acc.zero_grad()
        for b in (3, 2):
            ids, targets, mask = make_batch(gen, b, 4, 7, dup=True)
            acc.backward(seq_logp(model(ids), targets, mask), torch.randn(b, generator=gen, dtype=torch.float64))
    return [p.grad.clone() for _, p in trainable(model)]


def test_options_object_equals_keywords():
    by_object = _grads(options=published_options(exclude=("fc.bias",)))
    by_keywords = _grads(variant="proma", solver="gram_schmidt", passes=2, relative_bound=0.5, exclude=["fc.bias"])
    assert all(torch.equal(a, b) for a, b in zip(by_object, by_keywords))
    with pytest.raises(ValueError, match="not both"):
        ProjectedAccumulator(SeqMLP(), options=PUBLISHED, solver="exact")


def test_the_ranks_agree_on_every_option_but_the_rank_local_ones():
    """signature_items is read from the fields (it was a hand-kept list): a changed option changes it."""
    import dataclasses

    from proma.options import RANK_LOCAL_OPTIONS

    base = AccumulatorOptions()
    names = [name for name, _ in base.signature_items()]
    assert names == [f.name for f in dataclasses.fields(AccumulatorOptions) if f.name not in RANK_LOCAL_OPTIONS]
    changed = dict(variant="intra", solver="ridge", passes=3, ridge=0.5, relative_bound=0.5, shrinkage=0.5,
                   intra_rank=2, intra_form="kron", exclude=("x",), sync="global")
    assert set(changed) | set(RANK_LOCAL_OPTIONS) == {f.name for f in dataclasses.fields(AccumulatorOptions)}
    for name, value in changed.items():
        assert base.replace(**{name: value}).signature_items() != base.signature_items(), name
    assert base.replace(strategy="ghost", max_transient=7).signature_items() == base.signature_items()


def test_options_from_fields_names_the_integrations_field():
    from proma.options import options_from_fields

    assert options_from_fields({"variant": "proma", "solver": "ridge"}, "x.proma_").solver == "ridge"
    with pytest.raises(ValueError, match=r"^x\.proma_passes=0 is invalid"):
        options_from_fields({"variant": "proma", "passes": 0}, "x.proma_")
    with pytest.raises(ValueError, match=r"x\.proma_exclude=\[1\] is invalid: it must be a list of parameter names"):
        options_from_fields({"exclude": (1,)}, "x.proma_")
    with pytest.raises(ValueError, match=r"the options \{'x\.proma_variant': 'intra', 'x\.proma_sync': 'global'\}"):
        options_from_fields({"variant": "intra", "sync": "global"}, "x.proma_")
