"""Per-sequence gradients of single layers from their backprop factors.

Index conventions: b sequences (``n_seq``), t tokens (all sequences' tokens stacked), i in-features,
o out-features, f features of an elementwise layer, V vocabulary (embedding rows), e embedding width.
``seq_index[t]`` in ``[0, b)`` says which sequence token t belongs to; padded tokens either carry a zero
output gradient or are left out. For activations laid out as (b, T, ...) use :func:`seq_index_for`.

Each gradient is the sum over a sequence's tokens of that token's contribution, computed here through a
one-hot sequence matrix ``S`` (b, t), ``S[j, t] = [seq_index[t] == j]``:

- linear weight  (out = x W^T + bias): ``g_j = sum_{t in j} D_t^T X_t``          (b, o, i)
- linear bias / any additive bias:     ``g_j = sum_{t in j} D_t``                 (b, o)
- elementwise scale (LayerNorm / RMSNorm weight, out = w * xhat + bias):
                                        ``g_j = sum_{t in j} D_t * xhat_t``       (b, f)
- embedding (out_t = E[ids_t]):         ``g_j[v] = sum_{t in j, ids_t = v} D_t``  (b, V, e)

The Gram of the linear per-sequence gradients ("ghost" route, never forming the b gradients):
``K_jk = <g_j, g_k> = sum_{t in j, s in k} (X_t . X_s)(D_t . D_s)`` (+ ``(D_t . D_s)`` with the bias).
"""
from __future__ import annotations

import numpy as np

from ._validate import as_array, as_index_array, as_int


def seq_index_for(b: int, T: int) -> np.ndarray:
    """``seq_index`` for tokens laid out (b, T) and flattened row-major: ``[0]*T + [1]*T + ...``."""
    b = as_int(b, "b", minimum=0)
    T = as_int(T, "T", minimum=0)
    return np.repeat(np.arange(b), T)


def _one_hot(seq_index, n_seq, t: int) -> np.ndarray:
    n_seq = as_int(n_seq, "n_seq", minimum=0)
    idx = as_index_array(seq_index, "seq_index", length=t, upper=n_seq)
    S = np.zeros((n_seq, t))
    S[idx, np.arange(t)] = 1.0
    return S


def _tokens(A, name: str) -> np.ndarray:
    return as_array(A, name, ndim=2)


def _same_tokens(A, B, a_name, b_name):
    if A.shape[0] != B.shape[0]:
        raise ValueError(f"{a_name} {A.shape} and {b_name} {B.shape} must have the same number of tokens")


def linear_seq_grads(X, D, seq_index, n_seq, *, bias=False):
    """Per-sequence gradients of a linear layer ``out = x W^T (+ bias)``.

    Parameters
    ----------
    X : array_like, shape (t, i)
        Layer inputs, one row per token.
    D : array_like, shape (t, o)
        Gradients of the loss (here: the sequence log-probability) w.r.t. the layer outputs.
    seq_index : array_like of int, shape (t,)
        Sequence of each token, in ``[0, n_seq)``.
    n_seq : int
        Number of sequences b (sequences with no tokens get zero gradients).
    bias : bool
        Also return the bias gradients.

    Returns
    -------
    weight : ndarray, shape (b, o, i)
        ``weight[j] = sum_{t in j} outer(D_t, X_t)``.
    (weight, bias) : tuple of ndarray, shapes (b, o, i) and (b, o), when ``bias=True``
        ``bias[j] = sum_{t in j} D_t``.
    """
    X, D = _tokens(X, "X"), _tokens(D, "D")
    _same_tokens(X, D, "X", "D")
    S = _one_hot(seq_index, n_seq, X.shape[0])
    weight = np.einsum("bt,to,ti->boi", S, D, X)
    return (weight, S @ D) if bias else weight


def linear_seq_gram(X, D, seq_index, n_seq, *, bias=False) -> np.ndarray:
    """Gram ``K`` (b, b) of a linear layer's per-sequence gradients, from token Grams only.

    ``K_jk = sum_{t in j, s in k} (X_t . X_s + [bias]) (D_t . D_s)``; shapes as :func:`linear_seq_grads`.
    """
    X, D = _tokens(X, "X"), _tokens(D, "D")
    _same_tokens(X, D, "X", "D")
    S = _one_hot(seq_index, n_seq, X.shape[0])
    xx = X @ X.T + (1.0 if bias else 0.0)
    return S @ (xx * (D @ D.T)) @ S.T


def bias_seq_grads(D, seq_index, n_seq) -> np.ndarray:
    """Per-sequence gradients of an additive bias: ``g_j = sum_{t in j} D_t``.

    D shape (t, f); returns (b, f).
    """
    D = _tokens(D, "D")
    return _one_hot(seq_index, n_seq, D.shape[0]) @ D


def scale_seq_grads(xhat, D, seq_index, n_seq) -> np.ndarray:
    """Per-sequence gradients of an elementwise scale ``out = w * xhat`` (LayerNorm/RMSNorm weight).

    Parameters
    ----------
    xhat : array_like, shape (t, f)
        The normalised input that the weight multiplies (for ``(1 + w) * xhat`` variants too).
    D : array_like, shape (t, f)
        Gradients w.r.t. the layer output.
    seq_index, n_seq : as :func:`linear_seq_grads`.

    Returns
    -------
    ndarray, shape (b, f)
        ``g_j = sum_{t in j} D_t * xhat_t``.
    """
    xhat, D = _tokens(xhat, "xhat"), _tokens(D, "D")
    if xhat.shape != D.shape:
        raise ValueError(f"xhat {xhat.shape} and D {D.shape} must have the same shape (t, f)")
    return _one_hot(seq_index, n_seq, D.shape[0]) @ (D * xhat)


def embedding_seq_grads(ids, D, seq_index, n_seq, num_embeddings, *, padding_idx=None) -> np.ndarray:
    """Per-sequence gradients of an embedding table ``out_t = E[ids_t]``.

    Parameters
    ----------
    ids : array_like of int, shape (t,)
        Token ids in ``[0, num_embeddings)``.
    D : array_like, shape (t, e)
        Gradients w.r.t. the looked-up rows.
    seq_index, n_seq : as :func:`linear_seq_grads`.
    num_embeddings : int
        Rows V of the table.
    padding_idx : int, optional
        Row that receives no gradient (as ``torch.nn.Embedding(padding_idx=...)``).

    Returns
    -------
    ndarray, shape (b, V, e)
        ``g_j[v] = sum_{t in j, ids_t = v} D_t``.
    """
    D = _tokens(D, "D")
    V = as_int(num_embeddings, "num_embeddings", minimum=1)
    ids = as_index_array(ids, "ids", length=D.shape[0], upper=V)
    n_seq = as_int(n_seq, "n_seq", minimum=0)
    seq = as_index_array(seq_index, "seq_index", length=D.shape[0], upper=n_seq)
    grads = np.zeros((n_seq, V, D.shape[1]))
    np.add.at(grads, (seq, ids), D)
    if padding_idx is not None:
        padding_idx = as_int(padding_idx, "padding_idx", minimum=0)
        if padding_idx >= V:
            raise ValueError(f"padding_idx must be < num_embeddings = {V}; got {padding_idx}")
        grads[:, padding_idx] = 0.0
    return grads
