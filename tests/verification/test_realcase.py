"""Cases captured from a real Qwen3-architecture policy on a real GSM8K microbatch."""
import numpy as np
import pytest
import torch

from verification.oracle.model_case import linear_factors, per_sequence_grads, trainable_parameters
from verification.oracle.check import check_callable
from verification.oracle.format import load_cases, save_cases
from verification.oracle.impls import run_reference, run_torch
from verification.testkit import tiny_qwen3
from verification.tolerances import FLOAT64_RTOL


def _seq_logp(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    logp = torch.log_softmax(logits, -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return (logp * batch["score_mask"][:, 1:]).sum(1)


def test_capture_matches_autograd_on_a_tiny_qwen3_with_padding():
    """Linear factors of one backward reproduce per-sequence autograd; padding carries no gradient."""
    import reference

    model = tiny_qwen3(torch.float64, shape="capture").eval()
    ids = torch.randint(0, 40, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0  # right padding
    score = mask.double().clone()
    score[:, :3] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "score_mask": score}
    _, factors = linear_factors(model, _seq_logp, batch, mask)
    named = trainable_parameters(model)
    grads = per_sequence_grads(model, _seq_logp, batch, [p for _, p in named])
    head = model.lm_head.weight
    assert head is model.model.embed_tokens.weight
    for (name, p), g in zip(named, grads):
        calls = factors.get(id(p), [])
        if name.endswith("proj.weight"):
            assert len(calls) == 1
            X, D, seq = calls[0]
            assert X.shape[0] == int(mask.sum())
            np.testing.assert_allclose(reference.linear_seq_grads(X, D, seq, 3), g, rtol=FLOAT64_RTOL, atol=1e-13,
                                       err_msg=name)
    assert len(factors[id(head)]) == 1  # the head is a linear use of the tied embedding


@pytest.mark.slow
def test_real_cases_pass_reference_and_torch(tmp_path, realcase_cache):
    from verification.studies.realcase import real_cases

    cases = real_cases(cache_dir=realcase_cache, log=lambda *a, **k: None)
    assert {c.id for c in cases} == {"qwen3_gsm8k_exact", "qwen3_gsm8k_paper", "qwen3_gsm8k_intra"}
    case = cases[0]
    assert case.n_microbatches >= 2 and "real" in case.tags
    assert sum(bool(np.any(case.weights(m))) for m in range(case.n_microbatches)) >= 2
    embed = [layer for layer in case.layers if layer.name.endswith("embed_tokens.weight")]
    assert embed and embed[0].uses == ("linear", "dense")  # tied head + embedding
    save_cases(tmp_path / "cases", cases)
    for fn in (run_reference, run_torch, lambda c: run_torch(c, dtype="float32")):
        result = check_callable(tmp_path / "cases", fn)
        assert result.ok, result.table()
    # the projection matters on this microbatch: exact PROMA differs from plain accumulation
    exact, last = load_cases(tmp_path / "cases", only=["qwen3_gsm8k_exact"])[0][0], case.n_microbatches - 1
    G = np.concatenate([exact.expected(last, k).ravel() for k in range(len(exact.layers))])
    plain_sum = sum(np.concatenate([exact.expected(m, k, "pg").ravel() for k in range(len(exact.layers))])
                    for m in range(exact.n_microbatches))
    assert np.linalg.norm(G - plain_sum) > 1e-3 * np.linalg.norm(plain_sum)
