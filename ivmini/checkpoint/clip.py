"""The released InternVideo2-CLIP layout <-> ivmini.clip.VideoCLIP (facts §4; key names from the official MM
models/internvideo2_clip.py and backbones/internvideo2/internvideo2_clip_text.py).

    load_clip(src, *, text, vision=None, use_lora=True, lora_targets=("q", "v"), lora_r=16, lora_alpha=32,
              temp_min=0.01, orig_t_size=None, mlp_act=None)
        load_official("clip", ...): a whole InternVideo2_CLIP state dict -> VideoCLIP, strictly, in eval mode.
        vision: the official InternVideo2 (clip_vision) constructor keywords, as load_official("clip_vision");
        text (required: the released file does not say its LLaMA config): an LLMConfig, an LLM_PRESETS name or
        an HF LlamaConfig dict (the config.json of InternVL-C's text tower, chinese_alpaca_lora_7b, for the release).
    clip_from_official(sd, cfg) / clip_to_official(sd, cfg, peft_layout="new")   the key map alone, both ways

Layout of the file (the official module tree: text_encoder = LLaMA, whose `transformer` is the LlamaModel
inside peft's wrapper, model.base_model.model.model, so no `base_model.model.` appears in the keys):
    vision_encoder.*                                   the clip_vision keys (loader pieces of internvideo2.py:
                                                       `blocks.N.ls1` -> `.gamma`, position tables resized)
    text_encoder.transformer.embed_tokens.weight       -> text_encoder.embed_tokens.weight
    text_encoder.transformer.norm.weight               -> text_encoder.norm.weight
    text_encoder.transformer.layers.N.<HF Llama layer keys>   -> text_encoder.layers.N.* (checkpoint/llm.py's map:
                                                       q/k/v rows fused into attn.qkv, gate/up into mlp.fc1)
    ...layers.N.self_attn.q_proj.lora_A.default.weight (r, in)   -> text_encoder.layers.N.attn.qkv.lora.q.A
    ...layers.N.self_attn.q_proj.lora_B.default.weight (out, r)  -> text_encoder.layers.N.attn.qkv.lora.q.B
        (v_proj likewise; other targets as the table in ivmini/lora.py)
    text_encoder.text_projection (H, E)                -> text_projection
    temp ()                                            -> temp (1,)
peft layouts: since peft 0.7 an adapted projection keeps its base weight under `<proj>.base_layer.weight`
("new"); older peft kept it at `<proj>.weight` ("old"). Both load (the layout is read from the file; a file mixing
them is named key by key). Old Llama files' `rotary_emb.inv_freq` buffers are dropped by name (recomputed).

Strict: the official loader calls load_state_dict(strict=False), so a text checkpoint whose names do not match
(e.g. the base_layer rename) leaves the LLaMA weights silently at their random init (facts §4). Here every
missing, unexpected or mis-shaped key is an error naming it, in the file's own names.
Tests: tests/test_clip.py (files the test writes in both peft layouts).
"""
import logging
import re
from dataclasses import replace

import torch

from ..clip import CLIPConfig, VideoCLIP
from ..llm import LLMConfig, llm_config
from .internvideo2 import official_config, rename_hf_layerscale, resize_pos_embeds
from .llm import llm_config_from_hf, llm_from_hf, llm_to_hf
from .state_dicts import check_keys, key_problems, read_state_dict

log = logging.getLogger("ivmini.checkpoint")

TEXT = "text_encoder.transformer."
VISION = "vision_encoder."
# LoRA target -> (HF projection under layers.N., ivmini Linear under layers.N.)
PEFT_TARGETS = {"q": ("self_attn.q_proj", "attn.qkv"), "k": ("self_attn.k_proj", "attn.qkv"),
                "v": ("self_attn.v_proj", "attn.qkv"), "o": ("self_attn.o_proj", "attn.proj"),
                "gate": ("mlp.gate_proj", "mlp.fc1"), "up": ("mlp.up_proj", "mlp.fc1"),
                "down": ("mlp.down_proj", "mlp.fc2")}
HF_TO_TARGET = {hf: t for t, (hf, _) in PEFT_TARGETS.items()}
OFFICIAL_LORA = re.compile(r"^layers\.(\d+)\.(.+)\.lora_([AB])\.default\.weight$")
OURS_LORA = re.compile(r"^layers\.(\d+)\.(.+)\.lora\.(\w+)\.([AB])$")
BASE_LAYER = re.compile(r"^(layers\.\d+\.(.+))\.base_layer\.weight$")
ROTARY = re.compile(r"^layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def _tower(cfg: LLMConfig):
    """The text tower's HF map: LlamaModel only (no lm_head), i.e. llm.py's map with the head tied away."""
    return replace(cfg, tie_word_embeddings=True)


def text_from_official(sd, cfg: CLIPConfig):
    """Keys under text_encoder.transformer. (prefix stripped) -> ivmini text_encoder.* keys."""
    base, lora = {}, {}
    for k, v in sd.items():
        m = OFFICIAL_LORA.match(k)
        b = BASE_LAYER.match(k)
        if m:
            n, hf, ab = m.groups()
            t = HF_TO_TARGET[hf]
            lora[f"layers.{n}.{PEFT_TARGETS[t][1]}.lora.{t}.{ab}"] = v
        elif b:
            base["model." + b.group(1) + ".weight"] = v
        elif not ROTARY.match(k):
            base["model." + k] = v
    out = llm_from_hf(base, _tower(cfg.text))
    out.pop("lm_head.weight")                  # the tied-away head: the tower has none
    return {**out, **lora}


def text_to_official(sd, cfg: CLIPConfig, peft_layout="new"):
    """ivmini text_encoder.* keys (prefix stripped) -> the official names under text_encoder.transformer."""
    lora = {k: v for k, v in sd.items() if OURS_LORA.match(k)}
    base = llm_to_hf({k: v for k, v in sd.items() if k not in lora}, _tower(cfg.text))
    adapted = {PEFT_TARGETS[t][0] for t in cfg.lora_targets} if cfg.use_lora else set()
    out = {}
    for k, v in base.items():
        k = k[len("model."):]
        proj = k.rsplit(".", 1)[0].split(".", 2)[-1]              # layers.N.<proj>.weight -> <proj>
        if peft_layout == "new" and k.startswith("layers.") and proj in adapted:
            k = k[:-len("weight")] + "base_layer.weight"
        out[k] = v
    for k, v in lora.items():
        n, _, t, ab = OURS_LORA.match(k).groups()
        out[f"layers.{n}.{PEFT_TARGETS[t][0]}.lora_{ab}.default.weight"] = v.detach().clone()
    return out


def clip_from_official(sd, cfg: CLIPConfig):
    """Released InternVideo2-CLIP keys -> VideoCLIP keys (the text part through text_from_official)."""
    out = {k: v for k, v in sd.items() if k.startswith(VISION)}
    out.update({"text_encoder." + k: v for k, v in
                text_from_official({k[len(TEXT):]: v for k, v in sd.items() if k.startswith(TEXT)}, cfg).items()})
    out["text_projection"] = sd["text_encoder.text_projection"]
    out["temp"] = sd["temp"].reshape(1)
    return out


def clip_to_official(sd, cfg: CLIPConfig, peft_layout="new"):
    """VideoCLIP keys -> the released layout (peft_layout "new": base_layer names, "old": without)."""
    if peft_layout not in ("new", "old"):
        raise ValueError(f"peft_layout must be 'new' or 'old', got {peft_layout!r}")
    text = {k[len("text_encoder."):]: v for k, v in sd.items() if k.startswith("text_encoder.")}
    out = {k: v for k, v in sd.items() if k.startswith(VISION)}
    out.update({TEXT + k: v for k, v in text_to_official(text, cfg, peft_layout).items()})
    out["text_encoder.text_projection"] = sd["text_projection"]
    out["temp"] = sd["temp"].reshape(())
    return out


def _text_config(text):
    if isinstance(text, LLMConfig):
        return text
    if isinstance(text, str):
        return llm_config(text)
    if isinstance(text, dict):
        return llm_config_from_hf(text)
    raise TypeError(f"text must be an LLMConfig, an LLM preset name or an HF config dict, got {type(text).__name__}")


def load_clip(src, *, text, vision=None, use_lora=True, lora_targets=("q", "v"), lora_r=16, lora_alpha=32.0,
              temp_min=0.01, orig_t_size=None, mlp_act=None):
    """load_official("clip", src, ...): the released InternVideo2_CLIP state dict (see the module docstring) as a
    VideoCLIP, strictly, in eval mode (frozen as for training: only the pool and temp require grad)."""
    vision_cfg = official_config("clip_vision", mlp_act=mlp_act, **(vision or {}))
    cfg = CLIPConfig(vision=vision_cfg, text=_text_config(text), use_lora=use_lora, lora_targets=lora_targets,
                     lora_r=lora_r, lora_alpha=lora_alpha, temp_min=temp_min, temp=temp_min)
    sd = read_state_dict(src)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    vis = rename_hf_layerscale({k[len(VISION):]: v for k, v in sd.items() if k.startswith(VISION)})
    vis = resize_pos_embeds(vis, vision_cfg, orig_t_size)
    sd = {**{k: v for k, v in sd.items() if not k.startswith(VISION)}, **{VISION + k: v for k, v in vis.items()}}
    if "temp" in sd and sd["temp"].numel() == 1:
        sd["temp"] = sd["temp"].reshape(())                   # accept a (1,) temp as well as the official 0-d one
    dropped = [k for k in sd if k.startswith(TEXT) and ROTARY.match(k[len(TEXT):])]
    if dropped:
        log.info("dropped %d rotary_emb.inv_freq buffer(s): recomputed from rope_theta", len(dropped))
    sd = {k: v for k, v in sd.items() if k not in dropped}

    with torch.device("meta"):            # no time spent initialising weights that are overwritten
        model = VideoCLIP(cfg)
    layout = "new" if any(".base_layer." in k for k in sd) else "old"
    want = {k: v.shape for k, v in clip_to_official(model.state_dict(), cfg, layout).items()}
    problems = key_problems(want, sd)
    if problems:
        raise KeyError(f"checkpoint does not match InternVideo2-CLIP (peft layout {layout!r}"
                       f"{': base weights under <proj>.base_layer.weight' if layout == 'new' else ''}; text tower "
                       f"{cfg.text.num_hidden_layers} layers x {cfg.text.hidden_size}, LoRA "
                       f"{list(cfg.lora_targets) if use_lora else 'off'}, vision depth {vision_cfg.depth} x "
                       f"{vision_cfg.embed_dim}): {problems}")
    sd, _ = check_keys(model, clip_from_official(sd, cfg))
    model.to_empty(device="cpu")
    model.load_state_dict(sd, strict=True)
    return model.eval()
