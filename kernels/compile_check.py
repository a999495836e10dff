"""Compile every Triton kernel for a GPU architecture without a GPU: python -m kernels.compile_check [--arch 90 80] [--all]

The Triton interpreter (how the tests run on CPU) does not enforce what the GPU compiler does (tl.dot
shape minimums, register and shared-memory limits, type rules), so a kernel can pass every CPU test
and still fail to compile on a GPU. This script runs the real compiler (triton.compile to PTX and a
cubin, with the ptxas that ships with triton) for sm_90/sm_80 and prints registers, spill stack and
shared memory per variant (spills need cuobjdump, found in the triton wheel when present).
Default: bf16, one config per kernel, head dim 88, attention with and without a bias (CI runs this).
--all: every autotune config, bf16/fp16/fp32 and head dims 64, 88, 128.

Must run without TRITON_INTERPRET (the @triton.jit objects are then compilable), e.g.
    env -u TRITON_INTERPRET python -m kernels.compile_check
"""
import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("kernels.compile_check compiles for a GPU: run it without TRITON_INTERPRET=1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from .triton import attention, attn_pool, masked_gather, rms_norm  # noqa: E402

TYPE = {tl.float16: "fp16", tl.bfloat16: "bf16", tl.float32: "fp32"}
FLOAT_ARGS = {"eps", "sm_scale"}


def variants(full):
    """(kernel, pointer dtypes by arg name ('x' = the data dtype), constexprs, data dtype) to compile.
    Arguments not named as pointers or constexprs are i32 scalars (fp32 for eps and the scales)."""
    dtypes = (tl.bfloat16, tl.float16, tl.float32) if full else (tl.bfloat16,)
    for dt in dtypes:
        prec = "ieee" if dt == tl.float32 else "tf32"
        yield rms_norm._rms_norm_fwd_kernel, dict(X="x", W="x", Y="x", RSTD="fp32"), \
            [dict(ROUND=dt, BLOCK_M=2, BLOCK_N=2048, num_warps=8)], dt
        yield rms_norm._rms_norm_bwd_kernel, dict(DY="x", X="x", W="x", RSTD="fp32", DX="x", DW_PARTIAL="fp32"), \
            [dict(ROUND=dt, BLOCK_M=2, BLOCK_N=2048, num_warps=8)], dt
        yield masked_gather._masked_gather_fwd_kernel, dict(X="x", IDX="i64", POS="x", OUT="x"), \
            [dict(HAS_POS=True, ROUND=dt, BLOCK_K=16, BLOCK_C=256, num_warps=4)], dt
        yield masked_gather._masked_gather_bwd_kernel, dict(DOUT="x", INV="i32", DX="x", DPOS="x"), \
            [dict(HAS_POS=True, BLOCK_N=16, BLOCK_C=256, num_warps=4)], dt
        pool = dict(DOT=dt, SPLIT=dt != tl.float32, PRECISION=prec, BLOCK_K=32)
        f32 = lambda *names: {n: "fp32" for n in names}  # noqa: E731
        for kern, ptrs in ((attn_pool._attn_pool_rowdot_kernel, dict(X="x", **f32("M", "S", "MU", "RSTD"))),
                           (attn_pool._attn_pool_colsum_kernel, dict(X="x", **f32("P", "MU", "RSTD", "Z"))),
                           (attn_pool._attn_pool_bwd_dx_kernel,
                            dict(X="x", DX="x", **f32("G", "M", "MU", "RSTD", "C1", "C2", "R")))):
            yield kern, ptrs, [dict(pool, **c.all_kwargs()) for c in kern.configs[:None if full else 1]], dt
        for D, causal, kpm, bias in _attention_variants(full):
            D0, D1 = attention.split_head_dim(D)
            meta = dict(D=D, D0=D0, D1=D1, IS_CAUSAL=causal, HAS_KPM=kpm, HAS_BIAS=bias, DOT=dt, PRECISION=prec)
            ptrs = dict(LSE="fp32", DELTA="fp32", KPM="u8", DBIAS="fp32",
                        **{n: "x" for n in ("Q", "K", "V", "BIAS", "O", "DO", "DQ", "DK", "DV")})
            for kern in (attention._attention_fwd_kernel, attention._attention_bwd_dkdv_kernel,
                         attention._attention_bwd_dq_kernel):
                kmeta = dict(meta, BIAS_GRAD=bias) if kern is attention._attention_bwd_dq_kernel else meta
                yield kern, ptrs, [dict(kmeta, **c.all_kwargs()) for c in kern.configs[:None if full else 1]], dt


def _attention_variants(full):
    """(head dim, causal, key padding, bias): every mask combination without a bias, and a bias (with its
    gradient in the dQ kernel) alone and with both masks; --all at d = 64, 88, 128, else at d = 88 only, and
    without the causal + padding pair."""
    for D in (64, 88, 128) if full else (88,):
        for causal, kpm in itertools.product((False, True), (False, True)):
            if full or not (causal and kpm):
                yield D, causal, kpm, False
        yield D, False, False, True
        yield D, True, True, True


def _cuobjdump():
    for root, _, files in os.walk(os.path.dirname(triton.__file__)):
        if "cuobjdump" in files:
            return os.path.join(root, "cuobjdump")
    return None


def resources(compiled, cuobjdump):
    if cuobjdump is None:
        return "regs/spills: cuobjdump not found"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", out)
    return f"regs {m.group(1)} stack {m.group(2)}" if m else "regs/spills: not reported"


def compile_one(kern, ptrs, consts, dt, arch):
    fn = kern.fn if isinstance(kern, triton.runtime.Autotuner) else kern   # autotuned kernels wrap the JITFunction
    options = {k: consts.pop(k) for k in ("num_warps", "num_stages", "num_ctas", "maxnreg") if k in consts}
    options = {k: v for k, v in options.items() if v is not None}
    sig = {}
    for a in fn.arg_names:
        if a in consts:
            sig[a] = "constexpr"
        elif a in ptrs:
            sig[a] = "*" + (TYPE[dt] if ptrs[a] == "x" else ptrs[a])
        else:
            sig[a] = "fp32" if a in FLOAT_ARGS else "i32"
    src = ASTSource(fn, signature=sig, constexprs=consts)
    return fn.__name__, triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities (default 90 80)")
    ap.add_argument("--all", action="store_true", help="every autotune config, dtype and head dim")
    args = ap.parse_args(argv)
    cuobjdump = _cuobjdump()
    n, failures = 0, []
    for arch in args.arch:
        for kern, ptrs, const_list, dt in variants(args.all):
            for consts in const_list:
                label = {k: (TYPE.get(v, v) if isinstance(v, tl.dtype) else v) for k, v in consts.items()}
                try:
                    name, ck = compile_one(kern, ptrs, dict(consts), dt, arch)
                except Exception as e:  # report every failing variant, then exit non-zero
                    failures.append(f"sm_{arch} {kern.__name__} {label}: {str(e)[-600:]}")
                    print("FAIL", failures[-1], flush=True)
                    continue
                n += 1
                print(f"sm_{arch} {name:34s} {TYPE[dt]} shared {ck.metadata.shared:6d} {resources(ck, cuobjdump)} "
                      f"{'wgmma' if 'wgmma' in ck.asm['ptx'] else ''} {label}", flush=True)
    print(f"compiled {n} variants, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
