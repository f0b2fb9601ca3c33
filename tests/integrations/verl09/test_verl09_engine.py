"""PROMA in verl 0.9.1's engine API (:mod:`proma.integrations.verl_engine`), one process, float64: verl's real
``FSDPEngine.forward_backward_batch`` -> ``FSDPEngineWithLMHead.forward_step`` -> ``ppo_loss`` on an engine object
whose model, optimizer and data-parallel attributes are set by hand, in this process (no FSDP): the cheap sweep
over every ``loss_agg_mode`` and the refusals. Variant "none" equals plain verl's gradient; exact PROMA equals the
reference (the oracle's case on the same micro-batches, with the weights plain verl's own backward gives each
sequence). The engine as verl builds it (``initialize``, FSDP2, one and two processes, the actor worker):
``test_verl09_fsdp_engine.py``. Skipped where verl 0.9 is not installed; .ci/run runs it in the verl 0.9.1
environment."""
from __future__ import annotations

import contextlib
import functools
import json

import pytest
import torch

pytest.importorskip("verl.workers.engine.fsdp.transformer_impl",
                    reason="needs verl==0.9.1 (pip install '.[verl09]', docs/verl.md)")

import verl.utils.torch_functional as verl_F  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.config import FSDPActorConfig, FSDPEngineConfig  # noqa: E402
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding  # noqa: E402

from proma.integrations.verl_common import sequence_weights  # noqa: E402
from proma.integrations.verl_engine import OPTIONS_ENV, PromaFSDPEngineWithLMHead, options_from_env  # noqa: E402
from proma.options import PUBLISHED, AccumulatorOptions  # noqa: E402
from verification.oracle import verl as judge  # noqa: E402
from verification.oracle.settings import Settings  # noqa: E402
from verification.testkit import rel_err  # noqa: E402
from verification.tolerances import FLOAT64_ATOL, FLOAT64_RTOL  # noqa: E402

MICRO = judge.MICRO_BATCH
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@pytest.fixture(scope="module", autouse=True)
def cpu_verl():
    import torch.distributed as dist

    judge.ensure_process_group(dist)
    judge.use_cpu_platform()
    yield


def _engine(cls, model, options=None):
    """An engine object with the attributes forward_backward_batch / forward_step read, set by hand."""
    eng = object.__new__(cls)
    eng.module, eng.ulysses_sequence_parallel_size, eng.use_ulysses_sp, eng.pad_to_length = model, 1, False, False
    eng._autocast_dtype, eng.scaler, eng.engine_config = torch.float32, None, FSDPEngineConfig()
    eng.compute_entropy_from_logits = verl_F.entropy_from_logits
    eng.optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    eng.get_data_parallel_group = lambda: None
    eng.get_data_parallel_size = lambda: 1
    eng._gradient_sync_context = lambda is_last_micro_batch: contextlib.nullcontext()
    if options is not None:
        eng.proma_options = options
    return eng


def _batch(model):
    """The judge's GRPO batch, on-policy (old_log_probs = the model's), as verl 0.9's trainer hands it over."""
    batch = judge.grpo_batch()
    batch.batch["old_log_probs"] = judge.response_logp(model, batch)
    return batch


def _engine_data(batch, *, remove_padding=False):
    td = batch.batch.clone()
    td["prompts"] = td["input_ids"][:, :judge.PROMPT_LEN]
    td = left_right_2_no_padding(td)
    tu.assign_non_tensor(td, temperature=1.0, use_remove_padding=remove_padding, use_dynamic_bsz=False,
                         micro_batch_size_per_gpu=MICRO, use_fused_kernels=False, calculate_entropy=False,
                         global_batch_size=len(batch), dp_size=1)
    return td


def _step(cls, options=None, *, mode="token-mean", record=None, remove_padding=False):
    """One verl train step (zero_grad, forward_backward_batch, the PROMA synchronize) -> {name: grad}."""
    model = judge.tiny_qwen3(tied=True, bias=True)
    batch = _batch(judge.tiny_qwen3(tied=True, bias=True))
    config = FSDPActorConfig(strategy="fsdp2", rollout_n=judge.GROUP_SIZE, ppo_mini_batch_size=len(batch),
                             ppo_micro_batch_size_per_gpu=MICRO, use_torch_compile=False, loss_agg_mode=mode)
    loss_fn = functools.partial(ppo_loss, config=config)
    if record is not None:
        loss_fn = _recording(loss_fn, record)
    eng = _engine(cls, model, options)
    eng.optimizer_zero_grad()
    eng.forward_backward_batch(_engine_data(batch, remove_padding=remove_padding), loss_fn)
    if cls is PromaFSDPEngineWithLMHead:
        eng.accumulator.synchronize()
    # every name of every parameter (a tied weight under both: the case may name either)
    return {n: p.grad.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}, batch


def _recording(loss_fn, weights: list):
    """Plain verl's loss, recording the per-sequence weights its own backward gives (a hook on its log-probs)."""

    def wrapped(model_output, data, dp_group=None):
        lp = model_output["log_probs"]
        mask = data.select("response_mask").to_padded_tensor()["response_mask"] if data["response_mask"].is_nested \
            else data["response_mask"]

        def keep(grad):
            flat = grad.values() if grad.is_nested else grad
            weights.append(sequence_weights(no_padding_2_padding(flat, data), mask).numpy())

        lp.register_hook(keep)
        return loss_fn(model_output=model_output, data=data, dp_group=dp_group)

    return wrapped


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_none_equals_plain_verl_engine(mode):
    plain, _ = _step(FSDPEngineWithLMHead, mode=mode)
    ours, _ = _step(PromaFSDPEngineWithLMHead, AccumulatorOptions(variant="none"), mode=mode)
    assert set(ours) == set(plain)
    for name in plain:
        assert rel_err(ours[name].numpy(), plain[name].numpy()) <= FLOAT64_ATOL, name


@pytest.mark.parametrize("options, settings", [
    (AccumulatorOptions(variant="proma", solver="exact"), Settings(variant="proma", solver="exact")),
    (PUBLISHED, Settings(variant="proma", solver="gram_schmidt", passes=2, relative_bound=0.5)),
    (AccumulatorOptions(variant="intra"), Settings(variant="intra")),
], ids=["exact", "published", "intra"])
def test_proma_equals_the_reference_on_verl_engine_microbatches(options, settings):
    weights = []
    plain, batch = _step(FSDPEngineWithLMHead, record=weights)
    ours, _ = _step(PromaFSDPEngineWithLMHead, options)
    tensors = batch.batch
    micro = [{k: tensors[k][s:s + MICRO] for k in ("input_ids", "attention_mask", "position_ids", "responses",
                                                   "response_mask")} for s in range(0, len(batch), MICRO)]
    assert len(weights) == len(micro)
    case = judge.build_case(judge.tiny_qwen3(tied=True, bias=True), micro, weights, settings, "verl09", "engine")
    last = case.n_microbatches - 1
    n_params = sum(1 for _ in judge.tiny_qwen3(tied=True, bias=True).parameters())
    assert len(case.layers) == n_params   # every parameter judged
    for k, layer in enumerate(case.layers):
        err = rel_err(ours[layer.name].numpy(), case.expected(last, k))
        assert err <= FLOAT64_RTOL, f"{layer.name}: relative error {err:.3g}"
    assert max(rel_err(ours[n].numpy(), plain[n].numpy()) for n in plain) > 1e-3   # PROMA changed the gradient


def test_the_packed_path_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="use_remove_padding=False"):
        _step(PromaFSDPEngineWithLMHead, AccumulatorOptions(variant="proma"), remove_padding=True)


def test_an_entropy_bonus_is_refused():
    model = judge.tiny_qwen3(tied=True, bias=True)
    batch = _batch(model)
    config = FSDPActorConfig(strategy="fsdp2", rollout_n=judge.GROUP_SIZE, ppo_mini_batch_size=len(batch),
                             ppo_micro_batch_size_per_gpu=MICRO, use_torch_compile=False, entropy_coeff=0.01)
    eng = _engine(PromaFSDPEngineWithLMHead, model, AccumulatorOptions(variant="proma"))
    eng.optimizer_zero_grad()
    td = _engine_data(batch)
    tu.assign_non_tensor(td, calculate_entropy=True)
    with pytest.raises(ValueError, match="entropy"):
        eng.forward_backward_batch(td, functools.partial(ppo_loss, config=config))


def test_options_from_the_worker_environment(monkeypatch):
    # verl 0.9 gives the engine no actor config: the options travel, as VERL_ENGINE_VENDOR does, in the environment
    env = {OPTIONS_ENV: json.dumps({"variant": "proma", "solver": "gram_schmidt", "passes": 2,
                                    "relative_bound": 0.5, "exclude": ["lm_head.weight"]})}
    assert options_from_env(env) == PUBLISHED.replace(exclude=frozenset({"lm_head.weight"}))
    assert options_from_env({}) is None
    for raw, match in [("{variant: proma}", "is not JSON"), ('["proma"]', "must be a JSON object"),
                       ('{"varaint": "proma"}', r"unknown keys \['varaint'\]"),
                       ('{"variant": "proma", "passes": 0}', rf"^{OPTIONS_ENV}\.passes=0 is invalid")]:
        with pytest.raises(ValueError, match=match):
            options_from_env({OPTIONS_ENV: raw})
    # the engine builds its accumulator from the variable: the same gradient as the attribute set in code
    monkeypatch.setenv(OPTIONS_ENV, json.dumps({"variant": "proma", "solver": "gram_schmidt", "passes": 2,
                                                "relative_bound": 0.5}))
    from_env, _ = _step(PromaFSDPEngineWithLMHead)
    monkeypatch.delenv(OPTIONS_ENV)
    from_code, _ = _step(PromaFSDPEngineWithLMHead, PUBLISHED)
    default, _ = _step(PromaFSDPEngineWithLMHead)
    assert all(torch.equal(from_env[n], from_code[n]) for n in from_code)
    assert max(rel_err(from_env[n].numpy(), default[n].numpy()) for n in default) > 1e-6   # not the defaults
    # set twice: refused
    monkeypatch.setenv(OPTIONS_ENV, json.dumps({"variant": "proma"}))
    eng = _engine(PromaFSDPEngineWithLMHead, judge.tiny_qwen3(tied=True, bias=True), PUBLISHED)
    with pytest.raises(ValueError, match="set twice"):
        eng.accumulator
