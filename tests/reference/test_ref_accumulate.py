"""Properties of reference.accumulate / accumulate_history / accumulate_step (PROMA over microbatches)."""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from ref_strategies import ELEMENTS, bases, matrices, partitions, vectors

from reference import SOLVERS, accumulate, accumulate_history, accumulate_step, normalize_blocks, project_out
from verification.tolerances import CONVERGENCE_RTOL, FLOAT64_RTOL, REFERENCE_ATOL


@st.composite
def runs(draw, min_m=1, max_m=4, min_b=0, max_b=4, n=None):
    """(microbatches, n): M microbatches of (seq_grads (b_m, n), weights (b_m,))."""
    n = draw(st.integers(1, 8)) if n is None else n
    mbs = []
    for _ in range(draw(st.integers(min_m, max_m))):
        g = draw(bases(n, min_b=min_b, max_b=max_b))
        mbs.append((g, draw(hnp.arrays(np.float64, (g.shape[0],), elements=ELEMENTS))))
    return mbs, n


SOLVER = st.sampled_from(SOLVERS)
OPTIONS = st.fixed_dictionaries(
    {
        "solver": SOLVER,
        "passes": st.integers(1, 3),
        "ridge": st.sampled_from([1e-3, 1e-2, 1.0]),
        "relative_bound": st.one_of(st.none(), st.sampled_from([0.0, 0.1, 1.0, 10.0])),
        "shrinkage": st.sampled_from([0.0, 0.5, 1.0]),
    }
)


def scale_of(mbs):
    return max([np.abs(g).max(initial=0.0) * max(np.abs(w).max(initial=0.0), 1.0) * g.shape[0] for g, w in mbs] + [1.0])


def close(a, b, scale=1.0, tol=REFERENCE_ATOL):
    np.testing.assert_allclose(a, b, rtol=0, atol=tol * max(scale, 1.0))


def plain_sum(mbs):
    return sum(w @ g for g, w in mbs)


@given(runs(max_m=1), OPTIONS, st.data())
def test_one_microbatch_equals_pg(run, options, data):
    (mb,), n = run
    G = accumulate([mb], blocks=data.draw(partitions(n)), **options)
    close(G, mb[1] @ mb[0], scale_of([mb]))


@given(runs(), st.data())
def test_none_equals_plain_sum(run, data):
    mbs, n = run
    close(accumulate(mbs, solver="none", blocks=data.draw(partitions(n))), plain_sum(mbs), scale_of(mbs))


@given(runs(), st.sampled_from(["exact", "ridge"]), st.data())
def test_permuting_sequences_inside_a_microbatch_changes_nothing(run, solver, data):
    mbs, n = run
    blocks = data.draw(partitions(n))
    shuffled = []
    for g, w in mbs:
        perm = np.array(data.draw(st.permutations(range(g.shape[0]))), dtype=int)
        shuffled.append((g[perm], w[perm]))
    close(accumulate(shuffled, solver=solver, blocks=blocks), accumulate(mbs, solver=solver, blocks=blocks),
          scale_of(mbs) ** 2)


@given(runs(min_m=2), st.data())
def test_exact_final_G_matches_pg_on_last_microbatch(run, data):
    mbs, n = run
    G = accumulate(mbs, solver="exact", blocks=data.draw(st.one_of(st.none(), partitions(n))))
    g_last, w_last = mbs[-1]
    prev_scale = np.linalg.norm(accumulate(mbs[:-1], solver="exact")) + np.linalg.norm(plain_sum(mbs[:-1]))
    for g in g_last:
        close(g @ G, g @ (w_last @ g_last), np.linalg.norm(g) * max(prev_scale, 1.0) * scale_of(mbs))


@given(runs(min_m=2), st.data())
def test_exact_step_is_project_out_of_the_running_gradient(run, data):
    mbs, n = run
    blocks = data.draw(st.one_of(st.none(), partitions(n)))
    steps = accumulate_history(mbs, solver="exact", blocks=blocks)
    for step, (g, w) in zip(steps, mbs):
        close(step.after, project_out(step.before, g, blocks=blocks) + w @ g, scale_of(mbs) ** 2)


@given(runs(min_m=2, min_b=1), st.data())
def test_layerwise_removes_at_least_as_much_as_global(run, data):
    mbs, n = run
    sizes = data.draw(partitions(n))
    G_prev = accumulate(mbs[:-1], solver="none")
    last = [(G_prev[None, :], np.ones(1)), mbs[-1]]
    layer = accumulate_history(last, solver="exact", blocks=sizes)[-1]
    whole = accumulate_history(last, solver="exact")[-1]
    assert np.linalg.norm(layer.before - layer.removed) <= np.linalg.norm(whole.before - whole.removed) + (
        REFERENCE_ATOL * scale_of(last) ** 2)


@given(runs(), OPTIONS, st.data())
def test_blocks_are_independent(run, options, data):
    """Block B of the layer-wise result is accumulate() run on block B's columns alone."""
    mbs, n = run
    sizes = data.draw(partitions(n))
    G = accumulate(mbs, blocks=sizes, **options)
    for blk in normalize_blocks(sizes, n):
        close(G[blk], accumulate([(g[:, blk], w) for g, w in mbs], **options), scale_of(mbs) ** 2)


@given(runs(), OPTIONS, st.data())
def test_history_is_a_consistent_chain(run, options, data):
    mbs, n = run
    blocks = data.draw(partitions(n))
    steps = accumulate_history(mbs, blocks=blocks, **options)
    assert len(steps) == len(mbs)
    assert np.array_equal(steps[0].before, np.zeros(n))
    for prev, nxt in zip(steps, steps[1:]):
        assert np.array_equal(prev.after, nxt.before)
    for step, (g, w) in zip(steps, mbs):
        close(step.pg, w @ g, scale_of(mbs))
        close(step.after, step.before - options["shrinkage"] * step.removed + step.pg, scale_of(mbs) ** 2)
        single = accumulate_step(step.before, g, w, blocks=blocks, **options)
        assert np.array_equal(single.after, step.after)
    assert np.array_equal(accumulate(mbs, blocks=blocks, **options), steps[-1].after)


@given(runs(min_m=2), SOLVER, st.sampled_from([0.0, 0.1, 0.5, 2.0]), st.data())
def test_relative_bound_holds(run, solver, bound, data):
    mbs, n = run
    blocks = data.draw(partitions(n))
    capped = accumulate_history(mbs, solver=solver, relative_bound=bound, blocks=blocks)
    for step, mb in zip(capped, mbs):
        for blk in normalize_blocks(blocks, n):
            limit = bound * np.linalg.norm(step.pg[blk])
            assert np.linalg.norm(step.removed[blk]) <= limit * (1 + FLOAT64_RTOL) + REFERENCE_ATOL * (limit == 0)
            # the cap only rescales: the direction is the solver's
            free = accumulate_step(step.before, *mb, solver=solver, blocks=blocks).removed
            if np.linalg.norm(free[blk]) <= limit:
                close(step.removed[blk], free[blk], scale_of(mbs) ** 2)
            else:
                close(step.removed[blk], free[blk] * (limit / np.linalg.norm(free[blk])), scale_of(mbs) ** 2)


@given(runs(min_m=2), SOLVER)
def test_zero_pg_with_relative_bound_removes_nothing(run, solver):
    mbs, n = run
    zero_weights = [(g, np.zeros(g.shape[0])) for g, _ in mbs[1:]]
    steps = accumulate_history([mbs[0], *zero_weights], solver=solver, relative_bound=1.0)
    for step in steps[1:]:
        assert np.array_equal(step.removed, np.zeros(n))
        assert np.array_equal(step.after, steps[0].after)


@given(runs(min_m=2), SOLVER)
def test_shrinkage_zero_is_plain_accumulation(run, solver):
    mbs, n = run
    close(accumulate(mbs, solver=solver, shrinkage=0.0), plain_sum(mbs), scale_of(mbs))


@given(runs(min_m=2), SOLVER, st.integers(1, 3))
def test_zero_rows_change_nothing(run, solver, k):
    mbs, n = run
    padded = [(np.concatenate([np.zeros((k, n)), g]), np.concatenate([np.ones(k), w])) for g, w in mbs]
    close(accumulate(padded, solver=solver), accumulate(mbs, solver=solver), scale_of(mbs) ** 2)


@given(runs(min_m=2, min_b=1), st.data())
def test_exact_duplicated_sequences_change_nothing(run, data):
    mbs, n = run
    dup = []
    for g, w in mbs:
        i = data.draw(st.integers(0, g.shape[0] - 1))
        dup.append((np.concatenate([g, -3.0 * g[i:i + 1]]), np.concatenate([w, [0.0]])))
    close(accumulate(dup, solver="exact"), accumulate(mbs, solver="exact"), scale_of(mbs) ** 2)


# ---- approximations converge to exact ------------------------------------------------------------------

@st.composite
def conditioned_runs(draw, duplicates=True):
    """Microbatches whose sequence gradients are diagonally dominant (well-conditioned after normalising),
    optionally with an exact scaled copy of one row (rank-deficient but still well-separated)."""
    n = draw(st.integers(1, 8))
    mbs = []
    for _ in range(draw(st.integers(2, 4))):
        b = draw(st.integers(1, n))
        cols = np.array(draw(st.permutations(range(n)))[:b])
        g = draw(matrices(b, n))
        g[np.arange(b), cols] += 12.0 * np.array(draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=b, max_size=b)))
        if duplicates and draw(st.booleans()):
            g = np.concatenate([g, -2.0 * g[:1]])
        mbs.append((g, draw(hnp.arrays(np.float64, (g.shape[0],), elements=ELEMENTS))))
    return mbs, n


@given(conditioned_runs())
def test_gram_schmidt_with_many_passes_converges_to_exact(run):
    mbs, n = run
    exact = accumulate(mbs, solver="exact")
    close(accumulate(mbs, solver="gram_schmidt", passes=100), exact, scale_of(mbs) ** 2, CONVERGENCE_RTOL)


@given(conditioned_runs(duplicates=False))
def test_ridge_to_zero_converges_to_exact_on_full_rank_basis(run):
    mbs, n = run
    exact = accumulate(mbs, solver="exact")
    close(accumulate(mbs, solver="ridge", ridge=1e-12), exact, scale_of(mbs) ** 2, CONVERGENCE_RTOL)


@given(st.integers(1, 8), st.data())
def test_gram_schmidt_single_pass_is_exact_for_orthogonal_sequences(n, data):
    q, _ = np.linalg.qr(data.draw(matrices(n, n)) + 4 * np.eye(n))
    b = data.draw(st.integers(1, n))
    scales = data.draw(hnp.arrays(np.float64, (b,), elements=st.sampled_from([-2.0, 0.5, 1.0, 3.0])))
    g = q.T[:b] * scales[:, None]
    G0 = data.draw(vectors(n))
    step = accumulate_step(G0, g, np.zeros(b), solver="gram_schmidt", passes=1)
    close(step.after, project_out(G0, g), np.linalg.norm(G0))


# ---- brute force of the published approximations -------------------------------------------------------

def brute_gram_schmidt(G, g, passes):
    out = [float(x) for x in G]
    units = []
    for row in g:
        norm = math.hypot(*row)
        if norm > 0:
            units.append([x / norm for x in row])
    for _ in range(passes):
        for u in units:
            c = sum(a * b for a, b in zip(out, u))
            out = [a - c * b for a, b in zip(out, u)]
    return np.array(out)


def brute_ridge(G, g, lam):
    units = [row / math.hypot(*row) for row in g if any(x != 0 for x in row)]
    if not units:
        return G.copy()
    k = len(units)
    K = np.array([[sum(a * b for a, b in zip(units[p], units[q])) for q in range(k)] for p in range(k)])
    rhs = np.array([sum(a * b for a, b in zip(u, G)) for u in units])
    c = np.linalg.inv(K + lam * np.eye(k)) @ rhs
    return G - sum(ci * u for ci, u in zip(c, units))


@given(runs(), st.integers(1, 3), st.sampled_from([1e-2, 0.3, 1.0]))
def test_approximate_solvers_match_brute_force(run, passes, lam):
    mbs, n = run
    for solver, brute in [("gram_schmidt", lambda G, g: brute_gram_schmidt(G, g, passes)),
                          ("ridge", lambda G, g: brute_ridge(G, g, lam))]:
        G = np.zeros(n)
        for g, w in mbs:
            G = brute(G, g) + w @ g
        close(accumulate(mbs, solver=solver, passes=passes, ridge=lam), G, scale_of(mbs) ** 3 / lam)


def test_hand_computed_two_microbatches():
    """G_1 = pg_1 = (1, 1); microbatch 2 has g = (1, 0): exact removes G's first coordinate."""
    mbs = [(np.array([[1.0, 1.0]]), np.array([1.0])), (np.array([[2.0, 0.0]]), np.array([0.5]))]
    np.testing.assert_allclose(accumulate(mbs, solver="exact"), [1.0, 1.0], atol=REFERENCE_ATOL)
    np.testing.assert_allclose(accumulate(mbs, solver="none"), [2.0, 1.0], atol=REFERENCE_ATOL)
    np.testing.assert_allclose(accumulate(mbs, solver="gram_schmidt"), [1.0, 1.0], atol=REFERENCE_ATOL)
    # ridge: c = 1 / (1 + 0.25), so G = (1 - 0.8, 1) + (1, 0)
    np.testing.assert_allclose(accumulate(mbs, solver="ridge", ridge=0.25), [1.2, 1.0], atol=REFERENCE_ATOL)
    # cap: ||R|| = 1 > 0.5 * ||pg_2|| = 0.5
    np.testing.assert_allclose(accumulate(mbs, relative_bound=0.5), [1.5, 1.0], atol=REFERENCE_ATOL)
    np.testing.assert_allclose(accumulate(mbs, shrinkage=0.5), [1.5, 1.0], atol=REFERENCE_ATOL)
    np.testing.assert_allclose(accumulate(mbs, blocks=[1, 1]), [1.0, 1.0], atol=REFERENCE_ATOL)
