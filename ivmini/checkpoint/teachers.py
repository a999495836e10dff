"""Stage-1 teacher checkpoints (the models are in ivmini/teachers.py): InternVL-C's InternViT-6B,
VideoMAEv2-g, OpenAI CLIP visual towers, and build_teachers (real teachers from files, or small random
ones for smoke runs). Teachers are returned frozen, in eval mode."""
import fnmatch
import logging
import math
import re

import torch

from ..config import VisionConfig
from ..teachers import (VIDEOMAE_BASE_FRAMES, ClipVisualTeacher, MotionTeacher, MultimodalTeacher,
                        resize_videomae_table, videomae_pos_table)
from ..vit import interpolate_pos_embed
from .state_dicts import check_keys, drop_keys, read_state_dict, select_prefix

log = logging.getLogger("ivmini.checkpoint")

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
    sd = drop_keys(read_state_dict(path_or_state_dict, weights_only=weights_only), INTERNVL_C_TEXT_KEYS, "InternVL-C")
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
        sd = drop_keys(sd, OPENAI_CLIP_TEXT_KEYS, "OpenAI CLIP")
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
