"""The oracle's judge for verl actors: run an actor's ``update_policy`` on a small Qwen3, compare with the reference.

``judge_actor(actor_cls, settings)`` (and ``proma-verify verl --actor package.module:Class``) takes any class
with verl 0.7's ``DataParallelPPOActor`` interface (``cls(config, actor_module, actor_optimizer)``,
``update_policy(data)``, ``_forward_micro_batch``), builds small float64 Qwen3 policies (tied and untied head;
attention biases, RMSNorm weights, embeddings), one verl batch with GRPO-like groups (several responses per
prompt, group-normalised advantages), and runs one ``update_policy`` with the optimizer step intercepted:

- the running gradient of every trainable parameter is read at the start of each later micro-batch's forward
  and at the optimizer step (chain verdicts: microbatch m's running gradient, as the actor holds it after its
  backward of m); an actor that writes its gradients only at the end is judged on the final gradient, with
  the earlier microbatches reported as missing;
- the case (FORMAT.md) is written from the same micro-batches by the oracle's own capture (:mod:`.capture`, a
  float64 copy of the policy, no hooks of the candidate's), with the sequence weights verl's loss gives each
  sequence (``d loss / d log p`` of verl's own policy loss at ratio 1, times verl's ``1 / gradient_accumulation``)
  and the expected running gradients from the reference (:func:`.expected.compute_expected`);
- every parameter is judged on its own (``FAIL`` lines name the microbatch and the parameter).

The declared ``settings`` are what the actor claims to implement; they are also handed to it through the actor
config as ``proma_*`` keys when its config class has them (``PromaActorConfig`` has; verl's plain config does
not, and plain verl then runs as it is).

This module imports torch, transformers and (lazily) verl; never ``proma`` (the judge shares no code with
what it judges).
"""
from __future__ import annotations

import copy
import dataclasses
import types

import numpy as np
import torch
from torch import nn

from .model_case import capture_case_arrays
from .expected import compute_expected
from .check import compare_case
from .format import Case, default_tolerances
from .settings import Settings
from .verdicts import CheckResult
from .verl_env import ensure_process_group, load_class, use_cpu_platform, use_torch_unpad

# the small policy (Qwen3 architecture): big enough for GQA, q/k norms, MLP, biases; small enough for
# b backward passes per micro-batch in float64
VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE = 48, 16, 2, 2, 1, 8, 32
# the batch: groups of responses sharing a prompt (GRPO), split into micro-batches by verl
GROUPS, GROUP_SIZE, PROMPT_LEN, RESPONSE_LEN, MICRO_BATCH = 4, 4, 5, 6, 4
PAD_ID = 0
# the optimizer step is intercepted and clipping must not change the gradient: a bound no gradient reaches
NO_CLIP = 1e30
# advantage normalisation of GRPO (group std + epsilon), as verl's compute_grpo_outcome_advantage
GRPO_EPS = 1e-6
# how far per-token loss coefficients may deviate from w_i * mask (float64: rounding only)
WEIGHT_RTOL = 1e-10
SETTING_KEYS = ("variant", "solver", "passes", "ridge", "relative_bound", "shrinkage", "intra_rank", "intra_form")


def tiny_qwen3(*, tied: bool, bias: bool, seed: int = 0, dtype=torch.float64) -> nn.Module:
    """A random Qwen3ForCausalLM (SDPA attention) with the sizes above."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, intermediate_size=INTERMEDIATE,
                      max_position_embeddings=64, tie_word_embeddings=tied, attention_bias=bias,
                      pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg).to(dtype)
    with torch.no_grad():   # HF initialises biases and norm weights to constants: perturb them so each matters
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    full_precision_rmsnorm(model)
    return model


def full_precision_rmsnorm(model: nn.Module) -> None:
    """Make every RMSNorm of ``model`` compute in its input dtype (same formula, x / sqrt(mean(x^2) + eps) * w).

    Hugging Face's RMSNorm casts to float32 and back: in a float64 model that puts a float32 rounding floor
    (about 1e-7 relative) under every gradient, above the oracle's float64 tolerance.
    """
    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(forward, module)


def grpo_batch(*, seed: int = 0, groups: int = GROUPS, group_size: int = GROUP_SIZE, prompt_len: int = PROMPT_LEN,
               response_len: int = RESPONSE_LEN, dtype=torch.float64, padding: bool = True):
    """A verl ``DataProto`` of ``groups * group_size`` sequences, prompts left-padded and responses right-padded.

    Keys as verl's ``update_policy`` reads them: ``input_ids``, ``attention_mask``, ``position_ids`` (b, T),
    ``responses``, ``response_mask``, ``advantages``, ``old_log_probs`` (b, K); advantages are the GRPO ones
    ((r - mean_group) / (std_group + eps)) broadcast over each response's tokens. ``padding=False``: every prompt
    and response at full length (no padding token anywhere).
    """
    from verl import DataProto

    g = torch.Generator().manual_seed(seed)
    b = groups * group_size
    prompts = torch.full((b, prompt_len), PAD_ID)
    prompt_mask = torch.zeros(b, prompt_len, dtype=torch.long)
    for q in range(groups):
        n = int(torch.randint(2, prompt_len + 1, (1,), generator=g)) if padding else prompt_len
        ids = torch.randint(3, VOCAB, (n,), generator=g)
        rows = slice(q * group_size, (q + 1) * group_size)
        prompts[rows, prompt_len - n:] = ids
        prompt_mask[rows, prompt_len - n:] = 1
    lengths = torch.randint(2, response_len + 1, (b,), generator=g) if padding else torch.full((b,), response_len)
    response_mask = (torch.arange(response_len)[None, :] < lengths[:, None]).long()
    responses = torch.randint(3, VOCAB, (b, response_len), generator=g) * response_mask
    rewards = torch.rand(b, generator=g, dtype=torch.float64).round()
    rewards[::group_size] = 1.0 - rewards[1::group_size]   # no group with equal rewards only
    grouped = rewards.view(groups, group_size)
    adv = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + GRPO_EPS)).view(b)
    attention_mask = torch.cat([prompt_mask, response_mask], 1)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    tensors = {
        "input_ids": torch.cat([prompts, responses], 1), "attention_mask": attention_mask,
        "position_ids": position_ids, "responses": responses, "response_mask": response_mask,
        "advantages": (adv[:, None] * response_mask).to(dtype), "old_log_probs": torch.zeros(b, response_len,
                                                                                            dtype=dtype),
        "ref_log_prob": -torch.rand(b, response_len, generator=g, dtype=torch.float64).to(dtype) * response_mask,
    }
    return DataProto.from_dict(tensors=tensors, meta_info={"temperature": 1.0, "pad_token_id": PAD_ID})


def actor_config(config_cls=None, *, settings: Settings | None = None, micro_batch: int = MICRO_BATCH,
                 batch_size: int = GROUPS * GROUP_SIZE, **overrides):
    """A verl actor config for one on-policy step: one mini-batch of ``batch_size``, micro-batches of
    ``micro_batch``, float32 autocast (a float64 policy stays float64), no torch.compile, no clipping.

    ``settings`` become ``proma_*`` keys when ``config_cls`` (default verl's ``FSDPActorConfig``) has them.
    """
    from verl.workers.config import FSDPActorConfig, FSDPEngineConfig

    config_cls = config_cls or FSDPActorConfig
    names = {f.name for f in dataclasses.fields(config_cls)}
    kw = dict(strategy="fsdp2", rollout_n=GROUP_SIZE, ppo_mini_batch_size=batch_size,
              ppo_micro_batch_size_per_gpu=micro_batch, use_torch_compile=False, grad_clip=NO_CLIP,
              fsdp_config=FSDPEngineConfig(dtype="float32"))   # CPU autocast ignores float32: the policy keeps its dtype
    if settings is not None:
        for key in SETTING_KEYS:
            if f"proma_{key}" in names:
                kw[f"proma_{key}"] = getattr(settings, key)
    kw.update(overrides)
    return config_cls(**{k: v for k, v in kw.items() if k in names or not k.startswith("proma_")})


class _InterceptedStep(torch.optim.SGD):
    """An optimizer whose ``step`` records the gradients instead of changing the parameters."""

    def __init__(self, params, on_step):
        super().__init__(params, lr=0.0)
        self._on_step = on_step

    @torch.no_grad()
    def step(self, closure=None):
        self._on_step()


def run_actor(actor_cls, model: nn.Module, config, batch) -> tuple[list, list]:
    """One ``update_policy`` of ``actor_cls`` on ``batch``: the micro-batches and the running gradients.

    Returns
    -------
    micro_batches : list of dicts (tensors of each micro-batch as verl split them, detached)
    running : list over micro-batches of {parameter name: float64 array or None}; entry m is the gradient the
        actor held after micro-batch m (read at the next micro-batch's forward, the last at the optimizer step).
    """
    # every name of every trainable parameter (a tied weight under each of its names: the case may use either)
    named = [(n, p) for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad]
    running, micro_batches, steps = [], [], []

    def snapshot():
        return {n: None if p.grad is None else _full(p.grad).detach().double().cpu().numpy().copy()
                for n, p in named}

    optimizer = _InterceptedStep([p for p in model.parameters() if p.requires_grad], on_step=lambda: steps.append(snapshot()))
    actor = actor_cls(config, model, optimizer)
    forward = actor._forward_micro_batch

    def watched(micro_batch, temperature, calculate_entropy=False):
        if torch.is_grad_enabled():
            if micro_batches:
                running.append(snapshot())
            micro_batches.append({k: v.detach().clone() for k, v in micro_batch.items() if torch.is_tensor(v)})
        return forward(micro_batch, temperature, calculate_entropy)

    actor._forward_micro_batch = watched
    try:
        actor.update_policy(batch)
    finally:
        del actor._forward_micro_batch
        close = getattr(getattr(actor, "accumulator", None), "close", None)
        if callable(close):
            close()
    if len(steps) != 1:
        raise RuntimeError(f"the actor made {len(steps)} optimizer steps on one mini-batch; the judge needs one")
    running.append(steps[0])
    return micro_batches, running


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def verl_weights(config, micro_batches: list) -> list:
    """Per micro-batch the weights (b,) float64 verl's loss gives each sequence at ratio 1.

    ``d loss / d log p`` of verl's own policy loss (``get_policy_loss_fn(loss_mode)`` with ``loss_agg_mode``)
    times verl's loss scale ``1 / gradient_accumulation``, on log-probabilities equal to the old ones; raises
    unless every token's coefficient is ``w_i * response_mask``.
    """
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    loss_fn = get_policy_loss_fn(config.policy_loss.get("loss_mode", "vanilla"))
    scale = 1.0 / (config.ppo_mini_batch_size // config.ppo_micro_batch_size_per_gpu)
    out = []
    for mb in micro_batches:
        mask = mb["response_mask"]
        lp = torch.zeros(mask.shape, dtype=torch.float64, requires_grad=True)
        loss, _ = loss_fn(old_log_prob=lp.detach(), log_prob=lp, advantages=mb["advantages"].double(),
                          response_mask=mask, loss_agg_mode=config.loss_agg_mode, config=config,
                          rollout_is_weights=None)
        (coef,) = torch.autograd.grad(loss * scale, lp)
        m = mask.double()
        w = (coef * m).sum(-1) / m.sum(-1).clamp(min=1.0)
        worst = float((coef - w[:, None] * m).abs().max())
        if worst > WEIGHT_RTOL * max(float(coef.abs().max()), 1e-300):
            raise ValueError(f"verl's loss (loss_mode, {config.loss_agg_mode}) is not a per-sequence weighted sum "
                             f"of log-probabilities at ratio 1 (deviation {worst:.3g})")
        out.append(w.numpy())
    return out


def response_logp(model, batch) -> torch.Tensor:
    """(b, K) log-probability of each response token under ``model`` (padded path; no gradient), for on-policy
    ``old_log_probs`` (verl 0.9's loss reads them from the batch: the ratio is 1 only when they are current)."""
    tensors = batch.batch if hasattr(batch, "batch") else batch
    k = tensors["responses"].shape[1]
    with torch.no_grad():
        out = model(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"],
                    position_ids=tensors["position_ids"], use_cache=False)
        lp = torch.log_softmax(out.logits[:, -k - 1:-1], -1).gather(-1, tensors["responses"][:, :, None]).squeeze(-1)
    return lp * tensors["response_mask"]


def seq_logp(model, batch):
    """``(model, batch) -> (b,)``: each response's total log-probability over its response mask (padded path)."""
    k = batch["responses"].shape[1]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], use_cache=False)
    logits = out.logits[:, -k - 1:-1].double() / batch["temperature"]
    lp = torch.log_softmax(logits, -1).gather(-1, batch["responses"][:, :, None]).squeeze(-1)
    return (lp * batch["loss_mask"]).sum(-1)


def build_case(model: nn.Module, micro_batches: list, weights: list, settings: Settings, case_id: str,
               description: str, temperature: float = 1.0) -> Case:
    """The oracle case of ``micro_batches`` on a float64 copy of ``model`` (expected arrays included)."""
    twin = copy.deepcopy(model).double()
    batches = []
    for mb in micro_batches:
        batches.append(dict(mb, loss_mask=mb["response_mask"].double(), temperature=temperature,
                            attention_mask=mb["attention_mask"]))
    layers, arrays = capture_case_arrays(twin, seq_logp, batches, weights)
    sizes = [len(w) for w in weights]
    case = Case(id=case_id, description=description, settings=settings, layers=list(layers),
                boundaries=[0] + np.cumsum(sizes).tolist(), arrays=arrays, tags=["real", "verl"])
    return compute_expected(case)


@dataclasses.dataclass(frozen=True)
class Policy:
    """One of the judge's policies: a name and how to build it."""

    name: str
    tied: bool
    bias: bool


POLICIES = (Policy("tied_bias", tied=True, bias=True), Policy("untied", tied=False, bias=False))


def judge_actor(actor_cls, settings: Settings, *, config_cls=None, policies=POLICIES, loss_agg_modes=("token-mean",),
                seed: int = 0, gradient_checkpointing: bool = False, padding: bool = True,
                **config_overrides) -> CheckResult:
    """Run ``actor_cls`` on every policy and ``loss_agg_mode``; the oracle's verdict per case and parameter.

    ``settings``: the PROMA settings the actor declares (a :class:`Settings`; variant "none" for plain
    accumulation). Returns the :class:`CheckResult` (``.table()``, ``.exit_code``, ``.raise_if_failed()``).
    """
    results = []
    manifest = {"tolerances": default_tolerances()}
    for policy in policies:
        for mode in loss_agg_modes:
            model = tiny_qwen3(tied=policy.tied, bias=policy.bias, seed=seed)
            if gradient_checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            config = actor_config(config_cls, settings=settings, loss_agg_mode=mode, **config_overrides)
            batch = grpo_batch(seed=seed, padding=padding)
            micro_batches, running = run_actor(actor_cls, model, config, batch)
            weights = verl_weights(config, micro_batches)
            fresh = tiny_qwen3(tied=policy.tied, bias=policy.bias, seed=seed)   # the parameters before the step
            case = build_case(fresh, micro_batches, weights, settings, f"verl_{policy.name}_{mode}",
                              f"{actor_cls.__module__}.{actor_cls.__qualname__} on a {policy.name} Qwen3, "
                              f"{len(micro_batches)} micro-batches, loss_agg_mode={mode}")
            results.append(compare_case(case, candidate_outputs(case, running), manifest, dtype=np.float64,
                                        allow_missing=True))
    return CheckResult(results, mode="chain", allow_missing=True)


def candidate_outputs(case: Case, running: list) -> list:
    """``outputs[m][k]`` for :func:`.check.compare_case` from the actor's running gradients.

    A parameter without a gradient after an earlier micro-batch is missing there (SKIP: e.g. an actor that keeps
    its running gradients off ``p.grad`` until the optimizer step); without one at the optimizer step it is
    judged as zero (FAIL where the reference has a gradient).
    """
    last = len(running) - 1
    return [[snap.get(layer.name) if snap.get(layer.name) is not None or m < last else np.zeros(layer.shape)
             for layer in case.layers] for m, snap in enumerate(running)]


__all__ = ["judge_actor", "run_actor", "build_case", "verl_weights", "grpo_batch", "tiny_qwen3", "actor_config",
           "candidate_outputs", "use_torch_unpad", "use_cpu_platform", "response_logp", "ensure_process_group", "load_class"]
