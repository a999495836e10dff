"""The torch side of the no-K/V attention pooling, shared by the Triton (kernels/triton/attn_pool.py) and CUDA
(kernels/cuda/ops.py) backends: everything of size O(B C^2) plus the softmax over tokens, in fp32.
The algebra is explained in kernels/triton/attn_pool.py's header. The three token-streaming steps come from
`ops`, an object with the backend's launchers:
    ops.rowdot(x, m, eps)                     -> s = xhat m^T (B, N, K), mu, rstd (B, N)      fp32
    ops.colsum(x, p, mu, rstd)                -> p^T xhat (B, K, C)                           fp32
    ops.dx(x, g, m, mu, rstd, c1, c2, r)      -> rstd (g m - c1 - xhat c2) + r (B, N, C)      x.dtype
"""
import torch
import torch.nn.functional as F


def query_path(xbar, ln_q_w, ln_q_b, wq, bq, wk, ln_k_w, num_heads, eps):
    """The tiny query side, fp32: xbar (B, C) -> normalised xbar, rstd, LN_q output, q (B, C), u, a (B, H, C)."""
    B, C = xbar.shape
    d = C // num_heads
    mu_q = xbar.mean(-1, keepdim=True)
    rstd_q = torch.rsqrt(xbar.var(-1, unbiased=False, keepdim=True) + eps)       # (B, 1)
    xhat_q = (xbar - mu_q) * rstd_q
    qin = xhat_q * ln_q_w.float() + ln_q_b.float()
    q = F.linear(qin, wq.float(), bq.float())                                    # (B, C)
    u = torch.einsum("bhd,hdc->bhc", q.view(B, num_heads, d), wk.float().view(num_heads, d, C))  # (B, H, C)
    a = u * (ln_k_w.float() * d ** -0.5)
    return xhat_q, rstd_q, qin, q, u, a


def forward(ops, x, ln_q_w, ln_q_b, ln_k_w, ln_k_b, ln_v_w, ln_v_b, wq, bq, wk, bk, wv, bv, wo, bo, num_heads, eps):
    """out (B, out_dim) in x.dtype; for the backward xbar (B, C) and z (B, H, C), fp32."""
    B, N, C = x.shape
    H, d = num_heads, C // num_heads
    xbar = x.mean(1, dtype=torch.float32)                                        # (B, C)
    a = query_path(xbar, ln_q_w, ln_q_b, wq, bq, wk, ln_k_w, H, eps)[-1]         # (B, H, C)
    s, mu, rstd = ops.rowdot(x, a, eps)                                          # (B, N, H), (B, N) x2
    p = torch.softmax(s, dim=1)                                                  # over tokens
    z = ops.colsum(x, p, mu, rstd)                                               # (B, H, C)
    w = z * ln_v_w.float() + ln_v_b.float()                                      # pooled LN_v(x), per head
    o = torch.einsum("bhc,hdc->bhd", w, wv.float().view(H, d, C)).reshape(B, C) + bv.float()  # (B, C)
    out = F.linear(o, wo.float(), bo.float())
    return out.to(x.dtype), xbar, z


def backward(ops, dout, x, ln_q_w, ln_q_b, ln_k_w, ln_k_b, ln_v_w, ln_v_b, wq, bq, wk, bk, wv, bv, wo, bo,
             xbar, z, num_heads, eps):
    """Gradients of the 15 inputs, in the order of attn_pool's arguments, each in its input's dtype."""
    B, N, C = x.shape
    H, d = num_heads, C // num_heads
    dout = dout.float()                                                          # (B, out)
    xhat_q, rstd_q, qin, q, u, a = query_path(xbar, ln_q_w, ln_q_b, wq, bq, wk, ln_k_w, H, eps)
    # value and output side: o = Wv_h w_h + bv_h, w_h = gamma_v z_h + beta_v
    w = z * ln_v_w.float() + ln_v_b.float()                                      # (B, H, C)
    o = torch.einsum("bhc,hdc->bhd", w, wv.float().view(H, d, C)).reshape(B, C) + bv.float()
    dwo, dbo = dout.t() @ o, dout.sum(0)                                         # (out, C), (out,)
    do = (dout @ wo.float()).view(B, H, d)                                       # (B, H, d)
    dwv = torch.einsum("bhd,bhc->hdc", do, w).reshape(C, C)
    dbv = do.sum(0).reshape(C)
    dw = torch.einsum("bhd,hdc->bhc", do, wv.float().view(H, d, C))              # (B, H, C)
    dln_v_w, dln_v_b = (dw * z).sum((0, 1)), dw.sum((0, 1))
    dz = dw * ln_v_w.float()                                                     # (B, H, C)
    # token side: one pass gives dP = xhat dZ^T and S = xhat A^T (so P is recomputed, not saved)
    m = torch.cat([dz, a], dim=1)                                                # (B, 2H, C)
    sd, mu, rstd = ops.rowdot(x, m, eps)                                         # (B, N, 2H)
    dp, s = sd[..., :H], sd[..., H:]                                             # (B, N, H) each
    p = torch.softmax(s, dim=1)
    ds = p * (dp - (p * dp).sum(1, keepdim=True))                                # softmax backward over tokens
    da = ops.colsum(x, ds, mu, rstd)                                             # (B, H, C) = dS^T xhat
    # query side, by hand: a = gamma_k u / sqrt(d), u_h = Wk_h^T q_h, q = LN_q(xbar) Wq^T + bq
    dln_k_w = (da * u).sum((0, 1)) * d ** -0.5
    du = da * (ln_k_w.float() * d ** -0.5)                                       # (B, H, C)
    dwk = torch.einsum("bhd,bhc->hdc", q.view(B, H, d), du).reshape(C, C)
    dq = torch.einsum("hdc,bhc->bhd", wk.float().view(H, d, C), du).reshape(B, C)
    dwq, dbq = dq.t() @ qin, dq.sum(0)
    dqin = dq @ wq.float()                                                       # (B, C)
    dln_q_w, dln_q_b = (dqin * xhat_q).sum(0), dqin.sum(0)
    dxhat_q = dqin * ln_q_w.float()
    dxbar = rstd_q * (dxhat_q - dxhat_q.mean(-1, keepdim=True)
                      - xhat_q * (dxhat_q * xhat_q).mean(-1, keepdim=True))      # (B, C)
    # dx: dxhat_j = P_j dZ + dS_j A = G_j M, then the LayerNorm backward (row means from tiny tensors)
    g = torch.cat([p, ds], dim=2)                                                # (B, N, 2H)
    c1 = (g @ m.sum(-1).unsqueeze(-1)).squeeze(-1) / C                           # (B, N) mean_c(dxhat)
    c2 = (g * sd).sum(-1) / C                                                    # (B, N) mean_c(dxhat * xhat)
    r = (dxbar / N).contiguous()                                                 # (B, C) from the mean query
    dx = ops.dx(x, g, m, mu, rstd, c1.contiguous(), c2.contiguous(), r)          # (B, N, C) in x.dtype
    grads = [dx, dln_q_w, dln_q_b, dln_k_w, torch.zeros_like(ln_k_b), dln_v_w, dln_v_b, dwq, dbq, dwk,
             torch.zeros_like(bk), dwv, dbv, dwo, dbo]
    inputs = [x, ln_q_w, ln_q_b, ln_k_w, ln_k_b, ln_v_w, ln_v_b, wq, bq, wk, bk, wv, bv, wo, bo]
    return [gr.to(t.dtype) for gr, t in zip(grads, inputs)]
