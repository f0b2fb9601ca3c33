"""``TrainConfig``: one frozen dataclass holds every option of a run; presets and CLI overrides build it.

``TrainConfig()`` is the default ``small`` configuration; ``TrainConfig.from_preset("smoke", steps=3)`` starts
from a preset and overrides fields. Invalid combinations raise ``ValueError`` naming the option.

RL prompts are drawn from ``train_pool`` examples of the task's train split (a fixed, seed-independent
subset; 0 = the whole split), so that a short run revisits each prompt a few times (what the pool size does
to a short run is measured in reports/PILOT.md, sections 2 and 4: a 64-prompt pool against the default 1024).
The warm-start always uses the whole train split; evaluation uses the test split.

Every field carries a one-line comment: ``proma train --help`` shows it as the option's help, and
:data:`CHOICES` lists the values of every enumerated option.

Units: a *step* is one rollout (``prompts_per_step`` prompts x ``group_size`` samples); it is split into
``minibatches`` optimizer steps, each split into microbatches of ``microbatch_size`` sequences. ``metrics.jsonl``
has one record per optimizer step.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import json
import math
import numbers
import tokenize
from dataclasses import dataclass, fields

from proma.options import INTRA_FORMS, PUBLISHED_NAME, PUBLISHED_SETTINGS, STRATEGIES, SYNCS

from .data import TASKS
from .losses import ADVANTAGES, AGGREGATIONS

# "proma-code": the published code (a verl fork) as a method (proma.rl.published_code).
PUBLISHED_CODE_NAME = "proma-code"
METHODS = ("reinforce", "grpo", "proma", PUBLISHED_NAME, "intra", PUBLISHED_CODE_NAME)
DTYPE_NAMES = ("float32", "float64", "bfloat16")
# Completion length when max_new_tokens = 0: one calculator step, or a whole GSM8K solution.
DEFAULT_NEW_TOKENS = {"gsm8k-calc": 10, "gsm8k-chain": 64, "gsm8k": 256}
MIN_VOCAB_SIZE = 2 + 256  # the special tokens and the byte alphabet of the BPE tokenizer

# How each method accumulates microbatch gradients: ProjectedAccumulator keyword arguments (None = plain
# backward of a token-level loss). The method PUBLISHED_NAME ("proma-paper", the key of the committed run data)
# runs PUBLISHED_SETTINGS, the published run's settings (proma.options).
METHOD_ACCUMULATOR = {
    "reinforce": {"variant": "none"},
    "grpo": None,
    "proma": {"variant": "proma", "solver": "exact"},
    PUBLISHED_NAME: dict(PUBLISHED_SETTINGS),
    "intra": {"variant": "intra"},
    # the Linear weights' projection of the published code (the other parameters: published_code)
    PUBLISHED_CODE_NAME: dict(PUBLISHED_SETTINGS),
}


def _is_int(x, minimum: int) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= minimum


def _is_real(x) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _integer(minimum: int, msg: str | None = None) -> tuple:
    """Rule of an integer option: ``(check, message)``."""
    return (lambda v: _is_int(v, minimum)), msg or f"must be an integer >= {minimum}"


def _real(ok=lambda v: True, msg: str = "must be a finite number") -> tuple:
    """Rule of a real option: finite, and ``ok``."""
    return (lambda v: _is_real(v) and ok(v)), msg


_POSITIVE = "must be a finite number > 0"
_NON_NEGATIVE = "must be a finite number >= 0"
_UNIT = "must be in [0, 1)"
# One rule per field, in field order (TrainConfig.validate checks them in this order after CHOICES, then the
# combinations of several fields); a new field adds its line here.
FIELD_RULES = {
    # run
    "steps": _integer(1), "num_threads": _integer(0),
    # policy
    "vocab_size": _integer(MIN_VOCAB_SIZE, f"must be >= {MIN_VOCAB_SIZE} (2 special tokens + 256 bytes)"),
    "hidden_size": _integer(1), "intermediate_size": _integer(1), "num_layers": _integer(1),
    "num_heads": _integer(1), "num_kv_heads": _integer(1), "max_positions": _integer(2),
    # supervised warm-start
    "warmstart_steps": _integer(0), "warmstart_batch": _integer(1), "warmstart_lr": _real(lambda v: v > 0, _POSITIVE),
    # rollout
    "train_pool": _integer(0), "prompts_per_step": _integer(1),
    "group_size": _integer(2, "must be >= 2 (group-relative advantages)"), "max_new_tokens": _integer(0),
    "temperature": _real(lambda v: v > 0, _POSITIVE), "format_reward": _real(),
    # optimisation
    "lr": _real(lambda v: v > 0, _POSITIVE),
    "adam_beta1": _real(lambda v: 0 <= v < 1, _UNIT), "adam_beta2": _real(lambda v: 0 <= v < 1, _UNIT),
    "weight_decay": _real(lambda v: v >= 0, _NON_NEGATIVE),
    "grad_clip": _real(lambda v: v >= 0, _NON_NEGATIVE + " (0 = no clipping)"),
    "warmup_steps": _integer(0), "minibatches": _integer(1), "microbatch_size": _integer(1),
    # a negative eps flips the sign of the advantages (or divides by ~0): non-negative only
    "adv_eps": _real(lambda v: v >= 0, _NON_NEGATIVE),
    "clip_eps": _real(lambda v: 0 < v < 1, "must be in (0, 1)"),
    # projection methods
    "intra_rank": _integer(1),
    # evaluation, checkpoints
    "eval_every": _integer(1), "eval_size": _integer(1), "ckpt_every": _integer(1),
    "oos_kl_prompts": _integer(0, "must be an integer >= 0 (0 = off)"),
}


@dataclass(frozen=True)
class TrainConfig:
    # run
    preset: str = "small"            # base configuration the other options override
    task: str = "gsm8k-calc"         # gsm8k-calc: one calculator step per prompt; gsm8k-chain: a whole calculator
                                     # chain per prompt; gsm8k: whole solutions
    method: str = "reinforce"        # how microbatch gradients are combined: plain sum, GRPO surrogate or a PROMA variant
    steps: int = 200                 # rollout steps (each = `minibatches` optimizer steps)
    out: str = "runs/default"        # run directory (config, metrics.jsonl, eval.jsonl, ckpt.pt)
    seed: int = 0                    # seeds the policy, the warm-start and every rollout step
    device: str = "auto"             # auto | cpu | cuda | cuda:N
    dtype: str = "float32"           # parameter and activation dtype of the policy
    num_threads: int = 0             # torch.set_num_threads when > 0
    progress: bool = True            # tqdm bars
    # data
    data_dir: str | None = None      # default: data/gsm8k in the repo, or $PROMA_GSM8K_DIR
    cache_dir: str | None = None     # tokenizer + warm-start cache; default <out>/cache; share it across runs
    # policy
    model: str | None = None         # local HF checkpoint dir; unset = the small Qwen3 of the options below
    vocab_size: int = 512            # BPE vocabulary trained on the task's text (>= 258)
    hidden_size: int = 192           # model width (a multiple of num_heads)
    intermediate_size: int = 512     # MLP width
    num_layers: int = 4              # decoder blocks
    num_heads: int = 4               # attention heads
    num_kv_heads: int = 2            # key/value heads (grouped-query attention; divides num_heads)
    max_positions: int = 1024        # longest prompt + completion
    # supervised warm-start (skipped with --model or warmstart_steps=0)
    warmstart_steps: int = 3000      # teacher-forcing steps before RL, so the policy earns some reward
    warmstart_batch: int = 64        # sequences per warm-start step
    warmstart_lr: float = 3e-3       # peak warm-start learning rate (cosine decay)
    # rollout
    train_pool: int = 1024           # RL prompts come from this fixed subset of the train split (0 = all of it)
    prompts_per_step: int = 16       # prompts per rollout step
    group_size: int = 8              # completions per prompt (the group of group-relative advantages)
    max_new_tokens: int = 0          # 0 = task default (10 gsm8k-calc, 64 gsm8k-chain, 256 gsm8k)
    temperature: float = 1.0         # sampling temperature of the rollouts
    format_reward: float = 0.0       # gsm8k: reward for a parsable but wrong "#### N"
    # optimisation
    lr: float = 1e-4                 # Adam learning rate
    adam_beta1: float = 0.9          # Adam first-moment decay
    adam_beta2: float = 0.999        # Adam second-moment decay
    weight_decay: float = 0.0        # Adam (L2) weight decay
    grad_clip: float = 0.0           # 0 = no clipping (grad_norm is logged either way)
    warmup_steps: int = 0            # linear lr warm-up in optimizer steps; constant afterwards
    minibatches: int = 2             # optimizer steps per rollout (>= 2 so GRPO clipping acts)
    microbatch_size: int = 16        # sequences per backward pass (divides the minibatch)
    shuffle: bool = True             # shuffle sequences before splitting into minibatches
    aggregation: str = "token-mean"  # how token terms are weighted into the loss (losses.py)
    advantage: str = "grpo"          # grpo (mean/std) | drgrpo (mean only)
    adv_eps: float = 1e-6            # added to the group's reward std before dividing
    clip_eps: float = 0.2            # PPO ratio clip (grpo's loss; the others log the clipped fraction)
    # projection methods
    intra_rank: int = 1              # intra: rank of the projected subspace per layer
    intra_form: str = "two_sided"    # intra: two-sided factor projection or Kronecker form
    strategy: str = "auto"           # per-layer Gram computation: by the cost model, materialised or ghost
    sync: str = "global"             # several processes: PROMA against the union of the ranks' microbatches (global) or each rank's own
    # evaluation, checkpoints, diagnostics
    eval_every: int = 25             # rollout steps between greedy evaluations (also at start and end)
    eval_size: int = 512             # fixed test subset
    ckpt_every: int = 25             # rollout steps between checkpoints (also at the end)
    kl_metrics: bool = True          # exact local KL / KL to rollout policy / entropy
    second_order: bool = True        # 0.5 mean_i (g_i . dtheta)^2 (one forward-mode pass per microbatch)
    oos_kl_prompts: int = 0          # out-of-sample local KL on this many fresh held-out completions per optimizer step (0 = off)
    save_microbatch: bool = False    # save step 0's first microbatch to <out>/microbatch.pt

    # ----------------------------------------------------------------------------------------------------
    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid option (``name=value: why (option --name)``).

        The enumerated options (:data:`CHOICES`), then one rule per field in field order (:data:`FIELD_RULES`,
        where a new field adds its line), then the combinations of several fields.
        """
        def need(name, ok, msg):
            if not ok:
                value = getattr(self, name)
                raise ValueError(f"{name}={value!r}: {msg} (option --{name.replace('_', '-')})")

        for name, choices in CHOICES.items():
            need(name, getattr(self, name) in choices, f"unknown {name} (choose from {', '.join(choices)})")
        for name, (ok, msg) in FIELD_RULES.items():
            need(name, ok(getattr(self, name)), msg)
        # combinations
        need("train_pool", not 0 < self.train_pool < self.prompts_per_step,
             f"must be 0 (all) or >= prompts_per_step={self.prompts_per_step}")
        need("num_heads", self.hidden_size % self.num_heads == 0, f"must divide hidden_size={self.hidden_size}")
        need("num_kv_heads", self.num_heads % self.num_kv_heads == 0, f"must divide num_heads={self.num_heads}")
        n = self.rollout_size
        need("minibatches", n % self.minibatches == 0,
             f"does not divide the rollout batch prompts_per_step * group_size = {n}")
        need("microbatch_size", self.minibatch_size % self.microbatch_size == 0,
             f"does not divide the minibatch size {self.minibatch_size} (= prompts_per_step * group_size / minibatches)")

    @property
    def rollout_size(self) -> int:
        return self.prompts_per_step * self.group_size

    @property
    def minibatch_size(self) -> int:
        return self.rollout_size // self.minibatches

    @property
    def new_tokens(self) -> int:
        if self.max_new_tokens:
            return self.max_new_tokens
        return DEFAULT_NEW_TOKENS[self.task]

    @property
    def accumulator_kwargs(self) -> dict | None:
        """``ProjectedAccumulator`` keyword arguments of this method (None for grpo)."""
        kw = METHOD_ACCUMULATOR[self.method]
        if kw is None:
            return None
        kw = dict(kw, strategy=self.strategy)
        if self.method == "intra":
            kw.update(intra_rank=self.intra_rank, intra_form=self.intra_form)
        if kw["variant"] == "proma":
            kw["sync"] = self.sync
        return kw

    # ----------------------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str = "small", **overrides) -> "TrainConfig":
        if name not in PRESETS:
            raise ValueError(f"preset={name!r}: unknown preset (choose from {', '.join(PRESETS)})")
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown option(s): {', '.join(sorted(unknown))}")
        return cls(**{**PRESETS[name], "preset": name, **overrides})

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# Fields that may differ between a run and its resumption (they do not change what is computed).
RESUMABLE_CHANGES = frozenset({"steps", "progress", "num_threads", "cache_dir", "out", "device", "save_microbatch"})

PRESETS: dict[str, dict] = {
    # the default: a small Qwen3 that trains on CPU
    "small": {},
    # CI: a tiny model and a few tiny steps, seconds
    "smoke": dict(
        steps=2, vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
        num_kv_heads=1, warmstart_steps=4, warmstart_batch=8, prompts_per_step=4,
        group_size=4, minibatches=2, microbatch_size=4, max_new_tokens=5, eval_every=2, eval_size=8,
        ckpt_every=1, lr=1e-3, progress=False, train_pool=0,
    ),
}

# The values of every enumerated option (validated in TrainConfig, listed by ``proma train --help``).
CHOICES: dict[str, tuple] = {
    "preset": tuple(PRESETS), "method": METHODS, "task": TASKS, "aggregation": AGGREGATIONS, "advantage": ADVANTAGES,
    "dtype": DTYPE_NAMES, "intra_form": INTRA_FORMS, "strategy": STRATEGIES, "sync": SYNCS,
}


@functools.cache
def field_comments() -> dict[str, str]:
    """``{field: its one-line comment}`` read from ``TrainConfig``'s source (the help of ``proma train --help``)."""
    names = {f.name for f in fields(TrainConfig)}
    out, line_field = {}, {}
    for tok in tokenize.generate_tokens(io.StringIO(inspect.getsource(TrainConfig)).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and tok.string in names:
            line_field[tok.start[0]] = tok.string
        elif tok.type == tokenize.COMMENT and tok.start[0] in line_field:
            out[line_field[tok.start[0]]] = tok.string.lstrip("#").strip()
    missing = names - set(out)
    if missing:
        raise RuntimeError(f"TrainConfig fields without a comment: {', '.join(sorted(missing))}")
    return out
