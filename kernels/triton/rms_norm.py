"""RMSNorm in Triton, forward and backward (InternVideo2 semantics, see kernels/ref.py::rms_norm).

    y = w * cast(x * rstd),  rstd = 1 / sqrt(mean(x^2) + eps)     fp32 statistics, y in x.dtype

Forward: a program normalises BLOCK_M rows of BLOCK_N >= width columns held in registers (several
rows per program for narrow widths, one for wide ones), and saves rstd (fp32, one per row).
Backward, with xhat = x * rstd and g = dy * w:
    dx = rstd * (g - xhat * mean(g * xhat))
    dw = sum over rows of dy * cast(xhat)
A fixed number of programs (a few per SM) each loops over a contiguous chunk of rows, keeps its dw
partial sum in registers and writes it once; one small torch reduction adds the partials. There
are no atomics, so dw is deterministic.

Napkin math (bf16, rows = 32*417, width 1408): forward moves 2 bytes x in + 2 bytes y out per
element (+4 bytes rstd per row), backward reads x and dy and writes dx: 6 bytes per element. Both
are memory bound (a few FLOPs per byte), so the target is the device copy bandwidth.

Test: pytest tests/test_rms_norm.py    Benchmark: python -m kernels.bench rms_norm
"""
import torch
import triton
import triton.language as tl

from .. import custom_ops, ref, register
from ..common import check_dtype, check_last_dim_contiguous, device_guard, empty, next_pow2
from .utils import INTERPRET, compute_dtype

MAX_WIDTH = 65536


@triton.jit
def _rms_norm_fwd_kernel(X, W, Y, RSTD, M, N, stride_x, stride_y, eps,
                         ROUND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)                     # (BLOCK_M,)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(ROUND).to(tl.float32)   # weight in x's dtype
    xhat = (x * rstd[:, None]).to(ROUND).to(tl.float32)                      # official: cast, then scale
    y = xhat * w[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _rms_norm_bwd_kernel(DY, X, W, RSTD, DX, DW_PARTIAL, M, N, stride_dy, stride_x, stride_dx, rows_per_program,
                         ROUND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(ROUND).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, M)
    for start in range(first, last, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < last
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        xhat = x * rstd[:, None]
        g = dy * w[None, :]
        c = tl.sum(g * xhat, axis=1) / N                                       # (BLOCK_M,)
        dx = (g - xhat * c[:, None]) * rstd[:, None]
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat.to(ROUND).to(tl.float32), axis=0)
    tl.store(DW_PARTIAL + pid * N + cols, dw, mask=col_ok)


def _blocks(N):
    BLOCK_N = max(16, next_pow2(N))
    BLOCK_M = max(1, min(64 if INTERPRET else 16, 4096 // BLOCK_N))   # narrow rows: several per program
    num_warps = 1 if INTERPRET else min(16, max(4, BLOCK_N * BLOCK_M // 1024))
    return BLOCK_M, BLOCK_N, num_warps


def _as_rows(t, N):
    return t.reshape(-1, N)   # a view whenever the leading dims allow it


def _rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """y (x.shape, x.dtype) and rstd (rows,) fp32."""
    N = x.shape[-1]
    x2 = _as_rows(x, N)
    M = x2.shape[0]
    y = empty(x.shape, x.dtype, x.device)
    rstd = empty((M,), torch.float32, x.device)
    BLOCK_M, BLOCK_N, num_warps = _blocks(N)
    with device_guard(x):
        _rms_norm_fwd_kernel[(triton.cdiv(M, BLOCK_M),)](
            x2, weight, y, rstd, M, N, x2.stride(0), N, eps,
            ROUND=compute_dtype(x.dtype), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=num_warps)
    return y, rstd


def _rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """dx (x.shape, x.dtype) and dweight (weight.shape, weight.dtype)."""
    N = x.shape[-1]
    x2, dy2 = _as_rows(x, N), _as_rows(dy.contiguous() if dy.stride(-1) != 1 else dy, N)
    M = x2.shape[0]
    dx = empty(x.shape, x.dtype, x.device)
    BLOCK_M, BLOCK_N, num_warps = _blocks(N)
    if INTERPRET or not x.is_cuda:
        programs = min(triton.cdiv(M, BLOCK_M), 4)
    else:
        programs = min(triton.cdiv(M, BLOCK_M), 4 * torch.cuda.get_device_properties(x.device).multi_processor_count)
    programs = max(programs, 1)
    rows_per_program = triton.cdiv(max(M, 1), programs)
    partial = empty((programs, N), torch.float32, x.device)
    with device_guard(x):
        _rms_norm_bwd_kernel[(programs,)](
            dy2, x2, weight, rstd, dx, partial, M, N, dy2.stride(0), x2.stride(0), N, rows_per_program,
            ROUND=compute_dtype(x.dtype), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=num_warps)
    return dx, partial.sum(0).to(weight.dtype)


rms_norm_fwd, rms_norm_bwd = custom_ops.define("rms_norm", "triton", _rms_norm_fwd, _rms_norm_bwd)


def rms_norm(x, weight, eps=1e-6):
    """Triton backend of kernels.rms_norm (arguments already checked by kernels.rms_norm)."""
    check_dtype("x", x)
    check_dtype("weight", weight)
    check_last_dim_contiguous(x=x, weight=weight)
    if x.shape[-1] > MAX_WIDTH:
        raise ValueError(f"triton rms_norm supports widths up to {MAX_WIDTH}, got {x.shape[-1]}")
    if x.numel() == 0:  # nothing to launch; the reference returns the (empty) result with autograd
        return ref.rms_norm(x, weight, eps)
    return rms_norm_fwd(x, weight, float(eps))[0]


register("rms_norm", "triton", rms_norm)
