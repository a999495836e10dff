"""Triton flash attention against kernels.ref evaluated in float64: output, log-sum-exp and all three
gradients; self/cross, causal (bottom-right, Nq > Nk and Nq < Nk), key padding (with a sample that has
no key at all), GQA, head dims 8..256 (88 unpadded), N = 1 .. 2049, strided views, poisoned outputs.
On CPU this runs under the Triton interpreter."""
import pytest
import torch

import kernels
from kernels import ref
from kernels.triton import attention as triton_attention
from kernels.common import poison_outputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def check(got, want, dtype, what):
    scale = max(1.0, want.abs().max().item())
    err = (got.double() - want).abs().max().item()
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} (scale {scale:.3g})"


def run_case(B, Hq, Hkv, Nq, Nk, D, causal, padding, dtype, empty_sample=False, backend="triton"):
    q = torch.randn(B, Hq, Nq, D, device=DEVICE).to(dtype).requires_grad_()
    k = torch.randn(B, Hkv, Nk, D, device=DEVICE).to(dtype).requires_grad_()
    v = torch.randn(B, Hkv, Nk, D, device=DEVICE).to(dtype).requires_grad_()
    kpm = torch.rand(B, Nk, device=DEVICE) > 0.3 if padding else None
    if empty_sample:
        kpm[0] = False
    with poison_outputs():
        o = kernels.attention(q, k, v, causal=causal, key_padding_mask=kpm, backend=backend)
        do = torch.randn_like(o)
        o.backward(do)
    assert o.dtype == dtype and o.shape == q.shape
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    od = ref.attention(qd, kd, vd, causal=causal, key_padding_mask=kpm)
    od.backward(do.double())
    check(o, od, dtype, "o")
    check(q.grad, qd.grad, dtype, "dq")
    check(k.grad, kd.grad, dtype, "dk")
    check(v.grad, vd.grad, dtype, "dv")
    return o, q.grad


CASES = [  # B, Hq, Hkv, Nq, Nk, D, causal, padding
    (2, 2, 2, 17, 17, 64, False, False),
    (1, 4, 2, 33, 70, 88, False, True),       # cross, GQA, padding, d = 88
    (1, 2, 1, 70, 33, 88, True, False),       # causal with Nq > Nk: the first 37 queries see nothing
    (1, 2, 2, 40, 130, 32, True, True),       # causal with Nq < Nk, padding
    (2, 1, 1, 1, 1, 8, False, False),         # N = 1, d = 8
    (1, 3, 3, 130, 17, 48, False, True),      # d = 48 = 32 + 16
    (1, 2, 2, 65, 65, 128, True, False),
    (1, 1, 1, 20, 24, 256, False, False),
    (1, 6, 2, 9, 9, 72, True, True),          # GQA 3:1, d = 72 = 64 + 8 (tail padded to 16)
]


@pytest.mark.parametrize("B,Hq,Hkv,Nq,Nk,D,causal,padding", CASES)
def test_attention_fp32(seed, B, Hq, Hkv, Nq, Nk, D, causal, padding):
    run_case(B, Hq, Hkv, Nq, Nk, D, causal, padding, torch.float32)


@pytest.mark.parametrize("B,Hq,Hkv,Nq,Nk,D,causal,padding", CASES[:4])
def test_attention_fp16(seed, B, Hq, Hkv, Nq, Nk, D, causal, padding):
    run_case(B, Hq, Hkv, Nq, Nk, D, causal, padding, torch.float16)


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 numerics need a GPU (the interpreter only runs the upcast path)")
@pytest.mark.parametrize("B,Hq,Hkv,Nq,Nk,D,causal,padding", CASES)
def test_attention_bf16_gpu(seed, B, Hq, Hkv, Nq, Nk, D, causal, padding):
    run_case(B, Hq, Hkv, Nq, Nk, D, causal, padding, torch.bfloat16)


def test_attention_bf16_upcast_path(seed):
    run_case(1, 2, 2, 20, 20, 88, True, True, torch.bfloat16)


def test_attention_long_sequence_2049(seed):
    """The InternVideo2 shape 1 CLS + 8 x 256 patches, d = 88 (one head: the interpreter is slow)."""
    run_case(1, 1, 1, 2049, 2049, 88, False, False, torch.float32)


def test_fully_masked_rows_are_zero(seed):
    o, dq = run_case(2, 2, 2, 5, 7, 16, False, True, torch.float32, empty_sample=True)
    assert torch.all(o[0] == 0) and torch.all(dq[0] == 0)


def test_lse_matches_reference(seed):
    q, k, v = (torch.randn(2, 2, n, 40, device=DEVICE) for n in (19, 23, 23))
    kpm = torch.rand(2, 23, device=DEVICE) > 0.5
    kpm[1] = False
    _, lse = triton_attention.attention_fwd(q, k, v, kpm, True, 0.3)
    _, want = ref.attention(q.double(), k.double(), v.double(), causal=True, key_padding_mask=kpm, scale=0.3,
                            return_lse=True)
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse[finite].double(), want[finite], rtol=1e-5, atol=1e-5)


def test_strided_views_like_the_vit(seed):
    """q, k, v as views into one packed (B, N, 3, H, D) projection, the layout Attention produces."""
    B, N, H, D = 2, 37, 3, 88
    qkv = torch.randn(B, N, 3, H, D, device=DEVICE, requires_grad=True)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))     # (B, H, N, D), non-contiguous
    o = kernels.attention(q, k, v, backend="triton")
    assert o.transpose(1, 2).is_contiguous()                  # stored heads-last: the reshape is free
    o.square().sum().backward()
    qkv_d = qkv.detach().double().requires_grad_()
    q, k, v = (t.transpose(1, 2) for t in qkv_d.unbind(2))
    od = ref.attention(q, k, v)
    torch.testing.assert_close(o.double(), od, rtol=1e-5, atol=1e-5)
    od.square().sum().backward()
    torch.testing.assert_close(qkv.grad.double(), qkv_d.grad, rtol=1e-4, atol=1e-4)


def test_head_dim_split():
    assert triton_attention.split_head_dim(88) == (64, 32)
    assert triton_attention.split_head_dim(64) == (64, 0)
    assert triton_attention.split_head_dim(128) == (128, 0)
    assert triton_attention.split_head_dim(72) == (64, 16)
    assert triton_attention.split_head_dim(8) == (16, 0)
    assert triton_attention.split_head_dim(200) == (128, 128)


def test_bad_inputs_raise_clear_errors():
    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="contiguous in its last dim"):
        kernels.attention(q.transpose(2, 3), q.transpose(2, 3), q.transpose(2, 3), backend="triton")
    with pytest.raises(TypeError, match="float64"):
        kernels.attention(q.double(), q.double(), q.double(), backend="triton")
    big = torch.randn(1, 1, 4, 264, device=DEVICE)
    with pytest.raises(ValueError, match="head dims up to 256"):
        kernels.attention(big, big, big, backend="triton")


@pytest.mark.skipif(DEVICE != "cuda", reason="real InternVideo2 shapes need a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,H,N,D,causal", [(2, 16, 2049, 88, False), (4, 16, 417, 88, False),
                                             (1, 25, 2049, 128, False), (2, 32, 1024, 128, True)])
def test_attention_real_shapes_gpu(seed, B, H, N, D, causal, dtype):
    run_case(B, H, H, N, N, D, causal, False, dtype)
