"""The CUDA sources run on the CPU, without a GPU: each csrc .cu file is compiled with g++ against
tests/cuda_emu/prelude.h (every CUDA thread a fiber, __syncthreads and warp operations real barriers,
shared memory NaN-poisoned per block, launches rewritten into emu_launch), its inline PTX swapped for the
emulations written from the PTX ISA tables (tests/cuda_emu/ptx_emu.inc: mma.sync, ldmatrix, cp.async, ex2).
Everything else -- tiling, masking, reductions, the host-side dispatch -- is the real code.

attention.cu: 22 cases (fp16/bf16, head dims 8..128 incl. 88, causal with Nq != Nk, key padding with an
all-padded sample, GQA, strided heads-last layouts, N = 0, 1, 257, sharp softmaxes; the forward's 128-query
CTAs with a partial last CTA (Nq 70, 129, 140, 150, 257), causal warps that skip whole key blocks, Q re-read
from shared memory at D_T = 128; 4 with an additive bias (the 64-query forward):
full (padded rows, or stored keys-major) and broadcast (1, 1, Nq, Nk), (B, 1, 1, Nk) strides, -inf entries and
a whole -inf row, with causal Nq != Nk, key padding and GQA, dbias checked elementwise) against a float64
reference, with NaN-poisoned outputs and canaries around every tensor (tests/cuda_emu/attention_check.cpp).
rms_norm.cu, masked_gather.cu, attn_pool.cu: forward and backward entry points on fresh random inputs, the
same way (tests/cuda_emu/memory_ops_check.cpp; the cases are listed above MEMORY_OPS below).
What this cannot see: the real instruction semantics (the emulation is written from the PTX ISA tables),
timing, and compiler-specific behaviour; the backend="cuda" cases of tests/test_<op>.py on a GPU are the final word."""
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMU = os.path.join(ROOT, "tests", "cuda_emu")
CSRC = os.path.join(ROOT, "csrc")


def cuda_include_dir():
    """The CUDA toolkit headers (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h), found through nvcc."""
    nvcc = shutil.which(os.environ.get("IVMINI_NVCC", "nvcc"))
    if not nvcc:
        pytest.skip("no nvcc, so no CUDA headers to compile the emulated kernel against")
    out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True).stderr
    for inc in re.findall(r'INCLUDES="([^"]*)"', out):
        for path in re.findall(r"-I(\S+)", inc):
            if os.path.exists(os.path.join(path, "cuda_runtime.h")):
                return path
    pytest.skip("could not find cuda_runtime.h next to nvcc")


LAUNCH = re.compile(r"([\w:]+(?:<[^<>;]*>)?)<<<([^;]*?)>>>\(([^;]*)\);")
DYNAMIC_SHARED = re.compile(r"extern __shared__ (?:__align__\(\d+\) )?([\w: ]+?) (\w+)\[\];")
STATIC_SHARED = re.compile(r"__shared__ (?:__align__\(\d+\) )?([\w: ]+?) (\w+)\[([^\]]+)\];")


def emulate_cuda_source(src, name, launches):
    """Rewrite a csrc .cu file for tests/cuda_emu/prelude.h: its `launches` kernel launch sites into
    emu_launch(kernel, grid, threads, smem, stream, args...), its dynamic shared memory into a pointer to the
    emulated block's buffer and each static __shared__ array into storage shared by the block's threads."""
    src, n = LAUNCH.subn(r"emu_launch(\1, \2, \3);", src)
    assert n == launches, f"expected {launches} kernel launch sites in csrc/{name}, found {n}"
    src = DYNAMIC_SHARED.sub(r"\1 *\2 = reinterpret_cast<\1 *>(emu::smem_lo);", src)
    src = STATIC_SHARED.sub(r"\1 (&\2)[\3] = emu::block_shared<\1[\3]>();", src)
    assert "__shared__" not in re.sub(r"//.*", "", src), f"a __shared__ declaration of csrc/{name} was not rewritten"
    assert src.count('#include "common.cuh"') == 1, f"csrc/{name} must include common.cuh once"
    return src.replace('#include "common.cuh"', '#include "prelude.h"\n#include "common.cuh"')


def host_compiler_and_cuda_headers():
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if not cxx:
        pytest.skip("no C++ compiler")
    return cxx, cuda_include_dir()


def emulated_source():
    """csrc/attention.cu with its PTX section replaced by the emulation and its launches by emu_launch."""
    src = open(os.path.join(CSRC, "attention.cu")).read()
    start, end = src.find("// PTX wrappers"), src.find("// fragments:")
    assert start > 0 and end > start, "csrc/attention.cu must keep its '// PTX wrappers' and '// fragments:' sections"
    start = src.rindex("\n// ----", 0, start) + 1     # from the divider line above each section title
    end = src.rindex("\n// ----", 0, end) + 1
    src = src[:start] + '#include "ptx_emu.inc"\n' + src[end:]
    src = emulate_cuda_source(src, "attention.cu", launches=1)
    return src.replace('#include "common.cuh"', '#include "common.cuh"\n'
                       "namespace ivmini { namespace { alignas(16) unsigned char smem[256 * 1024]; } }\n")


@pytest.fixture(scope="module")
def checker(tmp_path_factory):
    cxx, inc = host_compiler_and_cuda_headers()
    build = tmp_path_factory.mktemp("cuda_emu")
    (build / "attention_emu.cpp").write_text(emulated_source())
    exe = build / "attention_check"
    proc = subprocess.run([cxx, "-std=c++17", "-O1", "-w", "-I", str(build), "-I", EMU, "-I", CSRC, "-I", inc,
                           os.path.join(EMU, "attention_check.cpp"), "-o", str(exe)], capture_output=True, text=True)
    assert proc.returncode == 0, f"compiling the emulated flash attention failed:\n{proc.stderr[-4000:]}"
    return exe


ATTENTION_CASES = 22   # 18 without a bias, 4 with one (tests/cuda_emu/attention_check.cpp, main)


def test_flash_attention_cuda_source_runs_correctly_under_emulation(checker, seed):
    proc = subprocess.run([str(checker), str(seed)], capture_output=True, text=True, timeout=900)
    print(proc.stdout[-6000:], proc.stderr[-2000:])
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("OK", "FAIL"))]
    assert len(lines) == ATTENTION_CASES, \
        f"expected {ATTENTION_CASES} cases, got {len(lines)}:\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}"
    assert proc.returncode == 0 and "ALL OK" in proc.stdout, \
        f"seed {seed}: " + "\n".join(line for line in lines if not line.startswith("OK")) + proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# The memory-bound kernels: csrc/rms_norm.cu, csrc/masked_gather.cu, csrc/attn_pool.cu, each compiled as its
# own translation unit (their anonymous namespaces stay apart) and linked with tests/cuda_emu/memory_ops_check.cpp,
# which calls the real host entry points. Cases (all with NaN-poisoned outputs, canaries around every buffer,
# per-element error bounds from the dtype's rounding and the contract's fp32 arithmetic):
#   rmsnorm  45 = fp32/fp16/bf16 x widths 1, 7, 13 (scalar path), 64, 1408 (vector path) x rows 1, 5, 33,
#            num_partials 1/3/7 in turn (more blocks than rows: zero partials), padded strides on every other
#            one; + unaligned (scalar path) 64 and 1408 per dtype, 13000 bf16 / 9000 fp32 wide rows (re-read
#            second pass, dw past the registers summed in place in dw_partial); + 7 at the limits of the
#            backward's register-held dw sums: widths 8192 (16-bit) and 2047 (scalar) held, 8200 and 2049 just
#            past them, odd 255 / 8191, 4 rows per block over 5- and 4-row chunks: forward y, rstd; backward dx,
#            dw_partial
#   gather   24 = fp32/fp16/bf16 x C 1, 13 (scalar), 40, 1416 (vector; 1416 in two channel chunks) x L 1, 2,
#            pos (with dpos) on alternate cases, padded strides, an out-of-range index (N or -1) in every case;
#            + unaligned x/pos/out/dout/dx per dtype (scalar path at C 40, 1416) and K = 1: out (bit-exact), dx
#            (bit-exact), dpos
#   pool     24 = fp32 (FMA kernels) / fp16 / bf16 (mma.sync kernels) x 8 shapes: K 1, 3, 16, 33, 70
#            (several grid.z passes), C 8, 13, 72, N 1, 17, 40, B 1-2, padded x, unaligned x or fp32 operands
#            (scalar loads/stores), few or many SMs (row tiles / warps per block): rowdot mu, rstd, s; colsum z;
#            dx (rounded to the dtype)
MEMORY_OPS = {"rmsnorm": 60, "gather": 31, "pool": 24}


def emulated_attn_pool_source():
    """csrc/attn_pool.cu with its inline-PTX mma wrapper replaced by tests/cuda_emu/attn_pool_mma_emu.inc."""
    src = open(os.path.join(CSRC, "attn_pool.cu")).read()
    wrapper = re.search(r"template <typename T>\s*__device__ __forceinline__ void mma\(float \(&d\)\[4\], uint32_t a0, "
                        r"uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,\s*uint32_t b1\) \{\n.*?\n\}\n", src, re.S)
    assert wrapper and "mma.sync.aligned.m16n8k16" in wrapper.group(0), \
        "csrc/attn_pool.cu must keep its `mma<T>(d, a0, a1, a2, a3, b0, b1)` inline-PTX wrapper"
    src = src[:wrapper.start()] + '#include "attn_pool_mma_emu.inc"\n' + src[wrapper.end():]
    assert "asm(" not in src and "asm volatile" not in src, "csrc/attn_pool.cu has inline PTX outside its mma wrapper"
    return emulate_cuda_source(src, "attn_pool.cu", launches=6)


@pytest.fixture(scope="module")
def memory_ops_checker(tmp_path_factory):
    cxx, inc = host_compiler_and_cuda_headers()
    build = tmp_path_factory.mktemp("cuda_emu_memory_ops")
    sources = {
        "rms_norm_emu.cpp": emulate_cuda_source(open(os.path.join(CSRC, "rms_norm.cu")).read(), "rms_norm.cu", launches=2),
        "masked_gather_emu.cpp": emulate_cuda_source(open(os.path.join(CSRC, "masked_gather.cu")).read(),
                                                     "masked_gather.cu", launches=2),
        "attn_pool_emu.cpp": emulated_attn_pool_source(),
    }
    flags = ["-std=c++17", "-O1", "-w", "-I", EMU, "-I", CSRC, "-I", inc]
    jobs = []
    for name, text in sources.items():
        (build / name).write_text(text)
        jobs.append(subprocess.Popen([cxx, *flags, "-c", str(build / name), "-o", str(build / (name + ".o"))],
                                     stderr=subprocess.PIPE, text=True))
    jobs.append(subprocess.Popen([cxx, *flags, "-c", os.path.join(EMU, "memory_ops_check.cpp"),
                                  "-o", str(build / "memory_ops_check.o")], stderr=subprocess.PIPE, text=True))
    for job in jobs:
        err = job.communicate()[1]
        assert job.returncode == 0, f"compiling {job.args[-3]} failed:\n{err[-4000:]}"
    exe = build / "memory_ops_check"
    objs = [str(build / (name + ".o")) for name in sources] + [str(build / "memory_ops_check.o")]
    proc = subprocess.run([cxx, *objs, "-o", str(exe)], capture_output=True, text=True)
    assert proc.returncode == 0, f"linking the emulated kernels failed:\n{proc.stderr[-4000:]}"
    return exe


@pytest.mark.parametrize("op", sorted(MEMORY_OPS))
def test_memory_bound_cuda_sources_run_correctly_under_emulation(memory_ops_checker, op, seed):
    proc = subprocess.run([str(memory_ops_checker), str(seed), op], capture_output=True, text=True, timeout=900)
    print(proc.stdout[-6000:], proc.stderr[-2000:])
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("OK", "FAIL"))]
    assert len(lines) == MEMORY_OPS[op], \
        f"{op}: expected {MEMORY_OPS[op]} cases, got {len(lines)}:\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}"
    assert proc.returncode == 0 and "ALL OK" in proc.stdout, \
        f"{op}, seed {seed}: " + "\n".join(line for line in lines if not line.startswith("OK")) + proc.stderr[-2000:]
