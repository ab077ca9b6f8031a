"""Fixtures shared by several test modules."""
import pytest
import torch

from softprompt.testing import tiny_causal_lm, tiny_tokenizer


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread (OpenMP hand-offs dominate tiny matmuls on a busy
    CPU). Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def lm():
    """A tiny random Llama and its tokenizer, shared by the tests of one module."""
    return tiny_causal_lm("llama"), tiny_tokenizer()
