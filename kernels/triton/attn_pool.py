"""Attention pooling (InternVideo2 `clip_projector`) in Triton, forward and backward, without ever forming
K or V. Spec: kernels/ref.py::attn_pool.

    x (B, N, C); query = LN_q(mean_j x_j) Wq^T + bq; k_j = LN_k(x_j) Wk^T + bk; v_j = LN_v(x_j) Wv^T + bv
    per head h (d = C/H): p_h = softmax_j(q_h . k_jh / sqrt(d)); out = concat_h(sum_j p_jh v_jh) Wo^T + bo

The fold. With one query per head, both projections move off the N tokens. Let xhat_j = (x_j - mu_j) * rstd_j
be the LayerNorm-normalised row before its affine (shared by LN_k and LN_v), gamma/beta the LN weights:
    u_h  = Wk_h^T q_h                  (C,)   Wk_h = rows h*d:(h+1)*d of Wk
    a_h  = gamma_k * u_h / sqrt(d)     (C,)   s_jh = xhat_j . a_h  + (a per-(b, h) constant: cancels)
    p_jh = softmax_j(s_jh);            z_h = sum_j p_jh xhat_j         (C,)   (sum_j p_jh = 1)
    o_h  = Wv_h (gamma_v * z_h + beta_v) + bv_h;     out = concat_h(o_h) Wo^T + bo
So the only work proportional to N is: row statistics of x, S = Xhat A^T (N x H) and Z = P^T Xhat (H x C).
Everything else is O(B C^2) and runs in torch (fp32, kernels/attn_pool_math.py, shared with the CUDA
backend). beta_k and bk only add the cancelling constant: their gradient is exactly zero.

Kernels (x is read as stored; statistics and accumulators fp32; grids put the blocks of one sample next
to each other so its small operand stays in L2):
  _attn_pool_rowdot_kernel  grid (N blocks, B). One pass over C in BLOCK_C chunks: the row mean and M2
      (Chan's chunk merge: one pass, no E[x^2] - E[x]^2 cancellation) and R = X M^T with tl.dot on the *raw*
      x tile; then S = rstd * (R - mu * rowsum(M)). Writes S (B, N, K) and mu, rstd (B, N), fp32.
      Forward: M = A (K = H); backward: M = [dZ; A] (K = 2H), giving dP = Xhat dZ^T and S in one pass.
  _attn_pool_colsum_kernel  grid (C blocks, B). Loops over N: acc (K, BLOCK_C) += W^T X with W = P * rstd,
      minus sum_j W_jk mu_j: Z = P^T Xhat. Forward: P -> Z; backward: dS -> dA.
  _attn_pool_bwd_dx_kernel  grid (N blocks, B). One pass over C: dxhat = G M with G = [P, dS] (N x 2H),
      M = [dZ; A] (2H x C), then the LayerNorm backward dx = rstd (dxhat - c1 - xhat c2) + dxbar / N.
      Its two row means need no extra pass over C: c1 = mean_c(dxhat) = G . rowsum(M) / C and
      c2 = mean_c(dxhat * xhat) = (sum_h P dP + dS S) / C, from the rowdot outputs (tiny torch).
Head counts below 16 are padded to BLOCK_K = 16 (tl.dot needs every dim >= 16 on a GPU).
Precision of the dots. Raw x (not xhat) goes into them because x is exact in its own dtype, while xhat
would be rounded to fp16/bf16 again; the mean is taken off afterwards in fp32. The other operand (A, dZ,
P * rstd, G) is fp32 and is split into hi + lo in x's dtype, one tensor-core dot each ("SPLIT"): that
keeps ~22 (fp16) or 16 (bf16) significand bits where it matters, e.g. the scores, for 2-3x the dot
FLOPs of a memory-bound kernel. Results stay at output rounding (without the split fp16 loses ~10x on
sharp softmaxes, see the tests). fp32 inputs use plain fp32 dots (input_precision="ieee", not tf32).
Limits: with raw x, fp32 loses about |mean|/std of a token times fp32 rounding, as any fp32 LayerNorm
does (at |mean| = 50 std this backend is within 3x of kernels.ref run in fp32); fp16 lo parts below 6e-5
are subnormal and keep fewer bits.

Backward in full (dout (B, out)): torch does do, dWo, dbo, dWv, dbv, dgamma_v, dbeta_v and dZ; rowdot gives
dP (and S, P = softmax(S): nothing of size N is saved by the forward); dS = P (dP - sum_j P dP);
colsum gives dA = dS^T Xhat, from which dgamma_k, dWk and dq (then dWq, dbq, dgamma_q, dbeta_q and
dxbar, by hand); the dx kernel adds it all up. Forward saves only xbar (B, C) and Z (B, H, C).

Napkin math, 1B shape (B=32, C=1408, H=16, d=88, out 768), bf16 x = B*N*C*2 bytes (37.6 MB at N=417,
185 MB at N=2049). Unfused module: K and V projections 2 * 2BNC^2 FLOPs, and x/LN/K/V round trips
(mean, LN_k, LN_v read x; k_in, v_in written and read; K, V written and read) ~ 11 passes of x's size.
This module: x read 3x forward (mean, rowdot, colsum), 3x backward + dx written; dot FLOPs counted as
issued (hi + lo split), O(B C^2) torch parts ~0.5 GFLOP.
                      N=417                          N=2049
    unfused fwd   106 GFLOP, 0.43 GB            521 GFLOP, 2.04 GB   (+ 4 saved N x C activations)
    this fwd      3.0 GFLOP, 0.12 GB            13 GFLOP, 0.57 GB
    ratio         35x FLOPs, 3.4x bytes         40x FLOPs, 3.6x bytes
    unfused bwd   212 GFLOP                     1040 GFLOP
    this bwd      8.3 GFLOP, 0.15 GB            37 GFLOP, 0.74 GB
So this is memory bound (~25 FLOP/byte forward, ~50 backward; an H200 turns over at ~200): at ~4.8 TB/s
the N=2049 forward is ~0.12 ms, against ~0.7 ms for the unfused projection GEMMs alone at ~700 TFLOP/s.
Not done (a possible v2): one forward pass with a split-N online softmax (flash-decoding style partials
of Z) would save one read of x; fusing dA into the dx pass one more in the backward.

Test: pytest tests/test_attn_pool.py       Benchmark: python -m kernels.bench attn_pool
"""
from types import SimpleNamespace

import torch
import triton
import triton.language as tl

from .. import attn_pool_math, custom_ops, ref, register
from ..common import check_dtype, check_last_dim_contiguous, device_guard, empty, next_pow2
from .utils import autotune, compute_dtype


def _configs(*tiles):
    return [triton.Config({"BLOCK_N": n, "BLOCK_C": c}, num_warps=w, num_stages=s) for n, c, w, s in tiles]


# GPU tiles (BLOCK_N, BLOCK_C, warps, stages): these streaming kernels are memory bound, so the lists only
# hold tiles that compile without register spills on sm_90 for fp16/bf16/fp32 and 2H = 32 (checked offline
# with triton.compile + cuobjdump --dump-resource-usage; 4 warps on 64 x 64 tiles spill). Under the
# interpreter (~1.5 ms per program and per loop step) one big tile covers a test shape.
_ROWDOT_CONFIGS = _configs((64, 64, 8, 3), (128, 32, 8, 3), (64, 32, 8, 3), (32, 64, 8, 3))
_COLSUM_CONFIGS = _configs((64, 64, 4, 3), (64, 64, 8, 2), (64, 128, 8, 2))
_DX_CONFIGS = _configs((64, 64, 8, 3), (128, 32, 8, 3), (64, 32, 8, 3), (32, 64, 8, 3))
_INTERP_CONFIG = triton.Config({"BLOCK_N": 128, "BLOCK_C": 128})


@triton.jit
def _split(v, DOT: tl.constexpr):
    """fp32 v ~ hi + lo, both in the dot dtype: 22 significand bits from fp16 (11 + 11), 16 from bf16."""
    hi = v.to(DOT)
    return hi, (v - hi.to(tl.float32)).to(DOT)


@autotune(_ROWDOT_CONFIGS, _INTERP_CONFIG, key=["N", "C", "K"])
@triton.jit
def _attn_pool_rowdot_kernel(X, M, S, MU, RSTD, N, C, K, stride_xb, stride_xn, eps,
                             DOT: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
                             BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """S[b] = Xhat[b] M[b]^T (N, K) and the row statistics of x[b]; M (B, K, C) fp32 contiguous."""
    pid_n, b = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok, k_ok = rows < N, ks < K
    Xb = X + b.to(tl.int64) * stride_xb
    Mb = M + b.to(tl.int64) * K * C
    mean = tl.zeros((BLOCK_N,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_N,), dtype=tl.float32)          # sum of squared deviations from the mean
    seen = 0.0                                           # columns merged so far
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # raw X M^T
    msum = tl.zeros((BLOCK_K,), dtype=tl.float32)         # rowsum(M)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        x = tl.load(Xb + rows[:, None] * stride_xn + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        mT = tl.load(Mb + ks[None, :] * C + cols[:, None], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        m_hi, m_lo = _split(mT, DOT)                                           # (BLOCK_C, BLOCK_K)
        acc += tl.dot(x.to(DOT), m_hi, input_precision=PRECISION)              # (BLOCK_N, BLOCK_K)
        if SPLIT:
            acc += tl.dot(x.to(DOT), m_lo, input_precision=PRECISION)
        msum += tl.sum(mT, axis=0)
        # merge this chunk's (mean, M2) into the running ones (Chan, Golub & LeVeque)
        xf = x.to(tl.float32)
        cnt = tl.sum(col_ok.to(tl.float32), axis=0)
        cmean = tl.sum(xf, axis=1) / cnt
        dev = tl.where(col_ok[None, :], xf - cmean[:, None], 0.0)
        delta = cmean - mean
        total = seen + cnt
        mean += delta * (cnt / total)
        m2 += tl.sum(dev * dev, axis=1) + delta * delta * (seen * cnt / total)
        seen = total
    rstd = 1.0 / tl.sqrt(m2 / C + eps)
    s = rstd[:, None] * (acc - mean[:, None] * msum[None, :])      # = Xhat M^T
    out_rows = b.to(tl.int64) * N + rows
    tl.store(S + out_rows[:, None] * K + ks[None, :], s, mask=row_ok[:, None] & k_ok[None, :])
    tl.store(MU + out_rows, mean, mask=row_ok)
    tl.store(RSTD + out_rows, rstd, mask=row_ok)


@autotune(_COLSUM_CONFIGS, _INTERP_CONFIG, key=["N", "C", "K"])
@triton.jit
def _attn_pool_colsum_kernel(X, P, MU, RSTD, Z, N, C, K, stride_xb, stride_xn,
                             DOT: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
                             BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """Z[b] = P[b]^T Xhat[b] (K, C); P (B, N, K) fp32 contiguous, mu/rstd (B, N) from the rowdot kernel."""
    pid_c, b = tl.program_id(0), tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    ks = tl.arange(0, BLOCK_K)
    col_ok, k_ok = cols < C, ks < K
    Xb = X + b.to(tl.int64) * stride_xb
    Pb = P + b.to(tl.int64) * N * K
    acc = tl.zeros((BLOCK_K, BLOCK_C), dtype=tl.float32)   # W^T X, W = P * rstd
    corr = tl.zeros((BLOCK_K,), dtype=tl.float32)          # W^T mu
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        mu = tl.load(MU + b.to(tl.int64) * N + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + b.to(tl.int64) * N + rows, mask=row_ok, other=0.0)
        pT = tl.load(Pb + rows[None, :] * K + ks[:, None], mask=k_ok[:, None] & row_ok[None, :], other=0.0)
        wT = pT * rstd[None, :]                                                # (BLOCK_K, BLOCK_N)
        w_hi, w_lo = _split(wT, DOT)
        x = tl.load(Xb + rows[:, None] * stride_xn + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.dot(w_hi, x.to(DOT), input_precision=PRECISION)
        if SPLIT:
            acc += tl.dot(w_lo, x.to(DOT), input_precision=PRECISION)
        corr += tl.sum(wT * mu[None, :], axis=1)
    z = acc - corr[:, None]                                # sum_j P_jk rstd_j (x_j - mu_j)
    Zb = Z + b.to(tl.int64) * K * C
    tl.store(Zb + ks[:, None] * C + cols[None, :], z, mask=k_ok[:, None] & col_ok[None, :])


@autotune(_DX_CONFIGS, _INTERP_CONFIG, key=["N", "C", "K"])
@triton.jit
def _attn_pool_bwd_dx_kernel(X, G, M, MU, RSTD, C1, C2, R, DX, N, C, K, stride_xb, stride_xn,
                             DOT: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
                             BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx = rstd (G M - c1 - xhat c2) + r: G (B, N, K), M (B, K, C), c1, c2 (B, N), r (B, C); all fp32."""
    pid_n, b = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok, k_ok = rows < N, ks < K
    Xb = X + b.to(tl.int64) * stride_xb
    Mb = M + b.to(tl.int64) * K * C
    brows = b.to(tl.int64) * N + rows
    g = tl.load(G + brows[:, None] * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    g_hi, g_lo = _split(g, DOT)                                                # (BLOCK_N, BLOCK_K)
    mu = tl.load(MU + brows, mask=row_ok, other=0.0)
    rstd = tl.load(RSTD + brows, mask=row_ok, other=0.0)
    c1 = tl.load(C1 + brows, mask=row_ok, other=0.0)
    c2 = tl.load(C2 + brows, mask=row_ok, other=0.0)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        mask = row_ok[:, None] & col_ok[None, :]
        m = tl.load(Mb + ks[:, None] * C + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        m_hi, m_lo = _split(m, DOT)                                            # (BLOCK_K, BLOCK_C)
        dxhat = tl.dot(g_hi, m_hi, input_precision=PRECISION)                  # (BLOCK_N, BLOCK_C)
        if SPLIT:  # both operands are rounded here; lo x lo is below fp32 rounding
            dxhat += tl.dot(g_hi, m_lo, input_precision=PRECISION)
            dxhat += tl.dot(g_lo, m_hi, input_precision=PRECISION)
        x = tl.load(Xb + rows[:, None] * stride_xn + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        xhat = (x - mu[:, None]) * rstd[:, None]
        r = tl.load(R + b.to(tl.int64) * C + cols, mask=col_ok, other=0.0)
        dx = rstd[:, None] * (dxhat - c1[:, None] - xhat * c2[:, None]) + r[None, :]
        tl.store(DX + brows[:, None] * C + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# launchers (the kernels are called from inside the two custom ops below)

def _meta(x, K):
    dot = compute_dtype(x.dtype)   # fp32 input: plain fp32 dots ("ieee", not tf32), nothing to split
    return dict(DOT=dot, SPLIT=dot != tl.float32, PRECISION="ieee" if dot == tl.float32 else "tf32",
                BLOCK_K=max(16, next_pow2(K)))


def _rowdot(x, m, eps):
    """x (B, N, C), m (B, K, C) -> s = xhat m^T (B, N, K), mu (B, N), rstd (B, N); all fp32."""
    B, N, C = x.shape
    K = m.shape[1]
    m = m.float().contiguous()
    s = empty((B, N, K), torch.float32, x.device)
    mu, rstd = empty((B, N), torch.float32, x.device), empty((B, N), torch.float32, x.device)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), B)  # noqa: E731
    with device_guard(x):
        _attn_pool_rowdot_kernel[grid](x, m, s, mu, rstd, N, C, K, x.stride(0), x.stride(1), eps, **_meta(x, K))
    return s, mu, rstd


def _colsum(x, p, mu, rstd):
    """x (B, N, C), p (B, N, K) -> p^T xhat (B, K, C) fp32."""
    B, N, C = x.shape
    K = p.shape[2]
    p = p.float().contiguous()
    z = empty((B, K, C), torch.float32, x.device)
    grid = lambda meta: (triton.cdiv(C, meta["BLOCK_C"]), B)  # noqa: E731
    with device_guard(x):
        _attn_pool_colsum_kernel[grid](x, p, mu, rstd, z, N, C, K, x.stride(0), x.stride(1), **_meta(x, K))
    return z


def _dx(x, g, m, mu, rstd, c1, c2, r):
    """rstd (g m - c1 - xhat c2) + r (B, N, C) in x.dtype; g (B, N, K), m (B, K, C), c1/c2 (B, N), r (B, C)."""
    B, N, C = x.shape
    K = g.shape[2]
    dx = empty((B, N, C), x.dtype, x.device)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), B)  # noqa: E731
    with device_guard(x):
        _attn_pool_bwd_dx_kernel[grid](x, g, m, mu, rstd, c1, c2, r, dx, N, C, K, x.stride(0), x.stride(1),
                                       **_meta(x, K))
    return dx


_OPS = SimpleNamespace(rowdot=_rowdot, colsum=_colsum, dx=_dx)


def _attn_pool_fwd(x: torch.Tensor, ln_q_w: torch.Tensor, ln_q_b: torch.Tensor, ln_k_w: torch.Tensor,
                   ln_k_b: torch.Tensor, ln_v_w: torch.Tensor, ln_v_b: torch.Tensor, wq: torch.Tensor,
                   bq: torch.Tensor, wk: torch.Tensor, bk: torch.Tensor, wv: torch.Tensor, bv: torch.Tensor,
                   wo: torch.Tensor, bo: torch.Tensor, num_heads: int, eps: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """out (B, out_dim) in x.dtype; for the backward xbar (B, C) and z (B, H, C), fp32."""
    return attn_pool_math.forward(_OPS, x, ln_q_w, ln_q_b, ln_k_w, ln_k_b, ln_v_w, ln_v_b, wq, bq, wk, bk, wv, bv, wo, bo,
                                  num_heads, eps)


def _attn_pool_bwd(dout: torch.Tensor, x: torch.Tensor, ln_q_w: torch.Tensor, ln_q_b: torch.Tensor,
                   ln_k_w: torch.Tensor, ln_k_b: torch.Tensor, ln_v_w: torch.Tensor, ln_v_b: torch.Tensor,
                   wq: torch.Tensor, bq: torch.Tensor, wk: torch.Tensor, bk: torch.Tensor, wv: torch.Tensor,
                   bv: torch.Tensor, wo: torch.Tensor, bo: torch.Tensor, xbar: torch.Tensor, z: torch.Tensor,
                   num_heads: int, eps: float) -> list[torch.Tensor]:
    """Gradients of the 15 inputs, in the order of attn_pool's arguments, each in its input's dtype."""
    return attn_pool_math.backward(_OPS, dout, x, ln_q_w, ln_q_b, ln_k_w, ln_k_b, ln_v_w, ln_v_b, wq, bq, wk, bk, wv, bv,
                                   wo, bo, xbar, z, num_heads, eps)


attn_pool_fwd, attn_pool_bwd = custom_ops.define("attn_pool", "triton", _attn_pool_fwd, _attn_pool_bwd)


def attn_pool(x, ln_q_w, ln_q_b, ln_k_w, ln_k_b, ln_v_w, ln_v_b, wq, bq, wk, bk, wv, bv, wo, bo,
              *, num_heads, eps=1e-5):
    """Triton backend of kernels.attn_pool (shapes already checked by kernels.attn_pool)."""
    params = dict(ln_q_w=ln_q_w, ln_q_b=ln_q_b, ln_k_w=ln_k_w, ln_k_b=ln_k_b, ln_v_w=ln_v_w, ln_v_b=ln_v_b,
                  wq=wq, bq=bq, wk=wk, bk=bk, wv=wv, bv=bv, wo=wo, bo=bo)
    check_dtype("x", x)
    for name, t in params.items():
        check_dtype(name, t)
    check_last_dim_contiguous(x=x)   # only x reaches a kernel; the parameters go through torch
    if x.numel() == 0:  # nothing to launch; the reference returns the (empty) result with autograd
        return ref.attn_pool(x, *params.values(), num_heads=num_heads, eps=eps)
    return attn_pool_fwd(x, *params.values(), int(num_heads), float(eps))[0]


register("attn_pool", "triton", attn_pool)
