"""The InternVideo2-CLIP variant (ivmini/clip.py) and its released-layout loader (ivmini/checkpoint/clip.py).

The text feature is checked against an independent computation: the LoRA-merged tower run on each text alone,
unpadded, its last state @ text_projection; the released layout is written here key by key from the official
names (both peft layouts), not through the loader's own map.
Run: python -m pytest tests/test_clip.py -q
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from ivmini.checkpoint import clip_to_official, load_official, official_config
from ivmini.clip import CLIPConfig, VideoCLIP
from ivmini.llm import LLMConfig
from ivmini.lora import merge_lora

VISION_KW = dict(img_size=28, patch_size=14, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0, attn_pool_num_heads=2,
                 clip_embed_dim=24, num_frames=8, init_values=0.1, drop_path_rate=0.0)
TEXT = LLMConfig(vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rms_norm_eps=1e-5, pad_token_id=0)
R = 4


def config():
    return CLIPConfig(vision=official_config("clip_vision", **VISION_KW), text=TEXT, lora_r=R, lora_alpha=8.0)


def random_model(seed, freeze=False):
    """A VideoCLIP whose every parameter is random, LoRA B included (a fresh B is 0: the adapters would not show)."""
    torch.manual_seed(seed)
    model = VideoCLIP(config(), freeze=freeze)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".B") or name == "text_projection":
                p.normal_(0, 0.3)
        model.temp.fill_(0.05)
    return model.eval()


def texts(seed, lengths, L, side):
    """Real ids (each row's own length) and the batch padded to L on `side` with random junk under the mask."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, TEXT.vocab_size, (n,), generator=g) for n in lengths]
    ids = torch.randint(0, TEXT.vocab_size, (len(rows), L), generator=g)       # pads hold arbitrary ids
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for b, r in enumerate(rows):
        sl = slice(L - len(r), L) if side == "left" else slice(0, len(r))
        ids[b, sl], mask[b, sl] = r, 1
    return rows, ids, mask


@pytest.mark.parametrize("side", ["left", "right"])
def test_text_feature_is_the_last_real_token(side):
    model = random_model(0).double()
    rows, ids, mask = texts(1, [5, 3, 7, 1], 8, side)
    hidden, feat = model.encode_text(ids, mask)
    assert hidden.shape == (4, 8, TEXT.hidden_size) and feat.shape == (4, 24)
    ref = merge_lora(copy.deepcopy(model.text_encoder))           # independent: no adapters, no padding
    want = torch.stack([ref.hidden_states(r[None])[0, -1] for r in rows]) @ model.text_projection
    torch.testing.assert_close(feat, want, rtol=1e-9, atol=1e-9)
    if side == "right":                                           # the official index, mask.sum(1) - 1
        official = hidden[torch.arange(4), mask.sum(1) - 1] @ model.text_projection
        torch.testing.assert_close(feat, official, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"rows \[1\] have no real token"):
        model.encode_text(ids[:2], torch.stack([mask[0], torch.zeros_like(mask[1])]))


def test_lora_defaults_are_pefts_llama_targets():
    model = VideoCLIP(config())
    names = {n for n, _ in model.named_parameters() if ".lora." in n}
    assert names == {f"text_encoder.layers.{n}.attn.qkv.lora.{t}.{ab}" for n in range(2) for t in "qv" for ab in "AB"}
    assert model.text_encoder.lm_head is None and "text_encoder.lm_head.weight" not in model.state_dict()
    assert isinstance(model.vision_proj, torch.nn.Identity) and isinstance(model.text_proj, torch.nn.Identity)


def test_only_the_pool_and_temp_train():
    model = random_model(2, freeze=True).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    pool = {"vision_encoder.clip_projector." + n for n, _ in model.vision_encoder.clip_projector.named_parameters()}
    assert trainable == pool | {"temp"} and pool
    with torch.no_grad():
        model.temp.fill_(0.001)                                   # below the floor: clamped to 1/100
    g = torch.Generator().manual_seed(3)
    video = torch.randn(3, 3, 8, 28, 28, generator=g)
    _, ids, mask = texts(4, [4, 6, 2], 6, "right")
    out = model.losses(video, ids, mask, idx=torch.tensor([0, 1, 0]))
    assert model.temp.item() == pytest.approx(0.01)
    out["loss"].backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in trainable)
    # the loss, independently: symmetric soft-target CE of cos / temp (ids 0 and 2 are both positives)
    with torch.no_grad():
        model.eval()
        v = F.normalize(model.encode_vision(video)[1].double(), dim=-1)
        t = F.normalize(model.encode_text(ids, mask)[1].double(), dim=-1)
        sim = v @ t.T / 0.01
        y = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 0, 1]], dtype=torch.float64)
        y = y / y.sum(1, keepdim=True)
        want = (-(sim.log_softmax(1) * y).sum(1).mean() - (sim.T.log_softmax(1) * y).sum(1).mean()) / 2
        got = model(video, ids, mask, torch.tensor([0, 1, 0]))["vtc"]
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def released_layout(model, layout):
    """model's weights under the official InternVideo2_CLIP names, written key by key."""
    C, kv = TEXT.hidden_size, TEXT.num_key_value_heads * TEXT.hidden_size // TEXT.num_attention_heads
    I = TEXT.intermediate_size
    sd = {"vision_encoder." + k: v.clone() for k, v in model.vision_encoder.state_dict().items()}
    t, lm = "text_encoder.transformer.", model.text_encoder
    sd[t + "embed_tokens.weight"] = lm.embed_tokens.weight.detach().clone()
    sd[t + "norm.weight"] = lm.norm.weight.detach().clone()
    for n, layer in enumerate(lm.layers):
        p = f"{t}layers.{n}."
        q, k, v = layer.attn.qkv.weight.detach().split([C, kv, kv])
        gate, up = layer.mlp.fc1.weight.detach().split([I, I])
        base = "base_layer.weight" if layout == "new" else "weight"
        sd |= {p + "self_attn.q_proj." + base: q.clone(), p + "self_attn.k_proj.weight": k.clone(),
               p + "self_attn.v_proj." + base: v.clone(), p + "self_attn.o_proj.weight": layer.attn.proj.weight,
               p + "mlp.gate_proj.weight": gate.clone(), p + "mlp.up_proj.weight": up.clone(),
               p + "mlp.down_proj.weight": layer.mlp.fc2.weight, p + "input_layernorm.weight": layer.norm1.weight,
               p + "post_attention_layernorm.weight": layer.norm2.weight}
        for tgt in "qv":
            lora = layer.attn.qkv.lora[tgt]
            sd[p + f"self_attn.{tgt}_proj.lora_A.default.weight"] = lora.A
            sd[p + f"self_attn.{tgt}_proj.lora_B.default.weight"] = lora.B
        if layout == "old":                                       # old transformers saved the RoPE buffer
            sd[p + "self_attn.rotary_emb.inv_freq"] = torch.rand(C // TEXT.num_attention_heads // 2)
    sd["text_encoder.text_projection"] = model.text_projection
    sd["temp"] = model.temp.reshape(())
    return {k: v.detach().clone() for k, v in sd.items()}


@pytest.mark.parametrize("layout", ["new", "old"])
def test_released_layout_loads_and_reproduces(layout):
    model = random_model(5)
    sd = released_layout(model, layout)
    if layout == "new":                                           # the export map writes exactly this layout
        ours = clip_to_official(model.state_dict(), model.cfg, layout)
        assert sorted(ours) == sorted(sd) and all(torch.equal(ours[k], sd[k]) for k in sd)
    loaded = load_official("clip", {"module": sd}, vision=VISION_KW, text=TEXT, lora_r=R, lora_alpha=8.0)
    assert not loaded.training and loaded.temp.item() == pytest.approx(0.05)
    g = torch.Generator().manual_seed(6)
    video = torch.randn(2, 3, 8, 28, 28, generator=g)
    _, ids, mask = texts(7, [3, 5], 5, "right")
    with torch.no_grad():
        assert torch.equal(loaded.encode_vision(video)[1], model.encode_vision(video)[1])
        assert torch.equal(loaded.encode_text(ids, mask)[1], model.encode_text(ids, mask)[1])


def test_wrong_keys_are_named():
    model = random_model(8)
    sd = released_layout(model, "new")
    kw = dict(vision=VISION_KW, text=TEXT, lora_r=R, lora_alpha=8.0)
    p = "text_encoder.transformer.layers.1.self_attn."
    missing = {k: v for k, v in sd.items() if k != p + "v_proj.lora_B.default.weight"}
    with pytest.raises(KeyError, match=r"missing keys \(1\): " + p.replace(".", r"\.") + r"v_proj\.lora_B"):
        load_official("clip", missing, **kw)
    extra = dict(sd, **{p + "k_proj.lora_A.default.weight": torch.zeros(R, TEXT.hidden_size)})
    with pytest.raises(KeyError, match=r"unexpected keys \(1\): " + p.replace(".", r"\.") + r"k_proj\.lora_A"):
        load_official("clip", extra, **kw)
    # the peft-wrapper names a strict=False loader would skip, leaving the LLaMA random: every one named
    wrapped = {(k.replace("transformer.", "transformer.base_model.model.") if ".layers." in k else k): v
               for k, v in sd.items()}
    with pytest.raises(KeyError, match=r"transformer\.base_model\.model\.layers\.0\.mlp\.down_proj\.weight"):
        load_official("clip", wrapped, **kw)
    mixed = dict(sd)                                              # one projection in the old layout
    mixed[p + "q_proj.weight"] = mixed.pop(p + "q_proj.base_layer.weight")
    with pytest.raises(KeyError, match=r"q_proj\.base_layer\.weight"):
        load_official("clip", mixed, **kw)
    with pytest.raises(KeyError, match=r"shape mismatches \(1\): text_encoder\.text_projection"):
        load_official("clip", dict(sd, **{"text_encoder.text_projection": torch.zeros(3, 3)}), **kw)


def test_stage2_position_table_and_hf_layerscale_names():
    """A 4-frame position table (the stage-2 vision encoder) is resized to the 8 frames; `blocks.N.ls1` loads."""
    model = random_model(9)
    sd = released_layout(model, "new")
    sd["vision_encoder.pos_embed"] = torch.randn(1, 1 + 4 * 4, 32)
    sd["vision_encoder.blocks.0.ls1"] = sd.pop("vision_encoder.blocks.0.ls1.gamma")
    loaded = load_official("clip", sd, vision=VISION_KW, text=TEXT, lora_r=R, lora_alpha=8.0)
    assert loaded.vision_encoder.pos_embed.shape == (1, 1 + 8 * 4, 32)
    assert torch.equal(loaded.vision_encoder.blocks[0].ls1.gamma, model.vision_encoder.blocks[0].ls1.gamma)
