"""load_official("chat", ...): the released InternVideo2-Chat-8B layout -> ivmini.chat.VideoChat
(ivmini/checkpoint/chat.py).

A tiny random VideoChat (every parameter random, LoRA B included) is written in the released layout by
chat_to_official, in both peft layouts and as a merged plain LLM; the written key names are checked against a list
built here from the official names (HF Mistral + peft, the HF ViT's bare ls1/ls2, 2 of 3 blocks, no pooling head),
then the file loads back and gives the original's logits. A missing, an extra and a mis-shaped key are named.
Run: python -m pytest tests/test_checkpoint_chat.py -q
"""
import copy

import pytest
import torch

from ivmini.chat import VISUAL_ID, VideoChat
from ivmini.checkpoint import chat_to_official, load_official, official_config
from ivmini.checkpoint.chat import CHAT_VISION
from ivmini.llm import LLMConfig
from ivmini.lora import LoRAConfig, apply_lora
from ivmini.qformer import QFormerConfig

VISION = dict(img_size=28, patch_size=14, embed_dim=48, depth=3, num_heads=4, mlp_ratio=2.0, num_frames=2,
              init_values=0.1, drop_path_rate=0.0)
# Q-Former width 24 != LLM width 32, so project_up / project_down show their orientation
QFORMER = dict(vocab_size=40, hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
               max_position_embeddings=32, hidden_dropout_prob=0.0, num_query_token=3, extra_num_query_token=2)
LLM = LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
LORA = LoRAConfig(r=4, alpha=8.0, dropout=0.0)
LOAD = dict(llm=LLM, vision=VISION, qformer=QFORMER)


def random_chat(seed):
    torch.manual_seed(seed)
    model = VideoChat(official_config("stage2_vision", **{**CHAT_VISION, **VISION}),
                      QFormerConfig(vision_width=48, **QFORMER), LLM)
    apply_lora(model.lm, LORA)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)             # LoRA B and extra_query_tokens start at zero: make every part show
    return model.eval()


def inputs(model, seed):
    """A left-padded batch of 2: video, ids with the visual placeholders, masks, Q-Former ids."""
    g = torch.Generator().manual_seed(seed)
    n = model.n_visual
    ids = torch.cat([torch.randint(3, 64, (2, 3), generator=g), torch.full((2, n), VISUAL_ID),
                     torch.randint(3, 64, (2, 4), generator=g)], dim=1)                  # (2, 7 + n)
    mask = torch.ones_like(ids)
    mask[0, :1] = 0                                                                        # sample 0: one pad
    qids = torch.randint(1, 40, (2, 5), generator=g)
    qmask = torch.ones_like(qids)
    qmask[1, :2] = 0
    video = torch.randn(2, 3, 2, 28, 28, generator=g)
    return video, ids, mask, qids, qmask


def logits(model, batch):
    video, ids, mask, qids, qmask = batch
    with torch.no_grad():
        return model(video, ids, mask, None, qids, qmask)[1]


def released_keys(layout):
    """The released chat file's key names for the tiny config, from the official names (not the loader's map)."""
    keys = {f"vision_encoder.{k}" for k in ("cls_token", "pos_embed", "img_pos_embed", "patch_embed.proj.weight",
                                            "patch_embed.proj.bias")}
    for n in range(2):                                            # 3 blocks built, the last one dropped
        keys |= {f"vision_encoder.blocks.{n}.{k}" for k in (
            "norm1.weight", "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias", "attn.q_norm.weight",
            "attn.k_norm.weight", "ls1", "norm2.weight", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
            "mlp.fc2.bias", "ls2")}
    keys |= {"query_tokens", "extra_query_tokens", "vision_layernorm.weight", "vision_layernorm.bias",
             "project_up.weight", "project_up.bias", "project_down.weight", "project_down.bias"}
    lm = "lm.base_model.model." if layout else "lm."
    keys |= {lm + "model.embed_tokens.weight", lm + "model.norm.weight"}
    modules = ["lm_head"]
    for n in range(2):
        keys |= {f"{lm}model.layers.{n}.{k}.weight" for k in ("input_layernorm", "post_attention_layernorm")}
        modules += [f"model.layers.{n}.{k}" for k in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                      "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                      "mlp.down_proj")]
    for m in modules:
        keys.add(f"{lm}{m}.base_layer.weight" if layout == "new" else f"{lm}{m}.weight")
        if layout:
            keys |= {f"{lm}{m}.lora_A.default.weight", f"{lm}{m}.lora_B.default.weight"}
    return keys


@pytest.mark.parametrize("layout", ["new", "old"])
def test_released_layout_loads_back(layout, tmp_path):
    model = random_chat(0)
    sd = chat_to_official(model.state_dict(), LLM, peft_layout=layout)
    bert = {k for k in sd if k.startswith("qformer.bert.")}
    assert set(sd) - bert == released_keys(layout)
    assert {"qformer.bert.embeddings.position_ids", "qformer.bert.encoder.layer.0.output_query.dense.weight"} <= bert
    lm = "lm.base_model.model."
    assert sd[lm + "model.layers.1.self_attn.k_proj.lora_B.default.weight"].shape == (16, 4)   # (Hkv * d, r)
    assert sd[lm + "lm_head.lora_A.default.weight"].shape == (4, 32)
    assert sd["project_up.weight"].shape == (32, 24) and sd["project_down.weight"].shape == (24, 32)
    assert sd["vision_encoder.blocks.1.ls2"].shape == (48,) and sd["vision_encoder.pos_embed"].shape == (1, 9, 48)
    torch.testing.assert_close(sd["vision_encoder.blocks.1.ls2"], model.vision_encoder.blocks[1].ls2.gamma)
    if layout == "new":                                   # through a file, as the release is read
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "chat.safetensors")
        src = str(tmp_path / "chat.safetensors")
    else:
        src = sd
    loaded = load_official("chat", src, lora=LORA, **LOAD)
    assert not loaded.training
    batch = inputs(model, 1)
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), rtol=0, atol=0)

    # merge=True: one plain LLM, the same outputs up to rounding; its export (no peft) loads with lora=None
    merged = load_official("chat", sd, lora=LORA, merge=True, **LOAD)
    assert not any(".lora." in k for k in merged.state_dict())
    torch.testing.assert_close(logits(merged, batch), logits(model, batch), rtol=1e-4, atol=1e-4)
    plain = chat_to_official(merged.state_dict(), LLM, peft_layout=None)
    assert set(plain) - bert == released_keys(None)
    again = load_official("chat", plain, lora=None, **LOAD)
    torch.testing.assert_close(logits(again, batch), logits(merged, batch), rtol=0, atol=0)


def test_key_problems_are_named():
    model = random_chat(2)
    sd = chat_to_official(model.state_dict(), LLM)
    lm = "lm.base_model.model."
    bad = copy.copy(sd)
    del bad[lm + "model.layers.1.mlp.up_proj.lora_B.default.weight"]
    bad["vision_encoder.blocks.2.ls1"] = torch.zeros(48)                     # the dropped last block
    bad["vision_encoder.clip_projector.norm1_q.weight"] = torch.zeros(48)    # no pooling head in the chat ViT
    bad["project_down.weight"] = bad["project_down.weight"].t()
    with pytest.raises(KeyError) as err:
        load_official("chat", bad, lora=LORA, **LOAD)
    msg = str(err.value)
    for key in ("missing keys (1): lm.base_model.model.model.layers.1.mlp.up_proj.lora_B.default.weight",
                "vision_encoder.blocks.2.ls1", "vision_encoder.clip_projector.norm1_q.weight",
                "project_down.weight: checkpoint (32, 24) vs model (24, 32)", "peft layout 'new'"):
        assert key in msg, key
    # a file mixing the layouts: the old-style base key of one adapted projection is named
    mixed = {k.replace("layers.0.self_attn.o_proj.base_layer.", "layers.0.self_attn.o_proj."): v for k, v in sd.items()}
    with pytest.raises(KeyError, match=r"unexpected keys \(1\): lm\.base_model\.model\.model\.layers\.0\.self_attn"
                                       r"\.o_proj\.weight"):
        load_official("chat", mixed, lora=LORA, **LOAD)
    # the position table loads as it is: another frame count is an error, not a resize
    with pytest.raises(KeyError, match=r"vision_encoder\.pos_embed: checkpoint \(1, 9, 48\) vs model \(1, 17, 48\).*"
                                       r"num_frames"):
        load_official("chat", sd, lora=LORA, llm=LLM, qformer=QFORMER, vision={**VISION, "num_frames": 4})
    # a plain (lora=None) read of a peft file, and adapters that differ from the config, are named too
    with pytest.raises(KeyError, match=r"plain LLM under lm\..*missing keys"):
        load_official("chat", sd, lora=None, **LOAD)
    with pytest.raises(KeyError, match=r"lora_A\.default\.weight: checkpoint \(4, 32\) vs model \(8, 32\)"):
        load_official("chat", sd, lora=LoRAConfig(r=8), **LOAD)
    with pytest.raises(ValueError, match="x_vis_return_idx must be -2"):
        load_official("chat", sd, lora=LORA, llm=LLM, qformer=QFORMER, vision={**VISION, "x_vis_return_idx": -1})
    with pytest.raises(ValueError, match="merge them first"):
        chat_to_official(model.state_dict(), LLM, peft_layout=None)
