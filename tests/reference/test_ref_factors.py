"""Per-sequence layer gradients from factors vs explicit loops over tokens and outer products."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from ref_strategies import matrices

from reference import (
    bias_seq_grads,
    embedding_seq_grads,
    linear_seq_gram,
    linear_seq_grads,
    scale_seq_grads,
    seq_index_for,
)
from verification.tolerances import FLOAT64_RTOL, REFERENCE_ATOL


@st.composite
def tokens(draw, max_t=8):
    """(t, n_seq, seq_index): t tokens spread over n_seq sequences (some sequences may be empty)."""
    n_seq = draw(st.integers(1, 4))
    t = draw(st.integers(0, max_t))
    seq_index = draw(hnp.arrays(np.int64, (t,), elements=st.integers(0, n_seq - 1)))
    return t, n_seq, seq_index


@st.composite
def linear_cases(draw):
    t, n_seq, seq_index = draw(tokens())
    i, o = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    return draw(matrices(t, i)), draw(matrices(t, o)), seq_index, n_seq


def close(a, b, scale=1.0):
    np.testing.assert_allclose(a, b, rtol=FLOAT64_RTOL, atol=REFERENCE_ATOL * max(scale, 1.0))


@given(linear_cases())
def test_linear_weight_and_bias_equal_sums_of_outer_products(case):
    X, D, seq_index, n_seq = case
    weight, bias = linear_seq_grads(X, D, seq_index, n_seq, bias=True)
    o, i = D.shape[1], X.shape[1]
    W = np.zeros((n_seq, o, i))
    B = np.zeros((n_seq, o))
    for t in range(X.shape[0]):
        j = seq_index[t]
        for a in range(o):
            B[j, a] += D[t, a]
            for c in range(i):
                W[j, a, c] += D[t, a] * X[t, c]
    close(weight, W, 36.0)
    close(bias, B, 36.0)
    assert np.array_equal(linear_seq_grads(X, D, seq_index, n_seq), weight)


@given(linear_cases(), st.booleans())
def test_ghost_gram_equals_explicit_double_sum_and_materialised_gram(case, with_bias):
    X, D, seq_index, n_seq = case
    K = linear_seq_gram(X, D, seq_index, n_seq, bias=with_bias)
    explicit = np.zeros((n_seq, n_seq))
    for t in range(X.shape[0]):
        for s in range(X.shape[0]):
            xx = sum(X[t, c] * X[s, c] for c in range(X.shape[1])) + (1.0 if with_bias else 0.0)
            dd = sum(D[t, a] * D[s, a] for a in range(D.shape[1]))
            explicit[seq_index[t], seq_index[s]] += xx * dd
    close(K, explicit, 1e4)
    if with_bias:
        weight, bias = linear_seq_grads(X, D, seq_index, n_seq, bias=True)
        flat = np.concatenate([weight.reshape(n_seq, -1), bias], axis=1)
    else:
        flat = linear_seq_grads(X, D, seq_index, n_seq).reshape(n_seq, -1)
    close(K, flat @ flat.T, 1e4)


@given(linear_cases())
def test_sequences_without_tokens_get_zero_and_total_is_full_gradient(case):
    X, D, seq_index, n_seq = case
    weight = linear_seq_grads(X, D, seq_index, n_seq)
    for j in range(n_seq):
        if j not in seq_index:
            assert np.array_equal(weight[j], np.zeros_like(weight[j]))
    close(weight.sum(axis=0), D.T @ X, 36.0)


@given(tokens(), st.integers(1, 4), st.data())
def test_scale_and_bias_equal_token_loops(tok, f, data):
    t, n_seq, seq_index = tok
    xhat, D = data.draw(matrices(t, f)), data.draw(matrices(t, f))
    scale = np.zeros((n_seq, f))
    bias = np.zeros((n_seq, f))
    for k in range(t):
        for c in range(f):
            scale[seq_index[k], c] += D[k, c] * xhat[k, c]
            bias[seq_index[k], c] += D[k, c]
    close(scale_seq_grads(xhat, D, seq_index, n_seq), scale, 9.0)
    close(bias_seq_grads(D, seq_index, n_seq), bias, 9.0)


@given(tokens(), st.integers(1, 5), st.integers(1, 3), st.data())
def test_embedding_equals_token_loop(tok, V, e, data):
    t, n_seq, seq_index = tok
    ids = data.draw(hnp.arrays(np.int64, (t,), elements=st.integers(0, V - 1)))
    D = data.draw(matrices(t, e))
    pad = data.draw(st.one_of(st.none(), st.integers(0, V - 1)))
    expected = np.zeros((n_seq, V, e))
    for k in range(t):
        if ids[k] != pad:
            for c in range(e):
                expected[seq_index[k], ids[k], c] += D[k, c]
    close(embedding_seq_grads(ids, D, seq_index, n_seq, V, padding_idx=pad), expected, 9.0)


def test_embedding_equals_linear_layer_on_one_hot_inputs():
    ids = np.array([2, 0, 2, 1])
    D = np.arange(8.0).reshape(4, 2)
    seq = np.array([0, 0, 1, 1])
    via_linear = linear_seq_grads(np.eye(3)[ids], D, seq, 2)  # (b, e, V)
    np.testing.assert_allclose(embedding_seq_grads(ids, D, seq, 2, 3), via_linear.transpose(0, 2, 1),
                               atol=REFERENCE_ATOL)


def test_seq_index_for_row_major_layout():
    assert seq_index_for(3, 2).tolist() == [0, 0, 1, 1, 2, 2]
    X = np.arange(12.0).reshape(3, 2, 2)
    D = np.ones((3, 2, 1))
    weight = linear_seq_grads(X.reshape(6, 2), D.reshape(6, 1), seq_index_for(3, 2), 3)
    np.testing.assert_allclose(weight[:, 0], X.sum(axis=1), atol=REFERENCE_ATOL)


@pytest.mark.parametrize("call, name", [
    (lambda: linear_seq_grads(np.ones((3, 2)), np.ones((4, 2)), [0, 0, 1], 2), "same number of tokens"),
    (lambda: linear_seq_grads(np.ones((3, 2)), np.ones((3, 2)), [0, 0], 2), "seq_index"),
    (lambda: linear_seq_grads(np.ones((3, 2)), np.ones((3, 2)), [0, 0, 2], 2), "seq_index"),
    (lambda: linear_seq_grads(np.ones((3, 2)), np.ones((3, 2)), [0, 0, -1], 2), "seq_index"),
    (lambda: linear_seq_grads(np.ones((3, 2)), np.ones((3, 2)), [0.5, 0, 1], 2), "seq_index"),
    (lambda: linear_seq_grads(np.ones((3, 2)), np.ones((3, 2)), [0, 0, 1], -1), "n_seq"),
    (lambda: linear_seq_grads(np.full((3, 2), np.inf), np.ones((3, 2)), [0, 0, 1], 2), "X"),
    (lambda: linear_seq_grads(np.ones(3), np.ones((3, 2)), [0, 0, 1], 2), "X"),
    (lambda: linear_seq_gram(np.ones((3, 2)), np.full((3, 2), np.nan), [0, 0, 1], 2), "D"),
    (lambda: scale_seq_grads(np.ones((3, 2)), np.ones((3, 3)), [0, 0, 1], 2), "xhat"),
    (lambda: embedding_seq_grads([0, 5], np.ones((2, 2)), [0, 1], 2, 5), "ids"),
    (lambda: embedding_seq_grads([0, 1], np.ones((2, 2)), [0, 1], 2, 5, padding_idx=5), "padding_idx"),
    (lambda: embedding_seq_grads([0, 1], np.ones((2, 2)), [0, 1], 2, 0), "num_embeddings"),
])
def test_bad_input_raises_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()
