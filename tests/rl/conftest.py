"""RL harness tests run torch on one thread: the tiny models here lose 10x to thread contention on a busy
2-core machine. The previous setting is restored after each test."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
