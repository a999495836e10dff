"""Flash attention in Triton with an additive bias: forward and backward (FlashAttention-2 style).
Spec: kernels/ref.py::attention.

    o = softmax(q k^T * scale + bias, masked) v
    q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D); GQA: query head h reads kv head h // (Hq/Hkv)
    bias: any float tensor broadcastable to (B, Hq, Nq, Nk), read through its 4 strides (0 on broadcast dims, so a
          (B, 1, 1, Nk) additive mask or a (1, H, N, N) position bias is never materialised); -inf entries allowed
    mask: keys past Nk, causal bottom-right (query i sees keys j <= i + Nk - Nq), key padding (B, Nk) bool, True = keep
    A query row that sees no key (all masked, or a bias of -inf on every visible key) outputs zeros, log-sum-exp
    -inf and zero gradients.

Forward, one program per (BLOCK_M queries, batch x head): stream over BLOCK_N keys at a time with the online
softmax (running max m, running sum l, rescaled accumulator), in base 2 so that exp2 replaces exp. The row max is
taken on the unscaled scores and scaled once per row, so each score costs one multiply-add before its exp2:
p = exp2(qk * scale * log2(e) - m) (with a bias, s = qk * scale + bias is one multiply-add and p = exp2(s * log2(e)
- m) another; hence scale > 0, which the launcher checks). The loop is written once, _attention_fwd_inner, and
called twice: for the key blocks that every query of the program sees entirely (no bounds or causal compares) and
for the edge blocks (the ragged last block; with causal, the diagonal, after which a program stops). Saves
lse = (m + log2 l) * ln 2 per query (natural log, fp32) for the backward. Never forms the N x N matrix.

Backward (recomputation, no atomics, deterministic): a small kernel computes delta = rowsum(o * do); one kernel per
(BLOCK_N keys, batch x kv head) accumulates dK and dV on chip over every query block of every query head of its GQA
group; a separate kernel per (BLOCK_M queries, batch x head) accumulates dQ over the key blocks and, when the bias
needs a gradient (BIAS_GRAD), writes dS = P * (dP - delta) (natural units) as dbias (B, Hq, Nq, Nk) fp32, every
element, zeros where masked; autograd's expand-backward sums it over the caller's broadcast dims. The separate dQ
pass recomputes q k^T and do v^T (7 matmuls instead of 5), but needs no atomic adds: the result does not depend on
scheduling, there is no fp32 dQ buffer to zero and convert, and GQA groups need no reduction afterwards. Both
loops are split like the forward's (_attention_bwd_dkdv_inner, _attention_bwd_dq_inner, each called twice): the
masks are computed only on the diagonal blocks and on the ragged last key block.
Without a bias (HAS_BIAS constexpr False) the kernels compile exactly as if the bias did not exist.

Grid and order: one flat axis per kernel (B x H x blocks: no 65535 limit on B x H). The blocks of one head are
neighbours, so they share its K and V (or Q and dO) in L2; forward and dQ run a head's last query block first, the
dK/dV kernel its first key block: with causal those see the most keys, so the longest programs start first and the
short ones fill the tail (as csrc/attention.cu does).

Alignment (_head, _stride_unit). A tile row is loaded as 16-byte vectors (and, pipelined, by 16-byte cp.async) only
when the compiler knows that every row starts 16-byte aligned. Triton's JIT marks an integer argument divisible by
16 when it is, but the strides of head dim 88 (token stride 88 or 3 * H * 88, head stride 88 or N * 88) are
multiples of 8, not 16: compiled as they were, every Q/K/V/dO element was a 2-byte load, there was no cp.async,
num_stages did nothing and the dK/dV tiles spilled. So the launchers pass every batch/head/row stride divided by
UNIT = 8 and the kernels multiply it back by the constexpr UNIT. When a stride is no multiple of 8 (a head dim that
is not, or an odd view) UNIT = 1 compiles the unaligned kernel: correct and slower, no copy (a copy could not align
such a head dim either). `python -m kernels.compile_check --only attention` prints per tile the registers, spills
and the 16-byte and 2-byte load counts read from the PTX; tests/test_triton_compile_gpu.py asserts them at d = 88.
Offsets: batch and head offsets are int64 (B * N * 3 * H * 88 passes 2^31 from B = 745 at N = 2049, H = 16);
offsets within one head (row * row stride; Nq * Nk for the bias and dbias) are int32, which the launcher checks.

The kernels are built from small @triton.jit helpers shared by all three: _load_split/_store_split (the head-dim
pieces of a tile), _dot_d/_acc_d (matmuls over those pieces), _scores (scale, bias, causal/padding/bounds masks),
_load_lse2 and _head, so that each kernel body reads as its algorithm.

Head dim 88 (InternVideo2-1B) is split, not padded. tl.dot needs power-of-two tiles (>= 16), so D = 88 is computed
as two pieces D0 + D1 = 64 + 32 (the tail masked): q k^T = q0 k0^T + q1 k1^T, and every head-dim-wide result has
two accumulators. Expected gain, napkin math: the QK^T and PV matmuls (and the backward's) compute 96 head-dim
columns instead of 128, 25% fewer tensor-core FLOPs. They are almost all of attention's FLOPs but not all of its
time: each score also costs one exp2, and on an H100 (~990 dense bf16 TFLOP/s, ~3.9 T exp/s) one exp takes as long
as ~250 matmul FLOPs, against 4 d = 512 (128 columns) or 384 (96 columns) matmul FLOPs per score. So the attention
kernels should take 17% (exp not overlapped: 384 + 250 vs 512 + 250) to 25% (fully overlapped) less time at
compute-bound shapes, minus the cost of the extra dot and accumulator. Attention is ~19% of a 1B layer's FLOPs at
N = 2049 (~4% at the masked N = 417), so the end-to-end gain is at most ~3-5% at N = 2049 and ~1% in masked
pretraining.
Measure it: `python -m kernels.bench attention --pad88` times the d = 88 shapes split and padded to one 128 block
(padded_head_dim()) side by side. If the split does not pay for itself there, drop it: split_head_dim(D, pad=True).

Napkin math (1B, B=32, H=16, d=88, N=2049, bf16): forward 4*B*H*N^2*d = 755 GFLOP per layer (counted with d=88,
not 96), backward 2.5x that; memory: q, k, v, o = 4 * 2*B*N*H*d bytes = 0.74 GB, i.e. ~1000 FLOP/byte: compute
bound, judged in TFLOP/s against the measured bf16 matmul ceiling. A full (B, H, N, N) bf16 bias adds 2*N^2 bytes
per head read (and 4*N^2 written as dbias): ~2*N^2 / (4*N^2*d) = 1 byte per 176 FLOP, still compute bound.
Per score, besides its 4d = 352 matmul FLOPs (0.086 SM-clocks at an H100's ~4096 dense bf16 FLOP/clk/SM), the
forward spends one exp2 (16/clk/SM: 0.063 clocks) and ~4.5 FP32 instructions (the multiply-add of the exponent, the
row max, the row sum, half a bf16x2 convert; 128 lanes/clk: 0.035 clocks). One FP32 instruction per score is ~9% of
the matmul time, hence the scale folded into the exponent's multiply-add and no mask compares off the edge blocks.

Test: pytest tests/test_attention.py       Benchmark: python -m kernels.bench attention [--pad88]
"""
import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import custom_ops, ref, register
from ..common import check_dtype, check_last_dim_contiguous, device_guard, empty, next_pow2
from .utils import INTERPRET, autotune, compute_dtype

LOG2E = tl.constexpr(1.4426950408889634)   # log2(e): exp(x) = exp2(x * LOG2E)
LN2 = tl.constexpr(0.6931471805599453)     # ln(2): log(x) = log2(x) * LN2
MAX_HEAD_DIM = 256
PAD_HEAD_DIM = False   # True inside padded_head_dim(): one power-of-two block per head instead of the split


def split_head_dim(D, pad=False):
    """D -> (D0, D1): D0 the largest power of two <= D (at least 16), D1 a power of two >= the rest (0 if none).
    pad: one block of the next power of two instead (88 -> (128, 0))."""
    if pad:
        return max(16, next_pow2(D)), 0
    d0 = max(16, 1 << (D.bit_length() - 1))
    rest = D - d0
    return d0, (0 if rest <= 0 else max(16, next_pow2(rest)))


@contextlib.contextmanager
def padded_head_dim():
    """Within this block the kernels pad the head dim to one power-of-two block (for timing the split)."""
    global PAD_HEAD_DIM
    old, PAD_HEAD_DIM = PAD_HEAD_DIM, True
    try:
        yield
    finally:
        PAD_HEAD_DIM = old


# ---------------------------------------------------------------------------------------------
# building blocks shared by the kernels
#
# A head-dim-wide tile is held as two pieces, columns [0, D0) and [D0, D0 + D1); when D1 == 0 the second piece
# is the placeholder 0.0, which the helpers never touch (every use of it sits under `if D1 > 0`, a constexpr).

@triton.jit
def _load_split(base, rows, n_rows, row_stride, D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                DOT: tl.constexpr, TRANS: tl.constexpr = False):
    """The head-dim pieces of the tile x[rows, :] of a (n_rows, D) matrix with unit column stride, zeros outside,
    converted to DOT: (rows, D0) and (rows, D1), or with TRANS (D0, rows) and (D1, rows)."""
    if TRANS:
        r = rows[None, :]
        c = tl.arange(0, D0)[:, None]
    else:
        r = rows[:, None]
        c = tl.arange(0, D0)[None, :]
    row_ptr, row_ok = base + r * row_stride, r < n_rows
    x0 = tl.load(row_ptr + c, mask=row_ok & (c < D), other=0.0).to(DOT)
    x1 = 0.0
    if D1 > 0:
        c = D0 + (tl.arange(0, D1)[:, None] if TRANS else tl.arange(0, D1)[None, :])
        x1 = tl.load(row_ptr + c, mask=row_ok & (c < D), other=0.0).to(DOT)
    return x0, x1


@triton.jit
def _store_split(base, rows, n_rows, row_stride, x0, x1, D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr):
    """Store the head-dim pieces x0 (rows, D0) and x1 (rows, D1) of a (n_rows, D) matrix, cast to its dtype."""
    r, c = rows[:, None], tl.arange(0, D0)[None, :]
    tl.store(base + r * row_stride + c, x0.to(base.dtype.element_ty), mask=(r < n_rows) & (c < D))
    if D1 > 0:
        c = D0 + tl.arange(0, D1)[None, :]
        tl.store(base + r * row_stride + c, x1.to(base.dtype.element_ty), mask=(r < n_rows) & (c < D))


@triton.jit
def _dot_d(a0, a1, b0, b1, D1: tl.constexpr, PRECISION: tl.constexpr, TRANS_B: tl.constexpr = False):
    """A product contracted over the head dim, from its pieces: a0 @ b0 + a1 @ b1 (b^T with TRANS_B), fp32."""
    if TRANS_B:
        b0 = tl.trans(b0)
    acc = tl.dot(a0, b0, input_precision=PRECISION)
    if D1 > 0:
        if TRANS_B:
            b1 = tl.trans(b1)
        acc = tl.dot(a1, b1, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _acc_d(acc0, acc1, a, b0, b1, D1: tl.constexpr, PRECISION: tl.constexpr, TRANS_B: tl.constexpr = False):
    """A head-dim-wide product accumulated piecewise: (acc0 + a @ b0, acc1 + a @ b1) (b^T with TRANS_B)."""
    if TRANS_B:
        b0 = tl.trans(b0)
    acc0 = tl.dot(a, b0, acc0, input_precision=PRECISION)
    if D1 > 0:
        if TRANS_B:
            b1 = tl.trans(b1)
        acc1 = tl.dot(a, b1, acc1, input_precision=PRECISION)
    return acc0, acc1


@triton.jit
def _scores(qk, sm_scale, qm, kn, Nq, Nk, KPMb, skpm_n, BIASb, sbm, sbn,
            EDGE: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The scores s of a tile, in the units the kernels exponentiate: exp(score) = exp2(s * s2_scale) (see
    _exp2_scale). Without a bias s is the raw q k^T and the scale sits in s2_scale, so that exp2(s * s2_scale - m)
    is one multiply-add per score; with a bias s = q k^T * scale + bias (one multiply-add) and s2_scale = log2(e).
    -inf where query qm may not see key kn: padding, and in a block at the edge (EDGE) keys past Nk and, if causal,
    past the bottom-right diagonal (a block that every query sees entirely skips those compares). qm and kn index
    the tile's rows and columns as broadcastable vectors, (M, 1) and (1, N), or (1, M) and (N, 1) transposed."""
    s = qk
    if HAS_BIAS:
        bias = tl.load(BIASb + qm * sbm + kn * sbn, mask=(qm < Nq) & (kn < Nk), other=0.0)
        s = qk * sm_scale + bias.to(tl.float32)
    if HAS_KPM:
        s = tl.where(tl.load(KPMb + kn * skpm_n, mask=kn < Nk, other=0) != 0, s, float("-inf"))
    if EDGE:
        visible = kn < Nk
        if IS_CAUSAL:
            visible = visible & (kn <= qm + (Nk - Nq))
        s = tl.where(visible, s, float("-inf"))
    return s


@triton.jit
def _head(X, b, h, sb, sh, UNIT: tl.constexpr):
    """X + b * sb + h * sh in int64 (b * sb passes 2^31 elements in large batches). The strides arrive divided by
    UNIT (8 when every batch/head/row stride of the attention tensors is a multiple of 8 elements, see
    _stride_unit): multiplied back by the constexpr here, they tell the compiler that a head's rows start
    16-byte aligned, which is what turns tile loads into 16-byte vectors and cp.async copies. Triton's own hint
    (tt.divisibility) needs a stride divisible by 16, which head dim 88 (token stride 88 or 3 * H * 88, head
    stride 88 or N * 88) does not give."""
    return X + b.to(tl.int64) * sb * UNIT + h.to(tl.int64) * sh * UNIT


@triton.jit
def _load_lse2(LSEb, qm, Nq):
    """lse * log2(e) of queries qm, to recompute p = exp2(s2 - lse2); +inf for rows that saw no key (and rows
    past Nq), so that their p is 0 even where s2 is -inf."""
    lse = tl.load(LSEb + qm, mask=qm < Nq, other=float("-inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


# ---------------------------------------------------------------------------------------------
# forward

# GPU autotune lists (BLOCK_M, BLOCK_N, warps, stages), chosen with `python -m kernels.compile_check --only attention
# --all` under Triton 3.9 (this venv) and 3.6 (the GPU image). On sm_90 every tile loads 16-byte vectors and spills
# nothing at d = 64, 88 and 128 without a bias (one exception: 32 bytes for 128 x 64 at d = 128 with causal + padding
# under 3.9). tests/test_triton_compile_gpu.py keeps that so at d = 88 for sm_90 and sm_80 under 3.9. sm_80 (not a
# target) is tighter: there mma.sync keeps both head-dim pieces of K and V in registers, so at d = 88 dK/dV and dQ
# take 245-255 registers (95-210 on sm_90) and spill 8-40 bytes under 3.6 or with masks, and the 32 x 128 dK/dV and
# 128 x 32 dQ tiles spill 16-64 bytes at d = 128. A bias tile costs ~32 registers a thread more: at d = 128 the
# 128 x 64 forward then spills 0.6-0.9 KB and only 128 x 32 stays spill-free (24 bytes under 3.6 with both masks);
# autotune is keyed on HAS_BIAS, so biased calls pick their own tile.
# The forward's 128 x 128 tile (8 warps, 3 stages: twice the K/V reuse of 128 x 64; 4 stages would need 288 KB of
# shared memory at d = 128) is timed only at d <= 128 in one piece without a bias (_wide_tiles_fit): there it takes
# 255 registers with no spill under 3.6 (the GPU image), 16 bytes of spill on sm_90 under 3.9 and 96 bytes on sm_80
# (224 KB of shared memory on sm_90, 160 KB on sm_80); at d = 88 (two pieces) or with a bias it spills more.
# Left out because they spill: 4-warp tiles of 128 rows; dK/dV and dQ tiles of 64 x 64 and 128 x 64 (spill-free on
# sm_90, 8-90 bytes on sm_80 without a mask).
_WIDE = [(128, 128, 8, 3)]
_FWD_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                for m, n, w, s in [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 8, 2), (64, 64, 8, 3)] + _WIDE]
_DKDV_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                 for m, n, w, s in ((32, 64, 8, 2), (32, 64, 8, 3), (32, 128, 8, 2))]
_DQ_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
               for m, n, w, s in ((64, 32, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2))]
_INTERP_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64})


def _wide_tiles_fit(configs, named_args, **meta):
    """The forward configs worth timing for one launch: the 128 x 128 tiles only for a head dim in one piece of up
    to 128 columns and no bias (see above)."""
    wide = meta["D1"] == 0 and meta["D0"] <= 128 and not meta["HAS_BIAS"]
    return [c for c in configs if wide or c.kwargs["BLOCK_N"] < 128 or c.kwargs["BLOCK_M"] < 128]


_TUNE_KEY = ["NQ_BUCKET", "NK_BUCKET", "D", "D0", "D1", "IS_CAUSAL", "HAS_KPM", "HAS_BIAS", "UNIT"]


@triton.jit
def _attention_fwd_inner(acc0, acc1, l_i, m_i, q0, q1, qm, Kb, Vb, skn, svn, KPMb, skpm_n, BIASb, sbm, sbn,
                         Nq, Nk, sm_scale, s2_scale, lo, hi,
                         D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, EDGE: tl.constexpr,
                         IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_BIAS: tl.constexpr, DOT: tl.constexpr,
                         PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """The online softmax of one query block over the key blocks [lo, hi): updated (acc0, acc1, l_i, m_i), m_i the
    running row max in base 2. EDGE: the blocks may hold keys past Nk or past the causal diagonal (see _scores)."""
    for start_n in range(lo, hi, BLOCK_N):
        kn = start_n + tl.arange(0, BLOCK_N)
        kT0, kT1 = _load_split(Kb, kn, Nk, skn, D, D0, D1, DOT, TRANS=True)          # (D0, BLOCK_N), (D1, BLOCK_N)
        s = _scores(_dot_d(q0, q1, kT0, kT1, D1, PRECISION), sm_scale, qm[:, None], kn[None, :], Nq, Nk,
                    KPMb, skpm_n, BIASb, sbm, sbn, EDGE, IS_CAUSAL, HAS_KPM, HAS_BIAS)   # (BLOCK_M, BLOCK_N)
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * s2_scale)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # rows with nothing visible yet: exp2(-inf) = 0
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s * s2_scale - m_safe[:, None])             # one multiply-add per score
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v0, v1 = _load_split(Vb, kn, Nk, svn, D, D0, D1, DOT)                          # (BLOCK_N, D0), (BLOCK_N, D1)
        acc0 = acc0 * alpha[:, None]
        if D1 > 0:
            acc1 = acc1 * alpha[:, None]
        acc0, acc1 = _acc_d(acc0, acc1, p.to(DOT), v0, v1, D1, PRECISION)
        m_i = m_new
    return acc0, acc1, l_i, m_i


@autotune(_FWD_CONFIGS, _INTERP_CONFIG, key=_TUNE_KEY, prune=_wide_tiles_fit)
@triton.jit
def _attention_fwd_kernel(
        Q, K, V, BIAS, O, LSE, KPM,
        sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sbb, sbh, sbm, sbn, sob, soh, son, skpm_b, skpm_n,
        Hq, Nq, Nk, group, sm_scale, s2_scale, NQ_BUCKET, NK_BUCKET,
        D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, UNIT: tl.constexpr, IS_CAUSAL: tl.constexpr,
        HAS_KPM: tl.constexpr, HAS_BIAS: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # one flat grid axis (no 65535 limit on B * H), the query blocks of a head next to each other (they share its
    # K and V in L2), the last one first: with causal the last queries see the most keys, so the longest programs
    # start first and the short ones fill the tail
    n_m = tl.cdiv(Nq, BLOCK_M)
    bh = tl.program_id(0) // n_m
    start_m = n_m - 1 - tl.program_id(0) % n_m
    b, h = bh // Hq, bh % Hq
    hk = h // group
    qm = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q0, q1 = _load_split(_head(Q, b, h, sqb, sqh, UNIT), qm, Nq, sqn * UNIT, D, D0, D1, DOT)   # (BLOCK_M, D0/D1)
    acc0 = tl.zeros((BLOCK_M, D0), dtype=tl.float32)
    acc1 = 0.0
    if D1 > 0:
        acc1 = tl.zeros((BLOCK_M, D1), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    Kb, Vb = _head(K, b, hk, skb, skh, UNIT), _head(V, b, hk, svb, svh, UNIT)
    KPMb, BIASb = KPM + b.to(tl.int64) * skpm_b, BIAS + b.to(tl.int64) * sbb + h.to(tl.int64) * sbh
    # the key blocks before `full` are entirely visible to every query of this block (no compare needed), those
    # in [full, hi) hold its edge: the last keys (past Nk) and, if causal, the diagonal; keys >= hi are unseen
    if IS_CAUSAL:  # query i sees keys < i + Nk - Nq + 1
        full = tl.maximum(0, tl.minimum(Nk, start_m * BLOCK_M + Nk - Nq + 1)) // BLOCK_N * BLOCK_N
        hi = tl.maximum(0, tl.minimum(Nk, (start_m + 1) * BLOCK_M + Nk - Nq))
    else:
        full = Nk // BLOCK_N * BLOCK_N
        hi = Nk
    acc0, acc1, l_i, m_i = _attention_fwd_inner(
        acc0, acc1, l_i, m_i, q0, q1, qm, Kb, Vb, skn * UNIT, svn * UNIT, KPMb, skpm_n, BIASb, sbm, sbn, Nq, Nk,
        sm_scale, s2_scale, 0, full, D, D0, D1, False, IS_CAUSAL, HAS_KPM, HAS_BIAS, DOT, PRECISION, BLOCK_N)
    acc0, acc1, l_i, m_i = _attention_fwd_inner(
        acc0, acc1, l_i, m_i, q0, q1, qm, Kb, Vb, skn * UNIT, svn * UNIT, KPMb, skpm_n, BIASb, sbm, sbn, Nq, Nk,
        sm_scale, s2_scale, full, hi, D, D0, D1, True, IS_CAUSAL, HAS_KPM, HAS_BIAS, DOT, PRECISION, BLOCK_N)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)                     # rows that saw no key output zeros
    inv_l = 1.0 / l_safe
    _store_split(_head(O, b, h, sob, soh, UNIT), qm, Nq, son * UNIT, acc0 * inv_l[:, None], acc1 * inv_l[:, None],
                 D, D0, D1)
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)   # natural log
    tl.store(LSE + bh.to(tl.int64) * Nq + qm, lse, mask=qm < Nq)


# ---------------------------------------------------------------------------------------------
# backward

@triton.jit
def _attention_bwd_delta_kernel(O, DO, DELTA, sob, soh, son, sdob, sdoh, sdon, Hq, Nq,
                                D: tl.constexpr, DP: tl.constexpr, UNIT: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[b, h, i] = sum_d o[b, h, i, d] * do[b, h, i, d] (fp32)."""
    n_m = tl.cdiv(Nq, BLOCK_M)
    bh = tl.program_id(0) // n_m
    b, h = bh // Hq, bh % Hq
    qm = tl.program_id(0) % n_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, DP)
    mask = (qm < Nq)[:, None] & (d < D)[None, :]
    o = tl.load(_head(O, b, h, sob, soh, UNIT) + qm[:, None] * (son * UNIT) + d[None, :], mask=mask, other=0.0)
    do = tl.load(_head(DO, b, h, sdob, sdoh, UNIT) + qm[:, None] * (sdon * UNIT) + d[None, :], mask=mask, other=0.0)
    tl.store(DELTA + bh.to(tl.int64) * Nq + qm, tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1), mask=qm < Nq)


@triton.jit
def _attention_bwd_dkdv_inner(dk0, dk1, dv0, dv1, k0, k1, v0, v1, kn, Qb, DOb, LSEb, DELTAb, sqn, sdon,
                              KPMb, skpm_n, BIASb, sbm, sbn, Nq, Nk, sm_scale, s2_scale, lo, hi,
                              D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, EDGE: tl.constexpr,
                              IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_BIAS: tl.constexpr,
                              DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
    """dK, dV of the key block kn accumulated over the query blocks [lo, hi) of one query head: updated (dk0, dk1,
    dv0, dv1). The tiles are transposed, (keys, queries), so that dV += P^T dO and dK += dS^T Q need no transpose.
    EDGE: the blocks may straddle the causal diagonal or hold keys past Nk (see _scores); queries past Nq need no
    mask anywhere (their q and do load as zeros and their lse as +inf, so their p is 0)."""
    for start_m in range(lo, hi, BLOCK_M):
        qm = start_m + tl.arange(0, BLOCK_M)
        q0, q1 = _load_split(Qb, qm, Nq, sqn, D, D0, D1, DOT)                          # (BLOCK_M, D0), (BLOCK_M, D1)
        do0, do1 = _load_split(DOb, qm, Nq, sdon, D, D0, D1, DOT)
        sT = _scores(_dot_d(k0, k1, q0, q1, D1, PRECISION, TRANS_B=True), sm_scale, qm[None, :], kn[:, None],
                     Nq, Nk, KPMb, skpm_n, BIASb, sbm, sbn, EDGE, IS_CAUSAL, HAS_KPM, HAS_BIAS)  # (BLOCK_N, BLOCK_M)
        pT = tl.exp2(sT * s2_scale - _load_lse2(LSEb, qm, Nq)[None, :])
        dv0, dv1 = _acc_d(dv0, dv1, pT.to(DOT), do0, do1, D1, PRECISION)
        dpT = _dot_d(v0, v1, do0, do1, D1, PRECISION, TRANS_B=True)                        # (BLOCK_N, BLOCK_M)
        delta = tl.load(DELTAb + qm, mask=qm < Nq, other=0.0)
        dsT = pT * (dpT - delta[None, :])
        dk0, dk1 = _acc_d(dk0, dk1, dsT.to(DOT), q0, q1, D1, PRECISION)
    return dk0, dk1, dv0, dv1


@autotune(_DKDV_CONFIGS, _INTERP_CONFIG, key=_TUNE_KEY)
@triton.jit
def _attention_bwd_dkdv_kernel(
        Q, K, V, BIAS, DO, LSE, DELTA, DK, DV, KPM,
        sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sbb, sbh, sbm, sbn, sdob, sdoh, sdon,
        sdkb, sdkh, sdkn, sdvb, sdvh, sdvn, skpm_b, skpm_n,
        Hq, Hkv, Nq, Nk, group, sm_scale, s2_scale, NQ_BUCKET, NK_BUCKET,
        D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, UNIT: tl.constexpr, IS_CAUSAL: tl.constexpr,
        HAS_KPM: tl.constexpr, HAS_BIAS: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK, dV of BLOCK_N keys of one kv head, summed over the query heads of its GQA group."""
    # flat grid, the key blocks of a kv head next to each other, in order: with causal the first keys are seen by
    # the most queries, so the longest programs start first
    n_n = tl.cdiv(Nk, BLOCK_N)
    bhk = tl.program_id(0) // n_n
    start_n = tl.program_id(0) % n_n
    b, hk = bhk // Hkv, bhk % Hkv
    kn = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k0, k1 = _load_split(_head(K, b, hk, skb, skh, UNIT), kn, Nk, skn * UNIT, D, D0, D1, DOT)  # (BLOCK_N, D0/D1)
    v0, v1 = _load_split(_head(V, b, hk, svb, svh, UNIT), kn, Nk, svn * UNIT, D, D0, D1, DOT)
    dk0 = tl.zeros((BLOCK_N, D0), dtype=tl.float32)
    dv0 = tl.zeros((BLOCK_N, D0), dtype=tl.float32)
    dk1 = 0.0
    dv1 = 0.0
    if D1 > 0:
        dk1 = tl.zeros((BLOCK_N, D1), dtype=tl.float32)
        dv1 = tl.zeros((BLOCK_N, D1), dtype=tl.float32)
    KPMb = KPM + b.to(tl.int64) * skpm_b
    # query blocks [lo, mid) hold the edge of this key block (the causal diagonal), [mid, Nq) see it entirely;
    # a key block that runs past Nk is edge everywhere
    lo = 0
    mid = 0
    if IS_CAUSAL:  # query i sees key j when i >= j - (Nk - Nq)
        lo = tl.maximum(0, start_n * BLOCK_N - (Nk - Nq)) // BLOCK_M * BLOCK_M
        mid = tl.minimum(Nq, tl.cdiv(tl.maximum(0, (start_n + 1) * BLOCK_N - 1 - (Nk - Nq)), BLOCK_M) * BLOCK_M)
    mid = tl.where((start_n + 1) * BLOCK_N > Nk, Nq, mid)
    for g in range(0, group):
        h = hk * group + g
        Qb, DOb = _head(Q, b, h, sqb, sqh, UNIT), _head(DO, b, h, sdob, sdoh, UNIT)
        BIASb = BIAS + b.to(tl.int64) * sbb + h.to(tl.int64) * sbh
        LSEb, DELTAb = LSE + (b * Hq + h).to(tl.int64) * Nq, DELTA + (b * Hq + h).to(tl.int64) * Nq
        dk0, dk1, dv0, dv1 = _attention_bwd_dkdv_inner(
            dk0, dk1, dv0, dv1, k0, k1, v0, v1, kn, Qb, DOb, LSEb, DELTAb, sqn * UNIT, sdon * UNIT, KPMb, skpm_n,
            BIASb, sbm, sbn, Nq, Nk, sm_scale, s2_scale, lo, mid,
            D, D0, D1, True, IS_CAUSAL, HAS_KPM, HAS_BIAS, DOT, PRECISION, BLOCK_M)
        dk0, dk1, dv0, dv1 = _attention_bwd_dkdv_inner(
            dk0, dk1, dv0, dv1, k0, k1, v0, v1, kn, Qb, DOb, LSEb, DELTAb, sqn * UNIT, sdon * UNIT, KPMb, skpm_n,
            BIASb, sbm, sbn, Nq, Nk, sm_scale, s2_scale, mid, Nq,
            D, D0, D1, False, IS_CAUSAL, HAS_KPM, HAS_BIAS, DOT, PRECISION, BLOCK_M)
    _store_split(_head(DK, b, hk, sdkb, sdkh, UNIT), kn, Nk, sdkn * UNIT, dk0 * sm_scale, dk1 * sm_scale, D, D0, D1)
    _store_split(_head(DV, b, hk, sdvb, sdvh, UNIT), kn, Nk, sdvn * UNIT, dv0, dv1, D, D0, D1)


@triton.jit
def _attention_bwd_dq_inner(dq0, dq1, q0, q1, do0, do1, qm, lse2, delta, Kb, Vb, skn, svn, KPMb, skpm_n,
                            BIASb, sbm, sbn, DBIASb, Nq, Nk, sm_scale, s2_scale, lo, hi,
                            D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, EDGE: tl.constexpr,
                            IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_BIAS: tl.constexpr,
                            BIAS_GRAD: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
                            BLOCK_N: tl.constexpr):
    """dQ of the query block qm accumulated over the key blocks [lo, hi): updated (dq0, dq1); with BIAS_GRAD dS is
    written to dbias. EDGE as in _scores; queries past Nq have lse2 = +inf, so their p and dS are 0."""
    for start_n in range(lo, hi, BLOCK_N):
        kn = start_n + tl.arange(0, BLOCK_N)
        kT0, kT1 = _load_split(Kb, kn, Nk, skn, D, D0, D1, DOT, TRANS=True)          # (D0, BLOCK_N), (D1, BLOCK_N)
        vT0, vT1 = _load_split(Vb, kn, Nk, svn, D, D0, D1, DOT, TRANS=True)
        s = _scores(_dot_d(q0, q1, kT0, kT1, D1, PRECISION), sm_scale, qm[:, None], kn[None, :], Nq, Nk,
                    KPMb, skpm_n, BIASb, sbm, sbn, EDGE, IS_CAUSAL, HAS_KPM, HAS_BIAS)   # (BLOCK_M, BLOCK_N)
        p = tl.exp2(s * s2_scale - lse2[:, None])
        dp = _dot_d(do0, do1, vT0, vT1, D1, PRECISION)
        ds = p * (dp - delta[:, None])                     # d loss / d (q k^T * scale + bias)
        if BIAS_GRAD:
            tl.store(DBIASb + qm[:, None] * Nk + kn[None, :], ds, mask=(qm < Nq)[:, None] & (kn < Nk)[None, :])
        dq0, dq1 = _acc_d(dq0, dq1, ds.to(DOT), kT0, kT1, D1, PRECISION, TRANS_B=True)
    return dq0, dq1


@autotune(_DQ_CONFIGS, _INTERP_CONFIG, key=_TUNE_KEY + ["BIAS_GRAD"])
@triton.jit
def _attention_bwd_dq_kernel(
        Q, K, V, BIAS, DO, LSE, DELTA, DQ, DBIAS, KPM,
        sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sbb, sbh, sbm, sbn, sdob, sdoh, sdon, sdqb, sdqh, sdqn,
        skpm_b, skpm_n, Hq, Nq, Nk, group, sm_scale, s2_scale, NQ_BUCKET, NK_BUCKET,
        D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, UNIT: tl.constexpr, IS_CAUSAL: tl.constexpr,
        HAS_KPM: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, DOT: tl.constexpr,
        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ of BLOCK_M queries of one head: recompute p, dp over the visible key blocks. BIAS_GRAD: also write
    dS to dbias (B, Hq, Nq, Nk) fp32, zeros for the keys the block cannot see."""
    n_m = tl.cdiv(Nq, BLOCK_M)                      # flat grid, the last query block first, as in the forward
    bh = tl.program_id(0) // n_m
    start_m = n_m - 1 - tl.program_id(0) % n_m
    b, h = bh // Hq, bh % Hq
    hk = h // group
    qm = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q0, q1 = _load_split(_head(Q, b, h, sqb, sqh, UNIT), qm, Nq, sqn * UNIT, D, D0, D1, DOT)   # (BLOCK_M, D0/D1)
    do0, do1 = _load_split(_head(DO, b, h, sdob, sdoh, UNIT), qm, Nq, sdon * UNIT, D, D0, D1, DOT)
    dq0 = tl.zeros((BLOCK_M, D0), dtype=tl.float32)
    dq1 = 0.0
    if D1 > 0:
        dq1 = tl.zeros((BLOCK_M, D1), dtype=tl.float32)
    lse2 = _load_lse2(LSE + bh.to(tl.int64) * Nq, qm, Nq)
    delta = tl.load(DELTA + bh.to(tl.int64) * Nq + qm, mask=qm < Nq, other=0.0)
    Kb, Vb = _head(K, b, hk, skb, skh, UNIT), _head(V, b, hk, svb, svh, UNIT)
    KPMb, BIASb = KPM + b.to(tl.int64) * skpm_b, BIAS + b.to(tl.int64) * sbb + h.to(tl.int64) * sbh
    DBIASb = DBIAS + bh.to(tl.int64) * Nq * Nk                                        # this head's (Nq, Nk) slice
    # key blocks [0, full) are seen entirely by every query of the block, [full, hi) hold its edge (as in the forward)
    if IS_CAUSAL:
        full = tl.maximum(0, tl.minimum(Nk, start_m * BLOCK_M + Nk - Nq + 1)) // BLOCK_N * BLOCK_N
        hi = tl.maximum(0, tl.minimum(Nk, (start_m + 1) * BLOCK_M + Nk - Nq))
    else:
        full = Nk // BLOCK_N * BLOCK_N
        hi = Nk
    dq0, dq1 = _attention_bwd_dq_inner(
        dq0, dq1, q0, q1, do0, do1, qm, lse2, delta, Kb, Vb, skn * UNIT, svn * UNIT, KPMb, skpm_n, BIASb, sbm, sbn,
        DBIASb, Nq, Nk, sm_scale, s2_scale, 0, full,
        D, D0, D1, False, IS_CAUSAL, HAS_KPM, HAS_BIAS, BIAS_GRAD, DOT, PRECISION, BLOCK_N)
    dq0, dq1 = _attention_bwd_dq_inner(
        dq0, dq1, q0, q1, do0, do1, qm, lse2, delta, Kb, Vb, skn * UNIT, svn * UNIT, KPMb, skpm_n, BIASb, sbm, sbn,
        DBIASb, Nq, Nk, sm_scale, s2_scale, full, hi,
        D, D0, D1, True, IS_CAUSAL, HAS_KPM, HAS_BIAS, BIAS_GRAD, DOT, PRECISION, BLOCK_N)
    if BIAS_GRAD:
        if IS_CAUSAL:  # the key blocks after the diagonal: no gradient, but every dbias element is written
            zeros = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for start_n in range(tl.cdiv(hi, BLOCK_N) * BLOCK_N, Nk, BLOCK_N):
                kn = start_n + tl.arange(0, BLOCK_N)
                tl.store(DBIASb + qm[:, None] * Nk + kn[None, :], zeros, mask=(qm < Nq)[:, None] & (kn < Nk)[None, :])
    _store_split(_head(DQ, b, h, sdqb, sdqh, UNIT), qm, Nq, sdqn * UNIT, dq0 * sm_scale, dq1 * sm_scale, D, D0, D1)


# ---------------------------------------------------------------------------------------------
# launchers (registered as torch custom ops so torch.compile can trace models that use them)

def _heads_last_like(B, H, N, D, dtype, device):
    """A (B, H, N, D) tensor stored as (B, N, H, D): `o.transpose(1, 2).reshape(B, N, H*D)` is then free."""
    return empty((B, N, H, D), dtype, device).transpose(1, 2)


def _kpm_args(kpm, device):
    if kpm is None:
        return torch.empty(1, dtype=torch.uint8, device=device), 0, 0, False
    k8 = kpm.view(torch.uint8)
    return k8, k8.stride(0), k8.stride(1), True


def _bias_args(bias, device):
    """(tensor, its 4 strides, HAS_BIAS) for a (B, Hq, Nq, Nk) bias view (stride 0 on broadcast dims)."""
    if bias is None:
        return torch.empty(1, dtype=torch.float32, device=device), (0, 0, 0, 0), False
    return bias, bias.stride(), True


def _stride_unit(*tensors):
    """UNIT of _head: 8 when every batch, head and row stride of these (B, H, N, D) tensors is a multiple of 8
    elements (a head dim that is a multiple of 8, in any layout the model makes), else 1. With 1 the kernels
    compile without the 16-byte alignment hint: 2-byte loads, correct but slower (`python -m kernels.compile_check`
    shows the cost in its `unaligned` case). Not a copy instead: a copy cannot align a head dim that is no
    multiple of 8 either."""
    return 8 if all(s % 8 == 0 for t in tensors for s in t.stride()[:3]) else 1


def _strides(unit, *tensors):
    """The batch, head and row strides of each (B, H, N, D) tensor, in units of `unit` elements."""
    return [s // unit for t in tensors for s in t.stride()[:3]]


def _rows_fit_int32(t):
    """In the kernels, offsets within one head (row * row stride + column) are int32; batch and head offsets are
    int64. True when this (B, H, N, D) tensor's rows fit."""
    return (t.shape[2] - 1) * t.stride(2) + t.shape[3] < 2**31


def _meta(q, causal, has_kpm, has_bias, unit):
    D = q.shape[-1]
    D0, D1 = split_head_dim(D, pad=PAD_HEAD_DIM)
    return dict(D=D, D0=D0, D1=D1, UNIT=unit, IS_CAUSAL=causal, HAS_KPM=has_kpm, HAS_BIAS=has_bias,
                DOT=compute_dtype(q.dtype), PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def _exp2_scale(scale, has_bias):
    """s2_scale of _scores: exp(q k^T * scale + bias) = exp2(s * s2_scale)."""
    return LOG2E.value if has_bias else scale * LOG2E.value


def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """o (B, Hq, Nq, D) in q.dtype (stored heads-last) and lse (B, Hq, Nq) fp32, natural log."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    o = _heads_last_like(B, Hq, Nq, D, q.dtype, q.device)
    lse = empty((B, Hq, Nq), torch.float32, q.device)
    kpm, skpm_b, skpm_n, has_kpm = _kpm_args(key_padding_mask, q.device)
    bias_t, bias_strides, has_bias = _bias_args(bias, q.device)
    unit = _stride_unit(q, k, v, o)
    grid = lambda meta: (triton.cdiv(Nq, meta["BLOCK_M"]) * B * Hq,)  # noqa: E731
    with device_guard(q):
        _attention_fwd_kernel[grid](
            q, k, v, bias_t, o, lse, kpm, *_strides(unit, q, k, v), *bias_strides, *_strides(unit, o),
            skpm_b, skpm_n, Hq, Nq, Nk, Hq // Hkv, scale, _exp2_scale(scale, has_bias), next_pow2(Nq), next_pow2(Nk),
            **_meta(q, causal, has_kpm, has_bias, unit))
    return o, lse


def _attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                   lse: torch.Tensor, key_padding_mask: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   causal: bool, scale: float, bias_grad: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (heads-last, like o) and dbias (B, Hq, Nq, Nk) fp32, or an empty (0,) tensor unless bias_grad."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    if do.stride(-1) != 1 or not _rows_fit_int32(do):   # e.g. an expanded gradient (stride 0)
        do = do.contiguous()
    delta = empty((B, Hq, Nq), torch.float32, q.device)
    dq = _heads_last_like(B, Hq, Nq, D, q.dtype, q.device)
    dk = _heads_last_like(B, Hkv, Nk, D, k.dtype, k.device)
    dv = _heads_last_like(B, Hkv, Nk, D, v.dtype, v.device)
    dbias = empty((B, Hq, Nq, Nk) if bias_grad else (0,), torch.float32, q.device)
    kpm, skpm_b, skpm_n, has_kpm = _kpm_args(key_padding_mask, q.device)
    bias_t, bias_strides, has_bias = _bias_args(bias, q.device)
    unit = _stride_unit(q, k, v, o, do, dq, dk, dv)
    meta = _meta(q, causal, has_kpm, has_bias, unit)
    scales = (scale, _exp2_scale(scale, has_bias), next_pow2(Nq), next_pow2(Nk))
    BLOCK_DELTA = 64 if INTERPRET else 32
    with device_guard(q):
        _attention_bwd_delta_kernel[(triton.cdiv(Nq, BLOCK_DELTA) * B * Hq,)](
            o, do, delta, *_strides(unit, o, do), Hq, Nq, D=D, DP=max(16, next_pow2(D)), UNIT=unit,
            BLOCK_M=BLOCK_DELTA)
        _attention_bwd_dkdv_kernel[lambda m: (triton.cdiv(Nk, m["BLOCK_N"]) * B * Hkv,)](
            q, k, v, bias_t, do, lse, delta, dk, dv, kpm, *_strides(unit, q, k, v), *bias_strides,
            *_strides(unit, do, dk, dv), skpm_b, skpm_n, Hq, Hkv, Nq, Nk, Hq // Hkv, *scales, **meta)
        _attention_bwd_dq_kernel[lambda m: (triton.cdiv(Nq, m["BLOCK_M"]) * B * Hq,)](
            q, k, v, bias_t, do, lse, delta, dq, dbias, kpm, *_strides(unit, q, k, v), *bias_strides,
            *_strides(unit, do, dq), skpm_b, skpm_n, Hq, Nq, Nk, Hq // Hkv, *scales, BIAS_GRAD=bias_grad, **meta)
    return dq, dk, dv, dbias


attention_fwd, attention_bwd = custom_ops.define("attention", "triton", _attention_fwd, _attention_bwd)


def attention(q, k, v, *, causal=False, key_padding_mask=None, scale=None, bias=None):
    """Triton backend of kernels.attention (shapes already checked by kernels.attention): q, k, v fp16/bf16/fp32,
    head dims up to 256, a positive scale; a bias of any float dtype (read as is, computed in fp32)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_dtype(name, t)
    check_last_dim_contiguous(q=q, k=k, v=v)
    B, Hq, Nq, D = q.shape
    Nk = k.shape[2]
    if D > MAX_HEAD_DIM:
        raise ValueError(f"triton attention supports head dims up to {MAX_HEAD_DIM}, got {D}")
    scale = D ** -0.5 if scale is None else float(scale)
    if not scale > 0:   # the row max is taken before scaling (one multiply-add per score, see _scores)
        raise ValueError(f"triton attention needs a positive scale, got {scale}")
    if q.numel() == 0 or Nk == 0:  # nothing to launch; the reference gives the (empty/zero) result
        return ref.attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale, bias=bias)
    Hkv = k.shape[1]
    if not all(map(_rows_fit_int32, (q, k, v))) or max(Nq * Hq, Nk * Hkv) * D >= 2**31:
        raise ValueError(f"triton attention: the rows of one head of q, k, v or of the heads-last outputs span 2^31 "
                         f"elements or more (int32 offsets in the kernels): q {tuple(q.shape)} strides {q.stride()}, "
                         f"k {tuple(k.shape)} strides {k.stride()}, v strides {v.stride()}")
    if bias is not None:
        # (B, Hq, Nq, Nk) view: size-1 dims prepended, broadcast dims with stride 0. Expanded here, outside the
        # custom op, so that autograd's expand-backward sums dbias back to the caller's shape.
        bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape)).expand(B, Hq, Nq, Nk)
        if max(Nq * Nk, (Nq - 1) * bias.stride(2) + (Nk - 1) * bias.stride(3) + 1) >= 2**31:
            raise ValueError(f"triton attention: one head's bias (or its gradient), {Nq} x {Nk}, spans 2^31 "
                             f"elements or more (int32 offsets in the kernels)")
    return attention_fwd(q, k, v, key_padding_mask, bias, causal, scale)[0]


register("attention", "triton", attention)
