"""PromaDataParallelPPOActor (verl 0.7.1) in one process: plain verl's gradients for variant "none", the reference
for exact / published / intra PROMA (the oracle's judge, :mod:`verification.oracle.verl`), the judge's verdicts on
plain verl and on planted bugs, and the option checks. Skipped where verl is not installed (the base
environment); .ci/run runs it in the verl 0.7.1 environment."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytest.importorskip("verl.workers.actor.dp_actor", reason="needs verl==0.7.1 (pip install '.[verl07]', docs/verl.md)")

from verl.workers.actor.dp_actor import DataParallelPPOActor  # noqa: E402

from proma import ProjectedAccumulator  # noqa: E402
from proma.integrations.verl import PromaActorConfig, PromaDataParallelPPOActor  # noqa: E402
from verification.oracle import verl as judge  # noqa: E402
from verification.oracle.settings import Settings  # noqa: E402
from verification.oracle.verdicts import STATUS_FAIL, STATUS_PASS  # noqa: E402
from verification.testkit import free_port, rel_err  # noqa: E402
from verification.tolerances import FLOAT64_ATOL, FLOAT64_RTOL  # noqa: E402

# issue 31's bounds for variant "none" against plain verl: rounding of the same float32 / float64 sums
NONE_VS_PLAIN_F32 = 1e-6
NONE_VS_PLAIN_F64 = FLOAT64_ATOL
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
EXACT = Settings(variant="proma", solver="exact")
PUBLISHED = Settings(variant="proma", solver="gram_schmidt", passes=2, relative_bound=0.5)
INTRA = Settings(variant="intra")
NONE = Settings(variant="none")


@pytest.fixture(scope="module", autouse=True)
def process_group():
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
    judge.use_torch_unpad()   # verl's remove-padding path imports flash_attn otherwise (docs/verl.md)
    yield


def _final_grads(actor_cls, settings, *, dtype=torch.float64, tied=True, bias=True, config_cls=None, **overrides):
    model = judge.tiny_qwen3(tied=tied, bias=bias, dtype=dtype)
    config = judge.actor_config(config_cls, settings=settings, **overrides)
    _, running = judge.run_actor(actor_cls, model, config, judge.grpo_batch(dtype=dtype))
    return running[-1]


def _assert_same(got: dict, want: dict, bound: float) -> None:
    assert set(got) == set(want)
    for name in want:
        assert want[name] is not None and got[name] is not None, name
        err = rel_err(got[name], want[name])
        assert err <= bound, f"{name}: relative error {err:.3g} > {bound}"


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("rmpad", [False, True], ids=["padded", "rmpad"])
def test_none_equals_plain_verl_float64(mode, rmpad):
    kw = dict(loss_agg_mode=mode, use_remove_padding=rmpad)
    plain = _final_grads(DataParallelPPOActor, None, **kw)
    ours = _final_grads(PromaDataParallelPPOActor, NONE, config_cls=PromaActorConfig, **kw)
    _assert_same(ours, plain, NONE_VS_PLAIN_F64)


def test_none_equals_plain_verl_float32_with_a_linear_kl_loss():
    kw = dict(dtype=torch.float32, use_kl_loss=True, kl_loss_type="k1", kl_loss_coef=0.1, tied=False)
    plain = _final_grads(DataParallelPPOActor, None, **kw)
    ours = _final_grads(PromaDataParallelPPOActor, NONE, config_cls=PromaActorConfig, **kw)
    _assert_same(ours, plain, NONE_VS_PLAIN_F32)


def _judge(actor_cls, settings, **kw):
    config_cls = kw.pop("config_cls", PromaActorConfig)
    return judge.judge_actor(actor_cls, settings, config_cls=config_cls, **kw)


def _statuses(result) -> dict:
    """{(case, m, layer name): status} of every judged array."""
    return {(c.case_id, a.m, a.layer): a.status for c in result.results for a in c.arrays}


@pytest.mark.slow
@pytest.mark.parametrize("settings", [EXACT, PUBLISHED, INTRA],
                         ids=["exact", "published", "intra"])
def test_the_judge_passes_our_actor_on_every_parameter(settings):
    result = _judge(PromaDataParallelPPOActor, settings)
    assert result.exit_code == 0, result.table()
    for case in result.results:
        # every trainable parameter of the policy is a judged array at every micro-batch (none skipped)
        policy = next(p for p in judge.POLICIES if case.case_id.startswith(f"verl_{p.name}_"))
        model = judge.tiny_qwen3(tied=policy.tied, bias=policy.bias)
        n_params = sum(1 for p in model.parameters() if p.requires_grad)
        layers = {a.layer for a in case.arrays}
        assert len(layers) == n_params and layers <= {n for n, _ in model.named_parameters(remove_duplicate=False)}
        assert len(case.arrays) == n_params * judge.GROUPS * judge.GROUP_SIZE // judge.MICRO_BATCH
        assert all(a.status == STATUS_PASS for a in case.arrays)
        assert case.rtol == FLOAT64_RTOL


@pytest.mark.slow
@pytest.mark.parametrize("mode", LOSS_AGG_MODES[1:])
def test_exact_matches_the_reference_for_every_loss_agg_mode(mode):
    result = _judge(PromaDataParallelPPOActor, EXACT, policies=judge.POLICIES[:1], loss_agg_modes=(mode,))
    assert result.exit_code == 0, result.table()


@pytest.mark.slow
def test_exact_with_remove_padding_and_gradient_checkpointing():
    with pytest.warns(UserWarning, match="padded path"):
        result = _judge(PromaDataParallelPPOActor, EXACT, policies=judge.POLICIES[:1], use_remove_padding=True,
                        gradient_checkpointing=True)
    assert result.exit_code == 0, result.table()


@pytest.mark.slow
def test_plain_verl_passes_none_and_fails_exact_from_microbatch_1():
    assert _judge(DataParallelPPOActor, NONE, config_cls=None).exit_code == 0
    result = _judge(DataParallelPPOActor, EXACT, config_cls=None)
    status = _statuses(result)
    assert result.exit_code == 1
    assert all(s == STATUS_PASS for (_, m, _), s in status.items() if m == 0)   # nothing to project against yet
    for case in result.results:
        assert any(a.status == STATUS_FAIL for a in case.arrays if a.m == 1), case.case_id


class OnePassActor(PromaDataParallelPPOActor):
    """Planted bug: the accumulator runs one Gram-Schmidt sweep whatever ``proma_passes`` says."""

    def __init__(self, config, actor_module, actor_optimizer=None):
        super().__init__(config, actor_module, actor_optimizer)
        self._acc.close()
        self._acc = ProjectedAccumulator(actor_module, options=self.proma_options.replace(passes=1))


class AllOnesActor(PromaDataParallelPPOActor):
    """Planted bug, as measured in the published fork: PROMA on ``nn.Linear`` weights; every other parameter gets
    the gradient of the token-mean negative log-likelihood of the sampled responses (all-ones advantages)."""

    def __init__(self, config, actor_module, actor_optimizer=None):
        super().__init__(config, actor_module, actor_optimizer)
        linear = {id(m.weight) for m in actor_module.modules() if isinstance(m, torch.nn.Linear)}
        self._others = [p for p in actor_module.parameters() if id(p) not in linear]
        self._ones = None

    def _forward_micro_batch(self, micro_batch, temperature, calculate_entropy=False):
        outputs = super()._forward_micro_batch(micro_batch, temperature, calculate_entropy)
        if not torch.is_grad_enabled():
            return outputs
        if self._acc._microbatches == 0:
            self._ones = [torch.zeros_like(p) for p in self._others]
        mask = micro_batch["response_mask"]
        with self._acc.paused():   # a second forward, unseen by PROMA's hooks
            lp = DataParallelPPOActor._forward_micro_batch(self, micro_batch, temperature)["log_probs"]
        ones_loss = -(lp * mask).sum() / mask.sum() / self.gradient_accumulation

        def overwrite(coef):   # runs after PROMA's hook (registered first)
            with torch.enable_grad():
                grads = torch.autograd.grad(ones_loss, self._others, allow_unused=True)
            for p, acc, g in zip(self._others, self._ones, grads):
                if g is not None:
                    acc.add_(g)
                p.grad = acc.clone()

        outputs["log_probs"].register_hook(overwrite)
        return outputs


@pytest.mark.slow
def test_the_judge_fails_one_sweep_where_two_are_declared():
    result = _judge(OnePassActor, PUBLISHED, policies=judge.POLICIES[1:])
    assert result.exit_code == 1
    failed = {layer for (_, m, layer), s in _statuses(result).items() if s == STATUS_FAIL}
    assert any(name.endswith("q_proj.weight") for name in failed), failed
    assert all(s == STATUS_PASS for (_, m, _), s in _statuses(result).items() if m == 0)
    assert "FAIL" in result.table() and "q_proj.weight" in result.table()


@pytest.mark.slow
def test_the_judge_fails_the_all_ones_treatment_on_exactly_the_non_linear_parameters():
    result = _judge(AllOnesActor, PUBLISHED, policies=judge.POLICIES[:1])
    status = _statuses(result)
    model = judge.tiny_qwen3(tied=True, bias=True)
    linear = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    non_linear = {n for n, p in model.named_parameters() if id(p) not in linear}
    assert non_linear >= {"model.norm.weight", "model.layers.0.self_attn.q_norm.weight",
                          "model.layers.0.self_attn.q_proj.bias"}
    failed = {layer for (_, _, layer), s in status.items() if s == STATUS_FAIL}
    assert failed == non_linear, sorted(failed ^ non_linear)


# -- options ---------------------------------------------------------------------------------------------------
def test_a_bad_proma_option_names_the_field():
    with pytest.raises(ValueError, match=r"actor\.proma_solver='exactt' is invalid"):
        judge.actor_config(PromaActorConfig, proma_solver="exactt")
    with pytest.raises(ValueError, match=r"actor\.proma_passes=0"):
        judge.actor_config(PromaActorConfig, proma_passes=0)
    with pytest.raises(ValueError, match="do not go together"):
        judge.actor_config(PromaActorConfig, proma_variant="intra", proma_sync="global")


@pytest.mark.parametrize("overrides, match", [
    (dict(ppo_epochs=2), "ppo_epochs=2"),
    (dict(entropy_coeff=0.01), "entropy_coeff=0.01"),
    (dict(use_kl_loss=True, kl_loss_type="low_var_kl"), "kl_loss_type='low_var_kl'"),
])
def test_unsupported_verl_options_are_refused_at_construction(overrides, match):
    config = judge.actor_config(PromaActorConfig, **overrides)
    with pytest.raises(ValueError, match=match):
        PromaDataParallelPPOActor(config, judge.tiny_qwen3(tied=True, bias=False), torch.optim.SGD([torch.zeros(1)]))


def test_several_mini_batches_are_refused():
    config = judge.actor_config(PromaActorConfig, ppo_mini_batch_size=8)
    model = judge.tiny_qwen3(tied=True, bias=False)
    actor = PromaDataParallelPPOActor(config, model, torch.optim.SGD(model.parameters(), lr=0.0))
    with pytest.raises(ValueError, match="2 mini-batches of ppo_mini_batch_size=8"):
        actor.update_policy(judge.grpo_batch())


def test_a_loss_with_per_token_coefficients_is_refused_at_its_first_microbatch():
    # the ratio away from 1 (old log-probabilities from another policy): clipping makes coefficients per token
    config = judge.actor_config(PromaActorConfig, use_rollout_log_probs=True)
    model = judge.tiny_qwen3(tied=True, bias=False)
    batch = judge.grpo_batch()
    batch.batch["old_log_probs"] = -3.0 * torch.rand_like(batch.batch["old_log_probs"])
    actor = PromaDataParallelPPOActor(config, model, torch.optim.SGD(model.parameters(), lr=0.0))
    with pytest.raises(ValueError, match="not a per-sequence weighted sum"):
        actor.update_policy(batch)


def test_an_actor_without_optimizer_is_plain_verl():
    config = judge.actor_config(PromaActorConfig, proma_variant="proma")
    actor = PromaDataParallelPPOActor(config, judge.tiny_qwen3(tied=True, bias=False))
    assert actor.accumulator is None
    out = actor.compute_log_prob(_with_meta(judge.grpo_batch()))
    assert np.isfinite(out["log_probs"].numpy()).all()


def _with_meta(batch):
    batch.meta_info.update(micro_batch_size=judge.MICRO_BATCH, use_dynamic_bsz=False)
    return batch


# -- the command line ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_command_line_judges_an_actor(capsys):
    from verification.cli import main

    assert main(["verl", "--actor", "proma.integrations.verl:PromaDataParallelPPOActor", "--published"]) == 0
    assert "2/2 cases pass" in capsys.readouterr().out
    assert main(["verl", "--actor", "verl.workers.actor.dp_actor:DataParallelPPOActor", "--solver", "exact"]) == 1
    out = capsys.readouterr().out
    assert "first failing microbatch mb1" in out and "0/2 cases pass" in out
    assert main(["verl", "--actor", "proma.integrations.verl:NoSuchActor"]) == 2
    assert "has no attribute 'NoSuchActor'" in capsys.readouterr().err
