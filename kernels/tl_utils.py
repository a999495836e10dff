"""Small helpers shared by the Triton kernel files (flash_attn.py, rmsnorm.py, pooling.py, gather.py).

- INTERPRET: True under the Triton CPU interpreter (TRITON_INTERPRET=1, read at import time, which
  is also when @triton.jit reads it).
- autotune(gpu_configs, interp_config, key): the GPU config list on a GPU; one fixed config under
  the interpreter (multi-config autotuning needs a GPU timer there).
- compute_dtype(t): the dtype kernels do arithmetic in for a tensor of t's dtype. The interpreter
  computes bf16 wrongly (it does integer arithmetic on the bit patterns), so bf16 is upcast to fp32
  there; on a GPU fp16/bf16 stay as they are for the tensor cores.
- empty(): output allocation. Inside `poison_outputs()` every output starts as NaN (or -1 for
  integers), so a test proves that a kernel wrote every element it returns.
- check_last_dim_contiguous / device_guard: argument checks and the CUDA device context.
"""
import contextlib
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_POISON = False

TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def autotune(gpu_configs, interp_config, key):
    return triton.autotune(configs=[interp_config] if INTERPRET else gpu_configs, key=key)


def compute_dtype(dtype):
    """tl dtype for in-kernel arithmetic on values loaded from a tensor of `dtype`."""
    if INTERPRET and dtype == torch.bfloat16:
        return tl.float32
    return TL_DTYPES[dtype]


@contextlib.contextmanager
def poison_outputs():
    """Within this block, outputs allocated by the Triton launchers start as NaN / -1."""
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


def check_last_dim_contiguous(**tensors):
    for name, t in tensors.items():
        if t is not None and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"triton backend: {name} must be contiguous in its last dim (stride 1); "
                             f"got shape {tuple(t.shape)} strides {t.stride()}. Call .contiguous() first.")


def check_dtype(name, t, dtypes=(torch.float16, torch.bfloat16, torch.float32)):
    if t.dtype not in dtypes:
        raise TypeError(f"triton backend: {name} has dtype {t.dtype}; supported: {[str(d) for d in dtypes]}")


def device_guard(t):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def next_pow2(n):
    return 1 << max(0, (int(n) - 1).bit_length())
