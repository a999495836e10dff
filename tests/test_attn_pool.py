"""kernels.attn_pool on every backend ("triton", "cuda", "torch") against kernels.ref evaluated in float64: the
output and all 15 gradients, head dim 3, N=1, heads padded to 16, more tokens than one block, strided x, a large
per-token offset (LayerNorm cancellation), poisoned outputs. On CPU the Triton kernels run under the interpreter;
the cuda cases need a GPU (the CUDA build and its CPU emulation are tested in test_cuda_build.py and
test_cuda_emulated.py)."""
import pytest
import torch
from test_ref_ops import pool_params

import kernels
from kernels import ref
from kernels.common import poison_outputs
from conftest import BACKENDS, DEVICE, DTYPES, GPU

TOL = {torch.float32: 5e-5, torch.float16: 1e-3, torch.bfloat16: 2e-2}
NAMES = ["x", "ln_q_w", "ln_q_b", "ln_k_w", "ln_k_b", "ln_v_w", "ln_v_b",
         "wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo"]
# (B, N, C, H, out): 4 heads padded to 16; head dim 3 and N = 1; H = 16 over 130 tokens (two row blocks
# under the interpreter, whose tiles are 128 x 128); N = 417 as in masked pretraining; C = 200 (two column
# chunks, the second ragged: exercises the running statistics merge and the multi-block column sums)
SHAPES = [(2, 17, 32, 4, 24), (1, 1, 12, 4, 5), (3, 130, 48, 16, 7), (2, 417, 64, 16, 32), (2, 33, 200, 8, 16)]


def check(got, want, tol, what):
    scale = max(1.0, want.abs().max().item())
    err = (got.double() - want).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} (scale {scale:.3g})"


def params(C, out, H, dtype):
    """pool_params with the weight matrices scaled like a trained layer (~1/sqrt(C)), so that the
    softmax is not saturated and every gradient path carries signal."""
    p = pool_params(C, out, H, torch.float32)
    return {k: (v * 2 * C ** -0.5 if v.dim() == 2 else v).to(DEVICE, dtype).requires_grad_() for k, v in p.items()}


def run_and_check(x, p, H, dtype, backend, tol=None):
    """`backend` forward + backward with poisoned outputs, then the output and all 15 gradients vs float64 ref."""
    tol = TOL[dtype] if tol is None else tol
    with poison_outputs():
        y = kernels.attn_pool(x, *p.values(), num_heads=H, backend=backend)
        dy = torch.randn_like(y)
        y.backward(dy)
    inputs = [x, *p.values()]
    assert y.dtype == dtype and all(t.grad.dtype == t.dtype for t in inputs)
    exact = [t.detach().double().requires_grad_() for t in inputs]
    want = ref.attn_pool(*exact, num_heads=H)
    want.backward(dy.double())
    check(y, want, tol, "out")
    for name, t, e in zip(NAMES, inputs, exact):
        check(t.grad, e.grad, tol, f"d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N,C,H,out", SHAPES)
def test_attn_pool_fwd_bwd(seed, backend, B, N, C, H, out, dtype):
    x = (torch.randn(B, N, C, device=DEVICE) * 2).to(dtype).requires_grad_()
    run_and_check(x, params(C, out, H, dtype), H, dtype, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attn_pool_sharp_softmax_fp16(seed, backend):
    """pool_params as is (weights ~0.5, not ~1/sqrt(C)): scores of tens, a near one-hot softmax, large
    activations. The Triton kernels stay at fp16 output rounding because each rounded dot operand is split
    into hi + lo (without the split of A in the score dots the error here is ~5e-3)."""
    B, N, C, H, out = 2, 417, 64, 16, 32
    x = (torch.randn(B, N, C, device=DEVICE) * 2).half().requires_grad_()
    p = {k: v.to(DEVICE, torch.float16).requires_grad_() for k, v in pool_params(C, out, H, torch.float32).items()}
    run_and_check(x, p, H, torch.float16, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attn_pool_strided_x(seed, backend):
    """x a slice along N and C of a bigger tensor: batch and row strides are honoured without a copy."""
    B, N, C, H, out = 2, 17, 32, 4, 24
    base = torch.randn(B, N + 5, C + 8, device=DEVICE)
    x = base[:, 2:2 + N, :C].detach().requires_grad_()          # strides (N+5)*(C+8), C+8, 1
    assert not x.is_contiguous()
    run_and_check(x, params(C, out, H, torch.float32), H, torch.float32, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attn_pool_strided_fp16_x_with_offset_tokens(seed, backend):
    """fp16 x, strided along C, every token offset by 50 (|mean| = 25 std): the one-pass statistics in fp16."""
    C, H = 64, 4
    x = (torch.randn(2, 40, 2 * C, device=DEVICE) * 2 + 50).half()[:, :, C:].requires_grad_()
    run_and_check(x, params(C, 32, H, torch.float16), H, torch.float16, backend, tol=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attn_pool_large_token_offset(seed, backend):
    """Tokens offset by up to +-50 (|mean| = 50 std): the one-pass statistics and the raw-x dots with a
    mean correction lose at most a few times what any fp32 LayerNorm loses here (kernels.ref in fp32:
    ~1.4e-5 worst over 300 seeds, the Triton backend ~3.5e-5), hence 4x the fp32 tolerance."""
    B, N, C, H, out = 2, 40, 48, 4, 8
    x = (torch.randn(B, N, C, device=DEVICE) + 100 * torch.rand(B, N, 1, device=DEVICE) - 50).requires_grad_()
    run_and_check(x, params(C, out, H, torch.float32), H, torch.float32, backend, tol=4 * TOL[torch.float32])


def test_attn_pool_bf16_upcast_path(seed):
    """bf16 through the kernels: on CPU the interpreter's upcast path (arithmetic in fp32)."""
    x = torch.randn(2, 17, 32, device=DEVICE).bfloat16().requires_grad_()
    run_and_check(x, params(32, 24, 4, torch.bfloat16), 4, torch.bfloat16, "triton")


def test_attn_pool_triton_errors():
    p = params(12, 5, 4, torch.float32)
    with pytest.raises(ValueError, match="contiguous in its last dim"):
        kernels.attn_pool(torch.randn(1, 12, 3, device=DEVICE).transpose(1, 2), *p.values(), num_heads=4,
                          backend="triton")
    with pytest.raises(TypeError, match="float64"):
        kernels.attn_pool(torch.randn(1, 3, 12, device=DEVICE, dtype=torch.float64),
                          *(t.double() for t in p.values()), num_heads=4, backend="triton")


@pytest.mark.skipif(not GPU, reason="real InternVideo2 shapes need a GPU")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,N,C,H,out", [(8, 417, 1408, 16, 768), (2, 2049, 3200, 16, 768), (2, 2049, 3200, 25, 768)])
def test_attn_pool_real_shapes_gpu(seed, backend, B, N, C, H, out, dtype):
    test_attn_pool_fwd_bwd(seed, backend, B, N, C, H, out, dtype)
