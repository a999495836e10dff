"""The backend switch: explicit argument > IVMINI_BACKEND > default (triton on CUDA, ref on CPU);
clear errors for backends that cannot run; the choice is logged once."""
import logging

import pytest
import torch

import kernels


@pytest.fixture(autouse=True)
def fresh_log_state(monkeypatch):
    monkeypatch.setattr(kernels, "_LOGGED", set())
    monkeypatch.delenv("IVMINI_BACKEND", raising=False)


def test_default_on_cpu_is_ref_and_logged_once(caplog):
    x, w = torch.randn(2, 8), torch.ones(8)
    with caplog.at_level(logging.INFO, logger="ivmini.kernels"):
        kernels.rms_norm(x, w)
        kernels.rms_norm(x, w)
    msgs = [r.getMessage() for r in caplog.records if r.name == "ivmini.kernels"]
    assert msgs == ["kernels.rms_norm: backend 'ref' (default for cpu tensors)"]


def test_environment_variable_and_argument(monkeypatch, caplog):
    x, w = torch.randn(2, 8), torch.ones(8)
    monkeypatch.setenv("IVMINI_BACKEND", "ref")
    with caplog.at_level(logging.INFO, logger="ivmini.kernels"):
        kernels.rms_norm(x, w)
        kernels.rms_norm(x, w, backend="ref")
    msgs = [r.getMessage() for r in caplog.records if r.name == "ivmini.kernels"]
    assert msgs == ["kernels.rms_norm: backend 'ref' (IVMINI_BACKEND)", "kernels.rms_norm: backend 'ref' (argument)"]
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
