"""RMSNorm in Triton, forward and backward (InternVideo2 semantics, see kernels/ref.py::rms_norm).

    y = w * cast(x * rstd),  rstd = 1 / sqrt(mean(x^2) + eps)     fp32 statistics, y in x.dtype

Forward: a program normalises BLOCK_M rows of BLOCK_N >= width columns held in registers (several
rows per program for narrow widths, one for wide ones), and saves rstd (fp32, one per row).
Backward, with xhat = x * rstd and g = dy * w:
    dx = rstd * (g - xhat * mean(g * xhat))
    dw = sum over rows of dy * cast(xhat)
One wave of programs (as many as the GPU holds at once: SMs x the occupancy of the compiled kernel,
_programs_per_wave) each loops over a contiguous chunk of rows, keeps its dw partial sum in registers
and writes it once; one small torch reduction adds the partials. There are no atomics, so dw is
deterministic. Row offsets are int64 (rows x width passes 2^31 elements from ~670k rows of 3200).

Napkin math (bf16, rows = 32*417, width 1408): forward moves 2 bytes x in + 2 bytes y out per
element (+4 bytes rstd per row), backward reads x and dy and writes dx: 6 bytes per element. Both
are memory bound (a few FLOPs per byte), so the target is the device copy bandwidth. The backward at
width 1408 (2 x 2048 tile, 4 warps) compiles to ~160 registers (kernels.compile_check): 3 programs
per SM, so its 132 x 3 programs each handle ~34 rows of that shape, and the dw partials add
396 x 1408 x 4 bytes = 2.2 MB to the 113 MB the backward moves.

Test: pytest tests/test_rms_norm.py    Benchmark: python -m kernels.bench rms_norm
"""
import torch
import triton
import triton.language as tl
from triton.runtime import driver

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
    r64 = rows.to(tl.int64)[:, None]                                          # row * stride passes 2^31
    x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)                     # (BLOCK_M,)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(ROUND).to(tl.float32)   # weight in x's dtype
    xhat = (x * rstd[:, None]).to(ROUND).to(tl.float32)                      # official: cast, then scale
    y = xhat * w[None, :]
    tl.store(Y + r64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit(do_not_specialize=["rows_per_program"])   # one compiled kernel whatever the program count
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
        r64 = rows.to(tl.int64)[:, None]
        x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        xhat = x * rstd[:, None]
        g = dy * w[None, :]
        c = tl.sum(g * xhat, axis=1) / N                                       # (BLOCK_M,)
        dx = (g - xhat * c[:, None]) * rstd[:, None]
        tl.store(DX + r64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
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


def _programs_per_wave(kernel, device, num_warps):
    """How many programs of a compiled kernel the GPU runs at once: SMs x programs resident per SM, limited by
    the kernel's registers (allocated per warp in units of 256), threads and shared memory. The occupancy rule of
    Triton's fused-softmax tutorial, which also reads n_regs after _init_handles (the load of the binary)."""
    kernel._init_handles()
    props = driver.active.utils.get_device_properties(device.index)   # registers per block = per SM on sm_80/90
    regs_per_warp = triton.cdiv(kernel.n_regs * 32, 256) * 256
    per_sm = min(props["max_num_regs"] // (regs_per_warp * num_warps),
                 torch.cuda.get_device_properties(device).max_threads_per_multi_processor // (32 * num_warps),
                 props["max_shared_mem"] // max(1, kernel.metadata.shared))
    return props["multiprocessor_count"] * max(1, per_sm)


_WAVE = {}   # (device, width, dtype) -> _programs_per_wave of the backward kernel


def _rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """dx (x.shape, x.dtype) and dweight (weight.shape, weight.dtype)."""
    N = x.shape[-1]
    x2, dy2 = _as_rows(x, N), _as_rows(dy.contiguous() if dy.stride(-1) != 1 else dy, N)
    M = x2.shape[0]
    dx = empty(x.shape, x.dtype, x.device)
    BLOCK_M, BLOCK_N, num_warps = _blocks(N)
    meta = dict(ROUND=compute_dtype(x.dtype), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=num_warps)
    args = lambda partial, rows_per_program: (dy2, x2, weight, rstd, dx, partial, M, N,  # noqa: E731
                                              dy2.stride(0), x2.stride(0), N, rows_per_program)
    # One wave of programs, each over a contiguous chunk of rows: more would run as a partial second wave (4 x SMs
    # at 162 registers and 4 warps, 3 resident per SM: 1.33 waves, i.e. 2 program-times instead of 1.33), fewer
    # would leave SMs idle. The count comes from the compiled kernel (warmup compiles the same specialisation as
    # the launch: rows_per_program is not specialised). Under the interpreter or on CPU: 4 programs.
    if INTERPRET or not x.is_cuda:
        wave = 4
    else:
        key = (x.device, N, x.dtype)   # the registers hardly depend on the other arguments' specialisation
        if key not in _WAVE:
            with device_guard(x):
                kernel = _rms_norm_bwd_kernel.warmup(*args(torch.empty((1, N), dtype=torch.float32, device=x.device),
                                                           1), grid=(1,), **meta)
                _WAVE[key] = _programs_per_wave(kernel, x.device, num_warps)
        wave = _WAVE[key]
    programs = max(1, min(triton.cdiv(M, BLOCK_M), wave))
    partial = empty((programs, N), torch.float32, x.device)
    with device_guard(x):
        _rms_norm_bwd_kernel[(programs,)](*args(partial, triton.cdiv(max(M, 1), programs)), **meta)
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
