// The three token-streaming kernels of the no-K/V attention pooling (the algebra is in the header of
// kernels/triton/attn_pool.py; the O(B C^2) rest runs in torch, kernels/attn_pool_math.py). Per sample b, with x (N, C)
// of the dtype, xhat = (x - mu) * rstd its LayerNorm-normalised rows (biased variance, + eps), and every
// other tensor fp32:
//
//   rowdot  mu, rstd (N,)  and  s (N, K) = xhat m^T           m (K, C)
//   colsum  z (K, C) = p^T xhat                               p (N, K), mu/rstd from rowdot
//   dx      dx (N, C) = rstd * (g m - c1 - xhat * c2) + r      g (N, K), m (K, C), c1/c2 (N,), r (C,); dtype
//
// All three are GEMMs with one small side K (16 or 32 at the 1B model, 25 or 50 at 6B), streaming x once.
// Why tensor cores: bf16 x is 2 bytes per element and rowdot/colsum do K FMAs per element, so K = 16
// is 16 FLOP per byte, above the ridge of fp32 CUDA cores (67 TFLOP/s / 4.8 TB/s = 14 on an H200):
// an FMA version would be compute bound at 1.5-3x the memory time. So fp16/bf16 x goes through
// mma.sync.m16n8k16 (fp32 accumulate) on x as stored (exact) and the fp32 operand split into hi + lo
// in x's dtype, one mma each (dx splits both operands: hi*hi + hi*lo + lo*hi), as kernels/triton/attn_pool.py
// does: ~16 (bf16) or ~22 (fp16) significand bits where it matters. fp32 x runs plain fp32 FMA kernels
// (exact fp32, like Triton's "ieee" dots; fp32 x is 4 bytes per element, so K = 16 is near the ridge).
// Raw x (not xhat) goes into the products, the mean comes off afterwards in fp32: s = rstd (x m^T -
// mu rowsum(m)), z = (p rstd)^T x - (p rstd)^T mu.
//
// Fragment tricks (m16n8k16: A 16x16 row-major, B 16x8 col-major; lane = 4 g + t). A dot is unchanged
// when its summation index is permuted the same way in A and B, and so is a product when the columns of
// B and D are: the lanes load 8/16-byte runs of x and the fragment mapping is arranged around them.
//   rowdot  A = x rows, reduction = channels: lane (g, t) loads x[row g and g+8][c0+8t .. c0+8t+7];
//           channels c0+8t+0..3 are its slots {2t, 2t+1, 2t+8, 2t+9} of a first k16 step, +4..7 of a
//           second, and B = m row k (column g of an n-tile) is loaded with the same mapping.
//   colsum  B = x, reduction = tokens: lane (g, t) loads tokens n0+2t, +1, +8, +9 at NC channels cb+NC g ..;
//           channel cb+NC g+i is column g of n-tile i (NC n-tiles), a byte permute pairs the two tokens
//           of each register, and the lane's D values come out as z[k][cb+2NC t .. +2NC-1].
//   dx      B = m, reduction = k: the colsum channel mapping (NC = 4), so a lane's dxhat values are 8
//           consecutive channels cb+8t .. +7 of each of its rows: x and dx move in 16-byte runs.
//
// Tiling (the blocks of one sample are next to each other in the grid, so its m / p / g stay in L2):
//   rowdot  block = a tile of 16 mt rows x 8 NT columns k (NT = 2/4/8 for K <= 16/32/64, mt <= 2, 1
//           for NT = 8); its W warps split C in 32-channel steps, then add their partial tiles and merge
//           their row statistics (Chan) through shared memory in a fixed order. Grid (N/16mt, B, K/8NT).
//   colsum  block = 8 NC channels x 16 MK rows k (MK = 1, NC = 8 for K <= 16; MK = 2, NC = 4 above);
//           W warps split N in 16-token steps, added in a fixed order in shared memory. Grid
//           (C / 8NC, B, K / 16MK).
//   dx      warp = 16 mt rows x 32 channels (mt <= 2), K looped in steps of 16; 4 warps per block on
//           consecutive row tiles. Grid (N / 64mt, C / 32, B).
//   fp32    lanes split the channels, 4 each (float4): rowdot a warp per 2 rows x 16 k, colsum a block
//           per 128 channels x 16 k with W warps splitting N, dx a warp per 8 rows x 128 channels.
// W = 4 warps, or 8 (rowdot) / 16 (colsum) and mt = 1 when the grid would have fewer than 2 blocks per
// SM, so small B still spreads out (B = 1, N = 2049, C = 1408: rowdot 129 blocks of 8 warps, colsum 22
// x 16 warps, dx 748 x 4). No atomics: every reduction order is fixed, the results deterministic.
//
// Napkin math, 1B shape (B = 32, N = 2049, C = 1408, K = 16 forward / 32 backward rowdot, bf16):
//   x = 185 MB; one read = 62 us at the 3.0 TB/s copy speed of an H100 (38 us at 4.8 TB/s, H200).
//   rowdot  reads x once: 62 us; 2 B N C K = 3.0 (K = 16) / 5.9 (K = 32) GFLOP, x2 issued for hi + lo
//   colsum  reads x once: 62 us; 3.0 GFLOP, x2 issued
//   dx      reads x, writes dx: 369 MB -> 123 us; 5.9 GFLOP, x3 issued
//   At ~600 TFLOP/s of mma.sync the issued FLOPs take 10-30 us, under the memory time; the small
//   operands (m, p, g: <= 0.4 MB per sample) come from L1/L2. 6B (C = 3200, K = 50 -> 64 columns):
//   rowdot issues 107 GFLOP against 140 us of memory: near the tensor-core limit there.
// Limits: fp16 x with |m|, |p rstd| or |g| > 65504 overflows the fp16 hi part (as in kernels/triton/attn_pool.py);
//   fp16 lo parts below 6e-5 are subnormal. grid.y/z limits: B <= 65535, C < 4M. K has no limit (more
//   than 64 (rowdot) / 32 (colsum) columns take several passes over x, one per grid.z).
#include <algorithm>
#include <type_traits>

#include "common.cuh"

namespace ivmini {
namespace {

// ---------------------------------------------------------------------------------------------
// helpers

template <typename T> __device__ __forceinline__ uint32_t bits16(T v) {
  if constexpr (std::is_same_v<T, __half>) return __half_as_ushort(v);
  else return __bfloat16_as_ushort(v);
}
template <typename T> __device__ __forceinline__ T from_bits16(uint32_t b) {
  if constexpr (std::is_same_v<T, __half>) return __ushort_as_half((unsigned short)b);
  else return __ushort_as_bfloat16((unsigned short)b);
}
// Two T in one register, lo in the low half (the lower index of a fragment pair).
template <typename T> __device__ __forceinline__ uint32_t pack2(T lo, T hi) { return bits16(lo) | bits16(hi) << 16; }
template <typename T> __device__ __forceinline__ float2 unpack2(uint32_t w) {
  return make_float2(to_float(from_bits16<T>(w & 0xffffu)), to_float(from_bits16<T>(w >> 16)));
}

// fp32 (a, b) ~ hi + lo, each a pair of T.
template <typename T> __device__ __forceinline__ void split2(float a, float b, uint32_t &hi, uint32_t &lo) {
  const T ha = from_float<T>(a), hb = from_float<T>(b);
  hi = pack2(ha, hb);
  lo = pack2(from_float<T>(a - to_float(ha)), from_float<T>(b - to_float(hb)));
}

// d += a b, m16n8k16, fp32 accumulate; a: 4 registers of A pairs, b: 2 of B pairs (PTX ISA fragment layouts).
template <typename T>
__device__ __forceinline__ void mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                    uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>)
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// row[c .. c+2W-1] as W registers of pairs (W = 2, 4), zero from len on (vec: one 8/16-byte load when all are in).
template <typename T, int W> __device__ __forceinline__ void loadw(uint32_t (&w)[W], const T *row, int c, int len, bool vec) {
  if (vec && c + 2 * W <= len) {
    if constexpr (W == 4) {
      const uint4 v = __ldg(reinterpret_cast<const uint4 *>(row + c));
      w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
    } else {
      const uint2 v = __ldg(reinterpret_cast<const uint2 *>(row + c));
      w[0] = v.x, w[1] = v.y;
    }
    return;
  }
  const T zero = from_float<T>(0.f);
#pragma unroll
  for (int q = 0; q < W; ++q)
    w[q] = pack2(c + 2 * q < len ? __ldg(row + c + 2 * q) : zero, c + 2 * q + 1 < len ? __ldg(row + c + 2 * q + 1) : zero);
}

// fp32 row[c .. c+N-1] (N = 4, 8, 16), zero from len on (vec: 16-byte loads when all N are in).
template <int N> __device__ __forceinline__ void loadf(float (&v)[N], const float *row, int c, int len, bool vec) {
  if (vec && c + N <= len) {
#pragma unroll
    for (int q = 0; q < N / 4; ++q) {
      const float4 a = __ldg(reinterpret_cast<const float4 *>(row + c) + q);
      v[4 * q] = a.x, v[4 * q + 1] = a.y, v[4 * q + 2] = a.z, v[4 * q + 3] = a.w;
    }
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) v[e] = c + e < len ? __ldg(row + c + e) : 0.f;
  }
}

// row[c .. c+N-1] = v, converted to T, only below len (vec: 16-byte stores when all N are in).
template <typename T, int N>
__device__ __forceinline__ void storev(T *row, int c, int len, bool vec, const float (&v)[N]) {
  constexpr int kPack = 16 / sizeof(T);
  if (vec && c + N <= len) {
#pragma unroll
    for (int q = 0; q < N / kPack; ++q) {
      Vec<T> o;
#pragma unroll
      for (int e = 0; e < kPack; ++e) o.v[e] = from_float<T>(v[q * kPack + e]);
      store_vec(row + c + q * kPack, o);
    }
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e)
      if (c + e < len) row[c + e] = from_float<T>(v[e]);
  }
}

// Merge (mean, m2) of na values with (mean_b, m2_b) of nb values (Chan, Golub & LeVeque); counts kept by the caller.
__device__ __forceinline__ void chan(float &mean, float &m2, float na, float mean_b, float m2_b, float nb) {
  if (nb == 0.f) return;
  const float delta = mean_b - mean, f = nb / (na + nb);
  mean += delta * f;
  m2 += m2_b + delta * delta * na * f;
}

// (mean, m2) of the first `valid` of 8 values.
__device__ __forceinline__ void chunk_stats(const float (&v)[8], int valid, float &mean, float &m2) {
  float s = 0.f;
#pragma unroll
  for (int e = 0; e < 8; ++e) s += e < valid ? v[e] : 0.f;
  mean = s / valid;
  m2 = 0.f;
#pragma unroll
  for (int e = 0; e < 8; ++e) m2 += e < valid ? (v[e] - mean) * (v[e] - mean) : 0.f;
}

// The warps of a block pass their per-lane state down through shared memory, last warp first: warp w
// adds (merge) what warp w+1 left, then leaves its own; warp 0 ends with the block's total.
// `absorb(const float *src)` and `emit(float *dst)` read/write element i at [i * 32].
template <typename Absorb, typename Emit>
__device__ __forceinline__ void relay(float *buf, Absorb absorb, Emit emit) {
  const int warp = threadIdx.x >> 5, warps = blockDim.x >> 5, lane = threadIdx.x & 31;
  for (int w = warps - 1; w >= 0; --w) {
    if (warp == w) {
      if (w < warps - 1) absorb(buf + lane);
      if (w > 0) emit(buf + lane);
    }
    if (w > 0) __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------
// fp16 / bf16: tensor cores

template <typename T, int NT, int MT>
__global__ void __launch_bounds__(256) attn_pool_rowdot_mma_kernel(PoolParams p, int mt, bool xvec, bool mvec) {
  constexpr int kState = MT * NT * 4 + NT + MT * 4 + 1;   // per lane: s tile, rowsum(m), (mean, m2) per row, count
  __shared__ float buf[kState * 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5, g = lane >> 2, t = lane & 3;
  const int b = blockIdx.y, n0 = blockIdx.x * 16 * mt, k0 = blockIdx.z * 8 * NT, C = p.C;
  const T *xb = static_cast<const T *>(p.x) + b * p.x_stride[0];
  const float *mb = p.m + (int64_t(b) * p.K + k0) * C;
  // lane (g, t): rows n0 + 16 i + g (h = 0) and + 8 (h = 1); columns k0 + 8 j + 2t (+1)
  float acc[MT][NT][4] = {}, msum[NT] = {}, mean[MT][2] = {}, m2[MT][2] = {}, cnt = 0.f;

  for (int c0 = 32 * warp; c0 < C; c0 += 32 * warps) {
    const int c = c0 + 8 * t;                          // this lane's 8 channels c .. c+7
    uint32_t xr[MT][2][4];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int n = n0 + 16 * i + 8 * h + g;
        loadw(xr[i][h], xb + int64_t(n) * p.x_stride[1], c, i < mt && n < p.N ? C : 0, xvec);
      }
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      float mv[8];                                     // m[k0 + 8j + g][c .. c+7]: column g of n-tile j
      loadf(mv, mb + int64_t(8 * j + g) * C, c, k0 + 8 * j + g < p.K ? C : 0, mvec);
      uint32_t hi[4], lo[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        msum[j] += mv[2 * q] + mv[2 * q + 1];
        split2<T>(mv[2 * q], mv[2 * q + 1], hi[q], lo[q]);
      }
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        if (i >= mt) continue;
        // k16 step 1: channels c..c+3 = slots 2t, 2t+1 (regs 0, 1) and 2t+8, 2t+9 (regs 2, 3); step 2: c+4..c+7
        const uint32_t(&r0)[4] = xr[i][0], (&r1)[4] = xr[i][1];
        mma<T>(acc[i][j], r0[0], r1[0], r0[1], r1[1], hi[0], hi[1]);
        mma<T>(acc[i][j], r0[0], r1[0], r0[1], r1[1], lo[0], lo[1]);
        mma<T>(acc[i][j], r0[2], r1[2], r0[3], r1[3], hi[2], hi[3]);
        mma<T>(acc[i][j], r0[2], r1[2], r0[3], r1[3], lo[2], lo[3]);
      }
    }
    const int valid = min(8, C - c);                   // merge this chunk into each row's (mean, m2)
    if (valid > 0) {
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float v[8], cm, cm2;
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const float2 f = unpack2<T>(xr[i][h][q]);
            v[2 * q] = f.x, v[2 * q + 1] = f.y;
          }
          chunk_stats(v, valid, cm, cm2);
          chan(mean[i][h], m2[i][h], cnt, cm, cm2, float(valid));
        }
      cnt += valid;
    }
  }

  relay(
      buf,
      [&](const float *src) {
        int o = 0;
        const float cnt_b = src[32 * o++];
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const float mean_b = src[32 * o++], m2_b = src[32 * o++];
            chan(mean[i][h], m2[i][h], cnt, mean_b, m2_b, cnt_b);
          }
        cnt += cnt_b;
#pragma unroll
        for (int j = 0; j < NT; ++j) msum[j] += src[32 * o++];
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
          for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] += src[32 * o++];
      },
      [&](float *dst) {
        int o = 0;
        dst[32 * o++] = cnt;
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
          for (int h = 0; h < 2; ++h) dst[32 * o++] = mean[i][h], dst[32 * o++] = m2[i][h];
#pragma unroll
        for (int j = 0; j < NT; ++j) dst[32 * o++] = msum[j];
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
          for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) dst[32 * o++] = acc[i][j][e];
      });
  if (warp != 0) return;

  // The 4 lanes of a group hold disjoint channels of the same rows: merge them, then use lane t = 0's.
#pragma unroll
  for (int o = 1; o <= 2; o <<= 1) {
    const float cnt_b = __shfl_xor_sync(0xffffffffu, cnt, o);
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float mean_b = __shfl_xor_sync(0xffffffffu, mean[i][h], o);
        const float m2_b = __shfl_xor_sync(0xffffffffu, m2[i][h], o);
        chan(mean[i][h], m2[i][h], cnt, mean_b, m2_b, cnt_b);
      }
    cnt += cnt_b;
#pragma unroll
    for (int j = 0; j < NT; ++j) msum[j] += __shfl_xor_sync(0xffffffffu, msum[j], o);
  }
  float ms[NT][2];                                     // rowsum(m) of this lane's columns 8j + 2t (+1)
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) ms[j][e] = __shfl_sync(0xffffffffu, msum[j], (2 * t + e) * 4);
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mean[i][h] = __shfl_sync(0xffffffffu, mean[i][h], lane & ~3);
      m2[i][h] = __shfl_sync(0xffffffffu, m2[i][h], lane & ~3);
    }

#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int n = n0 + 16 * i + 8 * h + g;
      if (i >= mt || n >= p.N) continue;
      const int64_t row = int64_t(b) * p.N + n;
      const float rstd = rsqrtf(m2[i][h] / C + p.eps), mu = mean[i][h];
      if (t == 0 && blockIdx.z == 0) p.mu[row] = mu, p.rstd[row] = rstd;
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int k = k0 + 8 * j + 2 * t + e;
          if (k < p.K) p.s[row * p.K + k] = rstd * (acc[i][j][2 * h + e] - mu * ms[j][e]);
        }
    }
}

// NC = channels per lane = n-tiles per warp: a block covers 8 NC channels.
template <typename T, int MK, int NC>
__global__ void __launch_bounds__(512) attn_pool_colsum_mma_kernel(PoolParams p, bool xvec, bool zvec) {
  constexpr int W = NC / 2;                            // registers per token row of x
  constexpr int kState = MK * NC * 4 + MK * 2;         // per lane: z tile, (p rstd)^T mu
  __shared__ float buf[kState * 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5, g = lane >> 2, t = lane & 3;
  const int b = blockIdx.y, cb = blockIdx.x * 8 * NC, k0 = blockIdx.z * 16 * MK, N = p.N, K = p.K, C = p.C;
  const T *xb = static_cast<const T *>(p.x) + b * p.x_stride[0];
  const int64_t bn = int64_t(b) * N;
  const int c = cb + NC * g;                           // B column g of n-tile i = channel c + i
  // lane (g, t): rows k0 + 16 mk + g (+8) of z, channels cb + 2 NC t .. + 2 NC - 1
  float acc[MK][NC][4] = {}, corr[MK][2] = {};

  for (int n0 = 16 * warp; n0 < N; n0 += 16 * warps) {
    int n[4];                                          // this lane's tokens: reduction slots 2t, 2t+1, 2t+8, 2t+9
    uint32_t xr[4][W];
    float rs[4], mu[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      n[q] = n0 + 2 * t + (q & 1) + 8 * (q >> 1);
      const bool live = n[q] < N;
      loadw(xr[q], xb + int64_t(n[q]) * p.x_stride[1], c, live ? C : 0, xvec);
      rs[q] = live ? __ldg(p.rstd + bn + n[q]) : 0.f;
      mu[q] = live ? __ldg(p.mu + bn + n[q]) : 0.f;
    }
    uint32_t b0[NC], b1[NC];                           // (x[token][c + i], x[token + 1][c + i]) pairs
#pragma unroll
    for (int q = 0; q < W; ++q) {
      b0[2 * q] = __byte_perm(xr[0][q], xr[1][q], 0x5410);
      b0[2 * q + 1] = __byte_perm(xr[0][q], xr[1][q], 0x7632);
      b1[2 * q] = __byte_perm(xr[2][q], xr[3][q], 0x5410);
      b1[2 * q + 1] = __byte_perm(xr[2][q], xr[3][q], 0x7632);
    }
#pragma unroll
    for (int mk = 0; mk < MK; ++mk) {
      float w[2][4];                                   // p * rstd at rows k = k0 + 16 mk + g (+8), the 4 tokens
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int k = k0 + 16 * mk + 8 * h + g;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          w[h][q] = n[q] < N && k < K ? __ldg(p.p + (bn + n[q]) * K + k) * rs[q] : 0.f;
          corr[mk][h] += w[h][q] * mu[q];
        }
      }
      uint32_t ah[4], al[4];                           // A[g][2t, 2t+1], A[g+8][..], A[g][2t+8, 2t+9], A[g+8][..]
      split2<T>(w[0][0], w[0][1], ah[0], al[0]);
      split2<T>(w[1][0], w[1][1], ah[1], al[1]);
      split2<T>(w[0][2], w[0][3], ah[2], al[2]);
      split2<T>(w[1][2], w[1][3], ah[3], al[3]);
#pragma unroll
      for (int i = 0; i < NC; ++i) {
        mma<T>(acc[mk][i], ah[0], ah[1], ah[2], ah[3], b0[i], b1[i]);
        mma<T>(acc[mk][i], al[0], al[1], al[2], al[3], b0[i], b1[i]);
      }
    }
  }

  relay(
      buf,
      [&](const float *src) {
        int o = 0;
#pragma unroll
        for (int mk = 0; mk < MK; ++mk) {
          corr[mk][0] += src[32 * o++], corr[mk][1] += src[32 * o++];
#pragma unroll
          for (int i = 0; i < NC; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mk][i][e] += src[32 * o++];
        }
      },
      [&](float *dst) {
        int o = 0;
#pragma unroll
        for (int mk = 0; mk < MK; ++mk) {
          dst[32 * o++] = corr[mk][0], dst[32 * o++] = corr[mk][1];
#pragma unroll
          for (int i = 0; i < NC; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) dst[32 * o++] = acc[mk][i][e];
        }
      });
  if (warp != 0) return;

#pragma unroll
  for (int mk = 0; mk < MK; ++mk)
#pragma unroll
    for (int h = 0; h < 2; ++h) {                      // corr over the group's 4 lanes = over all tokens
      corr[mk][h] += __shfl_xor_sync(0xffffffffu, corr[mk][h], 1);
      corr[mk][h] += __shfl_xor_sync(0xffffffffu, corr[mk][h], 2);
    }
#pragma unroll
  for (int mk = 0; mk < MK; ++mk)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int k = k0 + 16 * mk + 8 * h + g;
      if (k >= K) continue;
      float v[2 * NC];                                 // d0/d2 of n-tile i: channel cb + 2 NC t + i; d1/d3: + NC + i
#pragma unroll
      for (int i = 0; i < NC; ++i) v[i] = acc[mk][i][2 * h] - corr[mk][h], v[NC + i] = acc[mk][i][2 * h + 1] - corr[mk][h];
      storev(p.z + (int64_t(b) * K + k) * C, cb + 2 * NC * t, C, zvec, v);
    }
}

constexpr int kDxWarps = 4, kDxNC = 4;                 // dx: warps per block, channels per lane (n-tiles)

template <typename T, int MT>
__global__ void __launch_bounds__(32 * kDxWarps) attn_pool_dx_mma_kernel(PoolParams p, int mt, bool xvec, bool fvec,
                                                                        bool dxvec) {
  constexpr int NC = kDxNC;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int b = blockIdx.z, cb = blockIdx.y * 8 * NC, n0 = (blockIdx.x * kDxWarps + warp) * 16 * mt;
  const int N = p.N, K = p.K, C = p.C;
  if (n0 >= N) return;
  const float *gb = p.g + int64_t(b) * N * K, *mb = p.m + int64_t(b) * K * C;
  const int c = cb + NC * g;                           // B column g of n-tile i = channel c + i
  // lane (g, t): dxhat of rows n0 + 16 i + g (+8), channels cb + 2 NC t .. + 2 NC - 1
  float acc[MT][NC][4] = {};

  for (int k0 = 0; k0 < K; k0 += 16) {
    uint32_t bh[NC][2], bl[NC][2];                     // (m[k][c + i], m[k + 1][c + i]) pairs, k = k0 + 2t (+8)
    {
      float mr[4][NC];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int k = k0 + 2 * t + (q & 1) + 8 * (q >> 1);
        loadf(mr[q], mb + int64_t(k) * C, c, k < K ? C : 0, fvec);
      }
#pragma unroll
      for (int i = 0; i < NC; ++i) {
        split2<T>(mr[0][i], mr[1][i], bh[i][0], bl[i][0]);
        split2<T>(mr[2][i], mr[3][i], bh[i][1], bl[i][1]);
      }
    }
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      if (i >= mt) continue;
      float ga[2][4];                                  // g at rows n0 + 16i + g (+8), k = k0 + 2t, +1, +8, +9
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int n = n0 + 16 * i + 8 * h + g;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int k = k0 + 2 * t + (q & 1) + 8 * (q >> 1);
          ga[h][q] = n < N && k < K ? __ldg(gb + int64_t(n) * K + k) : 0.f;
        }
      }
      uint32_t ah[4], al[4];
      split2<T>(ga[0][0], ga[0][1], ah[0], al[0]);
      split2<T>(ga[1][0], ga[1][1], ah[1], al[1]);
      split2<T>(ga[0][2], ga[0][3], ah[2], al[2]);
      split2<T>(ga[1][2], ga[1][3], ah[3], al[3]);
#pragma unroll
      for (int j = 0; j < NC; ++j) {                   // hi*hi + hi*lo + lo*hi (lo*lo is below fp32 rounding)
        mma<T>(acc[i][j], ah[0], ah[1], ah[2], ah[3], bh[j][0], bh[j][1]);
        mma<T>(acc[i][j], ah[0], ah[1], ah[2], ah[3], bl[j][0], bl[j][1]);
        mma<T>(acc[i][j], al[0], al[1], al[2], al[3], bh[j][0], bh[j][1]);
      }
    }
  }

  const int ce = cb + 2 * NC * t;                      // this lane's 8 output channels ce .. ce+7
  float r[2 * NC];
  loadf(r, p.r + int64_t(b) * C, ce, C, fvec);
  const T *xb = static_cast<const T *>(p.x) + b * p.x_stride[0];
  T *dxb = static_cast<T *>(p.dx) + int64_t(b) * N * C;
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int n = n0 + 16 * i + 8 * h + g;
      if (i >= mt || n >= N) continue;
      const int64_t row = int64_t(b) * N + n;
      const float mu = p.mu[row], rstd = p.rstd[row], c1 = p.c1[row], c2 = p.c2[row];
      uint32_t xw[NC];
      loadw(xw, xb + int64_t(n) * p.x_stride[1], ce, C, xvec);
      float out[2 * NC];
#pragma unroll
      for (int q = 0; q < NC; ++q) {
        const float2 f = unpack2<T>(xw[q]);
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int ch = 2 * q + e;                    // channel ce + ch: d0/d2 of n-tile ch, or d1/d3 of ch - NC
          const float dxhat = ch < NC ? acc[i][ch][2 * h] : acc[i][ch - NC][2 * h + 1];
          const float xhat = ((e ? f.y : f.x) - mu) * rstd;
          out[ch] = rstd * (dxhat - c1 - xhat * c2) + r[ch];
        }
      }
      storev(dxb + int64_t(n) * C, ce, C, dxvec, out);
    }
}

// ---------------------------------------------------------------------------------------------
// fp32: CUDA-core FMA (lanes split the channels, 4 each per step)

constexpr int kFmaRows = 2;    // rowdot: rows per warp
constexpr int kFmaK = 16;      // rowdot / colsum: columns k per pass (more: grid.z)
constexpr int kFmaDxRows = 8;  // dx: rows per warp

__global__ void __launch_bounds__(128) attn_pool_rowdot_fma_kernel(PoolParams p, bool xvec, bool mvec) {
  const int lane = threadIdx.x & 31, b = blockIdx.y, k0 = blockIdx.z * kFmaK, C = p.C;
  const int n0 = (blockIdx.x * 4 + (threadIdx.x >> 5)) * kFmaRows;
  if (n0 >= p.N) return;
  const float *xb = static_cast<const float *>(p.x) + b * p.x_stride[0];
  const float *mb = p.m + (int64_t(b) * p.K + k0) * C;
  float acc[kFmaRows][kFmaK] = {}, msum[kFmaK] = {}, mean[kFmaRows] = {}, m2[kFmaRows] = {}, cnt = 0.f;
  for (int c = 4 * lane; c < C; c += 128) {
    float xv[kFmaRows][4];
#pragma unroll
    for (int r = 0; r < kFmaRows; ++r) loadf(xv[r], xb + int64_t(n0 + r) * p.x_stride[1], c, n0 + r < p.N ? C : 0, xvec);
#pragma unroll
    for (int k = 0; k < kFmaK; ++k) {
      float mv[4];
      loadf(mv, mb + int64_t(k) * C, c, k0 + k < p.K ? C : 0, mvec);
      msum[k] += mv[0] + mv[1] + mv[2] + mv[3];
#pragma unroll
      for (int r = 0; r < kFmaRows; ++r)
        acc[r][k] += xv[r][0] * mv[0] + xv[r][1] * mv[1] + xv[r][2] * mv[2] + xv[r][3] * mv[3];
    }
    const int valid = min(4, C - c);
#pragma unroll
    for (int r = 0; r < kFmaRows; ++r) {
      float s = 0.f, cm2 = 0.f;
      for (int e = 0; e < 4; ++e) s += e < valid ? xv[r][e] : 0.f;
      const float cm = s / valid;
      for (int e = 0; e < 4; ++e) cm2 += e < valid ? (xv[r][e] - cm) * (xv[r][e] - cm) : 0.f;
      chan(mean[r], m2[r], cnt, cm, cm2, float(valid));
    }
    cnt += valid;
  }
  // lanes hold disjoint channels: sum the dots, merge the statistics (butterfly); lane 0 writes
#pragma unroll
  for (int k = 0; k < kFmaK; ++k) {
    msum[k] = warp_sum(msum[k]);
#pragma unroll
    for (int r = 0; r < kFmaRows; ++r) acc[r][k] = warp_sum(acc[r][k]);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float cnt_b = __shfl_xor_sync(0xffffffffu, cnt, o);
#pragma unroll
    for (int r = 0; r < kFmaRows; ++r) {
      const float mb_ = __shfl_xor_sync(0xffffffffu, mean[r], o), m2b = __shfl_xor_sync(0xffffffffu, m2[r], o);
      chan(mean[r], m2[r], cnt, mb_, m2b, cnt_b);
    }
    cnt += cnt_b;
  }
  if (lane != 0) return;
  for (int r = 0; r < kFmaRows && n0 + r < p.N; ++r) {
    const int64_t row = int64_t(b) * p.N + n0 + r;
    const float rstd = rsqrtf(m2[r] / C + p.eps);
    if (blockIdx.z == 0) p.mu[row] = mean[r], p.rstd[row] = rstd;
#pragma unroll
    for (int k = 0; k < kFmaK; ++k)
      if (k0 + k < p.K) p.s[row * p.K + k0 + k] = rstd * (acc[r][k] - mean[r] * msum[k]);
  }
}

__global__ void __launch_bounds__(512) attn_pool_colsum_fma_kernel(PoolParams p, bool xvec, bool zvec) {
  __shared__ float buf[kFmaK * 5 * 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int b = blockIdx.y, c = blockIdx.x * 128 + 4 * lane, k0 = blockIdx.z * kFmaK, K = p.K, C = p.C;
  const float *xb = static_cast<const float *>(p.x) + b * p.x_stride[0];
  const int64_t bn = int64_t(b) * p.N;
  float acc[kFmaK][4] = {}, corr[kFmaK] = {};          // sum_n w x and sum_n w mu, w = p rstd
#pragma unroll 2
  for (int n = warp; n < p.N; n += warps) {
    const float rstd = __ldg(p.rstd + bn + n), mu = __ldg(p.mu + bn + n);
    float xv[4];
    loadf(xv, xb + int64_t(n) * p.x_stride[1], c, C, xvec);
#pragma unroll
    for (int k = 0; k < kFmaK; ++k) {
      const float w = k0 + k < K ? __ldg(p.p + (bn + n) * K + k0 + k) * rstd : 0.f;
      corr[k] += w * mu;
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[k][e] += w * xv[e];
    }
  }
  relay(
      buf,
      [&](const float *src) {
        int o = 0;
#pragma unroll
        for (int k = 0; k < kFmaK; ++k) {
          corr[k] += src[32 * o++];
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[k][e] += src[32 * o++];
        }
      },
      [&](float *dst) {
        int o = 0;
#pragma unroll
        for (int k = 0; k < kFmaK; ++k) {
          dst[32 * o++] = corr[k];
#pragma unroll
          for (int e = 0; e < 4; ++e) dst[32 * o++] = acc[k][e];
        }
      });
  if (warp != 0) return;
#pragma unroll
  for (int k = 0; k < kFmaK; ++k) {
    if (k0 + k >= K) break;
    float v[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) v[e] = acc[k][e] - corr[k];
    storev(p.z + (int64_t(b) * K + k0 + k) * C, c, C, zvec, v);
  }
}

__global__ void __launch_bounds__(128) attn_pool_dx_fma_kernel(PoolParams p, bool xvec, bool fvec, bool dxvec) {
  const int lane = threadIdx.x & 31, b = blockIdx.z, c = blockIdx.y * 128 + 4 * lane, N = p.N, K = p.K, C = p.C;
  const int n0 = (blockIdx.x * 4 + (threadIdx.x >> 5)) * kFmaDxRows;
  if (n0 >= N) return;
  const float *gb = p.g + int64_t(b) * N * K, *mb = p.m + int64_t(b) * K * C;
  float acc[kFmaDxRows][4] = {};                       // dxhat = g m
#pragma unroll 2
  for (int k = 0; k < K; ++k) {
    float mv[4];
    loadf(mv, mb + int64_t(k) * C, c, C, fvec);
#pragma unroll
    for (int r = 0; r < kFmaDxRows; ++r) {
      const float gk = n0 + r < N ? __ldg(gb + int64_t(n0 + r) * K + k) : 0.f;
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[r][e] += gk * mv[e];
    }
  }
  float r4[4];
  loadf(r4, p.r + int64_t(b) * C, c, C, fvec);
  const float *xb = static_cast<const float *>(p.x) + b * p.x_stride[0];
  float *dxb = static_cast<float *>(p.dx) + int64_t(b) * N * C;
  for (int r = 0; r < kFmaDxRows && n0 + r < N; ++r) {
    const int64_t row = int64_t(b) * N + n0 + r;
    const float mu = p.mu[row], rstd = p.rstd[row], c1 = p.c1[row], c2 = p.c2[row];
    float xv[4], out[4];
    loadf(xv, xb + int64_t(n0 + r) * p.x_stride[1], c, C, xvec);
#pragma unroll
    for (int e = 0; e < 4; ++e) out[e] = rstd * (acc[r][e] - c1 - (xv[e] - mu) * rstd * c2) + r4[e];
    storev(dxb + int64_t(n0 + r) * C, c, C, dxvec, out);
  }
}

// ---------------------------------------------------------------------------------------------
// launchers

cudaError_t sm_count(int &sms) {
  int dev = 0;
  IVMINI_CHECK(cudaGetDevice(&dev));
  return cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
}

template <typename T> bool x_vec(const PoolParams &p) {
  return vec_ok<T>(p.x, p.x_stride[0], p.C) && vec_ok<T>(p.x, p.x_stride[1], p.C);
}
bool f_vec(const float *a, int C) { return vec_ok<float>(a, C, C); }   // (B, *, C) contiguous fp32 rows

// Few blocks (less than 2 per SM): smaller row tiles and more warps per block.
bool few(int64_t blocks, int sms) { return blocks < 2 * sms; }

template <typename T, int NT, int MT> void rowdot_mma(const PoolParams &p, int sms, cudaStream_t stream) {
  int mt = MT;
  while (mt > 1 && few(int64_t(p.B) * cdiv(p.N, 16 * mt), sms)) --mt;
  const dim3 grid(unsigned(cdiv(p.N, 16 * mt)), p.B, unsigned(cdiv(std::max(p.K, 1), 8 * NT)));
  const int warps = few(int64_t(grid.x) * grid.y * grid.z, sms) ? 8 : 4;
  attn_pool_rowdot_mma_kernel<T, NT, MT><<<grid, 32 * warps, 0, stream>>>(p, mt, x_vec<T>(p), f_vec(p.m, p.C));
}

template <typename T> void rowdot(const PoolParams &p, int sms, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    const dim3 grid(unsigned(cdiv(p.N, 4 * kFmaRows)), p.B, unsigned(cdiv(std::max(p.K, 1), kFmaK)));
    attn_pool_rowdot_fma_kernel<<<grid, 128, 0, stream>>>(p, x_vec<float>(p), f_vec(p.m, p.C));
  } else if (p.K <= 16) {
    rowdot_mma<T, 2, 2>(p, sms, stream);
  } else if (p.K <= 32) {
    rowdot_mma<T, 4, 2>(p, sms, stream);
  } else {
    rowdot_mma<T, 8, 1>(p, sms, stream);
  }
}

template <typename T, int MK, int NC> void colsum_mma(const PoolParams &p, int sms, cudaStream_t stream) {
  const dim3 grid(unsigned(cdiv(p.C, 8 * NC)), p.B, unsigned(cdiv(p.K, 16 * MK)));
  const int warps = few(int64_t(grid.x) * grid.y * grid.z, sms) ? 16 : 4;
  attn_pool_colsum_mma_kernel<T, MK, NC><<<grid, 32 * warps, 0, stream>>>(p, x_vec<T>(p), f_vec(p.z, p.C));
}

template <typename T> void colsum(const PoolParams &p, int sms, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    const dim3 grid(unsigned(cdiv(p.C, 128)), p.B, unsigned(cdiv(p.K, kFmaK)));
    const int warps = few(int64_t(grid.x) * grid.y * grid.z, sms) ? 16 : 4;
    attn_pool_colsum_fma_kernel<<<grid, 32 * warps, 0, stream>>>(p, x_vec<float>(p), f_vec(p.z, p.C));
  } else if (p.K <= 16) {
    colsum_mma<T, 1, 8>(p, sms, stream);
  } else {
    colsum_mma<T, 2, 4>(p, sms, stream);
  }
}

template <typename T> void dx(const PoolParams &p, int sms, cudaStream_t stream) {
  const bool fvec = f_vec(p.m, p.C) && f_vec(p.r, p.C), dxvec = vec_ok<T>(p.dx, p.C, p.C);
  if constexpr (std::is_same_v<T, float>) {
    const dim3 grid(unsigned(cdiv(p.N, 4 * kFmaDxRows)), unsigned(cdiv(p.C, 128)), p.B);
    attn_pool_dx_fma_kernel<<<grid, 128, 0, stream>>>(p, x_vec<float>(p), fvec, dxvec);
  } else {
    constexpr int MT = 2;
    const int64_t cblocks = cdiv(p.C, 8 * kDxNC);
    const int mt = few(int64_t(p.B) * cdiv(p.N, 16 * kDxWarps * MT) * cblocks, sms) ? 1 : MT;
    const dim3 grid(unsigned(cdiv(p.N, 16 * kDxWarps * mt)), unsigned(cblocks), p.B);
    attn_pool_dx_mma_kernel<T, MT><<<grid, 32 * kDxWarps, 0, stream>>>(p, mt, x_vec<T>(p), fvec, dxvec);
  }
}

}  // namespace

cudaError_t attn_pool_rowdot(const PoolParams &p, cudaStream_t stream) {
  if (p.B == 0 || p.N == 0) return cudaSuccess;
  int sms = 0;
  IVMINI_CHECK(sm_count(sms));
  IVMINI_DISPATCH_FLOAT(p.dtype, rowdot<scalar_t>(p, sms, stream));
  return cudaGetLastError();
}

// N == 0 still launches: z = 0.
cudaError_t attn_pool_colsum(const PoolParams &p, cudaStream_t stream) {
  if (p.B == 0 || p.K == 0 || p.C == 0) return cudaSuccess;
  int sms = 0;
  IVMINI_CHECK(sm_count(sms));
  IVMINI_DISPATCH_FLOAT(p.dtype, colsum<scalar_t>(p, sms, stream));
  return cudaGetLastError();
}

cudaError_t attn_pool_dx(const PoolParams &p, cudaStream_t stream) {
  if (p.B == 0 || p.N == 0 || p.C == 0) return cudaSuccess;
  int sms = 0;
  IVMINI_CHECK(sm_count(sms));
  IVMINI_DISPATCH_FLOAT(p.dtype, dx<scalar_t>(p, sms, stream));
  return cudaGetLastError();
}

}  // namespace ivmini
