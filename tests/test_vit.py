"""The video encoder: sizes, position tables, masked forward, image mode, init, meta construction."""
import math

import numpy as np
import pytest
import torch

from ivmini.config import VisionConfig, vision_config
from ivmini.vit import VideoViT, count_params, get_3d_sincos_pos_embed, interpolate_pos_embed

SMALL = dict(img_size=42, patch_size=14, embed_dim=32, depth=3, num_heads=4, mlp_ratio=2.0, attn_pool_num_heads=2,
             clip_embed_dim=24, num_frames=4, init_values=0.1, drop_path_rate=0.0, clip_teacher_embed_dim=20,
             clip_teacher_final_dim=16, clip_return_layer=2, mae_teacher_embed_dim=12, mae_return_layer=2)


def small(**kw):
    return VisionConfig(**dict(SMALL, **kw))


def random_mask(B, T, per_frame, keep):
    mask = torch.ones(B, 1 + T * per_frame, dtype=torch.bool)
    mask[:, 0] = False
    for b in range(B):
        for t in range(T):
            mask[b, 1 + t * per_frame + torch.randperm(per_frame)[:keep]] = False
    return mask


# ---------------------------------------------------------------------------------------------
# sizes (official parameter counts from the dumped official models, facts §1.2)

@pytest.mark.parametrize("preset,millions", [("S", 23.35), ("B", 89.75), ("L", 309.24), ("1B", 1021.02)])
def test_finetune_parameter_counts_match_official(preset, millions):
    with torch.device("meta"):
        m = VideoViT(vision_config(preset, heads="classify", num_classes=400))  # 8 frames
    assert round(count_params(m) / 1e6, 2) == millions


def test_6b_builds_on_meta_without_memory():
    with torch.device("meta"):
        m = VideoViT(vision_config("6B", heads="distill", clip_return_layer=6, mae_return_layer=4))
    assert all(p.is_meta for p in m.parameters())
    assert round(count_params(m.blocks[0]) / 1e6, 2) == 122.92 and len(m.blocks) == 48
    assert m.blocks[0].mlp.fc1.weight.shape == (12800, 3200) and m.blocks[0].attn.qkv.weight.shape == (9600, 3200)
    assert m.cfg.mlp_hidden == 12800 and vision_config("1B").mlp_hidden == 6144


def test_return_indices_follow_official_rule():
    cfg = vision_config("1B", clip_return_layer=6, mae_return_layer=4)
    assert cfg.clip_return_index == [34, 35, 36, 37, 38, 39] and cfg.mae_return_index == [36, 37, 38, 39]
    cfg = vision_config("1B", clip_return_layer=6, clip_student_return_interval=3.34)
    assert cfg.clip_return_index == [23, 26, 29, 33, 36, 39]


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="num_heads=5 must divide embed_dim=32"):
        small(num_heads=5)
    with pytest.raises(ValueError, match="mlp_act"):
        small(mlp_act="relu")
    with pytest.raises(TypeError, match="unknown VisionConfig field"):
        vision_config("tiny", width=3)
    with pytest.raises(KeyError, match="unknown vision preset"):
        vision_config("XL")


# ---------------------------------------------------------------------------------------------
# position tables

def sincos_independent(dim, g, t):
    """Element by element from the written rule (float64)."""
    out = np.zeros((1 + t * g * g, dim))
    dt, ds = dim // 4, dim // 4 * 3

    def enc(pos, width, c):  # channel c of a width-wide 1D table: sin for the first half, cos for the second
        half = width // 2
        w = 1.0 / 10000 ** ((c % half) / half)
        return math.sin(pos * w) if c < half else math.cos(pos * w)

    for ti in range(t):
        for r in range(g):
            for col in range(g):
                row = out[1 + ti * g * g + r * g + col]
                for c in range(dt):
                    row[c] = enc(ti, dt, c)
                for c in range(ds // 2):
                    row[dt + c] = enc(col, ds // 2, c)           # first spatial half: column index
                    row[dt + ds // 2 + c] = enc(r, ds // 2, c)   # second: row index
    return torch.from_numpy(out)


@pytest.mark.parametrize("dim,g,t", [(32, 2, 4), (48, 3, 2), (1408, 4, 1)])
def test_sincos_matches_independent_formula(dim, g, t):
    got = get_3d_sincos_pos_embed(dim, g, t, cls_token=True)
    assert got.shape == (1 + t * g * g, dim) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), sincos_independent(dim, g, t), rtol=0, atol=2e-6)
    assert torch.equal(get_3d_sincos_pos_embed(dim, g, t), got[1:])


def test_interpolation_identity_cls_and_linear_time():
    C, g = 8, 3
    pe = torch.randn(1, 1 + 4 * g * g, C)
    assert torch.equal(interpolate_pos_embed(pe, 4, g, 4, g), pe)
    # a table linear in time: linear interpolation (align_corners=False) reproduces the line at the
    # clamped source positions (i + 0.5) * T0 / T1 - 0.5
    a, b = torch.randn(g * g, C), torch.randn(g * g, C)
    lin = torch.cat([pe[:, :1], torch.stack([a * t + b for t in range(4)]).reshape(1, -1, C)], dim=1)
    up = interpolate_pos_embed(lin, 4, g, 8, g)
    assert torch.equal(up[:, :1], pe[:, :1])
    for i in range(8):
        src = min(max((i + 0.5) * 4 / 8 - 0.5, 0.0), 3.0)
        torch.testing.assert_close(up[0, 1 + i * g * g: 1 + (i + 1) * g * g], a * src + b)
    # round trip 4 -> 8 -> 4 recovers the interior frames of a linear table exactly
    back = interpolate_pos_embed(up, 8, g, 4, g)
    torch.testing.assert_close(back[:, 1 + g * g: 1 + 3 * g * g], lin[:, 1 + g * g: 1 + 3 * g * g])
    # bicubic resize keeps a table that is constant in space constant
    const = torch.randn(1, 1, C).expand(1, 1 + 2 * g * g, C).contiguous()
    torch.testing.assert_close(interpolate_pos_embed(const, 2, g, 2, 5), const[:, :1].expand(1, 1 + 2 * 25, C))
    no_cls = interpolate_pos_embed(pe[:, 1:], 4, g, 2, 2, cls_token=False)
    assert no_cls.shape == (1, 2 * 4, C)
    with pytest.raises(ValueError, match="is not"):
        interpolate_pos_embed(pe, 3, g, 4, g)


# ---------------------------------------------------------------------------------------------
# forward

def test_distill_forward_shapes_and_unit_norm(seed):
    cfg = small(heads="distill")
    m = VideoViT(cfg).eval()
    mask = random_mask(2, 4, 9, 3)
    out = m(torch.randn(2, 3, 4, 42, 42), mask)
    nvis = 4 * 3
    assert out.tokens.shape == (2, 1 + nvis, 32) and out.pooled.shape == (2, 24)
    assert out.clip_align.shape == (2, 2, 1 + nvis, 20) and out.final_align.shape == (2, 16)
    assert out.mae_align.shape == (2, 2, nvis, 12)
    for t in (out.clip_align, out.final_align, out.mae_align):
        torch.testing.assert_close(t.norm(dim=-1), torch.ones(t.shape[:-1]))


def test_masked_forward_matches_slow_per_sample(seed):
    """The batched masked path (kernels.masked_gather, gathered decoder pos embeds) against one
    sample at a time with boolean indexing, as the official code does it."""
    cfg = small(heads="distill")
    m = VideoViT(cfg).eval()
    for p in m.parameters():  # random values everywhere, so every table and bias matters
        p.data.normal_(0, 0.3)
    video, mask = torch.randn(3, 3, 4, 42, 42), random_mask(3, 4, 9, 4)
    out = m(video, mask)
    for b in range(3):
        x = m.patch_embed(video[b:b + 1])
        x = torch.cat([m.cls_token, x], dim=1) + m.pos_embed
        x = x[:, ~mask[b]]
        feats = []
        for blk in m.blocks:
            x = blk(x)
            feats.append(x)
        torch.testing.assert_close(out.tokens[b:b + 1], x, rtol=1e-4, atol=1e-4)
        pooled = m.clip_projector(x)
        torch.testing.assert_close(out.pooled[b:b + 1], pooled, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out.final_align[b:b + 1], m.final_clip_decoder(pooled), rtol=1e-4, atol=1e-4)
        cpos = m.clip_pos_embed[:, ~mask[b]]
        mpos = m.mae_pos_embed[:, ~mask[b, 1:]]
        for k, layer in enumerate(cfg.clip_return_index):
            torch.testing.assert_close(out.clip_align[k, b:b + 1], m.clip_decoder[k](feats[layer] + cpos),
                                       rtol=1e-4, atol=1e-4)
        for k, layer in enumerate(cfg.mae_return_index):
            torch.testing.assert_close(out.mae_align[k, b:b + 1], m.mae_decoder[k](feats[layer][:, 1:] + mpos),
                                       rtol=1e-4, atol=1e-4)
    # visible_idx is the same as passing the mask
    idx = out.visible_idx
    again = m(video, visible_idx=idx)
    assert torch.equal(again.mae_align, out.mae_align)


def test_image_mode_and_return_idx(seed):
    for sep in (False, True):
        m = VideoViT(small(heads="align", sep_image_video_pos_embed=sep)).eval()
        for p in m.parameters():
            p.data.normal_(0, 0.3)
        img = torch.randn(2, 3, 1, 42, 42)
        out = m(img, image=True)
        assert out.tokens.shape == (2, 10, 32) and out.clip_align.shape == (2, 2, 10, 20)
        pos = m.img_pos_embed if sep else torch.cat([m.pos_embed[:, :1], m.pos_embed[:, 1:].view(1, 4, 9, 32).mean(1)], 1)
        x = torch.cat([m.cls_token.expand(2, -1, -1), m.patch_embed(img)], 1) + pos
        for blk in m.blocks:
            x = blk(x)
        torch.testing.assert_close(out.tokens, x)
    video = torch.randn(2, 3, 4, 42, 42)
    full = m(video)
    pen = m(video, return_idx=-2)
    assert pen.pooled is None and pen.clip_align is None
    x = full.tokens
    assert not torch.allclose(pen.tokens, x)
    torch.testing.assert_close(m.blocks[-1](pen.tokens), x)


def test_classify_head_and_clip_vision(seed):
    m = VideoViT(small(heads="classify", num_classes=7)).eval()
    out = m(torch.randn(2, 3, 4, 42, 42))
    assert out.logits.shape == (2, 7) and out.pooled.shape == (2, 24)
    torch.testing.assert_close(out.logits, m.head(m.fc_norm(out.pooled)))
    m = VideoViT(small(heads="none")).eval()
    assert m(torch.randn(1, 3, 4, 42, 42)).clip_align is None
    assert not any(n.startswith(("clip_decoder", "mae", "head", "fc_norm")) for n in m.state_dict())


def test_input_errors_name_the_problem():
    m = VideoViT(small(heads="distill")).eval()
    with pytest.raises(ValueError, match=r"video must be \(B, 3, 4, 42, 42\)"):
        m(torch.randn(1, 3, 8, 42, 42))
    with pytest.raises(ValueError, match="mask must be bool"):
        m(torch.randn(1, 3, 4, 42, 42), torch.zeros(1, 36, dtype=torch.bool))
    bad = random_mask(2, 4, 9, 3)
    bad[1, 0] = True
    with pytest.raises(ValueError, match="same number of visible tokens"):
        m(torch.randn(2, 3, 4, 42, 42), bad)
    with pytest.raises(ValueError, match="return_idx"):
        m(torch.randn(1, 3, 4, 42, 42), return_idx=-4)


# ---------------------------------------------------------------------------------------------
# initialisation, meta construction, training-mode features

def test_official_initialisation(seed):
    cfg = small(heads="classify", num_classes=400, embed_dim=64, num_heads=4, depth=4, init_values=1e-5)
    m = VideoViT(cfg)
    table = get_3d_sincos_pos_embed(64, 3, 4, cls_token=True)
    assert torch.equal(m.pos_embed[0], table)
    assert all(torch.all(b.ls1.gamma == 1e-5) for b in m.blocks)
    assert all(torch.all(b.norm1.weight == 1) and torch.all(b.attn.q_norm.weight == 1) for b in m.blocks)
    pool = m.clip_projector.cross_attn
    assert torch.all(pool.q_bias == 0) and torch.all(m.clip_projector.norm1_k.weight == 1)
    assert all(torch.all(b.mlp.fc1.bias == 0) for b in m.blocks)
    # residual-branch outputs are scaled by 1/sqrt(2 * layer): the std falls with depth
    stds = [b.mlp.fc2.weight.std().item() * math.sqrt(2 * (i + 1)) for i, b in enumerate(m.blocks)]
    assert all(abs(s - 0.02) < 0.002 for s in stds), stds
    assert abs(m.head.weight.std().item() - 0.02 * 0.001) < 0.2 * 0.02 * 0.001
    assert abs(m.blocks[0].attn.qkv.weight.std().item() - 0.02) < 0.002


def test_meta_construction_then_init(seed):
    cfg = small(heads="distill")
    with torch.device("meta"):
        m = VideoViT(cfg)
    m.to_empty(device="cpu")
    m.init_weights()
    assert torch.equal(m.mae_pos_embed[0], get_3d_sincos_pos_embed(32, 3, 4))
    out = m.eval()(torch.randn(1, 3, 4, 42, 42), random_mask(1, 4, 9, 2))
    assert torch.isfinite(out.mae_align).all()


def test_drop_path(seed):
    # drop rates 0, 0.25, 0.5 over the 3 blocks: two passes drop a sample's blocks alike with p = 0.3125, all 32
    # samples alike with p = 0.3125^32 ~ 1e-16 (with 2 samples, 1 run in 10 failed)
    video = torch.randn(32, 3, 4, 42, 42)
    m = VideoViT(small(heads="none", drop_path_rate=0.5, init_values=1.0)).train()
    a, b = m(video).pooled, m(video).pooled
    assert not torch.allclose(a, b)          # stochastic depth in training
    m.eval()
    assert torch.equal(m(video).pooled, m(video).pooled)


def test_pool_attention_weights_equal_the_unfused_softmax(seed):
    import torch.nn.functional as F
    from ivmini.layers import AttentionPool
    pool = AttentionPool(48, 4, 16)
    for p in pool.parameters():
        p.data.normal_(0, 0.3)
    x = torch.randn(3, 11, 48)
    a = pool.cross_attn
    q = F.linear(pool.norm1_q(x.mean(1, keepdim=True)), a.q.weight, a.q_bias).view(3, 1, 4, 12).transpose(1, 2)
    k = F.linear(pool.norm1_k(x), a.k.weight, a.k_bias).view(3, 11, 4, 12).transpose(1, 2)
    want = (q @ k.transpose(-1, -2) / 12 ** 0.5).softmax(-1).mean(1).squeeze(1)       # (B, N)
    torch.testing.assert_close(pool.attention_weights(x), want, rtol=1e-5, atol=1e-6)


def test_return_layers(seed):
    m = VideoViT(small(heads="none")).eval()
    video = torch.randn(2, 3, 4, 42, 42)
    out = m(video, return_layers=(0, 2), pool=False)
    assert out.pooled is None and len(out.layers) == 2
    x = m(video, return_idx=-3).tokens
    torch.testing.assert_close(out.layers[0], x)
    torch.testing.assert_close(out.layers[1], out.tokens)
