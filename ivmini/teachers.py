"""The frozen stage-1 teachers (paper §3.1 stage 1; shared facts §2.1): models only. Their checkpoint
loaders and `build_teachers` live in ivmini/checkpoint/teachers.py (models know tensors, checkpoint/ knows files).

    MultimodalTeacher  InternViT-6B of InternVL-C, run frame by frame (official single_modality
                       models/internvl_clip_vision.py `InternVL_CLIP`, key for key: it *is* a VideoViT
                       with num_frames=1 and no heads)
    ClipVisualTeacher  an OpenAI-CLIP visual tower (ViT-B/16, L/14) as a cheaper multimodal teacher
    Stage2Teacher      a stage-2 InternVideo2 vision encoder run on the whole clip: the teacher of the S/B/L
                       distillation (ivmini/stages/distill.py)
    MotionTeacher      VideoMAEv2-g (official models/videomae.py `VisionTransformer`: its position table,
                       and VideoMAEv2's per-head attention by default, see below)

Output contracts (K = return_layers, T = frames, N = patches per frame):
    multimodal(video (B, 3, T, H, W)) -> TeacherOutput
        layers (K, B, 1+T*N, C)  the last K blocks' outputs (ascending), the per-frame CLS averaged over
                                 T and placed first, patches flattened t-major; every vector L2-normalised
        pooled (B, D)            pooled output per frame, averaged over T, L2-normalised
        attn   (B, T, N)         pool attention (head mean) of the frame's query over its N patch keys;
                                 the CLS key is left out and rows are not renormalised (official attn[:, 0, 1:])
    motion(video (B, 3, T, H, W)) -> (K, B, T/2*N, C): the last K blocks, the final LayerNorm on the last one
                                 only, every vector L2-normalised (tubelet 2: 16 frames -> 8 token frames)

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
tokens, so that is MotionTeacher's default (attention="per_head"). attention="across_heads" computes
what the official file computes (AcrossHeadsAttention), to reproduce InternVideo2's stage-1 targets.
"""
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

import kernels

from .config import VisionConfig
from .layers import Attention, Block
from .vit import PatchEmbed, VideoViT, interpolate_pos_embed

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


class VideoTeacher(FrozenTeacher, VideoViT):
    """A frozen VideoViT that returns its blocks `return_index` (_return_index) and its pool's output."""

    def __init__(self, cfg: VisionConfig, return_layers, return_interval):
        super().__init__(cfg)
        self.return_index = _return_index(cfg.depth, return_layers, return_interval)
        self.embed_dim, self.pooled_dim = cfg.embed_dim, cfg.clip_embed_dim
        self.requires_grad_(False)
        self.eval()


class Stage2Teacher(VideoTeacher):
    """A stage-2 vision encoder without its heads, run on the whole clip (not frame by frame), the teacher of the
    S/B/L distillation (ivmini/stages/distill.py). forward(video (B, 3, T, H, W)) -> TeacherOutput with
        layers (K, B, 1+T*N, C)  blocks `return_index` (ascending), every vector L2-normalised
        pooled (B, D)            the attention pool's output, L2-normalised
        attn   (B, T*N)          the pool's attention (head mean) over the patch keys, CLS key left out, fp32"""

    def __init__(self, cfg: VisionConfig, return_layers, return_interval):
        super().__init__(replace(cfg, heads="none", drop_path_rate=0.0), return_layers, return_interval)

    @torch.no_grad()
    def forward(self, video) -> TeacherOutput:
        out = super().forward(video, return_layers=self.return_index, pool=False)
        x = out.tokens                                                       # (B, 1+T*N, C)
        attn = self.clip_projector.attention_weights(x)[:, 1:]               # (B, T*N)
        return TeacherOutput(layers=_l2(torch.stack(out.layers)), pooled=_l2(self.clip_projector(x)), attn=attn)


# ---------------------------------------------------------------------------------------------
# multimodal teachers

class MultimodalTeacher(VideoTeacher):
    """InternViT-6B (InternVL-C vision tower) run frame-wise. size: "6B" | "tiny"; overrides: VisionConfig
    fields. The parameter names are those of the official InternVL_CLIP (patch_embed.proj, pos_embed,
    cls_token, blocks.N.*, clip_projector.*)."""

    def __init__(self, size="6B", *, return_layers=6, return_interval=1, img_size=224, mlp_act="gelu_tanh",
                 **overrides):
        cfg = VisionConfig(**{**INTERNVIT_COMMON, **_preset(INTERNVIT_PRESETS, size), "img_size": img_size,
                              "mlp_act": mlp_act, **overrides})
        super().__init__(cfg, return_layers, return_interval)

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

VIDEOMAE_BASE_FRAMES = 8        # token frames of the official position table (16 frames, tubelet 2)


def sinusoid_table(n_position, dim):
    """VideoMAE's fixed 1-D table over the flattened token index -> (n_position, dim) float32:
    angle(p, j) = p / 10000^(2*floor(j/2)/dim); even channels sin, odd channels cos (interleaved)."""
    pos = torch.arange(n_position, dtype=torch.float64)[:, None]
    j = torch.arange(dim, dtype=torch.float64)
    angle = pos / 10000 ** (2 * (j // 2) / dim)                            # (n, dim), float64 as numpy does
    return torch.where(j.long() % 2 == 0, angle.sin(), angle.cos()).float()


def videomae_base_grid(patch_size):
    """Patches per side P of the official table (`pre_n_position` = 8*P*P): 2048 rows (P = 16) for patch 14,
    1568 (P = 14) for any other patch, i.e. 224 px for the patch sizes 14 and 16 that exist."""
    return 16 if patch_size == 14 else 14


def resize_videomae_table(table, frames, grid, new_frames, new_grid):
    """(1, frames*grid*grid, C) -> (1, new_frames*new_grid*new_grid, C), fp32, in the official order: first
    bicubic in space (align_corners=False) at the old frame count, then linear in time (align_corners=False).
    The two steps commute in exact arithmetic; the order fixes the fp32 rounding."""
    table = interpolate_pos_embed(table.float(), frames, grid, frames, new_grid, cls_token=False)     # space
    return interpolate_pos_embed(table, frames, new_grid, new_frames, new_grid, cls_token=False)      # time


def videomae_pos_table(cfg: VisionConfig):
    """The official position table for cfg's tokens (t_size x grid x grid): VideoMAE's sinusoid table over
    the base grid of 8 x P x P positions, resized when the grid differs -> (1, num_patches, C) fp32.
    At 16 frames and 224 px this is the plain 2048-row table; at 8 frames it is that table interpolated
    to 4 token frames, not a fresh 1024-row one (they differ by up to ~1.9)."""
    P = videomae_base_grid(cfg.patch_size)
    base = sinusoid_table(VIDEOMAE_BASE_FRAMES * P * P, cfg.embed_dim)[None]     # (1, 8*P*P, C)
    return resize_videomae_table(base, VIDEOMAE_BASE_FRAMES, P, cfg.t_size, cfg.grid)


class AcrossHeadsAttention(Attention):
    """The attention InternVideo2's videomae.py computes (MotionTeacher(attention="across_heads")).

    That file reshapes q, k, v to (B, H, N, d) and hands them to flash_attn_func, which reads (B, seqlen,
    heads, d): each token becomes a "head" whose "sequence" is its own H head vectors, so softmax runs
    over the H heads of one token, and the (B, H, N, d) result is read back as (B, N, H*d). Kept as
    (B, N, H, d), q, k, v are exactly flash's view of those tensors (N "heads" over a sequence of H),
    so kernels.attention computes the same thing; the output is then put back in flash's (B, H, N, d)
    layout and reshaped as the official code does. Same parameters (and checkpoint keys) as Attention;
    self-attention only.
    """

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).unbind(2)   # (B, N, H, d) each
        o = kernels.attention(q, k, v)                     # (B, N, H, d): per token, softmax over its H heads
        return self.proj(o.transpose(1, 2).reshape(B, N, C))   # flash's (B, H, N, d) output read as (B, N, H*d)


class MotionTeacher(FrozenTeacher):
    """VideoMAEv2 encoder. size: "g" | "tiny"; overrides: VisionConfig fields (its pool fields are unused).

    attention: "per_head" (default) is VideoMAEv2's attention, the one its weights were trained with;
    "across_heads" reproduces InternVideo2's videomae.py (AcrossHeadsAttention; the module docstring says why).
    Position table: the official one (videomae_pos_table), a fixed buffer; load_videomae_v2 fills it, or
    replaces it with a pos_embed the checkpoint carries.
    Attention biases: the checkpoint's q_bias and v_bias fill layers.Attention's fused qkv.bias as
    [q_bias; 0; v_bias]. The k part stays zero: the teacher is frozen, and a k bias adds the same
    q.b_k to every key of a query, which softmax ignores anyway.
    """

    def __init__(self, size="g", *, return_layers=4, return_interval=1, img_size=224, num_frames=16,
                 attention="per_head", **overrides):
        super().__init__()
        if attention not in ("per_head", "across_heads"):
            raise ValueError(f"attention must be 'per_head' or 'across_heads', got {attention!r}")
        cfg = VisionConfig(**{**VIDEOMAE_COMMON, **_preset(VIDEOMAE_PRESETS, size), "img_size": img_size,
                              "num_frames": num_frames, **overrides})
        self.cfg, self.embed_dim, self.attention = cfg, cfg.embed_dim, attention
        self.patch_embed = PatchEmbed(cfg)
        self.register_buffer("pos_embed", torch.empty(1, cfg.num_patches, cfg.embed_dim), persistent=False)
        self.blocks = nn.ModuleList([Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_hidden, qkv_bias=True,
                                           act="gelu", norm="layer", norm_eps=1e-6) for _ in range(cfg.depth)])
        if attention == "across_heads":     # same weights, the official file's attention
            for blk in self.blocks:
                blk.attn = AcrossHeadsAttention(cfg.embed_dim, cfg.num_heads, qkv_bias=True)
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.return_index = _return_index(cfg.depth, return_layers, return_interval)
        self.init_weights()
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def init_weights(self):
        """Official `_init_weights` (Linear trunc-normal .02, biases 0; LayerNorm 1, 0) and the position table."""
        self.pos_embed.copy_(videomae_pos_table(self.cfg))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def extra_repr(self):
        return f"attention={self.attention!r}"

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
