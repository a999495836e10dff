// The one Python module of the CUDA backend, `_ivmini_cuda`, built by kernels/cuda/build.py.
//
// Each op takes keyword arguments only, named after the fields of its Params struct in ivmini_ops.h
// (pointers as integers from Tensor.data_ptr(), 0 or None for "absent"; strides as tuples; the
// stream as an integer from torch.cuda.current_stream().cuda_stream). A missing, unknown or
// mistyped argument raises TypeError naming it; a CUDA error raises RuntimeError naming the op and
// the error. Nothing here knows about torch.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <set>
#include <stdexcept>
#include <string>

#include "ivmini_ops.h"

namespace py = pybind11;
using namespace ivmini;

namespace {

// Reads keyword arguments into a Params struct; finish() rejects any argument nobody read.
class Args {
 public:
  Args(const char *op, const py::kwargs &kw) : op_(op), kw_(kw) {}

  int64_t integer(const char *key) {
    py::handle v = get(key);
    if (!py::isinstance<py::int_>(v) || py::isinstance<py::bool_>(v)) fail(key, "an int");
    return v.cast<int64_t>();
  }
  float real(const char *key) {
    py::handle v = get(key);
    if (!py::isinstance<py::float_>(v) && !py::isinstance<py::int_>(v)) fail(key, "a float");
    return v.cast<float>();
  }
  bool flag(const char *key) {
    py::handle v = get(key);
    if (!py::isinstance<py::bool_>(v)) fail(key, "a bool");
    return v.cast<bool>();
  }
  template <typename T> T *ptr(const char *key) {
    py::handle v = get(key);
    if (v.is_none()) return nullptr;
    if (!py::isinstance<py::int_>(v)) fail(key, "a device pointer (int) or None");
    return reinterpret_cast<T *>(static_cast<uintptr_t>(v.cast<uint64_t>()));
  }
  void strides(const char *key, int64_t *out, size_t n) {
    py::handle v = get(key);
    if (!py::isinstance<py::sequence>(v) || py::len(v) != n) fail(key, (std::to_string(n) + " strides").c_str());
    py::sequence s = v.cast<py::sequence>();
    for (size_t i = 0; i < n; ++i) out[i] = s[i].cast<int64_t>();
  }
  cudaStream_t stream() { return reinterpret_cast<cudaStream_t>(static_cast<uintptr_t>(integer("stream"))); }

  void finish() {
    for (auto item : kw_) {
      std::string key = py::str(item.first);
      if (!used_.count(key)) throw py::type_error(std::string(op_) + ": unknown argument '" + key + "'");
    }
  }

 private:
  py::handle get(const char *key) {
    if (!kw_.contains(key)) throw py::type_error(std::string(op_) + ": missing argument '" + key + "'");
    used_.insert(key);
    return kw_[key];
  }
  [[noreturn]] void fail(const char *key, const char *what) {
    throw py::type_error(std::string(op_) + ": argument '" + key + "' must be " + what);
  }
  const char *op_;
  const py::kwargs &kw_;
  std::set<std::string> used_;
};

void check(const char *op, cudaError_t err) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(op) + ": " + cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
}

// ---- attention
AttnParams attn_params(Args &a, bool backward) {
  AttnParams p;
  p.dtype = int(a.integer("dtype"));
  p.B = int(a.integer("B")), p.Hq = int(a.integer("Hq")), p.Hkv = int(a.integer("Hkv"));
  p.Nq = int(a.integer("Nq")), p.Nk = int(a.integer("Nk")), p.D = int(a.integer("D"));
  p.scale = a.real("scale");
  p.causal = a.flag("causal");
  p.q = a.ptr<const void>("q"), p.k = a.ptr<const void>("k"), p.v = a.ptr<const void>("v");
  a.strides("q_stride", p.q_stride, 3), a.strides("k_stride", p.k_stride, 3), a.strides("v_stride", p.v_stride, 3);
  p.kpm = a.ptr<const uint8_t>("kpm");
  p.kpm_stride = a.integer("kpm_stride");
  p.o = a.ptr<void>("o");
  a.strides("o_stride", p.o_stride, 3);
  p.lse = a.ptr<float>("lse");
  p.bias = a.ptr<const float>("bias");
  a.strides("bias_stride", p.bias_stride, 4);
  if (backward) {
    p.dout = a.ptr<const void>("dout");
    a.strides("dout_stride", p.dout_stride, 3);
    p.delta = a.ptr<float>("delta");
    p.dq = a.ptr<void>("dq"), p.dk = a.ptr<void>("dk"), p.dv = a.ptr<void>("dv");
    a.strides("dq_stride", p.dq_stride, 3), a.strides("dk_stride", p.dk_stride, 3);
    a.strides("dv_stride", p.dv_stride, 3);
    p.dbias = a.ptr<float>("dbias");
  }
  return p;
}

// ---- rms_norm
RmsNormParams rms_params(Args &a, bool backward) {
  RmsNormParams p;
  p.dtype = int(a.integer("dtype"));
  p.rows = a.integer("rows");
  p.width = int(a.integer("width"));
  p.x = a.ptr<const void>("x"), p.w = a.ptr<const void>("w");
  p.x_stride = a.integer("x_stride");
  p.rstd = a.ptr<float>("rstd");
  if (!backward) {
    p.eps = a.real("eps");
    p.y = a.ptr<void>("y");
    p.y_stride = a.integer("y_stride");
  } else {
    p.dy = a.ptr<const void>("dy");
    p.dy_stride = a.integer("dy_stride");
    p.dx = a.ptr<void>("dx");
    p.dx_stride = a.integer("dx_stride");
    p.dw_partial = a.ptr<float>("dw_partial");
    p.num_partials = int(a.integer("num_partials"));
  }
  return p;
}

// ---- masked_gather
GatherParams gather_params(Args &a, bool backward) {
  GatherParams p;
  p.dtype = int(a.integer("dtype"));
  p.L = int(a.integer("L")), p.B = int(a.integer("B")), p.N = int(a.integer("N"));
  p.K = int(a.integer("K")), p.C = int(a.integer("C"));
  if (!backward) {
    p.x = a.ptr<const void>("x");
    a.strides("x_stride", p.x_stride, 3);
    p.idx = a.ptr<const int64_t>("idx");
    a.strides("idx_stride", p.idx_stride, 2);
    p.pos = a.ptr<const void>("pos");
    p.pos_stride = a.integer("pos_stride");
    p.out = a.ptr<void>("out");
    a.strides("out_stride", p.out_stride, 3);
  } else {
    p.dout = a.ptr<const void>("dout");
    a.strides("dout_stride", p.dout_stride, 3);
    p.inv = a.ptr<const int32_t>("inv");
    p.dx = a.ptr<void>("dx");
    a.strides("dx_stride", p.dx_stride, 3);
    p.dpos = a.ptr<float>("dpos");
  }
  return p;
}

// ---- attn_pool: each kernel reads only the fields it needs
enum class PoolKernel { rowdot, colsum, dx };
PoolParams pool_params(Args &a, PoolKernel kind) {
  PoolParams p;
  p.dtype = int(a.integer("dtype"));
  p.B = int(a.integer("B")), p.N = int(a.integer("N")), p.C = int(a.integer("C")), p.K = int(a.integer("K"));
  p.x = a.ptr<const void>("x");
  a.strides("x_stride", p.x_stride, 2);
  p.mu = a.ptr<float>("mu"), p.rstd = a.ptr<float>("rstd");
  if (kind == PoolKernel::rowdot) {
    p.eps = a.real("eps");
    p.m = a.ptr<const float>("m");
    p.s = a.ptr<float>("s");
  } else if (kind == PoolKernel::colsum) {
    p.p = a.ptr<const float>("p");
    p.z = a.ptr<float>("z");
  } else {
    p.g = a.ptr<const float>("g"), p.m = a.ptr<const float>("m");
    p.c1 = a.ptr<const float>("c1"), p.c2 = a.ptr<const float>("c2"), p.r = a.ptr<const float>("r");
    p.dx = a.ptr<void>("dx");
  }
  return p;
}

// One Python function per entry point: parse, launch, raise on a CUDA error.
template <typename Params, typename Parse, typename Launch>
void def_op(py::module_ &m, const char *name, Parse parse, Launch launch, const char *doc) {
  m.def(
      name,
      [name, parse, launch](const py::kwargs &kw) {
        Args a(name, kw);
        Params p = parse(a);
        cudaStream_t stream = a.stream();
        a.finish();
        check(name, launch(p, stream));
      },
      doc);
}

py::dict runtime_info() {
  py::dict d;
  int runtime = 0, driver = 0, count = 0;
  cudaRuntimeGetVersion(&runtime);
  cudaDriverGetVersion(&driver);
  cudaError_t err = cudaGetDeviceCount(&count);
  d["runtime_version"] = runtime;
  d["driver_version"] = driver;
  d["device_count"] = err == cudaSuccess ? count : 0;
  d["device_error"] = err == cudaSuccess ? std::string() : std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
  cudaGetLastError();  // a failed query leaves its error behind; clear it
  return d;
}

}  // namespace

PYBIND11_MODULE(_ivmini_cuda, m) {
  m.doc() = "ivmini CUDA kernels (csrc/); call through kernels.cuda, which checks every argument";
  def_op<AttnParams>(m, "attention_fwd", [](Args &a) { return attn_params(a, false); }, attention_fwd,
                     "o, lse = attention(q, k, v, bias); see csrc/attention.cu");
  def_op<AttnParams>(m, "attention_bwd", [](Args &a) { return attn_params(a, true); }, attention_bwd,
                     "delta, dq, dk, dv (and dbias) from dout; see csrc/attention.cu");
  def_op<RmsNormParams>(m, "rms_norm_fwd", [](Args &a) { return rms_params(a, false); }, rms_norm_fwd,
                        "y, rstd = rms_norm(x, w); see csrc/rms_norm.cu");
  def_op<RmsNormParams>(m, "rms_norm_bwd", [](Args &a) { return rms_params(a, true); }, rms_norm_bwd,
                        "dx and dweight partial sums; see csrc/rms_norm.cu");
  def_op<GatherParams>(m, "masked_gather_fwd", [](Args &a) { return gather_params(a, false); }, masked_gather_fwd,
                       "out = x[idx] (+ pos[idx]); see csrc/masked_gather.cu");
  def_op<GatherParams>(m, "masked_gather_bwd", [](Args &a) { return gather_params(a, true); }, masked_gather_bwd,
                       "dx (scatter as a gather through inv) and dpos; see csrc/masked_gather.cu");
  def_op<PoolParams>(m, "attn_pool_rowdot", [](Args &a) { return pool_params(a, PoolKernel::rowdot); },
                     attn_pool_rowdot, "mu, rstd, s = xhat m^T; see csrc/attn_pool.cu");
  def_op<PoolParams>(m, "attn_pool_colsum", [](Args &a) { return pool_params(a, PoolKernel::colsum); },
                     attn_pool_colsum, "z = p^T xhat; see csrc/attn_pool.cu");
  def_op<PoolParams>(m, "attn_pool_dx", [](Args &a) { return pool_params(a, PoolKernel::dx); }, attn_pool_dx,
                     "dx = rstd (g m - c1 - xhat c2) + r; see csrc/attn_pool.cu");
  m.def("runtime_info", &runtime_info, "CUDA runtime/driver versions and the device count (or why none)");
#ifdef IVMINI_ARCHS
  m.attr("archs") = IVMINI_ARCHS;
#endif
}
