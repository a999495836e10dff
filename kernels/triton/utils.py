"""Small helpers shared by the Triton kernel files (attention.py, rms_norm.py, attn_pool.py, masked_gather.py).

- INTERPRET: True under the Triton CPU interpreter (TRITON_INTERPRET=1, read at import time, which
  is also when @triton.jit reads it).
- autotune(gpu_configs, interp_config, key): the GPU config list on a GPU; one fixed config under
  the interpreter (multi-config autotuning needs a GPU timer there).
- compute_dtype(t): the dtype kernels do arithmetic in for a tensor of t's dtype. The interpreter
  computes bf16 wrongly (it does integer arithmetic on the bit patterns), so bf16 is upcast to fp32
  there; on a GPU fp16/bf16 stay as they are for the tensor cores.
Backend-neutral helpers (output allocation with poisoning, argument checks) are in kernels/common.py.
"""
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def autotune(gpu_configs, interp_config, key, prune=None):
    """triton.autotune over gpu_configs (one interp_config under the interpreter). prune(configs, named_args,
    **kwargs) -> the configs worth timing for this launch (Triton's early_config_prune), GPU only."""
    if INTERPRET:
        return triton.autotune(configs=[interp_config], key=key)
    return triton.autotune(configs=gpu_configs, key=key,
                           prune_configs_by={"early_config_prune": prune} if prune else None)


def compute_dtype(dtype):
    """tl dtype for in-kernel arithmetic on values loaded from a tensor of `dtype`."""
    if INTERPRET and dtype == torch.bfloat16:
        return tl.float32
    return TL_DTYPES[dtype]
