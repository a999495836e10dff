"""Compile the Triton kernels for sm_90 / sm_80 without a GPU, specialised as a real launch would specialise them.

    env -u TRITON_INTERPRET python -m kernels.compile_check [--arch 90 80] [--only attention ...] [--all] [--json F]

Why. The Triton interpreter (how the tests run on CPU) does not enforce what the GPU compiler does (tl.dot shape
minimums, register and shared-memory limits, type rules), so a kernel can pass every CPU test and still fail to
compile on a GPU. And a kernel compiled from a hand-written signature is not the kernel the GPU runs: a launch
specialises its arguments by value (a pointer, or an integer divisible by 16, gets tt.divisibility=16; an integer
equal to 1 becomes a constexpr), and those hints decide whether a tile is loaded as 16-byte vectors or element by
element, hence the registers, the spills and whether num_stages pipelines anything (cp.async).

How. Each case calls an op's real launcher (kernels/triton/<op>.py) on tensors of the `meta` device: shapes,
strides and pointer offsets as the model makes them, no memory. The kernel launches are intercepted (nothing runs),
and each captured launch goes through the JIT's own argument binder for a CUDA target
(triton.runtime.jit.create_function_from_signature + JITFunction._pack_args, as JITFunction.run does; both exist in
Triton 3.6, the GPU image, and 3.9, the CPU venv: if an upgrade moves them this script fails loudly) and then
triton.compile, once per autotune config. Meta tensors have data_ptr() = storage offset in bytes, so pointer
alignment is specialised exactly as on a GPU for a 16-byte-aligned allocation.

Report, one line per (arch, kernel, case, config): registers and spill bytes (cuobjdump --dump-resource-usage from the
Triton wheel: REG, and STACK, the local frame, which in a Triton kernel holds only spills), shared memory, and
instruction counts read from the PTX (static counts: an instruction in a loop counts once):
    cp16  cp.async of 16 bytes (global -> shared, the pipelined loads of num_stages >= 2)
    ld16  16-byte global loads (ld.global.v4.b32 and the like)      ld2  2-byte global loads (ld.global.b16)
    st16  16-byte global stores                                     st2  2-byte global stores
    mma   tensor-core instructions (mma.sync on sm_80, wgmma.mma_async on sm_90)
A healthy attention tile at head dim 88 with aligned strides has cp16 and ld16 > 0, ld2 = 0 and no spills;
the `unaligned` case (rows of D + 2 elements) shows what a layout without the hint costs.

Cases: attention (d = 88 by default; --all: 64, 88, 128) in the ViT's layout (q, k, v views of the packed
(B, N, 3, H, D) projection, o and do heads-last: the `aligned` case) for every mask and bias variant, and once
without masks in an `unaligned` layout; rms_norm, attn_pool and masked_gather at the 1B model's shapes. Default: bf16
and the first autotune config (CI compiles every config of the attention kernels: tests/test_triton_compile_gpu.py);
--configs all, --dtypes, --head-dims or --all for more.
"""
import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("kernels.compile_check compiles for a GPU: run it without TRITON_INTERPRET=1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from .triton import attention, attn_pool, masked_gather, rms_norm  # noqa: E402

MODULES = {"attention": attention, "rms_norm": rms_norm, "attn_pool": attn_pool, "masked_gather": masked_gather}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
META = "meta"


# ---------------------------------------------------------------------------------------------
# capturing the launches a launcher makes

@contextlib.contextmanager
def captured_launches():
    """Within this block `kernel[grid](*args, **kwargs)` of every kernel in kernels/triton records
    (kernel, args, kwargs) in the yielded list instead of running."""
    launches = []
    kernels = [obj for mod in MODULES.values() for name, obj in vars(mod).items()
               if name.endswith("_kernel") and isinstance(obj, (JITFunction, Autotuner))]

    def recorder(kernel):
        def run(*args, grid, warmup, **kwargs):
            launches.append((kernel, args, kwargs))
        return run

    for k in kernels:
        k.run = recorder(k)        # an instance attribute: KernelInterface.__getitem__ calls self.run
    try:
        yield launches
    finally:
        for k in kernels:
            del k.run


def _t(*shape, dtype=torch.bfloat16):
    return torch.empty(shape, dtype=dtype, device=META)


def attention_case(D, dtype, causal, kpm, bias, layout, B=2, H=16, N=2049):
    """Forward and backward launches of one attention call at the 1B model's N and H (B only sets a batch stride)."""
    if layout == "aligned":    # the ViT: q, k, v views of the packed (B, N, 3, H, D) projection
        q, k, v = (t.transpose(1, 2) for t in _t(B, N, 3, H, D, dtype=dtype).unbind(2))
    else:                      # rows of D + 2 elements: no stride is a multiple of 8 (nor of 16)
        q, k, v = (_t(B, H, N, D + 2, dtype=dtype)[..., :D] for _ in range(3))
    do = _t(B, N, H, D, dtype=dtype).transpose(1, 2)       # heads-last, as the gradient of o arrives
    key_padding_mask = _t(B, N, dtype=torch.bool) if kpm else None
    bias4 = _t(1, H, N, N, dtype=dtype).expand(B, H, N, N) if bias else None   # e.g. a relative position table
    scale = D ** -0.5
    o, lse = attention._attention_fwd(q, k, v, key_padding_mask, bias4, causal, scale)
    attention._attention_bwd(do, q, k, v, o, lse, key_padding_mask, bias4, causal, scale, bias)


def rms_norm_case(dtype, rows=32 * 417, width=1408):
    x, w = _t(rows, width, dtype=dtype), _t(width, dtype=dtype)
    y, rstd = rms_norm._rms_norm_fwd(x, w, 1e-6)
    rms_norm._rms_norm_bwd(y, x, w, rstd)


def attn_pool_case(dtype, B=32, N=417, C=1408, H=16):
    x, f32 = _t(B, N, C, dtype=dtype), torch.float32
    s, mu, rstd = attn_pool._rowdot(x, _t(B, 2 * H, C, dtype=f32), 1e-5)
    attn_pool._colsum(x, s, mu, rstd)
    attn_pool._dx(x, s, _t(B, 2 * H, C, dtype=f32), mu, rstd, mu, rstd, _t(B, C, dtype=f32))


def masked_gather_case(dtype, B=32, N=2049, K=417, C=1408):
    idx = torch.empty(B, K, dtype=torch.int64, device=META)
    masked_gather._masked_gather_fwd(_t(B, N, C, dtype=dtype), idx, _t(1, N, C, dtype=dtype))
    masked_gather._masked_gather_bwd(_t(B, K, C, dtype=dtype), idx, N, dtype)


def cases(ops, dtypes, head_dims, variants, layouts):
    """(op, case label, function making the launches)."""
    for dt in dtypes:
        dtype = DTYPES[dt]
        if "attention" in ops:
            for D in head_dims:
                for causal, kpm, bias in variants if "aligned" in layouts else []:
                    label = "+".join([n for n, on in (("causal", causal), ("kpm", kpm), ("bias", bias)) if on]
                                     or ["plain"])
                    yield "attention", f"aligned d{D} {dt} {label}", \
                        lambda D=D, c=causal, m=kpm, b=bias: attention_case(D, dtype, c, m, b, "aligned")
                if "unaligned" in layouts:
                    yield "attention", f"unaligned d{D} {dt} plain", \
                        lambda D=D: attention_case(D, dtype, False, False, False, "unaligned")
        if "rms_norm" in ops:
            yield "rms_norm", f"rows 13344 x 1408 {dt}", lambda: rms_norm_case(dtype)
        if "attn_pool" in ops:
            yield "attn_pool", f"32 x 417 x 1408 {dt}", lambda: attn_pool_case(dtype)
        if "masked_gather" in ops:
            yield "masked_gather", f"32 x 2049 -> 417 x 1408 {dt}", lambda: masked_gather_case(dtype)


VARIANTS = {  # attention (causal, key padding, bias)
    "plain": [(False, False, False)],
    "combos": [(True, True, False), (False, False, True), (True, True, True)],   # every code path, fewer compiles
    "all": [(False, False, False), (False, True, False), (True, False, False), (True, True, False),
            (False, False, True), (True, True, True)],
}


# ---------------------------------------------------------------------------------------------
# compiling a captured launch as the JIT would

def compile_launch(fn, args, kwargs, target):
    """triton.compile of JITFunction fn with the signature, constexprs and tt.divisibility attributes that
    fn[grid](*args, **kwargs) gets from the JIT on `target`."""
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def configs_of(kernel, which, args, kwargs):
    """[(config label, extra kwargs)]: the autotune configs an Autotuner would time for this launch (after its
    early_config_prune; the first, or all), or the launch as is."""
    if not isinstance(kernel, Autotuner):
        return [("", {})]
    chosen = kernel.configs
    if kernel.early_config_prune:
        chosen = kernel.early_config_prune(chosen, dict(zip(kernel.fn.arg_names, args)), **kwargs)
    chosen = chosen if which == "all" else chosen[:1]
    return [(_config_label(c.all_kwargs()), c.all_kwargs()) for c in chosen]


def _config_label(kw):
    blocks = " ".join(f"{k.removeprefix('BLOCK_')}{v}" for k, v in kw.items() if k.startswith("BLOCK_"))
    return f"{blocks} w{kw.get('num_warps')} s{kw.get('num_stages')}"


def _cuobjdump():
    for root, _, files in os.walk(os.path.dirname(triton.__file__)):
        if "cuobjdump" in files:
            return os.path.join(root, "cuobjdump")
    raise FileNotFoundError("cuobjdump not found in the triton wheel: registers and spills cannot be read")


def resources(cubin, cuobjdump):
    """(registers, spill bytes) of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)", out)
    if m is None:
        raise RuntimeError(f"cuobjdump printed no REG/STACK line:\n{out}")
    return int(m.group(1)), int(m.group(2))


_MEM = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)*?)(?:\.v(\d))?\.([bufs])(\d+)\b")
_CP16 = re.compile(r"\bcp\.async\.c[ag]\.shared\.global\S*\s+\[[^\]]*\],\s*\[[^\]]*\],\s*(?:16|0x10)\b")
_MMA = re.compile(r"\b(?:wgmma\.mma_async|mma\.sync)\.")


def ptx_counts(ptx):
    """Static instruction counts: cp16, ld16, ld2, st16, st2, mma (see the module docstring)."""
    widths = Counter()
    for op, _, vec, _, bits in _MEM.findall(ptx):
        widths[op, int(vec or 1) * int(bits) // 8] += 1
    return dict(cp16=len(_CP16.findall(ptx)), ld16=widths["ld", 16], ld2=widths["ld", 2],
                st16=widths["st", 16], st2=widths["st", 2], mma=len(_MMA.findall(ptx)))


def check(ops, archs, dtypes=("bf16",), head_dims=(88,), variants="all", layouts=("aligned", "unaligned"),
          configs="first", out=print):
    """Compile every selected case; returns (rows, failures). A row: arch, kernel, case, config, regs, spill,
    smem and the PTX counts."""
    cuobjdump = _cuobjdump()
    rows, failures = [], []
    for op, label, make in cases(ops, dtypes, head_dims, VARIANTS[variants], layouts):
        with captured_launches() as launches:
            make()
        for arch in archs:
            target = GPUTarget("cuda", arch, 32)
            for kernel, args, kwargs in launches:
                fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
                for config, extra in configs_of(kernel, configs, args, kwargs):
                    where = f"sm_{arch} {fn.__name__} [{label}] {config}"
                    try:
                        ck = compile_launch(fn, args, {**kwargs, **extra}, target)
                    except Exception as e:  # report every failing variant, then exit non-zero
                        failures.append(f"{where}: {type(e).__name__}: {str(e)[-600:]}")
                        out("FAIL " + failures[-1])
                        continue
                    regs, spill = resources(ck.asm["cubin"], cuobjdump)
                    row = dict(arch=arch, op=op, kernel=fn.__name__, case=label, config=config, regs=regs,
                               spill=spill, smem=ck.metadata.shared, **ptx_counts(ck.asm["ptx"]))
                    rows.append(row)
                    out(format_row(row))
    return rows, failures


def format_row(r):
    return (f"sm_{r['arch']} {r['kernel']:28s} {r['case']:28s} {r['config']:18s} regs {r['regs']:3d} "
            f"spill {r['spill']:4d} smem {r['smem']:6d}  cp16 {r['cp16']:3d} ld16 {r['ld16']:3d} ld2 {r['ld2']:3d} "
            f"st16 {r['st16']:3d} st2 {r['st2']:3d} mma {r['mma']:3d}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities (default 90 80)")
    ap.add_argument("--only", nargs="+", choices=list(MODULES), default=list(MODULES), help="ops (default all)")
    ap.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["bf16"])
    ap.add_argument("--head-dims", type=int, nargs="+", default=[88], help="attention head dims (default 88)")
    ap.add_argument("--variants", choices=list(VARIANTS), default="all",
                    help="attention masks and bias: every variant (default), none, or the combinations")
    ap.add_argument("--layouts", nargs="+", choices=["aligned", "unaligned"], default=["aligned", "unaligned"],
                    help="attention layouts (default both)")
    ap.add_argument("--configs", choices=["first", "all"], default="first", help="autotune configs to compile")
    ap.add_argument("--all", action="store_true", help="every dtype, head dims 64 88 128, every config")
    ap.add_argument("--json", help="also write the rows and failures to this file")
    args = ap.parse_args(argv)
    if args.all:
        args.dtypes, args.head_dims, args.configs = list(DTYPES), [64, 88, 128], "all"
    print(f"triton {triton.__version__}", flush=True)
    rows, failures = check(args.only, args.arch, args.dtypes, args.head_dims, args.variants, args.layouts, args.configs,
                           out=lambda line: print(line, flush=True))
    print(f"compiled {len(rows)} kernels, {len(failures)} failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, rows=rows, failures=failures), f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
