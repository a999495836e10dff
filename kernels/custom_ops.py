"""The torch custom-op wrapping shared by the Triton and CUDA backends.

A backend writes two plain, type-annotated functions per op that launch its kernels, `fwd` and `bwd`;
`define(op, backend, fwd, bwd)` turns them into the custom ops `ivmini::<backend>_<op>_fwd/_bwd` (so
torch.compile can trace models that use them), gives each its fake (shape-only) version and links the
backward to the forward with autograd. What the forward saves and how the backward is called is the same
for every backend, so it lives here once:

    attention      fwd(q, k, v, key_padding_mask, bias, causal, scale) -> (o, lse)
                   bwd(do, q, k, v, o, lse, key_padding_mask, bias, causal, scale, bias_grad) -> (dq, dk, dv, dbias)
                   o, dq, dk, dv are stored heads-last, (B, N, H, D) memory as a (B, H, N, D) view;
                   bias is None or a (B, Hq, Nq, Nk) view of the caller's bias (broadcast dims have stride 0:
                   the backend expands it, so autograd sums dbias back to the caller's shape); dbias is
                   (B, Hq, Nq, Nk) fp32 when bias_grad, else an empty (0,) tensor
    rms_norm       fwd(x, weight, eps) -> (y, rstd);  bwd(dy, x, weight, rstd) -> (dx, dweight)
    masked_gather  fwd(x, visible_idx, pos_embed) -> out
                   bwd(dout, visible_idx, N, pos_dtype) -> (dx, dpos)   dpos (1, N, C), or (0,) if pos_dtype is None
    attn_pool      fwd(x, <14 parameters>, num_heads, eps) -> (out, xbar, z)
                   bwd(dout, x, <14 parameters>, xbar, z, num_heads, eps) -> [15 gradients]
"""
import torch


# ---- attention

def _attention_fake(q, k, v, key_padding_mask, bias, causal, scale):
    B, Hq, Nq, D = q.shape
    return q.new_empty((B, Nq, Hq, D)).transpose(1, 2), q.new_empty((B, Hq, Nq), dtype=torch.float32)


def _attention_bwd_fake(do, q, k, v, o, lse, key_padding_mask, bias, causal, scale, bias_grad):
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    dbias = q.new_empty((B, Hq, Nq, Nk), dtype=torch.float32) if bias_grad else q.new_empty((0,), dtype=torch.float32)
    return (q.new_empty((B, Nq, Hq, D)).transpose(1, 2), k.new_empty((B, Nk, Hkv, D)).transpose(1, 2),
            v.new_empty((B, Nk, Hkv, D)).transpose(1, 2), dbias)


def _attention_setup(ctx, inputs, output):
    q, k, v, kpm, bias, causal, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], kpm, bias)
    ctx.causal, ctx.scale = causal, scale


def _attention_backward(bwd):
    def backward(ctx, do, _dlse):
        q, k, v, o, lse, kpm, bias = ctx.saved_tensors
        bias_grad = bias is not None and ctx.needs_input_grad[4]
        dq, dk, dv, dbias = bwd(do, q, k, v, o, lse, kpm, bias, ctx.causal, ctx.scale, bias_grad)
        return dq, dk, dv, None, (dbias.to(bias.dtype) if bias_grad else None), None, None
    return backward


# ---- rms_norm

def _rms_norm_fake(x, weight, eps):
    return x.new_empty(x.shape), x.new_empty((x.numel() // x.shape[-1],), dtype=torch.float32)


def _rms_norm_bwd_fake(dy, x, weight, rstd):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _rms_norm_backward(bwd):
    def backward(ctx, dy, _drstd):
        x, weight, rstd = ctx.saved_tensors
        return (*bwd(dy, x, weight, rstd), None)
    return backward


# ---- masked_gather

def _gather_fake(x, visible_idx, pos_embed):
    return x.new_empty(x.shape[:-2] + (visible_idx.shape[1], x.shape[-1]))


def _gather_bwd_fake(dout, visible_idx, N, pos_dtype):
    dx = dout.new_empty(dout.shape[:-2] + (N, dout.shape[-1]))
    dpos = dout.new_empty((1, N, dout.shape[-1]), dtype=pos_dtype) if pos_dtype is not None else dout.new_empty((0,))
    return dx, dpos


def _gather_setup(ctx, inputs, output):
    x, visible_idx, pos_embed = inputs
    ctx.save_for_backward(visible_idx)
    ctx.N, ctx.pos_dtype = x.shape[-2], (None if pos_embed is None else pos_embed.dtype)


def _gather_backward(bwd):
    def backward(ctx, dout):
        (visible_idx,) = ctx.saved_tensors
        want_dpos = ctx.pos_dtype is not None and ctx.needs_input_grad[2]
        dx, dpos = bwd(dout, visible_idx, ctx.N, ctx.pos_dtype if want_dpos else None)
        return dx, None, (dpos if want_dpos else None)
    return backward


# ---- attn_pool

def _pool_fake(x, ln_q_w, ln_q_b, ln_k_w, ln_k_b, ln_v_w, ln_v_b, wq, bq, wk, bk, wv, bv, wo, bo, num_heads, eps):
    B, N, C = x.shape
    return (x.new_empty((B, wo.shape[0])), x.new_empty((B, C), dtype=torch.float32),
            x.new_empty((B, num_heads, C), dtype=torch.float32))


def _pool_bwd_fake(dout, x, ln_q_w, ln_q_b, ln_k_w, ln_k_b, ln_v_w, ln_v_b, wq, bq, wk, bk, wv, bv, wo, bo, xbar, z,
                   num_heads, eps):
    return [t.new_empty(t.shape) for t in (x, ln_q_w, ln_q_b, ln_k_w, ln_k_b, ln_v_w, ln_v_b, wq, bq, wk, bk,
                                           wv, bv, wo, bo)]


def _pool_setup(ctx, inputs, output):
    *tensors, num_heads, eps = inputs
    ctx.save_for_backward(*tensors, output[1], output[2])
    ctx.num_heads, ctx.eps = num_heads, eps


def _pool_backward(bwd):
    def backward(ctx, dout, _dxbar, _dz):
        return (*bwd(dout, *ctx.saved_tensors, ctx.num_heads, ctx.eps), None, None)
    return backward


# op -> (fake forward, fake backward, autograd setup_context, backward maker)
_SPECS = {
    "attention": (_attention_fake, _attention_bwd_fake, _attention_setup, _attention_backward),
    "rms_norm": (_rms_norm_fake, _rms_norm_bwd_fake, _rms_norm_setup, _rms_norm_backward),
    "masked_gather": (_gather_fake, _gather_bwd_fake, _gather_setup, _gather_backward),
    "attn_pool": (_pool_fake, _pool_bwd_fake, _pool_setup, _pool_backward),
}


def define(op, backend, fwd, bwd):
    """-> (fwd_op, bwd_op): `fwd` and `bwd` as custom ops, fwd_op differentiable through bwd_op."""
    fwd_fake, bwd_fake, setup, make_backward = _SPECS[op]
    fwd_op = torch.library.custom_op(f"ivmini::{backend}_{op}_fwd", fwd, mutates_args=())
    bwd_op = torch.library.custom_op(f"ivmini::{backend}_{op}_bwd", bwd, mutates_args=())
    fwd_op.register_fake(fwd_fake)
    bwd_op.register_fake(bwd_fake)
    fwd_op.register_autograd(make_backward(bwd_op), setup_context=setup)
    return fwd_op, bwd_op
