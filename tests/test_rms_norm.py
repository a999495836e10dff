"""kernels.rms_norm on every backend ("triton", "cuda", "torch") against kernels.ref evaluated in float64: output
and both gradients, odd widths, several rows per program and one, strided and unaligned rows, poisoned outputs.
On CPU the Triton kernels run under the interpreter; the cuda cases need a GPU (the CUDA build and its CPU
emulation are tested in test_cuda_build.py and test_cuda_emulated.py)."""
import pytest
import torch

import kernels
from kernels import ref
from kernels.common import poison_outputs
from conftest import BACKENDS, DEVICE, DTYPES, GPU

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def check(got, want, dtype, what):
    scale = max(1.0, want.abs().max().item())
    err = (got.double() - want).abs().max().item()
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (2, 9, 88), (130, 384), (5, 1408), (2, 3200), (1, 8192),
                                   (3, 7, 13)])
def test_rms_norm_fwd_bwd(seed, backend, shape, dtype):
    run_and_check(shape, dtype, backend)


def run_and_check(shape, dtype, backend):
    """`backend` forward + backward with poisoned outputs; y, dx, dw against the float64 reference."""
    x = (torch.randn(*shape, device=DEVICE) * 3).to(dtype).requires_grad_()
    w = torch.randn(shape[-1], device=DEVICE).to(dtype).requires_grad_()
    with poison_outputs():
        y = kernels.rms_norm(x, w, 1e-6, backend=backend)
        dy = torch.randn_like(y)
        y.backward(dy)
    assert y.dtype == dtype and x.grad.dtype == dtype and w.grad.dtype == dtype
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    yd = ref.rms_norm(xd, wd, 1e-6)
    yd.backward(dy.double())
    check(y, yd, dtype, "y")
    check(x.grad, xd.grad, dtype, "dx")
    check(w.grad, wd.grad, dtype, "dw")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,stride,start,C", [(torch.float32, 40, 0, 33), (torch.float16, 1411, 3, 1408)])
def test_rms_norm_strided_rows(seed, backend, dtype, stride, start, C):
    """Rows with a stride, the second case not 16-byte aligned: read in place, without a copy."""
    base = torch.randn(7, stride, device=DEVICE).to(dtype)
    x = base[:, start:start + C]
    w = torch.randn(C, device=DEVICE).to(dtype)
    check(kernels.rms_norm(x, w, backend=backend), ref.rms_norm(x.double(), w.double()), dtype, "y")


def test_rms_norm_triton_errors():
    base = torch.randn(6, 40, device=DEVICE)
    with pytest.raises(ValueError, match="contiguous in its last dim"):
        kernels.rms_norm(base.t(), torch.ones(6, device=DEVICE), backend="triton")
    with pytest.raises(TypeError, match="float64"):
        kernels.rms_norm(base.double(), torch.ones(40, device=DEVICE, dtype=torch.float64), backend="triton")


def test_rms_norm_bf16_upcast_path(seed):
    """bf16 through the kernel: on CPU the interpreter's upcast path (arithmetic in fp32)."""
    x, w = torch.randn(4, 96, device=DEVICE).bfloat16(), torch.randn(96, device=DEVICE).bfloat16()
    check(kernels.rms_norm(x, w, backend="triton"), ref.rms_norm(x.double(), w.double()), torch.bfloat16, "y")


@pytest.mark.skipif(not GPU, reason="real InternVideo2 shapes need a GPU")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(32, 417, 1408), (8, 2049, 3200)])
def test_rms_norm_real_shapes_gpu(seed, backend, shape, dtype):
    run_and_check(shape, dtype, backend)
