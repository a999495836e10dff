"""Checkpoint I/O: every file format and key map ivmini reads or writes, strictly, without flash_attn /
apex / deepspeed. Models know tensors (their parameter names are chosen so each map is short); this
package knows files. One module per source, everything importable from ivmini.checkpoint:

    state_dicts.py     reading and checking: read_state_dict, select_prefix, check_keys (every loader's)
    internvideo2.py    InternVideo2 releases: load_official(kind, state_dict_or_path, **official_ctor_kwargs);
                       export: a training run -> one file in the official stage-1 layout
                       (python -m ivmini.checkpoint export RUN OUT)
    teachers.py        stage-1 teachers: load_internvl_c, load_videomae_v2, load_openai_clip_visual, build_teachers
    stage2.py          stage 2: load_stage2 (kind "stage2"), its key maps and export arguments, init_vision_from_stage1
    beats.py           the BEATs audio tower: load_beats (kind "beats"), beats_from_official

Loading is strict everywhere: every missing, unexpected or mis-shaped key is an error that names it,
unless it matches a pattern in `ignore=` (fnmatch syntax; ignored keys keep the model's own values).
Keys that belong to other parts of a file (a text tower, an MAE decoder) are dropped by name, listed
in the *_KEYS constants; any other unknown key is an error. Containers {'model'|'module'|'state_dict':
...} are unwrapped; `.pt/.pth` files are read with torch.load(weights_only=True).

load_official kinds (the official class each reproduces, key for key):
    "stage1_pretrain"  single_modality PretrainInternVideo2 (student + clip/mae decoders)
    "finetune"         single_modality InternVideo2 (fc_norm + head)
    "stage2_vision"    multi_modality PretrainInternVideo2 (backbone + clip decoders [+ image pos embeds])
    "clip_vision"      multi_modality InternVideo2 of the CLIP variant (backbone + pool)
    "bert_mlm"         xbert BertForMaskedLM (bert.* + cls.*), keywords: BertConfig's (text.py: load_bert_mlm)
    "stage2"           InternVideo2_Stage2_visual (vision_encoder.*, text_encoder.{bert,cls}.*, vision_proj,
                       text_proj, itm_head, temp), keywords vision= (stage2_vision's), text= (BertConfig's),
                       embed_dim=, temp=, mlp_act= (stage2.py: load_stage2)
    "beats"            BEATs (InternVideo2 backbones/beats): a {'cfg', 'model'} file, or a state dict with
                       BEATsConfig fields as keywords (beats.py: load_beats)
    "chat_qformer"     the InternVideo2-Chat-8B bridge (query_tokens, extra_query_tokens, vision_layernorm.*,
                       qformer.bert.*), keywords num_query_token=, extra_num_query_token=, vision_width=, BertConfig's
                       (chat.py: load_chat_qformer)
    "chat"             InternVideo2-Chat-8B as a VideoChat (vision_encoder.* with 39 blocks and bare ls1/ls2,
                       the bridge above, project_up/project_down, lm.base_model.model.* the peft-wrapped Mistral, old
                       or new peft layout), keywords llm= (an LLMConfig, preset or HF config dict), vision= (the
                       HF ViT's), qformer=, lora= (LoRAConfig or None), merge= (chat.py: load_chat)
    "clip"             InternVideo2-CLIP (vision_encoder.*, text_encoder.transformer.* the LLaMA text tower with
                       peft LoRA names, text_encoder.text_projection, temp), keywords vision= (clip_vision's),
                       text= (an LLMConfig, preset or HF config dict) (clip.py: load_clip)
    "llm"              HF Llama/Mistral (LlamaForCausalLM keys): a directory (config.json + model.safetensors or
                       shards + index), or a file / state dict with config= (llm.py: load_llm)
The keyword arguments are the official constructor's, with the official defaults; an unknown one is
an error. ivmini adds `mlp_act` ("gelu_tanh" | "gelu"; default: tanh when use_fused_mlp, which is the
official default and what the released weights were trained with) and `orig_t_size` (frames of the
checkpoint's position table, only needed when both frames and resolution differ). Prefixes are
handled by `prefix=` ("auto": a leading `module.`; then the `vision_encoder.` sub-dict if there is
one, else per-key `backbone.`/`encoder.` as the official fine-tune loader does). The HF chat naming
`blocks.N.ls1` is mapped to `blocks.N.ls1.gamma`. Position tables of another frame count or
resolution are resized (linear in time, bicubic in space). The model is returned in eval mode.

Stage-1 teacher loaders (models in ivmini/teachers.py; teachers are returned frozen, in eval mode):
    load_internvl_c(teacher, src)          InternVL-C {'module': ...}: drops the text tower (transformer.*,
                                           text_projection, logit_scale); 2-D patch conv -> Conv3d; pos resize
    load_videomae_v2(teacher, src)         VideoMAEv2 {'model': ...}: keeps encoder.*, drops decoder.*,
                                           encoder_to_decoder.*, mask_token; q_bias/v_bias -> qkv.bias;
                                           position table: the official rule (teachers.videomae_pos_table)
    load_openai_clip_visual(teacher, src)  OpenAI CLIP: keeps visual.*, drops the text tower; resblocks -> blocks
    build_teachers(...)                    both teachers, real (paths) or small random ones (smoke runs)
"""
from ..teachers import sinusoid_table
from .internvideo2 import (OFFICIAL_KWARGS, export, load_vision, official_config, official_kwargs,
                           rename_hf_layerscale, resize_pos_embeds)
from .state_dicts import check_keys, read_state_dict, select_prefix
from .text import bert_from_official, bert_to_official, load_bert_mlm, load_hf_bert, minilm_path
from .beats import beats_from_official, load_beats
from .llm import llm_config_from_hf, llm_from_hf, llm_to_hf, load_llm, save_hf
from .chat import (chat_from_official, chat_qformer_from_official, chat_qformer_to_official, chat_to_official,
                   load_chat, load_chat_qformer)
from .clip import clip_from_official, clip_to_official, load_clip
from .stage2 import init_vision_from_stage1, load_stage2, stage2_from_official, stage2_kwargs, stage2_to_official
from .teachers import (INTERNVL_C_TEXT_KEYS, OPENAI_CLIP_TEXT_KEYS, VIDEOMAE_V2_OTHER_KEYS, build_teachers,
                       inflate_patch_weight, load_internvl_c, load_openai_clip_visual, load_videomae_v2)

# load_official kind -> loader(state_dict_or_path, **keywords); the vision kinds share one loader
LOADERS = {kind: (lambda src, _kind=kind, **kw: load_vision(_kind, src, **kw)) for kind in OFFICIAL_KWARGS}
LOADERS["bert_mlm"] = load_bert_mlm
LOADERS["stage2"] = load_stage2
LOADERS["beats"] = load_beats
LOADERS["llm"] = load_llm
LOADERS["chat_qformer"] = load_chat_qformer
LOADERS["chat"] = load_chat
LOADERS["clip"] = load_clip


def load_official(kind, state_dict_or_path, **kwargs):
    """The ivmini model equal to the official class of `kind` (see the module docstring), loaded strictly from a
    state dict or a file."""
    if kind not in LOADERS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; choose one of {sorted(LOADERS)}")
    return LOADERS[kind](state_dict_or_path, **kwargs)


__all__ = ["LOADERS", "load_vision", "read_state_dict", "select_prefix", "check_keys", "OFFICIAL_KWARGS",
           "official_config", "load_official", "rename_hf_layerscale", "resize_pos_embeds", "official_kwargs",
           "export", "INTERNVL_C_TEXT_KEYS", "VIDEOMAE_V2_OTHER_KEYS", "OPENAI_CLIP_TEXT_KEYS",
           "inflate_patch_weight", "load_internvl_c", "load_videomae_v2", "load_openai_clip_visual",
           "build_teachers", "sinusoid_table", "bert_from_official", "bert_to_official", "load_bert_mlm",
           "load_hf_bert", "minilm_path", "load_stage2", "stage2_from_official", "stage2_to_official",
           "stage2_kwargs", "init_vision_from_stage1", "load_beats", "beats_from_official",
           "load_llm", "llm_config_from_hf", "llm_from_hf", "llm_to_hf", "save_hf",
           "load_chat_qformer", "chat_qformer_from_official", "chat_qformer_to_official",
           "load_chat", "chat_from_official", "chat_to_official",
           "load_clip", "clip_from_official", "clip_to_official"]
