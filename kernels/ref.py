"""Pure-torch references of the four ivmini ops: the specification every backend is tested against.

Every backend (torch in kernels/torch_ops.py, Triton in kernels/triton/, CUDA in csrc/) is tested against
these functions, evaluated in float64. They are written to be read, not to be fast: fp32 math (float64
when given float64), result cast back to the input dtype, gradients by autograd.

    attention      softmax(q k^T * scale + bias) v  with causal / key-padding masks and GQA
    rms_norm       weight * (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype)   (InternVideo2 RMSNorm)
    attn_pool      the InternVideo2 `clip_projector`: one mean query attends over all tokens
    masked_gather  x[b, visible_idx[b]] (+ pos_embed[0, visible_idx[b]]), optionally for L stacked layers

Argument checking lives in kernels/__init__.py (shared by all backends); these functions assume
valid inputs.
"""
import torch
import torch.nn.functional as F


def _compute_dtype(t):
    # fp32 math for fp16/bf16/fp32 inputs; float64 stays float64 so tests can evaluate the spec exactly
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def attention_mask(nq, nk, *, causal=False, key_padding_mask=None, device=None):
    """Boolean (B or 1, 1, Nq, Nk) mask, True where query i may attend key j.

    causal is bottom-right aligned (FlashAttention >= 2.1): query i sees keys j <= i + Nk - Nq, so the
    last query sees every key; with Nq > Nk the first Nq - Nk queries see nothing.
    """
    allowed = torch.ones(1, 1, nq, nk, dtype=torch.bool, device=device)
    if causal:
        i = torch.arange(nq, device=device)[:, None]
        j = torch.arange(nk, device=device)[None, :]
        allowed = allowed & (j <= i + (nk - nq))
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :].to(device)
    return allowed


def attention(q, k, v, *, causal=False, key_padding_mask=None, scale=None, bias=None, return_lse=False):
    """q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D) -> o (B, Hq, Nq, D) in q.dtype.

    GQA: query head h reads kv head h // (Hq // Hkv). bias: an additive term broadcastable to
    (B, Hq, Nq, Nk) (e.g. a relative position bias or an additive mask), added to the scaled scores
    before the causal / key-padding masks; its gradient is the gradient of the scores, summed over the
    broadcast dims. A query row with no visible key (masked, or a bias of -inf everywhere) outputs
    zeros (and log-sum-exp -inf). With return_lse also returns lse (B, Hq, Nq) in fp32/fp64: the
    natural-log log-sum-exp of the biased, scaled scores, which is what a flash-attention backward needs.
    """
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    ct = _compute_dtype(q)
    scale = D ** -0.5 if scale is None else scale
    group = Hq // Hkv
    kf = k.to(ct).repeat_interleave(group, dim=1)  # (B, Hq, Nk, D)
    vf = v.to(ct).repeat_interleave(group, dim=1)
    s = torch.matmul(q.to(ct), kf.transpose(-1, -2)) * scale  # (B, Hq, Nq, Nk)
    if bias is not None:
        s = s + bias.to(ct)
    allowed = attention_mask(Nq, Nk, causal=causal, key_padding_mask=key_padding_mask, device=q.device)
    s = s.masked_fill(~allowed, float("-inf"))
    # Softmax is shift invariant, so the (detached) row max only guards exp against overflow.
    # Rows with no allowed key get max 0 so that exp(-inf - 0) = 0 and the row stays all zeros.
    m = s.detach().amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    denom = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(denom > 0, denom, torch.ones_like(denom))
    o = torch.matmul(p, vf).to(q.dtype)
    if not return_lse:
        return o
    lse = (m + torch.log(denom)).squeeze(-1)  # -inf for rows with no allowed key
    return o, lse


def rms_norm(x, weight, eps=1e-6):
    """InternVideo2 RMSNorm over the last dim: statistics in fp32, normalised value cast back to
    x.dtype before the weight multiply (the official order of rounding). Output dtype = x.dtype."""
    ct = _compute_dtype(x)
    xf = x.to(ct)
    normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return weight.to(x.dtype) * normed.to(x.dtype)


def attn_pool(x, ln_q_w, ln_q_b, ln_k_w, ln_k_b, ln_v_w, ln_v_b, wq, bq, wk, bk, wv, bv, wo, bo,
              *, num_heads, eps=1e-5):
    """The InternVideo2 `clip_projector` (AttentionPoolingBlock): x (B, N, C) -> (B, out_dim).

    query = LN_q(mean_j x_j); keys = LN_k(x) W_k^T + b_k; values = LN_v(x) W_v^T + b_v;
    per head h: p = softmax(q_h k_h^T / sqrt(C / H)); out = concat_h(p v_h) W_o^T + b_o.
    """
    B, N, C = x.shape
    ct = _compute_dtype(x)
    xf = x.to(ct)
    f = lambda t: t.to(ct)  # noqa: E731  (parameters may be stored in a lower precision)
    head_dim = C // num_heads
    q_in = F.layer_norm(xf.mean(dim=1, keepdim=True), (C,), f(ln_q_w), f(ln_q_b), eps)  # (B, 1, C)
    k_in = F.layer_norm(xf, (C,), f(ln_k_w), f(ln_k_b), eps)                            # (B, N, C)
    v_in = F.layer_norm(xf, (C,), f(ln_v_w), f(ln_v_b), eps)
    q = F.linear(q_in, f(wq), f(bq)).view(B, 1, num_heads, head_dim).transpose(1, 2)  # (B, H, 1, d)
    k = F.linear(k_in, f(wk), f(bk)).view(B, N, num_heads, head_dim).transpose(1, 2)  # (B, H, N, d)
    v = F.linear(v_in, f(wv), f(bv)).view(B, N, num_heads, head_dim).transpose(1, 2)
    p = torch.softmax(torch.matmul(q * head_dim ** -0.5, k.transpose(-1, -2)), dim=-1)  # (B, H, 1, N)
    o = torch.matmul(p, v).transpose(1, 2).reshape(B, C)                                # (B, C)
    return F.linear(o, f(wo), f(bo)).to(x.dtype)


def masked_gather(x, visible_idx, pos_embed=None):
    """x (B, N, C) or (L, B, N, C), visible_idx (B, K) int64 -> (B, K, C) or (L, B, K, C):
    x[..., b, idx[b], :] (+ pos_embed[0, idx[b]]). The 4-D form gathers L stacked layers (e.g. a
    teacher's target features) with the same visible set."""
    C = x.shape[-1]
    idx = visible_idx.unsqueeze(-1).expand(-1, -1, C)  # (B, K, C)
    if x.dim() == 4:
        idx = idx.unsqueeze(0).expand(x.shape[0], -1, -1, -1)
    out = torch.gather(x, -2, idx)
    if pos_embed is not None:
        out = out + pos_embed[0][visible_idx].to(out.dtype)  # (B, K, C), broadcast over L
    return out
