"""Loading official checkpoints: key format, strictness, containers/prefixes/HF naming, resizing,
and numerical equality with the official classes.

tests/golden/official_tiny.pt holds outputs of the official InternVideo2 classes (single_modality
PretrainInternVideo2 / InternVideo2, multi_modality PretrainInternVideo2 / CLIP-vision
InternVideo2), run in fp32 on CPU with flash_attn's fused ops replaced by exact stand-ins ("plain":
use_flash_attn/fused_rmsnorm/fused_mlp False, exact GELU; "fused": the default True flags, i.e.
tanh-GELU MLP and the prenorm residual form), on the weights and inputs generated below.
"""
import argparse
import logging
import os

import pytest
import torch

from ivmini.checkpoint import load_official, official_config
from ivmini.vit import VideoViT, interpolate_pos_embed

GOLDEN = torch.load(os.path.join(os.path.dirname(__file__), "golden", "official_tiny.pt"), weights_only=True)

COMMON = dict(img_size=28, patch_size=14, embed_dim=32, depth=3, num_heads=4, mlp_ratio=2.0, attn_pool_num_heads=2,
              clip_embed_dim=24, num_frames=4, tubelet_size=1, init_values=0.1, drop_path_rate=0.0, qkv_bias=False,
              qk_normalization=True)
CLIP = dict(clip_teacher_embed_dim=20, clip_teacher_final_dim=16, clip_return_layer=2, clip_student_return_interval=1)
MAE = dict(mae_teacher_embed_dim=12, mae_return_layer=2, mae_student_return_interval=1)
FUSED_OFF = dict(use_flash_attn=False, use_fused_rmsnorm=False, use_fused_mlp=False)


def rand_sd(kind, kw, seed):
    """Random weights for every key of `kind`, generated in sorted key order from `seed`."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in VideoViT(official_config(kind, **kw)).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shapes[k], generator=g) * 0.3 for k in sorted(shapes)}


def inputs(seed, B=2, T=4, image=False):
    g = torch.Generator().manual_seed(seed + 1000)
    video = torch.randn(B, 3, 1 if image else T, 28, 28, generator=g)
    n = 4 if image else T * 4
    mask = torch.ones(B, 1 + n, dtype=torch.bool)
    mask[:, 0] = False
    for b in range(B):
        for t in range(n // 4):
            mask[b, 1 + 4 * t + torch.randperm(4, generator=g)[:2]] = False
    return video, mask


def close(a, b):
    """Equal to fp32 rounding: tighter than the difference between exact and tanh GELU."""
    assert a.shape == b.shape
    err, tol = (a - b).abs().max().item(), 2e-6 * max(1.0, b.abs().max().item())
    assert err <= tol, f"max abs error {err:.3g} > {tol:.3g}"


# ---------------------------------------------------------------------------------------------
# numerical equality with the official classes

@pytest.mark.parametrize("tag", ["plain", "fused"])
def test_stage1_pretrain_equals_official(tag, cpu_backend):
    kw = dict(COMMON, **CLIP, **MAE, **(FUSED_OFF if tag == "plain" else {}))
    video, mask = inputs(1)
    with torch.no_grad():
        out = load_official("stage1_pretrain", rand_sd("stage1_pretrain", kw, 1), **kw)(video, mask)
    want = GOLDEN[f"{tag}/stage1_pretrain"]
    close(out.clip_align, want["clip_align"])
    close(out.final_align, want["final_align"])
    close(out.mae_align, want["mae_align"])


@pytest.mark.parametrize("tag", ["plain", "fused"])
def test_finetune_and_clip_vision_equal_official(tag, cpu_backend):
    flags = FUSED_OFF if tag == "plain" else {}
    kw = dict(COMMON, num_classes=5, **flags)
    with torch.no_grad():
        close(load_official("finetune", rand_sd("finetune", kw, 2), **kw)(inputs(2)[0]).logits,
              GOLDEN[f"{tag}/finetune"]["logits"])
        kw = dict(COMMON, **flags)
        m = load_official("clip_vision", rand_sd("clip_vision", kw, 5), **kw)
        close(m(inputs(5)[0]).pooled, GOLDEN[f"{tag}/clip_vision"]["video"])
        close(m(inputs(6, image=True)[0], image=True).pooled, GOLDEN[f"{tag}/clip_vision"]["image"])


@pytest.mark.parametrize("tag", ["plain", "fused"])
@pytest.mark.parametrize("sep", [True, False])
def test_stage2_vision_equals_official(tag, sep, cpu_backend):
    kw = dict(COMMON, sep_image_video_pos_embed=sep, **CLIP, **(FUSED_OFF if tag == "plain" else {}))
    m = load_official("stage2_vision", rand_sd("stage2_vision", kw, 3), **kw)
    video, mask = inputs(3)
    image, _ = inputs(4, image=True)
    want = GOLDEN[f"{tag}/stage2_vision/sep{int(sep)}"]
    with torch.no_grad():
        for name, o in (("video", m(video)), ("masked", m(video, mask)), ("image", m(image, image=True))):
            close(o.tokens, want[name]["tokens"])
            close(o.pooled, want[name]["pooled"])
            close(o.clip_align, want[name]["clip_align"])
            close(o.final_align, want[name]["final_align"])
        close(m(video, return_idx=-2).tokens, want["penultimate"]["tokens"])


def test_activation_choice_matters():
    """The golden 'fused' outputs (tanh GELU) are not met with exact GELU, and vice versa."""
    kw = dict(COMMON, sep_image_video_pos_embed=True, **CLIP)
    sd = rand_sd("stage2_vision", kw, 3)
    video = inputs(3)[0]
    with torch.no_grad():
        exact = load_official("stage2_vision", sd, mlp_act="gelu", **kw)(video)
    close(exact.tokens, GOLDEN["plain/stage2_vision/sep1"]["video"]["tokens"])
    with pytest.raises(AssertionError, match="max abs error"):
        close(exact.tokens, GOLDEN["fused/stage2_vision/sep1"]["video"]["tokens"])
    with pytest.raises(AssertionError, match="max abs error"):
        close(exact.pooled, GOLDEN["fused/stage2_vision/sep1"]["video"]["pooled"])


def test_sincos_and_interpolation_equal_official():
    from ivmini.vit import get_3d_sincos_pos_embed
    for key, table in GOLDEN["sincos"].items():
        d, g, t = map(int, key.split("_"))
        torch.testing.assert_close(get_3d_sincos_pos_embed(d, g, t, cls_token=True), table, rtol=0, atol=1e-6)
    for key, pair in GOLDEN.items():
        if key.startswith("interp/"):
            t0, g0, t1, g1 = map(int, key[len("interp/"):].split("_"))
            torch.testing.assert_close(interpolate_pos_embed(pair["src"], t0, g0, t1, g1), pair["out"])


# ---------------------------------------------------------------------------------------------
# the key format, written independently from the official key list (facts §1.9)

def official_stage1_keys(depth, clip_k, mae_k):
    keys = ["cls_token", "pos_embed", "clip_pos_embed", "mae_pos_embed", "patch_embed.proj.weight",
            "patch_embed.proj.bias"]
    for i in range(depth):
        keys += [f"blocks.{i}.{n}" for n in ("norm1.weight", "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias",
                                             "attn.q_norm.weight", "attn.k_norm.weight", "ls1.gamma", "norm2.weight",
                                             "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
                                             "ls2.gamma")]
    keys += [f"clip_projector.norm1_{c}.{p}" for c in "qkv" for p in ("weight", "bias")]
    keys += [f"clip_projector.cross_attn.{c}_bias" for c in "qkv"]
    keys += [f"clip_projector.cross_attn.{c}.weight" for c in "qkv"]
    keys += ["clip_projector.cross_attn.proj.weight", "clip_projector.cross_attn.proj.bias"]
    keys += [f"clip_decoder.{k}.{n}" for k in range(clip_k) for n in ("head.weight", "head.bias", "norm.weight", "norm.bias")]
    keys += [f"final_clip_decoder.{n}" for n in ("head.weight", "head.bias", "norm.weight", "norm.bias")]
    keys += [f"mae_decoder.{k}.{n}" for k in range(mae_k)
             for n in ("head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias", "norm.weight", "norm.bias")]
    return keys


def test_model_keys_are_the_official_keys():
    kw = dict(COMMON, **CLIP, **MAE)
    assert sorted(rand_sd("stage1_pretrain", kw, 0)) == sorted(official_stage1_keys(3, 2, 2))
    sd = rand_sd("stage2_vision", dict(COMMON, sep_image_video_pos_embed=True, **CLIP), 0)
    assert {"img_pos_embed", "clip_img_pos_embed"} <= set(sd) and not any(k.startswith("mae") for k in sd)
    sd = rand_sd("finetune", dict(COMMON, num_classes=3), 0)
    assert {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"} <= set(sd)


def test_file_round_trip_pt_and_safetensors(tmp_path):
    from safetensors.torch import save_file
    kw = dict(COMMON, **CLIP, **MAE)
    sd = rand_sd("stage1_pretrain", kw, 9)
    torch.save({"module": sd, "epoch": 3}, tmp_path / "ds.pt")   # DeepSpeed layout
    save_file(sd, str(tmp_path / "w.safetensors"))
    for path in (tmp_path / "ds.pt", str(tmp_path / "w.safetensors")):
        m = load_official("stage1_pretrain", path, **kw)
        assert not m.training
        for k, v in m.state_dict().items():
            assert torch.equal(v, sd[k]), k


# ---------------------------------------------------------------------------------------------
# strictness and error messages

def test_missing_unexpected_and_misshaped_keys_are_named():
    kw = dict(COMMON, num_classes=5)
    sd = rand_sd("finetune", kw, 4)
    bad = dict(sd)
    bad["blocks.1.attn.qkvv.weight"] = bad.pop("blocks.1.attn.qkv.weight")
    with pytest.raises(KeyError, match=r"missing keys \(1\): blocks.1.attn.qkv.weight.*unexpected keys \(1\): "
                                       r"blocks.1.attn.qkvv.weight"):
        load_official("finetune", bad, **kw)
    bad = dict(sd, **{"head.weight": torch.zeros(400, 24), "head.bias": torch.zeros(400)})
    with pytest.raises(KeyError, match=r"head.weight: checkpoint \(400, 24\) vs model \(5, 24\)"):
        load_official("finetune", bad, **kw)
    # an explicit ignore list lets the caller drop keys; they keep the initialisation
    m = load_official("finetune", bad, ignore=["head.*"], **kw)
    assert torch.allclose(m.head.bias, torch.zeros(5))
    assert torch.equal(m.blocks[0].attn.qkv.weight, sd["blocks.0.attn.qkv.weight"])


def test_unknown_keyword_and_unsupported_options():
    sd = rand_sd("clip_vision", COMMON, 0)
    with pytest.raises(TypeError, match=r"unknown keyword\(s\) \['num_classes'\]"):
        load_official("clip_vision", sd, num_classes=3, **COMMON)
    with pytest.raises(TypeError, match="unknown keyword"):
        load_official("stage1_pretrain", sd, sep_image_video_pos_embed=True, **COMMON)
    with pytest.raises(ValueError, match="sep_pos_embed=True is not supported"):
        load_official("clip_vision", sd, sep_pos_embed=True, **COMMON)
    with pytest.raises(ValueError, match="unknown checkpoint kind"):
        load_official("stage3", sd)


def test_files_that_are_not_plain_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_official("clip_vision", tmp_path / "nope.pt", **COMMON)
    sd = rand_sd("clip_vision", COMMON, 0)
    torch.save({"model": sd, "args": argparse.Namespace(lr=1)}, tmp_path / "pickled.pt")
    with pytest.raises(RuntimeError, match="weights_only=True"):
        load_official("clip_vision", tmp_path / "pickled.pt", **COMMON)
    m = load_official("clip_vision", tmp_path / "pickled.pt", weights_only=False, **COMMON)
    assert torch.equal(m.cls_token, sd["cls_token"])


def test_prefixes_and_hf_layerscale_naming(caplog):
    kw = dict(COMMON, sep_image_video_pos_embed=True, **CLIP)
    sd = rand_sd("stage2_vision", kw, 6)
    full = {f"vision_encoder.{k}": v for k, v in sd.items()}
    full.update({"text_encoder.bert.embeddings.word_embeddings.weight": torch.zeros(3, 2), "temp": torch.tensor(0.07),
                 "vision_proj.weight": torch.zeros(2, 24)})
    with caplog.at_level(logging.INFO, logger="ivmini.checkpoint"):
        m = load_official("stage2_vision", full, **kw)
    assert torch.equal(m.pos_embed, sd["pos_embed"])
    assert "text_encoder.* " in caplog.text and "temp" in caplog.text
    with pytest.raises(KeyError, match="unexpected keys"):
        load_official("stage2_vision", full, prefix="", **kw)
    # HF chat naming: bare ls1/ls2, backbone only
    hf = {k.replace(".ls1.gamma", ".ls1").replace(".ls2.gamma", ".ls2"): v for k, v in sd.items()}
    assert "blocks.0.ls1" in hf
    m = load_official("stage2_vision", {"module": {f"module.{k}": v for k, v in hf.items()}}, **kw)
    assert torch.equal(m.blocks[2].ls2.gamma, sd["blocks.2.ls2.gamma"])
    # fine-tune loader convention: per-key backbone./encoder. prefixes
    ft = rand_sd("finetune", dict(COMMON, num_classes=5), 7)
    pref = {(f"backbone.{k}" if k.startswith("blocks") else k): v for k, v in ft.items()}
    m = load_official("finetune", pref, num_classes=5, **COMMON)
    assert torch.equal(m.blocks[0].mlp.fc1.weight, ft["blocks.0.mlp.fc1.weight"])


def test_position_tables_are_resized_on_load():
    kw4 = dict(COMMON, sep_image_video_pos_embed=True, **CLIP)        # 4 frames, grid 2
    sd = rand_sd("stage2_vision", kw4, 8)
    kw8 = dict(kw4, num_frames=8)
    m = load_official("stage2_vision", sd, **kw8)
    torch.testing.assert_close(m.pos_embed, interpolate_pos_embed(sd["pos_embed"], 4, 2, 8, 2))
    torch.testing.assert_close(m.clip_pos_embed, interpolate_pos_embed(sd["clip_pos_embed"], 4, 2, 8, 2))
    assert torch.equal(m.img_pos_embed, sd["img_pos_embed"])
    m = load_official("stage2_vision", sd, **dict(kw4, img_size=42))  # same frames, grid 2 -> 3
    torch.testing.assert_close(m.pos_embed, interpolate_pos_embed(sd["pos_embed"], 4, 2, 4, 3))
    torch.testing.assert_close(m.img_pos_embed, interpolate_pos_embed(sd["img_pos_embed"], 1, 2, 1, 3))
    with pytest.raises(ValueError, match="orig_t_size"):            # both differ: ambiguous
        load_official("stage2_vision", sd, **dict(kw4, img_size=42, num_frames=8))
    m = load_official("stage2_vision", sd, orig_t_size=4, **dict(kw4, img_size=42, num_frames=8))
    torch.testing.assert_close(m.pos_embed, interpolate_pos_embed(sd["pos_embed"], 4, 2, 8, 3))
