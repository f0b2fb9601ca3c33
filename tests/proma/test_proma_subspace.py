"""proma.subspace's block Lanczos where the Krylov space becomes invariant early: a masked, rank-deficient
factor with a fast-decaying spectrum (as real layer inputs are), judged against a dense SVD of the kept rows.

Before the breakdown guard, such a factor gave a Ritz value above the largest eigenvalue and a top vector
0.68 away (1 - |cos|) from the dense one on a real layer-0 k_proj input; here every block count must agree.
"""
from pathlib import Path

import numpy as np
import pytest
import torch

from proma import subspace

VECTOR_TOL = {torch.float64: 1e-10, torch.float32: 1e-4}   # 1 - |cos| of the top vector
VALUE_TOL = {torch.float64: 1e-12, torch.float32: 1e-5}    # relative error of the top eigenvalue


def _decaying_factor(t, d, rank, dtype, seed=0):
    """(t, d) factor of the given rank, singular values 10^(-k/3), half its rows masked out."""
    gen = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(t, rank, generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(d, rank, generator=gen, dtype=torch.float64))[0]
    s = 10.0 ** (-torch.arange(rank, dtype=torch.float64) / 3)
    mask = (torch.rand(t, generator=gen) < 0.5).to(torch.float64)
    return ((U * s) @ V.T).to(dtype), mask.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("right, shape", [(True, (400, 192)), (False, (180, 600))])
@pytest.mark.parametrize("blocks", [10, 63, 150])
def test_lanczos_survives_an_invariant_krylov_space(dtype, right, shape, blocks):
    M, mask = _decaying_factor(*shape, rank=60, dtype=dtype)
    kept = M[mask.bool()].double()
    gram = kept.T @ kept if right else kept @ kept.T
    lam, Q = torch.linalg.eigh(gram)
    if not right:   # the left Gram lives on the kept rows only; embed its top vector in all t rows
        top = torch.zeros(shape[0], dtype=torch.float64)
        top[mask.bool()] = Q[:, -1]
    else:
        top = Q[:, -1]
    n = shape[1] if right else shape[0]
    theta, X, _ = subspace._lanczos(M, 1, right, mask, min(blocks, n))
    assert abs(float(theta[0]) - float(lam[-1])) <= VALUE_TOL[dtype] * float(lam[-1])
    assert 1 - abs(float(X[:, 0] @ top)) <= VECTOR_TOL[dtype]


REAL_FACTOR = Path(__file__).parent / "data" / "real_masked_factor.npz"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_real_layer_input_top_direction_matches_dense(dtype):
    """A real input factor (208 tokens x 192 features, 107 carrying data: layer-0 k_proj of the small Qwen3
    after 4 PROMA steps, quick report) through ``dominant_subspace``, the route intra uses."""
    from proma.subspace import dominant_subspace

    data = np.load(REAL_FACTOR)
    M, mask = torch.as_tensor(data["M"]), torch.as_tensor(data["mask"]).double()
    kept = M[mask.bool()]
    lam, Q = torch.linalg.eigh(kept.T @ kept)
    assert M.shape[1] > subspace.DENSE_EIGH_MAX     # the Lanczos route, not the dense one
    V = dominant_subspace(M.to(dtype), 1, row_mask=mask.to(dtype)).V
    assert 1 - abs(float(V[:, 0].double() @ Q[:, -1])) <= VECTOR_TOL[dtype]
    theta = subspace.top_eigenpairs(M.to(dtype), 1, True, row_mask=mask.to(dtype))[0]
    assert abs(float(theta[0]) - float(lam[-1])) <= VALUE_TOL[dtype] * float(lam[-1])
