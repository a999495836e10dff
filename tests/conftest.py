"""Test set-up. Without a GPU, Triton kernels run under the Triton interpreter, which must be switched
on before any kernel module is imported (the @triton.jit decorator reads it)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def seed():
    """A fresh seed per test run (printed on failure), so inputs differ between runs."""
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    print(f"seed={s}")
    return s
