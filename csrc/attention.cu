// Flash attention, forward and backward, on tensor cores (mma.sync, sm_80+; runs unchanged on sm_90a).
// The CUDA twin of kernels/triton/attention.py; the semantics are kernels/ref.py::attention:
//
//     o = softmax(q k^T * scale + bias + mask) v      q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D)
//     GQA: query head h reads kv head h / (Hq / Hkv)
//     bias: optional, fp32 (B, Hq, Nq, Nk) with any element strides (0 for a broadcast dim); -inf allowed
//     mask: keys j >= Nk, causal bottom-right (query i sees keys j <= i + Nk - Nq), key padding kpm[b, j] == 0
//     a query row that sees no key (masked, or a -inf bias on every visible key): o = 0, lse = -inf, and it
//     adds nothing to any gradient (dq row = 0)
//     dbias = dS = P (dP - delta), the gradient of the biased scores: (B, Hq, Nq, Nk) fp32, when asked for
//
// fp16/bf16 storage, fp32 accumulation. Head dims: any D % 8 == 0 up to 128, run by the smallest compiled
// D_T >= D of {32, 64, 88, 96, 128}; columns D..D_T-1 are loaded as zeros and never stored. D_T = 88
// (InternVideo2-1B) is not padded: where the head dim is the reduction of an mma (S = Q K^T, dP = dO V^T)
// it takes 5 k16 steps and one k8 step (m16n8k8), where it is the output side (O = P V, dV, dK, dQ) it is
// 11 n8 tiles. 88 costs exactly 88 columns, against 96 for FA2/FA3 and 128 for a pad-to-pow2 kernel.
//
// Tiling (all kernels: 4 warps, 128 threads; every mma is m16n8k*; a warp owns 16 rows of the output tile, one
// m16 fragment, except in the forward without a bias: two fragments, 32 rows):
//   forward   one CTA per (128 queries, head, batch) streaming 32-key blocks of K and V; with a bias, 64
//             queries and 64-key blocks (FwdTiling, the table below). Q is loaded once into registers as A
//             fragments (D_T = 128: kept in its own shared tile and read again at every block); K and V go
//             through shared memory (cp.async, double buffered). Per block each warp computes S = Q K^T
//             (32 x 32 in registers: every K fragment it loads serves both of its fragments), masks it, runs
//             the online softmax in base 2 (scale * log2(e) folded into one multiply) and adds P V into its
//             two 16 x D_T fp32 accumulators (every V fragment serves both). P goes from the S accumulators
//             straight into A fragments (see pack_a): no shared-memory round trip. Causal CTAs stop at their
//             last visible key block, and a warp skips the blocks wholly past its diagonal and, in the last
//             CTA, everything when its rows lie past Nq. Saves lse = m + log(l) (natural log) per query; rows
//             with l == 0 store o = 0, lse = -inf.
//   backward  recomputation, three kernels, no atomics (so the result does not depend on scheduling and GQA
//             needs no reduction pass afterwards):
//     delta   delta = rowsum(dout * o) in fp32, 16 lanes per row.
//     dK, dV  one CTA per (64 keys, kv head, batch): K, V stay in shared memory; the CTA loops over every
//             query head of the GQA group and every query block that can see its keys (32 or 64 queries:
//             kBwdBlockQ), double buffered, and each warp computes for its 16 keys S^T = K Q^T,
//             P^T = exp2(S^T scale log2e - lse log2e), dV += P^T dO, dP^T = V dO^T,
//             dS^T = P^T (dP^T - delta), dK += dS^T Q. Keys no query sees keep their zero accumulators.
//     dQ      one CTA per (64 queries, head, batch): Q, dO in shared memory, K/V blocks streamed like the
//             forward; S = Q K^T, P, dP = dO V^T, dS = P (dP - delta), dQ += dS K; with a bias, dbias = dS
//             is stored from the fp32 registers, and zeros for the keys past the causal limit of the block.
//   The separate dQ pass recomputes Q K^T and dO V^T (7 mma passes instead of 5), the price of writing dQ
//   without an fp32 atomic accumulator. In the backward the stationary operands (K, V in dK/dV; Q, dO in
//   dQ) are read from shared memory at each use rather than held in registers: with two fp32 accumulators
//   of 16 x 128 per warp there is no room left for them.
//   bias      each kernel copies the bias tile of its current (query block, key block) into shared memory with
//             4-byte cp.async, in the same double-buffered stage as the K/V (forward, dQ) or Q/dO (dK/dV)
//             tiles, and adds bias * log2(e) to the base-2 scores S before the mask: to the forward's online
//             softmax, and to the recomputed P of both backward passes. Shared memory, not direct global loads,
//             because the dK/dV kernel sits at 235-246 of 255 registers: 32 bias values prefetched per lane
//             (or their 64-bit addresses) spill it. The bias is a template flag (kBias), not a runtime branch:
//             the kernels without a bias carry none of its code, registers or shared memory, at the price of
//             twice the instantiations (attention.cu compiles in ~45 s on 2 cores, for sm_80 + sm_90a).
//
// Fragments (PTX ISA, mma.m16n8k16 with 16-bit inputs; g = lane / 4, t = lane % 4; a .b32 register holds two
// consecutive 16-bit elements, the lower column / k index in the low half):
//   A 16x16 row-major  a0 = (g, 2t..2t+1)  a1 = (g+8, 2t..2t+1)  a2 = (g, 2t+8..2t+9)  a3 = (g+8, 2t+8..2t+9)
//   B 16x8 ("col")     b0 = (k 2t..2t+1, n g)  b1 = (k 2t+8..2t+9, n g)
//   C 16x8 fp32        c0, c1 = (g, 2t..2t+1)  c2, c3 = (g+8, 2t..2t+1)
//   m16n8k8            A: a0 = (g, k 2t..2t+1), a1 = (g+8, k 2t..2t+1); B: b0 = (k 2t..2t+1, n g)
// All operands come from shared memory through ldmatrix (lane 8i+r gives the address of row r of 8x8 matrix
// i; the lane 4r+c receives (row r, cols 2c..2c+1) of each matrix, or with .trans (rows 2c..2c+1, col r)).
// Shared tiles are row-major with a pitch of an odd number of 16-byte units (88 is 11 already; 64 -> 72),
// so the 8 rows one ldmatrix phase reads fall in 8 different bank groups: no bank conflicts, no swizzle.
//
// Napkin math (InternVideo2-1B: B=32, H=16, d=88, N=2049, bf16), per layer:
//   FLOPs    forward 4 B H N^2 d = 757 GFLOP; backward credited 2.5x = 1.89 TFLOP (5 matmuls), executed
//            3.5x = 2.65 TFLOP here (7 matmuls: the dQ pass recomputes two).
//   bytes    q, k, v, o: 4 x 2 B H N d = 0.74 GB (the backward adds dout, dq, dk, dv): ~1000 FLOP/byte, far
//            above the H100 ridge (~270-300 FLOP/byte), so compute bound, judged in TFLOP/s against the
//            measured 798 TFLOP/s bf16 matmul.
//   on chip  per key block of BN keys a warp with R query rows does 4 R BN d FLOPs and reads the K and V
//            blocks from shared memory, 4 BN d bytes: R FLOP per byte (+ 2 R d bytes when Q is read again:
//            4 R BN / (4 BN + 2 R) FLOP per byte). An H100 SM reads 128 B/clk of shared memory and its dense
//            tensor peak is 4096 FLOP/clk (989 TFLOP/s), so
//              R = 16 (bias variants, and the whole backward)   16 FLOP/B -> 2048 FLOP/clk/SM, half the peak
//              R = 32, Q in registers (D_T <= 96)              32 FLOP/B -> 4096: the peak; shared memory no
//                                                              longer caps mma.sync
//              R = 32, Q re-read (D_T = 128, BN = 32)       21.3 FLOP/B -> 2731, ~2/3 of the peak
//            Past that the caps are mma.sync's issue rate (FA2 reaches 362 TFLOP/s forward at d=128, N=2k on an
//            H100; FA3's 625 needs wgmma, TMA and warp specialisation) and exp2 on the SFU: 16/clk/SM against
//            4096 / 4d = 11.6 scores/clk at d=88 at the peak.
//   registers ptxas -v (nvcc 13), sm_80 / sm_90a, fp16 = bf16; 255 allowed; CTAs of 128 threads per SM:
//            4 up to 128 registers, 3 up to 168, else 2. Shipped, no spills in any variant:
//              D_T                          32        64        88        96        128
//              forward, 32 rows x 32 keys   130/128   195/194   236/234   247/246   238/242 (Q in shared)
//              forward, 16 x 64, bias       135/134   137/137   167/175   180/178   215/219
//            for comparison, 16 rows x 64 keys without a bias: 101/106 135/143 160/162 168/170 177/182 (3 CTAs
//            per SM at d = 88 instead of 2, but half the FLOPs per byte of shared memory). Measured and
//            rejected because they spill (bytes stored, sm_80 / sm_90a): 32 rows with Q in registers at
//            D_T = 128 (112/160 with 32 keys); 32 rows x 64 keys with Q in registers from D_T = 88 (60 on sm_80
//            at 88, 612 at 128) or with Q in shared from D_T = 96 (0/36 at 96, 48/52 at 128; 255 registers at
//            88 on sm_80); with a bias, 32 rows x 32 keys with Q in registers at D_T >= 96 (12/12 at 96). 32
//            rows with a bias fit only with Q in shared and 32 keys (222-253 registers); the bias variants
//            keep 16 rows: they are memory bound (below).
//   bias     4 bytes read per score and pass against 4d FLOP per score in the forward: 88 FLOP/byte at d=88,
//            under the ridge. A full (B, H, N, N) bias is 2.15 G scores = 8.6 GB: ~2.9 ms of HBM traffic at
//            ~3 TB/s against ~1.9 ms of forward math at 400 TFLOP/s, so the forward turns memory bound; the
//            backward reads it twice and writes dbias (25.8 GB, ~8.6 ms against ~6.6 ms). A broadcast dim saves
//            HBM reads only while the shared tile is still in L2 (50 MB on an H100): (1, 1, N, N) at N = 2049
//            (16.8 MB) is, (1, H, N, N) (268 MB) is not. The bias is as large as the score matrix flash attention
//            exists not to store: use one for short sequences (BEATs: N ~ 500), not the 2049-token video tower.
// Limits: no wgmma/TMA path (Hopper runs the sm_80 design); one tile shape per kernel for every D_T (forward
// 128 x 32 or, with a bias, 64 x 64; backward 64 x 64); 2 CTAs (8 warps) per SM for the forward at D_T >= 64
// (3 before, at 16 rows per warp); N = 2049 pays a 64-key block for its CLS token in the backward (+3%) and a
// 128-query CTA in the forward, whose warps past Nq skip their math; pointers and strides must be 16-byte
// aligned (kernels/cuda/ops.py makes them so), otherwise cudaErrorInvalidValue; the bias moves 4 bytes per
// cp.async (any strides, no 16-byte path for a contiguous one); with a bias the D_T = 128 dQ kernel needs 142 KB
// of shared memory: one CTA per SM.
//
// Test: pytest tests/test_attention.py (GPU, backend "cuda"); on CPU, tests/test_cuda_emulated.py runs this file
// under emulation.     Benchmark: python -m kernels.bench attention
#include <cstring>
#include <type_traits>

#include "common.cuh"

namespace ivmini {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kBlockM = 16 * kWarps;   // query rows per dQ CTA (forward with a bias), key rows per dK/dV CTA
constexpr int kBlockN = 64;            // keys per streamed block (forward, dQ)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Per head-dim constants. The row pitch (elements) of every shared tile is D_T padded to an odd number of
// 16-byte units: the 8 rows of an ldmatrix phase then start in 8 different 16-byte bank groups.
template <int D_T>
struct HeadDim {
  static_assert(D_T % 8 == 0 && D_T >= 32 && D_T <= 128, "compiled head dims: multiples of 8 in 32..128");
  static constexpr int kPitch = D_T + ((D_T / 8) % 2 == 0 ? 8 : 0);
  static constexpr int kK16 = D_T / 16;          // k16 steps when the head dim is the mma reduction
  static constexpr bool kK8 = D_T % 16 == 8;     // ... plus one k8 step (88 = 5 * 16 + 8)
  static constexpr int kN8 = D_T / 8;            // n8 tiles when the head dim is the mma output side
  static constexpr int kTileBytes = kBlockM * kPitch * 2;   // one 64-row tile of 16-bit elements
};
static_assert(kBlockM == kBlockN, "one tile size serves Q, K, V, dO tiles");

// Queries per inner step of the dK/dV kernel: two 16 x BQ fp32 score tiles live next to the two 16 x D_T
// fp32 accumulators. 64 fits up to D_T = 96 (235-244 registers, no spills); 128 takes 32 at a time.
template <int D_T> constexpr int kBwdBlockQ = D_T <= 96 ? 64 : 32;

// ---------------------------------------------------------------------------------------------
// PTX wrappers: tensor-core mma, ldmatrix, cp.async, ex2

__device__ __forceinline__ uint32_t smem_addr(const void *p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// d (16x8 fp32, C layout) += a (16x16, A layout) * b (16x8, B layout).
template <typename T>
__device__ __forceinline__ void mma_k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>)
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// d (16x8 fp32) += a (16x8, m16n8k8 A layout) * b (8x8, m16n8k8 B layout).
template <typename T>
__device__ __forceinline__ void mma_k8(float (&d)[4], const uint32_t (&a)[2], uint32_t b0) {
  if constexpr (std::is_same_v<T, __half>)
    asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(b0));
  else
    asm("mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(b0));
}

// ldmatrix: r[i] = this lane's piece of the 8x8 matrix whose rows lanes 8i..8i+7 address (see the header).
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void *row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(row)) : "memory");
}
__device__ __forceinline__ void ldsm_x2(uint32_t (&r)[2], const void *row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(row)) : "memory");
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void *row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(row)) : "memory");
}
__device__ __forceinline__ void ldsm_x2_trans(uint32_t (&r)[2], const void *row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(row)) : "memory");
}

// 16 bytes global -> shared without passing through registers; zero-filled when !ok (src is not read then).
__device__ __forceinline__ void cp_async_16(void *dst, const void *src, bool ok) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
               :: "r"(smem_addr(dst)), "l"(src), "r"(ok ? 16 : 0) : "memory");
}
// 4 bytes global -> shared (cp.async.ca: the only form for copies under 16 bytes); zero-filled when !ok.
__device__ __forceinline__ void cp_async_4(void *dst, const void *src, bool ok) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n"
               :: "r"(smem_addr(dst)), "l"(src), "r"(ok ? 4 : 0) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Wait until at most n of this thread's committed groups are still in flight.
template <int n>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" :: "n"(n) : "memory"); }

// 2^x on the SFU (ex2.approx: 2 ulp; ex2(-inf) = +0).
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// ---------------------------------------------------------------------------------------------
// fragments: shared tile -> registers (ldmatrix), accumulators -> A fragments

// Two floats -> one .b32 of two 16-bit elements, lo in the low half (the lower column / k index).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t u;
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 h = __floats2half2_rn(lo, hi);
    memcpy(&u, &h, 4);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    memcpy(&u, &h, 4);
  }
  return u;
}

// A fragment (16x16) of rows row0..row0+15, cols col0..col0+15 of a row-major tile.
// Matrices: 0 = (rows 0-7, cols 0-7) -> a0, 1 = (rows 8-15, cols 0-7) -> a1, 2 = (rows 0-7, cols 8-15) -> a2,
// 3 = (rows 8-15, cols 8-15) -> a3; lane l addresses row (l & 15), col block (l >> 4) of them.
template <int P, typename T>
__device__ __forceinline__ void lds_a16(uint32_t (&a)[4], const T *tile, int row0, int col0) {
  const int l = threadIdx.x & 31;
  ldsm_x4(a, tile + (row0 + (l & 15)) * P + col0 + (l >> 4) * 8);
}

// m16n8k8 A fragment (16x8): matrix 0 = rows 0-7 -> a0, matrix 1 = rows 8-15 -> a1 (lanes 0-15 address).
template <int P, typename T>
__device__ __forceinline__ void lds_a8(uint32_t (&a)[2], const T *tile, int row0, int col0) {
  const int l = threadIdx.x & 31;
  ldsm_x2(a, tile + (row0 + (l & 15)) * P + col0);
}

// B fragments of two n8 tiles for one k16 step, from a tile stored [n][k] (B(k, n) = tile[n0 + n][k0 + k]):
// b0 of n8 tile j = (k 2t..2t+1, n g) = tile[n0 + 8j + g][k0 + 2t..] is (row g, cols 2t..) of an 8x8 matrix.
// Matrices: 0 = (n 0-7, k 0-7) -> b[0][0], 1 = (n 0-7, k 8-15) -> b[0][1], 2 = (n 8-15, k 0-7) -> b[1][0],
// 3 = (n 8-15, k 8-15) -> b[1][1]; lane l addresses n row (l & 7) + 8 (l >> 4), k block (l >> 3) & 1.
template <int P, typename T>
__device__ __forceinline__ void lds_b_nk(uint32_t (&b)[2][2], const T *tile, int n0, int k0) {
  const int l = threadIdx.x & 31;
  uint32_t r[4];
  ldsm_x4(r, tile + (n0 + (l & 7) + (l >> 4) * 8) * P + k0 + ((l >> 3) & 1) * 8);
  b[0][0] = r[0], b[0][1] = r[1], b[1][0] = r[2], b[1][1] = r[3];
}

// m16n8k8 B fragments (b0 = (k 2t..2t+1, n g)) of four n8 tiles, from a tile stored [n][k]:
// matrix j = rows n0+8j..n0+8j+7, cols k0..k0+7, i.e. lane l addresses row n0 + l.
template <int P, typename T>
__device__ __forceinline__ void lds_b_nk_k8(uint32_t (&b)[4], const T *tile, int n0, int k0) {
  const int l = threadIdx.x & 31;
  ldsm_x4(b, tile + (n0 + l) * P + k0);
}

// B fragments of two n8 tiles (n0..n0+7, n0+8..n0+15) for one k16 step, from a tile stored [k][n]
// (B(k, n) = tile[k0 + k][n0 + n], e.g. V[key][d]): b0 = (k 2t..2t+1, n g) = rows 2t, 2t+1 of column g of an
// 8x8 matrix: ldmatrix .trans. Matrices: 0 = (k 0-7, n 0-7) -> b[0][0], 1 = (k 8-15, n 0-7) -> b[0][1],
// 2 = (k 0-7, n 8-15) -> b[1][0], 3 = (k 8-15, n 8-15) -> b[1][1]; lane l addresses k row (l & 15), n block l >> 4.
template <int P, typename T>
__device__ __forceinline__ void lds_b_kn(uint32_t (&b)[2][2], const T *tile, int k0, int n0) {
  const int l = threadIdx.x & 31;
  uint32_t r[4];
  ldsm_x4_trans(r, tile + (k0 + (l & 15)) * P + n0 + (l >> 4) * 8);
  b[0][0] = r[0], b[0][1] = r[1], b[1][0] = r[2], b[1][1] = r[3];
}

// The same for one n8 tile: matrices 0 = (k 0-7) -> b[0], 1 = (k 8-15) -> b[1] (lanes 0-15 address).
template <int P, typename T>
__device__ __forceinline__ void lds_b_kn1(uint32_t (&b)[2], const T *tile, int k0, int n0) {
  const int l = threadIdx.x & 31;
  ldsm_x2_trans(b, tile + (k0 + (l & 15)) * P + n0);
}

// The accumulators of n8 tiles 2j and 2j+1 (cols 16j..16j+15), rounded to T, are the A fragment of k16
// step j: a0 = (g, 2t..) = tile 2j c0,c1; a1 = (g+8, 2t..) = tile 2j c2,c3; a2 = (g, 8+2t..) = tile 2j+1
// c0,c1; a3 = (g+8, 8+2t..) = tile 2j+1 c2,c3. This is how P and dS reach the next mma.
template <typename T, int NT>
__device__ __forceinline__ void pack_a(uint32_t (&a)[NT / 2][4], const float (&c)[NT][4]) {
#pragma unroll
  for (int j = 0; j < NT / 2; ++j) {
    a[j][0] = pack2<T>(c[2 * j][0], c[2 * j][1]);
    a[j][1] = pack2<T>(c[2 * j][2], c[2 * j][3]);
    a[j][2] = pack2<T>(c[2 * j + 1][0], c[2 * j + 1][1]);
    a[j][3] = pack2<T>(c[2 * j + 1][2], c[2 * j + 1][3]);
  }
}

// ---------------------------------------------------------------------------------------------
// warp-level matrix products (each warp: 16 rows)

// "NT" products: acc (16 x 8NT) += A (16 x D_T) B^T with B stored [n][d] (shared tile sB):
// they contract the head dim (S = Q K^T, dP = dO V^T, S^T = K Q^T, dP^T = V dO^T). One k16 step at column k0:
template <typename T, int D_T, int NT>
__device__ __forceinline__ void gemm_nt_k16(float (&acc)[NT][4], const uint32_t (&a)[4], const T *sB, int k0) {
#pragma unroll
  for (int n = 0; n < NT; n += 2) {
    uint32_t b[2][2];
    lds_b_nk<HeadDim<D_T>::kPitch>(b, sB, 8 * n, k0);
    mma_k16<T>(acc[n], a, b[0][0], b[0][1]);
    mma_k16<T>(acc[n + 1], a, b[1][0], b[1][1]);
  }
}

// ... and the k8 step (m16n8k8) that ends a reduction over D_T = 16 k + 8.
template <typename T, int D_T, int NT>
__device__ __forceinline__ void gemm_nt_k8(float (&acc)[NT][4], const uint32_t (&a)[2], const T *sB, int k0) {
  static_assert(NT % 4 == 0, "the k8 step loads B for four n8 tiles at a time");
#pragma unroll
  for (int n = 0; n < NT; n += 4) {
    uint32_t b[4];
    lds_b_nk_k8<HeadDim<D_T>::kPitch>(b, sB, 8 * n, k0);
#pragma unroll
    for (int j = 0; j < 4; ++j) mma_k8<T>(acc[n + j], a, b[j]);
  }
}

// The whole reduction, A read from rows a_row0..a_row0+15 of a shared tile, one k step at a time (the
// backward's K, V, Q, dO).
template <typename T, int D_T, int NT>
__device__ __forceinline__ void warp_gemm_nt(float (&acc)[NT][4], const T *sA, int a_row0, const T *sB) {
  constexpr int P = HeadDim<D_T>::kPitch;
#pragma unroll
  for (int ks = 0; ks < HeadDim<D_T>::kK16; ++ks) {
    uint32_t a[4];
    lds_a16<P>(a, sA, a_row0, 16 * ks);
    gemm_nt_k16<T, D_T>(acc, a, sB, 16 * ks);
  }
  if constexpr (HeadDim<D_T>::kK8) {
    uint32_t a8[2];
    lds_a8<P>(a8, sA, a_row0, D_T - 8);
    gemm_nt_k8<T, D_T>(acc, a8, sB, D_T - 8);
  }
}

// The forward's version for MF row fragments at once (acc[f] += A[f] B^T, fragment f = 16 rows): each B
// fragment read from shared memory serves all MF of them. (The backward keeps the one-fragment code above:
// routed through this one, ptxas allocates its kernels differently, e.g. dQ at D_T = 64 on sm_80 166 -> 182
// registers, one CTA fewer per SM.) A is held in registers (kARegs: Q, fragment f
// has k16 pieces a[f][ks] and the k8 tail a8[f]), or read from rows a_row0 + 16 f .. + 15 of the shared
// tile sA one k step at a time.
template <typename T, int D_T, bool kARegs, int MF, int NT>
__device__ __forceinline__ void warp_gemm_nt_frags(float (&acc)[MF][NT][4],
                                                   const uint32_t (&a)[MF][HeadDim<D_T>::kK16][4],
                                                   const uint32_t (&a8)[MF][2], const T *sA, int a_row0,
                                                   const T *sB) {
  constexpr int P = HeadDim<D_T>::kPitch;
#pragma unroll
  for (int ks = 0; ks < HeadDim<D_T>::kK16; ++ks) {
    uint32_t ak[MF][4];
#pragma unroll
    for (int f = 0; f < MF; ++f) {
      if constexpr (kARegs)
#pragma unroll
        for (int i = 0; i < 4; ++i) ak[f][i] = a[f][ks][i];
      else lds_a16<P>(ak[f], sA, a_row0 + 16 * f, 16 * ks);
    }
#pragma unroll
    for (int n = 0; n < NT; n += 2) {
      uint32_t b[2][2];
      lds_b_nk<P>(b, sB, 8 * n, 16 * ks);
#pragma unroll
      for (int f = 0; f < MF; ++f) {
        mma_k16<T>(acc[f][n], ak[f], b[0][0], b[0][1]);
        mma_k16<T>(acc[f][n + 1], ak[f], b[1][0], b[1][1]);
      }
    }
  }
  if constexpr (HeadDim<D_T>::kK8) {
    static_assert(NT % 4 == 0, "the k8 step loads B for four n8 tiles at a time");
    uint32_t ak[MF][2];
#pragma unroll
    for (int f = 0; f < MF; ++f) {
      if constexpr (kARegs) ak[f][0] = a8[f][0], ak[f][1] = a8[f][1];
      else lds_a8<P>(ak[f], sA, a_row0 + 16 * f, D_T - 8);
    }
#pragma unroll
    for (int n = 0; n < NT; n += 4) {
      uint32_t b[4];
      lds_b_nk_k8<P>(b, sB, 8 * n, D_T - 8);
#pragma unroll
      for (int f = 0; f < MF; ++f)
#pragma unroll
        for (int j = 0; j < 4; ++j) mma_k8<T>(acc[f][n + j], ak[f], b[j]);
    }
  }
}

// "NN" products: acc[f] (16 x D_T) += A[f] (16 x 16KT, fragments: P or dS) B with B stored [k][d] (shared
// tile sB) for MF row fragments f at once (each B fragment serves all MF): the head dim is the output side
// (O += P V, dV += P^T dO, dK += dS^T Q, dQ += dS K), D_T / 8 n8 tiles, two per ldmatrix.x4.trans and an odd
// last one alone.
template <typename T, int D_T, int MF, int KT>
__device__ __forceinline__ void warp_gemm_nn(float (&acc)[MF][HeadDim<D_T>::kN8][4], const uint32_t (&a)[MF][KT][4],
                                             const T *sB) {
  constexpr int P = HeadDim<D_T>::kPitch, N8 = HeadDim<D_T>::kN8;
#pragma unroll
  for (int kk = 0; kk < KT; ++kk) {
#pragma unroll
    for (int n = 0; n + 1 < N8; n += 2) {
      uint32_t b[2][2];
      lds_b_kn<P>(b, sB, 16 * kk, 8 * n);
#pragma unroll
      for (int f = 0; f < MF; ++f) {
        mma_k16<T>(acc[f][n], a[f][kk], b[0][0], b[0][1]);
        mma_k16<T>(acc[f][n + 1], a[f][kk], b[1][0], b[1][1]);
      }
    }
    if constexpr (N8 % 2 == 1) {
      uint32_t b[2];
      lds_b_kn1<P>(b, sB, 16 * kk, 8 * (N8 - 1));
#pragma unroll
      for (int f = 0; f < MF; ++f) mma_k16<T>(acc[f][N8 - 1], a[f][kk], b[0], b[1]);
    }
  }
}

// ... for one fragment (the backward: 16 rows per warp).
template <typename T, int D_T, int KT>
__device__ __forceinline__ void warp_gemm_nn(float (&acc)[HeadDim<D_T>::kN8][4], const uint32_t (&a)[KT][4],
                                             const T *sB) {
  warp_gemm_nn<T, D_T>(reinterpret_cast<float (&)[1][HeadDim<D_T>::kN8][4]>(acc),
                       reinterpret_cast<const uint32_t (&)[1][KT][4]>(a), sB);
}

// Round a warp's 16 x D_T accumulator (C layout) to T into rows row0..row0+15 of a shared tile; row g is
// scaled by f_lo, row g+8 by f_hi.
template <typename T, int D_T>
__device__ __forceinline__ void store_acc(T *tile, int row0, const float (&acc)[HeadDim<D_T>::kN8][4], float f_lo,
                                          float f_hi) {
  constexpr int P = HeadDim<D_T>::kPitch;
  const int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
#pragma unroll
  for (int n = 0; n < HeadDim<D_T>::kN8; ++n) {
    T *lo = tile + (row0 + g) * P + 8 * n + 2 * t, *hi = lo + 8 * P;   // (g, 8n + 2t..), (g + 8, 8n + 2t..)
    *reinterpret_cast<uint32_t *>(lo) = pack2<T>(acc[n][0] * f_lo, acc[n][1] * f_lo);
    *reinterpret_cast<uint32_t *>(hi) = pack2<T>(acc[n][2] * f_hi, acc[n][3] * f_hi);
  }
}

// ---------------------------------------------------------------------------------------------
// global <-> shared tiles (16-byte chunks, whole CTA)

// Rows row0..row0+ROWS-1 of a [token][d] matrix -> shared tile (cp.async; call cp_async_commit after).
// Rows >= nrows and columns >= D become zeros, so padded rows and columns add nothing to any product.
template <typename T, int D_T, int ROWS>
__device__ __forceinline__ void load_tile(T *tile, const T *g, int64_t stride, int row0, int nrows, int D) {
  constexpr int kChunks = D_T / 8;
  for (int c = threadIdx.x; c < ROWS * kChunks; c += kThreads) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const bool ok = row0 + r < nrows && col < D;
    cp_async_16(tile + r * HeadDim<D_T>::kPitch + col, ok ? g + (row0 + r) * stride + col : g, ok);
  }
}

// Shared tile -> rows row0..min(row0 + ROWS, nrows)-1, columns < D of a [token][d] matrix.
template <typename T, int D_T, int ROWS>
__device__ __forceinline__ void store_tile(T *g, int64_t stride, int row0, int nrows, int D, const T *tile) {
  constexpr int kChunks = D_T / 8;
  for (int c = threadIdx.x; c < ROWS * kChunks; c += kThreads) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    if (row0 + r < nrows && col < D)
      *reinterpret_cast<int4 *>(g + (row0 + r) * stride + col) =
          *reinterpret_cast<const int4 *>(tile + r * HeadDim<D_T>::kPitch + col);
  }
}

// 0 for a key that may be attended, -inf for one past Nk or padded out (added to the scores).
__device__ __forceinline__ float key_mask(const AttnParams &p, int b, int key) {
  const bool keep = key < p.Nk && (p.kpm == nullptr || p.kpm[b * p.kpm_stride + key] != 0);
  return keep ? 0.f : -INFINITY;
}

// The additive bias (AttnParams::bias, any strides) in shared memory: a tile of queries i0..i0+ROWS-1 and keys
// j0..j0+63 of one head, fp32, one row per query, through 4-byte cp.async (call cp_async_commit after);
// consecutive threads copy consecutive keys, so a row is one coalesced 256-byte read when the key stride is 1.
// Elements past Nq or Nk become 0: those scores are masked (keys) or never stored (queries).
// Pitches: the forward and dQ kernels read (query g, keys 2t, 2t+1) as a float2 and use kBiasPitch = 72 (8 mod 32
// banks: the 16 lanes of a half-warp hit 16 different 8-byte bank pairs); the dK/dV kernel reads (query 2t, key g)
// one float at a time and uses kBiasPitchT = 68 (2 * 68 = 8 mod 32: the 32 lanes hit 32 different banks).
constexpr int kBiasPitch = kBlockN + 8, kBiasPitchT = kBlockN + 4;

template <int ROWS, int PITCH>
__device__ __forceinline__ void load_bias_tile(float *tile, const AttnParams &p, int b, int h, int i0, int j0) {
  const float *bias = p.bias + b * p.bias_stride[0] + h * p.bias_stride[1];
  for (int c = threadIdx.x; c < ROWS * kBlockN; c += kThreads) {
    const int r = c / kBlockN, j = c % kBlockN;
    const bool ok = i0 + r < p.Nq && j0 + j < p.Nk;
    cp_async_4(tile + r * PITCH + j, ok ? bias + (i0 + r) * p.bias_stride[2] + (j0 + j) * p.bias_stride[3] : bias, ok);
  }
}

// Max / sum over the 4 lanes (t = 0..3) that hold one row of a C fragment.
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// ---------------------------------------------------------------------------------------------
// forward

// Forward tiling of the (head dim, bias) variants, chosen from ptxas register counts (the header's table):
//   kFrags   m16 fragments of 16 query rows per warp: every K and V fragment a warp reads from shared memory
//            serves kFrags of them (16 kFrags FLOP per byte, see the header); the CTA holds kRows queries
//   kKeys    keys per streamed K/V block: 32 halves the fp32 score tile (the registers two fragments need)
//   kQInRegs Q kept in registers as A fragments (read from shared memory once), or in its own shared tile and
//            re-read at every key block where those registers are not free (D_T = 128)
// A bias makes the forward memory bound (header): its variants keep one fragment, 64 keys, Q in registers.
template <int D_T, bool kBias>
struct FwdTiling {
  using HD = HeadDim<D_T>;
  static constexpr int kFrags = kBias ? 1 : 2;
  static constexpr int kRows = 16 * kWarps * kFrags;
  static constexpr int kKeys = kBias ? 64 : 32;
  static constexpr bool kQInRegs = kBias || D_T <= 96;
  // Rows of each K and V tile slot: with Q in registers its tile is staged through stage 1's K and V slots
  // (adjacent, same pitch), so two slots hold kRows rows (32-key blocks then fill half a slot: 22.5 KB of
  // shared memory idle at d = 88, which does not limit the 2 CTAs per SM the registers allow).
  static constexpr int kSlotRows = kQInRegs && kRows > 2 * kKeys ? kRows / 2 : kKeys;
  static constexpr int kSlotBytes = kSlotRows * HD::kPitch * 2;
  static constexpr int kQTileBytes = kQInRegs ? 0 : kRows * HD::kPitch * 2;
  // [Q tile] + two stages of (K slot, V slot) + two key masks [+ two bias tiles of kRows queries x 64 keys]
  static constexpr int kSmemBytes =
      kQTileBytes + 4 * kSlotBytes + 2 * kKeys * 4 + (kBias ? 2 * kRows * kBiasPitch * 4 : 0);
  static_assert(!kBias || kKeys == kBlockN, "bias tiles are 64 keys wide (load_bias_tile)");
};

template <typename T, int D_T, bool kBias>
__global__ void __launch_bounds__(kThreads) attention_fwd_kernel(const AttnParams p, int group) {
  using HD = HeadDim<D_T>;
  using Tiling = FwdTiling<D_T, kBias>;
  constexpr int P = HD::kPitch, MF = Tiling::kFrags, BM = Tiling::kRows, BN = Tiling::kKeys, NT = BN / 8;
  constexpr bool kQRegs = Tiling::kQInRegs;
  // Shared memory: [Q tile (!kQRegs)], then stage s (0, 1) = K slot, V slot at 2s, 2s + 1 slots in; the key
  // masks of stages 0, 1; (kBias) the bias tiles of stages 0, 1. With Q in registers its tile is staged through
  // stage 1's slots (free until block 1 is prefetched) and the O tile through stage 0's; else both use the Q tile.
  extern __shared__ __align__(16) unsigned char smem[];
  unsigned char *const slots = smem + Tiling::kQTileBytes;
  auto sK = [&](int s) { return reinterpret_cast<T *>(slots + (2 * s) * Tiling::kSlotBytes); };
  auto sV = [&](int s) { return reinterpret_cast<T *>(slots + (2 * s + 1) * Tiling::kSlotBytes); };
  auto sMask = [&](int s) { return reinterpret_cast<float *>(slots + 4 * Tiling::kSlotBytes) + s * BN; };
  auto sBias = [&](int s) { return sMask(2) + s * BM * kBiasPitch; };
  T *const sQ = kQRegs ? sK(1) : reinterpret_cast<T *>(smem);
  T *const sO = kQRegs ? sK(0) : sQ;
  const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
  const int q0 = (gridDim.x - 1 - blockIdx.x) * BM;   // the longest causal blocks start first
  const int h = blockIdx.y, b = blockIdx.z, hk = h / group;
  const int off = p.Nk - p.Nq;                         // query i sees keys j <= i + off (causal)
  // This warp's rows: row0 .. row_last; fragment f = tile rows 16 (MF warp + f) .. + 15, and this lane's rows
  // in it are row0 + 16 f + g and + 8.
  const int row0 = q0 + 16 * MF * warp, row_last = row0 + 16 * MF - 1;
  const T *Q = static_cast<const T *>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
  const T *K = static_cast<const T *>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1];
  const T *V = static_cast<const T *>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1];
  const int n_end = p.causal ? min(p.Nk, min(q0 + BM, p.Nq) + off) : p.Nk;   // keys past it are never seen
  const int n_blocks = n_end > 0 ? (n_end + BN - 1) / BN : 0;

  auto load_kv = [&](int j, int s) {
    load_tile<T, D_T, BN>(sK(s), K, p.k_stride[2], j * BN, p.Nk, p.D);
    load_tile<T, D_T, BN>(sV(s), V, p.v_stride[2], j * BN, p.Nk, p.D);
    if (threadIdx.x < BN) sMask(s)[threadIdx.x] = key_mask(p, b, j * BN + threadIdx.x);
    if constexpr (kBias) load_bias_tile<BM, kBiasPitch>(sBias(s), p, b, h, q0, j * BN);
  };

  // Q and key block 0 -> shared; with kQRegs, Q -> registers.
  load_tile<T, D_T, BM>(sQ, Q, p.q_stride[2], q0, p.Nq, p.D);
  if (n_blocks > 0) load_kv(0, 0);
  cp_async_commit();
  uint32_t qa[MF][HD::kK16][4], qa8[MF][2];   // (unused without kQRegs)
  if constexpr (kQRegs) {
    cp_async_wait<0>();
    __syncthreads();
#pragma unroll
    for (int f = 0; f < MF; ++f) {
#pragma unroll
      for (int ks = 0; ks < HD::kK16; ++ks) lds_a16<P>(qa[f][ks], sQ, 16 * (MF * warp + f), 16 * ks);
      if constexpr (HD::kK8) lds_a8<P>(qa8[f], sQ, 16 * (MF * warp + f), D_T - 8);
    }
    __syncthreads();
  }

  const float c = p.scale * kLog2e;
  float o[MF][HD::kN8][4] = {};
  float m[MF][2], l[MF][2];   // running max of rows (base-2 scaled scores); this lane's part of the running sums
#pragma unroll
  for (int f = 0; f < MF; ++f) m[f][0] = m[f][1] = -INFINITY, l[f][0] = l[f][1] = 0.f;
  for (int j = 0; j < n_blocks; ++j) {
    if (j + 1 < n_blocks) load_kv(j + 1, (j + 1) & 1);
    cp_async_commit();
    cp_async_wait<1>();   // block j has landed (block j + 1 may still be in flight)
    __syncthreads();
    const int s_ = j & 1, k0 = j * BN;

    // Skip the math of a warp whose rows all lie past Nq (never stored: the tail CTA of N = 2049 has one query)
    // or, causal, of a block wholly past the diagonal of its last row (it adds exactly nothing: P = 0,
    // alpha = 1). Warp-uniform, and no barrier inside.
    if (row0 < p.Nq && (!p.causal || k0 <= row_last + off)) {
      float s[MF][NT][4] = {};
      // S = Q K^T, s[f][n] = C tile of fragment f, keys k0 + 8n..
      warp_gemm_nt_frags<T, D_T, kQRegs>(s, qa, qa8, sQ, 16 * MF * warp, sK(s_));
      // Scale to base 2, add the bias and mask. Only blocks with padding, a tail or the diagonal pay for the mask.
      const bool masked = p.kpm != nullptr || k0 + BN > p.Nk || (p.causal && k0 + BN - 1 > row0 + off);
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        const float2 km = masked ? *reinterpret_cast<const float2 *>(sMask(s_) + 8 * n + 2 * t) : make_float2(0.f, 0.f);
#pragma unroll
        for (int f = 0; f < MF; ++f) {
          float2 bias[2];   // rows g, g + 8 of fragment f, keys 8n + 2t, +1
          if constexpr (kBias)
#pragma unroll
            for (int r = 0; r < 2; ++r)
              bias[r] = *reinterpret_cast<const float2 *>(sBias(s_) + (16 * (MF * warp + f) + g + 8 * r) * kBiasPitch +
                                                          8 * n + 2 * t);
#pragma unroll
          for (int e = 0; e < 4; ++e) {   // element e: row row0 + 16f + g + 8 (e >> 1), key k0 + 8n + 2t + (e & 1)
            float x = s[f][n][e] * c;
            if constexpr (kBias) x += ((e & 1) ? bias[e >> 1].y : bias[e >> 1].x) * kLog2e;   // -inf stays -inf
            if (masked) {
              x += (e & 1) ? km.y : km.x;
              if (p.causal && k0 + 8 * n + 2 * t + (e & 1) > row0 + 16 * f + g + 8 * (e >> 1) + off) x = -INFINITY;
            }
            s[f][n][e] = x;
          }
        }
      }
      // Online softmax. A row with nothing visible so far keeps m = -inf; it uses 0 as its reference so that
      // exp2(-inf - 0) = 0 (never -inf - -inf).
      uint32_t pa[MF][NT / 2][4];
#pragma unroll
      for (int f = 0; f < MF; ++f) {
        float m_ref[2], alpha[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float mx = m[f][r];
#pragma unroll
          for (int n = 0; n < NT; ++n) mx = fmaxf(mx, fmaxf(s[f][n][2 * r], s[f][n][2 * r + 1]));
          mx = quad_max(mx);
          m_ref[r] = mx == -INFINITY ? 0.f : mx;
          alpha[r] = exp2_approx(m[f][r] - m_ref[r]);   // 0 while m = -inf
          m[f][r] = mx;
          l[f][r] *= alpha[r];
        }
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            s[f][n][e] = exp2_approx(s[f][n][e] - m_ref[e >> 1]);
            l[f][e >> 1] += s[f][n][e];
          }
#pragma unroll
        for (int n = 0; n < HD::kN8; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) o[f][n][e] *= alpha[e >> 1];
        pack_a<T, NT>(pa[f], s[f]);
      }
      warp_gemm_nn<T, D_T>(o, pa, sV(s_));   // O += P V
    }
    __syncthreads();   // everyone is done with stage s_ before block j + 2 is loaded into it
  }

  // Epilogue: normalise, stage O through shared memory (sO) for 16-byte stores; save lse.
  // (The loop already ends on a barrier with no copy in flight; this one keeps the epilogue self-evident.)
  cp_async_wait<0>();
  __syncthreads();
  float *L = p.lse + (static_cast<int64_t>(b) * p.Hq + h) * p.Nq;
#pragma unroll
  for (int f = 0; f < MF; ++f) {
    float inv[2], lse[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float sum = quad_sum(l[f][r]);
      inv[r] = sum > 0.f ? 1.f / sum : 0.f;
      lse[r] = sum > 0.f ? (m[f][r] + log2f(sum)) * kLn2 : -INFINITY;   // sum > 0 implies a finite m
    }
    store_acc<T, D_T>(sO, 16 * (MF * warp + f), o[f], inv[0], inv[1]);
    const int row = row0 + 16 * f + g;
    if (t == 0 && row < p.Nq) L[row] = lse[0];
    if (t == 0 && row + 8 < p.Nq) L[row + 8] = lse[1];
  }
  __syncthreads();
  T *O = static_cast<T *>(p.o) + b * p.o_stride[0] + h * p.o_stride[1];
  store_tile<T, D_T, BM>(O, p.o_stride[2], q0, p.Nq, p.D, sO);
}

// ---------------------------------------------------------------------------------------------
// backward: delta = rowsum(dout * o), 16 lanes (one 16-byte chunk each) per row, 8 rows per CTA

template <typename T>
__global__ void __launch_bounds__(kThreads) attention_bwd_delta_kernel(const AttnParams p) {
  const int64_t rows = static_cast<int64_t>(p.B) * p.Hq * p.Nq;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (kThreads / 16) + threadIdx.x / 16;
  const int col = (threadIdx.x & 15) * 8;
  float sum = 0.f;
  if (r < rows && col < p.D) {
    const int i = static_cast<int>(r % p.Nq), bh = static_cast<int>(r / p.Nq);
    const int h = bh % p.Hq, b = bh / p.Hq;
    const T *O = static_cast<const T *>(p.o) + b * p.o_stride[0] + h * p.o_stride[1] + i * p.o_stride[2];
    const T *dO = static_cast<const T *>(p.dout) + b * p.dout_stride[0] + h * p.dout_stride[1] + i * p.dout_stride[2];
    const Vec<T> o = load_vec(O + col), d = load_vec(dO + col);
#pragma unroll
    for (int e = 0; e < Vec<T>::kSize; ++e) sum += to_float(o.v[e]) * to_float(d.v[e]);
  }
#pragma unroll
  for (int s = 8; s > 0; s >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, s);
  if (r < rows && (threadIdx.x & 15) == 0) p.delta[r] = sum;   // delta is (B, Hq, Nq) contiguous: index r
}

// ---------------------------------------------------------------------------------------------
// backward: dK, dV of 64 keys of one kv head, summed over the query heads of its group and all query blocks

template <int D_T, bool kBias>
constexpr int dkdv_smem_bytes() {   // K, V tiles + two stages of (Q, dO tiles of BQ rows, lse, delta [, bias tile])
  constexpr int BQ = kBwdBlockQ<D_T>;
  return 2 * HeadDim<D_T>::kTileBytes + 2 * (2 * BQ * HeadDim<D_T>::kPitch * 2 + 2 * BQ * 4) +
         (kBias ? 2 * BQ * kBiasPitchT * 4 : 0);
}

template <typename T, int D_T, bool kBias>
__global__ void __launch_bounds__(kThreads) attention_bwd_dkdv_kernel(const AttnParams p, int group) {
  using HD = HeadDim<D_T>;
  constexpr int P = HD::kPitch, BQ = kBwdBlockQ<D_T>, NT = BQ / 8;
  constexpr int kQTileBytes = BQ * P * 2;
  // Shared memory: K tile, V tile, then stage s (0, 1) = Q, dO tiles of BQ rows; then per stage lse, delta;
  // then (kBias) per stage a bias tile of BQ queries x 64 keys.
  extern __shared__ __align__(16) unsigned char smem[];
  T *sK = reinterpret_cast<T *>(smem), *sV = reinterpret_cast<T *>(smem + HD::kTileBytes);
  unsigned char *stages = smem + 2 * HD::kTileBytes;
  auto sQ = [&](int s) { return reinterpret_cast<T *>(stages + (2 * s) * kQTileBytes); };
  auto sdO = [&](int s) { return reinterpret_cast<T *>(stages + (2 * s + 1) * kQTileBytes); };
  auto sL = [&](int s) { return reinterpret_cast<float *>(stages + 4 * kQTileBytes) + (2 * s) * BQ; };
  auto sDelta = [&](int s) { return reinterpret_cast<float *>(stages + 4 * kQTileBytes) + (2 * s + 1) * BQ; };
  auto sBias = [&](int s) { return sL(2) + s * BQ * kBiasPitchT; };
  const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
  const int k0 = blockIdx.x * kBlockM, hk = blockIdx.y, b = blockIdx.z;
  const int off = p.Nk - p.Nq;
  const int key = k0 + 16 * warp + g;   // this lane's keys (rows of S^T): key and key + 8
  const float kmask[2] = {key_mask(p, b, key), key_mask(p, b, key + 8)};
  const T *K = static_cast<const T *>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1];
  const T *V = static_cast<const T *>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1];
  // Causal: query i sees key k0 iff i >= k0 - off, so earlier query blocks are skipped.
  const int qb_lo = p.causal ? max(0, k0 - off) / BQ : 0;
  const int qb_count = max(0, (p.Nq + BQ - 1) / BQ - qb_lo);
  const int n_iters = group * qb_count;   // iteration it: head hk * group + it / qb_count, block qb_lo + it % qb_count

  auto load_q = [&](int it, int s) {
    const int h = hk * group + it / qb_count, i0 = (qb_lo + it % qb_count) * BQ;
    load_tile<T, D_T, BQ>(sQ(s), static_cast<const T *>(p.q) + b * p.q_stride[0] + h * p.q_stride[1], p.q_stride[2],
                          i0, p.Nq, p.D);
    load_tile<T, D_T, BQ>(sdO(s), static_cast<const T *>(p.dout) + b * p.dout_stride[0] + h * p.dout_stride[1],
                          p.dout_stride[2], i0, p.Nq, p.D);
    if (threadIdx.x < BQ) {
      // lse in base 2; +inf for empty rows and rows past Nq, so that exp2(s - lse) = 0 there without NaN.
      const int64_t i = (static_cast<int64_t>(b) * p.Hq + h) * p.Nq + i0 + threadIdx.x;
      const bool in = i0 + static_cast<int>(threadIdx.x) < p.Nq;
      const float L = in ? p.lse[i] : -INFINITY;
      sL(s)[threadIdx.x] = L == -INFINITY ? INFINITY : L * kLog2e;
      sDelta(s)[threadIdx.x] = in ? p.delta[i] : 0.f;
    }
    if constexpr (kBias) load_bias_tile<BQ, kBiasPitchT>(sBias(s), p, b, h, i0, k0);
  };

  load_tile<T, D_T, kBlockM>(sK, K, p.k_stride[2], k0, p.Nk, p.D);
  load_tile<T, D_T, kBlockM>(sV, V, p.v_stride[2], k0, p.Nk, p.D);
  if (n_iters > 0) load_q(0, 0);
  cp_async_commit();

  const float c = p.scale * kLog2e;
  float dk[HD::kN8][4] = {}, dv[HD::kN8][4] = {};
  for (int it = 0; it < n_iters; ++it) {
    if (it + 1 < n_iters) load_q(it + 1, (it + 1) & 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const int s_ = it & 1, i0 = (qb_lo + it % qb_count) * BQ;

    // P^T = exp2(S^T c + bias^T - lse2): row = key, column n8 tile n holds queries i0 + 8n + 2t, +1.
    float st[NT][4] = {};
    warp_gemm_nt<T, D_T>(st, sK, 16 * warp, sQ(s_));   // S^T = K Q^T
    const bool diag = p.causal && k0 + 16 * warp + 15 > i0 + off;   // some key of this warp is hidden from some query
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      const float2 L = *reinterpret_cast<const float2 *>(sL(s_) + 8 * n + 2 * t);
#pragma unroll
      for (int e = 0; e < 4; ++e) {   // element e: key key + 8 (e >> 1), query i0 + 8n + 2t + (e & 1)
        float x = st[n][e] * c + kmask[e >> 1] - ((e & 1) ? L.y : L.x);   // -inf - (+inf) stays -inf
        if constexpr (kBias)   // bias tile [query - i0][key - k0]
          x += sBias(s_)[(8 * n + 2 * t + (e & 1)) * kBiasPitchT + key - k0 + 8 * (e >> 1)] * kLog2e;
        if (diag && key + 8 * (e >> 1) > i0 + 8 * n + 2 * t + (e & 1) + off) x = -INFINITY;
        st[n][e] = exp2_approx(x);
      }
    }
    uint32_t pa[NT / 2][4];
    pack_a<T, NT>(pa, st);
    warp_gemm_nn<T, D_T>(dv, pa, sdO(s_));   // dV += P^T dO

    float dpt[NT][4] = {};
    warp_gemm_nt<T, D_T>(dpt, sV, 16 * warp, sdO(s_));   // dP^T = V dO^T
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      const float2 dl = *reinterpret_cast<const float2 *>(sDelta(s_) + 8 * n + 2 * t);
#pragma unroll
      for (int e = 0; e < 4; ++e) dpt[n][e] = st[n][e] * (dpt[n][e] - ((e & 1) ? dl.y : dl.x));   // dS^T
    }
    pack_a<T, NT>(pa, dpt);
    warp_gemm_nn<T, D_T>(dk, pa, sQ(s_));   // dK += dS^T Q
    __syncthreads();
  }

  // Epilogue: dK (times scale) and dV via the K and V tiles to 16-byte stores.
  cp_async_wait<0>();
  __syncthreads();
  store_acc<T, D_T>(sK, 16 * warp, dk, p.scale, p.scale);
  store_acc<T, D_T>(sV, 16 * warp, dv, 1.f, 1.f);
  __syncthreads();
  store_tile<T, D_T, kBlockM>(static_cast<T *>(p.dk) + b * p.dk_stride[0] + hk * p.dk_stride[1], p.dk_stride[2], k0,
                              p.Nk, p.D, sK);
  store_tile<T, D_T, kBlockM>(static_cast<T *>(p.dv) + b * p.dv_stride[0] + hk * p.dv_stride[1], p.dv_stride[2], k0,
                              p.Nk, p.D, sV);
}

// ---------------------------------------------------------------------------------------------
// backward: dQ of 64 queries of one head, over the key blocks it can see

template <int D_T, bool kBias>
constexpr int dq_smem_bytes() {   // Q, dO tiles + two stages of (K tile, V tile, key mask) [+ two bias tiles]
  return 2 * HeadDim<D_T>::kTileBytes + 2 * (2 * HeadDim<D_T>::kTileBytes + kBlockN * 4) +
         (kBias ? 2 * kBlockM * kBiasPitch * 4 : 0);
}

template <typename T, int D_T, bool kBias>
__global__ void __launch_bounds__(kThreads) attention_bwd_dq_kernel(const AttnParams p, int group) {
  using HD = HeadDim<D_T>;
  constexpr int NT = kBlockN / 8;
  // Shared memory: Q tile, dO tile, then stage s (0, 1) = K tile, V tile; key masks after the 6 tiles, then
  // (kBias) the bias tiles of stages 0 and 1.
  extern __shared__ __align__(16) unsigned char smem[];
  T *sQ = reinterpret_cast<T *>(smem), *sdO = reinterpret_cast<T *>(smem + HD::kTileBytes);
  auto sK = [&](int s) { return reinterpret_cast<T *>(smem + (2 + 2 * s) * HD::kTileBytes); };
  auto sV = [&](int s) { return reinterpret_cast<T *>(smem + (3 + 2 * s) * HD::kTileBytes); };
  auto sMask = [&](int s) { return reinterpret_cast<float *>(smem + 6 * HD::kTileBytes) + s * kBlockN; };
  auto sBias = [&](int s) { return sMask(2) + s * kBlockM * kBiasPitch; };
  const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
  const int q0 = (gridDim.x - 1 - blockIdx.x) * kBlockM;
  const int h = blockIdx.y, b = blockIdx.z, hk = h / group;
  const int off = p.Nk - p.Nq;
  const int row0 = q0 + 16 * warp, row = row0 + g;   // this warp's first row; this lane's rows: row, row + 8
  const T *K = static_cast<const T *>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1];
  const T *V = static_cast<const T *>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1];
  const int n_end = p.causal ? min(p.Nk, min(q0 + kBlockM, p.Nq) + off) : p.Nk;
  const int n_blocks = n_end > 0 ? (n_end + kBlockN - 1) / kBlockN : 0;
  // dbias of this head: (Nq, Nk) contiguous, or nullptr when no bias gradient is wanted
  float *const dbias = kBias && p.dbias != nullptr ? p.dbias + (static_cast<int64_t>(b) * p.Hq + h) * p.Nq * p.Nk
                                                   : nullptr;

  // Per-row lse (base 2; +inf for empty rows and rows past Nq: their P is 0, no NaN) and delta.
  float lse2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = row + 8 * r;
    const int64_t idx = (static_cast<int64_t>(b) * p.Hq + h) * p.Nq + i;
    const float L = i < p.Nq ? p.lse[idx] : -INFINITY;
    lse2[r] = L == -INFINITY ? INFINITY : L * kLog2e;
    delta[r] = i < p.Nq ? p.delta[idx] : 0.f;
  }

  auto load_kv = [&](int j, int s) {
    load_tile<T, D_T, kBlockN>(sK(s), K, p.k_stride[2], j * kBlockN, p.Nk, p.D);
    load_tile<T, D_T, kBlockN>(sV(s), V, p.v_stride[2], j * kBlockN, p.Nk, p.D);
    if (threadIdx.x < kBlockN) sMask(s)[threadIdx.x] = key_mask(p, b, j * kBlockN + threadIdx.x);
    if constexpr (kBias) load_bias_tile<kBlockM, kBiasPitch>(sBias(s), p, b, h, q0, j * kBlockN);
  };
  load_tile<T, D_T, kBlockM>(sQ, static_cast<const T *>(p.q) + b * p.q_stride[0] + h * p.q_stride[1], p.q_stride[2],
                             q0, p.Nq, p.D);
  load_tile<T, D_T, kBlockM>(sdO, static_cast<const T *>(p.dout) + b * p.dout_stride[0] + h * p.dout_stride[1],
                             p.dout_stride[2], q0, p.Nq, p.D);
  if (n_blocks > 0) load_kv(0, 0);
  cp_async_commit();

  const float c = p.scale * kLog2e;
  float dq[HD::kN8][4] = {};
  for (int j = 0; j < n_blocks; ++j) {
    if (j + 1 < n_blocks) load_kv(j + 1, (j + 1) & 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const int s_ = j & 1, k0 = j * kBlockN;

    float s[NT][4] = {};
    warp_gemm_nt<T, D_T>(s, sQ, 16 * warp, sK(s_));   // S = Q K^T
    const bool masked = p.kpm != nullptr || k0 + kBlockN > p.Nk || (p.causal && k0 + kBlockN - 1 > row0 + off);
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      const float2 km = masked ? *reinterpret_cast<const float2 *>(sMask(s_) + 8 * n + 2 * t) : make_float2(0.f, 0.f);
      float2 bias[2];   // rows g, g + 8 of the warp's 16, keys 8n + 2t, +1
      if constexpr (kBias)
#pragma unroll
        for (int r = 0; r < 2; ++r)
          bias[r] = *reinterpret_cast<const float2 *>(sBias(s_) + (16 * warp + g + 8 * r) * kBiasPitch + 8 * n + 2 * t);
#pragma unroll
      for (int e = 0; e < 4; ++e) {   // element e: row row + 8 (e >> 1), key k0 + 8n + 2t + (e & 1)
        float x = s[n][e] * c - lse2[e >> 1];
        if constexpr (kBias) x += ((e & 1) ? bias[e >> 1].y : bias[e >> 1].x) * kLog2e;
        if (masked) {
          x += (e & 1) ? km.y : km.x;
          if (p.causal && k0 + 8 * n + 2 * t + (e & 1) > row + 8 * (e >> 1) + off) x = -INFINITY;
        }
        s[n][e] = exp2_approx(x);   // P
      }
    }
    float dp[NT][4] = {};
    warp_gemm_nt<T, D_T>(dp, sdO, 16 * warp, sV(s_));   // dP = dO V^T
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) dp[n][e] = s[n][e] * (dp[n][e] - delta[e >> 1]);   // dS
    if (kBias && dbias != nullptr) {   // dbias = dS, fp32, straight from the registers (0 where P = 0)
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = row + 8 * (e >> 1), key = k0 + 8 * n + 2 * t + (e & 1);
          if (i < p.Nq && key < p.Nk) dbias[static_cast<int64_t>(i) * p.Nk + key] = dp[n][e];
        }
    }
    uint32_t da[NT / 2][4];
    pack_a<T, NT>(da, dp);
    warp_gemm_nn<T, D_T>(dq, da, sK(s_));   // dQ += dS K
    __syncthreads();
  }

  if (kBias && dbias != nullptr) {   // keys past the causal limit of every row here: masked, so dbias = 0
    const int j0 = n_blocks * kBlockN, rows = min(kBlockM, p.Nq - q0), width = p.Nk - j0;
    for (int x = threadIdx.x; width > 0 && x < rows * width; x += kThreads)
      dbias[static_cast<int64_t>(q0 + x / width) * p.Nk + j0 + x % width] = 0.f;
  }
  cp_async_wait<0>();
  __syncthreads();
  store_acc<T, D_T>(sQ, 16 * warp, dq, p.scale, p.scale);
  __syncthreads();
  store_tile<T, D_T, kBlockM>(static_cast<T *>(p.dq) + b * p.dq_stride[0] + h * p.dq_stride[1], p.dq_stride[2], q0,
                              p.Nq, p.D, sQ);
}

// ---------------------------------------------------------------------------------------------
// host side

// Calls f(std::integral_constant<int, D_T>) with the smallest compiled head dim D_T >= D.
template <typename F>
cudaError_t with_head_dim(int D, F &&f) {
  if (D <= 32) return f(std::integral_constant<int, 32>{});
  if (D <= 64) return f(std::integral_constant<int, 64>{});
  if (D <= 88) return f(std::integral_constant<int, 88>{});
  if (D <= 96) return f(std::integral_constant<int, 96>{});
  return f(std::integral_constant<int, 128>{});
}

// Every row of a (B, H, N, D) tensor starts on 16 bytes (strides of size-1 dims never move the pointer),
// as the 16-byte cp.async and vector stores need; kernels/cuda/ops.py hands over tensors that way.
bool aligned16(const void *ptr, const int64_t (&stride)[3], int B, int H, int N) {
  const int size[3] = {B, H, N};
  bool ok = reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
  for (int i = 0; i < 3; ++i) ok = ok && (size[i] <= 1 || stride[i] % 8 == 0);
  return ok;
}

// What the kernels handle: D % 8 == 0 up to 128, GQA groups, grid limits (y = heads, z = batch), alignment.
bool supported(const AttnParams &p, bool backward) {
  bool ok = p.D >= 8 && p.D <= 128 && p.D % 8 == 0 && p.B >= 0 && p.Nq >= 0 && p.Nk >= 0 && p.Hkv > 0 &&
            p.Hq % p.Hkv == 0 && p.B <= 65535 && p.Hq <= 65535;
  ok = ok && aligned16(p.q, p.q_stride, p.B, p.Hq, p.Nq) && aligned16(p.k, p.k_stride, p.B, p.Hkv, p.Nk) &&
       aligned16(p.v, p.v_stride, p.B, p.Hkv, p.Nk) && aligned16(p.o, p.o_stride, p.B, p.Hq, p.Nq);
  if (backward)
    ok = ok && aligned16(p.dout, p.dout_stride, p.B, p.Hq, p.Nq) && aligned16(p.dq, p.dq_stride, p.B, p.Hq, p.Nq) &&
         aligned16(p.dk, p.dk_stride, p.B, p.Hkv, p.Nk) && aligned16(p.dv, p.dv_stride, p.B, p.Hkv, p.Nk) &&
         (p.dbias == nullptr || p.bias != nullptr);   // a bias gradient needs the bias
  return ok;
}

// Launches kernel<<<grid, kThreads, smem>>>, raising the dynamic shared memory limit first when needed.
template <typename Kernel, typename... Args>
cudaError_t launch(Kernel kernel, dim3 grid, int smem, cudaStream_t stream, Args... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  if (smem > 48 * 1024)
    IVMINI_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  kernel<<<grid, kThreads, smem, stream>>>(args...);
  return cudaGetLastError();
}

unsigned blocks(int n, int per) { return static_cast<unsigned>((n + per - 1) / per); }

// Calls f(std::bool_constant<kBias>) with kBias = (p.bias != nullptr): the kernels' template flag.
template <typename F>
cudaError_t with_bias(const AttnParams &p, F &&f) {
  return p.bias != nullptr ? f(std::true_type{}) : f(std::false_type{});
}

}  // namespace

cudaError_t attention_fwd(const AttnParams &p, cudaStream_t stream) {
  if (!supported(p, false)) return cudaErrorInvalidValue;
  IVMINI_DISPATCH_HALF(p.dtype, return with_head_dim(p.D, [&](auto d) {
    return with_bias(p, [&](auto has_bias) {
      constexpr int D_T = decltype(d)::value;
      constexpr bool kBias = decltype(has_bias)::value;
      using Tiling = FwdTiling<D_T, kBias>;
      const dim3 grid(blocks(p.Nq, Tiling::kRows), p.Hq, p.B);
      return launch(attention_fwd_kernel<scalar_t, D_T, kBias>, grid, Tiling::kSmemBytes, stream, p,
                    p.Hq / p.Hkv);
    });
  }));
}

cudaError_t attention_bwd(const AttnParams &p, cudaStream_t stream) {
  if (!supported(p, true)) return cudaErrorInvalidValue;
  const int group = p.Hq / p.Hkv;
  const int64_t rows = static_cast<int64_t>(p.B) * p.Hq * p.Nq;
  const dim3 delta_grid(static_cast<unsigned>((rows + kThreads / 16 - 1) / (kThreads / 16)));
  const dim3 dkdv_grid(blocks(p.Nk, kBlockM), p.Hkv, p.B), dq_grid(blocks(p.Nq, kBlockM), p.Hq, p.B);
  IVMINI_DISPATCH_HALF(p.dtype, return with_head_dim(p.D, [&](auto d) {
    return with_bias(p, [&](auto has_bias) {
      constexpr int D_T = decltype(d)::value;
      constexpr bool kBias = decltype(has_bias)::value;
      IVMINI_CHECK(launch(attention_bwd_delta_kernel<scalar_t>, delta_grid, 0, stream, p));
      IVMINI_CHECK(launch(attention_bwd_dkdv_kernel<scalar_t, D_T, kBias>, dkdv_grid, dkdv_smem_bytes<D_T, kBias>(),
                          stream, p, group));
      return launch(attention_bwd_dq_kernel<scalar_t, D_T, kBias>, dq_grid, dq_smem_bytes<D_T, kBias>(), stream, p,
                    group);
    });
  }));
}

}  // namespace ivmini
