// Runs csrc/rms_norm.cu, csrc/masked_gather.cu and csrc/attn_pool.cu on the CPU. tests/test_cuda_emulated.py
// rewrites each into <name>_emu.cpp (launches -> emu_launch, __shared__ -> block-shared storage, attn_pool's
// mma wrapper -> attn_pool_mma_emu.inc; every CUDA thread a fiber: prelude.h) and links them, each its own
// translation unit, with this driver. The driver calls the real host entry points (ivmini::rms_norm_fwd, ...)
// on random inputs held in buffers whose gaps and ends are canaries and whose outputs start as NaN, and
// compares every output element with a float64 reference of the contract in csrc/ivmini_ops.h, each
// element against its own error bound (the dtype's rounding plus the fp32 arithmetic the contract allows).
//     memory_ops_check SEED {rmsnorm|gather|pool} [CASE]      exit status 0 when every case passes
#include "prelude.h"
#include "common.cuh"

#include <array>
#include <string>

using namespace ivmini;

// ---------------------------------------------------------------------------------------------
// buffers

template <typename T> constexpr double unit_roundoff() {   // half an ulp, relative
  if constexpr (std::is_same_v<T, float>) return std::ldexp(1.0, -24);
  else if constexpr (std::is_same_v<T, __half>) return std::ldexp(1.0, -11);
  else return std::ldexp(1.0, -8);
}
template <typename T> const char *dtype_name() {
  if constexpr (std::is_same_v<T, float>) return "f32";
  else if constexpr (std::is_same_v<T, __half>) return "f16";
  else return "bf16";
}
template <typename T> constexpr int dtype_code() {
  if constexpr (std::is_same_v<T, float>) return kFloat32;
  else if constexpr (std::is_same_v<T, __half>) return kFloat16;
  else return kBFloat16;
}
template <typename T> T from_bits(uint32_t u) { T t; memcpy(&t, &u, sizeof(T)); return t; }
template <typename T> uint32_t to_bits(T t) { uint32_t u = 0; memcpy(&u, &t, sizeof(T)); return u; }
template <typename T> T poison() { return from_bits<T>(sizeof(T) == 4 ? 0x7fffffffu : 0x7fffu); }   // NaN
template <typename T> uint32_t canary_bits() { return sizeof(T) == 4 ? 0x7fc0beefu : 0x7eeeu; }      // a specific NaN
// Half the smallest subnormal: the absolute rounding error of a result in T's subnormal range.
template <typename T> double subnormal_floor() {
  if constexpr (std::is_same_v<T, float>) return std::ldexp(1.0, -150);
  else if constexpr (std::is_same_v<T, __half>) return std::ldexp(1.0, -25);
  else return std::ldexp(1.0, -134);
}
template <typename T> double tod(T v) { return (double)to_float(v); }
template <typename T> double round_t(double v) { return tod(from_float<T>((float)v)); }   // (exact for |v| in range)

// A 4-D tensor (outer .. inner, the inner dim contiguous) in a buffer: each inner row padded by `pad`
// elements, the first element `shift` elements past a 16-byte boundary; everything that is not an element
// of the tensor (the padding, 16 elements before and after) holds a canary.
template <typename T> struct Buf {
  static constexpr int64_t kLead = 16;
  std::array<int64_t, 4> size{}, stride{};
  std::vector<T> store;
  T *base = nullptr;
  Buf(std::array<int64_t, 4> sz, int64_t pad = 0, int64_t shift = 0) : size(sz) {
    stride[3] = 1;
    stride[2] = size[3] + pad;
    stride[1] = stride[2] * size[2];
    stride[0] = stride[1] * size[1];
    store.assign(stride[0] * size[0] + 2 * kLead + shift, from_bits<T>(canary_bits<T>()));
    base = store.data() + kLead + shift;
  }
  int64_t numel() const { return size[0] * size[1] * size[2] * size[3]; }
  T &at(int64_t a, int64_t b, int64_t c, int64_t d) { return base[a * stride[0] + b * stride[1] + c * stride[2] + d]; }
  double get(int64_t a, int64_t b, int64_t c, int64_t d) { return tod(at(a, b, c, d)); }
  template <typename F> void each(F f) {
    for (int64_t a = 0; a < size[0]; ++a)
      for (int64_t b = 0; b < size[1]; ++b)
        for (int64_t c = 0; c < size[2]; ++c)
          for (int64_t d = 0; d < size[3]; ++d) f(a, b, c, d);
  }
  template <typename G> void fill(G gen) { each([&](int64_t a, int64_t b, int64_t c, int64_t d) { at(a, b, c, d) = from_float<T>((float)gen()); }); }
  void poison_all() { each([&](int64_t a, int64_t b, int64_t c, int64_t d) { at(a, b, c, d) = poison<T>(); }); }
  bool canaries_ok() {
    std::vector<char> logical(store.size(), 0);
    each([&](int64_t a, int64_t b, int64_t c, int64_t d) { logical[&at(a, b, c, d) - store.data()] = 1; });
    for (size_t i = 0; i < store.size(); ++i)
      if (!logical[i] && to_bits(store[i]) != canary_bits<T>()) return false;
    return true;
  }
};

// Element-wise comparison, each element against its own bound; `worst` is the largest error / bound.
struct Check {
  double worst = 0;
  long nan = 0, n = 0;
  std::string where;   // the worst element (or the first NaN)
  void cmp(const char *what, double got, double ref, double bound) {
    ++n;
    if (std::isnan(got) || std::isinf(got)) { if (!nan++) where = std::string(what) + " is NaN/inf"; return; }
    const double r = std::fabs(got - ref) / std::max(bound, 1e-300);
    if (r > worst && !nan) {
      char buf[160];
      snprintf(buf, sizeof buf, "%s got %.9g ref %.9g bound %.3g", what, got, ref, bound);
      worst = r, where = buf;
    }
  }
  bool ok() const { return nan == 0 && worst <= 1; }
};

bool report(bool canaries, const Check &c, const std::string &name) {
  const bool ok = canaries && c.ok();
  printf("%-4s %-58s err/bound %.3g  nan %ld  canaries %s  (%ld values; worst: %s)\n", ok ? "OK" : "FAIL",
         name.c_str(), c.worst, c.nan, canaries ? "ok" : "BAD", c.n, c.where.c_str());
  fflush(stdout);
  return ok;
}

std::mt19937 rng;
double normal() { return std::normal_distribution<double>(0, 1)(rng); }
double uniform() { return std::uniform_real_distribution<double>(0, 1)(rng); }

// ---------------------------------------------------------------------------------------------
// rms_norm: y = w * cast(x * rstd); dx = rstd (g - xhat mean(g xhat)), g = dy w; dw_partial per block of rows

struct NormCase { int rows, width, num_partials, pad, shift; };

template <typename T> bool norm_case(const NormCase &c) {
  const int64_t R = c.rows, W = c.width;
  const double u = unit_roundoff<T>(), f32 = std::ldexp(1.0, -24);
  Buf<T> x({1, 1, R, W}, c.pad, c.shift), w({1, 1, 1, W}, 0, c.shift), y({1, 1, R, W}, c.pad, c.shift);
  Buf<T> dy({1, 1, R, W}, c.pad, c.shift), dx({1, 1, R, W}, c.pad + 8, c.shift);
  Buf<float> rstd({1, 1, 1, R}), dw({1, 1, c.num_partials, W});
  x.fill([] { return 1.5 * normal(); });
  w.fill([] { return 1 + 0.3 * normal(); });
  dy.fill([] { return normal(); });
  y.poison_all(); dx.poison_all(); rstd.poison_all(); dw.poison_all();

  RmsNormParams p;
  p.dtype = dtype_code<T>(); p.rows = R; p.width = c.width; p.eps = 1e-6f;
  p.x = x.base; p.x_stride = x.stride[2]; p.w = w.base; p.y = y.base; p.y_stride = y.stride[2]; p.rstd = rstd.base;
  p.dy = dy.base; p.dy_stride = dy.stride[2]; p.dx = dx.base; p.dx_stride = dx.stride[2];
  p.dw_partial = dw.base; p.num_partials = c.num_partials;
  if (rms_norm_fwd(p, nullptr) != cudaSuccess || rms_norm_bwd(p, nullptr) != cudaSuccess) { printf("FAIL launch error\n"); return false; }

  Check chk;
  const int64_t chunk = (R + c.num_partials - 1) / c.num_partials;
  std::vector<double> dw_ref(c.num_partials * W, 0), dw_bound(c.num_partials * W, 0);
  for (int64_t i = 0; i < R; ++i) {
    double ss = 0;
    for (int64_t j = 0; j < W; ++j) ss += x.get(0, 0, i, j) * x.get(0, 0, i, j);
    const double r = 1 / std::sqrt(ss / W + 1e-6);
    const double r_err = (W + 4) * f32;                      // fp32 sum of squares, rsqrt: relative
    chk.cmp("rstd", rstd.get(0, 0, 0, i), r, 2 * r_err * r);
    // The rounding steps of the contract, from the kernel's rstd (checked just above): cast(x * rstd) in fp32,
    // then y = cast(w * that) -- bit-exact -- and the dw terms dy * cast(xhat).
    const float rk = rstd.base[i];
    double dot = 0, dot_abs = 0;
    for (int64_t j = 0; j < W; ++j) {
      const double g = dy.get(0, 0, i, j) * w.get(0, 0, 0, j), xh = x.get(0, 0, i, j) * r;
      dot += g * xh, dot_abs += std::fabs(g * xh);
    }
    const double cm = dot / W;
    for (int64_t j = 0; j < W; ++j) {
      const double xh = x.get(0, 0, i, j) * r, wj = w.get(0, 0, 0, j), g = dy.get(0, 0, i, j) * wj;
      const float xh_cast = round_to<T>(to_float(x.at(0, 0, i, j)) * rk);
      chk.cmp("y", y.get(0, 0, i, j), tod(from_float<T>(to_float(w.at(0, 0, 0, j)) * xh_cast)), 0);
      const double dxr = r * (g - xh * cm);
      chk.cmp("dx", dx.get(0, 0, i, j), dxr,
              2 * u * std::fabs(dxr) + 2 * subnormal_floor<T>() + r * (std::fabs(g) + std::fabs(xh) * (std::fabs(cm) + dot_abs / W)) * 4 * (r_err + W * f32));
      const int64_t b = i / chunk;
      dw_ref[b * W + j] += dy.get(0, 0, i, j) * xh_cast;
      dw_bound[b * W + j] += std::fabs(dy.get(0, 0, i, j) * xh_cast) * (R + 2) * f32;   // fp32 sums
    }
  }
  for (int64_t b = 0; b < c.num_partials; ++b)
    for (int64_t j = 0; j < W; ++j) chk.cmp("dw_partial", dw.get(0, 0, b, j), dw_ref[b * W + j], dw_bound[b * W + j]);
  const bool canaries = x.canaries_ok() && w.canaries_ok() && y.canaries_ok() && dy.canaries_ok() && dx.canaries_ok() &&
                        rstd.canaries_ok() && dw.canaries_ok();
  char name[200];
  snprintf(name, sizeof name, "rmsnorm %s rows %d width %d partials %d%s%s", dtype_name<T>(), c.rows, c.width,
           c.num_partials, c.pad ? " strided" : "", c.shift ? " unaligned" : "");
  return report(canaries, chk, name);
}

// ---------------------------------------------------------------------------------------------
// masked_gather: out[l, b, k] = x[l, b, idx[b, k]] (+ pos[idx[b, k]]) added in fp32, rounded once, zero when the
// index is out of range; dx[l, b, n] = dout[l, b, inv[b, n]] or 0; dpos[n] = sum over l, b of dx[l, b, n]

struct GatherCase { int L, B, N, K, C; bool pos; int pad, shift; };

template <typename T> bool gather_case(const GatherCase &c) {
  const int L = c.L, B = c.B, N = c.N, K = c.K, C = c.C;
  Buf<T> x({L, B, N, C}, c.pad, c.shift), pos({1, 1, N, C}, c.pad, c.shift), out({L, B, K, C}, c.pad + 8, c.shift);
  Buf<T> dout({L, B, K, C}, c.pad, c.shift), dx({L, B, N, C}, c.pad, c.shift);
  Buf<float> dpos({1, 1, N, C});
  x.fill(normal); pos.fill(normal); dout.fill(normal);
  out.poison_all(); dx.poison_all(); dpos.poison_all();
  // idx: K distinct tokens per sample, strided (B, K); sample 0's last one out of range (forward only)
  const int64_t idx_stride = K + 3;
  std::vector<int64_t> idx(B * idx_stride, -7);
  std::vector<int32_t> inv(B * N, -1);
  for (int b = 0; b < B; ++b) {
    std::vector<int> perm(N);
    for (int n = 0; n < N; ++n) perm[n] = n;
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int k = 0; k < K; ++k) idx[b * idx_stride + k] = perm[k], inv[b * N + perm[k]] = k;
  }
  const int64_t bad = (rng() % 2) ? N : -1;
  inv[idx[K - 1]] = -1;                       // sample 0, slot K-1: dropped in the backward too
  idx[K - 1] = bad;

  GatherParams p;
  p.dtype = dtype_code<T>(); p.L = L; p.B = B; p.N = N; p.K = K; p.C = C;
  p.x = x.base; memcpy(p.x_stride, x.stride.data(), 24);
  p.idx = idx.data(); p.idx_stride[0] = idx_stride; p.idx_stride[1] = 1;
  p.pos = c.pos ? pos.base : nullptr; p.pos_stride = pos.stride[2];
  p.out = out.base; memcpy(p.out_stride, out.stride.data(), 24);
  p.dout = dout.base; memcpy(p.dout_stride, dout.stride.data(), 24);
  p.inv = inv.data(); p.dx = dx.base; memcpy(p.dx_stride, dx.stride.data(), 24);
  p.dpos = c.pos ? dpos.base : nullptr;
  if (masked_gather_fwd(p, nullptr) != cudaSuccess || masked_gather_bwd(p, nullptr) != cudaSuccess) { printf("FAIL launch error\n"); return false; }

  Check chk;
  for (int l = 0; l < L; ++l)
    for (int b = 0; b < B; ++b)
      for (int k = 0; k < K; ++k)
        for (int ch = 0; ch < C; ++ch) {
          const int64_t n = idx[b * idx_stride + k];
          double ref = 0;
          if (n >= 0 && n < N)   // the contract: an fp32 add, one rounding (exact copy without pos)
            ref = c.pos ? tod(from_float<T>(to_float(x.at(l, b, n, ch)) + to_float(pos.at(0, 0, n, ch)))) : x.get(l, b, n, ch);
          chk.cmp("out", out.get(l, b, k, ch), ref, 0);
        }
  for (int n = 0; n < N; ++n)
    for (int ch = 0; ch < C; ++ch) {
      double sum = 0, sum_abs = 0;
      for (int l = 0; l < L; ++l)
        for (int b = 0; b < B; ++b) {
          const int slot = inv[b * N + n];
          const double ref = slot >= 0 ? dout.get(l, b, slot, ch) : 0;
          chk.cmp("dx", dx.get(l, b, n, ch), ref, 0);
          sum += ref, sum_abs += std::fabs(ref);
        }
      if (c.pos) chk.cmp("dpos", dpos.get(0, 0, n, ch), sum, sum_abs * (L * B + 1) * std::ldexp(1.0, -24));
    }
  bool canaries = x.canaries_ok() && pos.canaries_ok() && out.canaries_ok() && dout.canaries_ok() && dx.canaries_ok();
  if (c.pos) canaries &= dpos.canaries_ok();
  else for (int64_t i = 0; i < N * C; ++i) canaries &= std::isnan(dpos.base[i]);   // dpos == nullptr: nothing written
  char name[200];
  snprintf(name, sizeof name, "gather %s L %d B %d N %d K %d C %d%s%s%s (index %lld)", dtype_name<T>(), L, B, N, K, C,
           c.pos ? " pos" : "", c.pad ? " strided" : "", c.shift ? " unaligned" : "", (long long)bad);
  return report(canaries, chk, name);
}

// ---------------------------------------------------------------------------------------------
// attn_pool: per sample b, xhat = LayerNorm(x) rows; rowdot s = xhat m^T (+ mu, rstd); colsum z = p^T xhat;
// dx = cast(rstd (g m - c1 - xhat c2) + r)

struct PoolCase { int B, N, C, K, pad, shift, fshift, sms; };

template <typename T> bool pool_case(const PoolCase &c) {
  const int B = c.B, N = c.N, C = c.C, K = c.K;
  const double f32 = std::ldexp(1.0, -24), u = unit_roundoff<T>();
  // An fp32 operand v as hi + lo in T: |v - hi - lo| <= u^2 |v| + half T's smallest subnormal (fp16 lo parts
  // of small v are subnormal); dx splits both operands and drops lo * lo. fp32 x: exact fp32 products.
  const double split = std::is_same_v<T, float> ? 0 : 4 * u * u, split_abs = std::is_same_v<T, float> ? 0 : 2 * subnormal_floor<T>();
  Buf<T> x({1, B, N, C}, c.pad, c.shift), dx({1, B, N, C});
  Buf<float> m({1, B, K, C}, 0, c.fshift), pp({1, B, N, K}), g({1, B, N, K}), c1({1, 1, B, N}), c2({1, 1, B, N});
  Buf<float> r({1, 1, B, C}, 0, c.fshift), s({1, B, N, K}), z({1, B, K, C}, 0, c.fshift), mu({1, 1, B, N}), rstd({1, 1, B, N});
  x.fill([] { return 0.5 + 2 * normal(); });
  m.fill(normal); pp.fill(uniform); g.fill([] { return 0.5 * normal(); });
  c1.fill([] { return 0.3 * normal(); }); c2.fill([] { return 0.3 * normal(); }); r.fill([] { return 0.1 * normal(); });
  dx.poison_all(); s.poison_all(); z.poison_all(); mu.poison_all(); rstd.poison_all();
  emu::sm_count = c.sms;

  PoolParams p;
  p.dtype = dtype_code<T>(); p.B = B; p.N = N; p.C = C; p.K = K; p.eps = 1e-5f;
  p.x = x.base; p.x_stride[0] = x.stride[1]; p.x_stride[1] = x.stride[2];
  p.m = m.base; p.p = pp.base; p.g = g.base; p.c1 = c1.base; p.c2 = c2.base; p.r = r.base;
  p.s = s.base; p.z = z.base; p.mu = mu.base; p.rstd = rstd.base; p.dx = dx.base;
  if (attn_pool_rowdot(p, nullptr) != cudaSuccess || attn_pool_colsum(p, nullptr) != cudaSuccess ||
      attn_pool_dx(p, nullptr) != cudaSuccess) { printf("FAIL launch error\n"); return false; }

  Check chk;
  for (int b = 0; b < B; ++b) {
    std::vector<double> mean(N), rs(N), xh((size_t)N * C);
    for (int n = 0; n < N; ++n) {
      double sum = 0, var = 0, abs_sum = 0;
      for (int ch = 0; ch < C; ++ch) sum += x.get(0, b, n, ch), abs_sum += std::fabs(x.get(0, b, n, ch));
      mean[n] = sum / C;
      for (int ch = 0; ch < C; ++ch) var += (x.get(0, b, n, ch) - mean[n]) * (x.get(0, b, n, ch) - mean[n]);
      rs[n] = 1 / std::sqrt(var / C + 1e-5);
      for (int ch = 0; ch < C; ++ch) xh[(size_t)n * C + ch] = (x.get(0, b, n, ch) - mean[n]) * rs[n];
      const double stat = (C + 8) * f32;                   // fp32 statistics: relative to the row's scale
      chk.cmp("mu", mu.get(0, 0, b, n), mean[n], 2 * stat * (abs_sum / C + 1 / rs[n]));
      chk.cmp("rstd", rstd.get(0, 0, b, n), rs[n], 4 * stat * rs[n]);
      for (int k = 0; k < K; ++k) {                        // s = rstd (x m^T - mu rowsum(m)), x raw
        double ref = 0, mag = 0, xabs = 0;
        for (int ch = 0; ch < C; ++ch) {
          ref += xh[(size_t)n * C + ch] * m.get(0, b, k, ch);
          mag += (std::fabs(x.get(0, b, n, ch)) + std::fabs(mean[n])) * std::fabs(m.get(0, b, k, ch));
          xabs += std::fabs(x.get(0, b, n, ch));
        }
        chk.cmp("s", s.get(0, b, n, k), ref,
                rs[n] * (mag * (2 * split + 2 * (C + 8) * f32) + 2 * xabs * split_abs) + 8 * stat * std::fabs(ref));
      }
    }
    for (int k = 0; k < K; ++k)                            // z = (p rstd)^T x - (p rstd)^T mu
      for (int ch = 0; ch < C; ++ch) {
        double ref = 0, mag = 0, xabs = 0;
        for (int n = 0; n < N; ++n) {
          ref += pp.get(0, b, n, k) * xh[(size_t)n * C + ch];
          mag += pp.get(0, b, n, k) * rs[n] * (std::fabs(x.get(0, b, n, ch)) + std::fabs(mean[n]));
          xabs += std::fabs(x.get(0, b, n, ch));
        }
        chk.cmp("z", z.get(0, b, k, ch), ref, mag * (2 * split + 2 * (N + C + 16) * f32) + 2 * xabs * split_abs);
      }
    for (int n = 0; n < N; ++n)                            // dx = cast(rstd (g m - c1 - xhat c2) + r)
      for (int ch = 0; ch < C; ++ch) {
        double gm = 0, mag = 0, gm_abs = 0;
        for (int k = 0; k < K; ++k) {
          gm += g.get(0, b, n, k) * m.get(0, b, k, ch), mag += std::fabs(g.get(0, b, n, k) * m.get(0, b, k, ch));
          gm_abs += std::fabs(g.get(0, b, n, k)) + std::fabs(m.get(0, b, k, ch));
        }
        const double inner = gm - c1.get(0, 0, b, n) - xh[(size_t)n * C + ch] * c2.get(0, 0, b, n);
        const double ref = rs[n] * inner + r.get(0, 0, b, ch);
        const double inner_mag = mag + std::fabs(c1.get(0, 0, b, n)) +
                                 (std::fabs(x.get(0, b, n, ch)) + std::fabs(mean[n])) * rs[n] * std::fabs(c2.get(0, 0, b, n));
        const double bound = rs[n] * (mag * (split + (K + 4) * f32) + gm_abs * split_abs + inner_mag * 4 * (C + 16) * f32) +
                             std::fabs(r.get(0, 0, b, ch)) * f32;
        chk.cmp("dx", dx.get(0, b, n, ch), round_t<T>(ref), 2 * u * std::fabs(ref) + 2 * subnormal_floor<T>() + 2 * bound);
      }
  }
  const bool canaries = x.canaries_ok() && dx.canaries_ok() && m.canaries_ok() && s.canaries_ok() && z.canaries_ok() &&
                        mu.canaries_ok() && rstd.canaries_ok() && r.canaries_ok() && pp.canaries_ok() && g.canaries_ok();
  char name[200];
  snprintf(name, sizeof name, "attn_pool %s B %d N %d C %d K %d%s%s%s sms %d", dtype_name<T>(), B, N, C, K,
           c.pad ? " strided" : "", c.shift ? " unaligned-x" : "", c.fshift ? " unaligned-f32" : "", c.sms);
  return report(canaries, chk, name);
}

// ---------------------------------------------------------------------------------------------

template <typename Case> struct Typed { int dtype; Case c; };

template <typename Case, typename Run> bool run_all(const std::vector<Typed<Case>> &cases, int which, Run run) {
  bool all = true;
  for (size_t i = 0; i < cases.size(); ++i) {
    if (which >= 0 && (int)i != which) continue;
    const auto &t = cases[i];
    all &= t.dtype == kFloat32 ? run(float(), t.c) : t.dtype == kFloat16 ? run(__half(), t.c) : run(__nv_bfloat16(), t.c);
  }
  return all;
}

int main(int argc, char **argv) {
  if (argc < 3) { fprintf(stderr, "usage: %s SEED {rmsnorm|gather|pool} [CASE]\n", argv[0]); return 2; }
  const unsigned seed = unsigned(strtoul(argv[1], nullptr, 10));
  const std::string op = argv[2];
  const int which = argc > 3 ? atoi(argv[3]) : -1;
  rng.seed(seed);         // the inputs
  emu::rng.seed(seed);    // the order in which the emulated threads run
  const int dtypes[3] = {kFloat32, kFloat16, kBFloat16};
  bool all = true;
  if (op == "rmsnorm") {
    // every width x rows x dtype; partials 1, 3 and 7 in turn (3 and 7 > rows for rows 1 and 5: empty blocks
    // write zeros); odd cases with padded row strides. Widths 1, 7, 13 take the scalar path; 64, 1408 the
    // vector one, plus unaligned (scalar) 64 / 1408, 13000 / 9000-wide rows (second pass re-reads, dw of the
    // columns past the registers summed in place in dw_partial) and the cases below them.
    std::vector<Typed<NormCase>> cases;
    const int partials[3] = {1, 3, 7};
    int i = 0;
    for (int dt : dtypes)
      for (int width : {1, 7, 13, 64, 1408})
        for (int rows : {1, 5, 33}) {
          cases.push_back({dt, {rows, width, partials[i % 3], i % 2 ? 8 : 0, 0}});
          ++i;
        }
    for (int dt : dtypes) {
      cases.push_back({dt, {9, 64, 2, 3, 1}});
      cases.push_back({dt, {5, 1408, 3, 0, 1}});
    }
    cases.push_back({kBFloat16, {3, 13000, 2, 8, 0}});
    cases.push_back({kFloat32, {2, 9000, 1, 0, 0}});
    // the backward's register-held dw sums at their limits: the widest rows a team holds (8192 16-bit, 2047
    // scalar: 256 threads), one pack past them (the wide kernel), odd widths up to 8191, and teams of several
    // rows (widths 255, 1000: 4 rows per block) over chunks that are not a multiple of the rows per block
    cases.push_back({kBFloat16, {3, 8192, 2, 0, 0}});
    cases.push_back({kFloat16, {2, 8200, 1, 8, 0}});
    cases.push_back({kFloat32, {3, 2047, 2, 0, 0}});
    cases.push_back({kBFloat16, {2, 2049, 1, 0, 0}});
    cases.push_back({kFloat32, {7, 255, 2, 8, 0}});
    cases.push_back({kBFloat16, {5, 8191, 3, 0, 0}});
    cases.push_back({kFloat16, {9, 1000, 2, 0, 0}});
    all = run_all(cases, which, [](auto t, const NormCase &c) { return norm_case<decltype(t)>(c); });
  } else if (op == "gather") {
    // every dtype x C x L, pos on alternate cases (dpos with it), every case an out-of-range index; C = 1, 13
    // take the scalar path, 40 and 1416 (two channel chunks for 16-bit) the vector path, and once more unaligned
    std::vector<Typed<GatherCase>> cases;
    int i = 0;
    for (int dt : dtypes)
      for (int C : {1, 13, 40, 1416})
        for (int L : {1, 2}) {
          cases.push_back({dt, {L, 2, 19, 7, C, i % 2 == 0, i % 4 == 1 ? 8 : 0, 0}});
          ++i;
        }
    for (int dt : dtypes) {
      cases.push_back({dt, {2, 3, 11, 5, 40, true, 8, 1}});
      cases.push_back({dt, {1, 2, 9, 9, 1416, true, 0, 1}});
    }
    cases.push_back({kBFloat16, {1, 3, 20, 1, 64, true, 0, 0}});   // K = 1
    all = run_all(cases, which, [](auto t, const GatherCase &c) { return gather_case<decltype(t)>(c); });
  } else if (op == "pool") {
    // (B, N, C, K, pad, x shift, fp32 shift, SMs): K 1/3/16/33 (and 70: several grid.z passes), C 8/13/72,
    // N 1/17/40; few SMs (big row tiles, 4 warps) or many (small tiles, 8/16 warps)
    const PoolCase shapes[] = {
        {2, 17, 72, 16, 8, 0, 0, 1},    {1, 40, 72, 33, 8, 0, 0, 1000}, {2, 1, 8, 1, 0, 0, 0, 1},
        {1, 17, 13, 3, 3, 0, 0, 1000},  {2, 40, 8, 16, 8, 0, 0, 1000},  {1, 40, 72, 3, 0, 1, 1, 1},
        {1, 17, 13, 33, 0, 0, 0, 1},    {1, 17, 72, 70, 8, 0, 0, 1000},
    };
    std::vector<Typed<PoolCase>> cases;
    for (int dt : dtypes)
      for (const PoolCase &c : shapes) cases.push_back({dt, c});
    all = run_all(cases, which, [](auto t, const PoolCase &c) { return pool_case<decltype(t)>(c); });
  } else {
    fprintf(stderr, "unknown op %s\n", op.c_str());
    return 2;
  }
  printf(all ? "ALL OK\n" : "SOME FAILED\n");
  return all ? 0 : 1;
}
