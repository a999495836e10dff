"""The frozen stage-1 teachers (paper §3.1 stage 1; shared facts §2.1), their checkpoint loaders, and
`build_teachers` for train.py.

    MultimodalTeacher  InternViT-6B of InternVL-C, run frame by frame (official single_modality
                       models/internvl_clip_vision.py `InternVL_CLIP`, key for key: it *is* a VideoViT
                       with num_frames=1 and no heads)
    ClipVisualTeacher  an OpenAI-CLIP visual tower (ViT-B/16, L/14) as a cheaper multimodal teacher
    MotionTeacher      VideoMAEv2-g (official models/videomae.py `VisionTransformer`, but with VideoMAEv2's
                       per-head attention, see below)

Output contracts (K = return_layers, T = frames, N = patches per frame):
    multimodal(video (B, 3, T, H, W)) -> TeacherOutput
        layers (K, B, 1+T*N, C)  the last K blocks' outputs (ascending), the per-frame CLS averaged over
                                 T and placed first, patches flattened t-major; every vector L2-normalised
        pooled (B, D)            pooled output per frame, averaged over T, L2-normalised
        attn   (B, T, N)         pool attention (head mean) of the frame's query over its N patch keys;
                                 the CLS key is left out and rows are not renormalised (official attn[:, 0, 1:])
    motion(video (B, 3, 16, H, W)) -> (K, B, 8*N, C): the last K blocks, the final LayerNorm on the last one
                                 only, every vector L2-normalised (tubelet 2: 16 frames -> 8 token frames)

Loaders (explicit key maps; strict: any other missing, unexpected or mis-shaped key is an error naming it):
    load_internvl_c(teacher, src)          InternVL-C {'module': ...}: drops the text tower (transformer.*,
                                           text_projection, logit_scale); 2-D patch conv -> Conv3d; pos resize
    load_videomae_v2(teacher, src)         VideoMAEv2 {'model': ...}: keeps encoder.*, drops decoder.*,
                                           encoder_to_decoder.*, mask_token; q_bias/v_bias -> qkv.bias
    load_openai_clip_visual(teacher, src)  OpenAI CLIP: keeps visual.*, drops the text tower; resblocks -> blocks
    build_teachers(...)                    both teachers, real (paths) or small random ones (smoke runs)

Teachers are frozen: parameters never require grad, forward runs under no_grad, and `.train()` keeps
them in eval mode. Random-init teachers exist only for smoke runs (build_teachers says so in the log).

Activations. InternViT: the official teacher is built with the default fused flags, so its MLP is
flash_attn's FusedMLP whose default activation is the tanh approximation of GELU; that is what
InternVideo2 stage 1 distilled from, so `mlp_act="gelu_tanh"` is the default (the official unfused
path uses exact GELU: pass mlp_act="gelu"; which one InternVL-C itself was trained with is not checked
here). VideoMAEv2: exact GELU (nn.GELU, no fused MLP in that file). OpenAI CLIP: QuickGELU.

VideoMAEv2 attention. InternVideo2's videomae.py hands (B, heads, N, d) tensors to flash_attn_func,
which expects (B, N, heads, d): it attends across the 16 heads of each token and scrambles the result
(facts §2.1). The released weights were trained by VideoMAEv2 with ordinary per-head attention over
tokens, which is what MotionTeacher computes. The quirk is not offered: reproducing it needs a second
attention code path, and its targets are not VideoMAEv2 features.
"""
import fnmatch
import logging
import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from .checkpoint import check_keys, read_state_dict, select_prefix
from .config import VisionConfig
from .layers import Block
from .vit import PatchEmbed, VideoViT, interpolate_pos_embed

log = logging.getLogger("ivmini.teachers")

# InternViT-6B (official `internvl_clip_6b`): patch 14, qk-norm, RMSNorm, LayerScale (fp32 multiply),
# no qkv bias, attention pool 16 heads -> 768. Frame-wise: one frame per VideoViT call.
INTERNVIT_COMMON = dict(patch_size=14, num_frames=1, tubelet_size=1, qkv_bias=False, qk_norm=True, init_values=0.1,
                        layerscale_fp32=True, drop_path_rate=0.0, heads="none")
INTERNVIT_PRESETS = {
    "6B": dict(embed_dim=3200, depth=48, num_heads=25, mlp_ratio=4.0, attn_pool_num_heads=16, clip_embed_dim=768),
    "tiny": dict(embed_dim=96, depth=3, num_heads=4, mlp_ratio=4.0, attn_pool_num_heads=4, clip_embed_dim=64),
}
# VideoMAEv2-g (official `mae_g14_hybrid`): q/v bias, LayerNorm eps 1e-6, exact GELU, no LayerScale, no CLS,
# tubelet 2. VisionConfig's pooling fields are unused by the motion teacher.
VIDEOMAE_COMMON = dict(patch_size=14, tubelet_size=2, qkv_bias=True, qk_norm=False, init_values=0.0, mlp_act="gelu",
                       drop_path_rate=0.0, heads="none", attn_pool_num_heads=1)
VIDEOMAE_PRESETS = {
    "g": dict(embed_dim=1408, depth=40, num_heads=16, mlp_ratio=48 / 11),   # hidden int(1408*48/11) = 6144
    "tiny": dict(embed_dim=64, depth=3, num_heads=4, mlp_ratio=4.0),
}
# OpenAI CLIP visual towers: (width, layers, heads, patch, output_dim)
CLIP_PRESETS = {
    "B/16": dict(width=768, layers=12, heads=12, patch_size=16, output_dim=512),
    "L/14": dict(width=1024, layers=24, heads=16, patch_size=14, output_dim=768),
    "tiny": dict(width=64, layers=3, heads=4, patch_size=14, output_dim=48),
}

# keys of the checkpoints that are not the teacher, dropped by name (fnmatch patterns); any other key
# that the teacher does not have is an error
INTERNVL_C_TEXT_KEYS = ("transformer.*", "text_projection", "logit_scale")       # QLLaMA text tower of InternVL-C
VIDEOMAE_V2_OTHER_KEYS = ("decoder.*", "encoder_to_decoder.*", "mask_token")     # MAE decoder side
OPENAI_CLIP_TEXT_KEYS = ("token_embedding.*", "positional_embedding", "transformer.*", "ln_final.*",
                         "text_projection", "logit_scale", "input_resolution", "context_length", "vocab_size")


def _preset(table, size):
    if size not in table:
        raise KeyError(f"unknown teacher size {size!r}; choose one of {sorted(table)}")
    return table[size]


def _return_index(depth, k, interval):
    """Official rule: blocks depth-1 - int(i*interval), i < k, in ascending order."""
    idx = sorted(depth - 1 - int(i * interval) for i in range(k))
    if not 1 <= k <= depth or idx[0] < 0:
        raise ValueError(f"cannot return {k} layers at interval {interval} from {depth} blocks")
    return tuple(idx)


def _l2(x):
    return x / x.norm(dim=-1, keepdim=True)


@dataclass
class TeacherOutput:
    layers: torch.Tensor   # (K, B, 1+T*N, C)  L2-normalised
    pooled: torch.Tensor   # (B, D)            L2-normalised
    attn: torch.Tensor     # (B, T, N)         pool / CLS attention over the patch keys, fp32 (for sampling)


def _framewise_output(layers, pooled, attn, B, T):
    """Per-frame results (K, B*T, 1+N, C), (B*T, D), (B*T, N) -> the video-level TeacherOutput."""
    K, _, n1, C = layers.shape
    cls = layers[:, :, :1].reshape(K, B, T, 1, C).mean(dim=2)         # (K, B, 1, C): CLS averaged over T
    patches = layers[:, :, 1:].reshape(K, B, T * (n1 - 1), C)         # (K, B, T*N, C), t-major
    return TeacherOutput(layers=_l2(torch.cat([cls, patches], dim=2)),
                         pooled=_l2(pooled.reshape(B, T, -1).mean(dim=1)),
                         attn=attn.reshape(B, T, n1 - 1))


def _frames(video, img_size):
    """(B, 3, T, H, W) -> (B*T, 3, H, W), batch-major then time."""
    if video.dim() != 5 or video.shape[1] != 3 or video.shape[-2:] != (img_size, img_size):
        raise ValueError(f"video must be (B, 3, T, {img_size}, {img_size}), got {tuple(video.shape)}")
    B, _, T, H, W = video.shape
    return video.transpose(1, 2).reshape(B * T, 3, H, W), B, T


class FrozenTeacher(nn.Module):
    """Mixin: a teacher never trains; `.train()` leaves it (and its dropout/drop-path) in eval mode."""

    def train(self, mode=True):
        return super().train(False)


# ---------------------------------------------------------------------------------------------
# multimodal teachers

class MultimodalTeacher(FrozenTeacher, VideoViT):
    """InternViT-6B (InternVL-C vision tower) run frame-wise. size: "6B" | "tiny"; overrides: VisionConfig
    fields. The parameter names are those of the official InternVL_CLIP (patch_embed.proj, pos_embed,
    cls_token, blocks.N.*, clip_projector.*)."""

    def __init__(self, size="6B", *, return_layers=6, return_interval=1, img_size=224, mlp_act="gelu_tanh",
                 **overrides):
        cfg = VisionConfig(**{**INTERNVIT_COMMON, **_preset(INTERNVIT_PRESETS, size), "img_size": img_size,
                              "mlp_act": mlp_act, **overrides})
        super().__init__(cfg)
        self.return_index = _return_index(cfg.depth, return_layers, return_interval)
        self.embed_dim, self.pooled_dim = cfg.embed_dim, cfg.clip_embed_dim
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def forward(self, video) -> TeacherOutput:
        frames, B, T = _frames(video, self.cfg.img_size)
        out = super().forward(frames[:, :, None], return_layers=self.return_index, pool=False)  # T=1 per frame
        x = out.tokens                                                       # (B*T, 1+N, C)
        attn = self.clip_projector.attention_weights(x)[:, 1:]               # (B*T, N): CLS key left out
        return _framewise_output(torch.stack(out.layers), self.clip_projector(x), attn, B, T)


class ClipVisualTeacher(FrozenTeacher):
    """OpenAI-CLIP visual tower run frame-wise, with MultimodalTeacher's output contract: `layers` from
    the last K residual blocks, `pooled` = ln_post(CLS) @ proj, `attn` = the last block's CLS query over
    the patch keys (softmax over all keys, head mean, CLS key left out). Non-block parameters keep the
    OpenAI names; blocks are layers.Block (LayerNorm eps 1e-5, q/k/v biases, QuickGELU)."""

    def __init__(self, size="L/14", *, return_layers=6, return_interval=1, img_size=224, **overrides):
        super().__init__()
        p = {**_preset(CLIP_PRESETS, size), **overrides}
        width, patch = p["width"], p["patch_size"]
        if img_size % patch:
            raise ValueError(f"img_size={img_size} must be a multiple of patch_size={patch}")
        self.img_size, self.grid = img_size, img_size // patch
        self.embed_dim, self.pooled_dim = width, p["output_dim"]
        scale = width ** -0.5                     # OpenAI's init (weights are loaded for real use)
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(1 + self.grid ** 2, width))
        self.ln_pre = nn.LayerNorm(width, eps=1e-5)
        self.blocks = nn.ModuleList([Block(width, p["heads"], 4 * width, qkv_bias=True, act="quick_gelu",
                                           norm="layer", norm_eps=1e-5) for _ in range(p["layers"])])
        self.ln_post = nn.LayerNorm(width, eps=1e-5)
        self.proj = nn.Parameter(scale * torch.randn(width, p["output_dim"]))
        self.return_index = _return_index(p["layers"], return_layers, return_interval)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def _cls_attention(blk, x):
        """Softmax attention of the CLS query of block `blk` (input x (B, 1+N, C)), mean over heads: (B, 1+N)."""
        a = blk.attn
        H, d, C = a.num_heads, a.head_dim, x.shape[-1]
        q, k, _ = a.qkv(blk.norm1(x)).float().split(C, dim=-1)             # (B, 1+N, C) each
        q = q[:, 0].view(-1, H, d)                                          # (B, H, d)
        s = torch.einsum("bhd,bnhd->bhn", q, k.view(k.shape[0], -1, H, d)) * d ** -0.5
        return s.softmax(dim=-1).mean(dim=1)                                # (B, 1+N)

    @torch.no_grad()
    def forward(self, video) -> TeacherOutput:
        frames, B, T = _frames(video, self.img_size)
        x = self.conv1(frames.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)   # (B*T, N, C)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype))
        layers = []
        for i, blk in enumerate(self.blocks):
            if i == len(self.blocks) - 1:
                attn = self._cls_attention(blk, x)[:, 1:]                   # (B*T, N)
            x = blk(x)
            if i in self.return_index:
                layers.append(x)
        pooled = self.ln_post(x[:, 0]) @ self.proj.to(x.dtype)              # (B*T, output_dim)
        return _framewise_output(torch.stack(layers), pooled, attn, B, T)


# ---------------------------------------------------------------------------------------------
# motion teacher

def sinusoid_table(n_position, dim):
    """VideoMAE's fixed 1-D table over the flattened token index -> (n_position, dim) float32:
    angle(p, j) = p / 10000^(2*floor(j/2)/dim); even channels sin, odd channels cos (interleaved)."""
    pos = torch.arange(n_position, dtype=torch.float64)[:, None]
    j = torch.arange(dim, dtype=torch.float64)
    angle = pos / 10000 ** (2 * (j // 2) / dim)                            # (n, dim), float64 as numpy does
    return torch.where(j.long() % 2 == 0, angle.sin(), angle.cos()).float()


class MotionTeacher(FrozenTeacher):
    """VideoMAEv2 encoder. size: "g" | "tiny"; overrides: VisionConfig fields (its pool fields are unused).

    Position table: VideoMAE's sinusoid table for this model's own token count (VideoMAEv2's rule). For
    the released g at 16 frames and 224 px this is the official 2048-row table exactly; InternVideo2's
    file would interpolate that table for other sizes, but its engine resizes teacher input to 224.
    Attention biases: the checkpoint's q_bias and v_bias fill layers.Attention's fused qkv.bias as
    [q_bias; 0; v_bias]. The k part stays zero: the teacher is frozen, and a k bias adds the same
    q.b_k to every key of a query, which softmax ignores anyway.
    """

    def __init__(self, size="g", *, return_layers=4, return_interval=1, img_size=224, num_frames=16, **overrides):
        super().__init__()
        cfg = VisionConfig(**{**VIDEOMAE_COMMON, **_preset(VIDEOMAE_PRESETS, size), "img_size": img_size,
                              "num_frames": num_frames, **overrides})
        self.cfg, self.embed_dim = cfg, cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg)
        self.register_buffer("pos_embed", torch.empty(1, cfg.num_patches, cfg.embed_dim), persistent=False)
        self.blocks = nn.ModuleList([Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_hidden, qkv_bias=True,
                                           act="gelu", norm="layer", norm_eps=1e-6) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.return_index = _return_index(cfg.depth, return_layers, return_interval)
        self.init_weights()
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def init_weights(self):
        """Official `_init_weights` (Linear trunc-normal .02, biases 0; LayerNorm 1, 0) and the position table."""
        self.pos_embed.copy_(sinusoid_table(self.cfg.num_patches, self.cfg.embed_dim)[None])
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.no_grad()
    def forward(self, video):
        cfg = self.cfg
        if video.dim() != 5 or tuple(video.shape[1:]) != (3, cfg.num_frames, cfg.img_size, cfg.img_size):
            raise ValueError(f"video must be (B, 3, {cfg.num_frames}, {cfg.img_size}, {cfg.img_size}), "
                             f"got {tuple(video.shape)}")
        x = self.patch_embed(video.to(self.patch_embed.proj.weight.dtype))   # (B, T/2*N, C), t-major
        x = x + self.pos_embed.to(x.dtype)
        layers = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in self.return_index:
                layers.append(x)
        layers[-1] = self.norm(layers[-1])      # the last returned block is the last block: only it is normed
        return _l2(torch.stack(layers))                                       # (K, B, T/2*N, C)


# ---------------------------------------------------------------------------------------------
# loaders: explicit key maps, strict

def _split(sd, drop, what):
    """Remove the keys matching `drop` (fnmatch), logging what was dropped."""
    dropped = {k for k in sd if any(fnmatch.fnmatchcase(k, p) for p in drop)}
    if dropped:
        groups = sorted({k.split(".")[0] for k in dropped})
        log.info("%s: dropped %d key(s) that are not the teacher: %s", what, len(dropped), ", ".join(groups))
    return {k: v for k, v in sd.items() if k not in dropped}


def _load(teacher, sd, what, ignore=()):
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
    sd = _split(read_state_dict(path_or_state_dict, weights_only=weights_only), INTERNVL_C_TEXT_KEYS, "InternVL-C")
    w = sd.get("patch_embed.proj.weight")
    if w is not None and w.dim() == 4:
        sd["patch_embed.proj.weight"] = inflate_patch_weight(w, teacher.cfg.tubelet_size)
    if "pos_embed" in sd:
        sd["pos_embed"] = _resize_grid(sd["pos_embed"], teacher.cfg.grid)
    return _load(teacher, sd, "InternVL-C", ignore)


def load_videomae_v2(teacher: MotionTeacher, path_or_state_dict, *, prefix="encoder.", ignore=(), weights_only=True):
    """VideoMAEv2 pre-training checkpoint ({'model': {...}}): the encoder under `encoder.`; the decoder
    side (VIDEOMAE_V2_OTHER_KEYS: decoder.*, encoder_to_decoder.*, mask_token) is dropped; any other key
    outside `prefix` is an error. blocks.N.attn.{q_bias, v_bias} -> blocks.N.attn.qkv.bias = [q; 0; v]."""
    sd = read_state_dict(path_or_state_dict, weights_only=weights_only)
    if prefix:
        other = sorted(k for k in sd if not k.startswith(prefix))
        stray = [k for k in other if not any(fnmatch.fnmatchcase(k, p) for p in VIDEOMAE_V2_OTHER_KEYS)]
        if stray:
            raise KeyError(f"VideoMAEv2 checkpoint: unknown key(s) outside {prefix!r}: {', '.join(stray[:20])}")
        sd = select_prefix(sd, prefix)
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
    _load(teacher, out, "VideoMAEv2", ignore)
    with torch.no_grad():       # the fixed table is not in the checkpoint (and is empty after a meta build)
        teacher.pos_embed.copy_(sinusoid_table(teacher.cfg.num_patches, teacher.cfg.embed_dim)[None])
    return teacher


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
        sd = _split(sd, OPENAI_CLIP_TEXT_KEYS, "OpenAI CLIP")
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
    return _load(teacher, out, "OpenAI CLIP (key names after the map)", ignore)


# ---------------------------------------------------------------------------------------------

def build_teachers(multimodal="", motion="", *, multimodal_kind="internvl", clip_size="L/14",
                   clip_return_layer=6, mae_return_layer=4, img_size=224, motion_frames=16,
                   mlp_act="gelu_tanh", seed=0):
    """(multimodal teacher, motion teacher), frozen, on the CPU. A path loads the real teacher
    (InternViT-6B from InternVL-C, or with multimodal_kind="clip" an OpenAI CLIP `clip_size` tower;
    VideoMAEv2-g), built on the meta device so no memory goes to weights about to be overwritten.
    An empty path gives a small random teacher, the same for the same seed, for smoke runs only.
    motion_frames: frames the motion teacher sees (twice the student's: tubelet 2)."""
    if multimodal_kind not in ("internvl", "clip"):
        raise ValueError(f"multimodal_kind must be 'internvl' or 'clip', got {multimodal_kind!r}")
    mm_cls = MultimodalTeacher if multimodal_kind == "internvl" else ClipVisualTeacher
    mm_kw = dict(return_layers=clip_return_layer, img_size=img_size)
    if multimodal_kind == "internvl":
        mm_kw["mlp_act"] = mlp_act
    mo_kw = dict(return_layers=mae_return_layer, img_size=img_size, num_frames=motion_frames)

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
