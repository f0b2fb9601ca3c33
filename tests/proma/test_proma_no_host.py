"""The backward pass stays on the parameter's device: no NumPy / SciPy, a constant number of host reads.

Every b x b solve and the intra subspace search run in torch on the parameter's device, so on an accelerator
nothing waits for the host between layers. These tests patch the ways a value reaches the host
(``Tensor.item``, ``float()``, ``int()``, ``bool()``, ``.tolist()``, ``.numpy()``, ``np.asarray(tensor)``)
and the NumPy / SciPy linear-algebra entry points, run ``acc.backward`` on a small model on the CPU, and
count. The model is wide enough (width and tokens above :data:`proma.subspace.DENSE_EIGH_MAX`) for intra's
Krylov route to run, and has two hidden layers so that a read per layer would show as a larger count.
"""
from __future__ import annotations

import contextlib
import traceback

import numpy as np
import pytest
import scipy.linalg
import scipy.sparse.linalg
import torch
from torch import nn

from proma import ProjectedAccumulator, subspace

# Host reads allowed per microbatch, whatever the number of layers: check_microbatch's two finiteness tests
# of the weights and of seq_logp, and the transaction's one test that every new running gradient is finite
# before any p.grad is written (proma.microbatch.Transaction.commit; one per device).
HOST_READS_PER_MICROBATCH = 3
WIDTH = subspace.DENSE_EIGH_MAX + 8    # features of every hidden activation: the Krylov route runs
B, T, VOCAB, LAYERS = 4, 48, 11, 3     # b * T = 192 tokens > WIDTH
MICROBATCHES = 3

READERS = ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__", "__array__")
NUMPY_ENTRY_POINTS = [(np.linalg, name) for name in ("eigh", "eigvalsh", "svd", "solve", "lstsq", "pinv", "qr",
                                                     "cholesky", "inv", "norm")]
NUMPY_ENTRY_POINTS += [(np, "asarray"), (np, "array")]
NUMPY_ENTRY_POINTS += [(scipy.linalg, name) for name in ("eigh", "svd", "solve", "cholesky", "qr", "lstsq")]
NUMPY_ENTRY_POINTS += [(scipy.sparse.linalg, name) for name in ("eigsh", "svds", "lobpcg")]


class Deep(nn.Module):
    """Embedding -> LAYERS x (RMSNorm, Linear, tanh) -> head: one Linear per layer, each above the dense size."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, WIDTH)
        self.norms = nn.ModuleList(nn.RMSNorm(WIDTH, eps=1e-5) for _ in range(LAYERS))
        self.fcs = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS))
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, ids):
        h = self.emb(ids)
        for norm, fc in zip(self.norms, self.fcs):
            h = h + torch.tanh(fc(norm(h)))
        return self.head(h)


@contextlib.contextmanager
def counting(monkeypatch):
    """Count host reads of tensor values and NumPy / SciPy calls (with the line that made each)."""
    seen = {"host": [], "numpy": []}

    def wrap(kind, fn, name):
        def wrapper(*args, **kwargs):
            where = traceback.extract_stack(limit=2)[0]   # the caller of the patched function
            seen[kind].append(f"{name} at {where.filename}:{where.lineno}")
            return fn(*args, **kwargs)
        return wrapper

    with monkeypatch.context() as m:
        for name in READERS:
            m.setattr(torch.Tensor, name, wrap("host", getattr(torch.Tensor, name), name))
        for module, name in NUMPY_ENTRY_POINTS:
            m.setattr(module, name, wrap("numpy", getattr(module, name), f"{module.__name__}.{name}"))
        yield seen


def _microbatches():
    gen = torch.Generator().manual_seed(0)
    return [(torch.randint(0, VOCAB, (B, T), generator=gen), torch.randn(B, generator=gen, dtype=torch.float64))
            for _ in range(MICROBATCHES)]


def _seq_logp(model, ids):
    lp = torch.log_softmax(model(ids)[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return lp.sum(dim=1)


@pytest.mark.parametrize("options", [dict(variant="proma", solver="exact"),
                                     dict(variant="proma", solver="gram_schmidt", relative_bound=0.5),
                                     dict(variant="proma", solver="ridge", shrinkage=0.5),
                                     dict(variant="intra", intra_rank=1),
                                     dict(variant="intra", intra_rank=2, intra_form="kron")],
                         ids=["exact", "gs+bound", "ridge+shrinkage", "intra1", "intra2-kron"])
def test_backward_reads_the_host_a_constant_number_of_times(monkeypatch, options):
    torch.manual_seed(0)
    model = Deep()
    acc = ProjectedAccumulator(model, **options)
    acc.zero_grad()
    per_microbatch = []
    for ids, w in _microbatches():
        seq_logp = _seq_logp(model, ids)
        with counting(monkeypatch) as seen:
            acc.backward(seq_logp, w)
        assert not seen["numpy"], seen["numpy"]
        per_microbatch.append(seen["host"])
    for reads in per_microbatch:
        assert len(reads) <= HOST_READS_PER_MICROBATCH, reads
    stats = acc.stats()   # the values are read here, after the backward pass
    ranks = [d["gram_rank"] for d in stats["params"].values() if d.get("gram_rank") is not None]
    assert all(isinstance(r, int) for r in ranks)
    if options["variant"] == "proma":
        assert ranks and max(ranks) == B   # generic sequences: full rank on the wide layers


def test_counting_sees_a_host_read_and_numpy(monkeypatch):
    # the instrument itself: a read and a NumPy call made inside the context are counted
    x = torch.ones(3)
    with counting(monkeypatch) as seen:
        float(x.sum())
        bool(x.any())
        np.linalg.norm(np.asarray(x))
    assert len(seen["host"]) >= 2 and len(seen["numpy"]) == 2
