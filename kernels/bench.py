"""Microbenchmarks of the four ops: python -m kernels.bench [attention|rms_norm|attn_pool|masked_gather|all] [--json F]
                                   python -m kernels.bench --cpu [op] [--threads T]     (CPU: ref vs the torch backend)
                                   python -m kernels.bench attention --pad88    (Triton d = 88: split vs padded)

For each op at the InternVideo2 shapes (bf16) it times, side by side in one run on one device, in this order
(the kernels first, so that a run cut short has measured them):
    triton    kernels/triton/<op>.py
    cuda      csrc/ through kernels/cuda/ops.py (built on first use)
    torch     ivmini's torch backend (kernels/torch_ops.py: SDPA's fused kernels, the no-K/V pool, ...)
    baselines named for what they are:
      sdpa_flash / sdpa_efficient / sdpa_cudnn / sdpa_math   F.scaled_dot_product_attention held to one backend
                (InternVideo2 itself calls FlashAttention-2, which is what sdpa_flash runs)
      official_RMSNorm        InternVideo2's RMSNorm module as written: x.float(), mean of squares, rsqrt, cast
                              back, times the weight (several kernels, fp32 intermediates)
      torch_F.rms_norm        torch's own fused RMSNorm
      official_pool_unfused   InternVideo2's AttentionPoolingBlock: three LayerNorms, q/k/v projections of every
                              token, softmax(q k^T) v, the output projection
      official_bool_index     the pretraining model's gather: (x + pos_embed)[~mask].reshape(B, -1, C)
                              (a device->host sync inside: nonzero)
      sdpa_attn_mask          (bias rows) SDPA with the bias as attn_mask
    ref       kernels/ref.py, eager, fp32 arithmetic: the readable spec
forward ("fwd") and forward+backward ("fwd+bwd"). Timer, per row (the JSON's "timer"):
    do_bench    triton.testing.do_bench, median, L2 flushed before every call (CUDA events)
    cuda_graph  rows whose do_bench median is under GRAPH_BELOW_MS (0.2 ms): re-timed from CUDA-graph replays,
                so launch gaps do not count (bench_ms_graph; the L2 is flushed before every call there too);
                "ms_do_bench" keeps the first figure. An op that cannot be captured (a host sync) keeps its
                do_bench figure and says why in "graph_error".
    wall        CPU: the median of wall-clock runs
Figures: attention in TFLOP/s (4*B*H*Nq*Nk*d forward, x2.5 for the backward, the real d, not padded; causal
halves it); memory-bound ops in GB/s of the bytes that must move (see each bench_* function). Ratios: to the
fastest baseline ("vs base" > 1: faster), to ref, and cuda's / triton_pad128's to triton; each figure is also a %
of two ceilings measured in the same run: a bf16 8192^3 matmul and a 1 GiB device copy (read + write bytes).
Attention is also timed with an additive bias: a BEATs-like (B, H, N, N) position bias with its gradient and a
BERT-like (B, 1, 1, N) key mask of 0/-inf. --pad88 times the Triton attention at d = 88 a second time with the
head dim padded to one 128 block (row triton_pad128; its "vs triton" < 1 where the 64 + 32 split pays, see
kernels/triton/attention.py).
masked_gather also gets a host-sync check on a GPU (rows with mode "host_sync"): forward + backward of each
implementation under torch.cuda.set_sync_debug_mode("error"); "host_sync" is "none" or the error torch raised
(official_bool_index is expected to sync, which shows the check works).

Autotuning: TRITON_CACHE_AUTOTUNING=1 is set (unless already set) before the Triton kernels are imported, so the
configs chosen here are kept in Triton's cache and a later process (the GPU check's tests) runs the same ones.
--warm-cache K runs every Triton kernel once, untimed, with only its K-th autotune config (K modulo the list
length): python -m kernels.gpu_check starts K = 0..4 in parallel processes before the timed run, so that the
timed run finds every config compiled instead of compiling them one after another.

Errors: a row that fails (an unsupported shape, a Triton OutOfResources / CompilationError, a CUDA error) records
its error and the run goes on; so does an op whose set-up fails. --json F is rewritten (atomically) after every
row, so a run that is killed keeps what it measured.

Without a GPU it runs tiny shapes under the Triton interpreter with a wall-clock timer, only to show that the
harness works: figures from a CPU run mean nothing. With --cpu it instead times ref, the torch backend and
torch's own paths at the real shapes of the B and 1B encoders (batch 1, fp32; attention also at d = 64, the
B-size head) on the CPU: the median of 5 to 50 wall-clock runs after one warm-up, in ms, and the ratio to ref
("vs ref" > 1: faster). Triton and cuda are left out there (the interpreter is no benchmark).
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel module is imported
os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")  # read when the autotuned kernels are defined (imported)

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

import kernels  # noqa: E402
from kernels import BackendUnavailable, ref  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPE = torch.bfloat16 if GPU else torch.float32
CPU = False         # --cpu (set by main): real shapes on the CPU, ref against the torch backend
PAD88 = False       # --pad88 (set by main): the Triton attention at d = 88 also with the head dim padded to 128
WARM = None         # --warm-cache K (set by main): run the Triton rows once with autotune config K, untimed
SKIP = {}           # --skip-impl NAME (set by main): impl -> why its rows are not run
GRAPH_BELOW_MS = 0.2   # do_bench medians under this are re-timed from CUDA graphs (launch overhead dominates)
ROW_DONE = None     # set by main: called after every row (rewrites --json)
# what one row may raise and still let the run go on: bad shapes / unsupported cases (ValueError, TypeError),
# CUDA and torch errors (RuntimeError, incl. torch.AcceleratorError), Triton compile and resource errors
ROW_ERRORS = (RuntimeError, ValueError, TypeError, triton.TritonError)


# The shapes each op is timed at: on a GPU (InternVideo2's, bf16), with --cpu (batch 1, fp32) and under the
# interpreter (tiny, only to run the harness); LABELS names a shape in the rows (kernels/gpu_check.py's compass
# finds its rows by these labels).
SHAPES = {
    "attention": dict(gpu=[(32, 16, 417, 88, False), (8, 16, 2049, 88, False), (4, 25, 2049, 128, False),
                           (4, 32, 2048, 128, True)],                  # (B, H, N, d, causal)
                      cpu=[(1, 12, 2049, 64, False), (1, 16, 2049, 88, False), (1, 16, 417, 88, False)],
                      interpret=[(1, 2, 64, 32, False)]),
    "attention_bias": dict(gpu=[(32, 12, 496, 64, True), (32, 16, 512, 64, False)],   # (B, H, N, d, full bias)
                           cpu=[(1, 12, 496, 64, True), (1, 16, 512, 64, False)],
                           interpret=[(1, 2, 64, 32, True), (1, 2, 64, 32, False)]),
    "rms_norm": dict(gpu=[(32 * 417, 1408), (8 * 2049, 1408), (4 * 2049, 3200)],          # (rows, C)
                     cpu=[(2049, 768), (2049, 1408)], interpret=[(64, 128)]),
    "attn_pool": dict(gpu=[(32, 417, 1408, 16, 768), (32, 2049, 1408, 16, 768), (8, 2049, 3200, 16, 768)],
                      cpu=[(1, 2049, 768, 16, 768), (1, 2049, 1408, 16, 768)],   # (B, N, C, heads, out dim)
                      interpret=[(2, 33, 64, 16, 32)]),
    "masked_gather": dict(gpu=[(32, 2049, 1408, 417), (8, 2049, 3200, 417)],              # (B, N, C, K)
                          cpu=[(1, 2049, 768, 417), (1, 2049, 1408, 417)], interpret=[(2, 65, 64, 17)]),
}
LABELS = {
    "attention": lambda B, H, N, d, causal: f"B{B} H{H} N{N} d{d}{' causal' if causal else ''}",
    "attention_bias": lambda B, H, N, d, full: f"B{B} H{H} N{N} d{d} bias {'(B,H,N,N)' if full else '(B,1,1,N)'}",
    "rms_norm": lambda M, C: f"rows{M} C{C}",
    "attn_pool": lambda B, N, C, H, out: f"B{B} N{N} C{C} H{H} out{out}",
    "masked_gather": lambda B, N, C, K: f"B{B} N{N} C{C} K{K}",
}


def _pick(op):
    """This run's shapes of `op` (a key of SHAPES): on a GPU, on the CPU with --cpu, or the interpreter check."""
    return SHAPES[op]["gpu" if GPU else "cpu" if CPU else "interpret"]


def _short(e):
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


# ---------------------------------------------------------------------------------------------
# timing

def time_fn(fn):
    """{"ms": median milliseconds of fn(), "timer": how} (see the module docstring for the timers)."""
    if not GPU:
        fn()
        times = []
        # --cpu: at least 5 runs, more (up to 50) while they take under 2 s in all: a shared CPU is noisy
        while len(times) < 3 or (CPU and (len(times) < 5 or (len(times) < 50 and sum(times) < 2e3))):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return {"ms": statistics.median(times), "timer": "wall"}
    import triton.testing
    ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    if ms >= GRAPH_BELOW_MS:
        return {"ms": ms, "timer": "do_bench"}
    sync = host_sync_of(fn)     # a host sync would break the capture: the do_bench figure stands, with the reason
    if sync:
        return {"ms": ms, "timer": "do_bench", "graph_error": f"not captured, it syncs: {sync}"}
    try:
        return {"ms": bench_ms_graph(fn, ms), "timer": "cuda_graph", "ms_do_bench": ms}
    except RuntimeError as e:   # capture refused for another reason: likewise
        torch.cuda.synchronize()
        return {"ms": ms, "timer": "do_bench", "graph_error": _short(e)}


def host_sync_of(fn):
    """None when fn() makes no device->host synchronisation, else the error that
    torch.cuda.set_sync_debug_mode("error") raised at the first one."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    except RuntimeError as e:
        return _short(e)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return None


def bench_ms_graph(fn, ms_hint, replays=10):
    """Milliseconds per fn() from CUDA-graph replays: one graph of n x (L2 flush, fn), one of n x (L2 flush),
    each replayed `replays` times; (median of the first - median of the second) / n. The calls run back to back,
    without the host's launch gaps, and each starts with a cold L2 as in do_bench (a 256 MB memset evicts it)."""
    n = max(10, min(200, int(10 / (ms_hint + 0.1))))      # ~10 ms of work per replay
    flush = torch.empty(256 * 2 ** 20, dtype=torch.int8, device=DEVICE)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                          # capture needs a warm-up off the default stream
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    medians = []
    for with_fn in (True, False):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(n):
                flush.zero_()
                if with_fn:
                    fn()
        times = []
        for _ in range(replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        medians.append(statistics.median(times))
        del graph
    return max(medians[0] - medians[1], 0.0) / n


def fwd_bwd(fn, inputs):
    """A closure running fn(*inputs) and backward with a fixed random output gradient."""
    out = fn(*inputs)
    grad = torch.randn_like(out)

    def run():
        for t in inputs:
            if isinstance(t, torch.Tensor) and t.grad is not None:
                t.grad = None
        fn(*inputs).backward(grad)
    return run


def ceilings():
    if not GPU or WARM is not None:
        return {"matmul_tflops": None, "copy_gbps": None}
    a = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16)
    ms = time_fn(lambda: a @ a)["ms"]
    src = torch.empty(2 ** 30, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    ms_copy = time_fn(lambda: dst.copy_(src))["ms"]
    return {"matmul_tflops": 2 * 8192 ** 3 / ms / 1e9, "copy_gbps": 2 * 2 ** 30 / ms_copy / 1e6}


def autotuners():
    """Every autotuned Triton kernel of kernels/triton/<op>.py (also under another decorator such as heuristics)."""
    import importlib
    for name in ("attention", "rms_norm", "attn_pool", "masked_gather"):
        for obj in vars(importlib.import_module(f"kernels.triton.{name}")).values():
            while isinstance(obj, triton.runtime.KernelInterface) and not isinstance(obj, triton.runtime.JITFunction):
                if isinstance(obj, triton.runtime.Autotuner):
                    yield obj
                obj = obj.fn


def restrict_autotune(k):
    """Every autotuned Triton kernel keeps only its k-th config (k modulo the length of its list)."""
    for tuner in autotuners():
        tuner.configs = [tuner.configs[k % len(tuner.configs)]]


# ---------------------------------------------------------------------------------------------
# implementations per op: name -> callable(*inputs) or a string saying why it is not available

def _backend(op, name):
    try:
        kernels.resolve_backend(op, name, torch.device(DEVICE))
    except BackendUnavailable as e:
        return str(e).split(";")[0]
    fn = getattr(kernels, op)
    return lambda *a, **k: fn(*a, backend=name, **k)


def _sdpa(backend_name):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = getattr(SDPBackend, backend_name)

    def run(q, k, v, causal=False):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


def _official_rms_norm(x, weight, eps=1e-6):
    """InternVideo2's RMSNorm module (its non-fused path) as written: fp32 statistics, cast back, then weight."""
    input_dtype = x.dtype
    x = x.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps)).to(input_dtype)


def _official_pool_unfused(x, ln_q_w, ln_q_b, ln_k_w, ln_k_b, ln_v_w, ln_v_b, wq, bq, wk, bk, wv, bv, wo, bo, *,
                           num_heads):
    """InternVideo2's AttentionPoolingBlock (clip_projector) in the input dtype: mean query, three LayerNorms,
    q/k/v projections of every token, CrossAttention's explicit softmax(q k^T * scale) v, the output projection."""
    B, N, C = x.shape
    q = F.linear(F.layer_norm(x.mean(1, keepdim=True), (C,), ln_q_w, ln_q_b, 1e-5), wq, bq)   # (B, 1, C)
    k = F.linear(F.layer_norm(x, (C,), ln_k_w, ln_k_b, 1e-5), wk, bk)                          # (B, N, C)
    v = F.linear(F.layer_norm(x, (C,), ln_v_w, ln_v_b, 1e-5), wv, bv)
    heads = lambda t: t.view(B, -1, num_heads, C // num_heads).transpose(1, 2)  # noqa: E731  (B, H, n, C/H)
    attn = (heads(q) * (C // num_heads) ** -0.5) @ heads(k).transpose(-2, -1)                 # (B, H, 1, N)
    o = attn.softmax(dim=-1) @ heads(v)                                                        # (B, H, 1, C/H)
    return F.linear(o.transpose(1, 2).reshape(B, C), wo, bo)


# ---------------------------------------------------------------------------------------------
# per-op benchmarks: each appends rows {shape, mode, impl, ms, timer, value, unit} (or error)

def _measure(rows, shape, impls, inputs, work_fwd, work_bwd, unit, grad=True):
    """Time every impl forward (and forward+backward); value = work / time in the op's unit."""
    scale = 1e9 if unit == "TFLOP/s" else 1e6         # work per ms -> TFLOP/s or GB/s
    for name, fn in impls.items():
        if (CPU and name in ("triton", "cuda")) or (WARM is not None and not name.startswith("triton")):
            continue
        for mode in (("fwd", "fwd+bwd") if grad else ("fwd",)):
            row = {"shape": shape, "mode": mode, "impl": name}
            if isinstance(fn, str) or name in SKIP:
                row["error"] = fn if isinstance(fn, str) else SKIP[name]
            else:
                try:
                    with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                        run = (lambda: fn(*inputs)) if mode == "fwd" else fwd_bwd(fn, inputs)
                        if WARM is not None:      # compile only: one untimed call
                            run()
                            continue
                        row.update(time_fn(run))
                except ROW_ERRORS as e:
                    row["error"] = _short(e)
                    if GPU:
                        torch.cuda.synchronize()   # raises again if the CUDA context is broken: the op stops
                else:
                    work = work_fwd if mode == "fwd" else work_fwd + work_bwd
                    row.update(value=work / row["ms"] / scale, unit=unit)
            rows.append(row)
            if ROW_DONE:
                ROW_DONE()


def _leaf(*shape, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(DTYPE).requires_grad_()


def _kernel_impls(op, wrap):
    """triton, cuda, torch (ivmini's backends, in this order), each wrapped by `wrap` unless unavailable."""
    out = {}
    for t in ("triton", "cuda", "torch"):
        f = _backend(op, t)
        out[t] = f if isinstance(f, str) else wrap(f)
    return out


def bench_attention(rows):
    shapes = _pick("attention") + ([(1, 2, 64, 88, False)] if PAD88 and not (GPU or CPU) else [])
    for B, H, N, d, causal in shapes:
        q, k, v = _leaf(B, H, N, d), _leaf(B, H, N, d), _leaf(B, H, N, d)
        flops = 4 * B * H * N * N * d / (2 if causal else 1)   # real d, not padded
        shape = LABELS["attention"](B, H, N, d, causal)
        impls = _kernel_impls("attention", lambda f: lambda q, k, v: f(q, k, v, causal=causal))
        if GPU:
            for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH"):
                impls[f"sdpa_{name.split('_')[0].lower()}"] = (lambda f: lambda q, k, v: f(q, k, v, causal))(_sdpa(name))
        impls["ref"] = lambda q, k, v: ref.attention(q, k, v, causal=causal)
        _measure(rows, shape, impls, (q, k, v), flops, 2.5 * flops, "TFLOP/s")
        if PAD88 and d == 88 and not CPU and not isinstance(impls["triton"], str):
            # the same Triton kernels with 88 padded to one 128-wide block instead of split into 64 + 32
            from kernels.triton.attention import padded_head_dim
            with padded_head_dim():
                _measure(rows, shape, {"triton_pad128": impls["triton"]}, (q, k, v), flops, 2.5 * flops, "TFLOP/s")
    # with an additive bias: BEATs-like (a relative position bias per head and pair, trained: it needs dbias)
    # and BERT-like (an additive key mask, 0 or -inf, shared by heads and queries; no gradient)
    for B, H, N, d, full in _pick("attention_bias"):
        q, k, v = _leaf(B, H, N, d), _leaf(B, H, N, d), _leaf(B, H, N, d)
        if full:
            bias = _leaf(B, H, N, N)
        else:
            keep = torch.rand(B, 1, 1, N, device=DEVICE) > 0.1
            bias = torch.zeros(B, 1, 1, N, device=DEVICE).masked_fill(~keep, float("-inf")).to(DTYPE)
        flops = 4 * B * H * N * N * d
        impls = _kernel_impls("attention", lambda f: lambda q, k, v, b: f(q, k, v, bias=b))
        impls["sdpa_attn_mask"] = lambda q, k, v, b: F.scaled_dot_product_attention(q, k, v, attn_mask=b)
        impls["ref"] = lambda q, k, v, b: ref.attention(q, k, v, bias=b)
        _measure(rows, LABELS["attention_bias"](B, H, N, d, full), impls, (q, k, v, bias), flops, 2.5 * flops,
                 "TFLOP/s")


def bench_rms_norm(rows):
    for M, C in _pick("rms_norm"):
        x, w = _leaf(M, C), _leaf(C)
        e = x.element_size()
        fwd_bytes = 2 * M * C * e + C * e + 4 * M           # read x, w; write y, rstd
        bwd_bytes = 3 * M * C * e + 2 * C * e + 4 * M        # read x, dy, w, rstd; write dx, dw
        impls = _kernel_impls("rms_norm", lambda f: f)
        impls.update({"official_RMSNorm": _official_rms_norm,
                      "torch_F.rms_norm": lambda x, w: F.rms_norm(x, (C,), w, 1e-6), "ref": ref.rms_norm})
        _measure(rows, LABELS["rms_norm"](M, C), impls, (x, w), fwd_bytes, bwd_bytes, "GB/s")


def bench_attn_pool(rows):
    for B, N, C, H, out in _pick("attn_pool"):
        x = _leaf(B, N, C)
        params = [_leaf(C, scale=0.1) + 1 if i in (0, 2, 4) else _leaf(C, scale=0.1) for i in range(6)]
        params = [p.detach().requires_grad_() for p in params]
        for i in range(3):
            params += [_leaf(C, C, scale=C ** -0.5), _leaf(C, scale=0.1)]
        params += [_leaf(out, C, scale=C ** -0.5), _leaf(out, scale=0.1)]
        e = x.element_size()
        x_bytes = B * N * C * e                               # the one thing that must be read (and dx written)
        impls = _kernel_impls("attn_pool", lambda f: lambda *a: f(*a, num_heads=H))
        impls.update({"official_pool_unfused": lambda *a: _official_pool_unfused(*a, num_heads=H),
                      "ref": lambda *a: ref.attn_pool(*a, num_heads=H)})
        _measure(rows, LABELS["attn_pool"](B, N, C, H, out), impls, (x, *params), x_bytes, 2 * x_bytes, "GB/s")


def bench_masked_gather(rows):
    for B, N, C, K in _pick("masked_gather"):
        x, pos = _leaf(B, N, C), _leaf(1, N, C)
        idx = torch.rand(B, N, device=DEVICE).argsort(dim=1)[:, :K].sort(dim=1).values
        mask = torch.ones(B, N, dtype=torch.bool, device=DEVICE)
        mask.scatter_(1, idx, False)
        e = x.element_size()
        fwd_bytes = 2 * B * K * C * e + N * C * e + B * K * 8     # read rows of x, write out, read pos, idx
        bwd_bytes = B * K * C * e + B * N * C * e + N * C * e     # read dout, write dx (all rows), write dpos
        impls = _kernel_impls("masked_gather", lambda f: f)
        impls.update({"official_bool_index": lambda x, i, p: (x + p)[~mask].reshape(B, -1, C),
                      "ref": ref.masked_gather})
        shape = LABELS["masked_gather"](B, N, C, K)
        _measure(rows, shape, impls, (x, idx, pos), fwd_bytes, bwd_bytes, "GB/s")
        if GPU and WARM is None:
            for name, fn in impls.items():
                if name != "ref":
                    rows.append({"shape": shape, "mode": "host_sync", "impl": name,
                                 **_host_sync(name, fn, (x, idx, pos))})
                    if ROW_DONE:
                        ROW_DONE()


def _host_sync(name, fn, inputs):
    """{"host_sync": "none"} when fn's forward + backward runs without a device->host synchronisation, else the
    error torch.cuda.set_sync_debug_mode("error") raised; {"error": ...} when fn cannot run at all."""
    if isinstance(fn, str) or name in SKIP:
        return {"error": fn if isinstance(fn, str) else SKIP[name]}
    try:
        run = fwd_bwd(fn, inputs)      # the first calls (autotuning, allocation) may sync: not counted
        run()
    except ROW_ERRORS as e:
        return {"error": _short(e)}
    return {"host_sync": host_sync_of(run) or "none"}


OPS = {"attention": bench_attention, "rms_norm": bench_rms_norm, "attn_pool": bench_attn_pool,
       "masked_gather": bench_masked_gather}


# ---------------------------------------------------------------------------------------------
# report

BASELINE_PREFIXES = ("sdpa_", "official_", "torch_")


def annotate(results, ceil):
    """Add to every timed row the ratios to the fastest baseline, to ref, cuda's and triton_pad128's to triton,
    and the % of the ceiling of its unit."""
    for op, rows in results.items():
        for row in rows:
            if "ms" not in row:
                continue
            same = [r for r in rows if r["shape"] == row["shape"] and r["mode"] == row["mode"] and "ms" in r]
            base_ms = [r["ms"] for r in same if r["impl"].startswith(BASELINE_PREFIXES)]
            if base_ms:
                row["vs_best_baseline"] = min(base_ms) / row["ms"]      # > 1: faster than every baseline
            ref_ms = [r["ms"] for r in same if r["impl"] == "ref"]
            if ref_ms:
                row["vs_ref"] = ref_ms[0] / row["ms"]                   # > 1: faster than the reference
            triton_ms = [r["ms"] for r in same if r["impl"] == "triton"]
            if row["impl"] in ("cuda", "triton_pad128") and triton_ms:
                row["vs_triton"] = triton_ms[0] / row["ms"]             # > 1: faster than the triton row
            limit = ceil["matmul_tflops"] if row["unit"] == "TFLOP/s" else ceil["copy_gbps"]
            if limit:
                row["pct_of_ceiling"] = 100 * row["value"] / limit


def print_table(results, ceil):
    if ceil["matmul_tflops"]:
        print(f"ceilings: bf16 matmul {ceil['matmul_tflops']:.0f} TFLOP/s, device copy {ceil['copy_gbps']:.0f} GB/s")
    for op, rows in results.items():
        print(f"\n{op}")
        print(f"  {'shape':34s} {'mode':8s} {'impl':22s} {'ms':>9s} {'value':>16s} {'vs base':>8s} {'%ceil':>6s} "
              f"{'vs triton':>9s} {'vs ref':>7s} timer")
        for r in rows:
            if "host_sync" in r:
                print(f"  {r['shape']:34s} {'sync':8s} {r['impl']:22s}   host sync: {r['host_sync'][:70]}")
                continue
            if "ms" not in r:
                print(f"  {r['shape']:34s} {r['mode']:8s} {r['impl']:22s}   n/a: {r.get('error', '?')[:70]}")
                continue
            vs = f"{r['vs_best_baseline']:.2f}x" if "vs_best_baseline" in r else ""
            pc = f"{r['pct_of_ceiling']:.0f}" if "pct_of_ceiling" in r else ""
            vt = f"{r['vs_triton']:.2f}x" if "vs_triton" in r else ""
            vr = f"{r['vs_ref']:.2f}x" if "vs_ref" in r else ""
            print(f"  {r['shape']:34s} {r['mode']:8s} {r['impl']:22s} {r['ms']:9.3f} "
                  f"{r['value']:8.1f} {r['unit']:7s} {vs:>8s} {pc:>6s} {vt:>9s} {vr:>7s} {r['timer']}")


def environment():
    commit = os.environ.get("IVMINI_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                    cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown (no git checkout and no IVMINI_COMMIT)"
    cpu = (f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
           f"{torch.get_num_threads()} threads")
    env = {"device": torch.cuda.get_device_name() if GPU else cpu + (")" if CPU else
                                                                     ", Triton interpreter: figures meaningless)"),
           "date": datetime.date.today().isoformat(), "commit": commit, "torch": torch.__version__,
           "triton": triton.__version__, "python": sys.version.split()[0], "dtype": str(DTYPE)}
    if GPU:
        props = torch.cuda.get_device_properties(0)
        env.update(cuda=torch.version.cuda, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2 ** 30, 1))
    return env


def write_json(path, payload):
    """Write payload to path atomically (a complete file or the previous one, never half of one)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("op", nargs="?", default="all", choices=list(OPS) + ["all"])
    ap.add_argument("--json", help="also write the results to this file, after every row (e.g. runs/bench.json)")
    ap.add_argument("--cpu", action="store_true", help="time ref and the torch backend at real shapes on the CPU")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--pad88", action="store_true",
                    help="attention: also time the Triton kernels at d = 88 with the head dim padded to 128 "
                         "(row triton_pad128) instead of split into 64 + 32")
    ap.add_argument("--skip-impl", action="append", default=[], metavar="IMPL",
                    help="leave an implementation out (its rows say so), e.g. cuda when its build failed")
    ap.add_argument("--warm-cache", type=int, metavar="K",
                    help="untimed: run the Triton rows once with only autotune config K of each kernel, to fill "
                         "Triton's cache (python -m kernels.gpu_check runs K = 0..4 in parallel)")
    args = ap.parse_args(argv)
    global GPU, DEVICE, DTYPE, CPU, PAD88, WARM, SKIP, ROW_DONE
    PAD88, WARM = args.pad88, args.warm_cache
    SKIP = {name: f"skipped (--skip-impl {name})" for name in args.skip_impl}
    if args.cpu:
        GPU, DEVICE, DTYPE, CPU = False, "cpu", torch.float32, True
    if args.threads:
        torch.set_num_threads(args.threads)
    if WARM is not None:
        restrict_autotune(WARM)
    torch.manual_seed(0)
    env = environment()
    print(f"{env['device']} | torch {env['torch']} | triton {env['triton']} | {env['dtype']} | "
          f"commit {env['commit'][:12]}" + (f" | warming Triton's cache with config {WARM}" if WARM is not None
                                             else ""), flush=True)
    ceil = ceilings()
    results, op_errors = {}, {}

    def save():
        annotate(results, ceil)
        write_json(args.json, {**env, "ceilings": ceil, "results": results, "op_errors": op_errors})
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)   # e.g. runs/ in a fresh clone
        ROW_DONE = save
    for name in (OPS if args.op == "all" else [args.op]):
        results[name] = []
        try:
            OPS[name](results[name])
        except ROW_ERRORS as e:     # the op's set-up failed (or its CUDA context broke): the next op still runs
            op_errors[name] = _short(e)
            print(f"{name}: stopped: {op_errors[name]}", flush=True)
        if args.json:
            save()
    annotate(results, ceil)
    if WARM is None:
        print_table(results, ceil)
    if args.json:
        save()
        print(f"\nwrote {args.json}")
    return results


if __name__ == "__main__":
    main()
