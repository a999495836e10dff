"""ivmini/audio.py (BEATs) and ivmini/checkpoint/beats.py (load_official("beats", ...)).

Golden file tests/golden/beats_tiny.pt ({'cfg', 'model', 'fbank', 'out'}) was produced outside the repository by
the official code: OpenGVLab/InternVideo commit 3965eef16e2dadd0ea6c8d0cc29c8a3039df52e3,
InternVideo2/multi_modality/models/backbones/beats/{BEATs.py, backbone.py, modules.py} (torchaudio stubbed: only
the bypassed `preprocess` uses it), torch 2.13 CPU, fp32. BEATs(BEATsConfig(cfg)) with torch.manual_seed(0),
cfg = input_patch_size 16, embed_dim 16, conv_bias True, encoder_layers 2, encoder_embed_dim 32,
encoder_ffn_embed_dim 64, encoder_attention_heads 2, deep_norm True, layer_norm_first False,
relative_position_embedding True, gru_rel_pos True, num_buckets 32, max_distance 20, conv_pos 16,
conv_pos_groups 4 (other fields official defaults); every parameter then got + 0.05 N(0, 1) noise (so zero
biases, g = ||v|| and grep_a = 1 do not hide mistakes); eval mode; fbank = randn(2, 100, 64); out = model(fbank)
(2, 24, 32), the `forward` InternVideo2 calls; model = its state_dict() (old weight_norm keys weight_g/weight_v,
the shared relative table repeated under both layers).
The other tests compare pieces with independent float64 computations written here.

Run: python -m pytest tests/test_beats.py -q
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from ivmini.audio import BEATS_PRESETS, BEATs, BEATsBlock, BEATsConfig, WeightNormConv1d, relative_position_bucket
from ivmini.checkpoint import load_official

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "beats_tiny.pt")
D64 = torch.float64


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN, weights_only=True)


def test_golden_official_output(golden, cpu_backend):
    model = load_official("beats", golden["model"], **golden["cfg"])
    assert not model.training
    with torch.no_grad():
        out = model(golden["fbank"])
    assert out.shape == golden["out"].shape == (2, (100 // 16) * 4, 32)
    torch.testing.assert_close(out, golden["out"], atol=1e-5, rtol=1e-5)


def test_file_and_key_variants(golden, tmp_path):
    """A {'cfg', 'model'} file; the parametrizations weight-norm names; only layer 0's relative table."""
    path = tmp_path / "beats.pt"
    torch.save({"cfg": golden["cfg"], "model": golden["model"]}, path)
    sd = dict(golden["model"])
    sd["encoder.pos_conv.0.parametrizations.weight.original0"] = sd.pop("encoder.pos_conv.0.weight_g")
    sd["encoder.pos_conv.0.parametrizations.weight.original1"] = sd.pop("encoder.pos_conv.0.weight_v")
    del sd["encoder.layers.1.self_attn.relative_attention_bias.weight"]
    for model in (load_official("beats", str(path)), load_official("beats", sd, **golden["cfg"])):
        with torch.no_grad():
            torch.testing.assert_close(model(golden["fbank"]), golden["out"], atol=1e-5, rtol=1e-5)
    sd = dict(golden["model"])
    sd["encoder.layers.1.self_attn.relative_attention_bias.weight"] = torch.randn_like(
        sd["encoder.layers.1.self_attn.relative_attention_bias.weight"])
    with pytest.raises(ValueError, match="encoder.layers.1.self_attn.relative_attention_bias.weight differs"):
        load_official("beats", sd, **golden["cfg"])


def bucket_by_hand(offset, num_buckets, max_distance):
    half = num_buckets // 2
    exact = half // 2
    base = half if offset > 0 else 0
    d = abs(offset)
    if d < exact:
        return base + d
    return base + min(half - 1, exact + int(math.log(d / exact) / math.log(max_distance / exact) * (half - exact)))


@pytest.mark.parametrize("num_buckets,max_distance", [(320, 800), (320, 1280), (32, 20), (64, 256)])
def test_relative_position_buckets(num_buckets, max_distance):
    offsets = torch.arange(-300, 301)
    got = relative_position_bucket(offsets, num_buckets, max_distance).tolist()
    want = [bucket_by_hand(o, num_buckets, max_distance) for o in offsets.tolist()]
    assert got == want
    assert min(got) >= 0 and max(got) < num_buckets


def test_weight_norm_matches_torch(seed):
    C, K, groups = 12, 6, 3
    ours = WeightNormConv1d(C, K, groups)
    with torch.no_grad():
        ours.weight_g.copy_(torch.rand(1, 1, K) + 0.5)
        ours.bias.copy_(torch.randn(C))
    conv = torch.nn.Conv1d(C, C, K, padding=K // 2, groups=groups)
    conv = torch.nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
    with torch.no_grad():
        conv.parametrizations.weight.original0.copy_(ours.weight_g)
        conv.parametrizations.weight.original1.copy_(ours.weight_v)
        conv.bias.copy_(ours.bias)
    v, g = ours.weight_v.detach().double(), ours.weight_g.detach().double()
    by_hand = torch.stack([g[0, 0, t] * v[:, :, t] / v[:, :, t].pow(2).sum().sqrt() for t in range(K)], dim=-1)
    torch.testing.assert_close(ours.weight().double(), by_hand)
    torch.testing.assert_close(ours.weight(), conv.weight)
    x = torch.randn(2, C, 9)
    torch.testing.assert_close(ours(x), conv(x))


def layer_by_hand(block, x, alpha, bias=None):
    """The official post-LN layer in float64, with the official attention form: q * hd^-1/2 / 32,
    (q k^T - rowmax) * 32 + bias, softmax."""
    p = {k: v.detach().double() for k, v in block.state_dict().items()}
    B, N, C = x.shape
    H = block.attn.num_heads
    hd = C // H
    q, k, v = (x @ p["attn.qkv.weight"].T + p["attn.qkv.bias"]).split(C, dim=-1)
    heads = lambda t: t.view(B, N, H, hd).transpose(1, 2)   # noqa: E731  (B, H, N, hd)
    q_raw, k, v = heads(q), heads(k), heads(v)
    s = (q_raw * hd ** -0.5 / 32) @ k.transpose(-1, -2)
    s = (s - s.amax(-1, keepdim=True)) * 32
    if bias is not None:
        s = s + bias(q_raw)
    a = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C) @ p["attn.proj.weight"].T + p["attn.proj.bias"]
    ln = lambda t, n: F.layer_norm(t, (C,), p[f"{n}.weight"], p[f"{n}.bias"], 1e-5)   # noqa: E731
    x = ln(alpha * x + a, "norm1")
    h = F.gelu(x @ p["mlp.fc1.weight"].T + p["mlp.fc1.bias"]) @ p["mlp.fc2.weight"].T + p["mlp.fc2.bias"]
    return ln(alpha * x + h, "norm2")


def randomise(module):
    with torch.no_grad():
        for prm in module.parameters():
            prm.copy_(torch.randn_like(prm) * 0.3)


def test_deep_norm_residual(seed):
    L = 3
    cfg = BEATsConfig(encoder_embed_dim=24, encoder_ffn_embed_dim=40, encoder_attention_heads=3,
                      encoder_layers=L, deep_norm=True, gru_rel_pos=False)
    alpha = (2 * L) ** 0.25
    block = BEATsBlock(cfg, alpha).eval()
    randomise(block)
    assert block.residual_scale == alpha
    x = torch.randn(2, 7, 24)
    torch.testing.assert_close(block(x).double(), layer_by_hand(block, x.double(), alpha), atol=1e-5, rtol=1e-5)


def test_gated_relative_bias(seed):
    cfg = BEATsConfig(input_patch_size=16, encoder_embed_dim=24, encoder_ffn_embed_dim=40, encoder_attention_heads=3,
                      encoder_layers=2, embed_dim=24, deep_norm=True, relative_position_embedding=True,
                      gru_rel_pos=True, num_buckets=16, max_distance=12, conv_pos=4, conv_pos_groups=4)
    model = BEATs(cfg).eval()
    randomise(model)
    block, N, H = model.encoder.layers[1], 11, 3
    table = model.encoder.relative_attention_bias.weight.detach().double()      # (buckets, H)
    W, b = block.grep_linear.weight.detach().double(), block.grep_linear.bias.detach().double()
    grep_a = block.grep_a.detach().double().view(H)

    def bias_by_hand(q):                                      # q (B, H, N, hd)
        out = torch.empty(q.shape[0], H, N, N, dtype=D64)
        for bb in range(q.shape[0]):
            for h in range(H):
                for i in range(N):
                    lin = q[bb, h, i] @ W.T + b                # (8,)
                    ga, gb = torch.sigmoid(lin[:4].sum()), torch.sigmoid(lin[4:].sum())
                    gate = ga * (gb * grep_a[h] - 1) + 2
                    for j in range(N):
                        out[bb, h, i, j] = gate * table[bucket_by_hand(j - i, 16, 12), h]
        return out

    pos_bias = model.encoder.position_bias(N, "cpu")
    q = torch.randn(2, H, N, 8)
    torch.testing.assert_close(block.gated_bias(q, pos_bias).double(), bias_by_hand(q.double()), atol=1e-6, rtol=1e-6)
    x = torch.randn(2, N, 24)
    alpha = (2 * 2) ** 0.25
    torch.testing.assert_close(block(x, pos_bias).double(), layer_by_hand(block, x.double(), alpha, bias_by_hand),
                               atol=1e-5, rtol=1e-5)


def test_tiny_preset_shapes_gradients_padding(seed):
    model = BEATs(BEATS_PRESETS["tiny"])
    fbank = torch.randn(2, 998, 64)
    out = model(fbank)
    assert out.shape == (2, (998 // 16) * 4, 192)
    out.square().mean().backward()
    for name, prm in model.named_parameters():
        assert prm.grad is not None and torch.isfinite(prm.grad).all() and prm.grad.abs().sum() > 0, name
    model.eval()
    T = 100
    pad = torch.zeros(2, T, dtype=torch.bool)
    pad[1, 64:] = True                          # clip 1: time patches 4, 5 (and the 4 dropped frames) padded
    fb = torch.randn(2, T, 64)
    fb2 = fb.clone()
    fb2[1, 64:] = torch.randn(T - 64, 64) * 5
    with torch.no_grad():
        a, b = model(fb, pad), model(fb2, pad)
        torch.testing.assert_close(model(fb, torch.zeros_like(pad)), model(fb))
    torch.testing.assert_close(a[:, :16], b[:, :16])          # padded frames do not reach the kept tokens
    torch.testing.assert_close(a[0], b[0])


def test_bad_inputs(golden):
    model = load_official("beats", golden["model"], **golden["cfg"])
    with pytest.raises(ValueError, match="64 mel bins"):
        model(torch.randn(1, 100, 128))
    with pytest.raises(ValueError, match="at least 16 fbank frames"):
        model(torch.randn(1, 15, 64))
    with pytest.raises(TypeError, match="encoder_layer"):
        load_official("beats", golden["model"], **golden["cfg"], encoder_layer=3)
    with pytest.raises(KeyError, match="unexpected keys.*grep_linear"):
        load_official("beats", golden["model"], **{**golden["cfg"], "gru_rel_pos": False})
    with pytest.raises(KeyError, match=r"missing keys.*encoder\.layers\.2\."):
        load_official("beats", golden["model"], **{**golden["cfg"], "encoder_layers": 3})
    with pytest.raises(KeyError, match="shape mismatches.*patch_embedding"):
        load_official("beats", golden["model"], **{**golden["cfg"], "embed_dim": 24})
    model.train()
    model.cfg.attention_dropout = 0.1
    with pytest.raises(ValueError, match="attention_dropout"):
        model(torch.randn(1, 32, 64))
