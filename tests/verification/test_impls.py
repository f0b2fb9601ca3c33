"""This project's implementations against the golden cases, and the honesty of the torch replay model."""
import numpy as np
import pytest
import torch

from verification.oracle.expected import layer_seq_grads
from verification.oracle.check import check_callable
from verification.oracle.format import load_cases
from verification.oracle.impls import build_replay_model, run_reference, run_torch
from verification.tolerances import FLOAT64_RTOL


def test_reference_round_trip(cases_dir):
    result = check_callable(cases_dir, run_reference)
    assert result.ok, result.table()


@pytest.mark.parametrize("strategy", ["auto", "materialize", "ghost"])
def test_torch_float64_passes_every_case(cases_dir, strategy):
    result = check_callable(cases_dir, lambda case: run_torch(case, strategy=strategy))
    assert result.ok, result.table()
    assert all(r.dtype == "float64" for r in result.results)


def test_torch_float32_passes_at_float32_tolerance(cases_dir):
    result = check_callable(cases_dir, lambda case: run_torch(case, dtype="float32"))
    assert result.ok, result.table()
    assert all(r.dtype == "float32" for r in result.results)


def test_replay_model_reproduces_the_case_gradients(cases_dir):
    """Per-sequence autograd through the replay model gives exactly the case's g_i for every layer."""
    cases, _ = load_cases(cases_dir, only=["exact_rank_deficient", "exact_tied_only"])
    for case in cases:
        model = build_replay_model(case, torch.float64)
        params = [model.layer_parameter(k) for k in range(len(case.layers))]
        for m in range(case.n_microbatches):
            seq_logp = model(case, m)
            for j in range(case.batch_size(m)):
                grads = torch.autograd.grad(seq_logp[j], params, retain_graph=True, allow_unused=True)
                for k, g in enumerate(grads):
                    want = layer_seq_grads(case, m, k)[j]
                    got = np.zeros(case.layers[k].shape) if g is None else g.numpy().reshape(want.shape)
                    np.testing.assert_allclose(got, want, rtol=FLOAT64_RTOL, atol=1e-12,
                                               err_msg=f"{case.id} mb{m} layer{k} seq{j}")


def test_replay_shares_one_parameter_per_layer(cases_dir):
    (case,), _ = load_cases(cases_dir, only=["exact_tied_only"])
    model = build_replay_model(case)
    assert len(list(model.parameters())) == len(case.layers)
    assert model.uses["layer0_use0"].weight is model.uses["layer0_use1"].weight  # head tied to embedding
