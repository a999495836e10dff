// RMSNorm forward and backward, InternVideo2 semantics (spec: kernels/ref.py::rms_norm; the Triton twin
// is kernels/triton/rms_norm.py, which fixes the order of rounding):
//
//   forward   rstd = 1 / sqrt(mean(x^2) + eps),   y = w * cast(x * rstd)        fp32 math, y rounded once
//   backward  xhat = x * rstd, g = dy * w:        dx = rstd * (g - xhat * mean(g * xhat))
//             dw_partial[i, :] = sum over the rows of block i of dy * cast(xhat)   (the caller adds the i)
//
// Tiling. A row belongs to a "team" of TPR threads (a multiple of 32). Thread t of a team owns the packs
// j = t, t + TPR, t + 2 TPR, ... of the row, a pack being 16 bytes (8 bf16/fp16, 4 fp32), or one element
// on the scalar path (taken when vec_ok fails: unaligned pointers, strides or widths). Every access is
// coalesced and the row is read from memory once: the first pass (sum of x^2, or of g * xhat) keeps its
// packs in registers and the second pass writes from them. TPR is the fewest threads that hold the row
// at 32 elements per thread (8 on the scalar path): 1408 bf16 -> TPR 64, 3200 bf16 -> 128.
//   forward   one row per team, teams of 256 / TPR rows per block, grid = rows / teams. The row sum is a
//             warp shuffle sum (+ one shared-memory step when TPR > 32); rstd is written per row.
//   backward  exactly num_partials blocks; block i takes rows [i*chunk, (i+1)*chunk), chunk =
//             ceil(rows / num_partials), its 128 / TPR teams each taking every teams-th row. Each thread
//             adds dy * cast(xhat) of its columns into its team's fp32 row of shared memory (one owner per
//             element: no atomics); at the end the block adds its teams in a fixed order and writes its
//             dw_partial row once. Deterministic; an empty chunk (or rows == 0) writes zeros.
//   Rows too wide for the registers (> 16384 elements fwd, > 8192 bwd; 4096 / 2048 on the scalar path)
//   read their other packs again in the second pass (from L1/L2); past 12288 columns the backward sums
//   dw in place in dw_partial (one team per block then, each column with a single owner thread).
//
// Napkin math (bf16; B = 32 clips of 2049 tokens = 65568 rows, or 32 x 417 = 13344 rows when masked):
//   forward  reads x, writes y: 4 bytes/element (+ 4 bytes of rstd per row; w stays in L1/L2)
//            65568 x 1408: 369 MB -> 123 us at the 3.0 TB/s copy speed of an H100 (77 us at 4.8 TB/s, H200)
//            65568 x 3200: 839 MB -> 280 us;   13344 x 1408: 75 MB -> 25 us
//   backward reads x, dy, writes dx: 6 bytes/element, + num_partials x width x 4 bytes of dw partials
//            65568 x 1408: 554 MB -> 185 us;   65568 x 3200: 1.26 GB -> 420 us;   13344 x 1408: 113 MB -> 38 us
//   ~5 FLOPs per element: memory bound, the target is the copy bandwidth. Bytes in flight: every thread
//   issues all its loads of a row before the row's one reduction. The backward blocks (128 threads,
//   <= 128 registers, ~11-13 KB of shared memory at 1408/3200) fit 4 per SM, with two (1408) or one
//   (3200) rows in flight each: num_partials = 4 x the SM count (as the Triton launcher uses) is one
//   wave with ~45-50 KB in flight per SM; more partials than 4 per SM run in several waves.
// Limits: any width >= 1 (the contract says <= 65536), slower past the register cache; forward grid is
//   1-D (rows <= 2^31 - 1 teams).
#include <algorithm>
#include <type_traits>

#include "common.cuh"

namespace ivmini {
namespace {

constexpr int kFwdElems = 32, kBwdElems = 32;       // row elements per thread held in registers (vector path;
                                                    // the scalar path holds 8)
constexpr int kFwdMaxTeam = 512, kBwdMaxTeam = 256;
constexpr int kSmemFloats = 12288;                  // dw sums of a block in shared memory: up to 48 KB

// Sum over a team of team_warps consecutive warps; every thread of the block calls it, each gets its team's sum.
__device__ __forceinline__ float team_sum(float v, float *scratch, int team_warps) {
  v = warp_sum(v);
  if (team_warps == 1) return v;
  const int warp = threadIdx.x >> 5, first = warp - warp % team_warps;
  __syncthreads();                                   // scratch may still be read by the previous call
  if ((threadIdx.x & 31) == 0) scratch[warp] = v;
  __syncthreads();
  v = 0.f;
  for (int i = 0; i < team_warps; ++i) v += scratch[first + i];   // the same order in every thread
  return v;
}

template <typename T, int V>
__global__ void __launch_bounds__(kFwdMaxTeam, 2) rms_norm_fwd_kernel(RmsNormParams p, int team) {
  constexpr int NV = V == 1 ? 8 : kFwdElems / V;
  __shared__ float scratch[32];
  const int t = threadIdx.x % team, packs = p.width / V;
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / team) + threadIdx.x / team;
  const bool live = row < p.rows;
  const T *x = static_cast<const T *>(p.x) + row * p.x_stride;
  const T *w = static_cast<const T *>(p.w);
  Pack<T, V> xs[NV];                                 // this thread's packs t + i * team of the row
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int j = t + i * team;
    if (live && j < packs) {
      xs[i] = load_pack<T, V>(x + j * V);
#pragma unroll
      for (int e = 0; e < V; ++e) ss += to_float(xs[i].v[e]) * to_float(xs[i].v[e]);
    }
  }
#pragma unroll 1
  for (int j = t + NV * team; live && j < packs; j += team) {   // only rows wider than team * kFwdElems
    const Pack<T, V> a = load_pack<T, V>(x + j * V);
#pragma unroll
    for (int e = 0; e < V; ++e) ss += to_float(a.v[e]) * to_float(a.v[e]);
  }
  const float rstd = rsqrtf(team_sum(ss, scratch, team / 32) / p.width + p.eps);
  if (!live) return;
  if (t == 0) p.rstd[row] = rstd;
  T *y = static_cast<T *>(p.y) + row * p.y_stride;
  auto emit = [&](int j, const Pack<T, V> &a) {      // y = w * cast(x * rstd), rounded once
    const Pack<T, V> wv = load_pack<T, V>(w + j * V);
    Pack<T, V> o;
#pragma unroll
    for (int e = 0; e < V; ++e) o.v[e] = from_float<T>(to_float(wv.v[e]) * round_to<T>(to_float(a.v[e]) * rstd));
    store_pack<T, V>(y + j * V, o);
  };
#pragma unroll
  for (int i = 0; i < NV; ++i)
    if (t + i * team < packs) emit(t + i * team, xs[i]);
#pragma unroll 1
  for (int j = t + NV * team; j < packs; j += team) emit(j, load_pack<T, V>(x + j * V));
}

template <typename T, int V>
__global__ void __launch_bounds__(kBwdMaxTeam) rms_norm_bwd_kernel(RmsNormParams p, int team, int64_t chunk,
                                                                   bool dw_in_smem) {
  constexpr int NV = V == 1 ? 8 : kBwdElems / V;
  extern __shared__ float dw_smem[];                 // (teams, width): each team's dw sums
  __shared__ float scratch[32];
  const int teams = blockDim.x / team, k = threadIdx.x / team, t = threadIdx.x % team, packs = p.width / V;
  const T *w = static_cast<const T *>(p.w);
  float *dw_out = p.dw_partial + int64_t(blockIdx.x) * p.width;
  // very wide rows (one team per block) sum in place in dw_partial: every column has one owner thread
  float *dw = dw_in_smem ? dw_smem + k * p.width : dw_out;
#pragma unroll 1
  for (int j = t; j < packs; j += team)
    for (int e = 0; e < V; ++e) dw[j * V + e] = 0.f;

  const int64_t first = blockIdx.x * chunk, last = first + chunk < p.rows ? first + chunk : p.rows;
  for (int64_t r0 = first; r0 < last; r0 += teams) {  // the same trip count in every team: team_sum syncs
    const int64_t row = r0 + k;
    const bool live = row < last;
    const T *x = static_cast<const T *>(p.x) + row * p.x_stride;
    const T *dy = static_cast<const T *>(p.dy) + row * p.dy_stride;
    const float rstd = live ? p.rstd[row] : 0.f;
    float dot = 0.f;                                 // sum over the row of g * xhat
    auto add_dot = [&](int j, const Pack<T, V> &a, const Pack<T, V> &d) {
      const Pack<T, V> wv = load_pack<T, V>(w + j * V);
#pragma unroll
      for (int e = 0; e < V; ++e) dot += to_float(d.v[e]) * to_float(wv.v[e]) * (to_float(a.v[e]) * rstd);
    };
    Pack<T, V> xs[NV], gs[NV];                       // this thread's packs t + i * team of x and dy
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int j = t + i * team;
      if (live && j < packs) {
        xs[i] = load_pack<T, V>(x + j * V);
        gs[i] = load_pack<T, V>(dy + j * V);
        add_dot(j, xs[i], gs[i]);
      }
    }
#pragma unroll 1
    for (int j = t + NV * team; live && j < packs; j += team)   // only rows wider than team * kBwdElems
      add_dot(j, load_pack<T, V>(x + j * V), load_pack<T, V>(dy + j * V));
    const float c = team_sum(dot, scratch, team / 32) / p.width;
    if (!live) continue;                             // (then this was the last iteration)

    T *dx = static_cast<T *>(p.dx) + row * p.dx_stride;
    auto grad = [&](int j, const Pack<T, V> &a, const Pack<T, V> &d) {
      const Pack<T, V> wv = load_pack<T, V>(w + j * V);
      Pack<T, V> o;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float xhat = to_float(a.v[e]) * rstd, dyf = to_float(d.v[e]);
        o.v[e] = from_float<T>((dyf * to_float(wv.v[e]) - xhat * c) * rstd);
        dw[j * V + e] += dyf * round_to<T>(xhat);
      }
      store_pack<T, V>(dx + j * V, o);
    };
#pragma unroll
    for (int i = 0; i < NV; ++i)
      if (t + i * team < packs) grad(t + i * team, xs[i], gs[i]);
#pragma unroll 1
    for (int j = t + NV * team; j < packs; j += team) grad(j, load_pack<T, V>(x + j * V), load_pack<T, V>(dy + j * V));
  }

  // The block's dw row, written once: the teams added in a fixed order (0, 1, ...).
  if (!dw_in_smem) return;
  __syncthreads();
  for (int col = threadIdx.x; col < p.width; col += blockDim.x) {
    float s = 0.f;
    for (int m = 0; m < teams; ++m) s += dw_smem[m * p.width + col];
    dw_out[col] = s;
  }
}

int round32(int64_t n) { return int(cdiv(n, 32) * 32); }

template <typename T, int V> cudaError_t launch_fwd(const RmsNormParams &p, cudaStream_t stream) {
  const int team = std::min(kFwdMaxTeam, round32(cdiv(p.width / V, V == 1 ? 8 : kFwdElems / V)));
  const int teams = std::max(1, 256 / team);         // narrow rows: several per block
  rms_norm_fwd_kernel<T, V><<<unsigned(cdiv(p.rows, teams)), teams * team, 0, stream>>>(p, team);
  return cudaGetLastError();
}

template <typename T, int V> cudaError_t launch_bwd(const RmsNormParams &p, cudaStream_t stream) {
  const int team = std::min(kBwdMaxTeam, round32(cdiv(p.width / V, V == 1 ? 8 : kBwdElems / V)));
  const bool in_smem = int64_t(std::max(1, 128 / team)) * p.width <= kSmemFloats;
  const int teams = in_smem ? std::max(1, 128 / team) : 1;   // several rows per block when narrow; dw in place: one
  const size_t smem = in_smem ? teams * p.width * sizeof(float) : 0;
  rms_norm_bwd_kernel<T, V><<<p.num_partials, teams * team, smem, stream>>>(p, team, cdiv(p.rows, p.num_partials),
                                                                            in_smem);
  return cudaGetLastError();
}

}  // namespace

cudaError_t rms_norm_fwd(const RmsNormParams &p, cudaStream_t stream) {
  if (p.rows == 0 || p.width == 0) return cudaSuccess;
  cudaError_t err = cudaSuccess;
  IVMINI_DISPATCH_FLOAT(p.dtype, {
    const bool vec = vec_ok<scalar_t>(p.x, p.x_stride, p.width) && vec_ok<scalar_t>(p.y, p.y_stride, p.width) &&
                     vec_ok<scalar_t>(p.w, 0, p.width);
    err = vec ? launch_fwd<scalar_t, Vec<scalar_t>::kSize>(p, stream) : launch_fwd<scalar_t, 1>(p, stream);
  });
  return err;
}

// rows == 0 still launches: every block writes its (zero) dw_partial row.
cudaError_t rms_norm_bwd(const RmsNormParams &p, cudaStream_t stream) {
  if (p.num_partials == 0 || p.width == 0) return cudaSuccess;
  cudaError_t err = cudaSuccess;
  IVMINI_DISPATCH_FLOAT(p.dtype, {
    const bool vec = vec_ok<scalar_t>(p.x, p.x_stride, p.width) && vec_ok<scalar_t>(p.dy, p.dy_stride, p.width) &&
                     vec_ok<scalar_t>(p.dx, p.dx_stride, p.width) && vec_ok<scalar_t>(p.w, 0, p.width);
    err = vec ? launch_bwd<scalar_t, Vec<scalar_t>::kSize>(p, stream) : launch_bwd<scalar_t, 1>(p, stream);
  });
  return err;
}

}  // namespace ivmini
