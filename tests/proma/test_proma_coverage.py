"""Coverage check: a covered parameter used outside its captured module calls raises instead of losing that use."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from proma import ProjectedAccumulator, capture_factors
from proma.coverage import MAX_CALL_NODES, call_nodes
from proma_testkit import SeqMLP, make_batch, seq_logp, tiny_qwen3
from verification.testkit import qwen_seq_logp


def _fused_head_logp(model, ids):
    """A fused LM head as TRL's: the tied weight read by F.linear, lm_head never called."""
    h = model.model(input_ids=ids).last_hidden_state
    lp = torch.log_softmax(F.linear(h[:, :-1], model.lm_head.weight), -1)
    return lp.gather(-1, ids[:, 1:, None]).squeeze(-1).sum(1)


@pytest.mark.parametrize("variant", ["proma", "intra"])
def test_fused_tied_head_raises_naming_the_parameter(variant):
    model = tiny_qwen3(torch.float32)
    ids = torch.randint(0, 50, (3, 6), generator=torch.Generator().manual_seed(0))
    with ProjectedAccumulator(model, variant=variant) as acc:
        acc.zero_grad()
        with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight.*outside every captured module call"):
            acc.backward(_fused_head_logp(model, ids), torch.ones(3))
        assert all(p.grad is None for p in model.parameters())
        # the accumulator stays usable: the normal tied head passes the check and accumulates
        acc.backward(qwen_seq_logp(model, ids, torch.ones(3, 6)), torch.ones(3))
        assert model.model.embed_tokens.weight.grad is not None


def test_linear_weight_read_directly_raises():
    model = SeqMLP(tie=False).double()
    ids, targets, mask = make_batch(torch.Generator().manual_seed(1), 2, 4, 7)

    def forward():
        h = model.norm(model.emb(ids))
        h = h + F.linear(torch.tanh(model.fc(h)), model.fc2.weight, model.fc2.bias)   # fc2 bypassed
        return seq_logp(model.head(h), targets, mask)

    with pytest.raises(ValueError, match=r"fc2\.(weight|bias)"):
        capture_factors(model, forward)


def test_autocast_cached_weight_copy_used_outside_raises():
    """Under autocast a weight's low-precision copy is cached and shared: a second, uncaptured read of it
    starts at a node of the captured call (the copy), not at the weight itself."""
    model = SeqMLP(tie=False)
    ids, targets, mask = make_batch(torch.Generator().manual_seed(2), 2, 4, 7)

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = model.norm(model.emb(ids))
            u = model.fc(h)
            h = h + model.fc2(torch.tanh(u)) + F.linear(h, model.fc.weight)[..., :5]
            return seq_logp(model.head(h).float(), targets, mask)

    with pytest.raises(ValueError, match=r"fc\.weight.*outside every captured module call"):
        capture_factors(model, forward)


def test_normal_models_pass(dtype=torch.float64):
    model = tiny_qwen3(dtype)
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(3))
    calls = capture_factors(model, lambda: qwen_seq_logp(model, ids, torch.ones(2, 5)))
    assert {c.name for c in calls} >= {"lm_head", "model.embed_tokens", "model.norm"}
    mlp = SeqMLP(tie=True, reuse=True).double()
    ids, targets, mask = make_batch(torch.Generator().manual_seed(4), 3, 4, 7)
    assert len(capture_factors(mlp, lambda: seq_logp(mlp(ids), targets, mask))) == 7


def test_call_reading_a_hidden_tensor_cannot_be_delimited():
    big = torch.randn(4, requires_grad=True)
    hidden = big
    for _ in range(MAX_CALL_NODES + 1):
        hidden = hidden * 1.0
    lin = torch.nn.Linear(4, 3)
    out = lin(torch.zeros(2, 4)) + hidden[:3]
    with pytest.raises(ValueError, match="cannot be checked"):
        call_nodes("lin", out, (), {id(lin.weight): "lin.weight"})
