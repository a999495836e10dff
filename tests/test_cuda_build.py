"""The CUDA backend's build, on any machine with nvcc (no GPU needed): every csrc/*.cu compiles for the
default targets (sm_80, sm_90a) into a fresh cache, the module imports, the build is cached by key, bad
calls fail with errors that name the problem, and without a GPU a launch is a clean RuntimeError;
`python -m kernels.cuda info` compiles nothing and says "no CUDA device" on such a machine. Also,
without nvcc: kernels.cuda.ops imports without triton, and attention's bias reaches the kernels as an fp32
view whose broadcast dims have stride 0. The numerics are in tests/test_<op>.py (GPU) and
tests/test_cuda_emulated.py (CPU)."""
import json
import os
import re
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch

import kernels
from kernels.cuda import build

REPO = Path(__file__).resolve().parents[1]
OPS = ["attention_fwd", "attention_bwd", "rms_norm_fwd", "rms_norm_bwd", "masked_gather_fwd", "masked_gather_bwd",
       "attn_pool_rowdot", "attn_pool_colsum", "attn_pool_dx"]


def _nvcc_or_skip():
    try:
        return build.find_nvcc()
    except build.BuildError as e:
        pytest.skip(f"no nvcc on this machine, so csrc/ cannot be compiled here: {e}")


@pytest.fixture(scope="module")
def fresh_build(tmp_path_factory):
    """Compile csrc/ from scratch (a new cache folder) with the default targets, as every CI run does."""
    _nvcc_or_skip()
    cache = tmp_path_factory.mktemp("cuda_cache")
    t0 = time.time()
    so = build.build(cache=cache)
    seconds = time.time() - t0
    print(f"csrc/ compiled in {seconds:.1f} s -> {so}")
    return so, cache, seconds


def test_every_source_compiles_and_the_module_imports(fresh_build):
    so, cache, seconds = fresh_build
    out_dir = so.parent
    assert so.name == build.MODULE + sysconfig.get_config_var("EXT_SUFFIX")     # Python ABI in the file name
    for src in sorted(build.CSRC.glob("*.cu")) + [build.CSRC / "bindings.cpp"]:
        assert (out_dir / (src.stem + ".o")).stat().st_size > 0, f"{src.name} was not compiled"
    info = json.loads((out_dir / "COMPLETE").read_text())
    assert info["archs"] == list(build.parse_archs()) and info["key"] == out_dir.name
    module = build.load(so)
    for name in OPS + ["runtime_info"]:
        assert callable(getattr(module, name)), name
    assert module.archs == ";".join(build.parse_archs())
    rt = module.runtime_info()
    assert rt["runtime_version"] >= 11000


def test_the_build_is_reused_and_keyed(fresh_build, monkeypatch):
    so, cache, _ = fresh_build
    t0 = time.time()
    assert build.build(cache=cache) == so                    # found complete: no compiler run
    assert time.time() - t0 < 5
    nvcc = build.find_nvcc()
    key = build.build_key(nvcc, build.parse_archs())
    assert so.parent.name == key and key.startswith(sys.implementation.cache_tag)
    assert build.build_key(nvcc, ("80",)) != key                # other targets, other build
    monkeypatch.setenv("IVMINI_CUDA_ARCH", "90a")
    assert build.parse_archs() == ("90a",)
    with pytest.raises(ValueError, match="bad CUDA architecture"):
        build.parse_archs("sm_7x")


def test_an_incomplete_build_is_not_used(fresh_build, tmp_path):
    """A folder without its COMPLETE marker (an interrupted build) is rebuilt, not loaded."""
    so, cache, _ = fresh_build
    import shutil
    copy = tmp_path / so.parent.name
    shutil.copytree(so.parent, copy)
    (copy / "COMPLETE").unlink()
    (copy / so.name).write_bytes(b"truncated")
    rebuilt = build.build(cache=tmp_path)
    assert (copy / "COMPLETE").exists() and rebuilt.stat().st_size == so.stat().st_size
    build.load(rebuilt)


def test_bad_calls_name_the_argument(fresh_build):
    module = build.load(fresh_build[0])
    args = dict(dtype=0, rows=1, width=4, eps=1e-6, x=0, w=0, x_stride=4, y=0, y_stride=4, rstd=0, stream=0)
    with pytest.raises(TypeError, match="rms_norm_fwd: unknown argument 'colour'"):
        module.rms_norm_fwd(**args, colour=1)
    with pytest.raises(TypeError, match="rms_norm_fwd: missing argument 'rstd'"):
        module.rms_norm_fwd(**{k: v for k, v in args.items() if k != "rstd"})
    with pytest.raises(TypeError, match="argument 'rows' must be an int"):
        module.rms_norm_fwd(**{**args, "rows": 1.5})
    attn = dict(dtype=1, B=1, Hq=1, Hkv=1, Nq=1, Nk=1, D=64, scale=1.0, causal=False, q=0, k=0, v=0,
                q_stride=(64, 64, 64), k_stride=(64, 64, 64), v_stride=(64, 64, 64), kpm=None, kpm_stride=0, o=0,
                o_stride=(64, 64, 64), lse=0, bias=None, bias_stride=(0, 0, 0, 0), stream=0)
    with pytest.raises(TypeError, match="'q_stride' must be 3 strides"):
        module.attention_fwd(**{**attn, "q_stride": (1, 2)})
    with pytest.raises(TypeError, match="'bias_stride' must be 4 strides"):
        module.attention_fwd(**{**attn, "bias_stride": (0, 0, 1)})
    with pytest.raises(TypeError, match="attention_fwd: missing argument 'bias'"):
        module.attention_fwd(**{k: v for k, v in attn.items() if k != "bias"})
    bwd = dict(attn, dout=0, dout_stride=(64, 64, 64), delta=0, dq=0, dk=0, dv=0, dq_stride=(64, 64, 64),
               dk_stride=(64, 64, 64), dv_stride=(64, 64, 64), dbias=256)
    with pytest.raises(RuntimeError, match="attention_bwd: cudaErrorInvalidValue"):   # dbias without a bias
        module.attention_bwd(**bwd)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_without_a_gpu_a_launch_is_a_clean_error(fresh_build):
    module = build.load(fresh_build[0])
    assert module.runtime_info()["device_count"] == 0 and module.runtime_info()["device_error"]
    with pytest.raises(RuntimeError, match=r"rms_norm_fwd: cuda\w+"):
        module.rms_norm_fwd(dtype=0, rows=1, width=4, eps=1e-6, x=0, w=0, x_stride=4, y=0, y_stride=4, rstd=0,
                            stream=0)
    with pytest.raises(RuntimeError, match=r"attention_fwd: cuda\w+"):
        module.attention_fwd(dtype=1, B=1, Hq=1, Hkv=1, Nq=1, Nk=1, D=64, scale=1.0, causal=False, q=0, k=0, v=0,
                             q_stride=(64, 64, 64), k_stride=(64, 64, 64), v_stride=(64, 64, 64), kpm=None,
                             kpm_stride=0, o=0, o_stride=(64, 64, 64), lse=0, bias=256, bias_stride=(0, 0, 1, 1),
                             stream=0)


def _info(cache):
    """`python -m kernels.cuda info` against the cache folder `cache`: (stdout, seconds)."""
    env = {**os.environ, "IVMINI_CUDA_CACHE": str(cache)}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "kernels.cuda", "info"], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, time.time() - t0


def test_info_compiles_nothing_and_names_a_missing_gpu(tmp_path):
    """Without a cached build, info reports the key and where the build would go, builds nothing (the cache
    stays empty: no folder, no lock) and returns in about the time of importing torch (a build takes ~45 s).
    Without a GPU it says "no CUDA device" and why, not a CUDA runtime error code."""
    out, seconds = _info(tmp_path)
    assert list(tmp_path.iterdir()) == [], "info wrote to the cache"
    assert seconds < 10, f"info took {seconds:.1f} s"
    assert re.search(r"^torch: .*torch\.cuda\.is_available\(\) = (True|False)$", out, re.M), out
    try:
        nvcc = build.find_nvcc()
    except build.BuildError:
        nvcc = None
    if nvcc:
        key = build.build_key(nvcc, build.parse_archs())
        assert f"build key:    {key}" in out and "not built yet" in out and str(tmp_path / key) in out, out
    else:
        assert "nvcc:         not found" in out, out
    if not torch.cuda.is_available():
        assert re.search(r"^devices: +no CUDA device \(.+\)$", out, re.M) and "cudaError" not in out, out


def test_info_reports_a_cached_build(fresh_build):
    so, cache, _ = fresh_build
    out, _ = _info(cache)
    assert f"build:        cached: {so}" in out, out
    assert re.search(r"^runtime: +CUDA \d+\.\d+ \(linked into the build\), sees", out, re.M), out


def test_the_ops_module_needs_neither_triton_nor_a_build():
    code = ("import sys, kernels.cuda.ops; "
            "assert 'triton' not in sys.modules, 'importing kernels.cuda.ops imported triton'; "
            "assert kernels.cuda.build._EXT is None, 'importing kernels.cuda.ops loaded the extension'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_bias_reaches_the_kernels_as_an_fp32_view_with_zero_broadcast_strides():
    from kernels.cuda.ops import expand_bias
    B, H, Nq, Nk = 3, 4, 5, 6
    bias = torch.randn(H, 1, Nk, dtype=torch.bfloat16, requires_grad=True)   # (H, 1, Nk): broadcast over B and Nq
    b4 = expand_bias(bias, (B, H, Nq, Nk))
    assert b4.shape == (B, H, Nq, Nk) and b4.dtype == torch.float32
    assert b4.stride() == (0, Nk, 0, 1)                                        # cast before expand: no B-fold copy
    torch.testing.assert_close(b4, bias.float().expand(1, H, Nq, Nk).expand(B, H, Nq, Nk), rtol=0, atol=0)
    g = torch.randn(B, H, Nq, Nk)                                              # a kernel's dbias
    (dbias,) = torch.autograd.grad(b4, bias, g)
    assert dbias.shape == bias.shape and dbias.dtype == torch.bfloat16
    torch.testing.assert_close(dbias, g.sum((0, 2)).unsqueeze(1).bfloat16())                 # summed over B, Nq
    full = torch.randn(B, H, Nq, Nk, dtype=torch.float64).transpose(2, 3).contiguous().transpose(2, 3)
    assert expand_bias(full, (B, H, Nq, Nk)).stride() == (H * Nq * Nk, Nq * Nk, 1, Nq)   # any strides pass through


def test_cpu_tensors_are_refused_by_the_cuda_backend():
    x = torch.randn(3, 8)
    with pytest.raises(kernels.BackendUnavailable, match="needs CUDA tensors"):
        kernels.rms_norm(x, torch.ones(8), backend="cuda")
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(kernels.BackendUnavailable, match="needs CUDA tensors"):
        kernels.attention(q, q, q, backend="cuda")


def test_missing_nvcc_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("IVMINI_NVCC", "/nonexistent/nvcc")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(build.BuildError, match="needs nvcc"):
        build.find_nvcc()
