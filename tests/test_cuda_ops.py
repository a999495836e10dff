"""The CUDA C++ backend (csrc/) against kernels.ref in float64: the same shapes, dtypes and tolerances as
the Triton tests (whose case lists and checkers are reused), every gradient, poisoned outputs, strided
views, the real InternVideo2 shapes. Needs a GPU and nvcc; the build itself is tested in
test_cuda_build.py, which also runs without a GPU."""
import pytest
import torch

import kernels
from kernels import ref

if not torch.cuda.is_available():
    pytest.skip("the cuda backend's numerics need a GPU (its build is tested in test_cuda_build.py)",
                allow_module_level=True)

import test_triton_attention as attn_tests  # noqa: E402  (tests/ is on sys.path under pytest)
import test_triton_gather as gather_tests  # noqa: E402
import test_triton_pool as pool_tests  # noqa: E402
import test_triton_rmsnorm as rms_tests  # noqa: E402

DEVICE = "cuda"
HALF = [torch.float16, torch.bfloat16]
FLOATS = [torch.float32, torch.float16, torch.bfloat16]
ATTN_CASES = [c for c in attn_tests.CASES if c[5] <= 128]   # the cuda kernel covers head dims up to 128


@pytest.fixture(scope="module", autouse=True)
def built():
    from kernels.cuda import ops as cuda
    cuda.ext()   # compile once up front, so a build error shows as such


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("B,Hq,Hkv,Nq,Nk,D,causal,padding", ATTN_CASES)
def test_attention(seed, B, Hq, Hkv, Nq, Nk, D, causal, padding, dtype):
    attn_tests.run_case(B, Hq, Hkv, Nq, Nk, D, causal, padding, dtype, backend="cuda")


@pytest.mark.parametrize("D", [8, 16, 24, 40, 56, 64, 72, 80, 88, 96, 104, 112, 120, 128])
def test_attention_every_head_dim(seed, D):
    attn_tests.run_case(2, 2, 1, 45, 70, D, True, True, torch.bfloat16, backend="cuda")


def test_attention_empty_rows_and_sample(seed):
    o, dq = attn_tests.run_case(2, 2, 2, 70, 33, 88, True, True, torch.float16, empty_sample=True, backend="cuda")
    assert torch.all(o[0] == 0) and torch.all(dq[0] == 0)      # sample 0 has no key at all
    assert torch.all(o[:, :, :37] == 0)                         # causal, Nq > Nk: the first 37 queries see nothing


def test_attention_lse_and_strided_views(seed):
    B, N, H, D = 2, 37, 3, 88
    qkv = torch.randn(B, N, 3, H, D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    o = kernels.attention(q, k, v, backend="cuda")
    assert o.transpose(1, 2).is_contiguous()
    o.float().square().sum().backward()
    qkv_d = qkv.detach().double().requires_grad_()
    qd, kd, vd = (t.transpose(1, 2) for t in qkv_d.unbind(2))
    od = ref.attention(qd, kd, vd)
    od.square().sum().backward()
    attn_tests.check(o, od, torch.bfloat16, "o")
    attn_tests.check(qkv.grad, qkv_d.grad, torch.bfloat16, "dqkv")
    from kernels.cuda import ops as cuda
    _, lse = cuda.attention_fwd(q, k, v, None, False, D ** -0.5)
    _, lse_ref = ref.attention(qd, kd, vd, return_lse=True)
    torch.testing.assert_close(lse.double(), lse_ref, rtol=0, atol=2e-2)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("B,H,N,D,causal", [(2, 16, 2049, 88, False), (4, 16, 417, 88, False),
                                             (1, 25, 2049, 128, False), (2, 32, 1024, 128, True)])
def test_attention_real_shapes(seed, B, H, N, D, causal, dtype):
    attn_tests.run_case(B, H, H, N, N, D, causal, False, dtype, backend="cuda")


def test_attention_refuses_what_it_cannot_do():
    q = torch.randn(1, 2, 8, 64, device=DEVICE)
    with pytest.raises(TypeError, match="float32"):
        kernels.attention(q, q, q, backend="cuda")
    big = torch.randn(1, 1, 4, 136, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="multiples of 8 up to 128"):
        kernels.attention(big, big, big, backend="cuda")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (2, 9, 88), (130, 384), (5, 1408), (2, 3200), (1, 8192),
                                   (32, 417, 1408), (8, 2049, 3200), (3, 7, 13)])
def test_rms_norm(seed, shape, dtype):
    rms_tests.run_and_check(shape, dtype, backend="cuda")


def test_rms_norm_strided_and_unaligned_rows(seed):
    base = torch.randn(7, 1411, device=DEVICE, dtype=torch.float16)
    x = base[:, 3:1411]                                   # row stride 1411, start not 16-byte aligned
    w = torch.randn(1408, device=DEVICE, dtype=torch.float16)
    pool_tests.check(kernels.rms_norm(x, w, backend="cuda"), ref.rms_norm(x.double(), w.double()), 2e-3, "y")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("L,B,N,K,C,with_pos", gather_tests.SHAPES + [(None, 32, 2049, 417, 1408, True),
                                                                    (2, 2, 19, 7, 13, True)])
def test_masked_gather(seed, L, B, N, K, C, with_pos, dtype):
    lead = (L,) if L else ()
    x = torch.randn(*lead, B, N, C, device=DEVICE).to(dtype).requires_grad_()
    pos = torch.randn(1, N, C, device=DEVICE).to(dtype).requires_grad_() if with_pos else None
    idx = gather_tests.visible(B, N, K)
    dout = torch.randn(*lead, B, K, C, device=DEVICE).to(dtype)
    y, xd, pd = gather_tests.run(x, idx, pos, dout, backend="cuda")
    assert torch.equal(y, ref.masked_gather(x.detach(), idx, None if pos is None else pos.detach()))
    assert torch.equal(x.grad.double(), xd.grad)
    if with_pos:
        gather_tests.check(pos.grad, pd.grad, dtype, "dpos")


def test_masked_gather_strided_and_mixed_dtype(seed):
    x = torch.randn(2, 60, 3, 64, device=DEVICE, dtype=torch.bfloat16)[:, :, 1]   # (2, 60, 64), row stride 192
    pos = torch.randn(1, 60, 64, device=DEVICE, requires_grad=True)               # fp32 pos, bf16 x
    idx = gather_tests.visible(2, 60, 11)
    y = kernels.masked_gather(x, idx, pos, backend="cuda")
    assert torch.equal(y, ref.masked_gather(x, idx, pos.detach()))
    y.float().sum().backward()
    assert pos.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("B,N,C,H,out", pool_tests.SHAPES + [(8, 417, 1408, 16, 768), (2, 2049, 3200, 25, 768)])
def test_attn_pool(seed, B, N, C, H, out, dtype):
    x = (torch.randn(B, N, C, device=DEVICE) * 2).to(dtype).requires_grad_()
    pool_tests.run_and_check(x, pool_tests.params(C, out, H, dtype), H, dtype, backend="cuda")


def test_attn_pool_strided_x_and_offset_tokens(seed):
    C, H = 64, 4
    x = (torch.randn(2, 40, 2 * C, device=DEVICE) * 2 + 50).half()[:, :, C:].requires_grad_()  # strided, |mean| 50
    pool_tests.run_and_check(x, pool_tests.params(C, 32, H, torch.float16), H, torch.float16, tol=1e-2,
                             backend="cuda")
