"""BEATs, the audio tower of InternVideo2 stage 2 (audio-visual), from the shared layers.py pieces.

Reproduces the forward path InternVideo2 uses: `BEATs.forward(fbank)` of the official
multi_modality/models/backbones/beats/BEATs.py + backbone.py (TransformerEncoder, post-LN
TransformerSentenceEncoderLayer, MultiheadAttention with the gated relative position bias); the waveform
`preprocess` (128-bin Kaldi fbank) is bypassed there too: features come from ivmini/data/audio.py.

Data flow, B clips, T fbank frames (998 for 10 s), C = encoder_embed_dim, E = embed_dim, P = 16:

    fbank (B, T, 64)                         log-mel features, 64 mel bins
    -> patch_embedding Conv2d(1, E, P, P)    (B, E, T // P, 64 // P = 4)    trailing T % P frames dropped
    -> flatten, transpose                    (B, N = (T // P) * 4, E)        token n: time patch n // 4, mel n % 4
    -> layer_norm, post_extract_proj         (B, N, C)                       the projection only when E != C
    -> + GELU(SamePad(pos_conv(x)))          (B, N, C)   weight-normed Conv1d, kernel conv_pos, conv_pos_groups groups
    -> encoder.layer_norm (post-LN only)     (B, N, C)
    -> L x BEATsBlock                        (B, N, C)   x = LN(alpha x + attn(x)); x = LN(alpha x + mlp(x)),
                                                         deep-norm alpha = (2L)^(1/4) (1 without deep_norm)
    [-> encoder.layer_norm (pre-LN only)]

Attention: the official code scales q by hd^-1/2 / 32 and forms (q k^T - rowmax) * 32 + bias before the
softmax, a guard against fp16 overflow. The row max is a per-row constant and softmax ignores per-row
constants, so it is exactly softmax(q k^T hd^-1/2 + bias): kernels.attention with `bias=` computes that
(tests/test_beats.py checks both forms agree). The bias is T5-style: relative offset j - i -> bucket
(relative_position_bucket) -> a learned (num_buckets, H) table, computed once and shared by every layer
(the official layer 0 computes it and passes it on); with gru_rel_pos each layer gates it per query row:
    (a, b) = sigmoid(sum over groups of 4 of grep_linear(q_raw))  q_raw: the unscaled projected query (B, H, N, hd)
    bias[b, h, i, j] = (a (b * grep_a[h] - 1) + 2) * table[bucket(j - i), h]

Not reproduced: attention_dropout and activation_dropout (kernels.attention and Mlp have no dropout; the
module refuses to train with them > 0 rather than silently skip them). Frozen or not is the caller's choice.
Checkpoints: ivmini/checkpoint/beats.py (load_official("beats", ...)). Tests: tests/test_beats.py (golden
output of the official code, buckets, weight norm, deep-norm residual, gated bias, errors).
"""
import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import Block

MEL_BINS = 64      # InternVideo2 feeds 64-bin fbanks (ivmini/data/audio.py); the official preprocess makes 128
ACTIVATIONS = {"gelu": "gelu", "gelu_accurate": "gelu_tanh"}   # official activation_fn -> layers.Mlp act


@dataclasses.dataclass
class BEATsConfig:
    """The official BEATsConfig's fields and defaults, one for one (cfg dicts of official files fit)."""
    input_patch_size: int = -1
    embed_dim: int = 512
    conv_bias: bool = False
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"
    layer_wise_gradient_decay_ratio: float = 1.0
    layer_norm_first: bool = False
    deep_norm: bool = False
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    encoder_layerdrop: float = 0.0
    dropout_input: float = 0.0
    conv_pos: int = 128
    conv_pos_groups: int = 16
    relative_position_embedding: bool = False
    num_buckets: int = 320
    max_distance: int = 1280
    gru_rel_pos: bool = False
    finetuned_model: bool = False
    predictor_dropout: float = 0.1
    predictor_class: int = 527


# what the released BEATs use (post-LN deep-norm, gated relative bias) and what this module can train with
_ARCH = dict(input_patch_size=16, conv_bias=False, deep_norm=True, layer_norm_first=False,
             relative_position_embedding=True, gru_rel_pos=True, dropout=0.0, attention_dropout=0.0,
             activation_dropout=0.0)
BEATS_PRESETS = {
    # ivmini's CPU size for the synthetic world (1.0M parameters), trained from random init in the default audio run
    "tiny": BEATsConfig(embed_dim=128, encoder_layers=2, encoder_embed_dim=192, encoder_ffn_embed_dim=768,
                        encoder_attention_heads=3, conv_pos=16, conv_pos_groups=16, num_buckets=64,
                        max_distance=256, **_ARCH),
    # the released BEATs (iter3) size, 90.3M parameters. The sizes are BEATs'; max_distance 800 and zero dropouts
    # are recalled from Microsoft's cfg, not read from a file: a real beats.pth brings its own cfg
    "base": BEATsConfig(embed_dim=512, encoder_layers=12, encoder_embed_dim=768, encoder_ffn_embed_dim=3072,
                        encoder_attention_heads=12, conv_pos=128, conv_pos_groups=16, num_buckets=320,
                        max_distance=800, **_ARCH),
}


def relative_position_bucket(offset, num_buckets, max_distance):
    """Offsets j - i (long tensor) -> bucket ids in [0, num_buckets), the official bidirectional rule:
    half the buckets per sign (positive offsets in the upper half); within a half, |offset| < half/2 is its own
    bucket, larger ones are log-spaced up to max_distance, beyond which they share the last bucket."""
    half = num_buckets // 2
    bucket = (offset > 0).long() * half
    dist = offset.abs()
    exact = half // 2
    # log spacing: exact + floor(log(d / exact) / log(max_distance / exact) * (half - exact)), float32 as official
    far = exact + (torch.log(dist.float() / exact) / math.log(max_distance / exact) * (half - exact)).long()
    far = far.clamp(max=half - 1)
    return bucket + torch.where(dist < exact, dist, far)


class WeightNormConv1d(nn.Module):
    """Conv1d whose weight is g * v / ||v||, the norm over (out, in) for each kernel tap: torch weight_norm
    with dim=2 as the official pos_conv uses. Parameters weight_g (1, 1, K), weight_v (C, C / groups, K), bias."""

    def __init__(self, dim, kernel_size, groups):
        super().__init__()
        if dim % groups:
            raise ValueError(f"conv_pos_groups={groups} must divide encoder_embed_dim={dim}")
        self.padding, self.groups = kernel_size // 2, groups
        self.weight_v = nn.Parameter(torch.empty(dim, dim // groups, kernel_size))
        self.weight_g = nn.Parameter(torch.empty(1, 1, kernel_size))
        self.bias = nn.Parameter(torch.zeros(dim))
        # official init: v ~ N(0, 4 / (K C)), g = ||v|| (so the weight starts equal to v), bias 0
        nn.init.normal_(self.weight_v, std=math.sqrt(4.0 / (kernel_size * dim)))
        with torch.no_grad():
            self.weight_g.copy_(self.weight_v.norm(dim=(0, 1), keepdim=True))

    def weight(self):
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=(0, 1), keepdim=True)   # (C, C/g, K)

    def forward(self, x):
        """x (B, C, N) -> (B, C, N + 1 if K is even else N)."""
        return F.conv1d(x, self.weight(), self.bias, padding=self.padding, groups=self.groups)


class BEATsBlock(Block):
    """A post-LN (or pre-LN) deep-norm Block whose attention bias is the shared relative position table, gated
    per query row by this layer's grep_linear / grep_a when gru_rel_pos."""

    def __init__(self, cfg, alpha):
        super().__init__(cfg.encoder_embed_dim, cfg.encoder_attention_heads, cfg.encoder_ffn_embed_dim,
                         qkv_bias=True, act=ACTIVATIONS[cfg.activation_fn], norm="layer", norm_eps=1e-5,
                         norm_first=cfg.layer_norm_first, residual_scale=alpha, dropout=cfg.dropout)
        self.gru_rel_pos = cfg.gru_rel_pos
        if cfg.gru_rel_pos:
            H = cfg.encoder_attention_heads
            self.grep_linear = nn.Linear(cfg.encoder_embed_dim // H, 8)
            self.grep_a = nn.Parameter(torch.ones(1, H, 1, 1))

    def gated_bias(self, q, pos_bias):
        """q (B, H, N, hd) the projected, unscaled queries; pos_bias (H, N, N) -> (B, H, N, N)."""
        B, H, N, _ = q.shape
        gates = torch.sigmoid(self.grep_linear(q).view(B, H, N, 2, 4).sum(-1))   # (B, H, N, 2)
        a, b = gates[..., :1], gates[..., 1:]                                     # (B, H, N, 1) each
        return (a * (b * self.grep_a - 1.0) + 2.0) * pos_bias

    def forward(self, x, pos_bias=None, key_padding_mask=None):
        kw = {} if key_padding_mask is None else {"key_padding_mask": key_padding_mask}
        if pos_bias is not None:
            kw["bias"] = (lambda q: self.gated_bias(q, pos_bias)) if self.gru_rel_pos else pos_bias
        return super().forward(x, **kw)


class BEATsEncoder(nn.Module):
    """Conv position embedding, the blocks and their shared relative position table (official
    TransformerEncoder)."""

    def __init__(self, cfg):
        super().__init__()
        C = cfg.encoder_embed_dim
        self.cfg = cfg
        self.pos_conv = WeightNormConv1d(C, cfg.conv_pos, cfg.conv_pos_groups)
        self.trim = 1 if cfg.conv_pos % 2 == 0 else 0    # SamePad: an even kernel with K // 2 padding adds a frame
        if cfg.relative_position_embedding:
            self.relative_attention_bias = nn.Embedding(cfg.num_buckets, cfg.encoder_attention_heads)
        alpha = (2 * cfg.encoder_layers) ** 0.25 if cfg.deep_norm else 1.0
        self.layers = nn.ModuleList([BEATsBlock(cfg, alpha) for _ in range(cfg.encoder_layers)])
        self.layer_norm = nn.LayerNorm(C)

    def position_bias(self, n, device):
        """The shared table for n tokens: (H, n, n), [h, i, j] = table[bucket(j - i), h]."""
        pos = torch.arange(n, device=device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.cfg.num_buckets,
                                           self.cfg.max_distance)                      # (n, n)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)

    def forward(self, x, padding_mask=None):
        """x (B, N, C), padding_mask (B, N) bool True = padding -> (B, N, C)."""
        cfg = self.cfg
        keep = None
        if padding_mask is not None:
            x = x.masked_fill(padding_mask[..., None], 0.0)
            keep = ~padding_mask
        conv = self.pos_conv(x.transpose(1, 2))                        # (B, C, N + trim)
        conv = conv[..., :conv.shape[-1] - self.trim]
        x = x + F.gelu(conv).transpose(1, 2)                           # (B, N, C)
        if not cfg.layer_norm_first:
            x = self.layer_norm(x)
        x = F.dropout(x, cfg.dropout, self.training)
        pos_bias = self.position_bias(x.shape[1], x.device) if cfg.relative_position_embedding else None
        for layer in self.layers:
            if cfg.layer_wise_gradient_decay_ratio != 1.0 and x.requires_grad:
                x = x.clone()          # identity forward; the hook scales the gradient flowing to earlier layers
                x.register_hook(lambda g: g * cfg.layer_wise_gradient_decay_ratio)
            if self.training and cfg.encoder_layerdrop > 0 and torch.rand(()).item() < cfg.encoder_layerdrop:
                continue
            x = layer(x, pos_bias, keep)
        return self.layer_norm(x) if cfg.layer_norm_first else x


class BEATs(nn.Module):
    """fbank (B, T, 64) -> tokens (B, (T // 16) * 4, encoder_embed_dim); see the module docstring."""

    def __init__(self, cfg=None, **overrides):
        super().__init__()
        cfg = dataclasses.replace(cfg or BEATsConfig(), **overrides)
        if cfg.activation_fn not in ACTIVATIONS:
            raise ValueError(f"BEATs activation_fn must be one of {sorted(ACTIVATIONS)}, got {cfg.activation_fn!r}")
        if cfg.deep_norm and cfg.layer_norm_first:
            raise ValueError("deep_norm is for post-LN: deep_norm and layer_norm_first cannot both be set")
        if cfg.input_patch_size <= 0 or MEL_BINS % cfg.input_patch_size:
            raise ValueError(f"input_patch_size must be a positive divisor of {MEL_BINS} mel bins, "
                             f"got {cfg.input_patch_size}")
        if cfg.finetuned_model:
            raise ValueError("finetuned_model=True (the AudioSet classifier head) is not part of InternVideo2's "
                             "audio tower; load the pretrained (not fine-tuned) BEATs")
        self.cfg = cfg
        P, E, C = cfg.input_patch_size, cfg.embed_dim, cfg.encoder_embed_dim
        self.patch_embedding = nn.Conv2d(1, E, kernel_size=P, stride=P, bias=cfg.conv_bias)
        self.layer_norm = nn.LayerNorm(E)
        self.post_extract_proj = nn.Linear(E, C) if E != C else None
        self.encoder = BEATsEncoder(cfg)

    def forward(self, fbank, padding_mask=None):
        """fbank (B, T, 64); padding_mask (B, T) bool, True = padded frame (official convention); a token is
        padding when every frame of its time patch is. Returns (B, (T // P) * (64 // P), C)."""
        cfg, P = self.cfg, self.cfg.input_patch_size
        if fbank.dim() != 3 or fbank.shape[-1] != MEL_BINS:
            raise ValueError(f"BEATs takes fbank (B, T, {MEL_BINS} mel bins), got shape {tuple(fbank.shape)}")
        B, T, _ = fbank.shape
        if T < P:
            raise ValueError(f"BEATs needs at least {P} fbank frames (one patch), got {T}")
        if self.training and (cfg.attention_dropout > 0 or cfg.activation_dropout > 0):
            raise ValueError(f"BEATs does not implement attention_dropout ({cfg.attention_dropout}) or "
                             f"activation_dropout ({cfg.activation_dropout}); set them to 0 to train")
        x = self.patch_embedding(fbank[:, None])                      # (B, E, T // P, 64 // P), Conv2d drops T % P
        x = x.flatten(2).transpose(1, 2)                               # (B, N, E), time-major
        x = self.layer_norm(x)
        if self.post_extract_proj is not None:
            x = self.post_extract_proj(x)                              # (B, N, C)
        x = F.dropout(x, cfg.dropout_input, self.training)
        mask = None
        if padding_mask is not None:
            if tuple(padding_mask.shape) != (B, T) or padding_mask.dtype != torch.bool:
                raise ValueError(f"padding_mask must be bool (B, T) = {(B, T)}, got {padding_mask.dtype} "
                                 f"{tuple(padding_mask.shape)}")
            per_patch = padding_mask[:, :(T // P) * P].view(B, T // P, P).all(-1)        # (B, T // P)
            mask = per_patch.repeat_interleave(MEL_BINS // P, dim=1)                      # (B, N)
        return self.encoder(x, mask)
