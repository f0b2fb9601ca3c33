"""verification.studies.first_order: exact PROMA's first-order guarantee holds to O(lr^2) on a tiny float64 Qwen3."""
import numpy as np
import pytest
import torch

from verification.studies import first_order as F
from verification.tolerances import REFERENCE_ATOL

# Residual ratio between step lengths h and h/10: 0.01 when the residual is O(h^2) (exact PROMA), 0.1 when it is
# O(h) (plain accumulation). 0.02 and 0.05 separate the two with room for the O(h^3) terms.
pytestmark = pytest.mark.slow  # builds a model and runs ~20 float64 forward / jvp passes

QUADRATIC_RATIO_MAX = 0.02
LINEAR_RATIO_MIN = 0.05


@pytest.fixture(scope="module")
def result():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from proma.rl.losses import completion_logprobs

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True)
    model = Qwen3ForCausalLM(cfg)
    gen = torch.Generator().manual_seed(1)
    batches, weights = [], []
    for m in range(3):
        score = torch.ones(4, 7, dtype=torch.float64)
        score[:, :3] = 0  # 3 prompt tokens, 4 scored completion tokens
        batches.append({"input_ids": torch.randint(0, 40, (4, 7), generator=gen),
                        "attention_mask": torch.ones(4, 7, dtype=torch.long), "score_mask": score})
        weights.append(np.random.default_rng(m).normal(size=4))
    settings = {k: F.SETTINGS[k] for k in ("plain", "exact")}
    return F.first_order_check(model, completion_logprobs, batches, weights, settings=settings,
                               step_lengths=(1e-5, 1e-6, 1e-7))


def _ratios(res):
    r = [s["residual"] for s in res["steps"]]
    return [b / a for a, b in zip(r, r[1:])]


def test_exact_proma_residual_is_quadratic_in_the_step(result):
    assert all(q < QUADRATIC_RATIO_MAX for q in _ratios(result["exact"]))
    assert result["exact"]["slope"] == pytest.approx(2.0, abs=0.1)
    assert result["exact"]["violation_sgd"] < REFERENCE_ATOL


def test_plain_residual_is_linear_in_the_step(result):
    assert all(q > LINEAR_RATIO_MIN for q in _ratios(result["plain"]))
    assert result["plain"]["slope"] == pytest.approx(1.0, abs=0.1)
    assert result["plain"]["adam_survival"] == 0.0


def test_adam_first_step_matches_its_first_order_terms(result):
    """The torch Adam step equals -lr P G_M to first order (P from the formula of the module docstring)."""
    for res in result.values():
        chk = res["adam_step_check"]
        assert chk["first_order_error"] < 1e-3 * chk["delta_norm"]


def test_markdown_names_every_setting(result):
    text = F.markdown(result, where="tiny")
    assert "| exact | 2.0" in text or "| exact | 1.9" in text
    assert text.count("| plain |") == 4  # one slope row, three KL rows


def test_kl_bound_summary():
    recs = [{"local_kl_seq": a, "local_kl_2nd_order": b} for a, b in [(1.0, 2.0), (3.0, 2.0), (1.0, 1.0)]]
    out = F.kl_bound_summary(recs)
    assert out == {"steps": 3, "exceeded_frac": pytest.approx(1 / 3), "ratio_median": 1.0, "ratio_max": 1.5}
    with pytest.raises(ValueError, match="records"):
        F.kl_bound_summary([{"local_kl": 1.0}])


def test_needs_a_chain():
    with pytest.raises(ValueError, match="microbatches"):
        F.first_order_check(torch.nn.Linear(2, 2), None, [{}], [np.ones(1)])


def test_reading_follows_the_slopes_and_the_adam_violations(result):
    """The report's sentences on this check: each setting's verdict comes from its slope and violations."""
    lines = F.reading(result)
    assert lines[0].startswith(f"- plain: residual slope {result['plain']['slope']:.2f}")
    assert lines[0].endswith("does not hold (the residual is O(lr)).")
    assert lines[1].endswith("guarantee holds (the residual is O(lr²)).")
    kept = result["exact"]["adam_survival"]
    assert lines[2].startswith("- With Adam's first step, exact's violation is")
    assert (f"removes {kept:.0%}" in lines[2]) == (kept > 0)
    assert "exact local KL / second-order estimate" in lines[3]
