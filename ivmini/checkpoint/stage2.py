"""Stage-2 checkpoints: the official InternVideo2_Stage2_visual layout <-> ivmini.align.VideoTextModel, and the
stage-2 vision encoder's initialisation from stage 1.

    load_stage2(src, vision=, text=, embed_dim=, temp=, mlp_act=)   load_official("stage2", ...), strict
    stage2_from_official(sd, cfg) / stage2_to_official(sd)          the key maps
    stage2_kwargs(cfg)                                              load_official arguments for an AlignConfig
    init_vision_from_stage1(model, src)                             stage-1 run / export -> model.vision_encoder

Official stage-2 keys (MM models/internvideo2_stage2_visual.py, 1B):
    vision_encoder.*    multi_modality PretrainInternVideo2, the unused clip_decoder / final_clip_decoder /
                        clip_pos_embed (+ img_pos_embed / clip_img_pos_embed) included: ivmini's names
    text_encoder.bert.* / text_encoder.cls.*   xbert BertForMaskedLM: ivmini/checkpoint/text.py's map
    vision_proj.*, text_proj.*, itm_head.*      the same names
    temp                0-d in the official file, (1,) in ivmini (FSDP2 shards no 0-d parameter)

Initialisation from stage 1 (official pretrain_internvideo2_1b_patch14_224): the stage-1 file is loaded into the
stage-2 vision encoder after resizing its position tables from the file's frame count (8) to the model's (4).
The stage-1 motion-teacher decoder (mae_decoder.*, mae_pos_embed) is dropped by name; the CLIP decoders are kept
(loaded, unused). A stage-1 file has no image tables, so with sep_image_video_pos_embed the official model keeps
its own initialisation of img_pos_embed / clip_img_pos_embed: the one-frame 3D sin-cos table (time row 0). The
official code does this implicitly (strict=False); here it is the one named exception, and any other missing,
unexpected or mis-shaped key is an error naming it.
Tests: tests/test_align.py.
"""
import dataclasses
import logging
import os

import torch

from ..align import AlignConfig, VideoTextModel
from ..text import BertConfig
from .internvideo2 import official_config, official_kwargs, rename_hf_layerscale, resize_pos_embeds
from .state_dicts import check_keys, read_state_dict, select_prefix
from .text import bert_from_official, bert_to_official

log = logging.getLogger("ivmini.checkpoint")

TIED = "text_encoder.cls.decoder.weight"        # the word embedding matrix (tied), never read from a file
STAGE1_ONLY = ("mae_decoder.", "mae_pos_embed")  # stage-1 parts the stage-2 vision encoder does not have
IMAGE_TABLES = ("img_pos_embed", "clip_img_pos_embed")


def _split(sd, prefix):
    """(the keys under prefix with it stripped, the other keys)."""
    inside = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return inside, {k: v for k, v in sd.items() if not k.startswith(prefix)}


def stage2_from_official(sd, cfg: AlignConfig, orig_t_size=None):
    """Official stage-2 keys -> VideoTextModel keys. Position tables of another frame count or resolution are
    resized (as load_official's vision kinds); unknown keys pass through for the strict check to name."""
    vision, rest = _split(sd, "vision_encoder.")
    text, rest = _split(rest, "text_encoder.")
    vision = resize_pos_embeds(rename_hf_layerscale(vision), cfg.vision, orig_t_size)
    out = {**{"vision_encoder." + k: v for k, v in vision.items()},
           **{"text_encoder." + k: v for k, v in bert_from_official(text).items()}, **rest}
    if "temp" in out and out["temp"].dim() == 0:
        out["temp"] = out["temp"].reshape(1)                              # () -> (1,)
    return out


def stage2_to_official(sd):
    """VideoTextModel keys -> the official stage-2 layout (the text tower as transformers 4.28 writes it)."""
    text, rest = _split(sd, "text_encoder.")
    out = {**rest, **{"text_encoder." + k: v for k, v in bert_to_official(text).items()}}
    out["temp"] = out["temp"].reshape(())                                  # (1,) -> ()
    seen = set()      # one tensor under two names (the MLM bias and its decoder.bias alias): copies, for safetensors
    for k, v in out.items():
        if v.untyped_storage().data_ptr() in seen:
            out[k] = v.clone()
        seen.add(out[k].untyped_storage().data_ptr())
    return out


def load_stage2(state_dict_or_path, *, vision, text, embed_dim=512, temp=0.07, mlp_act=None, orig_t_size=None,
                weights_only=True, **align) -> VideoTextModel:
    """load_official("stage2", ...): the ivmini VideoTextModel equal to InternVideo2_Stage2_visual, loaded strictly.

    vision: the official multi_modality PretrainInternVideo2 keywords (as load_official("stage2_vision"));
    text: BertConfig keywords (encoder_width = the vision embed_dim, fusion_layer set); embed_dim, temp: the
    official model config's; mlp_act: as for the vision kinds; **align: other AlignConfig fields (loss weights,
    mask ratios, token ids). Containers {'model'|'module'} and a leading `module.` are unwrapped."""
    cfg = AlignConfig(vision=official_config("stage2_vision", mlp_act=mlp_act, **vision), bert=BertConfig(**text),
                      embed_dim=embed_dim, temp=temp, **align)
    sd = read_state_dict(state_dict_or_path, weights_only=weights_only)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    sd = stage2_from_official(sd, cfg, orig_t_size)
    with torch.device("meta"):            # no time spent initialising weights that are overwritten
        model = VideoTextModel(cfg)
    sd, _ = check_keys(model, sd, ignore=[TIED])
    model.to_empty(device="cpu")
    # to_empty gives every parameter its own storage: tie the MLM decoder to the word embeddings again
    mlm = model.text_encoder
    mlm.cls.decoder.weight = mlm.bert.embeddings.word_embeddings.weight
    model.load_state_dict(sd, strict=False)   # strict above; only the tied decoder weight is not in sd
    return model.eval()


def stage2_kwargs(cfg: AlignConfig):
    """The load_official("stage2", path, **kwargs) arguments that rebuild a model of this AlignConfig."""
    vision = {k: v for k, v in official_kwargs(cfg.vision).items() if not k.startswith("mae_") and k != "mlp_act"}
    vision["sep_image_video_pos_embed"] = cfg.vision.sep_image_video_pos_embed
    align = {k: getattr(cfg, k) for k in ("loss_vtc", "loss_vtm", "loss_mlm", "mlm_prob", "vtm_hard_negatives",
                                           "video_mask_ratio", "image_mask_ratio", "cls_token_id", "mask_token_id",
                                           "text_pool")}
    return dict(vision=vision, text=dataclasses.asdict(cfg.bert), embed_dim=cfg.embed_dim, temp=cfg.temp,
                mlp_act=cfg.vision.mlp_act, **align)


def init_vision_from_stage1(model: VideoTextModel, src, orig_t_size=None):
    """Load a stage-1 checkpoint into model.vision_encoder (see the module docstring), in place.

    src: a state dict, a file (an export in the official stage-1 layout, or an official stage-1 release), or a
    stage-1 run / checkpoints / step_* folder (its newest checkpoint). Returns the list of keys that kept the
    model's initialisation (the image tables, when the model has them)."""
    if isinstance(src, (str, os.PathLike)) and os.path.isdir(src):
        from ..dist import consolidate, latest_checkpoint
        path = latest_checkpoint(src) or latest_checkpoint(os.path.join(src, "checkpoints"))
        if path is None:
            raise FileNotFoundError(f"no complete stage-1 checkpoint in {src}")
        src = consolidate(path)
    what = src if isinstance(src, (str, os.PathLike)) else "the stage-1 state dict"
    sd = rename_hf_layerscale(select_prefix(read_state_dict(src), "auto"))
    dropped = sorted(k for k in sd if k.startswith(STAGE1_ONLY))
    sd = {k: v for k, v in sd.items() if k not in dropped}
    if dropped:
        log.info("stage-1 init: dropped the motion-teacher decoder (%d keys: mae_decoder.*, mae_pos_embed)",
                 len(dropped))
    encoder = model.vision_encoder
    try:
        sd = resize_pos_embeds(sd, encoder.cfg, orig_t_size)
        sd, kept = check_keys(encoder, sd, ignore=[k for k in IMAGE_TABLES if k not in sd])
    except (KeyError, ValueError) as e:
        raise ValueError(f"{what} does not fit the stage-2 vision encoder ({encoder.cfg.depth} blocks of width "
                         f"{encoder.cfg.embed_dim}, {encoder.cfg.num_frames} frames, {encoder.cfg.img_size} px): "
                         f"{e}") from e
    with torch.no_grad():
        encoder.load_state_dict(sd, strict=False)   # strict above; the image tables keep their sin-cos init
    if kept:
        log.info("stage-1 init: %s keep their 1-frame sin-cos initialisation (a stage-1 file has no image tables)",
                 ", ".join(kept))
    return kept
