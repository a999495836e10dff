"""Loading released InternVideo2 checkpoints, strictly, without flash_attn / apex / deepspeed.

    model = load_official(kind, state_dict_or_path, **official_ctor_kwargs)

kind (the official class it reproduces, key for key):
    "stage1_pretrain"  single_modality PretrainInternVideo2 (student + clip/mae decoders)
    "finetune"         single_modality InternVideo2 (fc_norm + head)
    "stage2_vision"    multi_modality PretrainInternVideo2 (backbone + clip decoders [+ image pos embeds])
    "clip_vision"      multi_modality InternVideo2 of the CLIP variant (backbone + pool)

The keyword arguments are the official constructor's, with the official defaults; an unknown one
is an error. ivmini adds `mlp_act` ("gelu_tanh" | "gelu"; default: tanh when use_fused_mlp, which is
the official default and what the released weights were trained with) and `orig_t_size` (frames of
the checkpoint's position table, only needed when both frames and resolution differ).

Loading is strict: every missing, unexpected or mis-shaped key is an error that names it, unless it
matches a pattern in `ignore=` (fnmatch syntax; ignored keys keep the model's initialisation).
Containers {'model'|'module'|'state_dict': ...} are unwrapped; prefixes are handled by `prefix=`
("auto": a leading `module.`; then the `vision_encoder.` sub-dict if there is one, else per-key
`backbone.`/`encoder.` as the official fine-tune loader does). The HF chat naming `blocks.N.ls1` is
mapped to `blocks.N.ls1.gamma`. Position tables of another frame count or resolution are resized
(linear in time, bicubic in space). `.pt/.pth` files are read with torch.load(weights_only=True).
The model is returned in eval mode.
"""
import fnmatch
import logging
import math
import os
import re

import torch

from .config import VisionConfig
from .vit import VideoViT, interpolate_pos_embed

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
# accepted for API compatibility, no effect here: fused kernels are ivmini's backend choice, the pool's
# drop path is constructed but never applied by the official code
_NO_EFFECT = ("use_flash_attn", "use_fused_rmsnorm", "fused_mlp_heuristic", "head_drop_path_rate")


def official_config(kind, mlp_act=None, **kwargs) -> VisionConfig:
    """VisionConfig equal to the official constructor called with `kwargs` for `kind`."""
    if kind not in OFFICIAL_KWARGS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; choose one of {sorted(OFFICIAL_KWARGS)}")
    unknown = sorted(set(kwargs) - set(OFFICIAL_KWARGS[kind]))
    if unknown:
        raise TypeError(f"load_official({kind!r}): unknown keyword(s) {unknown}; the official constructor "
                        f"takes {sorted(OFFICIAL_KWARGS[kind])} (plus ivmini's mlp_act, orig_t_size)")
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
        checkpoint_num=a["checkpoint_num"] if a["use_checkpoint"] else 0,
        attn_pool_num_heads=a["attn_pool_num_heads"], clip_embed_dim=a["clip_embed_dim"], heads=_HEADS[kind],
        sep_image_video_pos_embed=a.get("sep_image_video_pos_embed", False))
    for name in ("clip_teacher_embed_dim", "clip_teacher_final_dim", "clip_return_layer",
                 "clip_student_return_interval", "clip_norm_type", "mae_teacher_embed_dim", "mae_return_layer",
                 "mae_student_return_interval", "mae_norm_type", "num_classes", "fc_drop_rate"):
        if name in a:
            cfg[name] = a[name]
    if "init_scale" in a:
        cfg["head_init_scale"] = a["init_scale"]
    return VisionConfig(**cfg)


# ---------------------------------------------------------------------------------------------
# reading and normalising state dicts

def read_state_dict(src, weights_only=True):
    """A state dict from a path (.safetensors, or .pt/.pth/.bin via torch.load) or a dict; containers
    {'model'|'module'|'state_dict': {...}} are unwrapped."""
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            sd = load_file(path)
        else:
            try:
                sd = torch.load(path, map_location="cpu", weights_only=weights_only)
            except Exception as e:  # torch raises UnpicklingError and others; re-raise with the file named
                raise RuntimeError(f"could not read checkpoint {path} with torch.load(weights_only={weights_only}): "
                                   f"{e}. If the file holds other Python objects and you trust it, pass "
                                   f"weights_only=False.") from e
    else:
        sd = src
    if not isinstance(sd, dict):
        raise TypeError(f"checkpoint is a {type(sd).__name__}, not a state dict")
    for key in ("model", "module", "state_dict"):
        if isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"checkpoint entries are not tensors: {bad[:5]}{' ...' if len(bad) > 5 else ''}")
    return dict(sd)


def select_prefix(sd, prefix="auto"):
    """Strip key prefixes. prefix="" keeps keys as they are; "name." keeps only keys under it;
    "auto" is described in the module docstring."""
    if prefix != "auto":
        if not prefix:
            return sd
        inside = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if not inside:
            raise KeyError(f"no checkpoint key starts with {prefix!r}; first keys: {list(sd)[:5]}")
        _log_left_out(sd, prefix)
        return inside
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if any(k.startswith("vision_encoder.") for k in sd):
        return select_prefix(sd, "vision_encoder.")
    return {re.sub(r"^(backbone|encoder)\.", "", k): v for k, v in sd.items()}


def _log_left_out(sd, prefix):
    others = {}
    for k in sd:
        if not k.startswith(prefix):
            label = k.split(".")[0] + (".*" if "." in k else "")
            others[label] = others.get(label, 0) + 1
    if others:
        log.info("using the keys under %r; left out (other parts of the checkpoint): %s", prefix,
                 ", ".join(f"{label} ({n})" for label, n in sorted(others.items())))


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


def check_keys(module, sd, ignore=()):
    """Fail on any missing, unexpected or mis-shaped key of `sd` for `module`, naming all of them.
    Keys matching a pattern in `ignore` are dropped from `sd` and may be missing.
    Returns (sd without the ignored keys, sorted model keys that sd does not provide)."""
    ignore = list(ignore)
    hit = lambda k: any(fnmatch.fnmatchcase(k, p) for p in ignore)  # noqa: E731
    own = module.state_dict()
    sd = {k: v for k, v in sd.items() if not hit(k)}
    missing = sorted(k for k in own if k not in sd and not hit(k))
    unexpected = sorted(k for k in sd if k not in own)
    shapes = sorted(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                    for k, v in sd.items() if k in own and v.shape != own[k].shape)
    if missing or unexpected or shapes:
        parts = [f"{what} ({len(keys)}): {', '.join(keys[:20])}{' ...' if len(keys) > 20 else ''}"
                 for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("shape mismatches", shapes)) if keys]
        raise KeyError(f"checkpoint does not match {type(module).__name__}: " + "; ".join(parts)
                       + ". Pass ignore=[...] for keys you mean to drop.")
    return sd, sorted(k for k in own if k not in sd)


def load_strict(module, sd, ignore=()):
    """load_state_dict that fails on any missing, unexpected or mis-shaped key (see check_keys);
    ignored keys keep their current values. Returns the model keys that were not loaded."""
    sd, not_loaded = check_keys(module, sd, ignore)
    module.load_state_dict(sd, strict=False)
    return not_loaded


def load_official(kind, state_dict_or_path, *, prefix="auto", ignore=(), orig_t_size=None, weights_only=True,
                  **official_kwargs) -> VideoViT:
    """Build the ivmini model equal to the official `kind` class and load the checkpoint strictly."""
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
                mlp_act=cfg.mlp_act)


def export(ckpt, out):
    """Consolidate a sharded training checkpoint (a step_* directory, or a run folder: its newest
    checkpoint) into `out` (.pt: a plain state dict with the official stage-1 key names, or .safetensors)
    and write the load_official arguments next to it (`out` with .json)."""
    import json

    from .dist import consolidate, latest_checkpoint
    path = latest_checkpoint(ckpt) or latest_checkpoint(os.path.join(ckpt, "checkpoints"))
    if path is None:
        raise FileNotFoundError(f"no complete checkpoint at {ckpt}")
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    cfg = VisionConfig(**meta["student_config"])
    state = {k: v.detach().clone().contiguous() for k, v in consolidate(path).items()}
    tmp = out + ".tmp"
    if out.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(state, tmp)
    else:
        torch.save(state, tmp)
    os.replace(tmp, out)
    kwargs = official_kwargs(cfg)
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump({"kind": "stage1_pretrain", "step": meta["step"], "kwargs": kwargs}, f, indent=1)
    return path, kwargs


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description="ivmini checkpoint tools")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="sharded training checkpoint -> one file in the official stage-1 layout")
    ex.add_argument("ckpt", help="a checkpoints/step_* directory, or a run folder (its newest checkpoint)")
    ex.add_argument("out", help="output file: .pt (plain state dict) or .safetensors")
    args = ap.parse_args(argv)
    path, kwargs = export(args.ckpt, args.out)
    print(f"exported {path} -> {args.out} ({os.path.splitext(args.out)[0]}.json holds the load_official arguments)")
    print("load it with: from ivmini.checkpoint import load_official; "
          f"load_official('stage1_pretrain', {args.out!r}, **json.load(open(...))['kwargs'])")


if __name__ == "__main__":
    main()
