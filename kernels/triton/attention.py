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
softmax (running max m, running sum l, rescaled accumulator), in base 2: s2 = q k^T * scale * log2(e) + bias *
log2(e), so that exp2 replaces exp. The loop is written once, _attention_fwd_inner, and called twice: for the
key blocks that every query of the program sees entirely (no bounds or causal compares) and for the edge blocks
(the ragged last block; with causal, the diagonal, after which a program stops). Saves lse = (m + log2 l) * ln 2
per query (natural log, fp32) for the backward. Never forms the N x N matrix.

Backward (recomputation, no atomics, deterministic): a small kernel computes delta = rowsum(o * do); one kernel per
(BLOCK_N keys, batch x kv head) accumulates dK and dV on chip over every query block of every query head of its GQA
group; a separate kernel per (BLOCK_M queries, batch x head) accumulates dQ over the key blocks and, when the bias
needs a gradient (BIAS_GRAD), writes dS = P * (dP - delta) (natural units) as dbias (B, Hq, Nq, Nk) fp32, every
element, zeros where masked; autograd's expand-backward sums it over the caller's broadcast dims. The separate dQ
pass recomputes q k^T and do v^T (7 matmuls instead of 5), but needs no atomic adds: the result does not depend on
scheduling, there is no fp32 dQ buffer to zero and convert, and GQA groups need no reduction afterwards.
Without a bias (HAS_BIAS constexpr False) the kernels compile exactly as if the bias did not exist.

The kernels are built from small @triton.jit helpers shared by all three: _load_split/_store_split (the head-dim
pieces of a tile), _dot_d/_acc_d (matmuls over those pieces), _scores2 (scale, bias, causal/padding/bounds masks),
_load_lse2, so that each kernel body reads as its algorithm.

Head dim 88 (InternVideo2-1B) is split, not padded. tl.dot needs power-of-two tiles (>= 16), so D = 88 is computed
as two pieces D0 + D1 = 64 + 32 (the tail masked): q k^T = q0 k0^T + q1 k1^T, and every head-dim-wide result has
two accumulators. Expected gain, napkin math: the QK^T and PV matmuls (and the backward's) compute 96 head-dim
columns instead of 128, 25% fewer tensor-core FLOPs. They are almost all of attention's FLOPs but not all of its
time: each score also costs one exp2, and on an H100 (~990 dense bf16 TFLOP/s, ~3.9 T exp/s) one exp takes as long
as ~250 matmul FLOPs, against 4 d = 512 (128 columns) or 384 (96 columns) matmul FLOPs per score. So the attention
kernels should take 17% (exp not overlapped: 384 + 250 vs 512 + 250) to 25% (fully overlapped) less time at
compute-bound shapes, minus the cost of the extra dot and accumulator. Attention is ~19% of a 1B layer's FLOPs at N = 2049 (~4% at the
masked N = 417), so the end-to-end gain is at most ~3-5% at N = 2049 and ~1% in masked pretraining.
Measure it: `python -m kernels.bench attention --pad88` times the d = 88 shapes split and padded to one 128 block
(padded_head_dim()) side by side. If the split does not pay for itself there, drop it: split_head_dim(D, pad=True).

Napkin math (1B, B=32, H=16, d=88, N=2049, bf16): forward 4*B*H*N^2*d = 755 GFLOP per layer (counted with d=88,
not 96), backward 2.5x that; memory: q, k, v, o = 4 * 2*B*N*H*d bytes = 0.74 GB, i.e. ~1000 FLOP/byte: compute
bound, judged in TFLOP/s against the measured bf16 matmul ceiling. A full (B, H, N, N) bf16 bias adds 2*N^2 bytes
per head read (and 4*N^2 written as dbias): ~2*N^2 / (4*N^2*d) = 1 byte per 176 FLOP, still compute bound.

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
def _scores2(qk, qk_scale, qm, kn, Nq, Nk, KPMb, skpm_n, BIASb, sbm, sbn,
             EDGE: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Scores of a tile in base 2, s2 = (q k^T * scale + bias) * log2(e), and -inf where query qm may not see
    key kn: padding, and in a block at the edge (EDGE) keys past Nk and, if causal, past the bottom-right
    diagonal (a block that every query sees entirely skips those compares). qm and kn index the tile's rows
    and columns as broadcastable vectors, (M, 1) and (1, N), or (1, M) and (N, 1) for a transposed tile."""
    s = qk * qk_scale
    if HAS_BIAS:
        bias = tl.load(BIASb + qm * sbm + kn * sbn, mask=(qm < Nq) & (kn < Nk), other=0.0)
        s += bias.to(tl.float32) * LOG2E
    if HAS_KPM:
        s = tl.where(tl.load(KPMb + kn * skpm_n, mask=kn < Nk, other=0) != 0, s, float("-inf"))
    if EDGE:
        visible = kn < Nk
        if IS_CAUSAL:
            visible = visible & (kn <= qm + (Nk - Nq))
        s = tl.where(visible, s, float("-inf"))
    return s


@triton.jit
def _load_lse2(LSEb, qm, Nq):
    """lse * log2(e) of queries qm, to recompute p = exp2(s2 - lse2); +inf for rows that saw no key (and rows
    past Nq), so that their p is 0 even where s2 is -inf."""
    lse = tl.load(LSEb + qm, mask=qm < Nq, other=float("-inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


# ---------------------------------------------------------------------------------------------
# forward

# GPU autotune lists, chosen with `python -m kernels.compile_check --all` (registers and spills per tile on
# sm_90): 4-warp tiles of 128 rows spill at d >= 88, so they are left out; the forward and dQ tiles below
# are spill-free at d = 64/88/128, two dK/dV tiles spill a little at d >= 88 and stay for autotune to judge.
# A bias tile costs 32 registers a thread at 128 x 64 with 8 warps: triton 3.6 (the GPU image) still fits the
# forward (<= 8 bytes of spill), triton 3.9 spills ~0.5 KB there, and autotune, keyed on HAS_BIAS, then picks
# 128 x 32 or 64 x 64 for biased calls.
_FWD_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                for m, n, w, s in ((128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 64, 8, 2))]
_DKDV_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                 for m, n, w, s in ((32, 64, 4, 2), (32, 64, 8, 2), (64, 64, 8, 2), (32, 128, 8, 2))]
_DQ_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
               for m, n, w, s in ((64, 32, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2), (128, 64, 8, 2))]
_INTERP_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64})
_TUNE_KEY = ["NQ_BUCKET", "NK_BUCKET", "D", "D0", "D1", "IS_CAUSAL", "HAS_KPM", "HAS_BIAS"]


@triton.jit
def _attention_fwd_inner(acc0, acc1, l_i, m_i, q0, q1, qm, Kb, Vb, skn, svn, KPMb, skpm_n, BIASb, sbm, sbn,
                         Nq, Nk, qk_scale, lo, hi,
                         D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, EDGE: tl.constexpr,
                         IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_BIAS: tl.constexpr, DOT: tl.constexpr,
                         PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """The online softmax of one query block over the key blocks [lo, hi): updated (acc0, acc1, l_i, m_i).
    EDGE: the blocks may hold keys past Nk or past the causal diagonal (see _scores2)."""
    for start_n in range(lo, hi, BLOCK_N):
        kn = start_n + tl.arange(0, BLOCK_N)
        kT0, kT1 = _load_split(Kb, kn, Nk, skn, D, D0, D1, DOT, TRANS=True)          # (D0, BLOCK_N), (D1, BLOCK_N)
        s = _scores2(_dot_d(q0, q1, kT0, kT1, D1, PRECISION), qk_scale, qm[:, None], kn[None, :], Nq, Nk,
                     KPMb, skpm_n, BIASb, sbm, sbn, EDGE, IS_CAUSAL, HAS_KPM, HAS_BIAS)  # (BLOCK_M, BLOCK_N)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # rows with nothing visible yet: exp2(-inf) = 0
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v0, v1 = _load_split(Vb, kn, Nk, svn, D, D0, D1, DOT)                          # (BLOCK_N, D0), (BLOCK_N, D1)
        acc0 = acc0 * alpha[:, None]
        if D1 > 0:
            acc1 = acc1 * alpha[:, None]
        acc0, acc1 = _acc_d(acc0, acc1, p.to(DOT), v0, v1, D1, PRECISION)
        m_i = m_new
    return acc0, acc1, l_i, m_i


@autotune(_FWD_CONFIGS, _INTERP_CONFIG, key=_TUNE_KEY)
@triton.jit
def _attention_fwd_kernel(
        Q, K, V, BIAS, O, LSE, KPM,
        sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sbb, sbh, sbm, sbn, sob, soh, son, skpm_b, skpm_n,
        Hq, Nq, Nk, group, sm_scale, NQ_BUCKET, NK_BUCKET,
        D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
        HAS_BIAS: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // Hq, bh % Hq
    hk = h // group
    qm = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q0, q1 = _load_split(Q + b * sqb + h * sqh, qm, Nq, sqn, D, D0, D1, DOT)          # (BLOCK_M, D0), (BLOCK_M, D1)
    acc0 = tl.zeros((BLOCK_M, D0), dtype=tl.float32)
    acc1 = 0.0
    if D1 > 0:
        acc1 = tl.zeros((BLOCK_M, D1), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    Kb, Vb = K + b * skb + hk * skh, V + b * svb + hk * svh
    KPMb, BIASb = KPM + b * skpm_b, BIAS + b * sbb + h * sbh
    qk_scale = sm_scale * LOG2E
    # the key blocks before `full` are entirely visible to every query of this block (no compare needed), those
    # in [full, hi) hold its edge: the last keys (past Nk) and, if causal, the diagonal; keys >= hi are unseen
    if IS_CAUSAL:  # query i sees keys < i + Nk - Nq + 1
        full = tl.maximum(0, tl.minimum(Nk, start_m * BLOCK_M + Nk - Nq + 1)) // BLOCK_N * BLOCK_N
        hi = tl.maximum(0, tl.minimum(Nk, (start_m + 1) * BLOCK_M + Nk - Nq))
    else:
        full = Nk // BLOCK_N * BLOCK_N
        hi = Nk
    acc0, acc1, l_i, m_i = _attention_fwd_inner(
        acc0, acc1, l_i, m_i, q0, q1, qm, Kb, Vb, skn, svn, KPMb, skpm_n, BIASb, sbm, sbn, Nq, Nk, qk_scale,
        0, full, D, D0, D1, False, IS_CAUSAL, HAS_KPM, HAS_BIAS, DOT, PRECISION, BLOCK_N)
    acc0, acc1, l_i, m_i = _attention_fwd_inner(
        acc0, acc1, l_i, m_i, q0, q1, qm, Kb, Vb, skn, svn, KPMb, skpm_n, BIASb, sbm, sbn, Nq, Nk, qk_scale,
        full, hi, D, D0, D1, True, IS_CAUSAL, HAS_KPM, HAS_BIAS, DOT, PRECISION, BLOCK_N)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)                     # rows that saw no key output zeros
    inv_l = 1.0 / l_safe
    _store_split(O + b * sob + h * soh, qm, Nq, son, acc0 * inv_l[:, None], acc1 * inv_l[:, None], D, D0, D1)
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)   # natural log
    tl.store(LSE + bh * Nq + qm, lse, mask=qm < Nq)


# ---------------------------------------------------------------------------------------------
# backward

@triton.jit
def _attention_bwd_delta_kernel(O, DO, DELTA, sob, soh, son, sdob, sdoh, sdon, Hq, Nq,
                                D: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[b, h, i] = sum_d o[b, h, i, d] * do[b, h, i, d] (fp32)."""
    bh = tl.program_id(1)
    b, h = bh // Hq, bh % Hq
    qm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, DP)
    mask = (qm < Nq)[:, None] & (d < D)[None, :]
    o = tl.load(O + b * sob + h * soh + qm[:, None] * son + d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdob + h * sdoh + qm[:, None] * sdon + d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh * Nq + qm, tl.sum(o * do, axis=1), mask=qm < Nq)


@autotune(_DKDV_CONFIGS, _INTERP_CONFIG, key=_TUNE_KEY)
@triton.jit
def _attention_bwd_dkdv_kernel(
        Q, K, V, BIAS, DO, LSE, DELTA, DK, DV, KPM,
        sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sbb, sbh, sbm, sbn, sdob, sdoh, sdon,
        sdkb, sdkh, sdkn, sdvb, sdvh, sdvn, skpm_b, skpm_n,
        Hq, Hkv, Nq, Nk, group, sm_scale, NQ_BUCKET, NK_BUCKET,
        D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
        HAS_BIAS: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK, dV of BLOCK_N keys of one kv head, summed over the query heads of its GQA group. The tiles are
    transposed, (keys, queries), so that dV += P^T dO and dK += dS^T Q need no transpose of P or dS."""
    start_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b, hk = bhk // Hkv, bhk % Hkv
    kn = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k0, k1 = _load_split(K + b * skb + hk * skh, kn, Nk, skn, D, D0, D1, DOT)          # (BLOCK_N, D0), (BLOCK_N, D1)
    v0, v1 = _load_split(V + b * svb + hk * svh, kn, Nk, svn, D, D0, D1, DOT)
    dk0 = tl.zeros((BLOCK_N, D0), dtype=tl.float32)
    dv0 = tl.zeros((BLOCK_N, D0), dtype=tl.float32)
    dk1 = 0.0
    dv1 = 0.0
    if D1 > 0:
        dk1 = tl.zeros((BLOCK_N, D1), dtype=tl.float32)
        dv1 = tl.zeros((BLOCK_N, D1), dtype=tl.float32)
    KPMb = KPM + b * skpm_b
    qk_scale = sm_scale * LOG2E
    lo = 0
    if IS_CAUSAL:  # queries before (first key) - (Nk - Nq) cannot see any key of this block
        lo = tl.maximum(0, start_n * BLOCK_N - (Nk - Nq)) // BLOCK_M * BLOCK_M
    for g in range(0, group):
        h = hk * group + g
        Qb, DOb, BIASb = Q + b * sqb + h * sqh, DO + b * sdob + h * sdoh, BIAS + b * sbb + h * sbh
        for start_m in range(lo, Nq, BLOCK_M):
            qm = start_m + tl.arange(0, BLOCK_M)
            q0, q1 = _load_split(Qb, qm, Nq, sqn, D, D0, D1, DOT)                      # (BLOCK_M, D0), (BLOCK_M, D1)
            do0, do1 = _load_split(DOb, qm, Nq, sdon, D, D0, D1, DOT)
            # the scores transposed, (BLOCK_N, BLOCK_M): every tile here is keys x queries
            sT = _scores2(_dot_d(k0, k1, q0, q1, D1, PRECISION, TRANS_B=True), qk_scale, qm[None, :], kn[:, None],
                          Nq, Nk, KPMb, skpm_n, BIASb, sbm, sbn, True, IS_CAUSAL, HAS_KPM, HAS_BIAS)
            pT = tl.exp2(sT - _load_lse2(LSE + (b * Hq + h) * Nq, qm, Nq)[None, :])
            dv0, dv1 = _acc_d(dv0, dv1, pT.to(DOT), do0, do1, D1, PRECISION)
            dpT = _dot_d(v0, v1, do0, do1, D1, PRECISION, TRANS_B=True)                    # (BLOCK_N, BLOCK_M)
            delta = tl.load(DELTA + (b * Hq + h) * Nq + qm, mask=qm < Nq, other=0.0)
            dsT = pT * (dpT - delta[None, :])
            dk0, dk1 = _acc_d(dk0, dk1, dsT.to(DOT), q0, q1, D1, PRECISION)
    _store_split(DK + b * sdkb + hk * sdkh, kn, Nk, sdkn, dk0 * sm_scale, dk1 * sm_scale, D, D0, D1)
    _store_split(DV + b * sdvb + hk * sdvh, kn, Nk, sdvn, dv0, dv1, D, D0, D1)


@autotune(_DQ_CONFIGS, _INTERP_CONFIG, key=_TUNE_KEY + ["BIAS_GRAD"])
@triton.jit
def _attention_bwd_dq_kernel(
        Q, K, V, BIAS, DO, LSE, DELTA, DQ, DBIAS, KPM,
        sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sbb, sbh, sbm, sbn, sdob, sdoh, sdon, sdqb, sdqh, sdqn,
        skpm_b, skpm_n, Hq, Nq, Nk, group, sm_scale, NQ_BUCKET, NK_BUCKET,
        D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
        HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ of BLOCK_M queries of one head: recompute p, dp over the visible key blocks. BIAS_GRAD: also write
    dS to dbias (B, Hq, Nq, Nk) fp32, zeros for the keys the block cannot see."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // Hq, bh % Hq
    hk = h // group
    qm = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q0, q1 = _load_split(Q + b * sqb + h * sqh, qm, Nq, sqn, D, D0, D1, DOT)           # (BLOCK_M, D0), (BLOCK_M, D1)
    do0, do1 = _load_split(DO + b * sdob + h * sdoh, qm, Nq, sdon, D, D0, D1, DOT)
    dq0 = tl.zeros((BLOCK_M, D0), dtype=tl.float32)
    dq1 = 0.0
    if D1 > 0:
        dq1 = tl.zeros((BLOCK_M, D1), dtype=tl.float32)
    lse2 = _load_lse2(LSE + bh * Nq, qm, Nq)
    delta = tl.load(DELTA + bh * Nq + qm, mask=qm < Nq, other=0.0)
    Kb, Vb = K + b * skb + hk * skh, V + b * svb + hk * svh
    KPMb, BIASb = KPM + b * skpm_b, BIAS + b * sbb + h * sbh
    DBIASb = DBIAS + bh.to(tl.int64) * Nq * Nk                                        # this head's (Nq, Nk) slice
    qk_scale = sm_scale * LOG2E
    hi = Nk
    if IS_CAUSAL:
        hi = tl.maximum(0, tl.minimum(Nk, (start_m + 1) * BLOCK_M + Nk - Nq))
    for start_n in range(0, hi, BLOCK_N):
        kn = start_n + tl.arange(0, BLOCK_N)
        kT0, kT1 = _load_split(Kb, kn, Nk, skn, D, D0, D1, DOT, TRANS=True)          # (D0, BLOCK_N), (D1, BLOCK_N)
        vT0, vT1 = _load_split(Vb, kn, Nk, svn, D, D0, D1, DOT, TRANS=True)
        s = _scores2(_dot_d(q0, q1, kT0, kT1, D1, PRECISION), qk_scale, qm[:, None], kn[None, :], Nq, Nk,
                     KPMb, skpm_n, BIASb, sbm, sbn, True, IS_CAUSAL, HAS_KPM, HAS_BIAS)  # (BLOCK_M, BLOCK_N)
        p = tl.exp2(s - lse2[:, None])
        dp = _dot_d(do0, do1, vT0, vT1, D1, PRECISION)
        ds = p * (dp - delta[:, None])                     # d loss / d (q k^T * scale + bias)
        if BIAS_GRAD:
            tl.store(DBIASb + qm[:, None] * Nk + kn[None, :], ds, mask=(qm < Nq)[:, None] & (kn < Nk)[None, :])
        dq0, dq1 = _acc_d(dq0, dq1, ds.to(DOT), kT0, kT1, D1, PRECISION, TRANS_B=True)
    if BIAS_GRAD:
        if IS_CAUSAL:  # the key blocks after the diagonal: no gradient, but every dbias element is written
            zeros = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for start_n in range(tl.cdiv(hi, BLOCK_N) * BLOCK_N, Nk, BLOCK_N):
                kn = start_n + tl.arange(0, BLOCK_N)
                tl.store(DBIASb + qm[:, None] * Nk + kn[None, :], zeros, mask=(qm < Nq)[:, None] & (kn < Nk)[None, :])
    _store_split(DQ + b * sdqb + h * sdqh, qm, Nq, sdqn, dq0 * sm_scale, dq1 * sm_scale, D, D0, D1)


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


def _meta(q, causal, has_kpm, has_bias):
    D = q.shape[-1]
    D0, D1 = split_head_dim(D, pad=PAD_HEAD_DIM)
    return dict(D=D, D0=D0, D1=D1, IS_CAUSAL=causal, HAS_KPM=has_kpm, HAS_BIAS=has_bias,
                DOT=compute_dtype(q.dtype), PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """o (B, Hq, Nq, D) in q.dtype (stored heads-last) and lse (B, Hq, Nq) fp32, natural log."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    o = _heads_last_like(B, Hq, Nq, D, q.dtype, q.device)
    lse = empty((B, Hq, Nq), torch.float32, q.device)
    kpm, skpm_b, skpm_n, has_kpm = _kpm_args(key_padding_mask, q.device)
    bias_t, bias_strides, has_bias = _bias_args(bias, q.device)
    grid = lambda meta: (triton.cdiv(Nq, meta["BLOCK_M"]), B * Hq)  # noqa: E731
    with device_guard(q):
        _attention_fwd_kernel[grid](
            q, k, v, bias_t, o, lse, kpm, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *bias_strides,
            *o.stride()[:3], skpm_b, skpm_n, Hq, Nq, Nk, Hq // Hkv, scale, next_pow2(Nq), next_pow2(Nk),
            **_meta(q, causal, has_kpm, has_bias))
    return o, lse


def _attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                   lse: torch.Tensor, key_padding_mask: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   causal: bool, scale: float, bias_grad: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (heads-last, like o) and dbias (B, Hq, Nq, Nk) fp32, or an empty (0,) tensor unless bias_grad."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    if do.stride(-1) != 1:
        do = do.contiguous()
    delta = empty((B, Hq, Nq), torch.float32, q.device)
    dq = _heads_last_like(B, Hq, Nq, D, q.dtype, q.device)
    dk = _heads_last_like(B, Hkv, Nk, D, k.dtype, k.device)
    dv = _heads_last_like(B, Hkv, Nk, D, v.dtype, v.device)
    dbias = empty((B, Hq, Nq, Nk) if bias_grad else (0,), torch.float32, q.device)
    kpm, skpm_b, skpm_n, has_kpm = _kpm_args(key_padding_mask, q.device)
    bias_t, bias_strides, has_bias = _bias_args(bias, q.device)
    meta = _meta(q, causal, has_kpm, has_bias)
    BLOCK_DELTA = 64 if INTERPRET else 32
    with device_guard(q):
        _attention_bwd_delta_kernel[(triton.cdiv(Nq, BLOCK_DELTA), B * Hq)](
            o, do, delta, *o.stride()[:3], *do.stride()[:3], Hq, Nq, D=D, DP=max(16, next_pow2(D)),
            BLOCK_M=BLOCK_DELTA)
        _attention_bwd_dkdv_kernel[lambda m: (triton.cdiv(Nk, m["BLOCK_N"]), B * Hkv)](
            q, k, v, bias_t, do, lse, delta, dk, dv, kpm, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            *bias_strides, *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3], skpm_b, skpm_n,
            Hq, Hkv, Nq, Nk, Hq // Hkv, scale, next_pow2(Nq), next_pow2(Nk), **meta)
        _attention_bwd_dq_kernel[lambda m: (triton.cdiv(Nq, m["BLOCK_M"]), B * Hq)](
            q, k, v, bias_t, do, lse, delta, dq, dbias, kpm, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            *bias_strides, *do.stride()[:3], *dq.stride()[:3], skpm_b, skpm_n,
            Hq, Nq, Nk, Hq // Hkv, scale, next_pow2(Nq), next_pow2(Nk), BIAS_GRAD=bias_grad, **meta)
    return dq, dk, dv, dbias


attention_fwd, attention_bwd = custom_ops.define("attention", "triton", _attention_fwd, _attention_bwd)


def attention(q, k, v, *, causal=False, key_padding_mask=None, scale=None, bias=None):
    """Triton backend of kernels.attention (shapes already checked by kernels.attention): q, k, v fp16/bf16/fp32,
    head dims up to 256; a bias of any float dtype (read as is, computed in fp32)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_dtype(name, t)
    check_last_dim_contiguous(q=q, k=k, v=v)
    B, Hq, Nq, D = q.shape
    Nk = k.shape[2]
    if D > MAX_HEAD_DIM:
        raise ValueError(f"triton attention supports head dims up to {MAX_HEAD_DIM}, got {D}")
    scale = D ** -0.5 if scale is None else float(scale)
    if q.numel() == 0 or Nk == 0:  # nothing to launch; the reference gives the (empty/zero) result
        return ref.attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale, bias=bias)
    if bias is not None:
        # (B, Hq, Nq, Nk) view: size-1 dims prepended, broadcast dims with stride 0. Expanded here, outside the
        # custom op, so that autograd's expand-backward sums dbias back to the caller's shape.
        bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape)).expand(B, Hq, Nq, Nk)
    return attention_fwd(q, k, v, key_padding_mask, bias, causal, scale)[0]


register("attention", "triton", attention)
