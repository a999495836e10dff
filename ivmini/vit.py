"""InternVideo2 video encoder (the paper's ViT, §3.1), with its optional heads.

    video (B, 3, T, H, W) --Conv3d patch (tubelet x 14 x 14)--> (B, T*g*g, C), t-major then row-major
      --prepend CLS, add pos_embed (1, 1+N, C) and keep the visible tokens (kernels.masked_gather)-->
      (B, 1+Nvis, C) --depth x Block--> tokens --AttentionPool--> pooled (B, 768)

Heads, by `cfg.heads` (the official class each reproduces, key for key):
    "distill"   stage-1 student `PretrainInternVideo2` (single_modality): clip_decoder (K x Linear->LN->l2),
                final_clip_decoder, mae_decoder (K x MLP->LN->l2), clip_pos_embed, mae_pos_embed; with
                clip_decoder_mlp and mae_return_layer=0 the S/B/L distillation student `DistInternVideo2`
                (MLP clip decoders, no MAE branch)
    "align"     stage-2 vision encoder `PretrainInternVideo2` (multi_modality): clip_decoder,
                final_clip_decoder, clip_pos_embed (+ img_pos_embed/clip_img_pos_embed if separate)
    "classify"  fine-tune `InternVideo2`: fc_norm + dropout + head on the pooled vector
    "none"      CLIP vision `InternVideo2`: pooled vector only
There is no final norm after the last block (as in every InternVideo2 model).
"""
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from .config import VisionConfig
from .layers import AttentionPool, Block, LayerScale, PoolProjections, RMSNorm


# ---------------------------------------------------------------------------------------------
# positional embeddings

def _sincos_1d(dim, pos):
    """pos (M,) -> (M, dim): [sin(pos * w), cos(pos * w)], w_i = 10000^(-i / (dim/2)), in fp32."""
    omega = torch.arange(dim // 2, dtype=torch.float32) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = pos.to(torch.float32)[:, None] * omega[None, :]  # (M, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def get_3d_sincos_pos_embed(embed_dim, grid_size, t_size, cls_token=False):
    """Joint 3D sin-cos table in the official layout -> (t*g*g [+1], embed_dim) float32.

    The first embed_dim/4 channels encode time (same for every patch of a frame); the other 3/4 are
    the 2D table (same for every frame), whose first half encodes the column index and second half
    the row index. Rows are t-major, then row-major (h, w). The CLS row, if asked, is zeros.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim={embed_dim} must be a multiple of 4")
    dim_t, dim_s = embed_dim // 4, embed_dim // 4 * 3
    if dim_s % 4 or dim_t % 2:
        raise ValueError(f"embed_dim={embed_dim}: the spatial part ({dim_s}) must be a multiple of 4 "
                         f"and the temporal part ({dim_t}) even")
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    spatial = torch.cat([_sincos_1d(dim_s // 2, cols.flatten()),
                         _sincos_1d(dim_s // 2, rows.flatten())], dim=1)     # (g*g, dim_s)
    temporal = _sincos_1d(dim_t, torch.arange(t_size))                          # (t, dim_t)
    table = torch.cat([temporal[:, None, :].expand(-1, grid_size * grid_size, -1),
                       spatial[None].expand(t_size, -1, -1)], dim=-1)          # (t, g*g, C)
    table = table.reshape(-1, embed_dim)
    if cls_token:
        table = torch.cat([torch.zeros(1, embed_dim), table], dim=0)
    return table


def interpolate_pos_embed(pos_embed, num_frames, grid, new_num_frames, new_grid, cls_token=True):
    """Resize a (1, [1+]T*g*g, C) table to (1, [1+]T'*g'*g', C): linear in time, then bicubic
    (align_corners=False) per frame in space; the CLS row is kept. Same result as the official
    `interpolate_pos_embed_internvideo2`. Computed in fp32, returned in the input dtype."""
    C = pos_embed.shape[-1]
    n_extra = 1 if cls_token else 0
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1 or pos_embed.shape[1] != n_extra + num_frames * grid * grid:
        raise ValueError(f"pos_embed of shape {tuple(pos_embed.shape)} is not (1, {n_extra}+{num_frames}*{grid}*{grid}, C)")
    extra, tokens = pos_embed[:, :n_extra], pos_embed[:, n_extra:].float()
    if new_num_frames != num_frames:
        t = tokens.view(num_frames, grid * grid * C).t().unsqueeze(0)      # (1, g*g*C, T)
        t = F.interpolate(t, size=new_num_frames, mode="linear", align_corners=False)
        tokens = t.squeeze(0).t().reshape(1, -1, C)                         # (1, T'*g*g, C)
    if new_grid != grid:
        s = tokens.view(new_num_frames, grid, grid, C).permute(0, 3, 1, 2)  # (T', C, g, g)
        s = F.interpolate(s, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
        tokens = s.permute(0, 2, 3, 1).reshape(1, -1, C)                    # (1, T'*g'*g', C)
    return torch.cat([extra, tokens.to(pos_embed.dtype)], dim=1)


# ---------------------------------------------------------------------------------------------
# heads

class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        k = (cfg.tubelet_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_chans, cfg.embed_dim, kernel_size=k, stride=k)

    def forward(self, x):                          # (B, 3, T, H, W)
        x = self.proj(x)                           # (B, C, T', g, g)
        return x.flatten(2).transpose(1, 2)        # (B, T'*g*g, C), t-major then row-major


class AlignDecoder(nn.Module):
    """Distillation decoder: head (Linear, or Linear-GELU-Linear with mlp=True) -> LayerNorm ->
    L2 normalise. Official `Linear_Decoder` / `MLP_Decoder` (keys head.*, norm.*)."""

    def __init__(self, in_dim, out_dim, mlp=False, norm_type="l2"):
        super().__init__()
        self.norm_type = norm_type
        if mlp:
            self.head = nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim))
        else:
            self.head = nn.Linear(in_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim, eps=1e-5)

    def forward(self, x):
        x = self.norm(self.head(x))
        return x / x.norm(dim=-1, keepdim=True) if self.norm_type == "l2" else x


@dataclass
class VisionOutput:
    tokens: torch.Tensor                          # (B, 1+Nvis, C) after the last block run
    pooled: Optional[torch.Tensor] = None         # (B, clip_embed_dim) attention-pooled
    logits: Optional[torch.Tensor] = None         # (B, num_classes)                    heads="classify"
    clip_align: Optional[torch.Tensor] = None     # (K, B, 1+Nvis, clip_teacher_embed_dim) distill/align
    final_align: Optional[torch.Tensor] = None    # (B, clip_teacher_final_dim)          distill/align
    mae_align: Optional[torch.Tensor] = None      # (K, B, Nvis, mae_teacher_embed_dim)  distill
    visible_idx: Optional[torch.Tensor] = None    # (B, 1+Nvis) positions kept (None when unmasked)
    layers: list = field(default_factory=list)    # outputs of the blocks asked for with return_layers


# ---------------------------------------------------------------------------------------------
# the encoder

class VideoViT(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.num_patches, C))
        if cfg.sep_image_video_pos_embed:
            self.img_pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.grid ** 2, C))
        dpr = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList([
            Block(C, cfg.num_heads, cfg.mlp_hidden, qkv_bias=cfg.qkv_bias, qk_norm=cfg.qk_norm,
                  init_values=cfg.init_values, layerscale_fp32=cfg.layerscale_fp32, drop_path=dpr[i],
                  act=cfg.mlp_act, norm="rms", norm_eps=1e-6)
            for i in range(cfg.depth)])
        self.clip_projector = AttentionPool(C, cfg.attn_pool_num_heads, cfg.clip_embed_dim)

        if cfg.heads in ("distill", "align"):
            self.clip_pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.num_patches, C))
            if cfg.sep_image_video_pos_embed:
                self.clip_img_pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.grid ** 2, C))
            self.clip_decoder = nn.ModuleList([
                AlignDecoder(C, cfg.clip_teacher_embed_dim, mlp=cfg.clip_decoder_mlp, norm_type=cfg.clip_norm_type)
                for _ in range(cfg.clip_return_layer)])
            if cfg.clip_teacher_final_dim > 0:
                self.final_clip_decoder = AlignDecoder(cfg.clip_embed_dim, cfg.clip_teacher_final_dim,
                                                       mlp=cfg.clip_decoder_mlp, norm_type=cfg.clip_norm_type)
        if cfg.heads == "distill" and cfg.mae_return_layer > 0:     # 0: a distillation student, no MAE branch
            self.mae_pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, C))
            self.mae_decoder = nn.ModuleList([
                AlignDecoder(C, cfg.mae_teacher_embed_dim, mlp=True, norm_type=cfg.mae_norm_type)
                for _ in range(cfg.mae_return_layer)])
        if cfg.heads == "classify":
            self.fc_norm = nn.LayerNorm(cfg.clip_embed_dim)
            self.fc_dropout = nn.Dropout(cfg.fc_drop_rate)
            self.head = nn.Linear(cfg.clip_embed_dim, cfg.num_classes)
        self.init_weights()

    # -- initialisation (official `_init_weights` + `fix_init_weight`); a no-op on the meta device
    @torch.no_grad()
    def init_weights(self):
        cfg = self.cfg
        for m in self.modules():
            if isinstance(m, nn.Linear):
                # every Linear, the decoders' included: the official model applies this init after the
                # decoders' own xavier init, so trunc-normal is what the released training started from
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.Conv3d, RMSNorm, LayerScale, PoolProjections)):
                m.reset_parameters()
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for i, blk in enumerate(self.blocks):      # residual-branch outputs scaled by 1/sqrt(2*layer)
            blk.attn.proj.weight.div_(math.sqrt(2.0 * (i + 1)))
            blk.mlp.fc2.weight.div_(math.sqrt(2.0 * (i + 1)))
        video = get_3d_sincos_pos_embed(cfg.embed_dim, cfg.grid, cfg.t_size, cls_token=True)[None]
        image = get_3d_sincos_pos_embed(cfg.embed_dim, cfg.grid, 1, cls_token=True)[None]
        for name, table in (("pos_embed", video), ("clip_pos_embed", video), ("mae_pos_embed", video[:, 1:]),
                            ("img_pos_embed", image), ("clip_img_pos_embed", image)):
            if name in self._parameters:
                getattr(self, name).copy_(table)
        if cfg.heads == "classify":
            self.head.weight.mul_(cfg.head_init_scale)
            self.head.bias.mul_(cfg.head_init_scale)

    # top-level names of the encoder every head shares; everything else is a head
    BACKBONE = ("patch_embed", "cls_token", "pos_embed", "img_pos_embed", "blocks", "clip_projector")

    def param_counts(self):
        """{"backbone": patch embed, CLS, pos_embed (+ img_pos_embed), blocks and the attention pool, "heads": the
        rest (distillation decoders with their position tables, or the classifier)}. The heads' size follows the
        teachers' widths (cfg.clip_teacher_embed_dim, ...), so two models of one preset differ there only."""
        counts = {"backbone": 0, "heads": 0}
        for name, p in self.named_parameters():
            counts["backbone" if name.split(".")[0] in self.BACKBONE else "heads"] += p.numel()
        return counts

    def no_weight_decay(self):
        """Parameter names exempt from weight decay (besides 1-D params and biases)."""
        return {n for n in self._parameters if n == "cls_token" or n.endswith("pos_embed")}

    def _pos_embed(self, name, image):
        """The (1, 1+N, C) table `name` ("pos_embed" or "clip_pos_embed") for video input. For images
        (T=1): the model's own image table if it has one, else CLS + the mean over frames of the video
        table (official semantics)."""
        table = getattr(self, name)
        if not image:
            return table
        own = name.replace("pos_embed", "img_pos_embed")
        if own in self._parameters:
            return getattr(self, own)
        C, g2 = table.shape[-1], self.cfg.grid ** 2
        return torch.cat([table[:, :1], table[:, 1:].view(1, -1, g2, C).mean(dim=1)], dim=1)

    def forward(self, video, mask=None, *, visible_idx=None, return_idx=-1, image=False, return_layers=(),
                pool=True) -> VisionOutput:
        """video (B, 3, T, H, W) (T = 1 with image=True); mask (B, 1+N) bool, True = masked (the CLS
        slot included, it must stay visible), or visible_idx (B, 1+Nvis) int64 ascending.
        return_idx: run blocks up to depth + return_idx (-1 = all); the heads run only for -1.
        return_layers: block indices whose outputs are returned in out.layers (ascending order).
        pool=False skips the pooling head and the heads after it (e.g. for a teacher that pools itself)."""
        cfg = self.cfg
        want_t = 1 if image else cfg.num_frames
        if video.dim() != 5 or tuple(video.shape[1:]) != (cfg.in_chans, want_t, cfg.img_size, cfg.img_size):
            raise ValueError(f"video must be (B, {cfg.in_chans}, {want_t}, {cfg.img_size}, {cfg.img_size}) "
                             f"{'(image=True)' if image else ''}, got {tuple(video.shape)}")
        if not -cfg.depth <= return_idx <= -1:
            raise ValueError(f"return_idx={return_idx} must be in [-{cfg.depth}, -1]")
        if mask is not None and visible_idx is not None:
            raise ValueError("pass either mask or visible_idx, not both")
        B, n_tokens = video.shape[0], 1 + (cfg.grid ** 2 if image else cfg.num_patches)
        if mask is not None:
            if mask.dtype != torch.bool or tuple(mask.shape) != (B, n_tokens):
                raise ValueError(f"mask must be bool (B, 1+N) = {(B, n_tokens)}, got {mask.dtype} {tuple(mask.shape)}")
            visible_idx = kernels.masked_visible_idx(mask)
        x = self.patch_embed(video.to(self.patch_embed.proj.weight.dtype))      # (B, N, C)
        x = torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x], dim=1)  # (B, 1+N, C)
        pos = self._pos_embed("pos_embed", image)
        if visible_idx is not None:
            x = kernels.masked_gather(x, visible_idx, pos.to(x.dtype))          # (B, 1+Nvis, C)
        else:
            x = x + pos.to(x.dtype)

        last = cfg.depth + return_idx
        clip_feats, mae_feats, layers = [], [], []
        for i, blk in enumerate(self.blocks[:last + 1]):
            x = blk(x)
            if cfg.heads in ("distill", "align") and i in cfg.clip_return_index:
                clip_feats.append(x)
            if cfg.heads == "distill" and i in cfg.mae_return_index:
                mae_feats.append(x[:, 1:])                                         # no CLS
            if i in return_layers:
                layers.append(x)
        out = VisionOutput(tokens=x, visible_idx=visible_idx, layers=layers)
        if return_idx != -1 or not pool:
            return out

        out.pooled = self.clip_projector(x)                                        # (B, clip_embed_dim)
        if cfg.heads == "classify":
            out.logits = self.head(self.fc_dropout(self.fc_norm(out.pooled)))
        if cfg.heads in ("distill", "align"):
            out.final_align = self.final_clip_decoder(out.pooled) if cfg.clip_teacher_final_dim > 0 else out.pooled
            clip_pos = self._pos_embed("clip_pos_embed", image)[0]             # (1+N, C)
            clip_pos = clip_pos[visible_idx] if visible_idx is not None else clip_pos.expand(B, -1, -1)
            out.clip_align = torch.stack([dec(f + clip_pos.to(f.dtype))
                                          for dec, f in zip(self.clip_decoder, clip_feats)])
        if cfg.heads == "distill" and cfg.mae_return_layer > 0:
            mae_pos = self.mae_pos_embed[0]                                        # (N, C), no CLS
            # visible patch positions: drop the CLS slot (index 0, first when sorted) and shift by one
            mae_pos = mae_pos[visible_idx[:, 1:] - 1] if visible_idx is not None else mae_pos.expand(B, -1, -1)
            out.mae_align = torch.stack([dec(f + mae_pos.to(f.dtype))
                                         for dec, f in zip(self.mae_decoder, mae_feats)])
        return out


def count_params(model):
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    # Smoke test: python -m ivmini.vit [--preset tiny] [--batch 2] -- build, run one masked forward, report.
    import argparse
    import logging
    import time

    from .config import vision_config

    ap = argparse.ArgumentParser(description="Build an InternVideo2 encoder and run one forward pass on random video.")
    ap.add_argument("--preset", default="tiny", help="tiny | S | B | L | 1B | 6B (default tiny)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--keep", type=float, default=0.2, help="fraction of patches kept visible per frame")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # shows the kernels backend chosen
    cfg = vision_config(args.preset, heads="distill", clip_return_layer=2, mae_return_layer=2)
    model = VideoViT(cfg).eval()
    video = torch.randn(args.batch, 3, cfg.num_frames, cfg.img_size, cfg.img_size)
    per_frame = cfg.grid ** 2
    keep = max(1, int(per_frame * args.keep))
    scores = torch.rand(args.batch, cfg.t_size, per_frame).argsort(dim=-1)[..., :keep].sort(dim=-1).values
    frame_offset = 1 + torch.arange(cfg.t_size)[None, :, None] * per_frame
    visible_idx = torch.cat([torch.zeros(args.batch, 1, dtype=torch.long),
                             (scores + frame_offset).flatten(1)], dim=1)  # (B, 1 + T*keep), CLS first
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model(video, visible_idx=visible_idx)
    dt = time.perf_counter() - t0
    n = model.param_counts()
    print(f"preset {args.preset}: {count_params(model) / 1e6:.2f} M parameters = backbone {n['backbone'] / 1e6:.2f} M "
          f"+ heads {n['heads'] / 1e6:.2f} M")
    print(f"  heads: stage-1 decoders for teachers of width {cfg.clip_teacher_embed_dim} (final "
          f"{cfg.clip_teacher_final_dim}) and {cfg.mae_teacher_embed_dim}, {cfg.clip_return_layer} + "
          f"{cfg.mae_return_layer} layers (InternViT-6B and VideoMAEv2-g; train.py's small random teachers give "
          f"smaller heads, the same backbone)")
    print(f"  video {tuple(video.shape)}, {visible_idx.shape[1]} of {1 + cfg.num_patches} tokens visible")
    for name in ("tokens", "pooled", "clip_align", "final_align", "mae_align"):
        print(f"  {name:12s} {tuple(getattr(out, name).shape)}")
    print(f"  forward {dt * 1e3:.0f} ms on {video.device}")
