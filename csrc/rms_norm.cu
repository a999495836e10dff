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
//             ceil(rows / num_partials), its 128 / TPR teams each taking every teams-th row. A thread owns
//             the same columns in every row of its team, so it sums their dy * cast(xhat) over its rows in
//             fp32 registers (32 per thread, 8 on the scalar path, beside its elements of x and dy). At the
//             end a one-team block writes its registers to its dw_partial row; with several teams (narrow
//             rows) each team stores its sums once into a shared (teams, width) tile and the block adds the
//             teams in a fixed order (0, 1, ...) and writes the row once. No atomics, the same order of fp32
//             additions in every run (deterministic); an empty chunk (or rows == 0) writes zeros.
//   Rows too wide for the registers (> 16384 elements fwd, > 8192 bwd; 4096 / 2048 on the scalar path)
//   read their other packs again in the second pass (from L1/L2); the backward sums the dw of those
//   columns in place in dw_partial (one team per block then, each column with a single owner thread). It
//   is a separate instantiation (kWide): those loops would cost the common case registers.
//
// Napkin math (bf16; B = 32 clips of 2049 tokens = 65568 rows, or 32 x 417 = 13344 rows when masked):
//   forward  reads x, writes y: 4 bytes/element (+ 4 bytes of rstd per row; w stays in L1/L2)
//            65568 x 1408: 369 MB -> 123 us at the 3.0 TB/s copy speed of an H100 (77 us at 4.8 TB/s, H200)
//            65568 x 3200: 839 MB -> 280 us;   13344 x 1408: 75 MB -> 25 us
//   backward reads x, dy, writes dx: 6 bytes/element, + num_partials x width x 4 bytes of dw partials
//            65568 x 1408: 554 MB -> 185 us;   65568 x 3200: 1.26 GB -> 420 us;   13344 x 1408: 113 MB -> 38 us
//   ~5 FLOPs per element: memory bound, the target is the copy bandwidth. Bytes in flight: every thread
//   issues all its loads of a row before the row's one reduction. The backward blocks (128 threads,
//   __launch_bounds__(256, 2): <= 128 registers, ptxas -v: 124-128 on sm_80 / sm_90a, no spills; 11 KB of
//   shared memory at 1408 for the team sums, none at 3200) fit 4 per SM, with two (1408) or one (3200) rows
//   in flight each: num_partials = 4 x the SM count (kernels/cuda/ops.py) is one wave with ~45-50 KB in
//   flight per SM; more partials than 4 per SM run in several waves. The dw sums cost 32 registers and no
//   memory traffic per element (summed in shared memory they would be a read-modify-write per element and
//   row, 8-way bank conflicted: a thread's pack is 8 consecutive floats).
// Limits: any width >= 1 (the contract says <= 65536), slower past the register cache: the kWide backward
//   takes 143-167 registers (256-thread blocks, one per SM) and sums its extra columns in global memory
//   (L2); forward grid is 1-D (rows <= 2^31 - 1 teams).
#include <algorithm>
#include <type_traits>

#include "common.cuh"

namespace ivmini {
namespace {

constexpr int kFwdElems = 32, kBwdElems = 32;       // row elements per thread held in registers (vector path;
                                                    // the scalar path holds 8)
constexpr int kFwdMaxTeam = 512, kBwdMaxTeam = 256;

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

// kWide: rows wider than a team's registers (team * NV packs). A separate instantiation because those loops
// cost the common case registers: without them it stays within 128 (4 blocks of 128 threads per SM).
template <typename T, int V, bool kWide>
__global__ void __launch_bounds__(kBwdMaxTeam, kWide ? 1 : 2) rms_norm_bwd_kernel(RmsNormParams p, int team,
                                                                                 int64_t chunk) {
  constexpr int NV = V == 1 ? 8 : kBwdElems / V;
  extern __shared__ float dw_smem[];                 // (teams, width) when teams > 1: each team's dw sums
  __shared__ float scratch[32];
  const int teams = blockDim.x / team, k = threadIdx.x / team, t = threadIdx.x % team, packs = p.width / V;
  const T *w = static_cast<const T *>(p.w);
  float *dw_out = p.dw_partial + int64_t(blockIdx.x) * p.width;
  // This thread's dw sums over its rows: the packs t + i * team (i < NV) in registers; the packs past
  // team * NV (rows wider than the register cache: one team per block then) in place in dw_out, where every
  // column has a single owner thread.
  float dw[NV][V] = {};
  if constexpr (kWide)
#pragma unroll 1
    for (int j = t + NV * team; j < packs; j += team)
      for (int e = 0; e < V; ++e) dw_out[j * V + e] = 0.f;

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
    if constexpr (kWide)
#pragma unroll 1
      for (int j = t + NV * team; live && j < packs; j += team)
        add_dot(j, load_pack<T, V>(x + j * V), load_pack<T, V>(dy + j * V));
    const float c = team_sum(dot, scratch, team / 32) / p.width;
    if (!live) continue;                             // (then this was the last iteration)

    T *dx = static_cast<T *>(p.dx) + row * p.dx_stride;
    // dx of pack j, stored; returns the pack's dw terms dy * cast(xhat) in `terms`
    auto grad = [&](int j, const Pack<T, V> &a, const Pack<T, V> &d, float (&terms)[V]) {
      const Pack<T, V> wv = load_pack<T, V>(w + j * V);
      Pack<T, V> o;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float xhat = to_float(a.v[e]) * rstd, dyf = to_float(d.v[e]);
        o.v[e] = from_float<T>((dyf * to_float(wv.v[e]) - xhat * c) * rstd);
        terms[e] = dyf * round_to<T>(xhat);
      }
      store_pack<T, V>(dx + j * V, o);
    };
#pragma unroll
    for (int i = 0; i < NV; ++i)
      if (t + i * team < packs) {
        float terms[V];
        grad(t + i * team, xs[i], gs[i], terms);
#pragma unroll
        for (int e = 0; e < V; ++e) dw[i][e] += terms[e];
      }
    if constexpr (kWide)
#pragma unroll 1
      for (int j = t + NV * team; j < packs; j += team) {
        float terms[V];
        grad(j, load_pack<T, V>(x + j * V), load_pack<T, V>(dy + j * V), terms);
        for (int e = 0; e < V; ++e) dw_out[j * V + e] += terms[e];
      }
  }

  // The block's dw row, written once. One team: straight from the registers (each column has one owner).
  if (teams == 1) {
#pragma unroll
    for (int i = 0; i < NV; ++i)
      if (t + i * team < packs)
#pragma unroll
        for (int e = 0; e < V; ++e) dw_out[(t + i * team) * V + e] = dw[i][e];
    return;
  }
  // Several teams (narrow rows: then team * NV covers the row, every column is in registers): each team's sums
  // through shared memory, one store per element, then added in a fixed order (0, 1, ...).
#pragma unroll
  for (int i = 0; i < NV; ++i)
    if (t + i * team < packs)
#pragma unroll
      for (int e = 0; e < V; ++e) dw_smem[k * p.width + (t + i * team) * V + e] = dw[i][e];
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
  constexpr int NV = V == 1 ? 8 : kBwdElems / V;
  const int team = std::min(kBwdMaxTeam, round32(cdiv(p.width / V, NV)));
  const int teams = std::max(1, 128 / team);         // several rows per block when narrow
  // teams > 1 only when team < 128, i.e. the row fits the registers: 64 * 32 elements, 16 KB of dw sums at most
  const size_t smem = teams > 1 ? teams * p.width * sizeof(float) : 0;
  const bool wide = int64_t(team) * NV < p.width / V;   // packs past the team's registers
  const auto kernel = wide ? rms_norm_bwd_kernel<T, V, true> : rms_norm_bwd_kernel<T, V, false>;
  kernel<<<p.num_partials, teams * team, smem, stream>>>(p, team, cdiv(p.rows, p.num_partials));
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
