"""Helpers shared by every compiled backend (kernels/triton/*, kernels/cuda/*); none needs triton or nvcc.

- empty(): output allocation. Inside `poison_outputs()` every output starts as NaN (or -1 for
  integers), so a test proves that a kernel wrote every element it returns.
- check_dtype / check_last_dim_contiguous: argument checks with messages that name the tensor.
- device_guard(t): the CUDA device context of t (nothing on CPU).
- next_pow2(n).
"""
import contextlib

import torch

_POISON = False


@contextlib.contextmanager
def poison_outputs():
    """Within this block, outputs allocated by the backends' launchers start as NaN / -1."""
    global _POISON
    old, _POISON = _POISON, True
    try:
        yield
    finally:
        _POISON = old


def empty(shape, dtype, device):
    if not _POISON:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else -1
    return torch.full(shape, fill, dtype=dtype, device=device)


def check_last_dim_contiguous(backend="triton", **tensors):
    for name, t in tensors.items():
        if t is not None and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{backend} backend: {name} must be contiguous in its last dim (stride 1); "
                             f"got shape {tuple(t.shape)} strides {t.stride()}. Call .contiguous() first.")


def check_dtype(name, t, dtypes=(torch.float16, torch.bfloat16, torch.float32), backend="triton"):
    if t.dtype not in dtypes:
        raise TypeError(f"{backend} backend: {name} has dtype {t.dtype}; supported: {[str(d) for d in dtypes]}")


def device_guard(t):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def next_pow2(n):
    return 1 << max(0, (int(n) - 1).bit_length())
