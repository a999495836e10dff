"""kernels.ref (the specification) against independent float64 computations, and its gradients.

The independent versions below are written differently on purpose: numpy, explicit loops, masks
built element by element from the rule in the docstring, LayerNorm/softmax by hand. Calls through
kernels.<op> name backend="ref", so that the shared argument checks are on the way but the numbers are
the reference's (the other backends are tested against it in tests/test_<op>.py).
"""
import math

import numpy as np
import pytest
import torch

import kernels
from kernels import ref


# ---------------------------------------------------------------------------------------------
# attention

def attention_np(q, k, v, causal, kpm, scale, bias=None):
    q, k, v = (t.double().numpy() for t in (q, k, v))
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    bias = np.zeros((B, Hq, Nq, Nk)) if bias is None else np.broadcast_to(bias.double().numpy(), (B, Hq, Nq, Nk))
    out = np.zeros_like(q)
    for b in range(B):
        for h in range(Hq):
            kh = h // (Hq // Hkv)
            for i in range(Nq):
                keys = [j for j in range(Nk) if (not causal or j <= i + Nk - Nq)
                        and (kpm is None or bool(kpm[b, j])) and bias[b, h, i, j] != -np.inf]
                if not keys:
                    continue  # no visible key (masked, or a bias of -inf): zeros
                s = np.array([q[b, h, i] @ k[b, kh, j] * scale + bias[b, h, i, j] for j in keys])
                p = np.exp(s - s.max())
                p /= p.sum()
                out[b, h, i] = sum(pj * v[b, kh, j] for pj, j in zip(p, keys))
    return torch.from_numpy(out)


CASES = [  # B, Hq, Hkv, Nq, Nk, D, causal, padding
    (2, 2, 2, 17, 17, 16, False, False),
    (1, 4, 2, 5, 9, 8, False, True),      # cross + GQA + key padding
    (2, 2, 1, 9, 4, 8, True, False),      # causal, Nq > Nk: first queries see nothing
    (1, 3, 3, 6, 11, 88, True, True),     # causal bottom-right + padding, d = 88
    (2, 1, 1, 1, 1, 8, False, False),     # N = 1
]


@pytest.mark.parametrize("B,Hq,Hkv,Nq,Nk,D,causal,padding", CASES)
def test_attention_matches_independent_float64(seed, B, Hq, Hkv, Nq, Nk, D, causal, padding):
    q, k, v = torch.randn(B, Hq, Nq, D), torch.randn(B, Hkv, Nk, D), torch.randn(B, Hkv, Nk, D)
    kpm = torch.rand(B, Nk) > 0.3 if padding else None
    if kpm is not None:
        kpm[0] = False  # one sample with every key padded: every row of it must be zero
    scale = 0.7 / math.sqrt(D)
    want = attention_np(q, k, v, causal, kpm, scale)
    got = ref.attention(q.double(), k.double(), v.double(), causal=causal, key_padding_mask=kpm, scale=scale)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    got32 = kernels.attention(q, k, v, causal=causal, key_padding_mask=kpm, scale=scale, backend="ref")
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias_shape", [(2, 3, 6, 11), (1, 3, 6, 11), (2, 1, 1, 11), (6, 11), (11,)])
def test_attention_bias_matches_independent_float64(seed, bias_shape):
    """An additive bias in every broadcast shape, with -inf entries (one row -inf on every key), on top of causal
    (Nq < Nk) and key padding."""
    q, k, v = torch.randn(2, 3, 6, 8), torch.randn(2, 3, 11, 8), torch.randn(2, 3, 11, 8)
    kpm = torch.rand(2, 11) > 0.3
    bias = torch.randn(bias_shape) * 3
    bias[..., 2] = float("-inf")
    row_bias = len(bias_shape) >= 2 and bias_shape[-2] > 1
    if row_bias:
        bias[..., 4, :] = float("-inf")          # query row 4 sees no key
    want = attention_np(q, k, v, True, kpm, 0.4, bias)
    got = ref.attention(q.double(), k.double(), v.double(), causal=True, key_padding_mask=kpm, scale=0.4,
                        bias=bias.double())
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    got32 = kernels.attention(q, k, v, causal=True, key_padding_mask=kpm, scale=0.4, bias=bias, backend="ref")
    torch.testing.assert_close(got32.double(), want, rtol=1e-5, atol=1e-5)
    if row_bias:
        assert torch.all(got[:, :, 4] == 0)


def test_attention_bias_lse(seed):
    """lse is the log-sum-exp of the biased, scaled, masked scores (-inf for a row that sees nothing)."""
    q, k, v = torch.randn(1, 2, 5, 8).double(), torch.randn(1, 2, 7, 8).double(), torch.randn(1, 2, 7, 8).double()
    bias = torch.randn(2, 5, 7).double()
    bias[1, 3] = float("-inf")
    _, lse = ref.attention(q, k, v, bias=bias, return_lse=True)
    want = torch.logsumexp(q @ k.transpose(-1, -2) / math.sqrt(8) + bias, dim=-1)
    torch.testing.assert_close(lse, want)
    assert lse[0, 1, 3] == float("-inf")


def test_attention_lse_and_default_scale(seed):
    q, k, v = torch.randn(1, 2, 5, 8).double(), torch.randn(1, 2, 7, 8).double(), torch.randn(1, 2, 7, 8).double()
    o, lse = ref.attention(q, k, v, causal=True, return_lse=True)
    s = q @ k.transpose(-1, -2) / math.sqrt(8)
    allowed = torch.tensor([[j <= i + 2 for j in range(7)] for i in range(5)])
    want = torch.logsumexp(s.masked_fill(~allowed, float("-inf")), dim=-1)
    torch.testing.assert_close(lse, want)
    torch.testing.assert_close(o, attention_np(q, k, v, True, None, 8 ** -0.5))


def test_attention_fp16_output_dtype(seed):
    q, k, v = (torch.randn(1, 2, 9, 16).half() for _ in range(3))
    o = kernels.attention(q, k, v, backend="ref")
    assert o.dtype == torch.float16
    torch.testing.assert_close(o.double(), attention_np(q, k, v, False, None, 0.25), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("causal,padding,Nq,Nk,Hkv", [(False, False, 5, 5, 2), (True, True, 6, 4, 1), (True, False, 3, 7, 2)])
def test_attention_gradcheck(seed, causal, padding, Nq, Nk, Hkv):
    q = torch.randn(1, 2, Nq, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, Hkv, Nk, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, Hkv, Nk, 4, dtype=torch.float64, requires_grad=True)
    kpm = torch.tensor([[True, False] * (Nk // 2) + [True] * (Nk % 2)]) if padding else None
    assert torch.autograd.gradcheck(
        lambda q, k, v: kernels.attention(q, k, v, causal=causal, key_padding_mask=kpm, backend="ref"), (q, k, v))


@pytest.mark.parametrize("bias_shape,causal,padding", [((1, 2, 5, 7), True, True), ((5, 7), False, True),
                                                        ((2, 1, 1, 7), False, False)])
def test_attention_gradcheck_with_bias(seed, bias_shape, causal, padding):
    """Every gradient, the bias's included, for broadcast biases with -inf entries and a row -inf everywhere."""
    q = torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 1, 7, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 1, 7, 4, dtype=torch.float64, requires_grad=True)
    kpm = torch.tensor([[True, False, True, True, False, True, True]] * 2) if padding else None
    bias = torch.randn(bias_shape, dtype=torch.float64)
    bias[..., 3] = float("-inf")
    if bias.shape[-2] > 1:
        bias[..., 1, :] = float("-inf")
    bias.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda q, k, v, b: ref.attention(q, k, v, causal=causal, key_padding_mask=kpm, bias=b), (q, k, v, bias))
    o = ref.attention(q, k, v, causal=causal, key_padding_mask=kpm, bias=bias)
    o.sum().backward()
    assert torch.isfinite(bias.grad).all() and torch.all(bias.grad[..., 3] == 0)


def test_attention_fully_masked_rows_have_zero_output_and_grad():
    q = torch.randn(1, 1, 4, 8, requires_grad=True)
    k, v = torch.randn(1, 1, 2, 8, requires_grad=True), torch.randn(1, 1, 2, 8, requires_grad=True)
    o = kernels.attention(q, k, v, causal=True, backend="ref")  # queries 0, 1 see no key (bottom-right alignment)
    assert torch.all(o[:, :, :2] == 0) and torch.all(o[:, :, 2:] != 0)
    o.sum().backward()
    assert torch.all(q.grad[:, :, :2] == 0) and torch.isfinite(q.grad).all()
    assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()


# ---------------------------------------------------------------------------------------------
# rms_norm

@pytest.mark.parametrize("shape", [(3, 17), (2, 5, 88), (1, 1408), (4, 1)])
def test_rms_norm_matches_independent_float64(seed, shape):
    x, w = torch.randn(*shape) * 3, torch.randn(shape[-1])
    xn = x.double().numpy()
    want = w.double().numpy() * xn / np.sqrt((xn ** 2).mean(-1, keepdims=True) + 1e-6)
    torch.testing.assert_close(ref.rms_norm(x.double(), w.double()), torch.from_numpy(want), rtol=1e-12, atol=1e-12)
    got32 = kernels.rms_norm(x, w, backend="ref")
    torch.testing.assert_close(got32.double(), torch.from_numpy(want), rtol=1e-5, atol=1e-5)


def test_rms_norm_low_precision_follows_official_rounding(seed):
    x, w = torch.randn(4, 64).half() * 5, torch.randn(64).half()
    y = kernels.rms_norm(x, w, 1e-6, backend="ref")
    assert y.dtype == torch.float16
    xf = x.float()  # the official RMSNorm: fp32 statistics, cast back, then the weight multiply in fp16
    official = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.float16)
    assert torch.equal(y, official)


def test_rms_norm_gradcheck(seed):
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: kernels.rms_norm(x, w, 1e-5, backend="ref"), (x, w))


# ---------------------------------------------------------------------------------------------
# attn_pool

def pool_params(C, out, H, dtype=torch.float64):
    names = ["ln_q_w", "ln_q_b", "ln_k_w", "ln_k_b", "ln_v_w", "ln_v_b", "wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo"]
    shapes = [(C,)] * 6 + [(C, C), (C,)] * 3 + [(out, C), (out,)]
    return {n: (torch.randn(s, dtype=dtype) * (0.5 if len(s) == 2 else 1.0)) for n, s in zip(names, shapes)}


def attn_pool_np(x, p, H, eps=1e-5):
    x = x.double().numpy()
    p = {k: v.double().numpy() for k, v in p.items()}
    B, N, C = x.shape
    d = C // H

    def ln(z, w, b):
        mu = z.mean(-1, keepdims=True)
        var = ((z - mu) ** 2).mean(-1, keepdims=True)
        return (z - mu) / np.sqrt(var + eps) * w + b

    out = np.zeros((B, p["wo"].shape[0]))
    for b in range(B):
        q = ln(x[b].mean(0), p["ln_q_w"], p["ln_q_b"]) @ p["wq"].T + p["bq"]    # (C,)
        k = ln(x[b], p["ln_k_w"], p["ln_k_b"]) @ p["wk"].T + p["bk"]           # (N, C)
        v = ln(x[b], p["ln_v_w"], p["ln_v_b"]) @ p["wv"].T + p["bv"]
        heads = []
        for h in range(H):
            sl = slice(h * d, (h + 1) * d)
            s = k[:, sl] @ q[sl] / math.sqrt(d)
            a = np.exp(s - s.max())
            heads.append((a / a.sum()) @ v[:, sl])
        out[b] = np.concatenate(heads) @ p["wo"].T + p["bo"]
    return torch.from_numpy(out)


@pytest.mark.parametrize("B,N,C,H,out", [(2, 17, 32, 4, 24), (1, 1, 12, 4, 5), (3, 9, 48, 16, 7)])
def test_attn_pool_matches_independent_float64(seed, B, N, C, H, out):
    x = torch.randn(B, N, C, dtype=torch.float64)
    p = pool_params(C, out, H)
    want = attn_pool_np(x, p, H)
    torch.testing.assert_close(ref.attn_pool(x, *p.values(), num_heads=H), want, rtol=1e-10, atol=1e-10)
    got32 = kernels.attn_pool(x.float(), *(t.float() for t in p.values()), num_heads=H, backend="ref")
    torch.testing.assert_close(got32.double(), want, rtol=1e-4, atol=1e-4)


def test_attn_pool_gradcheck_every_input(seed):
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    p = {k: v.requires_grad_() for k, v in pool_params(12, 6, 4).items()}  # head dim 3
    assert torch.autograd.gradcheck(lambda *a: kernels.attn_pool(*a, num_heads=4, backend="ref"), (x, *p.values()))


# ---------------------------------------------------------------------------------------------
# masked_gather and masked_visible_idx

def sorted_idx(B, N, K):
    return torch.stack([torch.randperm(N)[:K].sort().values for _ in range(B)])


def test_masked_gather_matches_loops(seed):
    B, N, C, K = 3, 17, 5, 6
    x, pos, idx = torch.randn(B, N, C).double(), torch.randn(1, N, C).double(), sorted_idx(3, 17, 6)
    want = torch.zeros(B, K, C, dtype=torch.float64)
    for b in range(B):
        for j in range(K):
            want[b, j] = x[b, idx[b, j]] + pos[0, idx[b, j]]
    assert torch.equal(kernels.masked_gather(x, idx, pos, backend="ref"), want)
    assert torch.equal(kernels.masked_gather(x, idx, backend="ref"), want - pos[0][idx])


def test_masked_gather_stacked_layers(seed):
    L, B, N, C, K = 3, 2, 7, 4, 3
    x, pos, idx = torch.randn(L, B, N, C), torch.randn(1, N, C), sorted_idx(B, N, K)
    out = kernels.masked_gather(x, idx, pos, backend="ref")
    assert out.shape == (L, B, K, C)
    for layer in range(L):
        assert torch.equal(out[layer], kernels.masked_gather(x[layer], idx, pos, backend="ref"))
    with pytest.raises(ValueError, match="differ in batch size"):
        kernels.masked_gather(x, sorted_idx(B + 1, N, K))


def test_masked_gather_gradcheck(seed):
    x = torch.randn(2, 9, 3, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(1, 9, 3, dtype=torch.float64, requires_grad=True)
    idx = sorted_idx(2, 9, 4)
    assert torch.autograd.gradcheck(lambda x, p: kernels.masked_gather(x, idx, p, backend="ref"), (x, pos))


def test_masked_gather_backward_scatters_and_reduces_pos_grad():
    x = torch.zeros(2, 4, 1, requires_grad=True)
    pos = torch.zeros(1, 4, 1, requires_grad=True)
    idx = torch.tensor([[0, 2], [2, 3]])
    kernels.masked_gather(x, idx, pos, backend="ref").sum().backward()
    assert x.grad.flatten().tolist() == [1, 0, 1, 0, 0, 0, 1, 1]
    assert pos.grad.flatten().tolist() == [1, 0, 2, 1]


def test_masked_visible_idx(seed):
    B, N, K = 4, 21, 5
    idx = sorted_idx(B, N, K)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[torch.arange(B)[:, None], idx] = False
    assert torch.equal(kernels.masked_visible_idx(mask), idx)
    assert torch.equal(kernels.masked_visible_idx(mask, num_visible=K), idx)
    with pytest.raises(RuntimeError, match="num_visible=4"):
        kernels.masked_visible_idx(mask, num_visible=4)
    mask[0, idx[0, 0]] = True
    with pytest.raises(ValueError, match="between 4 and 5"):
        kernels.masked_visible_idx(mask)


# ---------------------------------------------------------------------------------------------
# argument checks name the problem

def test_bad_arguments_are_named():
    q = torch.randn(1, 4, 5, 8)
    with pytest.raises(ValueError, match="must have 4 dims"):
        kernels.attention(q[0], q, q)
    with pytest.raises(TypeError, match="share a dtype"):
        kernels.attention(q, q.half(), q.half())
    with pytest.raises(ValueError, match="multiple of kv heads"):
        kernels.attention(q, q[:, :3], q[:, :3])
    with pytest.raises(ValueError, match="key_padding_mask must be"):
        kernels.attention(q, q, q, key_padding_mask=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask has dtype"):
        kernels.attention(q, q, q, key_padding_mask=torch.ones(1, 5))
    with pytest.raises(ValueError, match="is on meta"):
        kernels.attention(q, q.to("meta"), q)
    with pytest.raises(TypeError, match="dtype torch.int64"):
        kernels.rms_norm(torch.ones(2, 3, dtype=torch.int64), torch.ones(3))
    with pytest.raises(ValueError, match="last dim"):
        kernels.rms_norm(torch.randn(2, 3), torch.ones(4))
    with pytest.raises(ValueError, match="must divide"):
        kernels.attn_pool(torch.randn(1, 3, 12), *pool_params(12, 4, 5, torch.float32).values(), num_heads=5)
    with pytest.raises(ValueError, match=r"wk must have shape \(12, 12\)"):
        p = pool_params(12, 4, 4, torch.float32)
        p["wk"] = p["wk"][:6]
        kernels.attn_pool(torch.randn(1, 3, 12), *p.values(), num_heads=4)
    with pytest.raises(TypeError, match="visible_idx has dtype torch.int32"):
        kernels.masked_gather(torch.randn(2, 5, 3), torch.zeros(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="pos_embed must be"):
        kernels.masked_gather(torch.randn(2, 5, 3), torch.zeros(2, 2, dtype=torch.int64), torch.randn(1, 4, 3))
