"""Exactness of the diagnostics (directional derivatives, local KL) and of rollout bookkeeping."""
import copy

import numpy as np
import pytest
import torch

import reference
from proma.rl.config import TrainConfig
from proma.rl.step_diagnostics import step_diagnostics
from proma.rl.generation import generate, pack
from proma.rl.losses import sum_scored_logprobs, token_logprobs
from proma.rl.metrics import categorical_entropy, categorical_kl, directional_derivatives
from proma.rl.tokenizer import get_tokenizer
from verification.tolerances import FLOAT32_RTOL, FLOAT64_ATOL, FLOAT64_RTOL

from rl_testing import accumulate_gradient, synthetic_rollout, tiny_qwen3


def test_categorical_kl_and_entropy_match_reference():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)
    la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    np.testing.assert_allclose(categorical_kl(la, lb).numpy(), reference.categorical_kl(a.numpy(), b.numpy()),
                               rtol=FLOAT64_RTOL, atol=FLOAT64_ATOL)
    np.testing.assert_allclose(categorical_entropy(la).numpy(), reference.categorical_entropy(a.numpy()),
                               rtol=FLOAT64_RTOL, atol=FLOAT64_ATOL)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_directional_derivative_equals_per_sequence_gradient_dot_direction(attn):
    model = tiny_qwen3()
    model.set_attn_implementation(attn)
    ro = synthetic_rollout(model, n_prompts=2, group_size=3, seed=1)
    batch = {k: v for k, v in ro.batch.items() if k != "old_logp"}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(2)
    direction = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}
    got = directional_derivatives(model, batch, params, direction)
    assert model.config._attn_implementation == attn  # restored
    want = []
    for i in range(batch["input_ids"].shape[0]):
        model.zero_grad(set_to_none=True)
        logp, _ = token_logprobs(model, batch)
        sum_scored_logprobs(logp, batch["score_mask"])[i].backward()
        want.append(sum(float((p.grad * direction[n]).sum()) for n, p in model.named_parameters()))
    want = torch.tensor(want, dtype=torch.float64)
    # float32 tolerance although the model is float64: HF Qwen3's RMSNorm computes in float32 internally, so
    # forward-mode and reverse-mode derivatives round differently at ~1e-7 (a wrong tangent is off by O(1)).
    torch.testing.assert_close(got, want, rtol=FLOAT32_RTOL, atol=FLOAT32_RTOL * float(want.abs().max()))


def test_step_diagnostics_exact_local_kl():
    model = tiny_qwen3()
    ro = synthetic_rollout(model, n_prompts=2, group_size=4, seed=4)
    cfg = TrainConfig.from_preset("smoke", prompts_per_step=2, group_size=4, minibatches=2, microbatch_size=2)
    rows = [0, 3, 5, 6]
    before_model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    opt.zero_grad()
    pre = accumulate_gradient(cfg, model, ro, rows)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    rec = step_diagnostics(cfg, model, ro, rows, pre, before)
    # independent: logits of both models on the minibatch, reference KL on the scored positions
    ids, am, sm = (ro.batch[k][rows] for k in ("input_ids", "attention_mask", "score_mask"))
    with torch.no_grad():
        lp = before_model(input_ids=ids, attention_mask=am).logits[:, :-1]
        lq = model(input_ids=ids, attention_mask=am).logits[:, :-1]
    sel = sm[:, 1:] > 0
    kl = reference.categorical_kl(lp[sel].numpy(), lq[sel].numpy())
    assert rec["local_kl"] > 0
    np.testing.assert_allclose(rec["local_kl"], kl.mean(), rtol=FLOAT64_RTOL)
    seq = np.zeros(len(rows))
    np.add.at(seq, sel.nonzero()[:, 0].numpy(), kl)
    np.testing.assert_allclose(rec["local_kl_seq"], seq.mean(), rtol=FLOAT64_RTOL)
    # minibatch 0 after one step from the rollout policy: kl to rollout == local kl
    np.testing.assert_allclose(rec["kl"], rec["local_kl"], rtol=1e-6)
    assert rec["local_kl_2nd_order"] > 0


@pytest.fixture(scope="module")
def smoke_tokenizer(tmp_path_factory):
    return get_tokenizer(300, tmp_path_factory.mktemp("tok"))


def test_left_padded_generation_matches_packed_forward(smoke_tokenizer):
    """Log-probs of sampled tokens seen by generate() (left padding, KV cache) equal those of the right-padded
    packed batch used for training: positions and masks line up."""
    tok = smoke_tokenizer
    model = tiny_qwen3(vocab_size=len(tok), attn="sdpa")  # HF eager + float64 + left padding gives NaN
    prompts = ["48/2=", "1+1=", "120*30/4="]
    enc = tok(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    torch.manual_seed(0)
    out = model.generate(**enc, do_sample=True, top_k=0, top_p=1.0, max_new_tokens=6, output_logits=True,
                         return_dict_in_generate=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    gen = out.sequences[:, enc["input_ids"].shape[1]:]
    gen_logp = torch.stack([torch.log_softmax(l.double(), -1) for l in out.logits], 1)
    gen_logp = gen_logp.gather(-1, gen.unsqueeze(-1)).squeeze(-1)
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    batch = pack(prompt_ids, gen.tolist(), tok.pad_token_id, "cpu")
    logp, _ = token_logprobs(model, batch)
    for i, p in enumerate(prompt_ids):
        torch.testing.assert_close(logp[i, len(p): len(p) + gen.shape[1]], gen_logp[i], rtol=1e-9, atol=1e-9)


def test_generate_greedy_batch_equals_single(smoke_tokenizer):
    tok = smoke_tokenizer
    model = tiny_qwen3(vocab_size=len(tok), seed=3, attn="sdpa")
    prompts = ["48/2=", "1+1=", "120*30/4="]
    batch = generate(model, tok, prompts, group_size=2, max_new_tokens=5, greedy=True)
    assert batch.prompt_ids[0] == batch.prompt_ids[1] == tok("48/2=", add_special_tokens=False)["input_ids"]
    for i, p in enumerate(prompts):
        single = generate(model, tok, [p], group_size=1, max_new_tokens=5, greedy=True)
        assert batch.completion_ids[2 * i] == batch.completion_ids[2 * i + 1] == single.completion_ids[0]


def test_tokenizer_is_deterministic_and_cached(tmp_path, smoke_tokenizer):
    from proma.rl.data import tokenizer_corpus
    from proma.rl.tokenizer import fingerprint, train_bpe

    texts = tokenizer_corpus()[:2000]
    assert train_bpe(texts, 300).to_str() == train_bpe(texts, 300).to_str()
    assert fingerprint(train_bpe(texts, 300)) != fingerprint(train_bpe(texts, 301))
    again = get_tokenizer(300, tmp_path)  # fresh cache: trained again on the full corpus, same result
    assert fingerprint(again) == fingerprint(smoke_tokenizer)
    assert list(tmp_path.glob("tokenizer-*.json"))
    ids = again("Natalia sold 48/2 = 24 clips", add_special_tokens=False)["input_ids"]
    assert again.decode(ids) == "Natalia sold 48/2 = 24 clips"
    assert [again.decode([i]) for i in again("1234", add_special_tokens=False)["input_ids"]] == list("1234")
