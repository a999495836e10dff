"""The CUDA backend's build: csrc/ compiled by nvcc into one pybind11 module, `_ivmini_cuda`, on first use.

csrc/*.cu and csrc/bindings.cpp are compiled with ninja (one object per source, in parallel) and linked with
the CUDA runtime (static) into a cache folder keyed by a hash of the sources, the nvcc version, the Python ABI
(the extension suffix: the GPU image runs Python 3.12, CPU machines 3.11), the target architectures and the flags:
    $IVMINI_CUDA_CACHE, default $XDG_CACHE_HOME/ivmini/cuda or ~/.cache/ivmini/cuda,  /<key>/
A build counts only once its COMPLETE marker is written; a file lock serialises builds started at once
(several ranks). The kernels are torch-free (raw pointers, sizes, strides, the stream), so the build needs
nvcc only: no GPU and no CUDA build of torch. setup.py never needs nvcc.

Environment: IVMINI_NVCC (else $CUDA_HOME/bin/nvcc, else nvcc on PATH); IVMINI_CUDA_ARCH, default "80;90a"
(sm_80 code for A100-class GPUs, sm_90a for H100/H200); IVMINI_CUDA_CACHE; MAX_JOBS (ninja -j).
Ahead of time: `python -m kernels.cuda build` (kernels/cuda/__main__.py). Test: tests/test_cuda_build.py.
"""
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from .. import BackendUnavailable

CSRC = Path(__file__).resolve().parents[2] / "csrc"
MODULE = "_ivmini_cuda"
DEFAULT_ARCHS = ("80", "90a")
NVCC_FLAGS = ("-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC")


class BuildError(BackendUnavailable):
    """The CUDA extension could not be built (no nvcc, a compile error...)."""


def find_nvcc():
    """The nvcc to use: $IVMINI_NVCC, else $CUDA_HOME/bin/nvcc, else the one on PATH."""
    for cand in (os.environ.get("IVMINI_NVCC"),
                 os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None,
                 "nvcc"):
        path = shutil.which(cand) if cand else None
        if path:
            return path
    raise BuildError("the cuda backend is compiled on first use and needs nvcc (the CUDA toolkit): none found "
                     "in IVMINI_NVCC, $CUDA_HOME/bin or PATH. Install the toolkit or use backend 'triton'/'ref'.")


def parse_archs(archs=None):
    """'80;90a' / '80,90a' / a list -> ('80', '90a'); default $IVMINI_CUDA_ARCH or 80 and 90a."""
    archs = archs or os.environ.get("IVMINI_CUDA_ARCH") or DEFAULT_ARCHS
    if isinstance(archs, str):
        archs = re.split(r"[;,\s]+", archs.strip())
    archs = tuple(a.replace("sm_", "").replace(".", "") for a in archs if a)
    for a in archs:
        if not re.fullmatch(r"\d{2,3}a?", a):
            raise ValueError(f"bad CUDA architecture {a!r}: use compute capabilities like 80, 90a (IVMINI_CUDA_ARCH)")
    if not archs:
        raise ValueError("no CUDA architecture given")
    return archs


def sources():
    """The files compiled into the module: every csrc/*.cu and the binding file."""
    if not (CSRC / "bindings.cpp").exists():
        raise BuildError(f"CUDA sources not found at {CSRC}: the cuda backend needs the repository checkout "
                         f"(pip install -e .), which keeps csrc/ next to kernels/")
    return sorted(CSRC.glob("*.cu")) + [CSRC / "bindings.cpp"]


def build_key(nvcc, archs):
    """<python abi tag>-<16 hex digits of sha256 over sources, headers, nvcc version, archs, flags>."""
    import pybind11
    h = hashlib.sha256()
    for f in sorted(p for p in CSRC.iterdir() if p.suffix in (".cu", ".cuh", ".h", ".cpp")):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    ext_suffix = sysconfig.get_config_var("EXT_SUFFIX")
    h.update("\0".join([version, ext_suffix, ";".join(archs), " ".join(NVCC_FLAGS), pybind11.__version__]).encode())
    return f"{sys.implementation.cache_tag}-{h.hexdigest()[:16]}"


def cache_dir():
    if os.environ.get("IVMINI_CUDA_CACHE"):
        return Path(os.environ["IVMINI_CUDA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ivmini" / "cuda"


# -- what `python -m kernels.cuda info` reports; nothing here compiles or takes the build lock

def nvcc_version(nvcc):
    """'13.0, V13.0.88' (release and build) from `nvcc --version`."""
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+), (V[\d.]+)", out)
    return f"{m.group(1)}, {m.group(2)}" if m else out.strip().splitlines()[-1]


def cached_module(key, cache=None):
    """The module file of a complete build with this key in the cache, or None (nothing is built)."""
    out_dir = (Path(cache) if cache else cache_dir()) / key
    so = out_dir / (MODULE + sysconfig.get_config_var("EXT_SUFFIX"))
    return so if (out_dir / "COMPLETE").exists() and so.exists() else None


def cuda_version_str(v):
    """12090 -> '12.9' (the encoding of cudaDriverGetVersion / cudaRuntimeGetVersion)."""
    return f"{v // 1000}.{v % 1000 // 10}"


def driver_info():
    """The NVIDIA driver and its devices, read from /proc and libcuda through ctypes: needs neither a build of
    csrc/ nor the CUDA runtime nor a CUDA build of torch. Returns {"kernel_module": version or None,
    "cuda": the driver's CUDA version or None, "devices": [(name, "sm_90"), ...], "problem": why none, or ""}."""
    import ctypes
    info = dict(kernel_module=None, cuda=None, devices=[], problem="")
    try:
        with open("/proc/driver/nvidia/version") as f:
            line = f.readline()
        # "NVRM version: NVIDIA UNIX [Open] Kernel Module [for x86_64]  575.57.08  ..."
        m = re.search(r"Kernel Module.*?\s(\d+\.\d+(?:\.\d+)?)\s", line)
        info["kernel_module"] = m.group(1) if m else line.strip()
    except FileNotFoundError:
        pass                                        # no kernel module loaded: libcuda below says what that means
    try:
        cu = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        info["problem"] = f"no NVIDIA driver: {e}"
        return info
    version, count = ctypes.c_int(0), ctypes.c_int(0)
    cu.cuDriverGetVersion(ctypes.byref(version))
    info["cuda"] = cuda_version_str(version.value)
    rc = cu.cuInit(0)
    if rc != 0:                                     # e.g. CUDA_ERROR_NO_DEVICE (100)
        name = ctypes.c_char_p()
        cu.cuGetErrorName(rc, ctypes.byref(name))
        info["problem"] = f"the driver reports {name.value.decode() if name.value else f'CUresult {rc}'}"
        return info
    cu.cuDeviceGetCount(ctypes.byref(count))
    for i in range(count.value):
        dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        name = ctypes.create_string_buffer(256)
        cu.cuDeviceGet(ctypes.byref(dev), i)
        cu.cuDeviceGetName(name, 256, dev)
        cu.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)   # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
        cu.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)   # ..._MINOR
        info["devices"].append((name.value.decode(), f"sm_{major.value}{minor.value}"))
    if not info["devices"]:
        info["problem"] = "the driver sees no device"
    return info


def _ninja():
    try:
        import ninja
        path = os.path.join(ninja.BIN_DIR, "ninja")
        if os.path.exists(path):
            return path
    except ImportError:
        pass
    path = shutil.which("ninja")
    if not path:
        raise BuildError("building the cuda backend needs ninja: pip install ninja")
    return path


def _ninja_file(nvcc, archs, out_dir):
    """build.ninja: one object per source (compiled in parallel), linked into the module (cudart static)."""
    import pybind11
    esc = lambda s: str(s).replace("$", "$$").replace(" ", "$ ").replace(":", "$:")  # noqa: E731  ninja paths
    q = lambda args: " ".join(shlex.quote(str(a)) for a in args).replace("$", "$$")  # noqa: E731  shell words
    includes = ["-I", CSRC, "-I", pybind11.get_include(), "-I", sysconfig.get_paths()["include"]]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    so = MODULE + sysconfig.get_config_var("EXT_SUFFIX")
    lines = ["ninja_required_version = 1.3", f"nvcc = {q([nvcc])}",
             f"cuflags = {q([*NVCC_FLAGS, *includes, *gencode])}",
             f"cxxflags = {q([*NVCC_FLAGS, *includes, '-DIVMINI_ARCHS=' + json.dumps(';'.join(archs))])}",
             "rule cu", "  command = $nvcc $cuflags -c $in -o $out", "  description = nvcc $in",
             "rule cxx", "  command = $nvcc $cxxflags -c $in -o $out", "  description = nvcc (host) $in",
             "rule link", "  command = $nvcc -shared $in -o $out", "  description = link $out"]
    objects = []
    for src in sources():
        obj = src.stem + ".o"
        objects.append(obj)
        lines.append(f"build {esc(obj)}: {'cu' if src.suffix == '.cu' else 'cxx'} {esc(src)}")
    lines += [f"build {esc(so)}: link {' '.join(map(esc, objects))}", f"default {esc(so)}", ""]
    (out_dir / "build.ninja").write_text("\n".join(lines))
    return out_dir / so


def build(archs=None, cache=None, verbose=False):
    """Build the extension if this key has no complete build yet; return the path of the module file."""
    nvcc, archs = find_nvcc(), parse_archs(archs)
    key = build_key(nvcc, archs)
    root = Path(cache) if cache else cache_dir()
    out_dir = root / key
    so = out_dir / (MODULE + sysconfig.get_config_var("EXT_SUFFIX"))
    if (out_dir / "COMPLETE").exists() and so.exists():
        return so
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)                       # another process may be building this key
        if (out_dir / "COMPLETE").exists() and so.exists():
            return so
        out_dir.mkdir(exist_ok=True)
        (out_dir / "COMPLETE").unlink(missing_ok=True)
        so.unlink(missing_ok=True)                              # a half-written module from an interrupted build
        _ninja_file(nvcc, archs, out_dir)
        cmd = [_ninja(), "-C", str(out_dir)] + (["-j", os.environ["MAX_JOBS"]] if os.environ.get("MAX_JOBS") else [])
        print(f"ivmini: compiling the CUDA kernels in csrc/ for sm_{', sm_'.join(archs)} into {out_dir} "
              f"(first use of this source version; a few minutes on 2 cores)", file=sys.stderr, flush=True)
        t0 = time.time()
        proc = subprocess.run(cmd + (["-v"] if verbose else []), capture_output=True, text=True)
        (out_dir / "build.log").write_text(proc.stdout + proc.stderr)
        if verbose:
            print(proc.stdout + proc.stderr, file=sys.stderr)
        if proc.returncode != 0:
            raise BuildError(f"building the CUDA extension failed (ninja exit {proc.returncode}); full log in "
                             f"{out_dir / 'build.log'}; its end:\n{(proc.stdout + proc.stderr)[-4000:]}")
        info = dict(key=key, archs=list(archs), nvcc=nvcc, seconds=round(time.time() - t0, 1),
                    python=sys.version.split()[0])
        (out_dir / "COMPLETE").write_text(json.dumps(info, indent=1))
    return so


def load(so):
    """Import the module file `so` (a fresh module object each call)."""
    spec = importlib.util.spec_from_file_location(MODULE, so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_EXT = None


def ext():
    """The loaded extension module (built on first use)."""
    global _EXT
    if _EXT is None:
        _EXT = load(build())
    return _EXT
