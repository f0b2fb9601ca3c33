"""One source of truth for option names and defaults: ``proma.options``. The judge (``reference``, which
imports nothing of proma) keeps its own copy and the oracle's format takes its names from the judge; these
tests keep the three equal. Solvers are declared once, in ``reference/solvers.py`` (docs/extending.md)."""
from __future__ import annotations

import dataclasses

import pytest

import reference
from proma import options as P
from verification.oracle import format as F

DEFAULTS = P.AccumulatorOptions()


def test_solver_names_are_the_same_everywhere():
    assert set(reference.SOLVER_REGISTRY) == set(P.ACCUMULATOR_SOLVERS)
    assert set(F.SOLVERS) == set(P.SOLVERS)  # the format's "none" is variant "none"
    assert P.NO_SOLVER in reference.SOLVER_REGISTRY and P.NO_SOLVER not in F.SOLVERS


def test_variant_and_intra_form_names_are_the_same_everywhere():
    assert set(F.VARIANTS) == set(P.VARIANTS)
    assert tuple(reference.FORMS) == tuple(P.INTRA_FORMS) == tuple(F.INTRA_FORMS)


@pytest.mark.parametrize("name", ["solver", "passes", "ridge", "relative_bound", "shrinkage"])
def test_reference_defaults_mirror_proma(name):
    assert getattr(reference.AccumulationOptions(), name) == getattr(DEFAULTS, name)


def test_reference_constants_mirror_proma():
    assert (reference.DEFAULT_PASSES, reference.DEFAULT_RIDGE) == (DEFAULTS.passes, DEFAULTS.ridge)


def test_format_settings_defaults_mirror_proma():
    settings = F.Settings()
    for field in dataclasses.fields(F.Settings):
        assert getattr(settings, field.name) == getattr(DEFAULTS, field.name), field.name


def test_published_settings_are_a_valid_case_setting():
    F.Settings(**P.PUBLISHED_SETTINGS).validate("published")
    assert reference.AccumulationOptions(**{k: v for k, v in P.PUBLISHED_SETTINGS.items() if k != "variant"})


def test_the_oracles_published_case_uses_the_published_settings():
    """The synthetic "paper_settings" case spells the published run out (the oracle does not import proma)."""
    from verification.oracle.cases import default_recipes

    paper = next(r for r in default_recipes() if r.id == "paper_settings")
    assert paper.settings == F.Settings(**P.PUBLISHED_SETTINGS)


def test_every_declared_builtin_solver_has_its_torch_implementation():
    """A built-in solver is one declaration (reference/solvers.py) and one torch entry (proma/solvers.py)."""
    from proma import solvers

    assert set(reference.solvers.BUILTIN_SOLVERS) - {P.NO_SOLVER} == set(solvers.SOLVER_REGISTRY)
    assert solvers.solver_names() == P.ACCUMULATOR_SOLVERS
