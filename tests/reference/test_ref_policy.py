"""Advantages, categorical KL / entropy, second-order KL and residual overlap vs explicit loops."""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from ref_strategies import bases, matrices, vectors

from reference import (
    accumulate_history,
    categorical_entropy,
    categorical_kl,
    group_advantages,
    residual_overlap,
    second_order_kl,
)
from verification.tolerances import FLOAT64_RTOL, REFERENCE_ATOL

LOGITS = st.floats(-30, 30, allow_nan=False, allow_subnormal=False)
REWARDS = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(-5, 5, allow_nan=False, allow_subnormal=False))


def close(a, b, scale=1.0):
    np.testing.assert_allclose(a, b, rtol=FLOAT64_RTOL, atol=REFERENCE_ATOL * max(scale, 1.0))


@st.composite
def grouped_rewards(draw):
    group_size = draw(st.integers(1, 5))
    groups = draw(st.integers(1, 4))
    return draw(hnp.arrays(np.float64, (groups * group_size,), elements=REWARDS)), group_size


@given(grouped_rewards(), st.sampled_from([0.0, 1e-6, 1e-4]), st.sampled_from([0, 1]))
def test_advantages_equal_explicit_group_loops(case, eps, ddof):
    rewards, group_size = case
    expected_std, expected_none = [], []
    for start in range(0, len(rewards), group_size):
        group = [float(r) for r in rewards[start:start + group_size]]
        if min(group) == max(group):  # constant group: no signal, advantage exactly 0 by definition
            expected_none += [0.0] * group_size
            expected_std += [0.0] * group_size
            continue
        mean = sum(group) / group_size
        dev = [r - mean for r in group]
        peak = max(abs(x) for x in dev)  # scaled so that tiny spreads do not underflow when squared
        var = sum((x / peak) ** 2 for x in dev) / (group_size - ddof) if group_size > ddof else math.nan
        for x in dev:
            expected_none.append(x)
            expected_std.append((x / peak) / (math.sqrt(var) + eps / peak))
    close(group_advantages(rewards, group_size, scale="none"), expected_none, 10.0)
    if group_size > ddof:
        got = group_advantages(rewards, group_size, eps=eps, scale="std", ddof=ddof)
        # tiny non-zero spreads (e.g. 1e-300) make the division ill-conditioned: compare relative to |A|
        np.testing.assert_allclose(got, expected_std, rtol=FLOAT64_RTOL * 1e3, atol=REFERENCE_ATOL)


@given(grouped_rewards())
def test_advantages_are_centred_per_group_and_unit_scaled(case):
    rewards, group_size = case
    for scale in ("std", "none") if group_size > 1 else ("none",):
        adv = group_advantages(rewards, group_size, scale=scale).reshape(-1, group_size)
        close(adv.sum(axis=1), np.zeros(adv.shape[0]), 1e6)
    if group_size > 1:
        adv = group_advantages(rewards, group_size, eps=0.0).reshape(-1, group_size)
        spread = rewards.reshape(-1, group_size).std(axis=1, ddof=1)
        ok = spread > 1e-6
        close(adv[ok].std(axis=1, ddof=1), np.ones(int(ok.sum())), 1e3)


def test_advantages_hand_computed():
    # GRPO with ddof=1: mean 2/3, std sqrt(1/3)
    adv = group_advantages([1.0, 0.0, 1.0], 3, eps=0.0)
    np.testing.assert_allclose(adv, np.array([1, -2, 1]) / 3 / math.sqrt(1 / 3), rtol=FLOAT64_RTOL)
    np.testing.assert_allclose(group_advantages([1.0, 0.0, 1.0, 1.0], 2, scale="none"), [0.5, -0.5, 0.0, 0.0])
    # all-equal group: zero advantage, no division by zero
    np.testing.assert_array_equal(group_advantages([1.0, 1.0], 2), [0.0, 0.0])


def softmax_rows(logits):
    out = []
    for row in np.atleast_2d(logits):
        m = max(row)
        e = [math.exp(x - m) for x in row]
        z = sum(e)
        out.append([x / z for x in e])
    return out


@st.composite
def logit_pairs(draw):
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 6)))
    return (draw(hnp.arrays(np.float64, shape, elements=LOGITS)),
            draw(hnp.arrays(np.float64, shape, elements=LOGITS)))


@given(logit_pairs())
def test_kl_and_entropy_equal_explicit_softmax_sums(pair):
    lp, lq = pair
    kl, ent = [], []
    for p, q in zip(softmax_rows(lp), softmax_rows(lq)):
        # p_v log(p_v / q_v) with log q_v computed stably as (l_v - m) - log sum exp
        kl.append(sum(pv * (math.log(pv) - math.log(qv)) for pv, qv in zip(p, q) if pv > 0 and qv > 0))
        ent.append(-sum(pv * math.log(pv) for pv in p if pv > 0))
    ok = [all(qv > 0 for qv in q) for q in softmax_rows(lq)]  # q underflowing to 0 makes the loop useless
    close(categorical_kl(lp, lq)[ok], np.array(kl)[ok], 1e2)
    close(categorical_entropy(lp), ent, 1e2)


@given(logit_pairs(), st.floats(-50, 50))
def test_kl_properties(pair, shift):
    lp, lq = pair
    kl = categorical_kl(lp, lq)
    assert np.all(kl >= -REFERENCE_ATOL)
    close(categorical_kl(lp, lp), np.zeros(lp.shape[0]))
    close(categorical_kl(lp + shift, lq - shift), kl, 1e2)
    ent = categorical_entropy(lp)
    assert np.all(ent >= -REFERENCE_ATOL) and np.all(ent <= math.log(lp.shape[1]) + REFERENCE_ATOL)
    close(categorical_entropy(np.zeros_like(lp)), np.full(lp.shape[0], math.log(lp.shape[1])))


def test_kl_hand_computed_and_leading_shape():
    lp = np.log(np.array([[0.5, 0.5], [0.9, 0.1]]))
    lq = np.log(np.array([[0.9, 0.1], [0.9, 0.1]]))
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    np.testing.assert_allclose(categorical_kl(lp, lq), [expected, 0.0], atol=REFERENCE_ATOL)
    assert categorical_kl(np.zeros((2, 3, 4)), np.ones((2, 3, 4))).shape == (2, 3)


@given(st.integers(1, 6), st.data())
def test_second_order_kl_equals_explicit_loop(n, data):
    g = data.draw(bases(n, min_b=1))
    d = data.draw(vectors(n))
    total = sum(sum(gi * di for gi, di in zip(row, d)) ** 2 for row in g)
    close(second_order_kl(g, d), 0.5 * total / g.shape[0], 1e4)


def test_second_order_kl_accepts_parameter_shapes():
    g = np.arange(12.0).reshape(2, 3, 2)
    d = np.ones((3, 2))
    np.testing.assert_allclose(second_order_kl(g, d), 0.5 * (15.0 ** 2 + 51.0 ** 2) / 2, rtol=FLOAT64_RTOL)


@given(st.integers(1, 6), st.data())
def test_residual_overlap_equals_explicit_loop(n, data):
    g = data.draw(bases(n))
    G = data.draw(vectors(n))
    best = 0.0
    def unit(x):  # scaled by its peak first: tiny vectors must not underflow to a zero norm
        peak = max(abs(v) for v in x)
        return [v / peak / math.hypot(*(w / peak for w in x)) for v in x] if peak > 0 else None

    for row in g:
        a, b = unit(row), unit(G)
        if a is not None and b is not None:
            best = max(best, abs(sum(x * y for x, y in zip(a, b))))
    got = residual_overlap(g, G)
    assert 0.0 <= got <= 1.0
    close(got, best)


@given(st.integers(2, 6), st.data())
def test_exact_step_leaves_no_overlap_with_the_microbatch(n, data):
    g1, g2 = data.draw(matrices(2, n)), data.draw(bases(n, min_b=1, max_b=n - 1))
    steps = accumulate_history([(g1, np.ones(2)), (g2, np.zeros(g2.shape[0]))], solver="exact")
    kept = steps[-1].after
    if np.linalg.norm(kept) > 1e-6 * max(np.linalg.norm(steps[-1].before), 1.0):
        assert residual_overlap(g2, kept) <= REFERENCE_ATOL * 1e3


@pytest.mark.parametrize("call, name", [
    (lambda: group_advantages([1.0, 2.0, 3.0], 2), "group_size"),
    (lambda: group_advantages([1.0, 2.0], 0), "group_size"),
    (lambda: group_advantages([1.0, 2.0], 1), "group_size"),
    (lambda: group_advantages([1.0, np.nan], 2), "rewards"),
    (lambda: group_advantages([[1.0, 2.0]], 2), "rewards"),
    (lambda: group_advantages([1.0, 2.0], 2, scale="mad"), "scale"),
    (lambda: group_advantages([1.0, 2.0], 2, eps=-1.0), "eps"),
    (lambda: categorical_kl(np.zeros((2, 3)), np.zeros((2, 4))), "logits_q"),
    (lambda: categorical_kl(np.array([0.0, np.inf]), np.zeros(2)), "logits_p"),
    (lambda: categorical_kl(np.zeros((2, 0)), np.zeros((2, 0))), "logits_p"),
    (lambda: categorical_entropy(np.array([np.nan, 0.0])), "logits"),
    (lambda: second_order_kl(np.ones((2, 3)), np.ones(4)), "seq_grads"),
    (lambda: second_order_kl(np.ones((0, 3)), np.ones(3)), "seq_grads"),
    (lambda: second_order_kl(np.ones((2, 3)), np.full(3, np.nan)), "d"),
    (lambda: residual_overlap(np.ones((2, 3)), np.ones((3, 1))), "seq_grads"),
])
def test_bad_input_raises_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()
