"""kernels.masked_gather on every backend ("triton", "cuda", "torch") against kernels.ref: output and both
gradients, 3-D and 4-D x, with and without pos_embed, odd shapes, strided inputs, poisoned outputs. On CPU the
Triton kernels run under the interpreter; the cuda cases need a GPU (the CUDA build and its CPU emulation are
tested in test_cuda_build.py and test_cuda_emulated.py).

A gather is exact: the output equals the reference run in the same dtype bit for bit (the pos-embed
add rounds once in both), dx equals the float64 gradient exactly, and dpos (a sum over samples and
layers) is within summation tolerance of float64."""
import importlib

import pytest
import torch

import kernels
from kernels import ref
from kernels.triton import masked_gather as gather
from kernels.common import poison_outputs
from conftest import BACKENDS, CUDA, DEVICE, DTYPES, GPU

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def check(got, want, dtype, what):
    scale = max(1.0, want.abs().max().item())
    err = (got.double() - want).abs().max().item()
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} (scale {scale:.3g})"


def visible(B, N, K):
    """(B, K) int64: K distinct token indices per sample, ascending, a fresh random set per row."""
    return torch.rand(B, N, device=DEVICE).argsort(dim=1)[:, :K].sort(dim=1).values


def run(x, idx, pos, dout, backend):
    """`backend` forward + backward with poisoned outputs, and the float64 reference. Returns both."""
    with poison_outputs():
        y = kernels.masked_gather(x, idx, pos, backend=backend)
        y.backward(dout)
    xd = x.detach().double().requires_grad_()
    pd = pos.detach().double().requires_grad_() if pos is not None else None
    yd = ref.masked_gather(xd, idx, pd)
    yd.backward(dout.double())
    return y, xd, pd


# (L or None, B, N, K, C, with pos_embed)
SHAPES = [
    (None, 1, 1, 1, 3, True),        # N = K = 1
    (None, 3, 17, 17, 88, True),     # K = N: everything visible
    (None, 2, 17, 5, 88, False),
    (2, 2, 130, 33, 88, True),       # stacked layers
    (3, 2, 130, 1, 8, False),        # K = 1
    (None, 2, 2049, 417, 8, True),   # the ViT token count (1 + 8 x 256), 20% visible; small C for the interpreter
    (2, 2, 50, 12, 1408, True),      # the 1B width: more than one channel block on a GPU
    (2, 2, 19, 7, 13, True),         # odd widths everywhere
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,B,N,K,C,with_pos", SHAPES)
def test_masked_gather_fwd_bwd(seed, backend, L, B, N, K, C, with_pos, dtype):
    lead = (L,) if L else ()
    x = torch.randn(*lead, B, N, C, device=DEVICE).to(dtype).requires_grad_()
    pos = torch.randn(1, N, C, device=DEVICE).to(dtype).requires_grad_() if with_pos else None
    idx = visible(B, N, K)
    dout = torch.randn(*lead, B, K, C, device=DEVICE).to(dtype)
    y, xd, pd = run(x, idx, pos, dout, backend)
    assert y.shape == lead + (B, K, C) and y.dtype == dtype and x.grad.dtype == dtype
    assert torch.equal(y, ref.masked_gather(x.detach(), idx, None if pos is None else pos.detach()))
    assert torch.equal(x.grad.double(), xd.grad), "dx must be dout copied to the visible rows, zeros elsewhere"
    if with_pos:
        assert pos.grad.dtype == dtype and pos.grad.shape == (1, N, C)
        check(pos.grad, pd.grad, dtype, "dpos")


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_gather_strided_inputs(seed, backend):
    """Strides are passed to the kernels: no copy of x, visible_idx, pos_embed or dout is needed."""
    L, B, N, K, C = 2, 3, 40, 9, 24
    x = torch.randn(B, L, N, C + 5, device=DEVICE).transpose(0, 1)[..., :C].requires_grad_()  # (L, B, N, C)
    junk = torch.randint(0, N, (B, K), device=DEVICE)
    idx = torch.stack([visible(B, N, K), junk], dim=-1)[..., 0]       # (B, K) with strides (2K, 2)
    pos = torch.randn(1, N, C + 3, device=DEVICE)[..., :C]            # row stride C + 3, no gradient
    dout = torch.randn(K, L, B, C, device=DEVICE).permute(1, 2, 0, 3)  # (L, B, K, C), non-contiguous
    assert not (x.is_contiguous() or idx.is_contiguous() or pos.is_contiguous() or dout.is_contiguous())
    y, xd, _ = run(x, idx, pos, dout, backend)
    assert torch.equal(y, ref.masked_gather(x.detach(), idx, pos))
    assert torch.equal(x.grad.double(), xd.grad)


def test_masked_gather_gpu_tiles(seed, monkeypatch):
    """The interpreter's big tiles cover most test shapes with one program per axis; with the GPU's
    tile sizes (16 rows x 256 channels) both grid axes have several programs and ragged tails."""
    monkeypatch.setattr(gather, "INTERPRET", False)
    L, B, N, K, C = 2, 2, 300, 70, 300
    x = torch.randn(L, B, N, C, device=DEVICE).requires_grad_()
    pos = torch.randn(1, N, C, device=DEVICE).requires_grad_()
    idx = visible(B, N, K)
    y, xd, pd = run(x, idx, pos, torch.randn(L, B, K, C, device=DEVICE), "triton")
    assert gather._blocks(K, C)[:2] == (16, 256)
    assert torch.equal(y, ref.masked_gather(x.detach(), idx, pos.detach()))
    assert torch.equal(x.grad.double(), xd.grad)
    check(pos.grad, pd.grad, torch.float32, "dpos")


@pytest.mark.parametrize("backend", ["triton", CUDA])
def test_masked_gather_custom_ops_opcheck(seed, backend):
    """Schema, fake (meta) implementations and autograd registration, as torch.compile needs them."""
    ops = gather if backend == "triton" else importlib.import_module("kernels.cuda.ops")
    x = torch.randn(2, 3, 17, 24, device=DEVICE, requires_grad=True)
    pos = torch.randn(1, 17, 24, device=DEVICE, requires_grad=True)
    idx = visible(3, 17, 5)
    dout = torch.randn(2, 3, 5, 24, device=DEVICE)
    torch.library.opcheck(ops.masked_gather_fwd, (x, idx, pos))
    torch.library.opcheck(ops.masked_gather_fwd, (x[0], idx, None))
    torch.library.opcheck(ops.masked_gather_bwd, (dout, idx, 17, torch.float32))
    torch.library.opcheck(ops.masked_gather_bwd, (dout[0], idx, 17, None))


def test_masked_gather_mixed_dtype_bf16_upcast_path(seed):
    """bf16 x with an fp32 pos_embed: on CPU the interpreter's upcast path. The pos-embed gradient
    comes back in fp32, x's in bf16. Checked with a tolerance, not bit for bit: the interpreter
    converts fp32 to bf16 by truncation, not round-to-nearest as torch and the GPU do."""
    B, N, K, C = 2, 33, 7, 40
    x = torch.randn(B, N, C, device=DEVICE).bfloat16().requires_grad_()
    pos = torch.randn(1, N, C, device=DEVICE).requires_grad_()
    idx = visible(B, N, K)
    dout = torch.randn(B, K, C, device=DEVICE).bfloat16()
    y, xd, pd = run(x, idx, pos, dout, "triton")
    assert y.dtype == x.grad.dtype == torch.bfloat16 and pos.grad.dtype == torch.float32
    check(y, ref.masked_gather(xd, idx, pd), torch.bfloat16, "y")
    check(pos.grad, pd.grad, torch.float32, "dpos")
    assert torch.equal(x.grad.double(), xd.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_gather_strided_bf16_x_with_fp32_pos(seed, backend):
    """bf16 x strided along C with an fp32 pos_embed: bit for bit the reference (which rounds pos to x's
    dtype before the add), and pos's gradient comes back in fp32."""
    if backend == "triton" and not GPU:
        pytest.skip("bf16 numerics need a GPU (the interpreter's upcast path is tested above)")
    x = torch.randn(2, 60, 3, 64, device=DEVICE, dtype=torch.bfloat16)[:, :, 1]   # (2, 60, 64), row stride 192
    pos = torch.randn(1, 60, 64, device=DEVICE, requires_grad=True)
    idx = visible(2, 60, 11)
    y = kernels.masked_gather(x, idx, pos, backend=backend)
    assert torch.equal(y, ref.masked_gather(x, idx, pos.detach()))
    y.float().sum().backward()
    assert pos.grad.dtype == torch.float32


def test_masked_gather_triton_errors():
    x = torch.randn(2, 8, 16, device=DEVICE)
    idx = visible(2, 8, 3)
    with pytest.raises(ValueError, match="x must be contiguous in its last dim"):
        kernels.masked_gather(x.transpose(1, 2), idx, backend="triton")
    with pytest.raises(TypeError, match="float64"):
        kernels.masked_gather(x.double(), idx, backend="triton")


@pytest.mark.skipif(not GPU, reason="real InternVideo2 shapes need a GPU")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_gather_real_shape_gpu(seed, backend, dtype):
    test_masked_gather_fwd_bwd(seed, backend, None, 32, 2049, 417, 1408, True, dtype)
