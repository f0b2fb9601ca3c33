"""verl on a CPU machine, for the oracle's verl judge: the shims and loaders around running a verl actor.

verl 0.7.1 / 0.9.1 assume flash-attn and CUDA in a few places; each function here names the error it avoids and
uses verl's own extension point (its pure-torch helpers, its platform registry). Imports verl lazily.
"""
from __future__ import annotations

import importlib


def use_torch_unpad() -> None:
    """Point verl's remove-padding helpers at its pure-torch versions (needs ``einops``).

    verl 0.7.1 / 0.9.1 import ``flash_attn.bert_padding`` for ``unpad_input`` / ``pad_input`` unless an Ascend NPU
    is present, so ``use_remove_padding=True`` fails on CPU with ``ModuleNotFoundError: No module named
    'flash_attn'``; ``verl.utils.npu_flash_attn_utils`` holds the same functions in plain torch.
    """
    from verl.utils import attention_utils, npu_flash_attn_utils as torch_impl

    helpers = (torch_impl.index_first_axis, torch_impl.pad_input, torch_impl.rearrange, torch_impl.unpad_input)
    attention_utils._get_attention_functions = lambda: helpers


class _CpuDeviceModule:
    """``torch.cpu`` plus what verl 0.9's workers read from their device module (``torch.cpu`` has none of it:
    ``AttributeError: module 'torch.cpu' has no attribute 'max_memory_allocated'``,
    ``verl/workers/engine_workers.py:219``; ``... 'empty_cache'``, ``verl/utils/memory_utils.py:54``): memory
    statistics (zeros, as verl's own memory logging reports for the CPU), ``empty_cache`` (nothing to free) and a
    device name."""

    def __getattr__(self, name):
        import torch

        return getattr(torch.cpu, name)

    @staticmethod
    def _zero(*args, **kwargs):
        return 0

    memory_allocated = memory_reserved = max_memory_allocated = max_memory_reserved = _zero

    @staticmethod
    def empty_cache():
        return None   # ActorRolloutRefWorker.init_model ends with aggressive_empty_cache

    @staticmethod
    def mem_get_info(*args, **kwargs):
        return 0, 0

    @staticmethod
    def get_device_name(*args, **kwargs):
        return "CPU"   # verl's FLOPs counter (mfu) looks its peak up by this name; unknown: infinite, mfu 0


CPU_DEVICE_MODULE = _CpuDeviceModule()


def use_cpu_platform() -> None:
    """verl 0.9: make verl's device layer answer "cpu" (its CUDA platform raises on a CPU-only torch).

    verl 0.9.1's ``forward_backward_batch`` moves the token count to ``get_device_id()``, which its CUDA platform
    (the default) answers with ``torch.cuda.current_device()``: ``AssertionError: Torch not compiled with CUDA
    enabled``; its engine's ``initialize`` calls ``torch.cuda.set_device`` (``AttributeError: module 'torch._C'
    has no attribute '_cuda_setDevice'``, ``verl/workers/engine/fsdp/utils.py:48``). verl's platform registry is
    its extension point: this sets a platform whose device is the CPU (device module :data:`CPU_DEVICE_MODULE`)
    and whose collective backend is gloo. Idempotent.
    """
    from verl.plugin.platform import platform_manager
    from verl.plugin.platform.platform_cuda import PlatformCUDA

    class CPUPlatform(PlatformCUDA):
        @property
        def device_name(self):
            return "cpu"

        @property
        def device_module(self):
            return CPU_DEVICE_MODULE

        def current_device(self):
            return "cpu"

        def communication_backend_name(self):
            return "gloo"

        def synchronize(self, device_index=None):
            return None

        def empty_cache(self):
            return None

    current = platform_manager._current_platform
    if current is None or current.device_module is not CPU_DEVICE_MODULE:
        platform_manager._current_platform = None   # set_platform only warns when one is set: start clean
        platform_manager.set_platform(CPUPlatform())


def load_class(spec: str):
    """``package.module:Class`` -> the class (ValueError naming what is missing)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--actor must be package.module:Class; got {spec!r}")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r}") from None


def ensure_process_group(dist) -> None:
    """verl's actor asks for the rank: a one-process gloo group when none is initialised."""
    if not dist.is_initialized():
        import os
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
        dist.init_process_group("gloo", rank=0, world_size=1)
