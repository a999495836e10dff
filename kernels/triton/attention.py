"""Flash attention in Triton: forward and backward (FlashAttention-2 style), see kernels/ref.py::attention.

    o = softmax(q k^T * scale + mask) v      q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D), GQA: head h reads kv head h // (Hq/Hkv)
    mask: keys past Nk, causal bottom-right (query i sees keys j <= i + Nk - Nq), key padding (B, Nk) bool, True = keep
    A query row that sees no key outputs zeros (and log-sum-exp -inf).

Forward, one program per (BLOCK_M queries, batch x head): stream over BLOCK_N keys at a time with the
online softmax (running max m, running sum l, rescaled accumulator), in base 2 (exp2 with the scale
folded into log2(e) * scale). Saves lse = m + log(l) (natural log, fp32) per query for the backward.
Never forms the N x N matrix. Causal programs stop at their last visible key block.

Head dims that are not a power of two (88 for InternVideo2-1B) are not padded to the next power of two:
the head dim is split into two power-of-two pieces, D = D0 + D1 (88 = 64 + 32, the tail masked), so
q k^T = q0 k0^T + q1 k1^T and the output has two accumulators. 88 costs 96 columns (9% waste)
instead of 128 (45%). D0, D1 >= 16 because tl.dot needs it on a GPU.

Backward (recomputation, no atomics, deterministic): a small kernel computes delta = rowsum(o * do);
one kernel per (BLOCK_N keys, batch x kv head) accumulates dK and dV on chip over every query block
of every query head of its GQA group; a separate kernel per (BLOCK_M queries, batch x head)
accumulates dQ over the key blocks. The separate dQ pass recomputes q k^T and do v^T (7 matmuls
instead of 5), but needs no atomic adds: the result does not depend on scheduling, there is no
fp32 dQ buffer to zero and convert, and GQA groups need no reduction afterwards.

Napkin math (1B, B=32, H=16, d=88, N=2049, bf16): forward 4*B*H*N^2*d = 755 GFLOP per layer (counted
with d=88, not 96), backward 2.5x that; memory: q, k, v, o = 4 * 2*B*N*H*d bytes = 0.74 GB, i.e.
~1000 FLOP/byte: compute bound, judged in TFLOP/s against the measured bf16 matmul ceiling.

Test: pytest tests/test_attention.py       Benchmark: python -m kernels.bench attention
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import custom_ops, ref, register
from ..common import check_dtype, check_last_dim_contiguous, device_guard, empty, next_pow2
from .utils import INTERPRET, autotune, compute_dtype

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256


def split_head_dim(D):
    """D -> (D0, D1): D0 the largest power of two <= D (at least 16), D1 a power of two >= the rest (0 if none)."""
    d0 = max(16, 1 << (D.bit_length() - 1))
    rest = D - d0
    return d0, (0 if rest <= 0 else max(16, next_pow2(rest)))


# ---------------------------------------------------------------------------------------------
# forward

# GPU autotune lists, chosen with `python -m kernels.compile_check --all` (registers and spills per tile on
# sm_90): 4-warp tiles of 128 rows spill at d >= 88, so they are left out; the forward and dQ tiles below
# are spill-free at d = 64/88/128, two dK/dV tiles spill a little at d >= 88 and stay for autotune to judge.
_FWD_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                for m, n, w, s in ((128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 64, 8, 2))]
_DKDV_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                 for m, n, w, s in ((32, 64, 4, 2), (32, 64, 8, 2), (64, 64, 8, 2), (32, 128, 8, 2))]
_DQ_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
               for m, n, w, s in ((64, 32, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2), (128, 64, 8, 2))]
_INTERP_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64})


@autotune(_FWD_CONFIGS, _INTERP_CONFIG,
          key=["NQ_BUCKET", "NK_BUCKET", "D", "IS_CAUSAL", "HAS_KPM"])
@triton.jit
def _attention_fwd_kernel(
        Q, K, V, O, LSE, KPM,
        sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, skpm_b, skpm_n,
        Hq, Nq, Nk, group, qk_scale, NQ_BUCKET, NK_BUCKET,
        D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
        DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // Hq, bh % Hq
    hk = h // group
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    d0 = tl.arange(0, D0)
    m_ok = offs_m < Nq
    Qb = Q + b * sqb + h * sqh
    Kb = K + b * skb + hk * skh
    Vb = V + b * svb + hk * svh
    q0 = tl.load(Qb + offs_m[:, None] * sqn + d0[None, :], mask=m_ok[:, None] & (d0 < D)[None, :], other=0.0).to(DOT)
    acc0 = tl.zeros((BLOCK_M, D0), dtype=tl.float32)
    if D1 > 0:
        d1 = D0 + tl.arange(0, D1)
        q1 = tl.load(Qb + offs_m[:, None] * sqn + d1[None, :], mask=m_ok[:, None] & (d1 < D)[None, :], other=0.0).to(DOT)
        acc1 = tl.zeros((BLOCK_M, D1), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)

    hi = Nk
    if IS_CAUSAL:  # the block's last query sees keys < (start_m + 1) * BLOCK_M + Nk - Nq
        hi = tl.minimum(Nk, (start_m + 1) * BLOCK_M + Nk - Nq)
    for start_n in range(0, hi, BLOCK_N):
        kn = start_n + offs_n
        n_ok = kn < Nk
        kT0 = tl.load(Kb + kn[None, :] * skn + d0[:, None], mask=n_ok[None, :] & (d0 < D)[:, None], other=0.0).to(DOT)
        s = tl.dot(q0, kT0, input_precision=PRECISION)                           # (BLOCK_M, BLOCK_N)
        if D1 > 0:
            kT1 = tl.load(Kb + kn[None, :] * skn + d1[:, None], mask=n_ok[None, :] & (d1 < D)[:, None], other=0.0).to(DOT)
            s += tl.dot(q1, kT1, input_precision=PRECISION)
        s = s * qk_scale
        valid = n_ok[None, :]
        if IS_CAUSAL:
            valid = valid & (kn[None, :] <= offs_m[:, None] + (Nk - Nq))
        if HAS_KPM:
            keep = tl.load(KPM + b * skpm_b + kn * skpm_n, mask=n_ok, other=0)
            valid = valid & (keep != 0)[None, :]
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # rows with nothing visible yet: exp2(-inf) = 0
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v0 = tl.load(Vb + kn[:, None] * svn + d0[None, :], mask=n_ok[:, None] & (d0 < D)[None, :], other=0.0).to(DOT)
        acc0 = acc0 * alpha[:, None] + tl.dot(p.to(DOT), v0, input_precision=PRECISION)
        if D1 > 0:
            v1 = tl.load(Vb + kn[:, None] * svn + d1[None, :], mask=n_ok[:, None] & (d1 < D)[None, :], other=0.0).to(DOT)
            acc1 = acc1 * alpha[:, None] + tl.dot(p.to(DOT), v1, input_precision=PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)                     # rows that saw no key output zeros
    Ob = O + b * sob + h * soh
    tl.store(Ob + offs_m[:, None] * son + d0[None, :], (acc0 / l_safe[:, None]).to(O.dtype.element_ty),
             mask=m_ok[:, None] & (d0 < D)[None, :])
    if D1 > 0:
        tl.store(Ob + offs_m[:, None] * son + d1[None, :], (acc1 / l_safe[:, None]).to(O.dtype.element_ty),
                 mask=m_ok[:, None] & (d1 < D)[None, :])
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)  # natural log
    tl.store(LSE + bh * Nq + offs_m, lse, mask=m_ok)


# ---------------------------------------------------------------------------------------------
# backward

@triton.jit
def _attention_bwd_delta_kernel(O, DO, DELTA, sob, soh, son, sdob, sdoh, sdon, Hq, Nq,
                                D: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[b, h, i] = sum_d o[b, h, i, d] * do[b, h, i, d] (fp32)."""
    bh = tl.program_id(1)
    b, h = bh // Hq, bh % Hq
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, DP)
    mask = (offs_m < Nq)[:, None] & (d < D)[None, :]
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * son + d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdon + d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh * Nq + offs_m, tl.sum(o * do, axis=1), mask=offs_m < Nq)


@autotune(_DKDV_CONFIGS, _INTERP_CONFIG,
          key=["NQ_BUCKET", "NK_BUCKET", "D", "IS_CAUSAL", "HAS_KPM"])
@triton.jit
def _attention_bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV, KPM,
        sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon,
        sdkb, sdkh, sdkn, sdvb, sdvh, sdvn, skpm_b, skpm_n,
        Hq, Hkv, Nq, Nk, group, sm_scale, NQ_BUCKET, NK_BUCKET,
        D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
        DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK, dV of BLOCK_N keys of one kv head, summed over the query heads of its GQA group."""
    start_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b, hk = bhk // Hkv, bhk % Hkv
    kn = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    d0 = tl.arange(0, D0)
    n_ok = kn < Nk
    key_ok = n_ok
    if HAS_KPM:
        key_ok = key_ok & (tl.load(KPM + b * skpm_b + kn * skpm_n, mask=n_ok, other=0) != 0)
    Kb = K + b * skb + hk * skh
    Vb = V + b * svb + hk * svh
    k0 = tl.load(Kb + kn[:, None] * skn + d0[None, :], mask=n_ok[:, None] & (d0 < D)[None, :], other=0.0).to(DOT)
    v0 = tl.load(Vb + kn[:, None] * svn + d0[None, :], mask=n_ok[:, None] & (d0 < D)[None, :], other=0.0).to(DOT)
    dk0 = tl.zeros((BLOCK_N, D0), dtype=tl.float32)
    dv0 = tl.zeros((BLOCK_N, D0), dtype=tl.float32)
    if D1 > 0:
        d1 = D0 + tl.arange(0, D1)
        k1 = tl.load(Kb + kn[:, None] * skn + d1[None, :], mask=n_ok[:, None] & (d1 < D)[None, :], other=0.0).to(DOT)
        v1 = tl.load(Vb + kn[:, None] * svn + d1[None, :], mask=n_ok[:, None] & (d1 < D)[None, :], other=0.0).to(DOT)
        dk1 = tl.zeros((BLOCK_N, D1), dtype=tl.float32)
        dv1 = tl.zeros((BLOCK_N, D1), dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    lo = 0
    if IS_CAUSAL:  # queries before (first key) - (Nk - Nq) cannot see any key of this block
        lo = tl.maximum(0, start_n * BLOCK_N - (Nk - Nq)) // BLOCK_M * BLOCK_M
    for g in range(0, group):
        h = hk * group + g
        Qb = Q + b * sqb + h * sqh
        DOb = DO + b * sdob + h * sdoh
        for start_m in range(lo, Nq, BLOCK_M):
            qm = start_m + offs_m
            m_ok = qm < Nq
            q0 = tl.load(Qb + qm[:, None] * sqn + d0[None, :], mask=m_ok[:, None] & (d0 < D)[None, :], other=0.0).to(DOT)
            do0 = tl.load(DOb + qm[:, None] * sdon + d0[None, :], mask=m_ok[:, None] & (d0 < D)[None, :], other=0.0).to(DOT)
            sT = tl.dot(k0, tl.trans(q0), input_precision=PRECISION)                # (BLOCK_N, BLOCK_M)
            if D1 > 0:
                q1 = tl.load(Qb + qm[:, None] * sqn + d1[None, :], mask=m_ok[:, None] & (d1 < D)[None, :], other=0.0).to(DOT)
                do1 = tl.load(DOb + qm[:, None] * sdon + d1[None, :], mask=m_ok[:, None] & (d1 < D)[None, :], other=0.0).to(DOT)
                sT += tl.dot(k1, tl.trans(q1), input_precision=PRECISION)
            lse = tl.load(LSE + (b * Hq + h) * Nq + qm, mask=m_ok, other=float("-inf"))
            valid = key_ok[:, None] & (lse > float("-inf"))[None, :]
            if IS_CAUSAL:
                valid = valid & (kn[:, None] <= qm[None, :] + (Nk - Nq))
            pT = tl.where(valid, tl.exp2(sT * qk_scale - lse[None, :] * 1.4426950408889634), 0.0)
            dv0 += tl.dot(pT.to(DOT), do0, input_precision=PRECISION)
            dpT = tl.dot(v0, tl.trans(do0), input_precision=PRECISION)              # (BLOCK_N, BLOCK_M)
            if D1 > 0:
                dv1 += tl.dot(pT.to(DOT), do1, input_precision=PRECISION)
                dpT += tl.dot(v1, tl.trans(do1), input_precision=PRECISION)
            delta = tl.load(DELTA + (b * Hq + h) * Nq + qm, mask=m_ok, other=0.0)
            dsT = (pT * (dpT - delta[None, :])).to(DOT)
            dk0 += tl.dot(dsT, q0, input_precision=PRECISION)
            if D1 > 0:
                dk1 += tl.dot(dsT, q1, input_precision=PRECISION)
    DKb = DK + b * sdkb + hk * sdkh
    DVb = DV + b * sdvb + hk * sdvh
    mask0 = n_ok[:, None] & (d0 < D)[None, :]
    tl.store(DKb + kn[:, None] * sdkn + d0[None, :], (dk0 * sm_scale).to(DK.dtype.element_ty), mask=mask0)
    tl.store(DVb + kn[:, None] * sdvn + d0[None, :], dv0.to(DV.dtype.element_ty), mask=mask0)
    if D1 > 0:
        mask1 = n_ok[:, None] & (d1 < D)[None, :]
        tl.store(DKb + kn[:, None] * sdkn + d1[None, :], (dk1 * sm_scale).to(DK.dtype.element_ty), mask=mask1)
        tl.store(DVb + kn[:, None] * sdvn + d1[None, :], dv1.to(DV.dtype.element_ty), mask=mask1)


@autotune(_DQ_CONFIGS, _INTERP_CONFIG,
          key=["NQ_BUCKET", "NK_BUCKET", "D", "IS_CAUSAL", "HAS_KPM"])
@triton.jit
def _attention_bwd_dq_kernel(
        Q, K, V, DO, LSE, DELTA, DQ, KPM,
        sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon, sdqb, sdqh, sdqn, skpm_b, skpm_n,
        Hq, Nq, Nk, group, sm_scale, NQ_BUCKET, NK_BUCKET,
        D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
        DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ of BLOCK_M queries of one head: recompute p, dp over the visible key blocks."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // Hq, bh % Hq
    hk = h // group
    qm = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    d0 = tl.arange(0, D0)
    m_ok = qm < Nq
    Qb = Q + b * sqb + h * sqh
    DOb = DO + b * sdob + h * sdoh
    Kb = K + b * skb + hk * skh
    Vb = V + b * svb + hk * svh
    q0 = tl.load(Qb + qm[:, None] * sqn + d0[None, :], mask=m_ok[:, None] & (d0 < D)[None, :], other=0.0).to(DOT)
    do0 = tl.load(DOb + qm[:, None] * sdon + d0[None, :], mask=m_ok[:, None] & (d0 < D)[None, :], other=0.0).to(DOT)
    dq0 = tl.zeros((BLOCK_M, D0), dtype=tl.float32)
    if D1 > 0:
        d1 = D0 + tl.arange(0, D1)
        q1 = tl.load(Qb + qm[:, None] * sqn + d1[None, :], mask=m_ok[:, None] & (d1 < D)[None, :], other=0.0).to(DOT)
        do1 = tl.load(DOb + qm[:, None] * sdon + d1[None, :], mask=m_ok[:, None] & (d1 < D)[None, :], other=0.0).to(DOT)
        dq1 = tl.zeros((BLOCK_M, D1), dtype=tl.float32)
    lse = tl.load(LSE + bh * Nq + qm, mask=m_ok, other=float("-inf"))
    delta = tl.load(DELTA + bh * Nq + qm, mask=m_ok, other=0.0)
    row_ok = lse > float("-inf")
    lse2 = tl.where(row_ok, lse * 1.4426950408889634, 0.0)
    qk_scale = sm_scale * 1.4426950408889634
    hi = Nk
    if IS_CAUSAL:
        hi = tl.minimum(Nk, (start_m + 1) * BLOCK_M + Nk - Nq)
    for start_n in range(0, hi, BLOCK_N):
        kn = start_n + offs_n
        n_ok = kn < Nk
        kT0 = tl.load(Kb + kn[None, :] * skn + d0[:, None], mask=n_ok[None, :] & (d0 < D)[:, None], other=0.0).to(DOT)
        vT0 = tl.load(Vb + kn[None, :] * svn + d0[:, None], mask=n_ok[None, :] & (d0 < D)[:, None], other=0.0).to(DOT)
        s = tl.dot(q0, kT0, input_precision=PRECISION)                            # (BLOCK_M, BLOCK_N)
        dp = tl.dot(do0, vT0, input_precision=PRECISION)
        if D1 > 0:
            kT1 = tl.load(Kb + kn[None, :] * skn + d1[:, None], mask=n_ok[None, :] & (d1 < D)[:, None], other=0.0).to(DOT)
            vT1 = tl.load(Vb + kn[None, :] * svn + d1[:, None], mask=n_ok[None, :] & (d1 < D)[:, None], other=0.0).to(DOT)
            s += tl.dot(q1, kT1, input_precision=PRECISION)
            dp += tl.dot(do1, vT1, input_precision=PRECISION)
        valid = n_ok[None, :] & row_ok[:, None]
        if IS_CAUSAL:
            valid = valid & (kn[None, :] <= qm[:, None] + (Nk - Nq))
        if HAS_KPM:
            keep = tl.load(KPM + b * skpm_b + kn * skpm_n, mask=n_ok, other=0)
            valid = valid & (keep != 0)[None, :]
        p = tl.where(valid, tl.exp2(s * qk_scale - lse2[:, None]), 0.0)
        ds = (p * (dp - delta[:, None])).to(DOT)
        dq0 += tl.dot(ds, tl.trans(kT0), input_precision=PRECISION)
        if D1 > 0:
            dq1 += tl.dot(ds, tl.trans(kT1), input_precision=PRECISION)
    DQb = DQ + b * sdqb + h * sdqh
    tl.store(DQb + qm[:, None] * sdqn + d0[None, :], (dq0 * sm_scale).to(DQ.dtype.element_ty),
             mask=m_ok[:, None] & (d0 < D)[None, :])
    if D1 > 0:
        tl.store(DQb + qm[:, None] * sdqn + d1[None, :], (dq1 * sm_scale).to(DQ.dtype.element_ty),
                 mask=m_ok[:, None] & (d1 < D)[None, :])


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


def _meta(q, k, causal, has_kpm):
    D = q.shape[-1]
    D0, D1 = split_head_dim(D)
    return dict(D=D, D0=D0, D1=D1, IS_CAUSAL=causal, HAS_KPM=has_kpm, DOT=compute_dtype(q.dtype),
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                   causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """o (B, Hq, Nq, D) in q.dtype (stored heads-last) and lse (B, Hq, Nq) fp32, natural log."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    o = _heads_last_like(B, Hq, Nq, D, q.dtype, q.device)
    lse = empty((B, Hq, Nq), torch.float32, q.device)
    kpm, skpm_b, skpm_n, has_kpm = _kpm_args(key_padding_mask, q.device)
    grid = lambda meta: (triton.cdiv(Nq, meta["BLOCK_M"]), B * Hq)  # noqa: E731
    with device_guard(q):
        _attention_fwd_kernel[grid](
            q, k, v, o, lse, kpm, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
            skpm_b, skpm_n, Hq, Nq, Nk, Hq // Hkv, scale * LOG2E, next_pow2(Nq), next_pow2(Nk),
            **_meta(q, k, causal, has_kpm))
    return o, lse


def _attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                   lse: torch.Tensor, key_padding_mask: Optional[torch.Tensor], causal: bool, scale: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    if do.stride(-1) != 1:
        do = do.contiguous()
    delta = empty((B, Hq, Nq), torch.float32, q.device)
    dq = _heads_last_like(B, Hq, Nq, D, q.dtype, q.device)
    dk = _heads_last_like(B, Hkv, Nk, D, k.dtype, k.device)
    dv = _heads_last_like(B, Hkv, Nk, D, v.dtype, v.device)
    kpm, skpm_b, skpm_n, has_kpm = _kpm_args(key_padding_mask, q.device)
    meta = _meta(q, k, causal, has_kpm)
    BLOCK_DELTA = 64 if INTERPRET else 32
    with device_guard(q):
        _attention_bwd_delta_kernel[(triton.cdiv(Nq, BLOCK_DELTA), B * Hq)](
            o, do, delta, *o.stride()[:3], *do.stride()[:3], Hq, Nq, D=D, DP=max(16, next_pow2(D)),
            BLOCK_M=BLOCK_DELTA)
        _attention_bwd_dkdv_kernel[lambda m: (triton.cdiv(Nk, m["BLOCK_N"]), B * Hkv)](
            q, k, v, do, lse, delta, dk, dv, kpm, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3], skpm_b, skpm_n,
            Hq, Hkv, Nq, Nk, Hq // Hkv, scale, next_pow2(Nq), next_pow2(Nk), **meta)
        _attention_bwd_dq_kernel[lambda m: (triton.cdiv(Nq, m["BLOCK_M"]), B * Hq)](
            q, k, v, do, lse, delta, dq, kpm, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            *do.stride()[:3], *dq.stride()[:3], skpm_b, skpm_n,
            Hq, Nq, Nk, Hq // Hkv, scale, next_pow2(Nq), next_pow2(Nk), **meta)
    return dq, dk, dv


attention_fwd, attention_bwd = custom_ops.define("attention", "triton", _attention_fwd, _attention_bwd)


def attention(q, k, v, *, causal=False, key_padding_mask=None, scale=None):
    """Triton backend of kernels.attention (shapes already checked by kernels.attention)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_dtype(name, t)
    check_last_dim_contiguous(q=q, k=k, v=v)
    D = q.shape[-1]
    if D > MAX_HEAD_DIM:
        raise ValueError(f"triton attention supports head dims up to {MAX_HEAD_DIM}, got {D}")
    scale = D ** -0.5 if scale is None else float(scale)
    if q.numel() == 0 or k.shape[2] == 0:  # nothing to launch; the reference gives the (empty/zero) result
        return ref.attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    return attention_fwd(q, k, v, key_padding_mask, causal, scale)[0]


register("attention", "triton", attention)
