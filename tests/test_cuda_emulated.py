"""csrc/flash_attn.cu run on the CPU, without a GPU: its source is compiled with g++ after its PTX wrappers
(mma.sync, ldmatrix, cp.async, ex2) are swapped for the emulations in tests/cuda_emu/ptx_emu.inc, with
every CUDA thread a fiber (tests/cuda_emu/prelude.h). Everything else -- tiling, masking, the online
softmax, the backward's three kernels, the host-side dispatch -- is the real code. 17 cases (fp16/bf16,
head dims 8..128 incl. 88, causal with Nq != Nk, key padding with an all-padded sample, GQA, strided
heads-last layouts, N = 0, 1, 257, sharp softmaxes) against a float64 reference, with NaN-poisoned outputs
and canaries around every tensor. What this cannot see: the real instruction semantics (the emulation is
written from the PTX ISA tables), timing, and compiler-specific behaviour; tests/test_cuda_ops.py on a GPU
is the final word."""
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


def emulated_source():
    """csrc/flash_attn.cu with its PTX section replaced by the emulation and its launches by emu_launch."""
    src = open(os.path.join(CSRC, "flash_attn.cu")).read()
    start, end = src.find("// PTX wrappers"), src.find("// fragments:")
    assert start > 0 and end > start, "csrc/flash_attn.cu must keep its '// PTX wrappers' and '// fragments:' sections"
    start = src.rindex("\n// ----", 0, start) + 1     # from the divider line above each section title
    end = src.rindex("\n// ----", 0, end) + 1
    src = src[:start] + '#include "ptx_emu.inc"\n' + src[end:]
    src, launches = re.subn(r"(\w+)<<<([^>]*)>>>\(([^;]*)\);", r"emu_launch(\1, \2, \3);", src)
    assert launches == 1, f"expected the one kernel launch site in csrc/flash_attn.cu, found {launches}"
    return src.replace('#include "common.cuh"', '#include "prelude.h"\n#include "common.cuh"\n'
                       "namespace ivmini { namespace { alignas(16) unsigned char smem[256 * 1024]; } }\n")


@pytest.fixture(scope="module")
def checker(tmp_path_factory):
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if not cxx:
        pytest.skip("no C++ compiler")
    inc = cuda_include_dir()
    build = tmp_path_factory.mktemp("cuda_emu")
    (build / "flash_attn_emu.cpp").write_text(emulated_source())
    exe = build / "flash_attn_check"
    proc = subprocess.run([cxx, "-std=c++17", "-O1", "-w", "-I", str(build), "-I", EMU, "-I", CSRC, "-I", inc,
                           os.path.join(EMU, "flash_attn_check.cpp"), "-o", str(exe)], capture_output=True, text=True)
    assert proc.returncode == 0, f"compiling the emulated flash attention failed:\n{proc.stderr[-4000:]}"
    return exe


def test_flash_attention_cuda_source_runs_correctly_under_emulation(checker, seed):
    proc = subprocess.run([str(checker), str(seed)], capture_output=True, text=True, timeout=900)
    print(proc.stdout[-6000:], proc.stderr[-2000:])
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("OK", "FAIL"))]
    assert len(lines) == 17, f"expected 17 cases, got {len(lines)}:\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}"
    assert proc.returncode == 0 and "ALL OK" in proc.stdout, \
        f"seed {seed}: " + "\n".join(line for line in lines if not line.startswith("OK")) + proc.stderr[-2000:]
