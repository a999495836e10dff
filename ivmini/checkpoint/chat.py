"""The released InternVideo2-Chat-8B bridge: its Q-Former keys <-> ivmini.qformer's. Facts:
../shared/ref/internvideo2_facts.md §1 (the HF chat layout) and §5.1; key names from upstream BLIP-2 Qformer.py.

    load_chat_qformer(src, num_query_token, extra_num_query_token, vision_width, **bert_config)
        load_official("chat_qformer", ...): query_tokens, extra_query_tokens, vision_layernorm.*, qformer.bert.*
        -> an ivmini QFormer, strictly, in eval mode. The other parts of a whole chat file (CHAT_OTHER_KEYS:
        the ViT, project_up / project_down, the LLM) are dropped by name; any other key is an error naming it.
    chat_qformer_from_official(sd) / chat_qformer_to_official(sd)   the key map alone, both ways

Key map under qformer.bert. -> bert. (ivmini.checkpoint.text's BERT map for the shared parts):
    embeddings.{word,position}_embeddings, embeddings.LayerNorm    -> the same names
    embeddings.position_ids                                        dropped (a buffer upstream, not a weight)
    encoder.layer.N.attention / crossattention / intermediate / output   -> layer.N.* as in checkpoint/text.py
    encoder.layer.N.intermediate_query.dense                       -> layer.N.mlp_query.fc1
    encoder.layer.N.output_query.dense                             -> layer.N.mlp_query.fc2
    encoder.layer.N.output_query.LayerNorm                         -> layer.N.norm2_query
query_tokens, extra_query_tokens, vision_layernorm.{weight,bias} keep their names. Crossattention keys exist
for layers 0, freq, 2*freq, ... only; K/V weights are (hidden, vision_width).

The whole chat model (load_official("chat", ...) -> ivmini.chat.VideoChat):
    load_chat(src, *, llm, vision=None, qformer=None, lora=LoRAConfig(), merge=False, mlp_act=None)
    chat_from_official(sd, llm_cfg) / chat_to_official(sd, llm_cfg, peft_layout="new")   the key map, both ways
Layout of the released file (HF BaseMLLM: modeling_base.py, modeling_internvideo2_vit.py):
    vision_encoder.*        PretrainVisionTransformer_clean, x_vis_return_idx=-2, x_vis_only: cls_token, pos_embed,
                            img_pos_embed, patch_embed.proj.*, blocks.{0..depth-2}.* with LayerScale a bare
                            Parameter `blocks.N.ls1` / `ls2` (-> ivmini `ls1.gamma`); no clip_projector. The file's
                            position tables load as they are (8 frames in the release): a table of another size
                            is an error, never resized here
    query_tokens, extra_query_tokens, vision_layernorm.*, qformer.bert.*   the Q-Former map above (-> qformer.*)
    project_up.*            Linear(Q-Former hidden -> LLM hidden): the visual tokens' projection
    project_down.*          Linear(LLM hidden -> Q-Former hidden): only for the release's optional vision-regression
                            loss (off); loaded, never used in forward
    lm.base_model.model.*   the peft-wrapped Mistral (PeftModelForCausalLM -> LoraModel -> MistralForCausalLM):
                            model.* and lm_head.* in checkpoint/llm.py's HF map; an adapted projection keeps its
                            base weight under `<proj>.base_layer.weight` (peft >= 0.7, "new") or `<proj>.weight`
                            ("old"; both load, the layout read from the file), its adapter under
                            `<proj>.lora_A.default.weight` (r, in) / `lora_B` (out, r) -> `<module>.lora.<target>.A/B`
                            (the table in ivmini/lora.py; lm_head included)
    lm.*                    instead, with lora=None: a plain (merged or never adapted) LLM, model.* and lm_head.*
Strict: every missing, unexpected or mis-shaped key is an error naming it in the file's own names.
Tests: tests/test_qformer.py (the bridge), tests/test_checkpoint_chat.py (the whole model).
"""
import logging
import re

import torch

from ..chat import VideoChat
from ..lora import LoRAConfig, apply_lora, merge_lora
from ..qformer import QFormer, QFormerConfig
from .clip import PEFT_TARGETS, _text_config
from .internvideo2 import official_config, rename_hf_layerscale
from .llm import ROTARY_BUFFER, llm_from_hf, llm_to_hf
from .state_dicts import check_keys, key_problems, read_state_dict
from .text import bert_from_official, bert_to_official, drop_logged

log = logging.getLogger("ivmini.checkpoint")

# parts of the released chat file that are not the Q-Former bridge (loaded by their own loaders)
CHAT_OTHER_KEYS = ("vision_encoder.", "project_up.", "project_down.", "lm.")
QUERY_FFN_MAP = {"intermediate_query.dense": "mlp_query.fc1", "output_query.dense": "mlp_query.fc2",
                 "output_query.LayerNorm": "norm2_query"}
OFFICIAL_QUERY_FFN = re.compile(r"^qformer\.bert\.encoder\.layer\.(\d+)\.(intermediate_query\.dense|"
                                r"output_query\.dense|output_query\.LayerNorm)\.(weight|bias)$")
OURS_QUERY_FFN = re.compile(r"^bert\.layer\.(\d+)\.(mlp_query\.fc1|mlp_query\.fc2|norm2_query)\.(weight|bias)$")


def chat_qformer_from_official(sd):
    """Released chat keys -> ivmini QFormer keys. Keys outside the Q-Former map pass through unchanged, for the
    loader's strict check to name."""
    out, bert = {}, {}
    for k, v in sd.items():
        query = OFFICIAL_QUERY_FFN.match(k)
        if query:
            n, tail, kind = query.groups()
            out[f"bert.layer.{n}.{QUERY_FFN_MAP[tail]}.{kind}"] = v
        elif k.startswith("qformer.bert."):
            bert[k[len("qformer."):]] = v                 # bert.embeddings.*, bert.encoder.layer.N.*
        else:
            out[k] = v
    out.update(bert_from_official(bert))                  # drops bert.embeddings.position_ids
    return out


def chat_qformer_to_official(sd):
    """ivmini QFormer keys -> the released chat layout (with qformer.bert.embeddings.position_ids)."""
    out, bert = {}, {}
    back = {v: k for k, v in QUERY_FFN_MAP.items()}
    for k, v in sd.items():
        query = OURS_QUERY_FFN.match(k)
        if query:
            n, tail, kind = query.groups()
            out[f"qformer.bert.encoder.layer.{n}.{back[tail]}.{kind}"] = v
        elif k.startswith("bert."):
            bert[k] = v
        else:
            out[k] = v
    out.update({"qformer." + k: v for k, v in bert_to_official(bert).items()})
    return out


def check_official_keys(model, sd):
    """Strict check in the file's own names: every missing, unexpected or mis-shaped key of the released
    layout named (position_ids may be absent)."""
    own = {k: v.shape for k, v in chat_qformer_to_official(model.state_dict()).items()
           if not k.endswith("position_ids")}
    problems = key_problems(own, {k: v for k, v in sd.items() if not k.endswith("embeddings.position_ids")})
    if problems:
        cfg = model.cfg
        raise KeyError("checkpoint does not match the chat Q-Former (num_query_token="
                       f"{cfg.num_query_token}, extra_num_query_token={cfg.extra_num_query_token}, vision_width="
                       f"{cfg.vision_width}, hidden_size={cfg.hidden_size}, num_hidden_layers="
                       f"{cfg.num_hidden_layers}, cross_attention_freq={cfg.cross_attention_freq}): {problems}")


def load_chat_qformer(src, num_query_token, vision_width, extra_num_query_token=0, **bert_config):
    """load_official("chat_qformer", src, ...): the released bridge (see the module docstring) as a QFormer of
    QFormerConfig(num_query_token, extra_num_query_token, vision_width, **bert_config), strictly, in eval mode.
    bert_config: HF BertConfig keywords (vocab_size after the [DEC] resize) and cross_attention_freq /
    drop_path_rate; an unknown keyword is a TypeError naming it."""
    cfg = QFormerConfig(num_query_token=num_query_token, extra_num_query_token=extra_num_query_token,
                        vision_width=vision_width, **bert_config)
    sd = read_state_dict(src)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    sd = drop_logged(sd, CHAT_OTHER_KEYS, "chat checkpoint parts outside the Q-Former bridge")
    model = QFormer(cfg)
    check_official_keys(model, sd)
    sd, _ = check_keys(model, chat_qformer_from_official(sd))
    model.load_state_dict(sd)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# the whole chat model

VISION, PEFT_LM, PLAIN_LM = "vision_encoder.", "lm.base_model.model.", "lm."
BRIDGE = ("query_tokens", "extra_query_tokens", "vision_layernorm.", "qformer.")
# LoRA target -> (HF module under model.layers.N. or at the top, ivmini module under layers.N. or at the top)
LM_TARGETS = {**PEFT_TARGETS, "lm_head": ("lm_head", "lm_head")}
HF_TO_LM_TARGET = {hf: t for t, (hf, _) in LM_TARGETS.items()}
OURS_ADAPTER = re.compile(r"^(?:layers\.(\d+)\.)?(.+)\.lora\.(\w+)\.([AB])$")
PEFT_ADAPTER = re.compile(r"^(?:model\.layers\.(\d+)\.)?(.+)\.lora_([AB])\.default\.weight$")
# the HF InternVideo2-Chat ViT (pretrain_internvideo2_giant_patch14_224_clean with the released config.json):
# the non-fused path (exact-erf GELU), LayerScale kept in the weights' dtype, separate image position table
CHAT_VISION = dict(use_flash_attn=False, use_fused_rmsnorm=False, use_fused_mlp=False, layerscale_no_force_fp32=True,
                   sep_image_video_pos_embed=True, num_frames=8)
CHAT_QFORMER = dict(num_query_token=32, extra_num_query_token=64, vocab_size=30523)   # bert-base + [DEC]


def lm_to_official(sd, cfg, layout="new"):
    """ivmini LLM keys (+ adapters) -> HF names as peft writes them (layout "new" | "old"; None: no adapters)."""
    adapters = {k: v for k, v in sd.items() if OURS_ADAPTER.match(k)}
    if adapters and layout is None:
        raise ValueError(f"the LLM has LoRA adapters ({sorted(adapters)[:3]} ...): write it with peft_layout "
                         "'new' or 'old', or merge them first (ivmini.lora.merge_lora)")
    adapted = {LM_TARGETS[OURS_ADAPTER.match(k).group(3)][0] for k in adapters}
    out = {}
    for k, v in llm_to_hf({k: v for k, v in sd.items() if k not in adapters}, cfg).items():
        module = re.sub(r"^model\.layers\.\d+\.", "", k)[:-len(".weight")]   # self_attn.q_proj, lm_head, ...
        if layout == "new" and module in adapted:
            k = k[:-len("weight")] + "base_layer.weight"
        out[k] = v
    for k, v in adapters.items():
        n, _, target, ab = OURS_ADAPTER.match(k).groups()
        layer = f"model.layers.{n}." if n is not None else ""
        out[f"{layer}{LM_TARGETS[target][0]}.lora_{ab}.default.weight"] = v.detach().clone()
    return out


def lm_from_official(sd, cfg):
    """HF names under lm.base_model.model. or lm. (prefix stripped) -> ivmini LLM keys (+ adapters)."""
    base, adapters = {}, {}
    for k, v in sd.items():
        peft = PEFT_ADAPTER.match(k)
        if peft:
            n, hf, ab = peft.groups()
            target = HF_TO_LM_TARGET[hf]
            layer = f"layers.{n}." if n is not None else ""
            adapters[f"{layer}{LM_TARGETS[target][1]}.lora.{target}.{ab}"] = v
        else:
            base[k.replace(".base_layer.weight", ".weight")] = v
    return {**llm_from_hf(base, cfg), **adapters}


def chat_to_official(sd, llm_cfg, peft_layout="new"):
    """VideoChat keys -> the released layout. peft_layout "new" (base_layer names) or "old" puts the LLM under
    lm.base_model.model. (the adapted targets are read from the adapter keys); None writes a plain LLM under lm.
    (a merged export: no adapter may be left)."""
    if peft_layout not in ("new", "old", None):
        raise ValueError(f"peft_layout must be 'new', 'old' or None, got {peft_layout!r}")
    out = {re.sub(r"(blocks\.\d+\.ls[12])\.gamma$", r"\1", k): v for k, v in sd.items() if k.startswith(VISION)}
    out.update(chat_qformer_to_official({k[len("qformer."):]: v for k, v in sd.items() if k.startswith("qformer.")}))
    out.update({k: v for k, v in sd.items() if k.startswith(("project_up.", "project_down."))})
    prefix = PLAIN_LM if peft_layout is None else PEFT_LM
    lm = lm_to_official({k[len("lm."):]: v for k, v in sd.items() if k.startswith("lm.")}, llm_cfg, peft_layout)
    out.update({prefix + k: v for k, v in lm.items()})
    return out


def chat_from_official(sd, llm_cfg):
    """The released layout (checked by load_chat) -> VideoChat keys."""
    prefix = PEFT_LM if any(k.startswith(PEFT_LM) for k in sd) else PLAIN_LM
    out = rename_hf_layerscale({k: v for k, v in sd.items() if k.startswith(VISION)})
    bridge = chat_qformer_from_official({k: v for k, v in sd.items() if k.startswith(BRIDGE)})
    out.update({"qformer." + k: v for k, v in bridge.items()})
    out.update({k: v for k, v in sd.items() if k.startswith(("project_up.", "project_down."))})
    lm = lm_from_official({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, llm_cfg)
    out.update({"lm." + k: v for k, v in lm.items()})
    return out


def load_chat(src, *, llm, vision=None, qformer=None, lora=LoRAConfig(), merge=False, mlp_act=None):
    """load_official("chat", src, ...): the released InternVideo2-Chat state dict (see the module docstring) as a
    VideoChat, strictly, in eval mode.
    llm      the LLM (required: the file does not say it): an LLMConfig, an LLM_PRESETS name or an HF config dict
             (Mistral-7B-Instruct-v0.3's config.json for the release)
    vision   the HF ViT's constructor keywords over CHAT_VISION (official_config's names; depth is the encoder's
             full depth, 40 for the 1B: the file holds depth - 1 blocks); x_vis_return_idx (-2) and x_vis_only
             (True) are accepted with those values only
    qformer  QFormerConfig keywords over CHAT_QFORMER (HF BertConfig's; vision_width defaults to the ViT's width),
             or a QFormerConfig
    lora     the LLM's adapters (LoRAConfig(): the release's r 16, alpha 32, dropout 0.1 on q, k, v, o, gate, up,
             down, lm_head; the file must hold exactly these), or None for a plain LLM under lm.
    merge    fold the adapters into the base weights after loading (a plain LLM for inference)
    mlp_act  the ViT's MLP activation; default the HF code's non-fused nn.GELU ("gelu"), "gelu_tanh" to match a
             run with flash-attn's FusedMLP"""
    vision = {**CHAT_VISION, **(vision or {})}
    for name, want in (("x_vis_return_idx", -2), ("x_vis_only", True)):
        if vision.pop(name, want) != want:
            raise ValueError(f"the chat model reads the penultimate block unpooled: {name} must be {want}")
    vision_cfg = official_config("stage2_vision", mlp_act=mlp_act, **vision)
    if not isinstance(qformer, QFormerConfig):
        qformer = QFormerConfig(**{**CHAT_QFORMER, "vision_width": vision_cfg.embed_dim, **(qformer or {})})
    llm_cfg = _text_config(llm)
    sd = read_state_dict(src)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    lm_prefix = PLAIN_LM if lora is None else PEFT_LM
    rotary = [k for k in sd if k.startswith(lm_prefix) and ROTARY_BUFFER.match(k[len(lm_prefix):])]
    if rotary:
        log.info("dropped %d rotary_emb.inv_freq buffer(s): recomputed from rope_theta", len(rotary))
    sd = {k: v for k, v in sd.items() if k not in rotary and not k.endswith("embeddings.position_ids")}

    with torch.device("meta"):            # no time or memory spent initialising weights that are overwritten
        model = VideoChat(vision_cfg, qformer, llm_cfg)
        if lora is not None:
            apply_lora(model.lm, lora)
    layout = None if lora is None else "new" if any(".base_layer." in k for k in sd) else "old"
    want = {k: v.shape for k, v in chat_to_official(model.state_dict(), llm_cfg, layout).items()
            if not k.endswith("embeddings.position_ids")}          # a buffer upstream: optional in the file
    problems = key_problems(want, sd)
    if problems:
        hint = (f"; the position table loads as it is: the model's pos_embed is {tuple(want[VISION + 'pos_embed'])}"
                f" ({vision_cfg.num_frames} frames), set vision=dict(num_frames=...) to the file's"
                if "pos_embed: checkpoint" in problems else "")
        raise KeyError(f"checkpoint does not match InternVideo2-Chat ("
                       f"{'plain LLM under lm.' if layout is None else f'peft layout {layout!r}'}, LoRA "
                       f"{list(lora.targets) if lora else 'off'}; LLM {llm_cfg.num_hidden_layers} layers x "
                       f"{llm_cfg.hidden_size}; Q-Former {qformer.num_hidden_layers} layers x {qformer.hidden_size}; "
                       f"vision {vision_cfg.depth - 1} blocks x {vision_cfg.embed_dim}): {problems}{hint}")
    sd, _ = check_keys(model, chat_from_official(sd, llm_cfg))
    model.to_empty(device="cpu")
    model.load_state_dict(sd, strict=True)
    if merge:
        merge_lora(model.lm)                # an error naming the model when there are no adapters (lora=None)
    return model.eval()
