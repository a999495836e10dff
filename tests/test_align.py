"""The stage-2 model (ivmini/align.py) and its checkpoints (ivmini/checkpoint/stage2.py): losses and gradients,
temp clamp, masks, the official stage-2 key layout round trip, export of a stage-2 run, init from stage 1."""
import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ivmini.align import AlignConfig, VideoTextModel, stage2_visible_idx
from ivmini.checkpoint import (init_vision_from_stage1, load_official, stage2_kwargs, stage2_to_official)
from ivmini.config import vision_config
from ivmini.text import BertConfig
from ivmini.vit import VideoViT, get_3d_sincos_pos_embed, interpolate_pos_embed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VISION = dict(img_size=28, embed_dim=32, depth=2, num_heads=2, attn_pool_num_heads=2, clip_embed_dim=24,
              clip_teacher_embed_dim=16, clip_teacher_final_dim=8, clip_return_layer=1, drop_path_rate=0.0)
TEXT = dict(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=16, hidden_dropout_prob=0.0, fusion_layer=2, encoder_width=32)


def config(**kw):
    vision = vision_config("tiny", heads="align", num_frames=2, sep_image_video_pos_embed=True, **VISION)
    return AlignConfig(vision=vision, bert=BertConfig(**TEXT), embed_dim=8, cls_token_id=1, mask_token_id=3, **kw)


def batch(B=3, T=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(B, 3, T, 28, 28, generator=g)
    ids = torch.randint(4, 50, (B, 7), generator=g)
    ids[:, 0] = 1
    atts = torch.ones(B, 7, dtype=torch.long)
    atts[0, 5:] = 0
    ids[0, 5:] = 0
    return video, ids, atts


def test_losses_are_finite_and_reach_every_trained_parameter():
    torch.manual_seed(0)
    model = VideoTextModel(config())
    total = 0
    for T, seed in ((2, 0), (1, 1)):                 # a video batch and an image batch (img_pos_embed)
        video, ids, atts = batch(T=T, seed=seed)
        image = T == 1
        mask = stage2_visible_idx(model.cfg, 3, image, [5, 6, 7])
        assert mask.shape == (3, 1 + (4 - int(0.5 * 4) if image else 8 - int(0.8 * 8)))
        out = model.losses(video, ids, atts, torch.tensor([0, 1, 0]), mask=mask)
        assert set(out) >= {"vtc", "vtm", "mlm", "loss"}
        assert all(torch.isfinite(out[k]) for k in ("vtc", "vtm", "mlm"))
        assert torch.allclose(out["loss"], out["vtc"] + out["vtm"] + out["mlm"])
        total = total + out["loss"]
    total.backward()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    lacking = sorted(n for n, p in model.named_parameters() if n in trained and (p.grad is None or not p.grad.any()))
    assert not lacking
    frozen = sorted({n.split(".")[1] for n, p in model.named_parameters() if not p.requires_grad})
    assert frozen == ["clip_decoder", "clip_img_pos_embed", "clip_pos_embed", "final_clip_decoder"]
    assert "temp" in model.no_weight_decay()


def test_loss_weights_multiply_and_zero_weights_skip():
    video, ids, atts = batch()
    fixed = dict(vtm_negatives=(torch.tensor([1, 2, 0]), torch.tensor([2, 0, 1])),
                 mlm_inputs=(ids.masked_fill(torch.rand(ids.shape) < 0.3, 3), ids))
    torch.manual_seed(0)
    one = VideoTextModel(config()).eval()
    torch.manual_seed(0)
    other = VideoTextModel(config(loss_vtc=2.0, loss_vtm=0.0, loss_mlm=0.5)).eval()
    a = one.losses(video, ids, atts, None, **fixed)
    b = other.losses(video, ids, atts, None, **fixed)
    assert torch.allclose(b["vtc"], 2 * a["vtc"]) and b["vtm"] == 0 and torch.allclose(b["mlm"], 0.5 * a["mlm"])


def test_temp_is_clamped_before_every_forward():
    model = VideoTextModel(config()).eval()
    video, ids, atts = batch()
    for start, want in ((1.0, 0.5), (1e-5, 0.001), (0.2, 0.2)):
        with torch.no_grad():
            model.temp.fill_(start)
        out = model.losses(video, ids, atts, None)
        assert model.temp.item() == pytest.approx(want) and out["temp"].item() == pytest.approx(want)


def test_bool_mask_equals_visible_indices():
    model = VideoTextModel(config()).eval()
    video, ids, atts = batch()
    visible = stage2_visible_idx(model.cfg, 3, False, [1, 2, 3])
    mask = torch.ones(3, 9, dtype=torch.bool).scatter_(1, visible, False)
    fixed = dict(vtm_negatives=(torch.tensor([1, 2, 0]), torch.tensor([2, 0, 1])), mlm_inputs=(ids, ids))
    a = model.losses(video, ids, atts, None, mask=mask, **fixed)
    b = model.losses(video, ids, atts, None, mask=visible, **fixed)
    c = model.losses(video, ids, atts, None, **fixed)
    assert all(torch.equal(a[k], b[k]) for k in ("vtc", "vtm", "mlm"))
    assert not torch.equal(a["vtc"], c["vtc"])


def test_config_round_trips_through_json_and_names_bad_fields():
    cfg = config()
    assert AlignConfig(**json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg
    with pytest.raises(ValueError, match="encoder_width=16 must equal the vision width"):
        AlignConfig(vision=cfg.vision, bert=BertConfig(**dict(TEXT, encoder_width=16)))
    with pytest.raises(ValueError, match="fusion_layer"):
        AlignConfig(vision=cfg.vision, bert=BertConfig(**dict(TEXT, fusion_layer=3)))
    with pytest.raises(ValueError, match="heads"):
        AlignConfig(vision=dataclasses.replace(cfg.vision, heads="none"), bert=cfg.bert)


def official_layout(model):
    return stage2_to_official({k: v.detach().clone() for k, v in model.state_dict().items()})


def test_official_stage2_layout_round_trips_through_load_official():
    torch.manual_seed(0)
    model = VideoTextModel(config()).eval()
    with torch.no_grad():
        model.temp.fill_(0.123)
    sd = official_layout(model)
    assert sd["temp"].shape == ()
    for key in ("vision_encoder.clip_decoder.0.head.weight", "vision_encoder.final_clip_decoder.head.weight",
                "vision_encoder.clip_pos_embed", "vision_encoder.clip_img_pos_embed", "vision_encoder.img_pos_embed",
                "text_encoder.bert.embeddings.word_embeddings.weight",
                "text_encoder.bert.encoder.layer.2.crossattention.self.key.weight",
                "text_encoder.bert.encoder.layer.0.attention.self.query.weight",
                "text_encoder.cls.predictions.bias", "text_encoder.cls.predictions.decoder.weight",
                "text_encoder.cls.predictions.transform.LayerNorm.weight", "vision_proj.weight", "text_proj.bias",
                "itm_head.weight"):
        assert key in sd, key
    assert not any("crossattention" in k for k in sd if ".layer.1." in k)
    kw = stage2_kwargs(model.cfg)
    kw = json.loads(json.dumps(kw))                    # what the exported .json holds
    loaded = load_official("stage2", {"module": sd}, **kw)
    assert loaded.cfg == model.cfg and loaded.temp.item() == pytest.approx(0.123)
    mlm = loaded.text_encoder
    assert mlm.cls.decoder.weight is mlm.bert.embeddings.word_embeddings.weight     # still tied
    video, ids, atts = batch()
    fixed = dict(vtm_negatives=(torch.tensor([2, 0, 1]), torch.tensor([1, 2, 0])),
                 mlm_inputs=mask_inputs(ids))
    for T in (2, 1):
        a = model.losses(video[:, :, :T], ids, atts, torch.tensor([0, 1, 2]), **fixed)
        b = loaded.losses(video[:, :, :T], ids, atts, torch.tensor([0, 1, 2]), **fixed)
        assert all(torch.equal(a[k], b[k]) for k in ("vtc", "vtm", "mlm"))
    bad = dict(sd, **{"text_encoder.bert.encoder.layer.9.output.dense.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="layer.9"):
        load_official("stage2", bad, **kw)
    with pytest.raises(KeyError, match="missing keys.*itm_head.weight"):
        load_official("stage2", {k: v for k, v in sd.items() if k != "itm_head.weight"}, **kw)


def mask_inputs(ids):
    from ivmini.losses import mask_tokens
    return mask_tokens(ids, 50, 3, 0, 1, generator=torch.Generator().manual_seed(0))


def test_init_vision_from_stage1_resizes_and_keeps_the_image_tables():
    torch.manual_seed(0)
    stage1 = VideoViT(vision_config("tiny", heads="distill", num_frames=4, mae_teacher_embed_dim=8, **VISION))
    sd = {k: v.detach().clone() for k, v in stage1.state_dict().items()}
    with torch.no_grad():                                  # a learned-looking table
        sd["pos_embed"] += 0.1 * torch.randn_like(sd["pos_embed"])
    model = VideoTextModel(config())
    kept = init_vision_from_stage1(model, sd)
    assert kept == ["clip_img_pos_embed", "img_pos_embed"]
    enc = model.vision_encoder
    assert torch.equal(enc.blocks[1].mlp.fc2.weight, sd["blocks.1.mlp.fc2.weight"])
    assert torch.equal(enc.clip_decoder[0].head.weight, sd["clip_decoder.0.head.weight"])
    assert torch.allclose(enc.pos_embed, interpolate_pos_embed(sd["pos_embed"], 4, 2, 2, 2))
    assert torch.equal(enc.img_pos_embed, get_3d_sincos_pos_embed(32, 2, 1, cls_token=True)[None])
    other = VideoViT(vision_config("tiny", heads="distill", num_frames=4, **dict(VISION, depth=3)))
    with pytest.raises(ValueError, match="unexpected keys.*blocks.2"):
        init_vision_from_stage1(model, other.state_dict())


EXPORT_SCRIPT = textwrap.dedent("""
    import dataclasses, sys, torch
    from ivmini import dist
    sys.path.insert(0, sys.argv[2])
    from test_align import config
    from ivmini.align import VideoTextModel
    dist.init()
    torch.manual_seed(0)
    model = VideoTextModel(config())
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, sys.argv[1] + "/ref.pt")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    dist.save_checkpoint(sys.argv[1] + "/checkpoints", 3, model, optimizer,
                         dict(run_id="test", model_config=dataclasses.asdict(model.cfg)))
    dist.shutdown()
""")


def test_export_of_a_stage2_run_loads_as_the_official_layout(tmp_path):
    script = tmp_path / "save.py"
    script.write_text(EXPORT_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",)}
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, str(script), str(tmp_path), os.path.join(ROOT, "tests")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    out = tmp_path / "s2.safetensors"
    run = subprocess.run([sys.executable, "-m", "ivmini.checkpoint", "export", str(tmp_path), str(out)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    meta = json.loads((tmp_path / "s2.json").read_text())
    assert meta["kind"] == "stage2" and meta["step"] == 3
    loaded = load_official("stage2", str(out), **meta["kwargs"])
    ref = torch.load(tmp_path / "ref.pt")
    got = loaded.state_dict()
    assert sorted(got) == sorted(ref) and all(torch.equal(got[k], ref[k]) for k in ref)


def test_text_feature_is_cls_or_the_mean_over_the_caption():
    """text_pool="cls" (official) feeds text_proj the [CLS] state; "mean" the mean over the unpadded tokens
    (padding changes neither); anything else is a named error."""
    torch.manual_seed(0)
    _, ids, atts = batch()
    cls_model = VideoTextModel(config()).eval()
    mean_model = VideoTextModel(config(text_pool="mean")).eval()
    mean_model.load_state_dict(cls_model.state_dict())
    tokens, cls = cls_model.encode_text(ids, atts)
    torch.testing.assert_close(cls, tokens[:, 0])
    _, mean = mean_model.encode_text(ids, atts)
    torch.testing.assert_close(mean[0], tokens[0, :5].mean(0))          # sample 0 has 5 real tokens
    torch.testing.assert_close(mean[1:], tokens[1:].mean(1))
    longer = torch.cat([ids, torch.zeros(3, 4, dtype=ids.dtype)], 1)
    _, padded = mean_model.encode_text(longer, torch.cat([atts, torch.zeros(3, 4, dtype=atts.dtype)], 1))
    torch.testing.assert_close(padded, mean, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="text_pool"):
        config(text_pool="max")
