"""The shared building blocks. Every tower of every stage is made of these; each concept is defined
once, here.

    RMSNorm        InternVideo2 RMSNorm (fp32 statistics), via kernels.rms_norm
    LayerScale     per-channel residual scale `gamma` (optionally multiplied in fp32)
    DropPath       stochastic depth, per sample
    Mlp            fc1 -> GELU (exact or tanh) or QuickGELU -> fc2
    Attention      multi-head attention: self (fused qkv) or cross (q + kv), causal, GQA, qk-norm
    Block          pre-norm transformer block: x + ls1(attn(norm1(x))), x + ls2(mlp(norm2(x)))
    AttentionPool  the InternVideo2 `clip_projector`: mean query, one attention, via kernels.attn_pool

Parameter names follow the official checkpoints (`attn.qkv`, `ls1.gamma`, `clip_projector.norm1_q`,
`clip_projector.cross_attn.q_bias`, ...), so loading them needs no renaming.
Model code calls only `kernels.*` ops; it never imports triton, the CUDA extension or
torch.distributed.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self):
        nn.init.ones_(self.weight)

    def forward(self, x):
        return kernels.rms_norm(x, self.weight, self.eps)


class LayerScale(nn.Module):
    def __init__(self, dim, init_values=1e-5, force_fp32=True):
        super().__init__()
        self.init_values, self.force_fp32 = init_values, force_fp32
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def reset_parameters(self):
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x):
        if self.force_fp32:  # official: under bf16 training the scale is applied in fp32
            return (x.float() * self.gamma.float()).to(x.dtype)
        return x * self.gamma


class DropPath(nn.Module):
    """Zero the whole residual branch of a sample with probability p (and scale the rest by 1/(1-p))."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self):
        return f"p={self.p}"


class Mlp(nn.Module):
    """fc1 -> act -> fc2. act: "gelu" (exact erf), "gelu_tanh" (tanh approximation, flash_attn's
    FusedMLP default) or "quick_gelu" (x * sigmoid(1.702 x), OpenAI CLIP)."""

    def __init__(self, dim, hidden, act="gelu", out_dim=None, bias=True):
        super().__init__()
        if act not in ("gelu", "gelu_tanh", "quick_gelu"):
            raise ValueError(f"Mlp act must be 'gelu', 'gelu_tanh' or 'quick_gelu', got {act!r}")
        self.act = act
        self.approximate = "tanh" if act == "gelu_tanh" else "none"
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, out_dim or dim, bias=bias)

    def forward(self, x):
        h = self.fc1(x)
        h = h * torch.sigmoid(1.702 * h) if self.act == "quick_gelu" else F.gelu(h, approximate=self.approximate)
        return self.fc2(h)


class Attention(nn.Module):
    """Multi-head attention on top of kernels.attention.

    Self-attention projects with one fused `qkv` Linear whose output rows are [q; k; v], each
    head-major (the official ViT layout). Cross-attention (`kv_dim` given) projects q from x with `q`
    and k, v from the context with `kv` (rows [k; v]). qk_norm applies RMSNorm over the full width of
    q and of k (all heads together, as InternVideo2 and InternViT do). num_kv_heads < num_heads is
    grouped-query attention.
    """

    def __init__(self, dim, num_heads, *, qkv_bias=False, qk_norm=False, kv_dim=None, num_kv_heads=None,
                 causal=False, out_dim=None, proj_bias=True, norm_eps=1e-6):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide dim={dim}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.head_dim = dim // num_heads
        self.causal = causal
        kv_width = self.num_kv_heads * self.head_dim
        if kv_dim is None:
            self.qkv = nn.Linear(dim, dim + 2 * kv_width, bias=qkv_bias)
        else:
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv = nn.Linear(kv_dim, 2 * kv_width, bias=qkv_bias)
        self.q_norm = RMSNorm(dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(kv_width, norm_eps) if qk_norm else None
        self.proj = nn.Linear(dim, out_dim or dim, bias=proj_bias)

    def forward(self, x, context=None, key_padding_mask=None):
        B, N, C = x.shape
        kv_width = self.num_kv_heads * self.head_dim
        if context is None:
            q, k, v = self.qkv(x).split([C, kv_width, kv_width], dim=-1)   # (B, N, C), (B, N, kvw) x2
        else:
            q = self.q(x)
            k, v = self.kv(context).split([kv_width, kv_width], dim=-1)    # (B, Nk, kvw) x2
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        Nk = k.shape[1]
        q = q.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)      # (B, H, N, d)
        k = k.view(B, Nk, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, Nk, d)
        v = v.view(B, Nk, self.num_kv_heads, self.head_dim).transpose(1, 2)
        o = kernels.attention(q, k, v, causal=self.causal, key_padding_mask=key_padding_mask)
        return self.proj(o.transpose(1, 2).reshape(B, N, C))                # (B, N, out_dim)


class Block(nn.Module):
    """Pre-norm transformer block with optional LayerScale and stochastic depth.

    norm="rms" (InternVideo2, InternViT) or "layer" (VideoMAE). init_values=0 builds no LayerScale.
    """

    def __init__(self, dim, num_heads, mlp_hidden, *, qkv_bias=False, qk_norm=False, init_values=0.0,
                 layerscale_fp32=True, drop_path=0.0, act="gelu", norm="rms", norm_eps=1e-6):
        super().__init__()
        Norm = {"rms": RMSNorm, "layer": nn.LayerNorm}[norm]
        self.norm1 = Norm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, norm_eps=norm_eps)
        self.ls1 = LayerScale(dim, init_values, layerscale_fp32) if init_values else nn.Identity()
        self.norm2 = Norm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, mlp_hidden, act)
        self.ls2 = LayerScale(dim, init_values, layerscale_fp32) if init_values else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class PoolProjections(nn.Module):
    """Holds the pool's projections under the official names `cross_attn.{q,k,v,proj}` and
    `cross_attn.{q,k,v}_bias` (q/k/v are bias-free Linears with separate bias vectors)."""

    def __init__(self, dim, out_dim):
        super().__init__()
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.k_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, out_dim)

    def reset_parameters(self):
        for b in (self.q_bias, self.k_bias, self.v_bias):
            nn.init.zeros_(b)


class AttentionPool(nn.Module):
    """InternVideo2 attention pooling: query = LN_q(mean of all tokens incl. CLS), keys/values =
    LN_k(x), LN_v(x); one cross-attention with `num_heads` heads; out projection to `out_dim`.
    x (B, N, C) -> (B, out_dim). No residual, no MLP."""

    def __init__(self, dim, num_heads, out_dim, eps=1e-5):
        super().__init__()
        self.num_heads, self.eps = num_heads, eps
        self.norm1_q = nn.LayerNorm(dim, eps=eps)
        self.norm1_k = nn.LayerNorm(dim, eps=eps)
        self.norm1_v = nn.LayerNorm(dim, eps=eps)
        self.cross_attn = PoolProjections(dim, out_dim)

    def attention_weights(self, x):
        """The pool's softmax weights over the N tokens, averaged over heads: (B, N), fp32.

        Used by teachers for semantic masking (official `return_attn`). Computed without K: with one
        query per head the score of token j is LN_k(x_j) . (W_k,h^T q_h) + a per-head constant
        (the same fold as kernels/triton/attn_pool.py), so this costs O(N C H) instead of a K projection.
        """
        B, N, C = x.shape
        a, H = self.cross_attn, self.num_heads
        d = C // H
        xf = x.float()
        q = F.linear(self.norm1_q(xf.mean(1)), a.q.weight.float(), a.q_bias.float())         # (B, C)
        u = torch.einsum("bhd,hdc->bhc", q.view(B, H, d), a.k.weight.float().view(H, d, C))  # (B, H, C)
        xhat = F.layer_norm(xf, (C,), eps=self.eps)                                          # (B, N, C)
        s = torch.einsum("bnc,bhc->bhn", xhat, u * self.norm1_k.weight.float()) * d ** -0.5  # (B, H, N)
        return s.softmax(dim=-1).mean(dim=1)

    def forward(self, x):
        a = self.cross_attn
        return kernels.attn_pool(
            x, self.norm1_q.weight, self.norm1_q.bias, self.norm1_k.weight, self.norm1_k.bias,
            self.norm1_v.weight, self.norm1_v.bias, a.q.weight, a.q_bias, a.k.weight, a.k_bias,
            a.v.weight, a.v_bias, a.proj.weight, a.proj.bias, num_heads=self.num_heads, eps=self.eps)
