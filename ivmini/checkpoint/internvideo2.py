"""InternVideo2 releases: load_official builds the ivmini model equal to an official class and loads a
released checkpoint into it strictly; export writes a training run as one file in the official stage-1
layout (the kinds and keyword arguments are described in ivmini/checkpoint/__init__.py)."""
import json
import logging
import math
import os
import re

import torch

from ..config import VisionConfig
from ..vit import VideoViT, interpolate_pos_embed
from .state_dicts import check_keys, read_state_dict, select_prefix

log = logging.getLogger("ivmini.checkpoint")

# The official constructors' keywords and defaults, per kind (single_modality models/internvideo2.py,
# internvideo2_pretrain.py; multi_modality backbones/internvideo2/internvideo2.py, internvideo2_clip_vision.py)
_BACKBONE = dict(in_chans=3, patch_size=14, img_size=224, qkv_bias=False, drop_path_rate=0.25, embed_dim=1408,
                 num_heads=16, mlp_ratio=48 / 11, init_values=1e-5, qk_normalization=True, depth=40,
                 use_flash_attn=True, use_fused_rmsnorm=True, use_fused_mlp=True, fused_mlp_heuristic=1,
                 attn_pool_num_heads=16, clip_embed_dim=768, layerscale_no_force_fp32=False, num_frames=8,
                 tubelet_size=1, sep_pos_embed=False, use_checkpoint=False, checkpoint_num=0)
_CLIP_HEADS = dict(clip_teacher_embed_dim=3200, clip_teacher_final_dim=768, clip_norm_type="l2",
                   clip_return_layer=1, clip_student_return_interval=1)
_MAE_HEADS = dict(mae_teacher_embed_dim=1408, mae_norm_type="l2", mae_return_layer=1, mae_student_return_interval=1)
OFFICIAL_KWARGS = {
    "stage1_pretrain": dict(_BACKBONE, mlp_ratio=4.3637, **_CLIP_HEADS, **_MAE_HEADS),
    "finetune": dict(_BACKBONE, mlp_ratio=4.3637, head_drop_path_rate=0.0, fc_drop_rate=0.0, num_classes=1000,
                     init_scale=0.001),
    "stage2_vision": dict(_BACKBONE, sep_image_video_pos_embed=False, **_CLIP_HEADS),
    "clip_vision": dict(_BACKBONE, head_drop_path_rate=0.0),
}
_HEADS = {"stage1_pretrain": "distill", "finetune": "classify", "stage2_vision": "align", "clip_vision": "none"}
# use_flash_attn, use_fused_rmsnorm, fused_mlp_heuristic, head_drop_path_rate, use_checkpoint and
# checkpoint_num are accepted and have no effect here: fused kernels are ivmini's backend choice, activation
# checkpointing is the trainer's (train.py --act-ckpt, on every Block), and the pool's drop path is constructed
# but never applied by the official code. use_fused_mlp does matter: it picks the MLP activation (tanh-GELU).


def official_config(kind, mlp_act=None, clip_decoder_mlp=False, **kwargs) -> VisionConfig:
    """VisionConfig equal to the official constructor called with `kwargs` for `kind`. ivmini's clip_decoder_mlp
    (with mae_return_layer=0) is the distilled S/B/L student's layout: MLP clip decoders, no MAE branch."""
    if kind not in OFFICIAL_KWARGS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; choose one of {sorted(OFFICIAL_KWARGS)}")
    unknown = sorted(set(kwargs) - set(OFFICIAL_KWARGS[kind]))
    if unknown:
        raise TypeError(f"load_official({kind!r}): unknown keyword(s) {unknown}; the official constructor takes "
                        f"{sorted(OFFICIAL_KWARGS[kind])} (plus ivmini's mlp_act, clip_decoder_mlp, orig_t_size)")
    a = dict(OFFICIAL_KWARGS[kind], **kwargs)
    if a["sep_pos_embed"]:
        raise ValueError("sep_pos_embed=True is not supported: no released InternVideo2 checkpoint uses it")
    cfg = dict(
        img_size=a["img_size"], patch_size=a["patch_size"], in_chans=a["in_chans"], embed_dim=a["embed_dim"],
        depth=a["depth"], num_heads=a["num_heads"], mlp_ratio=a["mlp_ratio"],
        mlp_act=mlp_act or ("gelu_tanh" if a["use_fused_mlp"] else "gelu"),
        qkv_bias=a["qkv_bias"], qk_norm=a["qk_normalization"], init_values=a["init_values"] or 0.0,
        layerscale_fp32=not a["layerscale_no_force_fp32"], num_frames=a["num_frames"],
        tubelet_size=a["tubelet_size"], drop_path_rate=a["drop_path_rate"],
        attn_pool_num_heads=a["attn_pool_num_heads"], clip_embed_dim=a["clip_embed_dim"], heads=_HEADS[kind],
        sep_image_video_pos_embed=a.get("sep_image_video_pos_embed", False), clip_decoder_mlp=clip_decoder_mlp)
    for name in ("clip_teacher_embed_dim", "clip_teacher_final_dim", "clip_return_layer",
                 "clip_student_return_interval", "clip_norm_type", "mae_teacher_embed_dim", "mae_return_layer",
                 "mae_student_return_interval", "mae_norm_type", "num_classes", "fc_drop_rate"):
        if name in a:
            cfg[name] = a[name]
    if "init_scale" in a:
        cfg["head_init_scale"] = a["init_scale"]
    return VisionConfig(**cfg)


def rename_hf_layerscale(sd):
    """HF InternVideo2-Chat stores LayerScale as bare `blocks.N.ls1` / `ls2`: map to `.gamma`."""
    return {(k + ".gamma" if re.fullmatch(r"(.*\.)?blocks\.\d+\.ls[12]", k) else k): v for k, v in sd.items()}


def resize_pos_embeds(sd, cfg: VisionConfig, orig_t_size=None):
    """Resize every position table in `sd` whose length differs from the model's (see interpolate_pos_embed).
    Without orig_t_size, the checkpoint's frames x grid is inferred keeping either the frame count or
    the resolution of the model; if neither or both fit, orig_t_size must be given."""
    video = {"pos_embed": 1, "clip_pos_embed": 1, "mae_pos_embed": 0}   # name -> number of extra (CLS) rows
    image = {"img_pos_embed", "clip_img_pos_embed"}
    for name, table in list(sd.items()):
        if name not in video and name not in image:
            continue
        extra = 0 if name == "mae_pos_embed" else 1
        t_new = 1 if name in image else cfg.t_size
        n = table.shape[1] - extra
        if table.dim() != 3 or n == t_new * cfg.grid ** 2:
            continue
        if name in image:
            candidates = [(1, math.isqrt(n))] if math.isqrt(n) ** 2 == n else []
        elif orig_t_size is not None:
            g = math.isqrt(n // orig_t_size)
            candidates = [(orig_t_size, g)] if orig_t_size * g * g == n else []
        else:
            candidates = []
            if n % t_new == 0 and math.isqrt(n // t_new) ** 2 == n // t_new:
                candidates.append((t_new, math.isqrt(n // t_new)))      # same frames, other resolution
            if n % cfg.grid ** 2 == 0:
                candidates.append((n // cfg.grid ** 2, cfg.grid))       # same resolution, other frames
        if len(candidates) != 1:
            raise ValueError(f"cannot tell the frames x grid of checkpoint {name} {tuple(table.shape)} "
                             f"(model: {t_new} x {cfg.grid}x{cfg.grid}); pass orig_t_size=")
        t0, g0 = candidates[0]
        log.info("resizing %s from %d frames x %dx%d to %d x %dx%d", name, t0, g0, g0, t_new, cfg.grid, cfg.grid)
        sd[name] = interpolate_pos_embed(table, t0, g0, t_new, cfg.grid, cls_token=bool(extra))
    return sd


def load_vision(kind, state_dict_or_path, *, prefix="auto", ignore=(), orig_t_size=None, weights_only=True,
                **official_kwargs) -> VideoViT:
    """Build the ivmini video encoder equal to the official `kind` class (one of OFFICIAL_KWARGS) and load the
    checkpoint strictly (load_official's vision kinds)."""
    cfg = official_config(kind, **official_kwargs)
    sd = read_state_dict(state_dict_or_path, weights_only=weights_only)
    sd = rename_hf_layerscale(select_prefix(sd, prefix))
    sd = resize_pos_embeds(sd, cfg, orig_t_size)
    with torch.device("meta"):            # no time spent initialising weights that are overwritten
        model = VideoViT(cfg)
    sd, not_loaded = check_keys(model, sd, ignore)
    model.to_empty(device="cpu")
    if not_loaded:
        model.init_weights()
        log.info("kept the initialisation of %d ignored key(s): %s", len(not_loaded), ", ".join(not_loaded[:10]))
    model.load_state_dict(sd, strict=False)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# export: a training checkpoint -> one file in the official stage-1 layout

def official_kwargs(cfg: VisionConfig):
    """The official PretrainInternVideo2 (single_modality) keyword arguments equal to a distill VisionConfig,
    plus ivmini's mlp_act: load_official("stage1_pretrain", path, **official_kwargs(cfg)) rebuilds the model."""
    return dict(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, embed_dim=cfg.embed_dim,
                depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
                qk_normalization=cfg.qk_norm, init_values=cfg.init_values, num_frames=cfg.num_frames,
                tubelet_size=cfg.tubelet_size, drop_path_rate=cfg.drop_path_rate,
                attn_pool_num_heads=cfg.attn_pool_num_heads, clip_embed_dim=cfg.clip_embed_dim,
                layerscale_no_force_fp32=not cfg.layerscale_fp32,
                clip_teacher_embed_dim=cfg.clip_teacher_embed_dim, clip_teacher_final_dim=cfg.clip_teacher_final_dim,
                clip_norm_type=cfg.clip_norm_type, clip_return_layer=cfg.clip_return_layer,
                clip_student_return_interval=cfg.clip_student_return_interval,
                mae_teacher_embed_dim=cfg.mae_teacher_embed_dim, mae_norm_type=cfg.mae_norm_type,
                mae_return_layer=cfg.mae_return_layer, mae_student_return_interval=cfg.mae_student_return_interval,
                mlp_act=cfg.mlp_act, clip_decoder_mlp=cfg.clip_decoder_mlp)


def export(ckpt, out):
    """Consolidate a sharded training checkpoint (a step_* directory, or a run folder: its newest
    checkpoint) into `out` (.pt: a plain state dict with the official key names, or .safetensors) and write
    the load_official kind and arguments next to it (`out` with .json). A stage-1 run (meta.json's
    model_config a VisionConfig) gives the stage-1 layout; a stage-2 run (an AlignConfig, with a "bert"
    entry) the official stage-2 layout (ivmini/checkpoint/stage2.py). Returns (checkpoint path, kind, kwargs)."""
    from ..dist import consolidate, latest_checkpoint
    path = latest_checkpoint(ckpt) or latest_checkpoint(os.path.join(ckpt, "checkpoints"))
    if path is None:
        raise FileNotFoundError(f"no complete checkpoint at {ckpt}")
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    state = {k: v.detach().clone().contiguous() for k, v in consolidate(path).items()}
    if "bert" in meta["model_config"]:           # stage 2: train.py writes the trained model's AlignConfig
        from ..align import AlignConfig
        from .stage2 import stage2_kwargs, stage2_to_official
        kind, cfg = "stage2", AlignConfig(**meta["model_config"])
        state, kwargs = stage2_to_official(state), stage2_kwargs(cfg)
    else:                                        # stage 1: the student's VisionConfig
        kind, kwargs = "stage1_pretrain", official_kwargs(VisionConfig(**meta["model_config"]))
    tmp = out + ".tmp"
    if out.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(state, tmp)
    else:
        torch.save(state, tmp)
    os.replace(tmp, out)
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump({"kind": kind, "step": meta["step"], "kwargs": kwargs}, f, indent=1)
    return path, kind, kwargs
