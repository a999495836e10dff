// Shared by the .cu files: error checks, dtype dispatch, fp32 <-> storage conversions and 16-byte
// vector access. Device code only ever sees float, __half and __nv_bfloat16.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "ivmini_ops.h"

namespace ivmini {

// Return the first CUDA error from a host function (launches are checked with cudaGetLastError).
#define IVMINI_CHECK(expr)                          \
  do {                                              \
    cudaError_t err_ = (expr);                      \
    if (err_ != cudaSuccess) return err_;           \
  } while (0)

#define IVMINI_CHECK_LAUNCH() IVMINI_CHECK(cudaGetLastError())

// Calls body with `scalar_t` bound to the storage type of dtype code `code` (fp32/fp16/bf16); an
// unknown code returns cudaErrorInvalidValue from the enclosing function.
#define IVMINI_DISPATCH_FLOAT(code, ...)                                  \
  switch (code) {                                                        \
    case kFloat32: { using scalar_t = float; __VA_ARGS__; break; }       \
    case kFloat16: { using scalar_t = __half; __VA_ARGS__; break; }      \
    case kBFloat16: { using scalar_t = __nv_bfloat16; __VA_ARGS__; break; } \
    default: return cudaErrorInvalidValue;                               \
  }

// The same for the tensor-core kernels, which take fp16 and bf16 only.
#define IVMINI_DISPATCH_HALF(code, ...)                                   \
  switch (code) {                                                        \
    case kFloat16: { using scalar_t = __half; __VA_ARGS__; break; }      \
    case kBFloat16: { using scalar_t = __nv_bfloat16; __VA_ARGS__; break; } \
    default: return cudaErrorInvalidValue;                               \
  }

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Round v to T's precision and back: the "cast to x.dtype" steps of the reference semantics.
template <typename T> __device__ __forceinline__ float round_to(float v) { return to_float<T>(from_float<T>(v)); }

// 16 bytes of T: 4 floats or 8 halves. Loaded and stored as one int4 (one 128-bit transaction).
template <typename T>
struct alignas(16) Vec {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

template <typename T> __device__ __forceinline__ Vec<T> load_vec(const T *p) {
  Vec<T> out;
  *reinterpret_cast<int4 *>(&out) = __ldg(reinterpret_cast<const int4 *>(p));
  return out;
}

template <typename T> __device__ __forceinline__ void store_vec(T *p, const Vec<T> &v) {
  *reinterpret_cast<int4 *>(p) = *reinterpret_cast<const int4 *>(&v);
}

// V consecutive elements of T: a 16-byte Vec on the vector path, one element on the scalar path.
template <typename T> struct One { T v[1]; };
template <typename T, int V> using Pack = std::conditional_t<V == 1, One<T>, Vec<T>>;

template <typename T, int V> __device__ __forceinline__ Pack<T, V> load_pack(const T *p) {
  if constexpr (V == 1) return {__ldg(p)};
  else return load_vec(p);
}
template <typename T, int V> __device__ __forceinline__ void store_pack(T *p, const Pack<T, V> &v) {
  if constexpr (V == 1) *p = v.v[0];
  else store_vec(p, v);
}

// True when every row start (base + i * stride elements) is 16-byte aligned and the width is a whole
// number of vectors: the condition for the vectorised paths (otherwise the scalar path runs).
template <typename T> inline bool vec_ok(const void *base, int64_t stride, int64_t width) {
  constexpr int64_t n = 16 / sizeof(T);
  return reinterpret_cast<uintptr_t>(base) % 16 == 0 && stride % n == 0 && width % n == 0;
}

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Sum over a warp, every lane gets the result.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over a block of blockDim.x threads (a multiple of 32, at most 1024); every thread gets the
// result. `scratch` is 32 floats of shared memory; the call contains __syncthreads.
__device__ __forceinline__ float block_sum(float v, float *scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();                 // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : 0.f;
  return warp_sum(v);
}

}  // namespace ivmini
