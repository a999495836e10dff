"""The "torch" backend: the four ops in plain torch, written for speed on the CPU (the default there).

Same semantics as kernels/ref.py (the spec, tested against it in float64); gradients by autograd. Where the
reference is written to be read, this file picks torch's fused paths:

    attention      F.scaled_dot_product_attention. With no mask tensor (plain or square-causal calls) and with
                   a mask that needs no gradient, torch runs its fused CPU flash kernel: blocked online softmax,
                   no (B, H, Nq, Nk) score, mask, max or exp tensors, and GQA via enable_gqa (K/V are read per
                   group, not copied). Causal is bottom-right aligned as in the spec: for Nq == Nk that is SDPA's
                   is_causal (the kernel skips the blocks above the diagonal); otherwise one boolean mask is
                   built, combined with the key padding and the bias only when they are given.
                   A bias that requires grad goes to SDPA's math path (the fused CPU kernel has no mask
                   gradient), which materialises the scores as the reference does; a bias wider than q (fp32
                   next to fp16 q) makes q, k, v upcast rather than the bias rounded.
                   Rows that see no key: SDPA (torch 2.13, both paths) already returns zeros and zero, finite
                   gradients for them, as the spec asks; tests/test_attention.py (fully masked rows, -inf bias
                   rows) checks that this stays so. enable_gqa needs torch >= 2.5.
    rms_norm       one reduction (vector_norm) and one multiply on the fp32 upcast (a no-op for fp32), then
                   the official rounding order weight * normed.to(x.dtype); the weight multiply runs in place
                   when no gradient is needed.
    attn_pool      the no-K/V fold of kernels/triton/attn_pool.py (see its header): scores S = LN(x) A^T and
                   the pooled Z = P^T LN(x), so the N tokens meet only H-wide products, never the C x C
                   K and V projections: at N = 2049, C = 768, H = 16 ~0.1 GFLOP instead of ~5, and besides x
                   one (B, N, C) tensor (LN(x)) saved for the backward instead of four.
    masked_gather  advanced indexing x[..., batch, visible_idx, :] copies whole rows (index_put with
                   accumulation in the backward); no index is read back to the host.

Napkin math, attention at the B-size ViT shape (B=1, H=12, N=2049, d=64, fp32): 4 N^2 d H = 13 GFLOP; the
reference also writes and reads five tensors of H N^2 * 4 B = 200 MB (scores, masked scores, shifted scores,
exp, normalised P; plus K/V copies for GQA), ~2 GB of traffic, while the fused kernel keeps its blocks in
cache. Measured on a 2-core CPU: 13x faster forward, 4x forward+backward (python -m kernels.bench --cpu).

Test: pytest tests/test_attention.py tests/test_rms_norm.py tests/test_attn_pool.py tests/test_masked_gather.py
Benchmark: python -m kernels.bench --cpu (op level, torch vs ref);  python -m ivmini.bench (encoder forward, CPU)
"""
import torch
import torch.nn.functional as F

from . import ref, register


def attention(q, k, v, *, causal=False, key_padding_mask=None, scale=None, bias=None):
    """Spec: kernels/ref.py::attention. q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D) -> (B, Hq, Nq, D) in q.dtype."""
    Nq, Nk, out_dtype = q.shape[2], k.shape[2], q.dtype
    is_causal = causal and Nq == Nk and key_padding_mask is None and bias is None
    mask = None                                  # bool, True = may attend, broadcastable to (B, Hq, Nq, Nk)
    if causal and not is_causal:
        mask = ref.attention_mask(Nq, Nk, causal=True, device=q.device)               # (1, 1, Nq, Nk)
    if key_padding_mask is not None:
        keep = key_padding_mask[:, None, None, :]                                      # (B, 1, 1, Nk)
        mask = keep if mask is None else mask & keep
    if bias is not None:
        # the bias is added to the scaled scores; masked places become -inf (their gradient is zero)
        ct = torch.promote_types(q.dtype, bias.dtype)  # never round a wider bias down to q's dtype
        q, k, v = q.to(ct), k.to(ct), v.to(ct)
        mask = bias.to(ct) if mask is None else bias.to(ct).masked_fill(~mask, float("-inf"))
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                       enable_gqa=q.shape[1] != k.shape[1])
    return o.to(out_dtype)


def rms_norm(x, weight, eps=1e-6):
    """Spec: kernels/ref.py::rms_norm. Statistics in fp32 (fp64 for fp64 x), the normalised value rounded to
    x.dtype, then the weight multiply in x.dtype (the official order of rounding)."""
    xf = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    # one reduction pass (F.rms_norm on the CPU is pow, mean, add, rsqrt, mul, mul: three more (N, C) passes)
    ms = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square() / x.shape[-1]  # (..., 1) mean of x^2
    normed = (xf * torch.rsqrt(ms + eps)).to(x.dtype)                                # a fresh tensor
    w = weight.to(x.dtype)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return normed * w
    return normed.mul_(w)  # no autograd: in place, one (N, C) allocation fewer (fresh pages of a large new
    #                        tensor are faulted in and zeroed, which on the CPU can cost more than the multiply)


def attn_pool(x, ln_q_w, ln_q_b, ln_k_w, ln_k_b, ln_v_w, ln_v_b, wq, bq, wk, bk, wv, bv, wo, bo,
              *, num_heads, eps=1e-5):
    """Spec: kernels/ref.py::attn_pool. x (B, N, C) -> (B, out_dim) in x.dtype; fp32 math (fp64 for fp64 x).

    With one query per head (q_h, d = C / H wide), the score of token j is
        q_h . k_jh / sqrt(d) = xhat_j . a_h + c_h,   a_h = gamma_k * (Wk_h^T q_h) / sqrt(d)
    where xhat_j is LN(x_j) without its affine and c_h = (beta_k . Wk_h^T q_h + bk_h . q_h) / sqrt(d) is the
    same for every token. The values only enter through sum_j p_jh v_jh = Wv_h (gamma_v * z_h + beta_v) + bv_h
    with z_h = sum_j p_jh xhat_j (the p_jh sum to 1).
    c_h cancels in the softmax; it is added anyway, as the reference does, so that beta_k and bk stay in the
    autograd graph (their gradient is zero up to rounding, as in the reference) and cost nothing (B x H).
    """
    B, N, C = x.shape
    H, d = num_heads, C // num_heads
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    f = lambda t: t.to(ct)  # noqa: E731  (parameters may be stored in a lower precision)
    xf = x.to(ct)
    q = F.linear(F.layer_norm(xf.mean(dim=1), (C,), f(ln_q_w), f(ln_q_b), eps), f(wq), f(bq))  # (B, C)
    qh = q.view(B, H, d)
    u = torch.einsum("bhd,hdc->bhc", qh, f(wk).view(H, d, C))                 # (B, H, C) = Wk_h^T q_h
    a = u * (f(ln_k_w) * d ** -0.5)                                           # (B, H, C)
    c = (u @ f(ln_k_b) + (qh * f(bk).view(H, d)).sum(-1)) * d ** -0.5         # (B, H)
    xhat = F.layer_norm(xf, (C,), eps=eps)                                    # (B, N, C), shared by LN_k and LN_v
    s = torch.baddbmm(c.unsqueeze(1), xhat, a.transpose(1, 2))                # (B, N, H) scores
    p = torch.softmax(s, dim=1)                                               # over the tokens
    z = torch.bmm(p.transpose(1, 2), xhat)                                    # (B, H, C) pooled xhat per head
    w = z * f(ln_v_w) + f(ln_v_b)                                             # pooled LN_v(x) per head
    o = torch.einsum("bhc,hdc->bhd", w, f(wv).view(H, d, C)).reshape(B, C) + f(bv)  # (B, C)
    return F.linear(o, f(wo), f(bo)).to(x.dtype)


def masked_gather(x, visible_idx, pos_embed=None):
    """Spec: kernels/ref.py::masked_gather. x (B, N, C) or (L, B, N, C), visible_idx (B, K) -> (B, K, C) or
    (L, B, K, C). Advanced indexing copies whole rows (index_put with accumulation in the backward) and
    never reads an index back to the host."""
    batch = torch.arange(visible_idx.shape[0], device=visible_idx.device)[:, None]  # (B, 1), broadcast over K
    out = x[..., batch, visible_idx, :]                                              # (..., B, K, C)
    if pos_embed is not None:
        out = out + pos_embed[0, visible_idx].to(out.dtype)                          # (B, K, C), broadcast over L
    return out


for _op in ("attention", "rms_norm", "attn_pool", "masked_gather"):
    register(_op, "torch", globals()[_op])
