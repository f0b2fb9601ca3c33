"""Models, microbatches and the independent oracle shared by the proma tests.

The oracle never uses the accumulator's hooks: per-sequence gradients come from one autograd call per
sequence on the model itself (``torch.autograd.grad(seq_logp[i], params)``), flattened per parameter and
fed to ``reference.accumulate`` with one block per parameter tensor.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn



class SeqMLP(nn.Module):
    """Sequence model: embedding -> [norm] -> Linear -> tanh -> (tied) Linear scores per token.

    ``seq_logp`` = sum over unpadded positions of log-softmax(scores)[target].
    """

    def __init__(self, vocab=7, width=5, hidden=6, *, bias=True, norm="layer", tie=False, reuse=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        if norm == "layer":
            self.norm = nn.LayerNorm(width)
        elif norm == "rms":
            self.norm = nn.RMSNorm(width, eps=1e-5)
        else:
            self.norm = nn.Identity()
        self.fc = nn.Linear(width, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, width, bias=bias)
        self.head = nn.Linear(width, vocab, bias=False)
        if tie:
            self.head.weight = self.emb.weight
        self.reuse = reuse

    def forward(self, ids):
        h = self.norm(self.emb(ids))
        h = h + self.fc2(torch.tanh(self.fc(h)))
        if self.reuse:  # the same module called twice per forward
            h = h + self.fc2(torch.tanh(self.fc(h)))
        return self.head(h)


def seq_logp(logits, targets, mask):
    """Total log-probability of each sequence's unmasked targets, (b,)."""
    lp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (lp * mask).sum(dim=1)


def make_batch(gen, b, T, vocab, *, pad=True, dup=False):
    """ids, targets (b, T) and a mask with ragged lengths (>= 1 token each)."""
    ids = torch.randint(0, vocab, (b, T), generator=gen)
    targets = torch.randint(0, vocab, (b, T), generator=gen)
    lengths = torch.randint(1, T + 1, (b,), generator=gen) if pad else torch.full((b,), T)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.float64)
    if dup and b > 1:  # sequence 1 duplicates sequence 0: rank-deficient Gram
        ids[1], targets[1], mask[1] = ids[0], targets[0], mask[0]
    return ids, targets, mask


def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def per_sequence_grads(model, logp, params):
    """(b, P_total) float64 per-sequence gradients by one autograd call per sequence."""
    rows = []
    for i in range(logp.shape[0]):
        gs = torch.autograd.grad(logp[i], [p for _, p in params], retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).double()
                               for g, (_, p) in zip(gs, params)]))
    return torch.stack(rows).cpu().numpy()


def flat_grad(params):
    return np.concatenate([(np.zeros(p.numel()) if p.grad is None else p.grad.detach().double().reshape(-1).numpy())
                           for _, p in params])


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def tiny_qwen3(dtype=torch.float64, seed=0, vocab=50, tie=True):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                      tie_word_embeddings=tie, attn_implementation="eager")
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg).to(dtype)
    with torch.no_grad():  # HF inits norms to 1 and small weights: perturb so every block is generic
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def qwen_seq_logp(model, ids, mask):
    """Sum of log p(ids[t+1] | ids[:t+1]) over positions where both tokens are unpadded (right padding)."""
    logits = model(input_ids=ids, attention_mask=mask.long()).logits
    lp = torch.log_softmax(logits[:, :-1].to(torch.float64 if logits.dtype == torch.float64 else torch.float32), -1)
    tok = lp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    m = (mask[:, 1:] * mask[:, :-1]).to(tok.dtype)
    return (tok * m).sum(dim=1)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add synchronisation cost on a loaded 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
