"""Helpers shared by the test suite and the device checks: the one tiny-Qwen3 factory, the thread setting,
a free TCP port, and per-sequence gradients by plain autograd (the independent side of every comparison).

Kept in the package (not under tests/) so that ``benchmarks/`` can use them without importing test code.
"""
from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import torch

from proma.testing import per_sequence_grads  # noqa: F401  (the tests' per-sequence gradients)

# Shapes of the tiny Qwen3 models the tests build (``Qwen3Config`` keyword arguments; tied embeddings always).
# ``method``: the accumulator's tests and the device checks; ``harness``: the RL harness tests (token ids of its
# synthetic rollouts); ``capture``: the capture test of the real-case pipeline (one layer, smallest case files).
TINY_SHAPES = {
    "method": dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8, max_position_embeddings=64),
    "harness": dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=8, max_position_embeddings=64, eos_token_id=1, pad_token_id=0,
                    bos_token_id=1),
    "capture": dict(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=8),
}
# Scale of the Gaussian noise added to every weight of a "generic" model: HF initialises norms to exactly 1 and
# the other weights small, which hides mistakes that only show when every block is non-trivial.
GENERIC_PERTURBATION = 0.1


def tiny_qwen3(dtype=torch.float64, seed: int = 0, *, shape: str = "method", vocab_size: int | None = None,
               tie: bool = True, attn: str = "eager", perturb: float = 0.0):
    """A tiny ``Qwen3ForCausalLM`` of ``TINY_SHAPES[shape]``, initialised under ``torch.manual_seed(seed)``.

    ``vocab_size`` overrides the shape's; ``perturb`` > 0 adds ``perturb * N(0, 1)`` to every weight after the
    cast to ``dtype`` (see ``GENERIC_PERTURBATION``).
    """
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if shape not in TINY_SHAPES:
        raise ValueError(f"shape={shape!r}: choose from {', '.join(TINY_SHAPES)}")
    kwargs = dict(TINY_SHAPES[shape], tie_word_embeddings=tie)
    if vocab_size is not None:
        kwargs["vocab_size"] = vocab_size
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(**kwargs))
    model.set_attn_implementation(attn)
    model = model.to(dtype)
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(perturb * torch.randn_like(p))
    return model


def pin_threads(n: int = 1) -> None:
    """The suite's one thread setting: its tensors are tiny, and intra-op threads cost more in synchronisation
    than they save on a loaded 2-core machine. Called by tests/conftest.py and by spawned worker processes."""
    torch.set_num_threads(n)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a gloo rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in float64 (the denominator floored at the smallest normal double's neighbourhood)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def trainable(model) -> list:
    """``[(name, parameter)]`` of the parameters that require a gradient."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def flat_grad(params) -> np.ndarray:
    """The ``p.grad`` of ``[(name, p)]`` flattened into one float64 vector (zeros where None)."""
    return np.concatenate([(np.zeros(p.numel()) if p.grad is None else p.grad.detach().double().reshape(-1).numpy())
                           for _, p in params])


def qwen_seq_logp(model, ids, mask):
    """Sum of log p(ids[t+1] | ids[:t+1]) over positions where both tokens are unpadded (right padding)."""
    logits = model(input_ids=ids, attention_mask=mask.long()).logits
    lp = torch.log_softmax(logits[:, :-1].to(torch.float64 if logits.dtype == torch.float64 else torch.float32), -1)
    tok = lp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    m = (mask[:, 1:] * mask[:, :-1]).to(tok.dtype)
    return (tok * m).sum(dim=1)


EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"


def load_example(filename: str):
    """The module of ``examples/<filename>``, imported from its path (examples/ is not a package)."""
    import importlib.util

    path = EXAMPLES_DIR / filename
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
