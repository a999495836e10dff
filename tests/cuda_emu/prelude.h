// Host emulation of the CUDA execution model, enough for the csrc/*.cu kernels to compile with g++ and run
// on a CPU: each thread of a block is a fiber (ucontext) run in a random order, __syncthreads and
// warp-wide operations (shuffles, mma) are real barriers, shared memory starts as NaN for every block.
// Used by tests/test_cuda_emulated.py, which rewrites every `__shared__` declaration of a kernel into
// block-shared storage here (dynamic: a pointer to emu::smem_lo; static: emu::block_shared<type[n]>()),
// and every launch into emu_launch. The PTX instructions themselves are in ptx_emu.inc.
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
#include <memory>

#undef __global__
#undef __device__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ __shared__must_be_rewritten_by_tests_test_cuda_emulated_py

namespace emu {
struct Copy { void *dst; unsigned char data[16]; int bytes; };   // one cp.async of 4 or 16 bytes
struct Fiber {
  ucontext_t ctx;
  char *stack = nullptr;
  uint3 tid;
  size_t shared_used = 0;   // bytes of static_smem handed out to this thread's __shared__ declarations
  const long *wait_gen = nullptr;   // blocked in a barrier until *wait_gen != wait_val
  long wait_val = 0;
  unsigned priority = 0;
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
// Dynamic shared memory (extern __shared__): [smem_lo, smem_hi); a caller may point these at its own buffer.
alignas(16) inline unsigned char dyn_smem[256 * 1024];
inline unsigned char *smem_lo = dyn_smem, *smem_hi = dyn_smem + sizeof(dyn_smem);
// Static shared memory (__shared__ T a[n] in a kernel): every thread of a block makes the same declarations
// in the same order, so the i-th one of each thread lands at the same offset: one array per block.
alignas(16) inline unsigned char static_smem[48 * 1024];
inline int sm_count = 132;                 // what cudaDeviceGetAttribute(MultiProcessorCount) reports
constexpr size_t kStackBytes = 1 << 18;
inline std::vector<std::unique_ptr<char[]>> stack_pool;   // fiber stacks, reused from block to block
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
  fibers[cur].wait_gen = &b.gen, fibers[cur].wait_val = g;   // not scheduled again until the barrier opens
  long spins = 0;
  while (b.gen == g) { yield(); if (++spins > 50000000) { fprintf(stderr, "deadlock\n"); abort(); } }
  fibers[cur].wait_gen = nullptr;
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
    if ((int)stack_pool.size() <= i) stack_pool.emplace_back(new char[kStackBytes]);
    f.stack = stack_pool[i].get();
    f.tid = make_uint3(i, 0, 0);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &sched_ctx;
    makecontext(&f.ctx, trampoline, 0);
  }
  block_bar = Barrier();
  for (auto &w : warp_bar) w = Barrier();
  // Schedule: every other block (at random) picks any runnable thread at random; the others run the runnable
  // thread of highest priority (a random order per block) until it blocks, so that one warp can race ahead
  // of another -- the schedule that exposes a missing __syncthreads.
  const bool by_priority = rng() % 2;
  for (auto &f : fibers) f.priority = rng();
  std::vector<int> live(nthreads), runnable;
  for (int i = 0; i < nthreads; ++i) live[i] = i;
  while (!live.empty()) {
    runnable.clear();
    for (int k = 0; k < (int)live.size(); ++k) {
      const Fiber &f = fibers[live[k]];
      if (!f.wait_gen || *f.wait_gen != f.wait_val) runnable.push_back(k);
    }
    if (runnable.empty()) { fprintf(stderr, "deadlock: every live thread waits in a barrier\n"); abort(); }
    int k = runnable[rng() % runnable.size()];
    if (by_priority)
      for (int r : runnable) if (fibers[live[r]].priority > fibers[live[k]].priority) k = r;
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

// The storage of one static __shared__ array (the rewrite of `__shared__ T name[n];`).
template <typename A> A &block_shared() {
  Fiber &f = fibers[cur];
  const size_t off = (f.shared_used + 15) & ~size_t(15);
  f.shared_used = off + sizeof(A);
  if (f.shared_used > sizeof(static_smem)) { fprintf(stderr, "static shared memory over 48 KB\n"); abort(); }
  return *reinterpret_cast<A *>(static_smem + off);
}

// Warp exchange: every lane of the warp publishes v, then reads lane src's value (its own if src is off
// the warp, as __shfl_down_sync does past the last lane).
template <typename T> inline T shuffle(unsigned mask, T v, int src) {
  static_assert(sizeof(T) == 4, "32-bit shuffles only");
  if (mask != 0xffffffffu) { fprintf(stderr, "partial-warp shuffle masks are not emulated\n"); abort(); }
  const int w = warp(), l = lane();
  memcpy(&slots[w][l].u[0], &v, 4);
  warp_sync();
  T r;
  memcpy(&r, &slots[w][src >= 0 && src < 32 ? src : l].u[0], 4);
  warp_sync();
  return r;
}
}  // namespace emu

#define threadIdx (emu::fibers[emu::cur].tid)
#define blockIdx (emu::block_idx)
#define gridDim (emu::grid_dim)
#define blockDim (emu::block_dim)

inline void __syncthreads() { emu::arrive(emu::block_bar, emu::block_dim.x); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_sync(); }
template <typename T> inline T __shfl_xor_sync(unsigned mask, T v, int m) { return emu::shuffle(mask, v, emu::lane() ^ m); }
template <typename T> inline T __shfl_sync(unsigned mask, T v, int src) { return emu::shuffle(mask, v, src & 31); }
template <typename T> inline T __shfl_down_sync(unsigned mask, T v, unsigned d) { return emu::shuffle(mask, v, emu::lane() + (int)d); }
template <typename T> inline T __shfl_up_sync(unsigned mask, T v, unsigned d) { return emu::shuffle(mask, v, emu::lane() - (int)d); }
// Byte i of the result is byte (s >> 4i) & 7 of the 8 bytes {y:x} (x the low four).
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t v = (uint64_t)y << 32 | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= (unsigned)((v >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
  return r;
}
// Read-only loads (scalars and the vector types int4/uint4/uint2/float4...): must be naturally aligned.
template <typename T> inline T __ldg(const T *p) {
  if ((uintptr_t)p % alignof(T)) { fprintf(stderr, "__ldg misaligned (%zu-byte type)\n", sizeof(T)); abort(); }
  return *p;
}
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }

#define cudaFuncSetAttribute(...) cudaSuccess
#define cudaGetLastError() cudaSuccess
#define cudaGetDevice(dev) (*(dev) = 0, cudaSuccess)
#define cudaDeviceGetAttribute(value, attr, dev) (*(value) = emu::sm_count, cudaSuccess)

template <typename Kernel, typename... Args>
void emu_launch(Kernel kernel, dim3 grid, int threads, int smem_bytes, cudaStream_t, Args... args) {
  assert(smem_bytes <= emu::smem_hi - emu::smem_lo);
  assert(smem_bytes <= 227 * 1024);
  if (threads <= 0 || threads > 1024 || threads % 32 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 ||
      grid.z > 65535) {   // the kernels here always launch whole warps; a zero or oversized grid is a launch error
    fprintf(stderr, "bad launch configuration: grid (%u, %u, %u), %d threads\n", grid.x, grid.y, grid.z, threads);
    abort();
  }
  emu::grid_dim = make_uint3(grid.x, grid.y, grid.z);
  emu::block_dim = make_uint3(threads, 1, 1);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        emu::block_idx = make_uint3(x, y, z);
        memset(emu::smem_lo, 0xff, emu::smem_hi - emu::smem_lo);   // NaN poison
        memset(emu::static_smem, 0xff, sizeof(emu::static_smem));
        emu::body = [&] { kernel(args...); };
        emu::run_block(threads);
      }
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
