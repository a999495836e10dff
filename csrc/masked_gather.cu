// Masked (visible-token) gather, forward and backward (spec: kernels/ref.py::masked_gather; the Triton
// twin is kernels/triton/masked_gather.py, whose header explains the backward-as-a-gather):
//
//   forward   out[l, b, k, :] = x[l, b, idx[b, k], :] (+ pos[idx[b, k], :])   added in fp32, rounded once;
//             an index outside [0, N) gives a zero row (no memory access)
//   backward  dx[l, b, n, :] = dout[l, b, inv[b, n], :], or 0 where inv[b, n] < 0 (every element written)
//             dpos[n, :] = sum over b, l of dx[l, b, n, :]                  fp32, summed in registers
//
// Tiling. One warp per row and channel chunk: lane i handles the packs j = i, i + 32, ... (at most
// kUnroll of them) of the chunk, a pack being 16 bytes (8 bf16/fp16, 4 fp32) or one element on the
// scalar path (taken when vec_ok fails). A row of packs is cut into the fewest chunks of <= 32 * kUnroll
// packs, of equal size rounded up to 32 (1408 bf16 = 176 packs -> 2 chunks of 96), so the lanes stay
// busy; grid = (rows / 8, chunks), 8 warps per block.
//   forward   a warp owns an output row (b, k): it reads idx[b, k] once and its pos-embed packs once,
//             then for each of the L layers loads its kUnroll packs of x, adds pos and stores.
//   backward  a warp owns a token n: for b = 0..B-1 it reads inv[b, n] (prefetched one b ahead, so the
//             dout loads do not wait on it), and for each layer copies dout[l, b, inv[b, n]] (or zeros)
//             into dx[l, b, n] and adds it into its fp32 dpos registers, written once at the end.
//             Every dx element written exactly once, no atomics, deterministic.
//
// Napkin math (bf16, B = 32, N = 2049, K = 417 visible (20%), C = 1408, L = 1):
//   forward   reads the K gathered rows of x and writes out: 2 x 32 x 417 x 1408 x 2 bytes = 75 MB, + pos
//             (5.8 MB, read from HBM about once, then from L2): ~81 MB -> 27 us at the 3.0 TB/s copy
//             speed of an H100 (17 us at 4.8 TB/s). (kernels/triton/masked_gather.py counts pos per row: 113 MB.)
//   backward  reads dout (37.6 MB), writes dx (185 MB, 80% zeros that must be written anyway) and dpos
//             (fp32, 11.5 MB): 234 MB -> 78 us at 3.0 TB/s.
//   No arithmetic to speak of: the target is the copy bandwidth. Bytes in flight: up to kUnroll x 16 B
//   per lane per load batch, 64 warps per SM.
// Limits: grid.y = chunks <= 65535 (C up to ~8M elements); duplicate indices in a row are not supported
//   by the caller's inv (one of them wins), as in the Triton backend.
#include <algorithm>
#include <type_traits>

#include "common.cuh"

namespace ivmini {
namespace {

constexpr int kWarps = 8;    // rows (forward) or tokens (backward) per block, one warp each
constexpr int kUnroll = 4;   // packs per lane per chunk

template <typename T, int V> __device__ __forceinline__ Pack<T, V> zero_pack() {
  Pack<T, V> z;
#pragma unroll
  for (int e = 0; e < V; ++e) z.v[e] = from_float<T>(0.f);
  return z;
}

template <typename T, int V>
__global__ void __launch_bounds__(32 * kWarps) masked_gather_fwd_kernel(GatherParams p, int chunk) {
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);   // b * K + k
  if (row >= int64_t(p.B) * p.K) return;
  const int b = int(row / p.K), k = int(row % p.K);
  const int j0 = blockIdx.y * chunk + lane, end = min(p.C / V, int(blockIdx.y + 1) * chunk);
  const int64_t raw = p.idx[b * p.idx_stride[0] + k * p.idx_stride[1]];
  const bool ok = raw >= 0 && raw < p.N;             // out of range: a zero row, nothing read
  const int64_t n = ok ? raw : 0;
  const T *x = static_cast<const T *>(p.x) + b * p.x_stride[1] + n * p.x_stride[2];
  T *out = static_cast<T *>(p.out) + b * p.out_stride[1] + k * p.out_stride[2];
  const bool has_pos = p.pos != nullptr;
  float pe[kUnroll][V] = {};                         // pos-embed, loaded once for all L layers
  if (has_pos && ok) {
    const T *pos = static_cast<const T *>(p.pos) + n * p.pos_stride;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = j0 + 32 * u;
      if (j < end) {
        const Pack<T, V> a = load_pack<T, V>(pos + j * V);
#pragma unroll
        for (int e = 0; e < V; ++e) pe[u][e] = to_float(a.v[e]);
      }
    }
  }
  for (int l = 0; l < p.L; ++l, x += p.x_stride[0], out += p.out_stride[0]) {
    Pack<T, V> v[kUnroll];                           // all loads of the layer first, then the stores
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (j0 + 32 * u < end) v[u] = ok ? load_pack<T, V>(x + (j0 + 32 * u) * V) : zero_pack<T, V>();
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (j0 + 32 * u >= end) continue;
      if (has_pos)                                   // fp32 add, one rounding (without pos: an exact copy)
        for (int e = 0; e < V; ++e) v[u].v[e] = from_float<T>(to_float(v[u].v[e]) + pe[u][e]);
      store_pack<T, V>(out + (j0 + 32 * u) * V, v[u]);
    }
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(32 * kWarps) masked_gather_bwd_kernel(GatherParams p, int chunk) {
  const int lane = threadIdx.x & 31;
  const int n = blockIdx.x * kWarps + (threadIdx.x >> 5);
  if (n >= p.N) return;
  const int j0 = blockIdx.y * chunk + lane, end = min(p.C / V, int(blockIdx.y + 1) * chunk);
  const T *dout = static_cast<const T *>(p.dout);
  T *dx = static_cast<T *>(p.dx) + int64_t(n) * p.dx_stride[2];
  float dpos[kUnroll][V] = {};
  int slot = p.B > 0 ? p.inv[n] : -1;
  for (int b = 0; b < p.B; ++b, dx += p.dx_stride[1]) {
    const int next = b + 1 < p.B ? p.inv[int64_t(b + 1) * p.N + n] : -1;   // prefetch the next sample's slot
    const T *src = dout + b * p.dout_stride[1] + int64_t(max(slot, 0)) * p.dout_stride[2];
    for (int l = 0; l < p.L; ++l) {
      Pack<T, V> v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        if (j0 + 32 * u < end)
          v[u] = slot >= 0 ? load_pack<T, V>(src + l * p.dout_stride[0] + (j0 + 32 * u) * V) : zero_pack<T, V>();
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (j0 + 32 * u >= end) continue;
        store_pack<T, V>(dx + l * p.dx_stride[0] + (j0 + 32 * u) * V, v[u]);
#pragma unroll
        for (int e = 0; e < V; ++e) dpos[u][e] += to_float(v[u].v[e]);
      }
    }
    slot = next;
  }
  if (p.dpos == nullptr) return;
  float *dp = p.dpos + int64_t(n) * p.C;
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int j = j0 + 32 * u;
    if (j >= end) continue;
    if constexpr (V % 4 == 0) {                      // vector path: dpos rows are 16-byte aligned
#pragma unroll
      for (int q = 0; q < V / 4; ++q)
        reinterpret_cast<float4 *>(dp + j * V)[q] =
            make_float4(dpos[u][4 * q], dpos[u][4 * q + 1], dpos[u][4 * q + 2], dpos[u][4 * q + 3]);
    } else {
      for (int e = 0; e < V; ++e) dp[j * V + e] = dpos[u][e];
    }
  }
}

// Packs per warp: the fewest chunks of at most 32 * kUnroll packs, made equal and rounded up to 32.
int chunk_packs(int packs) { return int(cdiv(cdiv(packs, cdiv(packs, 32 * kUnroll)), 32) * 32); }

template <typename T> bool vec3(const void *base, const int64_t (&stride)[3], int C) {
  return vec_ok<T>(base, stride[0], C) && vec_ok<T>(base, stride[1], C) && vec_ok<T>(base, stride[2], C);
}

template <typename T, int V> cudaError_t launch_fwd(const GatherParams &p, cudaStream_t stream) {
  const int chunk = chunk_packs(p.C / V);
  const dim3 grid(unsigned(cdiv(int64_t(p.B) * p.K, kWarps)), unsigned(cdiv(p.C / V, chunk)));
  masked_gather_fwd_kernel<T, V><<<grid, 32 * kWarps, 0, stream>>>(p, chunk);
  return cudaGetLastError();
}

template <typename T, int V> cudaError_t launch_bwd(const GatherParams &p, cudaStream_t stream) {
  const int chunk = chunk_packs(p.C / V);
  const dim3 grid(unsigned(cdiv(p.N, kWarps)), unsigned(cdiv(p.C / V, chunk)));
  masked_gather_bwd_kernel<T, V><<<grid, 32 * kWarps, 0, stream>>>(p, chunk);
  return cudaGetLastError();
}

}  // namespace

cudaError_t masked_gather_fwd(const GatherParams &p, cudaStream_t stream) {
  if (p.L == 0 || p.B == 0 || p.K == 0 || p.C == 0) return cudaSuccess;
  cudaError_t err = cudaSuccess;
  IVMINI_DISPATCH_FLOAT(p.dtype, {
    const bool vec = vec3<scalar_t>(p.x, p.x_stride, p.C) && vec3<scalar_t>(p.out, p.out_stride, p.C) &&
                     (p.pos == nullptr || vec_ok<scalar_t>(p.pos, p.pos_stride, p.C));
    err = vec ? launch_fwd<scalar_t, Vec<scalar_t>::kSize>(p, stream) : launch_fwd<scalar_t, 1>(p, stream);
  });
  return err;
}

// B == 0 or L == 0 still launches when dpos is wanted: it is written as zeros.
cudaError_t masked_gather_bwd(const GatherParams &p, cudaStream_t stream) {
  if (p.N == 0 || p.C == 0 || ((p.B == 0 || p.L == 0) && p.dpos == nullptr)) return cudaSuccess;
  cudaError_t err = cudaSuccess;
  IVMINI_DISPATCH_FLOAT(p.dtype, {
    const bool vec = vec3<scalar_t>(p.dout, p.dout_stride, p.C) && vec3<scalar_t>(p.dx, p.dx_stride, p.C) &&
                     (p.dpos == nullptr || vec_ok<float>(p.dpos, p.C, p.C));
    err = vec ? launch_bwd<scalar_t, Vec<scalar_t>::kSize>(p, stream) : launch_bwd<scalar_t, 1>(p, stream);
  });
  return err;
}

}  // namespace ivmini
