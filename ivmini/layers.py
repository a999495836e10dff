"""The shared building blocks. Every tower of every stage is made of these; each concept is defined
once, here, and nothing here knows which model it sits in.

    RMSNorm          InternVideo2 RMSNorm (fp32 statistics), via kernels.rms_norm
    LayerScale       per-channel residual scale `gamma` (optionally multiplied in fp32)
    DropPath         stochastic depth, per sample
    Mlp              fc1 -> act -> fc2, or gated (SwiGLU): fc2(act(x W_gate) * x W_up)
    RotaryEmbedding  RoPE (rotate-half convention), lazily built cos/sin tables
    Attention        multi-head attention: self (fused qkv) or cross (q + kv), causal, GQA, qk-norm, RoPE,
                     key padding, an additive score bias
    Block            transformer block, pre-norm or post-norm (deep-norm scaled), self-attention, an optional
                     cross-attention, MLP
    AttentionPool    the InternVideo2 `clip_projector`: mean query, one attention, via kernels.attn_pool

Block settings by tower (their own files hold presets and key maps): ViT, teachers: pre-norm, LayerScale.
BERT: post-norm LayerNorm eps 1e-12, cross_dim in the fusion layers (the Q-Former: every second layer).
BEATs: post-norm, residual_scale = (2 * depth)^(1/4), its relative position bias as `bias`. Llama/Mistral:
pre-norm RMSNorm, rope_theta, num_kv_heads, causal, act="silu", gated=True, bias=False.

Parameter names follow the official InternVideo2 checkpoints (`attn.qkv`, `ls1.gamma`, `clip_projector.norm1_q`,
`clip_projector.cross_attn.q_bias`, ...), so loading them needs no renaming; other checkpoints map onto the
same names with a short key map (a fused projection is the concatenation of theirs).
Model code calls only `kernels.*` ops; it never imports triton, the CUDA extension or torch.distributed.
Tests: tests/test_layers.py (against hand-written formulas); tests/test_vit.py, test_teachers.py (official code).
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
    FusedMLP default), "quick_gelu" (x * sigmoid(1.702 x), OpenAI CLIP) or "silu".

    gated=True (with act="silu": SwiGLU) computes fc2(act(x W_gate) * (x W_up)). fc1 holds W_gate and
    W_up as one Linear of 2*hidden output rows [gate; up], split in forward: one GEMM instead of two, and
    the same keys (mlp.fc1, mlp.fc2) as the ungated Mlp. A checkpoint with separate gate/up/down
    projections maps as fc1 = cat([gate, up]), fc2 = down: the same concatenation as for attn.qkv.
    """

    def __init__(self, dim, hidden, act="gelu", out_dim=None, bias=True, gated=False):
        super().__init__()
        if act not in ("gelu", "gelu_tanh", "quick_gelu", "silu"):
            raise ValueError(f"Mlp act must be 'gelu', 'gelu_tanh', 'quick_gelu' or 'silu', got {act!r}")
        self.act, self.gated = act, gated
        self.fc1 = nn.Linear(dim, 2 * hidden if gated else hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, out_dim or dim, bias=bias)

    def activation(self, h):
        if self.act == "quick_gelu":
            return h * torch.sigmoid(1.702 * h)
        if self.act == "silu":
            return F.silu(h)
        return F.gelu(h, approximate="tanh" if self.act == "gelu_tanh" else "none")

    def forward(self, x):
        h = self.fc1(x)                                  # (..., hidden), gated: (..., 2*hidden)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)                # (..., hidden) each
            return self.fc2(self.activation(gate) * up)
        return self.fc2(self.activation(h))


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE) in the rotate-half convention of HF Llama/Mistral: channel i of
    a head (i < d/2) is paired with channel i + d/2, and at position p the pair is rotated by the angle
    p * theta^(-2i/d). x (..., N, d) -> same shape, rotated for positions offset .. offset+N-1.

    No parameters (so no state-dict keys). The cos/sin tables are built on first use on the input's
    device and in its dtype (angles computed in fp32 and cast, the rounding HF uses), for a power of
    two of positions, and rebuilt when longer positions or another device or dtype come.
    """

    def __init__(self, head_dim, theta=10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        self.head_dim, self.theta = head_dim, float(theta)
        self.cos = self.sin = None                       # (L, d) tables, built lazily

    def tables(self, n, device, dtype):
        """cos, sin (L, d) for positions 0 .. L-1, L >= n."""
        if self.cos is None or self.cos.shape[0] < n or self.cos.device != device or self.cos.dtype != dtype:
            L, d = 1 << max(n - 1, 0).bit_length(), self.head_dim      # next power of two: few rebuilds
            inv_freq = 1.0 / self.theta ** (torch.arange(0, d, 2, device=device).float() / d)   # (d/2,)
            angle = torch.arange(L, device=device).float()[:, None] * inv_freq                  # (L, d/2)
            angle = torch.cat([angle, angle], dim=-1)    # (L, d): channels i and i + d/2 share an angle
            self.cos, self.sin = angle.cos().to(dtype), angle.sin().to(dtype)
        return self.cos, self.sin

    def forward(self, x, offset=0, positions=None):
        """positions (B, N) long, optional: each token's own position (left-padded batches start each
        sample at 0), used instead of offset .. offset+N-1; every value must be < offset + N (true for
        positions counted from an attention mask), so the table size needs no device sync."""
        N = x.shape[-2]
        cos, sin = self.tables(offset + N, x.device, x.dtype)
        if positions is None:
            cos, sin = cos[offset:offset + N], sin[offset:offset + N]    # (N, d)
        else:
            cos, sin = cos[positions][:, None], sin[positions][:, None]  # (B, 1, N, d): broadcast over heads
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin         # (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)


class Attention(nn.Module):
    """Multi-head attention on top of kernels.attention.

    Self-attention projects with one fused `qkv` Linear whose output rows are [q; k; v], each
    head-major (the official ViT layout). Cross-attention (`kv_dim` given) projects q from x with `q`
    and k, v from the context with `kv` (rows [k; v]). qk_norm applies RMSNorm over the full width of
    q and of k (all heads together, as InternVideo2 and InternViT do). num_kv_heads < num_heads is
    grouped-query attention. rope_theta (self-attention only) rotates q and k by their positions after
    the projections and the qk-norm.
    """

    def __init__(self, dim, num_heads, *, qkv_bias=False, qk_norm=False, kv_dim=None, num_kv_heads=None,
                 causal=False, out_dim=None, proj_bias=True, norm_eps=1e-6, rope_theta=None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide dim={dim}")
        if rope_theta is not None and kv_dim is not None:
            raise ValueError("rope_theta is for self-attention: cross-attention queries and keys share no positions")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.head_dim = dim // num_heads
        self.causal, self.kv_dim = causal, kv_dim
        kv_width = self.num_kv_heads * self.head_dim
        if kv_dim is None:
            self.qkv = nn.Linear(dim, dim + 2 * kv_width, bias=qkv_bias)
        else:
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv = nn.Linear(kv_dim, 2 * kv_width, bias=qkv_bias)
        self.q_norm = RMSNorm(dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(kv_width, norm_eps) if qk_norm else None
        self.rope = RotaryEmbedding(self.head_dim, rope_theta) if rope_theta is not None else None
        self.proj = nn.Linear(dim, out_dim or dim, bias=proj_bias)

    def forward(self, x, context=None, key_padding_mask=None, *, bias=None, offset=0, positions=None,
                kv_cache=None):
        """x (B, N, dim) -> (B, N, out_dim).

        context (B, Nk, kv_dim): what a cross-attention attends to. key_padding_mask (B, Nk) bool, True =
        attend. bias: added to the scaled scores; a tensor broadcastable to (B, H, N, Nk), or a function of
        the projected queries q (B, H, N, d) (before RoPE) returning one, for a bias gated by the queries.
        offset: position of x's first token, for RoPE (a KV cache passes the number of cached tokens).
        positions (B, N): per-token RoPE positions instead (see RotaryEmbedding.forward).
        kv_cache: an object whose update(k, v) stores this call's keys and values (B, Hkv, N, d), after
        RoPE, behind the earlier ones and returns all of them (B, Hkv, Nk, d); with causal=True the
        bottom-right causal mask then lets the N new queries see every cached key and the new keys up to
        their own (key_padding_mask covers all Nk keys).
        """
        if (context is None) != (self.kv_dim is None):
            raise ValueError("a cross-attention (kv_dim) needs context; a self-attention takes none")
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
        if callable(bias):
            bias = bias(q)
        if self.rope is not None:
            q, k = self.rope(q, offset, positions), self.rope(k, offset, positions)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)                                     # (B, Hkv, Nk, d): cached + new
        o = kernels.attention(q, k, v, causal=self.causal, key_padding_mask=key_padding_mask, bias=bias)
        return self.proj(o.transpose(1, 2).reshape(B, N, C))                # (B, N, out_dim)


class Block(nn.Module):
    """Transformer block: self-attention, an optional cross-attention, MLP, each a residual sub-layer

        norm_first=True  (pre-norm):   x = x + drop_path(ls(f(norm(x))))
        norm_first=False (post-norm):  x = norm(residual_scale * x + drop_path(ls(f(x))))

    residual_scale is deep-norm's alpha (1: plain post-norm; pre-norm ignores it). norm: "rms" or "layer",
    eps norm_eps (also the qk-norm's). init_values=0 builds no LayerScale (ls1: self-attention, ls2: MLP).
    cross_dim: the context width of a cross-attention sub-layer (`cross_attn`, `cross_norm`) between
    self-attention and MLP. num_kv_heads, causal, rope_theta configure the self-attention; act, gated the
    Mlp; bias=False drops the biases of the attention output projections and the MLP (qkv_bias is separate).
    dropout: applied to each sub-layer's output before the residual add (BERT's hidden_dropout_prob).

    A tower that routes tokens differently (only some tokens cross-attend, two token groups with their
    own MLPs) subclasses Block and composes `sublayer` calls in its forward: a subclass is still a Block,
    so dist.parallelize shards and checkpoints it as one unit.
    """

    def __init__(self, dim, num_heads, mlp_hidden, *, qkv_bias=False, qk_norm=False, init_values=0.0,
                 layerscale_fp32=True, drop_path=0.0, act="gelu", norm="rms", norm_eps=1e-6, norm_first=True,
                 residual_scale=1.0, cross_dim=None, num_kv_heads=None, causal=False, rope_theta=None,
                 gated=False, bias=True, dropout=0.0):
        super().__init__()
        if norm not in ("rms", "layer"):
            raise ValueError(f"Block norm must be 'rms' or 'layer', got {norm!r}")
        Norm = {"rms": RMSNorm, "layer": nn.LayerNorm}[norm]
        self.norm_first, self.residual_scale = norm_first, residual_scale
        self.norm1 = Norm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, num_kv_heads=num_kv_heads,
                              causal=causal, proj_bias=bias, norm_eps=norm_eps, rope_theta=rope_theta)
        self.ls1 = LayerScale(dim, init_values, layerscale_fp32) if init_values else nn.Identity()
        self.cross_attn = self.cross_norm = None
        if cross_dim is not None:
            self.cross_norm = Norm(dim, eps=norm_eps)
            self.cross_attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, kv_dim=cross_dim,
                                        num_kv_heads=num_kv_heads, proj_bias=bias, norm_eps=norm_eps)
        self.norm2 = Norm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, mlp_hidden, act, bias=bias, gated=gated)
        self.ls2 = LayerScale(dim, init_values, layerscale_fp32) if init_values else nn.Identity()
        self.drop_path = DropPath(drop_path)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()   # Identity: no mask drawn at p=0

    def sublayer(self, x, norm, f):
        """One residual sub-layer around f (f includes its LayerScale), pre- or post-norm."""
        if self.norm_first:
            return x + self.drop_path(self.dropout(f(norm(x))))
        return norm(self.residual_scale * x + self.drop_path(self.dropout(f(x))))

    def forward(self, x, context=None, context_mask=None, **attn_kw):
        """x (B, N, dim) -> (B, N, dim).

        context (B, Nc, cross_dim) and context_mask (B, Nc) bool (True = attend) feed the cross-attention.
        attn_kw go to the self-attention as given (key_padding_mask (B, N), bias, offset, positions, kv_cache: see
        Attention.forward); passing only what was given keeps `attn` replaceable by an attention module
        whose forward takes fewer arguments.
        """
        if (context is None) != (self.cross_attn is None):
            raise ValueError("pass context if and only if the Block has a cross-attention (was built with cross_dim)")
        x = self.sublayer(x, self.norm1, lambda h: self.ls1(self.attn(h, **attn_kw)))
        if self.cross_attn is not None:
            x = self.sublayer(x, self.cross_norm, lambda h: self.cross_attn(h, context, context_mask))
        return self.sublayer(x, self.norm2, lambda h: self.ls2(self.mlp(h)))


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
