"""The backend switch: explicit argument > IVMINI_BACKEND > default (triton on CUDA, torch on CPU);
clear errors for backends that cannot run; the choice is logged once. And what is specific to the "torch"
backend (kernels/torch_ops.py): SDPA's fused CPU kernel runs (no mask tensor, no K/V copies for GQA), and the
in-place inference path of rms_norm (its numerics are tested with the other backends in tests/test_<op>.py);
and the CPU benchmark harness ivmini/bench.py, on the tiny preset."""
import logging
import os

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import kernels
from kernels import ref


@pytest.fixture(autouse=True)
def fresh_log_state(monkeypatch):
    monkeypatch.setattr(kernels, "_LOGGED", set())
    monkeypatch.delenv("IVMINI_BACKEND", raising=False)


def test_default_on_cpu_is_torch_and_logged_once(caplog, monkeypatch):
    x, w = torch.randn(2, 8), torch.ones(8)
    monkeypatch.setattr(kernels, "_LOGGED", set())
    with caplog.at_level(logging.INFO, logger="ivmini.kernels"):
        kernels.rms_norm(x, w)
        kernels.rms_norm(x, w)
        kernels.masked_gather(x[None], torch.zeros(1, 1, dtype=torch.long))
    msgs = [r.getMessage() for r in caplog.records if r.name == "ivmini.kernels"]
    assert msgs == ["kernels: backend 'torch' (default for cpu tensors)"]
    assert kernels.resolve_backend("attention", None, torch.device("cpu")) is kernels.torch_ops.attention


def test_environment_variable_selects_the_reference(monkeypatch):
    monkeypatch.setenv("IVMINI_BACKEND", "ref")
    for op in ("attention", "rms_norm", "attn_pool", "masked_gather"):
        assert kernels.resolve_backend(op, None, torch.device("cpu")) is getattr(ref, op)


def test_environment_variable_and_argument(monkeypatch, caplog):
    x, w = torch.randn(2, 8), torch.ones(8)
    monkeypatch.setenv("IVMINI_BACKEND", "ref")
    monkeypatch.setattr(kernels, "_LOGGED", set())      # the choice is logged once per backend and reason
    with caplog.at_level(logging.INFO, logger="ivmini.kernels"):
        kernels.rms_norm(x, w)
        kernels.attention(x[None, None], x[None, None], x[None, None])
        kernels.rms_norm(x, w, backend="ref")
        kernels.rms_norm(x, w, backend="ref")
    msgs = [r.getMessage() for r in caplog.records if r.name == "ivmini.kernels"]
    assert msgs == ["kernels: backend 'ref' (IVMINI_BACKEND)", "kernels: backend 'ref' (argument)"]
    monkeypatch.setenv("IVMINI_BACKEND", "tpu")
    with pytest.raises(ValueError, match=r"unknown kernels backend 'tpu' \(from IVMINI_BACKEND\)"):
        kernels.rms_norm(x, w)
    with pytest.raises(ValueError, match="unknown kernels backend 'fast'"):
        kernels.rms_norm(x, w, backend="fast")


def test_cuda_backend_on_cpu_tensors_is_an_error():
    with pytest.raises(kernels.BackendUnavailable, match="needs CUDA tensors"):
        kernels.rms_norm(torch.randn(2, 8), torch.ones(8), backend="cuda")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(kernels.BackendUnavailable, match="TRITON_INTERPRET=1"):
        kernels.rms_norm(torch.randn(2, 8), torch.ones(8), backend="triton")


def test_backend_without_the_op_is_an_error_not_a_fallback(monkeypatch):
    monkeypatch.setitem(kernels._IMPLS, "rms_norm", {"ref": kernels.ref.rms_norm})
    monkeypatch.setitem(kernels._BACKEND_MODULES, "triton", ())
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(kernels.BackendUnavailable, match="has no 'triton' implementation"):
        kernels.rms_norm(torch.randn(2, 8), torch.ones(8), backend="triton")


# ---------------------------------------------------------------------------------------------
# the torch backend

@pytest.mark.parametrize("Hkv,Nk,kw", [
    (4, 33, {}),                                                            # plain: no mask tensor at all
    (2, 33, {}),                                                            # GQA: enable_gqa, no K/V copies
    (2, 33, dict(causal=True)),                                             # square causal: SDPA's is_causal
    (1, 50, dict(causal=True)),                                             # bottom-right causal: one bool mask
    (2, 50, dict(key_padding_mask=True)),                                   # (B, 1, 1, Nk) bool mask
    (2, 50, dict(causal=True, key_padding_mask=True, bias=(1, 4, 1, 50))),  # bias that needs no gradient
])
def test_torch_attention_runs_the_fused_kernel(seed, Hkv, Nk, kw):
    """With SDPA restricted to its flash kernel, a call the torch backend sent elsewhere (the math path, which
    materialises the scores and repeats K/V) would fail with "No available kernel"."""
    q = torch.randn(2, 4, 33, 16, requires_grad=True)
    k, v = (torch.randn(2, Hkv, Nk, 16, requires_grad=True) for _ in range(2))
    if kw.get("key_padding_mask"):
        kw["key_padding_mask"] = torch.rand(2, Nk) > 0.3
    if "bias" in kw:
        kw["bias"] = torch.randn(kw["bias"])
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        o = kernels.attention(q, k, v, backend="torch", **kw)
        o.square().sum().backward()
    want = ref.attention(q.detach().double(), k.detach().double(), v.detach().double(),
                         **{n: (t.double() if n == "bias" else t) for n, t in kw.items()})
    torch.testing.assert_close(o.double(), want, rtol=1e-5, atol=1e-5)
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_torch_rms_norm_inference_path_is_the_autograd_path(seed):
    """Without autograd the weight multiply runs in place on the fresh normalised tensor: same values, and the
    input is untouched."""
    x, w = torch.randn(3, 7, 88), torch.rand(88) + 0.5
    x0 = x.clone()
    with torch.no_grad():
        fast = kernels.rms_norm(x, w, backend="torch")
    slow = kernels.rms_norm(x.requires_grad_(), w, backend="torch")
    assert slow.requires_grad and torch.equal(fast, slow.detach()) and torch.equal(x.detach(), x0)
    torch.testing.assert_close(fast, ref.rms_norm(x0, w), rtol=1e-6, atol=1e-6)


def test_cpu_benchmark_harness(capsys, monkeypatch):
    """ivmini/bench.py (the README's CPU figures) runs end to end on the tiny preset, its children agree, and
    fill_weights gives two models with the same parameter names the same weights."""
    monkeypatch.syspath_prepend(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
    from ivmini import bench
    from ivmini.vit import VideoViT
    a, b = (VideoViT(bench.model_config("tiny", 2)) for _ in range(2))
    bench.fill_weights(a)
    bench.fill_weights(b)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    rows = bench.main(["--preset", "tiny", "--frames", "2", "--rounds", "1", "--threads", "1"])
    assert [r["name"] for r in rows] == ["ref", "torch"] and all(r["s"] > 0 and r["peak_mb"] > 0 for r in rows)
    diff = float(capsys.readouterr().out.split("max |logits torch - ref| = ")[1].split()[0])
    assert diff < 1e-4
