"""Checkpoint I/O: every file format and key map ivmini reads or writes, strictly, without flash_attn /
apex / deepspeed. Models know tensors (their parameter names are chosen so each map is short); this
file knows files. One section per source:

    reading and checking       read_state_dict, select_prefix, check_keys: shared by every loader
    InternVideo2 releases      load_official(kind, state_dict_or_path, **official_ctor_kwargs)
    stage-1 teachers           load_internvl_c, load_videomae_v2, load_openai_clip_visual, build_teachers
    export                     a training run -> one file in the official stage-1 layout
                               (python -m ivmini.checkpoint export RUN OUT)

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
The keyword arguments are the official constructor's, with the official defaults; an unknown one is
an error. ivmini adds `mlp_act` ("gelu_tanh" | "gelu"; default: tanh when use_fused_mlp, which is the
official default and what the released weights were trained with) and `orig_t_size` (frames of the
checkpoint's position table, only needed when both frames and resolution differ). Prefixes are
handled by `prefix=` ("auto": a leading `module.`; then the `vision_encoder.` sub-dict if there is
one, else per-key `backbone.`/`encoder.` as the official fine-tune loader does). The HF chat naming
`blocks.N.ls1` is mapped to `blocks.N.ls1.gamma`. Position tables of another frame count or
resolution are resized (linear in time, bicubic in space). The model is returned in eval mode.

Stage-1 teacher loaders (models in teachers.py; teachers are returned frozen, in eval mode):
    load_internvl_c(teacher, src)          InternVL-C {'module': ...}: drops the text tower (transformer.*,
                                           text_projection, logit_scale); 2-D patch conv -> Conv3d; pos resize
    load_videomae_v2(teacher, src)         VideoMAEv2 {'model': ...}: keeps encoder.*, drops decoder.*,
                                           encoder_to_decoder.*, mask_token; q_bias/v_bias -> qkv.bias;
                                           position table: the official rule (teachers.videomae_pos_table)
    load_openai_clip_visual(teacher, src)  OpenAI CLIP: keeps visual.*, drops the text tower; resblocks -> blocks
    build_teachers(...)                    both teachers, real (paths) or small random ones (smoke runs)
"""
import fnmatch
import logging
import math
import os
import re

import torch

from .config import VisionConfig
from .teachers import (VIDEOMAE_BASE_FRAMES, ClipVisualTeacher, MotionTeacher, MultimodalTeacher,
                       resize_videomae_table, videomae_pos_table)
from .teachers import sinusoid_table  # noqa: F401  (re-exported: VideoMAE's table, next to its loader)
from .vit import VideoViT, interpolate_pos_embed

log = logging.getLogger("ivmini.checkpoint")

# ---------------------------------------------------------------------------------------------
# reading and checking state dicts

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


def _drop_keys(sd, drop, what):
    """Remove the keys matching `drop` (fnmatch), logging what was dropped."""
    dropped = {k for k in sd if any(fnmatch.fnmatchcase(k, p) for p in drop)}
    if dropped:
        groups = sorted({k.split(".")[0] for k in dropped})
        log.info("%s: dropped %d key(s) that are not the teacher: %s", what, len(dropped), ", ".join(groups))
    return {k: v for k, v in sd.items() if k not in dropped}


# ---------------------------------------------------------------------------------------------
# InternVideo2 releases: load_official

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
# stage-1 teachers (models in teachers.py)

# Keys of the teacher files that are not the teacher, dropped by name (fnmatch patterns); any other key
# that the teacher does not have is an error.
INTERNVL_C_TEXT_KEYS = ("transformer.*", "text_projection", "logit_scale")       # QLLaMA text tower of InternVL-C
VIDEOMAE_V2_OTHER_KEYS = ("decoder.*", "encoder_to_decoder.*", "mask_token")     # MAE decoder side
OPENAI_CLIP_TEXT_KEYS = ("token_embedding.*", "positional_embedding", "transformer.*", "ln_final.*",
                         "text_projection", "logit_scale", "input_resolution", "context_length", "vocab_size")


def _load_teacher(teacher, sd, what, ignore=()):
    """Strict load: every missing, unexpected or mis-shaped key is named, before any memory is allocated
    for a meta-device teacher. Keys matching `ignore` (fnmatch) may be absent or extra; the teacher's own
    values are kept for them, which a meta-device teacher does not have. Returns it frozen, in eval mode."""
    sd, not_loaded = check_keys(teacher, sd, ignore)
    if any(p.is_meta for p in teacher.parameters()):
        if not_loaded:
            raise ValueError(f"{what}: ignored keys {not_loaded[:10]} would stay uninitialised on a teacher "
                             "built on the meta device; build it on a real device")
        teacher.to_empty(device="cpu")
    if not_loaded:
        log.warning("%s: kept the teacher's own values for %d ignored key(s): %s", what, len(not_loaded),
                    ", ".join(not_loaded[:10]))
    teacher.load_state_dict(sd, strict=not not_loaded)   # with ignored keys: exactly those are skipped
    log.info("%s: loaded %d tensors into %s", what, len(sd), type(teacher).__name__)
    return teacher.requires_grad_(False).eval()


def _resize_grid(pos, grid, cls_token=True):
    """(1, [1+]g0*g0, C) table -> this grid, bicubic (the official InternViT loader's resize)."""
    g0 = round((pos.shape[1] - int(cls_token)) ** 0.5)
    if g0 == grid:
        return pos
    log.info("resizing position table from %dx%d to %dx%d", g0, g0, grid, grid)
    return interpolate_pos_embed(pos, 1, g0, 1, grid, cls_token=cls_token)


def inflate_patch_weight(w2d, t):
    """2-D patch conv (C, 3, p, p) -> Conv3d (C, 3, t, p, p), centre inflation (zeros but the middle
    frame, official `inflate_weight(center=True)`); for t = 1 this is an unsqueeze."""
    w3d = w2d.new_zeros(w2d.shape[0], w2d.shape[1], t, *w2d.shape[2:])
    w3d[:, :, t // 2] = w2d
    return w3d


def load_internvl_c(teacher: MultimodalTeacher, path_or_state_dict, *, ignore=(), weights_only=True):
    """InternVL-C (`internvl_c_13b_224px.pth`, {'module': {...}}): the vision keys sit at the top level
    next to the text tower, which is dropped by INTERNVL_C_TEXT_KEYS (`transformer.*` = QLLaMA,
    `text_projection`, `logit_scale`); any other unknown key is an error. The 2-D patch conv is
    inflated to the Conv3d and pos_embed is resized bicubically if the resolution differs."""
    sd = _drop_keys(read_state_dict(path_or_state_dict, weights_only=weights_only), INTERNVL_C_TEXT_KEYS, "InternVL-C")
    w = sd.get("patch_embed.proj.weight")
    if w is not None and w.dim() == 4:
        sd["patch_embed.proj.weight"] = inflate_patch_weight(w, teacher.cfg.tubelet_size)
    if "pos_embed" in sd:
        sd["pos_embed"] = _resize_grid(sd["pos_embed"], teacher.cfg.grid)
    return _load_teacher(teacher, sd, "InternVL-C", ignore)


def load_videomae_v2(teacher: MotionTeacher, path_or_state_dict, *, prefix="encoder.", ignore=(), weights_only=True):
    """VideoMAEv2 pre-training checkpoint ({'model': {...}}): the encoder under `encoder.`; the decoder
    side (VIDEOMAE_V2_OTHER_KEYS: decoder.*, encoder_to_decoder.*, mask_token) is dropped; any other key
    outside `prefix` is an error. blocks.N.attn.{q_bias, v_bias} -> blocks.N.attn.qkv.bias = [q; 0; v].
    Position table: VideoMAEv2's own files carry none, and the teacher gets the official table
    (teachers.videomae_pos_table); a `pos_embed` the file does carry replaces it, resized by the same
    rule (see _videomae_file_table). ignore=["pos_embed"] keeps the official table."""
    sd = read_state_dict(path_or_state_dict, weights_only=weights_only)
    if prefix:
        other = sorted(k for k in sd if not k.startswith(prefix))
        stray = [k for k in other if not any(fnmatch.fnmatchcase(k, p) for p in VIDEOMAE_V2_OTHER_KEYS)]
        if stray:
            raise KeyError(f"VideoMAEv2 checkpoint: unknown key(s) outside {prefix!r}: {', '.join(stray[:20])}")
        sd = select_prefix(sd, prefix)
    table = sd.pop("pos_embed", None)           # a fixed buffer in the teacher, not a state-dict key
    if table is not None and any(fnmatch.fnmatchcase("pos_embed", p) for p in ignore):
        log.info("VideoMAEv2: ignoring the checkpoint's pos_embed; using the official table")
        table = None
    _load_teacher(teacher, _fuse_qv_bias(sd, prefix), "VideoMAEv2", ignore)
    cfg = teacher.cfg
    with torch.no_grad():                       # after a meta build the buffer is empty until here
        teacher.pos_embed.copy_(videomae_pos_table(cfg) if table is None else _videomae_file_table(table, cfg))
    return teacher


def _fuse_qv_bias(sd, prefix):
    """blocks.N.attn.{q_bias, v_bias} -> blocks.N.attn.qkv.bias = [q_bias; 0; v_bias]; other keys unchanged."""
    out = {}
    for k, v in sd.items():
        m = re.fullmatch(r"(blocks\.\d+\.attn\.)([qv])_bias", k)
        if m is None:
            out[k] = v
            continue
        if m.group(2) == "v":
            continue                                   # handled with its q_bias
        v_key = m.group(1) + "v_bias"
        if v_key not in sd:
            raise KeyError(f"VideoMAEv2 checkpoint has {prefix}{k} but no {prefix}{v_key}")
        out[m.group(1) + "qkv.bias"] = torch.cat([v, torch.zeros_like(v), sd[v_key]])
    lone_v = [k for k in sd if re.fullmatch(r"blocks\.\d+\.attn\.v_bias", k) and k[:-6] + "q_bias" not in sd]
    if lone_v:
        raise KeyError(f"VideoMAEv2 checkpoint has v_bias without q_bias: {', '.join(prefix + k for k in lone_v)}")
    return out


def _videomae_file_table(table, cfg: VisionConfig):
    """A checkpoint's VideoMAE pos_embed (1, T0*g0*g0, C) -> the teacher's (1, t_size*grid*grid, C), fp32.
    At the teacher's size it is taken as is; otherwise T0 is the official base (8 token frames) or the
    teacher's own frame count, whichever leaves a square grid g0 (both or neither is an error), and the
    table is resized by the official rule (teachers.resize_videomae_table: bicubic space, then linear time)."""
    if table.dim() != 3 or table.shape[0] != 1 or table.shape[2] != cfg.embed_dim:
        raise ValueError(f"VideoMAEv2 pos_embed {tuple(table.shape)} is not (1, positions, {cfg.embed_dim})")
    n = table.shape[1]
    if n == cfg.num_patches:
        return table.float()
    layouts = {(t, math.isqrt(n // t)) for t in (VIDEOMAE_BASE_FRAMES, cfg.t_size)
               if n % t == 0 and math.isqrt(n // t) ** 2 == n // t}
    if len(layouts) != 1:
        raise ValueError(f"cannot tell the frames x grid of the VideoMAEv2 pos_embed {tuple(table.shape)}: "
                         f"expected {VIDEOMAE_BASE_FRAMES} or {cfg.t_size} token frames of a square grid "
                         f"(teacher: {cfg.t_size} x {cfg.grid}x{cfg.grid})")
    [(t0, g0)] = layouts
    log.info("VideoMAEv2: resizing the checkpoint's pos_embed from %d x %dx%d to %d x %dx%d (official rule)",
             t0, g0, g0, cfg.t_size, cfg.grid, cfg.grid)
    return resize_videomae_table(table, t0, g0, cfg.t_size, cfg.grid)


_CLIP_BLOCK_MAP = {"ln_1": "norm1", "attn.in_proj_weight": "attn.qkv.weight", "attn.in_proj_bias": "attn.qkv.bias",
                   "attn.out_proj": "attn.proj", "ln_2": "norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def load_openai_clip_visual(teacher: ClipVisualTeacher, path_or_state_dict, *, prefix="visual.", ignore=(),
                            weights_only=True):
    """An OpenAI CLIP state dict (`visual.*` + text tower, which is dropped by OPENAI_CLIP_TEXT_KEYS;
    any other key is an error). Map: visual.transformer.resblocks.N.{ln_1, attn.in_proj_weight/bias,
    attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj} -> blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1,
    mlp.fc2}; conv1, class_embedding, positional_embedding, ln_pre, ln_post, proj keep their names.
    OpenAI's .pt files are TorchScript: pass torch.jit.load(path, map_location="cpu").state_dict()."""
    sd = read_state_dict(path_or_state_dict, weights_only=weights_only)
    if prefix:
        sd = _drop_keys(sd, OPENAI_CLIP_TEXT_KEYS, "OpenAI CLIP")
        stray = sorted(k for k in sd if not k.startswith(prefix))
        if stray:
            raise KeyError(f"OpenAI CLIP checkpoint: unknown key(s) outside {prefix!r}: {', '.join(stray[:20])}")
        sd = {k[len(prefix):]: v for k, v in sd.items()}
    out = {}
    for k, v in sd.items():
        m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(ln_1|attn\.in_proj_weight|attn\.in_proj_bias|"
                         r"attn\.out_proj|ln_2|mlp\.c_fc|mlp\.c_proj)(.*)", k)
        out[f"blocks.{m.group(1)}.{_CLIP_BLOCK_MAP[m.group(2)]}{m.group(3)}" if m else k] = v
    if "positional_embedding" in out:
        out["positional_embedding"] = _resize_grid(out["positional_embedding"][None], teacher.grid)[0]
    return _load_teacher(teacher, out, "OpenAI CLIP (key names after the map)", ignore)


def build_teachers(multimodal="", motion="", *, multimodal_kind="internvl", clip_size="L/14",
                   clip_return_layer=6, mae_return_layer=4, img_size=224, motion_frames=16,
                   mlp_act="gelu_tanh", motion_attention="per_head", seed=0):
    """(multimodal teacher, motion teacher), frozen, on the CPU. A path loads the real teacher
    (InternViT-6B from InternVL-C, or with multimodal_kind="clip" an OpenAI CLIP `clip_size` tower;
    VideoMAEv2-g), built on the meta device so no memory goes to weights about to be overwritten.
    An empty path gives a small random teacher, the same for the same seed, for smoke runs only.
    motion_frames: frames the motion teacher sees (twice the student's: tubelet 2).
    motion_attention: "per_head" (VideoMAEv2's attention) or "across_heads" (InternVideo2's videomae.py
    layout quirk), see teachers.MotionTeacher."""
    if multimodal_kind not in ("internvl", "clip"):
        raise ValueError(f"multimodal_kind must be 'internvl' or 'clip', got {multimodal_kind!r}")
    mm_cls = MultimodalTeacher if multimodal_kind == "internvl" else ClipVisualTeacher
    mm_kw = dict(return_layers=clip_return_layer, img_size=img_size)
    if multimodal_kind == "internvl":
        mm_kw["mlp_act"] = mlp_act
    mo_kw = dict(return_layers=mae_return_layer, img_size=img_size, num_frames=motion_frames,
                 attention=motion_attention)

    def seeded(s, build):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            return build()

    if multimodal:
        with torch.device("meta"):
            mm = mm_cls("6B" if multimodal_kind == "internvl" else clip_size, **mm_kw)
        mm = (load_internvl_c if multimodal_kind == "internvl" else load_openai_clip_visual)(mm, multimodal)
    else:
        log.warning("SMOKE RUN: no multimodal teacher checkpoint given; using a small RANDOM frozen %s "
                    "(seed %d). Its features mean nothing; pass --teacher-multimodal for real training.",
                    mm_cls.__name__, seed)
        depth = {"depth" if mm_cls is MultimodalTeacher else "layers": max(3, clip_return_layer)}
        mm = seeded(seed, lambda: mm_cls("tiny", **mm_kw, **depth))
    if motion:
        with torch.device("meta"):
            mo = MotionTeacher("g", **mo_kw)
        mo = load_videomae_v2(mo, motion)
    else:
        log.warning("SMOKE RUN: no motion teacher checkpoint given; using a small RANDOM frozen MotionTeacher "
                    "(seed %d). Its features mean nothing; pass --teacher-motion for real training.", seed + 1)
        mo = seeded(seed + 1, lambda: MotionTeacher("tiny", depth=max(3, mae_return_layer), **mo_kw))
    return mm, mo


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
    cfg = VisionConfig(**meta["model_config"])   # train.py writes the trained model's VisionConfig
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
