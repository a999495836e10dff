"""Masked (visible-token) gather in Triton, forward and backward, see kernels/ref.py::masked_gather.

    out[l, b, k, :] = x[l, b, idx[b, k], :] (+ pos[0, idx[b, k], :])      x (L, B, N, C) or (B, N, C)
    idx = visible_idx (B, K) int64, unique per row (ascending)          out (L, B, K, C) in x.dtype

The pos-embed is rounded to x's dtype (as the reference does), added in fp32 and the sum rounded
once. A 3-D x is the L = 1 case; every layer uses the same indices.

Forward, one program per (BLOCK_K slots, BLOCK_C channels, sample b): load the BLOCK_K indices and
the matching pos-embed tile once, then loop over the L layers: load the gathered rows of x, add,
store. One pass, no intermediate tensor; nothing is read from the host, so it can be captured in a
CUDA graph.
Backward, the transpose of a gather is a scatter. Instead of zero-filling dx and scattering dout
into it (two passes over dx, and dpos would need atomics across b), it is turned back into a
gather: inv (B, N) int32 holds the slot k of token n in sample b, or -1 if n was dropped (built with
torch.full + scatter_, no sync). One program per (BLOCK_N tokens, BLOCK_C channels) loops over b and
l, writes every row of dx exactly once (dout[l, b, inv[b, n]] or zeros) and sums the same values
into an fp32 dpos tile in registers, written once at the end: no atomics, deterministic.

Napkin math (bf16, B=32, N=2049, K=417 (20%), C=1408, L=1): the forward reads K*C of x and of pos
and writes K*C per sample: 3 * 2 bytes * 32*417*1408 = 113 MB, ~38 us at the 3.0 TB/s copy speed
measured on an H100. The backward reads K*C of dout and writes N*C of dx per sample, plus N*C of
dpos once: 2 bytes * (32*(417 + 2049) + 2049)*1408 = 228 MB, ~76 us (dx dominates: its zero rows
must be written anyway). No arithmetic to speak of, so the target is the device copy bandwidth
(mind the 50 MiB L2 when timing: one 37 MB activation fits in it).
Limits: indices are not range-checked up front (that would need a sync). The forward masks
out-of-range ones (a zero row instead of a memory fault); the backward's scatter_ rejects them (an
error on CPU, a device-side assert on CUDA). Duplicate indices in a row are not supported (the
backward keeps one of them); the reference's contract is unique, ascending indices.

Test: pytest tests/test_masked_gather.py    Benchmark: python -m kernels.bench masked_gather
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import custom_ops, ref, register
from ..common import check_dtype, check_last_dim_contiguous, device_guard, empty, next_pow2
from .utils import INTERPRET, compute_dtype


@triton.jit
def _masked_gather_fwd_kernel(X, IDX, POS, OUT, L, N, K, C,
                              stride_xl, stride_xb, stride_xn, stride_ib, stride_ik, stride_pn,
                              stride_ol, stride_ob, stride_ok,
                              HAS_POS: tl.constexpr, ROUND: tl.constexpr,
                              BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(2).to(tl.int64)                       # int64: b * stride may pass 2^31
    slots = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    idx = tl.load(IDX + b * stride_ib + slots * stride_ik, mask=slots < K, other=-1)   # (BLOCK_K,) int64
    ok = (idx >= 0) & (idx < N)                              # padding slots (and bad indices) -> masked
    mask = ok[:, None] & (cols < C)[None, :]                 # (BLOCK_K, BLOCK_C)
    x_ptrs = X + b * stride_xb + idx[:, None] * stride_xn + cols[None, :]
    o_ptrs = OUT + b * stride_ob + slots[:, None] * stride_ok + cols[None, :]
    o_mask = (slots < K)[:, None] & (cols < C)[None, :]
    if HAS_POS:  # loaded once, reused by every layer; rounded to x's dtype like the reference
        pos = tl.load(POS + idx[:, None] * stride_pn + cols[None, :], mask=mask, other=0.0)
        pos = pos.to(ROUND).to(tl.float32)
    for layer in range(L):
        x = tl.load(x_ptrs, mask=mask, other=0.0)
        if HAS_POS:
            x = x.to(tl.float32) + pos                      # fp32 add, one rounding on store
        tl.store(o_ptrs, x.to(OUT.dtype.element_ty), mask=o_mask)
        x_ptrs += stride_xl
        o_ptrs += stride_ol


@triton.jit
def _masked_gather_bwd_kernel(DOUT, INV, DX, DPOS, L, B, N, C,
                              stride_dl, stride_db, stride_dk, stride_xl, stride_xb, stride_xn,
                              HAS_POS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok, col_ok = rows < N, cols < C
    out_mask = row_ok[:, None] & col_ok[None, :]             # (BLOCK_N, BLOCK_C): every dx element here
    dpos = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    inv_ptrs = INV + rows                                    # inv is (B, N) contiguous
    dout_b, dx_b = DOUT, DX                                  # scalar pointers to sample b (advanced, no b * stride)
    for b in range(B):
        slot = tl.load(inv_ptrs, mask=row_ok, other=-1)      # (BLOCK_N,) slot of token n in out, -1 = dropped
        hit = (slot >= 0)[:, None] & col_ok[None, :]
        d_ptrs = dout_b + slot[:, None].to(tl.int64) * stride_dk + cols[None, :]
        x_ptrs = dx_b + rows[:, None].to(tl.int64) * stride_xn + cols[None, :]
        for layer in range(L):
            g = tl.load(d_ptrs, mask=hit, other=0.0)         # zeros for dropped tokens
            tl.store(x_ptrs, g.to(DX.dtype.element_ty), mask=out_mask)
            if HAS_POS:
                dpos += g.to(tl.float32)
            d_ptrs += stride_dl
            x_ptrs += stride_xl
        inv_ptrs += N
        dout_b += stride_db
        dx_b += stride_xb
    if HAS_POS:
        tl.store(DPOS + rows[:, None] * C + cols[None, :], dpos.to(DPOS.dtype.element_ty), mask=out_mask)


def _blocks(rows, C):
    """(BLOCK_ROWS, BLOCK_C, num_warps). Tiles of 4096 elements on a GPU (16 rows x 256 channels at
    C >= 256); under the interpreter, where each program costs ~1.5 ms, tiles of up to 16384."""
    BLOCK_C = max(16, min(next_pow2(C), 2048 if INTERPRET else 256))
    BLOCK_ROWS = max(1, min(next_pow2(rows), (16384 if INTERPRET else 4096) // BLOCK_C))
    return BLOCK_ROWS, BLOCK_C, (1 if INTERPRET else 4)


def _layers(t):
    """View a 3-D (B, *, C) tensor as L = 1 layer: (L, stride_l) for the kernels."""
    return (t.shape[0], t.stride(0)) if t.dim() == 4 else (1, 0)


def _masked_gather_fwd(x: torch.Tensor, visible_idx: torch.Tensor, pos_embed: Optional[torch.Tensor]) -> torch.Tensor:
    """out (..., B, K, C) in x.dtype, contiguous."""
    B, N, C = x.shape[-3:]
    K = visible_idx.shape[1]
    L, stride_xl = _layers(x)
    out = empty(x.shape[:-2] + (K, C), x.dtype, x.device)   # (L, B, K, C) or (B, K, C)
    BLOCK_K, BLOCK_C, num_warps = _blocks(K, C)
    has_pos = pos_embed is not None
    pos = pos_embed if has_pos else x                        # any pointer; never read without HAS_POS
    with device_guard(x):
        _masked_gather_fwd_kernel[(triton.cdiv(K, BLOCK_K), triton.cdiv(C, BLOCK_C), B)](
            x, visible_idx, pos, out, L, N, K, C,
            stride_xl, x.stride(-3), x.stride(-2), visible_idx.stride(0), visible_idx.stride(1),
            pos.stride(-2), _layers(out)[1], out.stride(-3), out.stride(-2),
            HAS_POS=has_pos, ROUND=compute_dtype(x.dtype), BLOCK_K=BLOCK_K, BLOCK_C=BLOCK_C, num_warps=num_warps)
    return out


def _masked_gather_bwd(dout: torch.Tensor, visible_idx: torch.Tensor, N: int, pos_dtype: Optional[torch.dtype]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """dx (..., B, N, C) in dout.dtype (= x.dtype), and dpos (1, N, C) in pos_dtype summed over l and b,
    or an empty (0,) tensor when pos_dtype is None (no pos-embed, or it needs no gradient)."""
    if dout.stride(-1) != 1:   # e.g. an expanded gradient (stride 0)
        dout = dout.contiguous()
    B, K, C = dout.shape[-3:]
    L, stride_dl = _layers(dout)
    # inv[b, n] = k if visible_idx[b, k] == n else -1; scatter_ runs on the device, no sync
    slots = torch.arange(K, dtype=torch.int32, device=dout.device).expand(B, K)
    inv = torch.full((B, N), -1, dtype=torch.int32, device=dout.device).scatter_(1, visible_idx, slots)
    dx = empty(dout.shape[:-2] + (N, C), dout.dtype, dout.device)   # (L, B, N, C) or (B, N, C)
    has_pos = pos_dtype is not None
    dpos = empty((1, N, C) if has_pos else (0,), pos_dtype if has_pos else torch.float32, dout.device)
    BLOCK_N, BLOCK_C, num_warps = _blocks(N, C)
    with device_guard(dout):
        _masked_gather_bwd_kernel[(triton.cdiv(N, BLOCK_N), triton.cdiv(C, BLOCK_C))](
            dout, inv, dx, dpos if has_pos else dx, L, B, N, C,
            stride_dl, dout.stride(-3), dout.stride(-2), _layers(dx)[1], dx.stride(-3), dx.stride(-2),
            HAS_POS=has_pos, BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C, num_warps=num_warps)
    return dx, dpos


masked_gather_fwd, masked_gather_bwd = custom_ops.define(
    "masked_gather", "triton", _masked_gather_fwd, _masked_gather_bwd)


def masked_gather(x, visible_idx, pos_embed=None):
    """Triton backend of kernels.masked_gather (shapes already checked by kernels.masked_gather).
    Any strides are fine except in the channel (last) dim of x and pos_embed."""
    check_dtype("x", x)
    if pos_embed is not None:
        check_dtype("pos_embed", pos_embed)
    check_last_dim_contiguous(x=x, pos_embed=pos_embed)
    if x.numel() == 0 or visible_idx.numel() == 0:  # nothing to launch; the reference handles empty shapes
        return ref.masked_gather(x, visible_idx, pos_embed)
    return masked_gather_fwd(x, visible_idx, pos_embed)


register("masked_gather", "triton", masked_gather)
