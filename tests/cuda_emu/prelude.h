// Host emulation of the CUDA execution model, enough for csrc/flash_attn.cu to compile with g++ and run
// on a CPU: each thread of a block is a fiber (ucontext) run in a random order, __syncthreads and
// warp-wide operations are real barriers, shared memory starts as NaN for every block. Used by
// tests/test_cuda_emulated.py; the PTX instructions themselves are in ptx_emu.inc.
#pragma once
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <ucontext.h>
#include <cassert>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <vector>
#include <algorithm>

#undef __global__
#undef __device__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__

namespace emu {
struct Copy { void *dst; unsigned char data[16]; };
struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  uint3 tid;
  bool done = false;
  std::vector<Copy> batch;
  std::vector<std::vector<Copy>> groups;
};
inline std::vector<Fiber> fibers;
inline int cur = -1;
inline ucontext_t sched_ctx;
inline uint3 block_idx, grid_dim, block_dim;
inline std::function<void()> body;
inline std::mt19937 rng(1234);
inline unsigned char *smem_lo = nullptr, *smem_hi = nullptr;
struct Range { const char *lo, *hi; };
inline std::vector<Range> global_ranges;   // cp.async sources must fall in one of these

inline void yield() { swapcontext(&fibers[cur].ctx, &sched_ctx); }

// Generic barrier for `n` participants keyed by an id.
struct Barrier { int count = 0; long gen = 0; };
inline Barrier block_bar;
inline Barrier warp_bar[32];
inline void arrive(Barrier &b, int n) {
  long g = b.gen;
  if (++b.count == n) { b.count = 0; ++b.gen; return; }
  long spins = 0;
  while (b.gen == g) { yield(); if (++spins > 50000000) { fprintf(stderr, "deadlock\n"); abort(); } }
}
inline int lane() { return fibers[cur].tid.x & 31; }
inline int warp() { return fibers[cur].tid.x >> 5; }
inline void warp_sync() { arrive(warp_bar[warp()], 32); }

// Per-warp exchange slots.
struct Slot { uint32_t u[8]; float f[4]; const void *ptr; };
inline Slot slots[32][32];

inline void trampoline() {
  body();
  fibers[cur].done = true;
  // cp.async groups left uncommitted/unwaited at exit: apply them (hardware would finish them)
  swapcontext(&fibers[cur].ctx, &sched_ctx);
}

inline void run_block(int nthreads) {
  fibers.clear();
  fibers.resize(nthreads);
  for (int i = 0; i < nthreads; ++i) {
    Fiber &f = fibers[i];
    f.stack.resize(1 << 18);
    f.tid = make_uint3(i, 0, 0);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = &sched_ctx;
    makecontext(&f.ctx, trampoline, 0);
  }
  block_bar = Barrier();
  for (auto &w : warp_bar) w = Barrier();
  std::vector<int> live(nthreads);
  for (int i = 0; i < nthreads; ++i) live[i] = i;
  while (!live.empty()) {
    int k = rng() % live.size();
    cur = live[k];
    swapcontext(&sched_ctx, &fibers[cur].ctx);
    if (fibers[cur].done) {
      if (!fibers[cur].groups.empty() || !fibers[cur].batch.empty()) {
        // a thread exiting with cp.async in flight is legal on hardware but our kernels always wait
        fprintf(stderr, "thread %d exited with cp.async pending\n", cur);
      }
      live.erase(live.begin() + k);
    }
  }
  cur = -1;
}
}  // namespace emu

#define threadIdx (emu::fibers[emu::cur].tid)
#define blockIdx (emu::block_idx)
#define gridDim (emu::grid_dim)
#define blockDim (emu::block_dim)

inline void __syncthreads() { emu::arrive(emu::block_bar, emu::block_dim.x); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_sync(); }
template <typename T> inline T __shfl_xor_sync(unsigned mask, T v, int m) {
  assert(mask == 0xffffffffu);
  int w = emu::warp(), l = emu::lane();
  static_assert(sizeof(T) == 4, "");
  memcpy(&emu::slots[w][l].u[0], &v, 4);
  emu::warp_sync();
  T r;
  memcpy(&r, &emu::slots[w][l ^ m].u[0], 4);
  emu::warp_sync();
  return r;
}
template <typename T> inline T __ldg(const T *p) { return *p; }

#define cudaFuncSetAttribute(...) cudaSuccess
#define cudaGetLastError() cudaSuccess

template <typename Kernel, typename... Args>
void emu_launch(Kernel kernel, dim3 grid, int threads, int smem_bytes, cudaStream_t, Args... args) {
  assert(smem_bytes <= emu::smem_hi - emu::smem_lo);
  assert(smem_bytes <= 227 * 1024);
  emu::grid_dim = make_uint3(grid.x, grid.y, grid.z);
  emu::block_dim = make_uint3(threads, 1, 1);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        emu::block_idx = make_uint3(x, y, z);
        memset(emu::smem_lo, 0xff, emu::smem_hi - emu::smem_lo);   // NaN poison
        emu::body = [&] { kernel(args...); };
        emu::run_block(threads);
      }
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
