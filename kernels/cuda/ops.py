"""The CUDA C++ backend's ops: argument checks, layouts, launches, custom-op registration, selftest.

Each op checks its arguments here (CUDA tensors, dtypes, head dim; layouts the kernels need are made with a
copy when a view does not have them), allocates the outputs, and passes pointers, strides and the current
stream to the module `_ivmini_cuda` (csrc/, built on first use by kernels/cuda/build.py). The O(B C^2) part
of attention pooling is shared with the Triton backend (kernels/attn_pool_math.py). Every op is a torch
custom op (kernels/custom_ops.py) with its autograd formula, so the backend is a drop-in for "ref" and
"triton" (torch.compile included). kernels/__init__.py imports this module when the backend is first asked
for; it needs torch and nvcc, never triton.

attention's bias: the public wrapper casts the caller's bias to fp32 on its own (small) shape, then views it
as (B, Hq, Nq, Nk) with expand: broadcast dims get stride 0, the kernels read it through those strides, and
autograd's expand-backward sums the kernel's full (B, Hq, Nq, Nk) fp32 dbias back to the caller's shape.

    selftest(): one small forward + backward of every op against kernels.ref in float64
                (python -m kernels.cuda selftest, which compute-sanitizer runs)
Tests: tests/test_<op>.py (GPU, backend "cuda"), tests/test_cuda_build.py and tests/test_cuda_emulated.py (CPU).
"""
from types import SimpleNamespace
from typing import Optional

import torch

from .. import BackendUnavailable, attn_pool_math, custom_ops, ref, register
from ..common import device_guard, empty
from .build import ext

MAX_HEAD_DIM = 128
GRID_LIMIT = 65535          # gridDim.y / gridDim.z: the kernels put heads and the batch there
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# argument checks and layouts

def _check(op, dtypes, **tensors):
    for name, t in tensors.items():
        if t is None:
            continue
        if not t.is_cuda:
            raise BackendUnavailable(f"cuda {op}: {name} is on {t.device}; the cuda backend needs CUDA tensors")
        if t.dtype not in dtypes:
            raise TypeError(f"cuda {op}: {name} has dtype {t.dtype}; supported: {[str(d) for d in dtypes]}")


def _ready(t):
    """t itself when its channel dim is contiguous, its start 16-byte aligned and its other strides whole
    16-byte vectors (what the kernels' vector loads assume); else a contiguous copy."""
    vec = max(1, 16 // t.element_size())
    if (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all(s % vec == 0 for s, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1)):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _stream(t):
    return torch.cuda.current_stream(t.device).cuda_stream


def _ptr(t):
    return None if t is None else t.data_ptr()


# ---------------------------------------------------------------------------------------------
# attention

def _heads_last(B, H, N, D, dtype, device):
    """(B, H, N, D) stored as (B, N, H, D), like the Triton backend: `o.transpose(1, 2).reshape(B, N, H*D)` is free."""
    return empty((B, N, H, D), dtype, device).transpose(1, 2)


def _attn_args(q, k, v, kpm, bias, causal, scale, o, lse):
    B, Hq, Nq, D = q.shape
    kpm8 = None if kpm is None else kpm.contiguous().view(torch.uint8)
    return dict(dtype=_DTYPE_CODE[q.dtype], B=B, Hq=Hq, Hkv=k.shape[1], Nq=Nq, Nk=k.shape[2], D=D,
                scale=float(scale), causal=bool(causal), q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(),
                q_stride=q.stride()[:3], k_stride=k.stride()[:3], v_stride=v.stride()[:3],
                kpm=_ptr(kpm8), kpm_stride=0 if kpm8 is None else kpm8.stride(0), o=o.data_ptr(),
                o_stride=o.stride()[:3], lse=lse.data_ptr(), bias=_ptr(bias),
                bias_stride=(0, 0, 0, 0) if bias is None else bias.stride()), kpm8


def _fp32_bias(bias):
    """The kernels read an fp32 bias. The public wrapper passes one already (converted on the caller's small
    tensor); a direct caller's fp16/bf16/fp64 view is converted here, exactly for 16-bit dtypes, as a full-size
    copy (an expanded view does not keep its zero strides through .float())."""
    return bias if bias is None or bias.dtype == torch.float32 else bias.float()


def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """o (B, Hq, Nq, D) in q.dtype (stored heads-last) and lse (B, Hq, Nq) fp32. bias: None or a
    (B, Hq, Nq, Nk) view with any strides (0 for broadcast dims), read in place when fp32."""
    bias = _fp32_bias(bias)
    q, k, v = _ready(q), _ready(k), _ready(v)
    B, Hq, Nq, D = q.shape
    o = _heads_last(B, Hq, Nq, D, q.dtype, q.device)
    lse = empty((B, Hq, Nq), torch.float32, q.device)
    args, _keep = _attn_args(q, k, v, key_padding_mask, bias, causal, scale, o, lse)
    with device_guard(q):
        ext().attention_fwd(**args, stream=_stream(q))
    return o, lse


def _attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                   lse: torch.Tensor, key_padding_mask: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   causal: bool, scale: float, bias_grad: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (stored heads-last) and dbias: (B, Hq, Nq, Nk) fp32 when bias_grad, else an empty (0,) tensor."""
    bias = _fp32_bias(bias)
    q, k, v, o, do = _ready(q), _ready(k), _ready(v), _ready(o), _ready(do.to(q.dtype))
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    dq = _heads_last(B, Hq, Nq, D, q.dtype, q.device)
    dk = _heads_last(B, Hkv, Nk, D, k.dtype, k.device)
    dv = _heads_last(B, Hkv, Nk, D, v.dtype, v.device)
    dbias = empty((B, Hq, Nq, Nk) if bias_grad else (0,), torch.float32, q.device)
    delta = empty((B, Hq, Nq), torch.float32, q.device)
    lse = lse.contiguous()
    args, _keep = _attn_args(q, k, v, key_padding_mask, bias, causal, scale, o, lse)
    args.update(dout=do.data_ptr(), dout_stride=do.stride()[:3], delta=delta.data_ptr(), dq=dq.data_ptr(),
                dk=dk.data_ptr(), dv=dv.data_ptr(), dq_stride=dq.stride()[:3], dk_stride=dk.stride()[:3],
                dv_stride=dv.stride()[:3], dbias=dbias.data_ptr() if bias_grad else None)
    with device_guard(q):
        ext().attention_bwd(**args, stream=_stream(q))
    return dq, dk, dv, dbias


attention_fwd, attention_bwd = custom_ops.define("attention", "cuda", _attention_fwd, _attention_bwd)


def expand_bias(bias, shape):
    """The caller's bias (broadcastable to shape = (B, Hq, Nq, Nk)) as the fp32 4-D view the custom op takes:
    cast first, on the caller's small tensor (a (1, H, N, N) bias is not copied B times), then size-1 dims
    prepended and expanded, so broadcast dims have stride 0 and autograd sums dbias back to the caller's
    shape and dtype."""
    b = bias.float()
    return b.reshape((1,) * (4 - b.dim()) + tuple(b.shape)).expand(shape)   # (B, Hq, Nq, Nk), a view


def attention(q, k, v, *, causal=False, key_padding_mask=None, scale=None, bias=None):
    """CUDA backend of kernels.attention (shapes already checked there): fp16/bf16, head dims 8..128 in steps of 8;
    bias of any float dtype (computed in fp32)."""
    _check("attention", (torch.float16, torch.bfloat16), q=q, k=k, v=v)
    _check("attention", (torch.bool,), key_padding_mask=key_padding_mask)
    _check("attention", (torch.float16, torch.bfloat16, torch.float32, torch.float64), bias=bias)
    B, Hq, Nq, D = q.shape
    if D % 8 or D > MAX_HEAD_DIM:
        raise ValueError(f"cuda attention supports head dims that are multiples of 8 up to {MAX_HEAD_DIM}, got {D}; "
                         f"use backend 'triton' (up to 256) or 'ref'")
    if B > GRID_LIMIT or Hq > GRID_LIMIT:
        raise ValueError(f"cuda attention: batch ({B}) and query heads ({Hq}) must be at most "
                         f"{GRID_LIMIT} (CUDA grid limit); split the batch")
    scale = D ** -0.5 if scale is None else float(scale)
    if q.numel() == 0 or k.shape[2] == 0:  # nothing to launch; the reference gives the (empty/zero) result
        return ref.attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale, bias=bias)
    bias4 = None if bias is None else expand_bias(bias, (B, Hq, Nq, k.shape[2]))
    return attention_fwd(q, k, v, key_padding_mask, bias4, bool(causal), scale)[0]


# ---------------------------------------------------------------------------------------------
# rms_norm

def _rows(t):
    """(rows, width) view (or copy) with a contiguous, aligned channel dim."""
    return _ready(t.reshape(-1, t.shape[-1]))


def _rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """y (x.shape, x.dtype) and rstd (rows,) fp32."""
    x2, w = _rows(x), weight.to(x.dtype).contiguous()   # the weight is rounded to x's dtype, as the reference does
    rows, width = x2.shape
    y = empty(x2.shape, x.dtype, x.device)
    rstd = empty((rows,), torch.float32, x.device)
    with device_guard(x):
        ext().rms_norm_fwd(dtype=_DTYPE_CODE[x.dtype], rows=rows, width=width, eps=float(eps), x=x2.data_ptr(),
                           w=w.data_ptr(), x_stride=x2.stride(0), y=y.data_ptr(), y_stride=width,
                           rstd=rstd.data_ptr(), stream=_stream(x))
    return y.view(x.shape), rstd


def _rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """dx (x.shape, x.dtype) and dweight (weight.shape, weight.dtype)."""
    x2, dy2, w = _rows(x), _rows(dy.to(x.dtype)), weight.to(x.dtype).contiguous()
    rows, width = x2.shape
    dx = empty(x2.shape, x.dtype, x.device)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    partials = max(1, min(rows, 4 * sms))           # blocks, each summing dw over a contiguous chunk of rows
    dw_partial = empty((partials, width), torch.float32, x.device)
    with device_guard(x):
        ext().rms_norm_bwd(dtype=_DTYPE_CODE[x.dtype], rows=rows, width=width, x=x2.data_ptr(), w=w.data_ptr(),
                           x_stride=x2.stride(0), rstd=rstd.data_ptr(), dy=dy2.data_ptr(), dy_stride=dy2.stride(0),
                           dx=dx.data_ptr(), dx_stride=width, dw_partial=dw_partial.data_ptr(),
                           num_partials=partials, stream=_stream(x))
    return dx.view(x.shape), dw_partial.sum(0).to(weight.dtype)


rms_norm_fwd, rms_norm_bwd = custom_ops.define("rms_norm", "cuda", _rms_norm_fwd, _rms_norm_bwd)


def rms_norm(x, weight, eps=1e-6):
    """CUDA backend of kernels.rms_norm (shapes already checked there)."""
    _check("rms_norm", _FLOATS, x=x, weight=weight)
    if x.numel() == 0:
        return ref.rms_norm(x, weight, eps)
    return rms_norm_fwd(x, weight, float(eps))[0]


# ---------------------------------------------------------------------------------------------
# masked_gather

def _as_layers(t):
    """(B, N, C) -> (1, B, N, C) view; (L, B, N, C) unchanged."""
    return t if t.dim() == 4 else t.unsqueeze(0)


def _masked_gather_fwd(x: torch.Tensor, visible_idx: torch.Tensor, pos_embed: Optional[torch.Tensor]) -> torch.Tensor:
    """out (..., B, K, C) in x.dtype, contiguous."""
    x4 = _ready(_as_layers(x))
    L, B, N, C = x4.shape
    K = visible_idx.shape[1]
    pos = None if pos_embed is None else _ready(pos_embed[0].to(x.dtype))   # rounded to x's dtype, as the reference
    out = empty((L, B, K, C), x.dtype, x.device)
    with device_guard(x):
        ext().masked_gather_fwd(dtype=_DTYPE_CODE[x.dtype], L=L, B=B, N=N, K=K, C=C, x=x4.data_ptr(),
                                x_stride=x4.stride()[:3], idx=visible_idx.data_ptr(), idx_stride=visible_idx.stride(),
                                pos=_ptr(pos), pos_stride=0 if pos is None else pos.stride(0), out=out.data_ptr(),
                                out_stride=out.stride()[:3], stream=_stream(x))
    return out if x.dim() == 4 else out[0]


def _masked_gather_bwd(dout: torch.Tensor, visible_idx: torch.Tensor, N: int, pos_dtype: Optional[torch.dtype]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """dx (..., B, N, C) in dout.dtype and dpos (1, N, C) in pos_dtype (an empty (0,) tensor when None)."""
    d4 = _ready(_as_layers(dout))
    L, B, K, C = d4.shape
    # inv[b, n] = slot of token n in sample b, or -1: the scatter becomes a gather (no atomics, no sync)
    slots = torch.arange(K, dtype=torch.int32, device=dout.device).expand(B, K)
    inv = torch.full((B, N), -1, dtype=torch.int32, device=dout.device).scatter_(1, visible_idx, slots)
    dx = empty((L, B, N, C), dout.dtype, dout.device)
    dpos = None if pos_dtype is None else empty((N, C), torch.float32, dout.device)
    with device_guard(dout):
        ext().masked_gather_bwd(dtype=_DTYPE_CODE[dout.dtype], L=L, B=B, N=N, K=K, C=C, dout=d4.data_ptr(),
                                dout_stride=d4.stride()[:3], inv=inv.data_ptr(), dx=dx.data_ptr(),
                                dx_stride=dx.stride()[:3], dpos=_ptr(dpos), stream=_stream(dout))
    dpos = dout.new_empty((0,)) if dpos is None else dpos.to(pos_dtype).unsqueeze(0)
    return (dx if dout.dim() == 4 else dx[0]), dpos


masked_gather_fwd, masked_gather_bwd = custom_ops.define(
    "masked_gather", "cuda", _masked_gather_fwd, _masked_gather_bwd)


def masked_gather(x, visible_idx, pos_embed=None):
    """CUDA backend of kernels.masked_gather (shapes already checked there)."""
    _check("masked_gather", _FLOATS, x=x, pos_embed=pos_embed)
    _check("masked_gather", (torch.int64,), visible_idx=visible_idx)
    if x.numel() == 0 or visible_idx.numel() == 0:
        return ref.masked_gather(x, visible_idx, pos_embed)
    return masked_gather_fwd(x, visible_idx, pos_embed)


# ---------------------------------------------------------------------------------------------
# attn_pool: the three token-streaming kernels; the rest is kernels/attn_pool_math.py

def _pool_args(x):
    B, N, C = x.shape
    return dict(dtype=_DTYPE_CODE[x.dtype], B=B, N=N, C=C, x=x.data_ptr(), x_stride=x.stride()[:2])


def _rowdot(x, m, eps):
    B, N, C = x.shape
    m = m.float().contiguous()
    s = empty((B, N, m.shape[1]), torch.float32, x.device)
    mu, rstd = empty((B, N), torch.float32, x.device), empty((B, N), torch.float32, x.device)
    with device_guard(x):
        ext().attn_pool_rowdot(**_pool_args(x), K=m.shape[1], eps=float(eps), m=m.data_ptr(), s=s.data_ptr(),
                               mu=mu.data_ptr(), rstd=rstd.data_ptr(), stream=_stream(x))
    return s, mu, rstd


def _colsum(x, p, mu, rstd):
    B, N, C = x.shape
    p = p.float().contiguous()
    z = empty((B, p.shape[2], C), torch.float32, x.device)
    with device_guard(x):
        ext().attn_pool_colsum(**_pool_args(x), K=p.shape[2], p=p.data_ptr(), mu=mu.data_ptr(),
                               rstd=rstd.data_ptr(), z=z.data_ptr(), stream=_stream(x))
    return z


def _dx(x, g, m, mu, rstd, c1, c2, r):
    # every tensor whose pointer is passed stays bound to a name until the launch is queued
    g, m, c1, c2, r = (t.float().contiguous() for t in (g, m, c1, c2, r))
    dx = empty(x.shape, x.dtype, x.device)
    with device_guard(x):
        ext().attn_pool_dx(**_pool_args(x), K=g.shape[2], g=g.data_ptr(), m=m.data_ptr(), mu=mu.data_ptr(),
                           rstd=rstd.data_ptr(), c1=c1.data_ptr(), c2=c2.data_ptr(), r=r.data_ptr(),
                           dx=dx.data_ptr(), stream=_stream(x))
    return dx


_POOL_OPS = SimpleNamespace(rowdot=_rowdot, colsum=_colsum, dx=_dx)


def _attn_pool_fwd(x: torch.Tensor, ln_q_w: torch.Tensor, ln_q_b: torch.Tensor, ln_k_w: torch.Tensor,
                   ln_k_b: torch.Tensor, ln_v_w: torch.Tensor, ln_v_b: torch.Tensor, wq: torch.Tensor,
                   bq: torch.Tensor, wk: torch.Tensor, bk: torch.Tensor, wv: torch.Tensor, bv: torch.Tensor,
                   wo: torch.Tensor, bo: torch.Tensor, num_heads: int, eps: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """out (B, out_dim) in x.dtype; for the backward xbar (B, C) and z (B, H, C), fp32."""
    return attn_pool_math.forward(_POOL_OPS, _ready(x), ln_q_w, ln_q_b, ln_k_w, ln_k_b, ln_v_w, ln_v_b, wq, bq, wk, bk,
                                  wv, bv, wo, bo, num_heads, eps)


def _attn_pool_bwd(dout: torch.Tensor, x: torch.Tensor, ln_q_w: torch.Tensor, ln_q_b: torch.Tensor,
                   ln_k_w: torch.Tensor, ln_k_b: torch.Tensor, ln_v_w: torch.Tensor, ln_v_b: torch.Tensor,
                   wq: torch.Tensor, bq: torch.Tensor, wk: torch.Tensor, bk: torch.Tensor, wv: torch.Tensor,
                   bv: torch.Tensor, wo: torch.Tensor, bo: torch.Tensor, xbar: torch.Tensor, z: torch.Tensor,
                   num_heads: int, eps: float) -> list[torch.Tensor]:
    """Gradients of the 15 inputs, in the order of attn_pool's arguments."""
    return attn_pool_math.backward(_POOL_OPS, dout, _ready(x), ln_q_w, ln_q_b, ln_k_w, ln_k_b, ln_v_w, ln_v_b, wq, bq,
                                   wk, bk, wv, bv, wo, bo, xbar, z, num_heads, eps)


attn_pool_fwd, attn_pool_bwd = custom_ops.define("attn_pool", "cuda", _attn_pool_fwd, _attn_pool_bwd)


def attn_pool(x, ln_q_w, ln_q_b, ln_k_w, ln_k_b, ln_v_w, ln_v_b, wq, bq, wk, bk, wv, bv, wo, bo,
              *, num_heads, eps=1e-5):
    """CUDA backend of kernels.attn_pool (shapes already checked there)."""
    params = dict(ln_q_w=ln_q_w, ln_q_b=ln_q_b, ln_k_w=ln_k_w, ln_k_b=ln_k_b, ln_v_w=ln_v_w, ln_v_b=ln_v_b,
                  wq=wq, bq=bq, wk=wk, bk=bk, wv=wv, bv=bv, wo=wo, bo=bo)
    _check("attn_pool", _FLOATS, x=x, **params)
    if x.shape[0] > GRID_LIMIT:
        raise ValueError(f"cuda attn_pool: batch {x.shape[0]} is above {GRID_LIMIT} (CUDA grid limit); split it")
    if x.numel() == 0:
        return ref.attn_pool(x, *params.values(), num_heads=num_heads, eps=eps)
    return attn_pool_fwd(x, *params.values(), int(num_heads), float(eps))[0]


for _op in ("attention", "rms_norm", "masked_gather", "attn_pool"):
    register(_op, "cuda", globals()[_op])


# ---------------------------------------------------------------------------------------------
# selftest

def selftest():
    """One small forward + backward of every op against kernels.ref in float64. Returns the failures."""
    import kernels
    torch.manual_seed(0)
    dev, failures = "cuda", []

    def compare(name, got, want, tol):
        err = (got.double() - want).abs().max().item() / max(1.0, want.abs().max().item())
        print(f"  {name:<28} max rel error {err:.2e} (tol {tol:g})")
        if not err <= tol:
            failures.append(name)

    def as64(a):   # the float64 twin of an input (a fresh leaf where the input is one)
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return a.detach().double().requires_grad_(a.requires_grad)
        return a

    def run(op, make, tol, name=None, **kw):
        args = make()
        grad_leaves = lambda ts: [t for t in ts if isinstance(t, torch.Tensor) and t.requires_grad]  # noqa: E731
        out = getattr(kernels, op)(*args, backend="cuda", **kw)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, grad_leaves([*args, *kw.values()]), dout)
        dargs, dkw = [as64(a) for a in args], {n: as64(a) for n, a in kw.items()}
        want = getattr(ref, op)(*dargs, **dkw)
        wgrads = torch.autograd.grad(want, grad_leaves([*dargs, *dkw.values()]), dout.double())
        name = name or op
        compare(f"{name} forward", out, want, tol)
        for i, (g, w) in enumerate(zip(grads, wgrads)):
            compare(f"{name} grad {i}", g, w, tol)

    h = torch.float16
    leaf = lambda *s, dt=h: torch.randn(*s, device=dev).to(dt).requires_grad_()  # noqa: E731
    for D in (64, 88, 128):
        run("attention", lambda: (leaf(2, 4, 77, D), leaf(2, 2, 67, D), leaf(2, 2, 67, D)), 5e-3, causal=True,
            key_padding_mask=torch.rand(2, 67, device=dev) > 0.2)
    # an fp32 bias shared by the batch, with -inf entries and a whole -inf row; a bf16 one broadcast over heads
    bias = torch.randn(1, 4, 77, 67, device=dev) * 2
    bias[..., ::5] = float("-inf")
    bias[:, :, 40] = float("-inf")
    run("attention", lambda: (leaf(2, 4, 77, 88), leaf(2, 2, 67, 88), leaf(2, 2, 67, 88)), 5e-3, name="attention+bias",
        causal=True, key_padding_mask=torch.rand(2, 67, device=dev) > 0.2, bias=bias.requires_grad_())
    run("attention", lambda: (leaf(2, 4, 70, 64, dt=torch.bfloat16), leaf(2, 4, 90, 64, dt=torch.bfloat16),
                              leaf(2, 4, 90, 64, dt=torch.bfloat16)), 2e-2, name="attention+bias bf16",
        bias=leaf(2, 1, 70, 90, dt=torch.bfloat16))
    run("rms_norm", lambda: (leaf(3, 37, 1408), leaf(1408)), 5e-3)
    run("masked_gather", lambda: (leaf(2, 50, 72), torch.sort(torch.randperm(50, device=dev)[:13])[0].expand(2, 13)
                                  .contiguous(), leaf(1, 50, 72)), 1e-3)
    C, H = 96, 4
    run("attn_pool", lambda: (leaf(2, 33, C), *(leaf(C, dt=torch.float32) for _ in range(6)),
                              *(t for _ in range(3) for t in (leaf(C, C, dt=torch.float32) * C ** -0.5,
                                                              leaf(C, dt=torch.float32))),
                              leaf(48, C, dt=torch.float32), leaf(48, dt=torch.float32)), 5e-3, num_heads=H)
    torch.cuda.synchronize()
    return failures
