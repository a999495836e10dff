"""The CUDA backend's build, on any machine with nvcc (no GPU needed): every csrc/*.cu compiles for the
default targets (sm_80, sm_90a) into a fresh cache, the module imports, the build is cached by key, bad
calls fail with errors that name the problem, and without a GPU a launch is a clean RuntimeError.
The numerics are in test_cuda_ops.py (GPU only)."""
import json
import sysconfig
import time

import pytest
import torch

import kernels
from kernels.cuda import ops as cuda

OPS = ["attention_fwd", "attention_bwd", "rms_norm_fwd", "rms_norm_bwd", "masked_gather_fwd", "masked_gather_bwd",
       "attn_pool_rowdot", "attn_pool_colsum", "attn_pool_dx"]


def _nvcc_or_skip():
    try:
        return cuda.find_nvcc()
    except cuda.BuildError as e:
        pytest.skip(f"no nvcc on this machine, so csrc/ cannot be compiled here: {e}")


@pytest.fixture(scope="module")
def fresh_build(tmp_path_factory):
    """Compile csrc/ from scratch (a new cache folder) with the default targets, as every CI run does."""
    _nvcc_or_skip()
    cache = tmp_path_factory.mktemp("cuda_cache")
    t0 = time.time()
    so = cuda.build(cache=cache)
    seconds = time.time() - t0
    print(f"csrc/ compiled in {seconds:.1f} s -> {so}")
    return so, cache, seconds


def _load(so):
    import importlib.util
    spec = importlib.util.spec_from_file_location(cuda.MODULE, so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_source_compiles_and_the_module_imports(fresh_build):
    so, cache, seconds = fresh_build
    out_dir = so.parent
    assert so.name == cuda.MODULE + sysconfig.get_config_var("EXT_SUFFIX")     # Python ABI in the file name
    for src in sorted(cuda.CSRC.glob("*.cu")) + [cuda.CSRC / "bindings.cpp"]:
        assert (out_dir / (src.stem + ".o")).stat().st_size > 0, f"{src.name} was not compiled"
    info = json.loads((out_dir / "COMPLETE").read_text())
    assert info["archs"] == list(cuda.parse_archs()) and info["key"] == out_dir.name
    module = _load(so)
    for name in OPS + ["runtime_info"]:
        assert callable(getattr(module, name)), name
    assert module.archs == ";".join(cuda.parse_archs())
    rt = module.runtime_info()
    assert rt["runtime_version"] >= 11000


def test_the_build_is_reused_and_keyed(fresh_build, monkeypatch):
    so, cache, _ = fresh_build
    t0 = time.time()
    assert cuda.build(cache=cache) == so                    # found complete: no compiler run
    assert time.time() - t0 < 5
    nvcc = cuda.find_nvcc()
    key = cuda.build_key(nvcc, cuda.parse_archs())
    assert so.parent.name == key and key.startswith(__import__("sys").implementation.cache_tag)
    assert cuda.build_key(nvcc, ("80",)) != key                # other targets, other build
    monkeypatch.setenv("IVMINI_CUDA_ARCH", "90a")
    assert cuda.parse_archs() == ("90a",)
    with pytest.raises(ValueError, match="bad CUDA architecture"):
        cuda.parse_archs("sm_7x")


def test_an_incomplete_build_is_not_used(fresh_build, tmp_path):
    """A folder without its COMPLETE marker (an interrupted build) is rebuilt, not loaded."""
    so, cache, _ = fresh_build
    import shutil
    copy = tmp_path / so.parent.name
    shutil.copytree(so.parent, copy)
    (copy / "COMPLETE").unlink()
    (copy / so.name).write_bytes(b"truncated")
    rebuilt = cuda.build(cache=tmp_path)
    assert (copy / "COMPLETE").exists() and rebuilt.stat().st_size == so.stat().st_size
    _load(rebuilt)


def test_bad_calls_name_the_argument(fresh_build):
    module = _load(fresh_build[0])
    args = dict(dtype=0, rows=1, width=4, eps=1e-6, x=0, w=0, x_stride=4, y=0, y_stride=4, rstd=0, stream=0)
    with pytest.raises(TypeError, match="rms_norm_fwd: unknown argument 'colour'"):
        module.rms_norm_fwd(**args, colour=1)
    with pytest.raises(TypeError, match="rms_norm_fwd: missing argument 'rstd'"):
        module.rms_norm_fwd(**{k: v for k, v in args.items() if k != "rstd"})
    with pytest.raises(TypeError, match="argument 'rows' must be an int"):
        module.rms_norm_fwd(**{**args, "rows": 1.5})
    with pytest.raises(TypeError, match="'q_stride' must be 3 strides"):
        module.attention_fwd(dtype=1, B=1, Hq=1, Hkv=1, Nq=1, Nk=1, D=64, scale=1.0, causal=False, q=0, k=0, v=0,
                             q_stride=(1, 2), k_stride=(1, 2, 3), v_stride=(1, 2, 3), kpm=None, kpm_stride=0, o=0,
                             o_stride=(1, 2, 3), lse=0, stream=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_without_a_gpu_a_launch_is_a_clean_error(fresh_build):
    module = _load(fresh_build[0])
    assert module.runtime_info()["device_count"] == 0 and module.runtime_info()["device_error"]
    with pytest.raises(RuntimeError, match=r"rms_norm_fwd: cuda\w+"):
        module.rms_norm_fwd(dtype=0, rows=1, width=4, eps=1e-6, x=0, w=0, x_stride=4, y=0, y_stride=4, rstd=0,
                            stream=0)
    with pytest.raises(RuntimeError, match=r"attention_fwd: cuda\w+"):
        module.attention_fwd(dtype=1, B=1, Hq=1, Hkv=1, Nq=1, Nk=1, D=64, scale=1.0, causal=False, q=0, k=0, v=0,
                             q_stride=(64, 64, 64), k_stride=(64, 64, 64), v_stride=(64, 64, 64), kpm=None,
                             kpm_stride=0, o=0, o_stride=(64, 64, 64), lse=0, stream=0)


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
    with pytest.raises(cuda.BuildError, match="needs nvcc"):
        cuda.find_nvcc()
