"""Microbenchmarks of the four ops: python -m kernels.bench [attention|rms_norm|attn_pool|masked_gather|all] [--json F]
                                   python -m kernels.bench --cpu [op] [--threads T]     (CPU: ref vs the torch backend)
                                   python -m kernels.bench attention --pad88    (Triton d = 88: split vs padded)

For each op at the InternVideo2 shapes (bf16) it times, side by side in one run on one device:
    ref      the pure-torch reference (kernels/ref.py, eager; computes in fp32)
    torch    ivmini's torch backend (kernels/torch_ops.py: SDPA's fused kernels, the no-K/V pool, ...)
    torch_*  torch's own paths: SDPA with each available backend (flash, efficient, cudnn, math),
             F.rms_norm, the unfused pooling module (LayerNorm + Linear + SDPA, as the official
             clip_projector), boolean indexing / torch.gather
    triton   kernels/*.py
    cuda     csrc/ through kernels/cuda/ops.py, when it is built
forward ("fwd") and forward+backward ("fwd+bwd"), as the median of triton.testing.do_bench (which
flushes the L2 cache before every run). Figures: attention in TFLOP/s (4*B*H*Nq*Nk*d forward, x2.5
for the backward, the real d, not padded; causal halves it); memory-bound ops in GB/s of the bytes
that must move (see each bench_* function). Ratios are to the fastest torch path, and each figure is
also given as a % of two ceilings measured in the same run: a bf16 8192^3 matmul and a 1 GiB device
copy (read + write bytes). Attention is also timed with an additive bias: a BEATs-like (B, H, N, N) position
bias with its gradient and a BERT-like (B, 1, 1, N) key mask of 0/-inf (torch's path: SDPA with attn_mask).
--pad88 times the Triton attention at d = 88 a second time with the head dim padded to one 128 block (row
triton_pad128; its "vs triton" < 1 where the 64 + 32 split pays, see kernels/triton/attention.py).

Without a GPU it runs tiny shapes under the Triton interpreter with a wall-clock timer, only to show
that the harness works: figures from a CPU run mean nothing. With --cpu it instead times ref, the torch
backend and torch's own paths at the real shapes of the B and 1B encoders (batch 1, fp32; attention also at
d = 64, the B-size head) on the CPU: the median of 5 to 50 wall-clock runs after one warm-up, in ms, and the ratio
to ref ("vs ref" > 1: faster). Triton and cuda are left out there (the interpreter is no benchmark).
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel module is imported

import torch.nn.functional as F  # noqa: E402

import kernels  # noqa: E402
from kernels import BackendUnavailable, ref  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPE = torch.bfloat16 if GPU else torch.float32
CPU = False   # --cpu (set by main): real shapes on the CPU, ref against the torch backend
PAD88 = False  # --pad88 (set by main): the Triton attention at d = 88 also with the head dim padded to 128


def _pick(gpu, cpu, interpret):
    """This run's shapes: on a GPU, on the CPU with --cpu, or the tiny interpreter check."""
    return gpu if GPU else cpu if CPU else interpret


# ---------------------------------------------------------------------------------------------
# timing

def bench_ms(fn):
    """Median milliseconds of fn(). GPU: triton.testing.do_bench (L2 flushed before each run)."""
    if GPU:
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    # --cpu: at least 5 runs, more (up to 50) while they take under 2 s in all: a shared CPU is noisy
    while len(times) < 3 or (CPU and (len(times) < 5 or (len(times) < 50 and sum(times) < 2e3))):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


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
    if not GPU:
        return {"matmul_tflops": None, "copy_gbps": None}
    a = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16)
    ms = bench_ms(lambda: a @ a)
    src = torch.empty(2 ** 30, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    ms_copy = bench_ms(lambda: dst.copy_(src))
    return {"matmul_tflops": 2 * 8192 ** 3 / ms / 1e9, "copy_gbps": 2 * 2 ** 30 / ms_copy / 1e6}


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


def _unfused_pool(x, ln_q_w, ln_q_b, ln_k_w, ln_k_b, ln_v_w, ln_v_b, wq, bq, wk, bk, wv, bv, wo, bo, *, num_heads):
    """The official clip_projector in the input dtype: LayerNorms, three projections, SDPA, out proj."""
    B, N, C = x.shape
    q = F.linear(F.layer_norm(x.mean(1, keepdim=True), (C,), ln_q_w, ln_q_b), wq, bq)
    k = F.linear(F.layer_norm(x, (C,), ln_k_w, ln_k_b), wk, bk)
    v = F.linear(F.layer_norm(x, (C,), ln_v_w, ln_v_b), wv, bv)
    heads = lambda t: t.view(B, -1, num_heads, C // num_heads).transpose(1, 2)  # noqa: E731
    o = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
    return F.linear(o.transpose(1, 2).reshape(B, C), wo, bo)


# ---------------------------------------------------------------------------------------------
# per-op benchmarks: each returns rows {shape, mode, impl, ms, value, unit}

def _measure(rows, shape, impls, inputs, work_fwd, work_bwd, unit, grad=True):
    """Time every impl forward (and forward+backward); value = work / time in the op's unit."""
    for name, fn in impls.items():
        if CPU and name in ("triton", "cuda"):
            continue
        for mode in (("fwd", "fwd+bwd") if grad else ("fwd",)):
            row = {"shape": shape, "mode": mode, "impl": name}
            if isinstance(fn, str):
                row["error"] = fn
            else:
                try:
                    with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                        run = (lambda: fn(*inputs)) if mode == "fwd" else fwd_bwd(fn, inputs)
                        ms = bench_ms(run)
                except (RuntimeError, ValueError, TypeError) as e:  # an unsupported shape/backend is reported
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                else:
                    work = work_fwd if mode == "fwd" else work_fwd + work_bwd
                    row.update(ms=ms, value=work / ms / 1e9, unit=unit)
            rows.append(row)


def _leaf(*shape, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(DTYPE).requires_grad_()


def bench_attention(rows):
    shapes = _pick([(32, 16, 417, 88, False), (8, 16, 2049, 88, False), (4, 25, 2049, 128, False),
                    (4, 32, 2048, 128, True)],
                   [(1, 12, 2049, 64, False), (1, 16, 2049, 88, False), (1, 16, 417, 88, False)],
                   [(1, 2, 64, 32, False)] + ([(1, 2, 64, 88, False)] if PAD88 else []))
    for B, H, N, d, causal in shapes:
        q, k, v = _leaf(B, H, N, d), _leaf(B, H, N, d), _leaf(B, H, N, d)
        flops = 4 * B * H * N * N * d / (2 if causal else 1)   # real d, not padded
        impls = {"ref": lambda q, k, v: ref.attention(q, k, v, causal=causal),
                 "torch": _backend("attention", "torch"),
                 "triton": _backend("attention", "triton"), "cuda": _backend("attention", "cuda")}
        for t in ("torch", "triton", "cuda"):
            if not isinstance(impls[t], str):
                impls[t] = (lambda f: lambda q, k, v: f(q, k, v, causal=causal))(impls[t])
        if GPU:
            for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
                impls[f"sdpa_{name.split('_')[0].lower()}"] = (lambda f: lambda q, k, v: f(q, k, v, causal))(_sdpa(name))
        _measure(rows, f"B{B} H{H} N{N} d{d}{' causal' if causal else ''}", impls, (q, k, v),
                 flops, 2.5 * flops, "TFLOP/s")
        if PAD88 and d == 88 and not CPU:
            # the same Triton kernels with 88 padded to one 128-wide block instead of split into 64 + 32
            from kernels.triton.attention import padded_head_dim
            with padded_head_dim():
                _measure(rows, f"B{B} H{H} N{N} d{d}{' causal' if causal else ''}",
                         {"triton_pad128": impls["triton"]}, (q, k, v), flops, 2.5 * flops, "TFLOP/s")
    # with an additive bias: BEATs-like (a relative position bias per head and pair, trained: it needs dbias)
    # and BERT-like (an additive key mask, 0 or -inf, shared by heads and queries; no gradient)
    bias_shapes = _pick([(32, 12, 496, 64, True), (32, 16, 512, 64, False)],
                        [(1, 12, 496, 64, True), (1, 16, 512, 64, False)],
                        [(1, 2, 64, 32, True), (1, 2, 64, 32, False)])
    for B, H, N, d, full in bias_shapes:
        q, k, v = _leaf(B, H, N, d), _leaf(B, H, N, d), _leaf(B, H, N, d)
        if full:
            bias = _leaf(B, H, N, N)
        else:
            keep = torch.rand(B, 1, 1, N, device=DEVICE) > 0.1
            bias = torch.zeros(B, 1, 1, N, device=DEVICE).masked_fill(~keep, float("-inf")).to(DTYPE)
        flops = 4 * B * H * N * N * d
        impls = {"ref": lambda q, k, v, b: ref.attention(q, k, v, bias=b),
                 "torch": _backend("attention", "torch"),
                 "sdpa_attn_mask": lambda q, k, v, b: F.scaled_dot_product_attention(q, k, v, attn_mask=b),
                 "triton": _backend("attention", "triton"), "cuda": _backend("attention", "cuda")}
        for t in ("torch", "triton", "cuda"):
            if not isinstance(impls[t], str):
                impls[t] = (lambda f: lambda q, k, v, b: f(q, k, v, bias=b))(impls[t])
        _measure(rows, f"B{B} H{H} N{N} d{d} bias {'(B,H,N,N)' if full else '(B,1,1,N)'}", impls,
                 (q, k, v, bias), flops, 2.5 * flops, "TFLOP/s")


def bench_rms_norm(rows):
    shapes = _pick([(32 * 417, 1408), (8 * 2049, 1408), (4 * 2049, 3200)], [(2049, 768), (2049, 1408)], [(64, 128)])
    for M, C in shapes:
        x, w = _leaf(M, C), _leaf(C)
        e = x.element_size()
        fwd_bytes = 2 * M * C * e + C * e + 4 * M           # read x, w; write y, rstd
        bwd_bytes = 3 * M * C * e + 2 * C * e + 4 * M        # read x, dy, w, rstd; write dx, dw
        impls = {"ref": ref.rms_norm, "torch": _backend("rms_norm", "torch"),
                 "torch_F.rms_norm": lambda x, w: F.rms_norm(x, (C,), w, 1e-6),
                 "triton": _backend("rms_norm", "triton"), "cuda": _backend("rms_norm", "cuda")}
        _measure(rows, f"rows{M} C{C}", impls, (x, w), fwd_bytes, bwd_bytes, "GB/s")


def bench_attn_pool(rows):
    shapes = _pick([(32, 417, 1408), (32, 2049, 1408), (8, 2049, 3200)], [(1, 2049, 768), (1, 2049, 1408)],
                   [(2, 33, 64)])
    H, out = (16, 768) if GPU or CPU else (16, 32)
    for B, N, C in shapes:
        x = _leaf(B, N, C)
        params = [_leaf(C, scale=0.1) + 1 if i in (0, 2, 4) else _leaf(C, scale=0.1) for i in range(6)]
        params = [p.detach().requires_grad_() for p in params]
        for i in range(3):
            params += [_leaf(C, C, scale=C ** -0.5), _leaf(C, scale=0.1)]
        params += [_leaf(out, C, scale=C ** -0.5), _leaf(out, scale=0.1)]
        e = x.element_size()
        x_bytes = B * N * C * e                               # the one thing that must be read (and dx written)
        impls = {"ref": lambda *a: ref.attn_pool(*a, num_heads=H),
                 "torch_unfused": lambda *a: _unfused_pool(*a, num_heads=H)}
        for t in ("torch", "triton", "cuda"):
            f = _backend("attn_pool", t)
            impls[t] = f if isinstance(f, str) else (lambda f: lambda *a: f(*a, num_heads=H))(f)
        _measure(rows, f"B{B} N{N} C{C} H{H} out{out}", impls, (x, *params), x_bytes, 2 * x_bytes, "GB/s")


def bench_masked_gather(rows):
    shapes = _pick([(32, 2049, 1408, 417), (8, 2049, 3200, 417)], [(1, 2049, 768, 417), (1, 2049, 1408, 417)],
                   [(2, 65, 64, 17)])
    for B, N, C, K in shapes:
        x, pos = _leaf(B, N, C), _leaf(1, N, C)
        idx = torch.rand(B, N, device=DEVICE).argsort(dim=1)[:, :K].sort(dim=1).values
        mask = torch.ones(B, N, dtype=torch.bool, device=DEVICE)
        mask.scatter_(1, idx, False)
        e = x.element_size()
        fwd_bytes = 2 * B * K * C * e + N * C * e + B * K * 8     # read rows of x, write out, read pos, idx
        bwd_bytes = B * K * C * e + B * N * C * e + N * C * e     # read dout, write dx (all rows), write dpos
        impls = {"ref": ref.masked_gather, "torch": _backend("masked_gather", "torch"),
                 "torch_bool_index": lambda x, i, p: (x + p)[~mask].view(B, K, C),
                 "triton": _backend("masked_gather", "triton"), "cuda": _backend("masked_gather", "cuda")}
        _measure(rows, f"B{B} N{N} C{C} K{K}", impls, (x, idx, pos), fwd_bytes, bwd_bytes, "GB/s")


OPS = {"attention": bench_attention, "rms_norm": bench_rms_norm, "attn_pool": bench_attn_pool,
       "masked_gather": bench_masked_gather}


# ---------------------------------------------------------------------------------------------
# report

def annotate(results, ceil):
    """Add the ratios to ref and to the best torch path, % of ceiling to every timed row (and cuda's ratio to
    triton)."""
    for op, rows in results.items():
        for row in rows:
            if "ms" not in row:
                continue
            torch_ms = [r["ms"] for r in rows if r["shape"] == row["shape"] and r["mode"] == row["mode"]
                        and "ms" in r and (r["impl"].startswith(("torch_", "sdpa")))]
            if torch_ms:
                row["vs_best_torch"] = min(torch_ms) / row["ms"]
            ref_ms = [r["ms"] for r in rows if r["shape"] == row["shape"] and r["mode"] == row["mode"]
                      and r["impl"] == "ref" and "ms" in r]
            if ref_ms:
                row["vs_ref"] = ref_ms[0] / row["ms"]                # > 1: faster than the reference
            triton_ms = [r["ms"] for r in rows if r["shape"] == row["shape"] and r["mode"] == row["mode"]
                         and r["impl"] == "triton" and "ms" in r]
            if row["impl"] in ("cuda", "triton_pad128") and triton_ms:
                row["vs_triton"] = triton_ms[0] / row["ms"]      # > 1: faster than the triton row
            limit = ceil["matmul_tflops"] if row["unit"] == "TFLOP/s" else ceil["copy_gbps"]
            if limit:
                row["pct_of_ceiling"] = 100 * row["value"] / limit


def print_table(results, ceil):
    if ceil["matmul_tflops"]:
        print(f"ceilings: bf16 matmul {ceil['matmul_tflops']:.0f} TFLOP/s, device copy {ceil['copy_gbps']:.0f} GB/s")
    for op, rows in results.items():
        print(f"\n{op}")
        print(f"  {'shape':34s} {'mode':8s} {'impl':18s} {'ms':>9s} {'value':>14s} {'vs torch':>9s} {'%ceil':>6s} "
              f"{'vs triton':>9s} {'vs ref':>7s}")
        for r in rows:
            if "ms" not in r:
                print(f"  {r['shape']:34s} {r['mode']:8s} {r['impl']:18s}   n/a: {r['error'][:70]}")
                continue
            vs = f"{r['vs_best_torch']:.2f}x" if "vs_best_torch" in r else ""
            pc = f"{r['pct_of_ceiling']:.0f}" if "pct_of_ceiling" in r else ""
            vt = f"{r['vs_triton']:.2f}x" if "vs_triton" in r else ""
            vr = f"{r['vs_ref']:.2f}x" if "vs_ref" in r else ""
            print(f"  {r['shape']:34s} {r['mode']:8s} {r['impl']:18s} {r['ms']:9.3f} "
                  f"{r['value']:8.1f} {r['unit']:7s}{vs:>8s} {pc:>6s} {vt:>9s} {vr:>7s}")


def environment():
    commit = os.environ.get("IVMINI_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                    cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    import triton
    cpu = (f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
           f"{torch.get_num_threads()} threads")
    return {"device": torch.cuda.get_device_name() if GPU else cpu + (")" if CPU else
                                                                      ", Triton interpreter: figures meaningless)"),
            "date": datetime.date.today().isoformat(), "commit": commit, "torch": torch.__version__,
            "triton": triton.__version__, "python": sys.version.split()[0], "dtype": str(DTYPE)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("op", nargs="?", default="all", choices=list(OPS) + ["all"])
    ap.add_argument("--json", help="also write the results to this file (e.g. runs/bench.json)")
    ap.add_argument("--cpu", action="store_true", help="time ref and the torch backend at real shapes on the CPU")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--pad88", action="store_true",
                    help="attention: also time the Triton kernels at d = 88 with the head dim padded to 128 "
                         "(row triton_pad128) instead of split into 64 + 32")
    args = ap.parse_args(argv)
    global GPU, DEVICE, DTYPE, CPU, PAD88
    PAD88 = args.pad88
    if args.cpu:
        GPU, DEVICE, DTYPE, CPU = False, "cpu", torch.float32, True
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    env = environment()
    print(f"{env['device']} | torch {env['torch']} | triton {env['triton']} | {env['dtype']} | commit {env['commit'][:12]}")
    ceil = ceilings()
    results = {}
    for name in (OPS if args.op == "all" else [args.op]):
        results[name] = []
        OPS[name](results[name])
    annotate(results, ceil)
    print_table(results, ceil)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)   # e.g. runs/ in a fresh clone
        with open(args.json, "w") as f:
            json.dump({**env, "ceilings": ceil, "results": results}, f, indent=1)
        print(f"\nwrote {args.json}")
    return results


if __name__ == "__main__":
    main()
