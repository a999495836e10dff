"""kernels.attention on every backend ("triton", "cuda", "torch") against kernels.ref evaluated in float64: the
output and every gradient (dq, dk, dv, dbias); self/cross, causal (bottom-right, Nq > Nk and Nq < Nk), key
padding (with a sample that has no key at all), GQA, head dims 8..256 (88 unpadded in Triton), N = 1 .. 2049,
strided views, poisoned outputs; an additive bias in every broadcast shape, with the masks, with -inf entries
and a row that is -inf everywhere. The log-sum-exp of the backends that have kernels of their own.
On CPU the Triton kernels run under the interpreter; the cuda cases need a GPU (the CUDA build and its CPU
emulation are tested in test_cuda_build.py and test_cuda_emulated.py)."""
import importlib
import os

import pytest
import torch

import kernels
from kernels import ref
from kernels.common import poison_outputs
from kernels.triton import attention as triton_attention
from conftest import BACKENDS, CUDA, DEVICE, GPU

TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
KERNEL_BACKENDS = ["triton", CUDA]   # the backends with kernels (and custom ops) of their own


def check(got, want, dtype, what):
    scale = max(1.0, want.abs().max().item())
    err = (got.double() - want).abs().max().item()
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} (scale {scale:.3g})"


def skip_unsupported(backend, dtype, D):
    """Skip, with the reason, a case the backend does not implement (its refusal is tested separately)."""
    if backend == "cuda" and dtype == torch.float32:
        pytest.skip("the cuda kernels take fp16/bf16 only")
    if backend == "cuda" and (D % 8 or D > 128):
        pytest.skip("the cuda kernels cover head dims that are multiples of 8 up to 128")
    if backend == "triton" and dtype == torch.bfloat16 and not GPU:
        pytest.skip("bf16 numerics need a GPU (the interpreter only runs the upcast path, tested below)")


def working_dtype(backend):
    """fp32 where the backend has it (the tightest check), else fp16."""
    return torch.float16 if backend == "cuda" else torch.float32


def run_case(B, Hq, Hkv, Nq, Nk, D, causal, padding, dtype, backend, empty_sample=False, bias=None):
    """Forward + backward of `backend` with poisoned outputs against the float64 reference.
    padding: False, True (random key padding) or a (B, Nk) bool mask; bias: None or a tensor (a leaf that
    requires grad gets its gradient checked). Returns o, dq and dbias (None without a bias)."""
    q = torch.randn(B, Hq, Nq, D, device=DEVICE).to(dtype).requires_grad_()
    k = torch.randn(B, Hkv, Nk, D, device=DEVICE).to(dtype).requires_grad_()
    v = torch.randn(B, Hkv, Nk, D, device=DEVICE).to(dtype).requires_grad_()
    kpm = torch.rand(B, Nk, device=DEVICE) > 0.3 if padding is True else (None if padding is False else padding)
    if empty_sample:
        kpm[0] = False
    with poison_outputs():
        o = kernels.attention(q, k, v, causal=causal, key_padding_mask=kpm, bias=bias, backend=backend)
        do = torch.randn_like(o)
        o.backward(do)
    assert o.dtype == dtype and o.shape == q.shape
    leaves = [q, k, v] + ([bias] if bias is not None and bias.requires_grad else [])
    exact = [t.detach().double().requires_grad_() for t in leaves]
    bias_exact = exact[3] if len(exact) == 4 else (None if bias is None else bias.double())
    od = ref.attention(*exact[:3], causal=causal, key_padding_mask=kpm, bias=bias_exact)
    od.backward(do.double())
    check(o, od, dtype, "o")
    for name, t, e in zip(("dq", "dk", "dv", "dbias"), leaves, exact):
        assert t.grad.dtype == t.dtype and t.grad.shape == t.shape, name
        check(t.grad, e.grad, dtype, name)
    return o, q.grad, (bias.grad if len(leaves) == 4 else None)


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
HALF_CASES = CASES if GPU else CASES[:4]     # the interpreter is slow: fp16 on the first four on CPU


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,Hq,Hkv,Nq,Nk,D,causal,padding", CASES)
def test_attention_fp32(seed, backend, B, Hq, Hkv, Nq, Nk, D, causal, padding):
    skip_unsupported(backend, torch.float32, D)
    run_case(B, Hq, Hkv, Nq, Nk, D, causal, padding, torch.float32, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,Hq,Hkv,Nq,Nk,D,causal,padding", HALF_CASES)
def test_attention_half(seed, backend, dtype, B, Hq, Hkv, Nq, Nk, D, causal, padding):
    skip_unsupported(backend, dtype, D)
    run_case(B, Hq, Hkv, Nq, Nk, D, causal, padding, dtype, backend)


def test_attention_bf16_upcast_path(seed):
    """bf16 through the Triton kernels: on CPU the interpreter's upcast path (arithmetic in fp32)."""
    run_case(1, 2, 2, 20, 20, 88, True, True, torch.bfloat16, "triton")


@pytest.fixture(scope="module")
def case_2049():
    """The InternVideo2 shape, 1 CLS + 8 x 256 patches, d = 88 (one head: the interpreter is slow): q, k, v and
    do (fp16-representable, so every backend's dtype holds them exactly) and the float64 reference o, dq, dk,
    dv, computed once for all backends (it is a third of the time of a run)."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"case_2049 seed={seed}")
    torch.manual_seed(seed)
    q, k, v, do = (torch.randn(1, 1, 2049, 88, device=DEVICE).half().float() for _ in range(4))
    exact = [t.double().requires_grad_() for t in (q, k, v)]
    o = ref.attention(*exact)
    o.backward(do.double())
    return (q, k, v, do), (o.detach(), *(t.grad for t in exact))


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_long_sequence_2049(case_2049, backend):
    (q, k, v, do), want = case_2049
    dtype = working_dtype(backend)
    q, k, v = (t.to(dtype, copy=True).requires_grad_() for t in (q, k, v))   # fresh leaves: the inputs are shared
    with poison_outputs():
        o = kernels.attention(q, k, v, backend=backend)
        o.backward(do.to(dtype))
    for name, got, w in zip(("o", "dq", "dk", "dv"), (o, q.grad, k.grad, v.grad), want):
        check(got, w, dtype, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [8, 16, 24, 40, 56, 64, 72, 80, 88, 96, 104, 112, 120, 128])
def test_attention_every_head_dim(seed, backend, D):
    if backend == "triton" and not GPU:
        pytest.skip("interpreter time: on CPU the Triton head dims are those of CASES")
    dtype = torch.bfloat16 if backend == "cuda" else torch.float32
    run_case(2, 2, 1, 45, 70, D, True, True, dtype, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_are_zero(seed, backend):
    o, dq, _ = run_case(2, 2, 2, 70, 33, 88, True, True, working_dtype(backend), backend, empty_sample=True)
    assert torch.all(o[0] == 0) and torch.all(dq[0] == 0)      # sample 0 has no key at all
    assert torch.all(o[:, :, :37] == 0)                         # causal, Nq > Nk: the first 37 queries see nothing


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views_like_the_vit(seed, backend):
    """q, k, v as views into one packed (B, N, 3, H, D) projection, the layout Attention produces."""
    B, N, H, D = 2, 37, 3, 88
    dtype = torch.bfloat16 if backend == "cuda" else torch.float32
    qkv = torch.randn(B, N, 3, H, D, device=DEVICE).to(dtype).requires_grad_()
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))     # (B, H, N, D), non-contiguous
    o = kernels.attention(q, k, v, backend=backend)
    if backend != "torch":
        assert o.transpose(1, 2).is_contiguous()              # stored heads-last: the reshape is free
    o.float().square().sum().backward()
    qkv_d = qkv.detach().double().requires_grad_()
    od = ref.attention(*(t.transpose(1, 2) for t in qkv_d.unbind(2)))
    od.square().sum().backward()
    check(o, od, dtype, "o")
    check(qkv.grad, qkv_d.grad, dtype, "dqkv")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_lse_matches_reference(seed, backend):
    """The log-sum-exp the forward saves for the backward: of the scaled, biased, masked scores; -inf for rows
    with no key (a padded sample, and a row whose bias is -inf everywhere)."""
    module = triton_attention if backend == "triton" else importlib.import_module("kernels.cuda.ops")
    dtype = working_dtype(backend)
    q, k, v = (torch.randn(2, 2, n, 40, device=DEVICE).to(dtype) for n in (19, 23, 23))
    kpm = torch.rand(2, 23, device=DEVICE) > 0.5
    kpm[1] = False
    bias = torch.randn(2, 1, 19, 23, device=DEVICE)
    bias[0, :, 3] = float("-inf")
    for b in (None, bias):
        b4 = None if b is None else b.to(dtype).expand(2, 2, 19, 23)
        _, lse = module.attention_fwd(q, k, v, kpm, b4, True, 0.3)
        _, want = ref.attention(q.double(), k.double(), v.double(), causal=True, key_padding_mask=kpm, scale=0.3,
                                bias=None if b4 is None else b4.double(), return_lse=True)
        finite = torch.isfinite(want)
        assert torch.equal(torch.isfinite(lse), finite)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(lse[finite].double(), want[finite], rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------
# additive bias

BIAS_CASES = [  # B, Hq, Hkv, Nq, Nk, D, causal, padding, bias shape
    (2, 4, 2, 20, 37, 40, True, True, (2, 4, 20, 37)),    # a full bias; causal with Nq < Nk, padding, GQA
    (2, 2, 2, 150, 140, 88, True, False, (1, 2, 150, 140)),  # shared by the batch; causal, Nq > Nk: 10 rows
                                                             # see nothing, and keys past a block's diagonal
    (3, 4, 1, 17, 70, 64, False, True, (3, 1, 1, 70)),    # a BERT-like additive key mask; GQA 4:1, padding
    (1, 2, 2, 33, 33, 24, False, False, (33, 33)),        # 2-D (Nq, Nk), e.g. one relative position table
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,Hq,Hkv,Nq,Nk,D,causal,padding,bias_shape", BIAS_CASES)
def test_attention_bias(seed, backend, B, Hq, Hkv, Nq, Nk, D, causal, padding, bias_shape):
    dtype = working_dtype(backend)
    bias = (torch.randn(bias_shape, device=DEVICE) * 2).to(dtype).requires_grad_()
    run_case(B, Hq, Hkv, Nq, Nk, D, causal, padding, dtype, backend, bias=bias)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_fp32_bias_with_fp16_inputs(seed, backend):
    """A bias kept in fp32 next to fp16 q, k, v (and one that needs no gradient): dbias comes back in fp32."""
    bias = (torch.randn(2, 1, 21, 50, device=DEVICE) * 2).requires_grad_()
    _, _, dbias = run_case(2, 2, 2, 21, 50, 64, False, True, torch.float16, backend, bias=bias)
    assert dbias.dtype == torch.float32
    run_case(2, 2, 2, 21, 50, 64, True, False, torch.float16, backend, bias=bias.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_bias_minus_inf(seed, backend):
    """-inf bias entries mask single scores; rows whose visible keys are all -inf see nothing: o = 0 and zero
    gradients, no NaN anywhere."""
    B, H, Nq, Nk, D = 2, 2, 24, 40, 32
    kpm = torch.rand(B, Nk, device=DEVICE) > 0.3
    bias = torch.randn(B, H, Nq, Nk, device=DEVICE) * 2
    bias[..., ::3] = float("-inf")                      # every third key, for every query
    bias[0, 1, 5] = float("-inf")                       # one row -inf everywhere
    bias[1, 0, 9] = torch.where(kpm[1], float("-inf"), 0.0)   # -inf on every key the padding leaves visible
    bias = bias.to(working_dtype(backend)).requires_grad_()
    o, dq, dbias = run_case(B, H, H, Nq, Nk, D, False, kpm, working_dtype(backend), backend, bias=bias)
    for b, h, i in ((0, 1, 5), (1, 0, 9)):
        assert torch.all(o[b, h, i] == 0) and torch.all(dq[b, h, i] == 0) and torch.all(dbias[b, h, i] == 0)
    assert torch.all(dbias[..., ::3] == 0) and torch.all(dbias[~kpm[:, None, None, :].expand_as(dbias)] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_bias_that_does_not_broadcast(backend):
    q = torch.randn(2, 4, 8, 16, device=DEVICE)
    for shape in [(2, 4, 8, 9), (3, 1, 1, 8), (3, 1, 8), (1, 1, 1, 8, 8)]:
        with pytest.raises(ValueError, match=r"does not broadcast to \(B, Hq, Nq, Nk\)"):
            kernels.attention(q, q, q, bias=torch.zeros(shape, device=DEVICE), backend=backend)


def test_triton_padded_head_dim(seed):
    """padded_head_dim() (what `kernels.bench attention --pad88` times against the split) computes the same."""
    assert triton_attention.split_head_dim(88, pad=True) == (128, 0)
    bias = (torch.randn(1, 2, 30, 41, device=DEVICE) * 2).requires_grad_()
    with triton_attention.padded_head_dim():
        run_case(1, 2, 1, 30, 41, 88, True, True, torch.float32, "triton", bias=bias)
    assert not triton_attention.PAD_HEAD_DIM


def test_triton_custom_ops_opcheck(seed):
    """Schema, fake implementations and autograd registration with a broadcast (stride-0) bias, as torch.compile
    needs them."""
    q, k, v = (torch.randn(1, 2, n, 16, device=DEVICE, requires_grad=True) for n in (9, 12, 12))
    bias = torch.randn(1, 1, 1, 12, device=DEVICE, requires_grad=True).expand(1, 2, 9, 12)
    torch.library.opcheck(triton_attention.attention_fwd, (q, k, v, None, bias, True, 0.25))


# ---------------------------------------------------------------------------------------------
# what each backend refuses, and the split of the head dim

def test_head_dim_split():
    assert triton_attention.split_head_dim(88) == (64, 32)
    assert triton_attention.split_head_dim(64) == (64, 0)
    assert triton_attention.split_head_dim(128) == (128, 0)
    assert triton_attention.split_head_dim(72) == (64, 16)
    assert triton_attention.split_head_dim(8) == (16, 0)
    assert triton_attention.split_head_dim(200) == (128, 128)
    assert triton_attention.split_head_dim(8, pad=True) == (16, 0)
    assert triton_attention.split_head_dim(200, pad=True) == (256, 0)


def test_triton_refuses_what_it_cannot_do():
    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="contiguous in its last dim"):
        kernels.attention(q.transpose(2, 3), q.transpose(2, 3), q.transpose(2, 3), backend="triton")
    with pytest.raises(TypeError, match="float64"):
        kernels.attention(q.double(), q.double(), q.double(), backend="triton")
    big = torch.randn(1, 1, 4, 264, device=DEVICE)
    with pytest.raises(ValueError, match="head dims up to 256"):
        kernels.attention(big, big, big, backend="triton")


@pytest.mark.skipif(not GPU, reason="the cuda backend runs on a GPU only")
def test_cuda_refuses_what_it_cannot_do():
    q = torch.randn(1, 2, 8, 64, device=DEVICE)
    with pytest.raises(TypeError, match="float32"):
        kernels.attention(q, q, q, backend="cuda")
    big = torch.randn(1, 1, 4, 136, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="multiples of 8 up to 128"):
        kernels.attention(big, big, big, backend="cuda")


@pytest.mark.skipif(not GPU, reason="real InternVideo2 shapes need a GPU")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,H,N,D,causal", [(2, 16, 2049, 88, False), (4, 16, 417, 88, False),
                                             (1, 25, 2049, 128, False), (2, 32, 1024, 128, True)])
def test_attention_real_shapes_gpu(seed, backend, B, H, N, D, causal, dtype):
    run_case(B, H, H, N, N, D, causal, False, dtype, backend)
