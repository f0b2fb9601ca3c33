"""verl 0.9.1's real FSDP engine and actor worker on CPU (gloo), one or several processes: what
``test_verl09_fsdp_engine.py`` runs.

Each rank builds verl's ``FSDPEngineWithLMHead`` (or :class:`PromaFSDPEngineWithLMHead`) the way verl's
``TrainingWorker`` does, through ``EngineRegistry.new(...)`` and ``engine.initialize()``: the model is loaded by
verl from a Hugging Face checkpoint written to a temporary folder, wrapped by verl's own FSDP2 code
(``apply_fsdp2``: every decoder layer and the root), and given verl's optimizer (AdamW) and LR scheduler. One
``engine.train_batch(data, ppo_loss)`` (``optimizer_zero_grad``, ``forward_backward_batch``, ``optimizer_step``;
learning rate 0, no clipping) runs; at verl's optimizer step every rank gathers the gradients from their FSDP2
shards (``full_tensor()``). One more run goes through verl's ``ActorRolloutRefWorker`` (role ``"actor"``):
``init_model()`` and ``update_actor(data)``. Rank 0 writes the gradients, with the oracle's expected gradients for
the same micro-batches, to ``<outdir>/result.pt``.

Launched by ``torchrun`` (``python -m torch.distributed.run --nproc_per_node=W verl09_engine_run.py OUTDIR
[tied|untied]``). What CPU needs, all of it here and none in the library (docs/verl.md):

- a verl platform whose device is the CPU (:func:`setup_cpu`): verl 0.9.1 ships CUDA, ROCm and NPU platforms
  only, and its default (CUDA) answers ``get_device_id()`` and ``get_torch_device()`` with ``torch.cuda``
  (``AssertionError: Torch not compiled with CUDA enabled``). The platform registry (``PlatformRegistry``,
  ``VERL_PLATFORM``) is verl's extension point; here the platform is set in-process with ``set_platform``. Its
  device module is ``torch.cpu`` plus the memory statistics, ``empty_cache`` and device name that verl's workers
  read (:func:`verification.oracle.verl_env.use_cpu_platform`);
- verl's engines are registered for ``device=["cuda", "npu"]``: :func:`proma.integrations.verl_engine.register_engine`
  registers the PROMA engine for ``"cpu"`` too, and the plain engine is registered here for ``"cpu"`` the same way;
- float64 (for the 1e-9 comparisons with the reference): verl's ``PrecisionType.to_dtype`` knows fp16, fp32 and
  bf16 only (``RuntimeError: unexpected precision: fp64``, ``verl/utils/torch_dtypes.py:69``); :func:`allow_float64`
  adds ``"fp64"`` to it (a test-only patch; verl's float32 path needs none). In float64 every RMSNorm is made to
  compute in float64 (``full_precision_rmsnorm``, as the judge does): Hugging Face's computes in float32;
- the worker module's import of ``uvicorn`` / ``fastapi`` (:func:`stub_rollout_server_modules`).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import os
import sys
import tempfile

import numpy as np
import torch
import torch.distributed as dist

PLAIN, NONE, EXACT, PUBLISHED, WORKER_EXACT = "plain", "none", "exact", "published", "worker_exact"
# the published settings with their options from each rank's environment (PROMA_VERL_OPTIONS) instead of
# ``proma_options`` (not the defaults, so that an ignored variable shows on one rank too)
ENV_PUBLISHED = "env_published"
# intra (rank 1, two-sided) projects each rank's micro-batch on its own (no global sync exists for it), so the
# reference on the union micro-batch judges it on one process only
INTRA = "intra"
# learning rate 0 and a clipping bound no gradient reaches: verl's optimizer_step runs but changes nothing
NO_CLIP = 1e30
DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
# (dtype, loss_agg_mode, runs): float32 is verl's own dtype (no patch); the float64 plain run records the sequence
# weights its backward gives (for the reference); the other loss_agg_modes normalise by the global batch size and
# dp size (and, for -norm, the response length) rather than the token count
PLAN = (("fp32", "token-mean", (PLAIN, NONE)),
        ("fp64", "token-mean", (PLAIN, NONE, EXACT, PUBLISHED, WORKER_EXACT, ENV_PUBLISHED, INTRA)),
        ("fp64", "seq-mean-token-mean", (PLAIN, NONE, EXACT)),
        ("fp64", "seq-mean-token-sum", (PLAIN, NONE, EXACT)),
        ("fp64", "seq-mean-token-sum-norm", (PLAIN, NONE, EXACT)))


def setup_cpu() -> None:
    """verl's device layer on the CPU, the plain and PROMA FSDP engines registered for ``"cpu"`` (module docstring)."""
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    from proma.integrations.verl_engine import register_engine
    from verification.oracle.verl_env import use_cpu_platform

    use_cpu_platform()
    registry = EngineRegistry._engines["language_model"]["fsdp2"]
    if "cpu" not in registry:
        EngineRegistry.register(model_type="language_model", backend=["fsdp", "fsdp2"],
                                device="cpu")(FSDPEngineWithLMHead)
    if ("cpu", "proma") not in registry:
        register_engine(devices=("cpu",))


def allow_float64() -> None:
    """Let verl's ``PrecisionType.to_dtype`` map ``"fp64"`` to ``torch.float64`` (test-only; module docstring)."""
    from verl.utils import torch_dtypes

    original = torch_dtypes.PrecisionType.to_dtype
    if getattr(original, "allows_fp64", False):
        return

    def to_dtype(precision):
        return torch.float64 if precision in ("fp64", "float64", torch.float64) else original(precision)

    to_dtype.allows_fp64 = True
    torch_dtypes.PrecisionType.to_dtype = staticmethod(to_dtype)


def write_checkpoint(path: str, *, tied: bool, bias: bool) -> None:
    """The judge's tiny Qwen3 (float64) as a Hugging Face checkpoint in ``path`` (config.json, safetensors)."""
    from verification.oracle import verl as judge

    model = judge.tiny_qwen3(tied=tied, bias=bias)
    model.config.architectures = ["Qwen3ForCausalLM"]
    model.save_pretrained(path)


def _configs(path: str, dtype: str):
    """verl's model, engine, optimizer and checkpoint configs for the checkpoint in ``path`` (FSDP2, no packing,
    SDPA attention, ``dtype`` everywhere, learning rate 0, no clipping)."""
    from verl.trainer.config import CheckpointConfig
    from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig

    model_config = HFModelConfig(path=path, load_tokenizer=False, use_remove_padding=False,
                                 enable_gradient_checkpointing=False,
                                 override_config={"attn_implementation": "sdpa"})
    engine_config = FSDPEngineConfig(strategy="fsdp2", model_dtype=dtype, use_torch_compile=False,
                                     mixed_precision={"param_dtype": dtype, "reduce_dtype": dtype,
                                                      "buffer_dtype": dtype})
    optimizer_config = FSDPOptimizerConfig(lr=0.0, clip_grad=NO_CLIP, total_training_steps=1)
    return model_config, engine_config, optimizer_config, CheckpointConfig()


@contextlib.contextmanager
def _environment(name: str, value: str | None):
    """``name=value`` in this process's environment (unset for None) for the block, then as it was."""
    old = os.environ.pop(name, None)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)
        if old is not None:
            os.environ[name] = old


def _finish(engine, dtype: str, options, sink: dict):
    """The engine's PROMA options, float64 RMSNorms, and its optimizer step recording the gradients."""
    from verification.oracle import verl as judge

    if options is not None:
        engine.proma_options = options
    if dtype == "fp64":
        judge.full_precision_rmsnorm(engine.module)
    step = engine.optimizer.step

    def recording_step(*args, **kwargs):
        sink.update(full_grads(engine))
        return step(*args, **kwargs)

    engine.optimizer.step = recording_step
    return engine


def build_engine(path: str, *, dtype: str, vendor: str | None, options, sink: dict):
    """An FSDP2 engine built by verl from the checkpoint in ``path``: ``EngineRegistry.new`` + ``initialize``.

    ``vendor``: None for verl's plain engine, ``"proma"`` for :class:`PromaFSDPEngineWithLMHead` (verl selects it
    with ``VERL_ENGINE_VENDOR``, as its ``TrainingWorker`` does); ``options``: its ``proma_options``. The
    gradients at verl's optimizer step land in ``sink``.
    """
    from verl.workers.engine.base import EngineRegistry

    model_config, engine_config, optimizer_config, checkpoint_config = _configs(path, dtype)
    with _environment("VERL_ENGINE_VENDOR", vendor):
        engine = EngineRegistry.new(model_type="language_model", backend="fsdp2", model_config=model_config,
                                    engine_config=engine_config, optimizer_config=optimizer_config,
                                    checkpoint_config=checkpoint_config)
    engine.initialize()
    return _finish(engine, dtype, options, sink)


def stub_rollout_server_modules() -> list[str]:
    """Empty ``uvicorn`` and ``fastapi`` modules where they are not installed (returns their names).

    ``verl.workers.engine_workers`` imports verl's checkpoint engine, which imports the rollout server's
    utilities (``verl/workers/rollout/utils.py:20: import uvicorn``; ``fastapi`` next): ``ModuleNotFoundError:
    No module named 'uvicorn'``. Training never calls them; the ``verl09`` extra does not install them (a user of
    verl's workers installs them, as verl's own dependency list does). Test-only.
    """
    import importlib.util
    import types

    stubbed = []
    for name in ("uvicorn", "fastapi"):
        if importlib.util.find_spec(name) is None:
            module = types.ModuleType(name)
            module.__getattr__ = lambda attr, _n=name: type(attr, (), {})   # any name: an empty class
            sys.modules[name] = module
            stubbed.append(name)
    return stubbed


def build_worker(path: str, *, dtype: str, vendor: str | None, options, sink: dict, micro_batch: int,
                 mini_batch: int):
    """verl's ``ActorRolloutRefWorker`` in the role ``"actor"``, configured from verl's own generated trainer
    config (``verl/trainer/config/_generated_ppo_trainer.yaml``) with the overrides below, and its
    ``init_model()`` (which builds the ``TrainingWorker`` that owns the engine, its ``ppo_loss`` and verl's
    checkpoint engine); without Ray, as one worker process of verl's worker group runs it."""
    stub_rollout_server_modules()
    import verl.trainer.config as trainer_configs
    from omegaconf import OmegaConf
    from verl.workers.engine_workers import ActorRolloutRefWorker

    from verification.oracle import verl as judge

    trainer = OmegaConf.load(os.path.join(os.path.dirname(trainer_configs.__file__), "_generated_ppo_trainer.yaml"))
    config = trainer.actor_rollout_ref
    config.model.update(path=path, load_tokenizer=False, use_remove_padding=False,
                        enable_gradient_checkpointing=False, override_config={"attn_implementation": "sdpa"})
    config.actor.update(strategy="fsdp2", use_torch_compile=False, ppo_mini_batch_size=mini_batch,
                        ppo_micro_batch_size_per_gpu=micro_batch)
    config.actor.fsdp_config.update(strategy="fsdp2", use_torch_compile=False, model_dtype=dtype,
                                    mixed_precision={"param_dtype": dtype, "reduce_dtype": dtype,
                                                     "buffer_dtype": dtype})
    config.actor.optim.update(lr=0.0, clip_grad=NO_CLIP, total_training_steps=1)
    config.rollout.update(n=judge.GROUP_SIZE, log_prob_micro_batch_size_per_gpu=micro_batch)
    with _environment("VERL_ENGINE_VENDOR", vendor):
        worker = ActorRolloutRefWorker(config, role="actor")
        worker.init_model()
    _finish(worker.actor.engine, dtype, options, sink)
    return worker


def engine_data(batch, *, global_batch_size: int, micro_batch: int):
    """verl 0.9's training input (nested, no padding) from a verl ``DataProto`` of left/right-padded sequences."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    from verification.oracle import verl as judge

    td = batch.batch.clone()
    td["prompts"] = td["input_ids"][:, :judge.PROMPT_LEN]
    td = left_right_2_no_padding(td)
    tu.assign_non_tensor(td, temperature=1.0, use_remove_padding=False, use_dynamic_bsz=False,
                         micro_batch_size_per_gpu=micro_batch, use_fused_kernels=False, calculate_entropy=False,
                         global_batch_size=global_batch_size)
    return td


def recording(loss_fn, weights: list):
    """verl's loss, recording the per-sequence weights its own backward gives (a hook on its log-probabilities)."""
    from verl.workers.utils.padding import no_padding_2_padding

    from proma.integrations.verl_common import sequence_weights

    def wrapped(model_output, data, dp_group=None):
        lp = model_output["log_probs"]
        mask = data.select("response_mask").to_padded_tensor()["response_mask"]

        def keep(grad):
            flat = grad.values() if grad.is_nested else grad
            weights.append(sequence_weights(no_padding_2_padding(flat, data), mask).double().numpy())

        lp.register_hook(keep)
        return loss_fn(model_output=model_output, data=data, dp_group=dp_group)

    return wrapped


def full_grads(engine) -> dict:
    """{name: full gradient (float64 NumPy)} of every parameter, tied ones under each name (a collective)."""
    out = {}
    for name, p in engine.module.named_parameters(remove_duplicate=False):
        g = p.grad
        assert g is not None, f"{name}: no gradient after verl's train_batch"
        g = g.full_tensor() if hasattr(g, "full_tensor") else g
        out[name] = g.detach().double().numpy().copy()
    return out


def run(outdir: str, *, tied: bool, bias: bool) -> dict | None:
    """Every run of :data:`PLAN` on this rank's share of the judge's GRPO batch; rank 0 returns the results and
    saves them.

    Results: ``{"world": W, "n_params": int, "grads": {(dtype, loss_agg_mode): {run: {name: array}}},
    "expected": {(loss_agg_mode, EXACT, PUBLISHED or INTRA): {name: array}}}``, gradients as full float64 arrays under
    every parameter name; the expected ones from the reference on the union micro-batches with the weights the
    float64 plain run's backward gave each sequence (/ W).
    """
    from verl.utils import tensordict_utils as tu
    from verl.workers.config import FSDPActorConfig
    from verl.workers.utils.losses import ppo_loss

    from proma.integrations.verl_engine import OPTIONS_ENV
    from proma.options import PUBLISHED as PUBLISHED_OPTIONS
    from proma.options import PUBLISHED_SETTINGS
    from proma.options import AccumulatorOptions
    from verification.oracle import verl as judge
    from verification.oracle.settings import Settings

    setup_cpu()
    allow_float64()
    rank, world = dist.get_rank(), dist.get_world_size()
    options = {PLAIN: None, NONE: AccumulatorOptions(variant="none"),
               EXACT: AccumulatorOptions(variant="proma", solver="exact", sync="global"),
               PUBLISHED: dataclasses.replace(PUBLISHED_OPTIONS, sync="global"),
               INTRA: AccumulatorOptions(variant="intra", intra_rank=1, intra_form="two_sided")}
    options[WORKER_EXACT], options[ENV_PUBLISHED] = options[EXACT], None   # ENV_PUBLISHED: PROMA_VERL_OPTIONS
    env_options = json.dumps(dict(PUBLISHED_SETTINGS, sync="global"))
    settings = {EXACT: Settings(variant="proma", solver="exact"),
                PUBLISHED: Settings(variant="proma", solver="gram_schmidt", passes=2, relative_bound=0.5),
                INTRA: Settings(variant="intra", intra_rank=1, intra_form="two_sided")}
    plan = [(dtype, mode, tuple(n for n in names if world == 1 or n != INTRA)) for dtype, mode, names in PLAN]

    batch = judge.grpo_batch()
    policy = judge.tiny_qwen3(tied=tied, bias=bias)
    share, micro = len(batch) // world, judge.MICRO_BATCH // world
    results = {"world": world, "grads": {}, "expected": {}}
    weights: dict = {}   # loss_agg_mode -> [per micro-batch (b_local,) weights] from the float64 plain run
    with tempfile.TemporaryDirectory() as tmp:
        parts = [os.path.join(tmp, "tiny_qwen3")]
        dist.broadcast_object_list(parts, src=0)   # every rank reads rank 0's folder (one machine)
        path = parts[0]
        if rank == 0:
            write_checkpoint(path, tied=tied, bias=bias)
        dist.barrier()
        for dtype, mode, names in plan:
            # on-policy old_log_probs in the engine's dtype (verl 0.9's loss always reads them: ratio 1 exactly)
            batch.batch["old_log_probs"] = judge.response_logp(copy.deepcopy(policy).to(DTYPES[dtype]), batch).double()
            local = batch[rank * share:(rank + 1) * share]   # rank r's share, as verl's dispatch splits the batch
            config = FSDPActorConfig(strategy="fsdp2", rollout_n=judge.GROUP_SIZE, ppo_mini_batch_size=len(batch),
                                     ppo_micro_batch_size_per_gpu=micro, use_torch_compile=False, loss_agg_mode=mode)
            grads = results["grads"].setdefault((dtype, mode), {})
            for name in names:
                vendor, sink = (None if name == PLAIN else "proma"), {}
                loss_fn = functools.partial(ppo_loss, config=config)
                if dtype == "fp64" and name == PLAIN:
                    loss_fn = recording(loss_fn, weights.setdefault(mode, []))
                data = engine_data(local, global_batch_size=len(batch), micro_batch=micro)
                if name == WORKER_EXACT:   # verl's own ppo_loss (token-mean), built by the worker from its config
                    assert mode == "token-mean"
                    worker = build_worker(path, dtype=dtype, vendor=vendor, options=options[name], sink=sink,
                                          micro_batch=micro, mini_batch=len(batch))
                    tu.assign_non_tensor(data, mini_batch_size=len(batch), epochs=1)
                    worker.update_actor(data)
                    del worker
                else:
                    engine = build_engine(path, dtype=dtype, vendor=vendor, options=options[name], sink=sink)
                    with _environment(OPTIONS_ENV, env_options if name == ENV_PUBLISHED else None):
                        engine.train_batch(data, loss_fn)
                    del engine
                grads[name] = sink
    results["n_params"] = sum(1 for _ in policy.parameters())

    # the reference cases on the union micro-batches (every rank's m-th micro-batch), weights / W
    keys = ("input_ids", "attention_mask", "position_ids", "responses", "response_mask")
    mine = [{k: local.batch[k][s:s + micro] for k in keys} for s in range(0, len(local), micro)]
    gathered = [None] * world
    dist.all_gather_object(gathered, (mine, weights))
    if rank != 0:
        return None
    n_micro = len(mine)
    union = [{k: torch.cat([g[0][m][k] for g in gathered]) for k in keys} for m in range(n_micro)]
    for dtype, mode, names in plan:
        for name in set(names) & set(settings):
            assert all(len(g[1][mode]) == n_micro for g in gathered), "one weight vector per micro-batch"
            union_w = [np.concatenate([g[1][mode][m] for g in gathered]) / world for m in range(n_micro)]
            case = judge.build_case(policy, union, union_w, settings[name], f"verl09_engine_w{world}", mode)
            last = case.n_microbatches - 1
            results["expected"][mode, name] = {layer.name: case.expected(last, k)
                                               for k, layer in enumerate(case.layers)}
    torch.save(results, os.path.join(outdir, "result.pt"))
    return results


def main(argv: list[str]) -> int:
    """torchrun entry: ``verl09_engine_run.py OUTDIR [tied|untied]``; a crash is written to OUTDIR."""
    import traceback

    from verification.testkit import pin_threads

    outdir = argv[1]
    tied = (argv[2] if len(argv) > 2 else "tied") == "tied"
    pin_threads()
    dist.init_process_group("gloo")
    try:
        run(outdir, tied=tied, bias=True)
    except Exception:  # noqa: BLE001  (the test reads it)
        with open(os.path.join(outdir, f"crash{dist.get_rank()}.txt"), "w") as f:
            f.write(traceback.format_exc())
        return 1
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
