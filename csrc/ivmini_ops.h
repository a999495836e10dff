// ivmini CUDA backend: the entry points of the four ops, as bindings.cpp exposes them to Python.
//
// Torch-free on purpose: every function takes raw device pointers, sizes and strides (in elements,
// not bytes) and the CUDA stream, so the extension builds with nvcc alone (no GPU, no CUDA build of
// torch). All argument checking (shapes, dtypes, devices, contiguity) happens in kernels/cuda/ops.py;
// these functions trust their arguments. Each returns cudaSuccess or the first CUDA error
// (launch errors are read with cudaGetLastError right after each launch).
//
// Dtype codes (kernels/cuda/ops.py maps torch dtypes to them): 0 = fp32, 1 = fp16, 2 = bf16. Within one
// call every tensor argument of "the dtype" shares it; statistics and workspaces are fp32.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace ivmini {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// ---------------------------------------------------------------------------------------------
// attention (attention.cu): o = softmax(q k^T * scale + bias + mask) v, see kernels/ref.py::attention.
// q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D), Hq % Hkv == 0 (query head h reads kv head h / (Hq / Hkv)).
// Strides are [batch, head, token]; the head dim is contiguous. dtype fp16 or bf16; D % 8 == 0, D <= 128.
// Every pointer 16-byte aligned and every stride of a dim longer than 1 a multiple of 8 elements (the
// kernels move rows with 16-byte cp.async and stores); B and Hq <= 65535 (grid limits). Otherwise the
// call returns cudaErrorInvalidValue without launching.
// bias: optional fp32 (B, Hq, Nq, Nk) with any element strides (0 for a broadcast dim), added to the scaled
// scores before the mask; -inf entries are allowed. Its gradient dbias = dS = P * (dP - delta) is written,
// when asked for, to a contiguous fp32 (B, Hq, Nq, Nk) buffer, every element (0 where masked).
// mask: keys j >= Nk, causal bottom-right (query i sees keys j <= i + Nk - Nq), kpm[b, j] == 0.
// A query row with no visible key (masked, or a -inf bias on every visible key) gets o = 0 and lse = -inf
// (and zero gradients).
struct AttnParams {
  int dtype = kFloat16;
  int B = 0, Hq = 0, Hkv = 0, Nq = 0, Nk = 0, D = 0;
  float scale = 1.f;
  bool causal = false;
  const void *q = nullptr, *k = nullptr, *v = nullptr;
  int64_t q_stride[3] = {0, 0, 0}, k_stride[3] = {0, 0, 0}, v_stride[3] = {0, 0, 0};
  const uint8_t *kpm = nullptr;       // key padding mask (B, Nk) as bytes, 1 = keep; nullptr = none
  int64_t kpm_stride = 0;             // batch stride of kpm (its token stride is 1)
  void *o = nullptr;                  // forward output (and backward input), same layout rules
  int64_t o_stride[3] = {0, 0, 0};
  float *lse = nullptr;               // (B, Hq, Nq) contiguous: natural-log sum-exp of the biased, masked scores
  const float *bias = nullptr;        // (B, Hq, Nq, Nk) fp32 additive bias; nullptr = none
  int64_t bias_stride[4] = {0, 0, 0, 0};   // [batch, head, query, key] in elements; 0 for broadcast dims
  // backward only
  const void *dout = nullptr;
  int64_t dout_stride[3] = {0, 0, 0};
  float *delta = nullptr;             // (B, Hq, Nq) contiguous fp32 workspace: rowsum(dout * o)
  void *dq = nullptr, *dk = nullptr, *dv = nullptr;   // outputs, every element written
  int64_t dq_stride[3] = {0, 0, 0}, dk_stride[3] = {0, 0, 0}, dv_stride[3] = {0, 0, 0};
  float *dbias = nullptr;             // (B, Hq, Nq, Nk) contiguous fp32 output, or nullptr = no bias gradient wanted
};
cudaError_t attention_fwd(const AttnParams &p, cudaStream_t stream);   // writes o, lse
// reads q, k, v, o, lse, dout (and bias); writes delta, dq, dk, dv (and dbias)
cudaError_t attention_bwd(const AttnParams &p, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// rms_norm (rms_norm.cu), see kernels/ref.py::rms_norm: y = w * cast(x * rstd), rstd = rsqrt(mean(x^2) + eps).
// x, y, dy, dx: (rows, width) with a row stride; w (width,) contiguous; all of the dtype (w already cast).
struct RmsNormParams {
  int dtype = kFloat32;
  int64_t rows = 0;
  int width = 0;
  float eps = 1e-6f;
  const void *x = nullptr, *w = nullptr;
  int64_t x_stride = 0;
  void *y = nullptr;                  // forward output
  int64_t y_stride = 0;
  float *rstd = nullptr;              // (rows,) fp32: written by the forward, read by the backward
  // backward only
  const void *dy = nullptr;
  int64_t dy_stride = 0;
  void *dx = nullptr;
  int64_t dx_stride = 0;
  float *dw_partial = nullptr;        // (num_partials, width) fp32: block p sums dy * cast(xhat) over its rows
  int num_partials = 0;               // the caller adds the partials up (deterministic, no atomics)
};
cudaError_t rms_norm_fwd(const RmsNormParams &p, cudaStream_t stream);
cudaError_t rms_norm_bwd(const RmsNormParams &p, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// masked_gather (masked_gather.cu), see kernels/ref.py::masked_gather and kernels/triton/masked_gather.py.
// Forward: out[l, b, k, :] = x[l, b, idx[b, k], :] (+ pos[idx[b, k], :]), added in fp32, rounded once.
// Backward: dx[l, b, n, :] = dout[l, b, inv[b, n], :] or 0 when inv[b, n] < 0; dpos[n, :] = sum over l, b.
// L layers share the indices (L = 1 for a 3-D x). Strides: [layer, batch, token]; channels contiguous.
struct GatherParams {
  int dtype = kFloat32;
  int L = 1, B = 0, N = 0, K = 0, C = 0;
  const void *x = nullptr;            // (L, B, N, C)
  int64_t x_stride[3] = {0, 0, 0};
  const int64_t *idx = nullptr;       // (B, K) visible token indices (out-of-range ones give zero rows)
  int64_t idx_stride[2] = {0, 0};
  const void *pos = nullptr;          // (N, C) positional embedding in the dtype, or nullptr
  int64_t pos_stride = 0;
  void *out = nullptr;                // (L, B, K, C)
  int64_t out_stride[3] = {0, 0, 0};
  // backward only
  const void *dout = nullptr;         // (L, B, K, C)
  int64_t dout_stride[3] = {0, 0, 0};
  const int32_t *inv = nullptr;       // (B, N) contiguous: slot k of token n in sample b, or -1 if dropped
  void *dx = nullptr;                 // (L, B, N, C), every element written
  int64_t dx_stride[3] = {0, 0, 0};
  float *dpos = nullptr;              // (N, C) contiguous fp32, or nullptr when no pos-embed gradient is wanted
};
cudaError_t masked_gather_fwd(const GatherParams &p, cudaStream_t stream);
cudaError_t masked_gather_bwd(const GatherParams &p, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// attn_pool (attn_pool.cu): the three token-streaming kernels of the no-K/V attention pooling; the
// O(B C^2) parts run in torch (kernels/cuda/ops.py, the same algebra as kernels/triton/attn_pool.py's header).
// x (B, N, C) of the dtype, strides [batch, token], channels contiguous; everything else fp32 contiguous.
// B <= 65535 (grid limit).
//   rowdot:  mu, rstd (B, N) = LayerNorm statistics of each row of x (biased variance, + eps);
//            s (B, N, K) = xhat m^T with xhat = (x - mu) * rstd and m (B, K, C)
//   colsum:  z (B, K, C) = p^T xhat with p (B, N, K) and the mu/rstd from rowdot
//   dx:      dx (B, N, C) contiguous, of the dtype = rstd * (g m - c1 - xhat * c2) + r
//            with g (B, N, K), m (B, K, C), c1/c2 (B, N), r (B, C)
struct PoolParams {
  int dtype = kFloat32;
  int B = 0, N = 0, C = 0, K = 0;
  float eps = 1e-5f;
  const void *x = nullptr;
  int64_t x_stride[2] = {0, 0};
  const float *m = nullptr, *p = nullptr, *g = nullptr, *c1 = nullptr, *c2 = nullptr, *r = nullptr;
  float *s = nullptr, *z = nullptr;
  float *mu = nullptr, *rstd = nullptr;   // written by rowdot, read by colsum and dx
  void *dx = nullptr;
};
cudaError_t attn_pool_rowdot(const PoolParams &p, cudaStream_t stream);
cudaError_t attn_pool_colsum(const PoolParams &p, cudaStream_t stream);
cudaError_t attn_pool_dx(const PoolParams &p, cudaStream_t stream);

}  // namespace ivmini
