"""The audio-visual stage-2 model (ivmini/align_av.py): every loss against an independent float64 computation
(plain torch here, not ivmini.losses), the memories (audio before vision), zero weights, audio gradients and
freezing, silence, the official module names, config errors. Tiny sizes: the whole file runs in seconds."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import ivmini.align_av as align_av
from ivmini.align_av import LOSSES, AudioVisualConfig, AudioVisualModel
from ivmini.audio import BEATS_PRESETS
from ivmini.config import vision_config
from ivmini.data.audio import audio_features
from ivmini.text import BertConfig

W = 20                                                  # av_concat_dim = bert.encoder_width
VISION = dict(img_size=28, embed_dim=32, depth=2, num_heads=2, attn_pool_num_heads=2, clip_embed_dim=24,
              clip_teacher_embed_dim=16, clip_teacher_final_dim=8, clip_return_layer=1, drop_path_rate=0.0)
TEXT = dict(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=16, hidden_dropout_prob=0.0, fusion_layer=2, encoder_width=W)
AUDIO = dataclasses.replace(BEATS_PRESETS["tiny"], embed_dim=16, encoder_layers=2, encoder_embed_dim=12,
                            encoder_ffn_embed_dim=24, encoder_attention_heads=2, conv_pos=4, conv_pos_groups=2,
                            num_buckets=8, max_distance=16)
ALL_ON = {f"loss_{n}": w for n, w in zip(LOSSES, (1.0, 0.5, 2.0, 0.7, 1.3, 0.9, 1.1, 0.6, 1.7, 0.4))}
CAPTIONS = ("caption", "audio_caption", "av_caption")

# the official InternVideo2_Stage2_audiovisual.__init__ (models/internvideo2_stage2_audiovisual.py), read for
# its module names: vision_encoder, av_concat_vision_proj, text_encoder, [use_audio: audio_encoder, audio_proj,
# av_concat_audio_proj, (avtc or avtm: av_fusion), (atm: atm_head), (avtm: avtm_head)], vision_proj, text_proj,
# temp, itm_head (clip_teacher is None in stage 2; the criterion modules hold no parameters)
OFFICIAL_VISUAL = {"vision_encoder", "av_concat_vision_proj", "text_encoder", "vision_proj", "text_proj", "temp",
                   "itm_head"}
OFFICIAL_DEFAULT = OFFICIAL_VISUAL | {"audio_encoder", "audio_proj", "av_concat_audio_proj", "av_fusion", "avtm_head"}


def config(**kw):
    vision = vision_config("tiny", heads="align", num_frames=2, **VISION)
    return AudioVisualConfig(vision=vision, bert=BertConfig(**TEXT), audio=AUDIO, embed_dim=8, av_concat_dim=W,
                             cls_token_id=1, mask_token_id=3, **kw)


def batch(B=3, frames=40, seed=0):
    """video (B, 3, 2, 28, 28), fbank (B, frames, 64), one (ids, atts) per caption key, each different."""
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(B, 3, 2, 28, 28, generator=g)
    fbank = torch.randn(B, frames, 64, generator=g)
    texts = {}
    for i, key in enumerate(CAPTIONS):
        L = 6 + i
        ids = torch.randint(4, 50, (B, L), generator=g)
        ids[:, 0] = 1
        atts = torch.ones(B, L, dtype=torch.long)
        atts[0, L - 2:] = 0
        ids[0, L - 2:] = 0
        texts[key] = (ids, atts)
    return video, fbank, texts


def fixed_inputs(texts, cfg):
    """Fixed VTM negatives and MLM maskings per loss, so the model and the reference see the same draws."""
    negatives = {n: (torch.tensor([1, 2, 0]), torch.tensor([2, 0, 1])) for n in ("vtm", "atm", "avtm")}
    g = torch.Generator().manual_seed(1)
    mlm = {}
    for n in ("mlm", "amlm", "avmlm"):
        ids, _ = texts[cfg.loss_caption[n]]
        chosen = (torch.rand(ids.shape, generator=g) < 0.4) & (ids != 0)
        chosen[:, 1] = True                                             # at least one label per row
        mlm[n] = (ids.masked_fill(chosen, 3), ids.masked_fill(~chosen, -100))
    return negatives, mlm


def ref_contrastive(x, y, idx, temp):
    """(CE_soft(x->y) + CE_soft(y->x)) / 2 with cosine / temp logits and row-normalised same-id targets."""
    sim = F.normalize(x, dim=-1) @ F.normalize(y, dim=-1).T / temp
    same = (idx[:, None] == idx[None, :]).double()
    targets = same / same.sum(1, keepdim=True)
    return (-(sim.log_softmax(1) * targets).sum(1).mean() - (sim.T.log_softmax(1) * targets).sum(1).mean()) / 2


def ref_linear_ln(seq, x):
    """nn.Sequential(Linear, LayerNorm) written out."""
    lin, ln = seq
    return F.layer_norm(x @ lin.weight.T + lin.bias, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def ref_losses(model, video, fbank, texts, idx, negatives, mlm):
    """Every loss, weighted, from the towers' raw outputs with plain torch (float64 model)."""
    cfg, bert = model.cfg, model.text_encoder.bert
    raw = model.vision_encoder(video, image=False, pool=False).tokens             # (B, 1+N, Cv)
    Mv = ref_linear_ln(model.av_concat_vision_proj, raw)
    v = model.vision_encoder.clip_projector(raw) @ model.vision_proj.weight.T + model.vision_proj.bias
    tok = model.audio_encoder(fbank)                                               # (B, Na, A)
    Ma = ref_linear_ln(model.av_concat_audio_proj, tok)
    a = tok.mean(1) @ model.audio_proj.weight.T + model.audio_proj.bias
    av = torch.cat([a, v], 1) @ model.av_fusion.weight.T + model.av_fusion.bias
    media = {"v": (Mv, v), "a": (Ma, a), "av": (torch.cat([Ma, Mv], 1), av)}
    text = {}
    for key, (ids, atts) in texts.items():
        h = bert(ids, atts, mode="text").last_hidden_state
        text[key] = (h, h[:, 0] @ model.text_proj.weight.T + model.text_proj.bias, atts)
    temp = model.temp.reshape(())
    out = {"avc": ref_contrastive(a, v, idx, temp)}
    for name, m in (("vtc", "v"), ("atc", "a"), ("avtc", "av")):
        out[name] = ref_contrastive(media[m][1], text[cfg.loss_caption[name]][1], idx, temp)
    heads = {"vtm": model.itm_head, "atm": model.atm_head, "avtm": model.avtm_head}
    for name, m in (("vtm", "v"), ("atm", "a"), ("avtm", "av")):
        h, _, atts = text[cfg.loss_caption[name]]
        vneg, tneg = negatives[name]
        mem = media[m][0]
        fused = bert(encoder_embeds=torch.cat([h, h, h[tneg]]), attention_mask=torch.cat([atts, atts, atts[tneg]]),
                     encoder_hidden_states=torch.cat([mem, mem[vneg], mem]), mode="fusion").last_hidden_state
        labels = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 0])
        out[name] = F.cross_entropy(heads[name](fused[:, 0]), labels)
    for name, m in (("mlm", "v"), ("amlm", "a"), ("avmlm", "av")):
        masked, labels = mlm[name]
        atts = texts[cfg.loss_caption[name]][1]
        h = bert(masked, atts, mode="text").last_hidden_state
        h = bert(encoder_embeds=h, attention_mask=atts, encoder_hidden_states=media[m][0],
                 mode="fusion").last_hidden_state
        logits = model.text_encoder.cls(h)
        out[name] = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    return {n: getattr(cfg, f"loss_{n}") * out[n] for n in LOSSES}, {m: f for m, (_, f) in media.items()}


def test_every_loss_matches_an_independent_computation(monkeypatch):
    drawn_from = []                                                    # (head, the feature VTM draws negatives by)
    real_vtm = align_av.vtm_loss
    monkeypatch.setattr(align_av, "vtm_loss", lambda bert, head, temp, mem, tok, feature, *a, **k: (
        drawn_from.append((head, feature.detach())) or real_vtm(bert, head, temp, mem, tok, feature, *a, **k)))
    torch.manual_seed(0)
    model = AudioVisualModel(config(**ALL_ON)).double().eval()
    video, fbank, texts = batch()
    video, fbank = video.double(), fbank.double()
    negatives, mlm = fixed_inputs(texts, model.cfg)
    idx = torch.tensor([4, 7, 4])                                      # a duplicate id: two positives
    out = model.losses(video, fbank, texts, idx, vtm_negatives=negatives, mlm_inputs=mlm)
    with torch.no_grad():
        ref, features = ref_losses(model, video, fbank, texts, idx, negatives, mlm)
    for name in LOSSES:
        assert out[name] > 0, name
        # BertForMaskedLM takes its cross-entropy in float32 (logits.float()), the rest stays float64
        tol = 1e-6 if name.endswith("mlm") else 1e-9
        torch.testing.assert_close(out[name].double(), ref[name].double(), rtol=tol, atol=0, msg=name)
    torch.testing.assert_close(out["loss"].double(), sum(ref.values()).double(), rtol=1e-6, atol=0)
    # the hard negatives of VTM, ATM, AVTM are chosen by the vision, audio and fused audio-visual features
    assert [h for h, _ in drawn_from] == [model.itm_head, model.atm_head, model.avtm_head]
    for (_, got), m in zip(drawn_from, ("v", "a", "av")):
        torch.testing.assert_close(got, features[m], rtol=1e-12, atol=1e-12)
    # AVTC's feature is av_feature, the eval embedding
    _, a_pooled = model.encode_audio(fbank)
    _, v_pooled = model.encode_vision(video)
    fused = model.av_feature(model.audio_proj(a_pooled), model.vision_proj(v_pooled))
    assert fused.shape == (3, model.cfg.embed_dim)


def test_fusion_memories_are_audio_then_vision():
    """Feed known towers (constant audio memory rows, recognisable vision rows) and record what the fusion layers
    cross-attend to for each matching and MLM loss."""
    torch.manual_seed(0)
    model = AudioVisualModel(config(**ALL_ON)).eval()
    video, fbank, texts = batch(frames=48)                             # 48 frames: 3 time x 4 mel = 12 audio tokens
    B, Na = 3, 12
    Ma = torch.arange(B * Na * W, dtype=torch.float32).reshape(B, Na, W)
    Mv = -1 - torch.arange(B * 9 * W, dtype=torch.float32).reshape(B, 9, W)   # 1 + 8 vision tokens
    model.encode_audio = lambda f: (Ma, f.mean((1, 2))[:, None].expand(B, AUDIO.encoder_embed_dim))
    model.encode_vision = lambda x, mask=None: (Mv, x.mean((1, 2, 3, 4))[:, None].expand(B, 24))
    seen = []
    hook = model.text_encoder.bert.register_forward_hook(
        lambda mod, args, kw, out: seen.append(kw["encoder_hidden_states"]) if kw.get("mode") == "fusion" else None,
        with_kwargs=True)
    negatives, mlm = fixed_inputs(texts, model.cfg)
    model.losses(video, fbank, texts, torch.arange(3), vtm_negatives=negatives, mlm_inputs=mlm)
    hook.remove()
    # loss order: vtm, mlm, atm, amlm, avtm, avmlm (LOSSES order, contrastive ones do not fuse)
    vneg = negatives["vtm"][0]
    av = torch.cat([Ma, Mv], 1)
    expected = [torch.cat([Mv, Mv[vneg], Mv]), Mv, torch.cat([Ma, Ma[vneg], Ma]), Ma, torch.cat([av, av[vneg], av]),
                av]
    assert len(seen) == len(expected)
    for got, want in zip(seen, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_zero_weights_give_zero_and_are_not_computed(monkeypatch):
    calls = []
    for fn in ("vtc_loss", "vtm_loss", "mlm_loss"):
        real = getattr(align_av, fn)
        monkeypatch.setattr(align_av, fn, lambda *a, _f=real, _n=fn, **k: calls.append(_n) or _f(*a, **k))
    torch.manual_seed(0)
    cfg = config(loss_vtm=0.0, loss_mlm=0.0, loss_avtm=0.0, loss_avmlm=0.0)   # vtc, avtc left on
    model = AudioVisualModel(cfg).eval()
    assert model.avtm_head is None and model.atm_head is None and model.av_fusion is not None
    video, fbank, texts = batch()
    out = model.losses(video, fbank, {"caption": texts["caption"], "av_caption": texts["av_caption"]},
                       torch.arange(3))
    assert calls == ["vtc_loss", "vtc_loss"]
    assert all(out[n] == 0 for n in LOSSES if n not in ("vtc", "avtc")) and out["vtc"] > 0 and out["avtc"] > 0
    torch.testing.assert_close(out["loss"], out["vtc"] + out["avtc"])
    # weights multiply: the same model with vtc doubled
    calls.clear()
    model.cfg = config(loss_vtc=2.0, loss_vtm=0.0, loss_mlm=0.0, loss_avtm=0.0, loss_avmlm=0.0)
    again = model.losses(video, fbank, texts, torch.arange(3))
    torch.testing.assert_close(again["vtc"], 2 * out["vtc"])
    # temp is clamped into [0.001, 0.5] before the forward (as VideoTextModel)
    with torch.no_grad():
        model.temp.fill_(3.0)
    assert model.losses(video, fbank, texts, torch.arange(3))["temp"] == 0.5 and model.temp.shape == (1,)
    # no audio in the batch: only the visual losses run, the audio tower is not called
    calls.clear()
    monkeypatch.setattr(model, "encode_audio", lambda f: pytest.fail("encode_audio called without audio"))
    no_audio = model.losses(video, None, {"caption": texts["caption"]}, torch.arange(3))
    assert calls == ["vtc_loss"] and no_audio["avtc"] == 0 and no_audio["vtc"] > 0


def test_missing_caption_is_named():
    model = AudioVisualModel(config()).eval()
    video, fbank, texts = batch()
    with pytest.raises(KeyError, match="av_caption"):
        model.losses(video, fbank, {"caption": texts["caption"]}, None)


@pytest.mark.parametrize("freeze", [False, True])
def test_gradients_reach_every_trained_parameter_and_the_audio_tower_unless_frozen(freeze):
    torch.manual_seed(0)
    model = AudioVisualModel(config(freeze_audio=freeze, **ALL_ON))
    video, fbank, texts = batch()
    out = model.losses(video, fbank, texts, torch.tensor([0, 1, 0]))
    assert all(torch.isfinite(out[n]) for n in LOSSES)
    out["loss"].backward()
    lacking = sorted(n for n, p in model.named_parameters()
                     if p.requires_grad and (p.grad is None or not p.grad.any()))
    assert not lacking
    audio = dict(model.audio_encoder.named_parameters())
    assert audio
    if freeze:
        assert all(not p.requires_grad and p.grad is None for p in audio.values())
    else:
        assert all(p.requires_grad and p.grad is not None and p.grad.any() for p in audio.values())
    for name in ("audio_proj", "av_concat_audio_proj", "av_fusion"):   # trained either way
        assert all(p.grad is not None and p.grad.any() for p in getattr(model, name).parameters())


def test_silent_clip_runs():
    """A clip without an audio stream comes as the features of silence (998 frames): every loss is finite."""
    torch.manual_seed(0)
    model = AudioVisualModel(config())
    video, _, texts = batch()
    silence = audio_features(torch.zeros(16000))                       # 1 s of zeros, padded to (998, 64)
    fbank = torch.stack([silence, torch.randn(998, 64), silence])
    out = model.losses(video, fbank, texts, torch.arange(3))
    assert all(torch.isfinite(out[n]) for n in LOSSES)
    out["loss"].backward()
    assert model.audio_encoder.patch_embedding.weight.grad.isfinite().all()


def test_module_names_are_the_official_ones():
    def top(model):
        return {k.split(".")[0] for k in model.state_dict()}
    model = AudioVisualModel(config())
    assert top(model) == OFFICIAL_DEFAULT
    sd = model.state_dict()
    for proj, width in (("av_concat_vision_proj", 32), ("av_concat_audio_proj", AUDIO.encoder_embed_dim)):
        assert sd[f"{proj}.0.weight"].shape == (W, width) and sd[f"{proj}.1.weight"].shape == (W,)
    assert sd["av_fusion.weight"].shape == (8, 16) and sd["avtm_head.weight"].shape == (2, 16)
    assert sd["audio_proj.weight"].shape == (8, AUDIO.encoder_embed_dim)
    assert top(AudioVisualModel(config(loss_atm=1.0))) == OFFICIAL_DEFAULT | {"atm_head"}
    # the official fine-tuning configs turn every audio loss off: no audio tower at all
    off = config(loss_avtc=0.0, loss_avtm=0.0, loss_avmlm=0.0)
    assert not off.uses_audio and top(AudioVisualModel(off)) == OFFICIAL_VISUAL
    assert "temp" in model.no_weight_decay()


def test_bad_config_names_the_fields():
    with pytest.raises(ValueError, match=r"bert\.encoder_width=20 must equal av_concat_dim=24"):
        config().__class__(**{**dataclasses.asdict(config()), "av_concat_dim": 24})
    with pytest.raises(ValueError, match="audio must be a BEATsConfig"):
        AudioVisualConfig(vision=config().vision, bert=BertConfig(**TEXT), av_concat_dim=W)
    with pytest.raises(ValueError, match=r"loss_caption names unknown losses \['vtx'\]"):
        config(loss_caption={"vtx": "caption"})
    with pytest.raises(ValueError, match=r"no caption key for the weighted losses \['avtc'"):
        config(loss_caption={"vtc": "caption", "vtm": "caption", "mlm": "caption"})
    with pytest.raises(ValueError, match="mlm_prob"):                  # AlignConfig's own checks still run
        config(mlm_prob=1.5)
    # by default each loss reads its own modality's caption of the synthetic world
    assert {n: config().loss_caption[n] for n in ("vtm", "atm", "avtm", "avmlm")} == {
        "vtm": "caption", "atm": "audio_caption", "avtm": "av_caption", "avmlm": "av_caption"}
    # asdict round trip rebuilds the nested configs
    cfg = config()
    assert AudioVisualConfig(**dataclasses.asdict(cfg)) == cfg
