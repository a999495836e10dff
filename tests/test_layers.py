"""ivmini/layers.py against formulas written out by hand (float64, CPU, tiny shapes): a post-norm BERT layer
with cross-attention and padding, deep-norm scaling with a query-gated bias, SwiGLU, RoPE (as complex
rotations), an additive attention bias, GQA + causal + RoPE + qk-norm together, and the parameter names.
The pre-norm path is covered by tests/test_vit.py, test_checkpoint.py and test_teachers.py (official code).

Run: python -m pytest tests/test_layers.py -q
"""
import math

import pytest
import torch
import torch.nn.functional as F

from ivmini.layers import Attention, Block, Mlp, RotaryEmbedding

D64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


def keep_mask(B, N):
    """Random key padding mask (B, N), True = attend, at least one key kept per row."""
    m = torch.rand(B, N) > 0.4
    m[torch.arange(B), torch.randint(N, (B,))] = True
    return m


def hand_attention(x, ctx, wq, bq, wk, bk, wv, bv, wo, bo, H, *, additive=None, causal=False, kv_heads=None,
                   rope=None, qk_norm=None):
    """softmax(q k^T / sqrt(d) + additive) v, projections with F.linear; GQA by repeating kv heads."""
    B, N, C = x.shape
    d, Hkv = C // H, kv_heads or H
    q, k, v = F.linear(x, wq, bq), F.linear(ctx, wk, bk), F.linear(ctx, wv, bv)
    if qk_norm is not None:      # RMSNorm over the full width: (weight_q, weight_k, eps)
        q, k = [t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + qk_norm[2]) * w for t, w in zip((q, k), qk_norm)]
    q = q.view(B, N, H, d).transpose(1, 2)                                          # (B, H, N, d)
    k, v = [t.view(B, -1, Hkv, d).transpose(1, 2).repeat_interleave(H // Hkv, 1) for t in (k, v)]
    if callable(additive):       # a bias function reads the projected queries, before RoPE
        additive = additive(q)
    if rope is not None:
        q, k = complex_rope(q, rope), complex_rope(k, rope)
    s = q @ k.transpose(-1, -2) / math.sqrt(d)
    if additive is not None:
        s = s + additive
    if causal:
        s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
    o = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C)
    return F.linear(o, wo, bo)


def complex_rope(x, theta, offset=0):
    """RoPE written independently: interleave the rotate-half pairs (i, i + d/2) as complex numbers
    x_i + j x_{i+d/2}, multiply by exp(j p theta^(-2i/d)) in float64, undo the interleaving."""
    d, N = x.shape[-1], x.shape[-2]
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2:].double())             # (..., N, d/2)
    p = torch.arange(offset, offset + N, dtype=D64)[:, None]
    z = z * torch.polar(torch.ones(N, d // 2, dtype=D64), p * theta ** (-torch.arange(0, d, 2, dtype=D64) / d))
    return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)


def rand_linear(n_out, n_in, bias=True):
    return torch.randn(n_out, n_in, dtype=D64) * n_in ** -0.5, (torch.randn(n_out, dtype=D64) if bias else None)


def bert_weights(C, hidden, cross_dim):
    w = {}
    for p, kv_in in (("attention.", C), ("crossattention.", cross_dim)):
        for n, n_in in (("self.query", C), ("self.key", kv_in), ("self.value", kv_in), ("output.dense", C)):
            w[p + n + ".weight"], w[p + n + ".bias"] = rand_linear(C, n_in)
        w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"] = 1 + torch.randn(2, C, dtype=D64) / 4
    w["intermediate.dense.weight"], w["intermediate.dense.bias"] = rand_linear(hidden, C)
    w["output.dense.weight"], w["output.dense.bias"] = rand_linear(C, hidden)
    w["output.LayerNorm.weight"], w["output.LayerNorm.bias"] = 1 + torch.randn(2, C, dtype=D64) / 4
    return {k: t.requires_grad_() for k, t in w.items()}


def bert_to_block(w):
    """The key map a BERT tower would use: q/k/v rows concatenated into the fused projections."""
    sd = {}
    for t in ("weight", "bias"):
        sd[f"attn.qkv.{t}"] = torch.cat([w[f"attention.self.{n}.{t}"] for n in ("query", "key", "value")])
        sd[f"cross_attn.q.{t}"] = w[f"crossattention.self.query.{t}"]
        sd[f"cross_attn.kv.{t}"] = torch.cat([w[f"crossattention.self.{n}.{t}"] for n in ("key", "value")])
        for p, attn, norm in (("attention.", "attn", "norm1"), ("crossattention.", "cross_attn", "cross_norm")):
            sd[f"{attn}.proj.{t}"], sd[f"{norm}.{t}"] = w[f"{p}output.dense.{t}"], w[f"{p}output.LayerNorm.{t}"]
        sd[f"mlp.fc1.{t}"], sd[f"mlp.fc2.{t}"] = w[f"intermediate.dense.{t}"], w[f"output.dense.{t}"]
        sd[f"norm2.{t}"] = w[f"output.LayerNorm.{t}"]
    return sd


def hand_bert_layer(x, ctx, w, H, mask, ctx_mask):
    """A post-LN BERT fusion layer as HF writes it: additive mask (1 - mask) * -10000, LN eps 1e-12, exact GELU."""
    C = x.shape[-1]

    def sub(h, p, kv, m):
        qkv = [w[f"{p}self.{n}.{t}"] for n in ("query", "key", "value") for t in ("weight", "bias")]
        a = hand_attention(h, kv, *qkv, w[p + "output.dense.weight"], w[p + "output.dense.bias"], H,
                           additive=(1.0 - m[:, None, None, :].double()) * -10000.0)
        return F.layer_norm(h + a, (C,), w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], 1e-12)

    x = sub(x, "attention.", x, mask)
    x = sub(x, "crossattention.", ctx, ctx_mask)
    h = F.linear(F.gelu(F.linear(x, w["intermediate.dense.weight"], w["intermediate.dense.bias"])),
                 w["output.dense.weight"], w["output.dense.bias"])
    return F.layer_norm(x + h, (C,), w["output.LayerNorm.weight"], w["output.LayerNorm.bias"], 1e-12)


def test_post_norm_block_with_cross_attention_is_a_bert_fusion_layer(seed):
    B, N, Nc, C, Cc, H, hidden = 3, 7, 5, 24, 20, 4, 40
    w = bert_weights(C, hidden, Cc)
    blk = Block(C, H, hidden, qkv_bias=True, norm="layer", norm_eps=1e-12, norm_first=False, cross_dim=Cc).double()
    blk.load_state_dict({k: t.detach() for k, t in bert_to_block(w).items()})
    x, ctx = torch.randn(B, N, C, dtype=D64, requires_grad=True), torch.randn(B, Nc, Cc, dtype=D64, requires_grad=True)
    mask, ctx_mask = keep_mask(B, N), keep_mask(B, Nc)
    got = blk(x, ctx, ctx_mask, key_padding_mask=mask)
    want = hand_bert_layer(x, ctx, w, H, mask, ctx_mask)
    torch.testing.assert_close(got, want, **TOL)
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, [x, ctx, *blk.parameters()], g)
    want_grads = torch.autograd.grad(want, [x, ctx, *w.values()], g)
    torch.testing.assert_close(grads[:2], want_grads[:2], **TOL)
    mapped = bert_to_block(dict(zip(w, want_grads[2:])))
    for (name, _), got_grad in zip(blk.named_parameters(), grads[2:]):
        torch.testing.assert_close(got_grad, mapped[name], **TOL, msg=lambda m: f"{name}: {m}")


def test_deep_norm_block_scales_the_residual_and_takes_a_query_gated_bias(seed):
    B, N, C, H, hidden, depth = 2, 6, 16, 2, 32, 12
    alpha = (2 * depth) ** 0.25
    blk = Block(C, H, hidden, qkv_bias=True, norm="layer", norm_eps=1e-5, norm_first=False,
                residual_scale=alpha).double()
    for p in blk.parameters():
        p.data.normal_(0.0, 0.3)
    pos_bias, gate_w = torch.randn(1, H, N, N, dtype=D64), torch.randn(C // H, dtype=D64)
    gated = lambda q: torch.sigmoid(q @ gate_w)[..., None] * pos_bias      # (B, H, N, 1) * (1, H, N, N)
    x = torch.randn(B, N, C, dtype=D64)
    got = blk(x, bias=gated)
    sd = {k: t for k, t in blk.state_dict().items()}
    wq, wk, wv = sd["attn.qkv.weight"].chunk(3)
    bq, bk, bv = sd["attn.qkv.bias"].chunk(3)
    a = hand_attention(x, x, wq, bq, wk, bk, wv, bv, sd["attn.proj.weight"], sd["attn.proj.bias"], H, additive=gated)
    h = F.layer_norm(alpha * x + a, (C,), sd["norm1.weight"], sd["norm1.bias"], 1e-5)
    m = F.linear(F.gelu(F.linear(h, sd["mlp.fc1.weight"], sd["mlp.fc1.bias"])), sd["mlp.fc2.weight"],
                 sd["mlp.fc2.bias"])
    want = F.layer_norm(alpha * h + m, (C,), sd["norm2.weight"], sd["norm2.bias"], 1e-5)
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("bias", [False, True])
def test_swiglu_is_silu_of_gate_times_up(seed, bias):
    C, hidden = 12, 20
    mlp = Mlp(C, hidden, act="silu", gated=True, bias=bias).double()
    assert mlp.fc1.weight.shape == (2 * hidden, C) and mlp.fc2.weight.shape == (C, hidden)
    assert (mlp.fc1.bias is None) == (mlp.fc2.bias is None) == (not bias)
    x = torch.randn(2, 5, C, dtype=D64, requires_grad=True)
    w1, w2 = mlp.fc1.weight.detach().clone().requires_grad_(), mlp.fc2.weight.detach().clone().requires_grad_()
    b1 = mlp.fc1.bias.detach() if bias else torch.zeros(2 * hidden, dtype=D64)
    b2 = mlp.fc2.bias.detach() if bias else torch.zeros(C, dtype=D64)
    gate = x @ w1[:hidden].T + b1[:hidden]
    want = (gate / (1 + torch.exp(-gate)) * (x @ w1[hidden:].T + b1[hidden:])) @ w2.T + b2
    got = mlp(x)
    torch.testing.assert_close(got, want, **TOL)
    g = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad(got, [x, mlp.fc1.weight, mlp.fc2.weight], g),
                               torch.autograd.grad(want, [x, w1, w2], g), **TOL)


def test_rope_is_a_complex_rotation_and_offset_continues_positions(seed):
    theta, d, N = 500.0, 8, 11
    rope = RotaryEmbedding(d, theta)
    x = torch.randn(2, 3, N, d, dtype=D64)
    full = rope(x)
    # the tables are built in fp32 (HF's rounding): at position p the angle is off by up to ~p * 2^-24
    torch.testing.assert_close(full, complex_rope(x, theta), rtol=0, atol=1e-5)
    tail = x[..., 4:, :]
    torch.testing.assert_close(rope(tail, offset=4), complex_rope(tail, theta, offset=4), rtol=0, atol=1e-5)
    assert torch.equal(rope(x[..., -1:, :], offset=N - 1), full[..., -1:, :])   # last token alone, by offset
    assert rope.cos.shape == (16, d)                                            # tables grown to a power of two
    longer = rope(torch.randn(1, 1, 40, d, dtype=D64))
    assert rope.cos.shape == (64, d) and longer.shape == (1, 1, 40, d)
    assert torch.equal(rope(x), full)                                           # rebuilt tables, same values
    assert rope(x.float()).dtype == torch.float32 and rope.cos.dtype == torch.float32
    assert rope.state_dict() == {}


@pytest.mark.parametrize("bias_shape", [(4, 5, 9), (2, 1, 5, 9), "gated"])
def test_attention_adds_the_bias_to_the_scaled_scores(seed, bias_shape):
    B, N, Nk, C, Cc, H = 2, 5, 9, 16, 12, 4
    attn = Attention(C, H, qkv_bias=True, kv_dim=Cc).double()
    x, ctx = torch.randn(B, N, C, dtype=D64), torch.randn(B, Nk, Cc, dtype=D64)
    if bias_shape == "gated":
        table = torch.randn(H, N, Nk, dtype=D64)
        bias = lambda q: q.sum(-1, keepdim=True).tanh() * table                 # a function of q (B, H, N, d)
    else:
        bias = torch.randn(bias_shape, dtype=D64, requires_grad=True)
    got = attn(x, ctx, bias=bias)
    (wk, wv), (bk, bv) = attn.kv.weight.chunk(2), attn.kv.bias.chunk(2)
    want = hand_attention(x, ctx, attn.q.weight, attn.q.bias, wk, bk, wv, bv, attn.proj.weight, attn.proj.bias, H,
                          additive=bias)
    torch.testing.assert_close(got, want, **TOL)
    if torch.is_tensor(bias):
        g = torch.randn_like(got)
        torch.testing.assert_close(torch.autograd.grad(got, bias, g), torch.autograd.grad(want, bias, g), **TOL)


def test_gqa_causal_rope_qk_norm_attention(seed):
    B, N, C, H, Hkv, theta = 2, 7, 32, 4, 2, 10000.0
    attn = Attention(C, H, qk_norm=True, num_kv_heads=Hkv, causal=True, proj_bias=False, rope_theta=theta).double()
    for p in attn.parameters():
        p.data.normal_(0.0, 0.3)
    x = torch.randn(B, N, C, dtype=D64, requires_grad=True)
    table = torch.randn(N, N, dtype=D64)
    gated = lambda q: q[..., :1] * table                                       # reads q before RoPE
    got = attn(x, bias=gated)
    wq, wk, wv = attn.qkv.weight.split([C, C // 2, C // 2])
    want = hand_attention(x, x, wq, None, wk, None, wv, None, attn.proj.weight, None, H, causal=True, kv_heads=Hkv,
                          rope=theta, qk_norm=(attn.q_norm.weight, attn.k_norm.weight, 1e-6), additive=gated)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)                   # fp32-built RoPE tables
    g = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad(got, x, g), torch.autograd.grad(want, x, g), rtol=0, atol=1e-5)
    # RoPE scores depend on position differences only: shifting every position changes nothing
    torch.testing.assert_close(attn(x, offset=13), attn(x), rtol=0, atol=1e-5)


def test_parameter_names_and_rope_adds_no_keys():
    llm = Block(32, 4, 48, norm="rms", norm_eps=1e-5, num_kv_heads=2, causal=True, rope_theta=1e6, act="silu",
                gated=True, bias=False)
    assert {k: tuple(v.shape) for k, v in llm.state_dict().items()} == {
        "norm1.weight": (32,), "attn.qkv.weight": (64, 32), "attn.proj.weight": (32, 32), "norm2.weight": (32,),
        "mlp.fc1.weight": (96, 32), "mlp.fc2.weight": (32, 48)}
    fusion = Block(16, 2, 32, qkv_bias=True, norm="layer", norm_first=False, cross_dim=24)
    assert sorted(k for k in fusion.state_dict() if "cross" in k) == [
        "cross_attn.kv.bias", "cross_attn.kv.weight", "cross_attn.proj.bias", "cross_attn.proj.weight",
        "cross_attn.q.bias", "cross_attn.q.weight", "cross_norm.bias", "cross_norm.weight"]
    x = torch.randn(1, 3, 32)
    assert llm(x).shape == (1, 3, 32) and llm(x, offset=5).shape == (1, 3, 32)


def test_errors_name_the_problem():
    fusion = Block(16, 2, 32, norm="layer", cross_dim=24)
    with pytest.raises(ValueError, match="cross-attention"):
        fusion(torch.randn(1, 3, 16))
    with pytest.raises(ValueError, match="cross-attention"):
        Block(16, 2, 32)(torch.randn(1, 3, 16), torch.randn(1, 2, 24))
    with pytest.raises(ValueError, match="rope_theta is for self-attention"):
        Attention(16, 2, kv_dim=8, rope_theta=1e4)
    with pytest.raises(ValueError, match="even head_dim"):
        RotaryEmbedding(5)
    with pytest.raises(ValueError, match="Mlp act"):
        Mlp(8, 16, act="relu")
    with pytest.raises(ValueError, match="Block norm"):
        Block(16, 2, 32, norm="batch")
