"""ivmini kernels: the four public ops and the one place that picks a backend.

    attention(q, k, v, *, causal=False, key_padding_mask=None, scale=None, bias=None, backend=None)
    rms_norm(x, weight, eps=1e-6, *, backend=None)
    attn_pool(x, ln_q_w, ln_q_b, ln_k_w, ln_k_b, ln_v_w, ln_v_b, wq, bq, wk, bk, wv, bv, wo, bo,
              *, num_heads, eps=1e-5, backend=None)
    masked_gather(x, visible_idx, pos_embed=None, *, backend=None)
    masked_visible_idx(mask, num_visible=None)      (helper: official boolean mask -> visible_idx)

Semantics are defined once, by kernels/ref.py. Backends: "ref" (that file: the readable spec, any device),
"torch" (kernels/torch_ops.py: torch's fused paths, any device; the CPU default), "triton"
(kernels/triton/<op>.py; the CUDA default), "cuda" (csrc/<op>.cu via kernels/cuda/). Choice, first match
wins: the `backend=` argument, the IVMINI_BACKEND environment variable, else "triton" for CUDA tensors and
"torch" otherwise. The choice is logged once per backend. A backend that cannot run the call (not built, wrong
device, op not implemented there) is an error: there is no silent fallback that changes numerics.

Note on the name: PyPI also has an unrelated project called `kernels`. ivmini's `kernels` package is
installed by `pip install -e .` from this repository; do not install both into one environment
(`python -c "import kernels; print(kernels.__file__)"` shows which one you get).
"""
import importlib
import logging
import os

import torch

from . import ref

__all__ = ["attention", "rms_norm", "attn_pool", "masked_gather", "masked_visible_idx",
           "BACKENDS", "BackendUnavailable", "register", "resolve_backend"]

BACKENDS = ("ref", "torch", "triton", "cuda")
log = logging.getLogger("ivmini.kernels")


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run this call (not installed, wrong device, not implemented)."""


# op name -> backend name -> callable with the public signature (minus `backend`)
_IMPLS = {op: {"ref": getattr(ref, op)} for op in ("attention", "rms_norm", "attn_pool", "masked_gather")}
# modules that register a backend's ops when imported (imported lazily, so that `import kernels`
# never needs triton, nvcc or a GPU)
_BACKEND_MODULES = {"torch": ("torch_ops",),
                    "triton": ("triton.attention", "triton.rms_norm", "triton.masked_gather", "triton.attn_pool"),
                    "cuda": ("cuda.ops",)}
_LOADED = set()
_LOGGED = set()


def register(op, backend, fn):
    """Called by the backend modules on import: `fn` implements `op` with the public signature."""
    _IMPLS[op][backend] = fn


def _check_runnable(name, why, device):
    if name == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as e:
            raise BackendUnavailable(f"kernels backend 'triton' (from {why}) needs the triton package: {e}") from e
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise BackendUnavailable(
                f"kernels backend 'triton' (from {why}) runs on CUDA tensors, or on CPU tensors only under the "
                f"Triton interpreter (TRITON_INTERPRET=1 set before kernels are imported); got {device} tensors")
    elif name == "cuda" and device.type != "cuda":
        raise BackendUnavailable(f"kernels backend 'cuda' (from {why}) needs CUDA tensors, got {device} tensors")
    for module in _BACKEND_MODULES[name]:
        if module not in _LOADED:  # import once: a module import inside a torch.compile trace breaks the graph
            importlib.import_module(f"{__name__}.{module}")
            _LOADED.add(module)


def resolve_backend(op, backend, device):
    """Return the implementation of `op` for `backend` (or the default) on `device`."""
    if backend is not None:
        name, why = backend, "argument"
    elif os.environ.get("IVMINI_BACKEND"):
        name, why = os.environ["IVMINI_BACKEND"], "IVMINI_BACKEND"
    else:
        name, why = ("triton" if device.type == "cuda" else "torch"), f"default for {device.type} tensors"
    if name not in BACKENDS:
        raise ValueError(f"unknown kernels backend {name!r} (from {why}); choose one of {BACKENDS}")
    if name != "ref":
        _check_runnable(name, why, device)
    fn = _IMPLS[op].get(name)
    if fn is None:
        raise BackendUnavailable(f"kernels.{op} has no {name!r} implementation (backend from {why}); "
                                 f"implemented: {sorted(_IMPLS[op])}. Pass backend='ref' or set IVMINI_BACKEND=ref.")
    if (name, why) not in _LOGGED and not torch.compiler.is_compiling():
        _LOGGED.add((name, why))
        log.info("kernels: backend %r (%s)", name, why)
    return fn


# ---------------------------------------------------------------------------------------------
# argument checks shared by every backend: a bad call fails here with a message naming the problem

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensor(name, t, ndim=None, dtypes=_FLOATS):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; expected one of {[str(d) for d in dtypes]}")


def _check_device(device, **tensors):
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but the first input is on {device}")


def attention(q, k, v, *, causal=False, key_padding_mask=None, scale=None, bias=None, backend=None):
    """Scaled dot-product attention. q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D), Hq % Hkv == 0 (GQA:
    query head h uses kv head h // (Hq // Hkv)); key_padding_mask (B, Nk) bool, True = keep;
    causal is bottom-right aligned; bias: float, broadcastable to (B, Hq, Nq, Nk), added to the scaled
    scores (differentiable). Returns (B, Hq, Nq, D) in q.dtype. Rows with no key are zero."""
    for n, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(n, t, ndim=4)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, Hq, Nq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k/v {tuple(k.shape)} do not match q {tuple(q.shape)} in batch or head dim")
    if k.shape[1] == 0 or Hq % k.shape[1] != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({k.shape[1]})")
    if key_padding_mask is not None:
        _check_tensor("key_padding_mask", key_padding_mask, ndim=2, dtypes=(torch.bool,))
        if tuple(key_padding_mask.shape) != (B, k.shape[2]):
            raise ValueError(f"key_padding_mask must be (B, Nk) = {(B, k.shape[2])}, "
                             f"got {tuple(key_padding_mask.shape)}")
    if bias is not None:
        _check_tensor("bias", bias)
        full = (B, Hq, Nq, k.shape[2])
        if bias.dim() > 4 or any(b not in (1, f) for b, f in zip(bias.shape[::-1], full[::-1])):
            raise ValueError(f"bias of shape {tuple(bias.shape)} does not broadcast to (B, Hq, Nq, Nk) = {full}")
    _check_device(q.device, k=k, v=v, key_padding_mask=key_padding_mask, bias=bias)
    fn = resolve_backend("attention", backend, q.device)
    return fn(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale, bias=bias)


def rms_norm(x, weight, eps=1e-6, *, backend=None):
    """InternVideo2 RMSNorm over the last dim: weight * (x.float() * rsqrt(mean(x^2)+eps)).to(x.dtype)."""
    _check_tensor("x", x)
    _check_tensor("weight", weight, ndim=1)
    if x.dim() == 0 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} must match the last dim of x {tuple(x.shape)}")
    _check_device(x.device, weight=weight)
    fn = resolve_backend("rms_norm", backend, x.device)
    return fn(x, weight, eps)


def attn_pool(x, ln_q_w, ln_q_b, ln_k_w, ln_k_b, ln_v_w, ln_v_b, wq, bq, wk, bk, wv, bv, wo, bo,
              *, num_heads, eps=1e-5, backend=None):
    """InternVideo2 attention pooling (`clip_projector`): x (B, N, C) -> (B, out_dim)."""
    _check_tensor("x", x, ndim=3)
    B, N, C = x.shape
    if N == 0:
        raise ValueError("attn_pool needs at least one token, got x of shape (B, 0, C)")
    if num_heads <= 0 or C % num_heads != 0:
        raise ValueError(f"num_heads={num_heads} must divide the width C={C}")
    vecs = dict(ln_q_w=ln_q_w, ln_q_b=ln_q_b, ln_k_w=ln_k_w, ln_k_b=ln_k_b, ln_v_w=ln_v_w, ln_v_b=ln_v_b,
                bq=bq, bk=bk, bv=bv)
    for n, t in vecs.items():
        _check_tensor(n, t, ndim=1)
        if t.shape[0] != C:
            raise ValueError(f"{n} must have shape ({C},), got {tuple(t.shape)}")
    for n, t in (("wq", wq), ("wk", wk), ("wv", wv)):
        _check_tensor(n, t, ndim=2)
        if tuple(t.shape) != (C, C):
            raise ValueError(f"{n} must have shape ({C}, {C}), got {tuple(t.shape)}")
    _check_tensor("wo", wo, ndim=2)
    _check_tensor("bo", bo, ndim=1)
    if wo.shape[1] != C or bo.shape[0] != wo.shape[0]:
        raise ValueError(f"wo {tuple(wo.shape)} must be (out_dim, {C}) and bo {tuple(bo.shape)} (out_dim,)")
    _check_device(x.device, wq=wq, wk=wk, wv=wv, wo=wo, bo=bo, **vecs)
    fn = resolve_backend("attn_pool", backend, x.device)
    return fn(x, ln_q_w, ln_q_b, ln_k_w, ln_k_b, ln_v_w, ln_v_b, wq, bq, wk, bk, wv, bv, wo, bo,
              num_heads=num_heads, eps=eps)


def masked_gather(x, visible_idx, pos_embed=None, *, backend=None):
    """x (B, N, C), visible_idx (B, K) int64 sorted ascending, pos_embed (1, N, C) or None
    -> (B, K, C) = x[b, visible_idx[b]] (+ pos_embed[0, visible_idx[b]]).
    x may also be (L, B, N, C): L stacked layers gathered with the same indices -> (L, B, K, C)."""
    _check_tensor("x", x)
    if x.dim() not in (3, 4):
        raise ValueError(f"x must be (B, N, C) or (L, B, N, C), got shape {tuple(x.shape)}")
    _check_tensor("visible_idx", visible_idx, ndim=2, dtypes=(torch.int64,))
    if visible_idx.shape[0] != x.shape[-3]:
        raise ValueError(f"visible_idx {tuple(visible_idx.shape)} and x {tuple(x.shape)} differ in batch size")
    if pos_embed is not None:
        _check_tensor("pos_embed", pos_embed, ndim=3)
        if tuple(pos_embed.shape) != (1,) + tuple(x.shape[-2:]):
            raise ValueError(f"pos_embed must be (1, N, C) = {(1,) + tuple(x.shape[-2:])}, "
                             f"got {tuple(pos_embed.shape)}")
    _check_device(x.device, visible_idx=visible_idx, pos_embed=pos_embed)
    fn = resolve_backend("masked_gather", backend, x.device)
    return fn(x, visible_idx, pos_embed)


def masked_visible_idx(mask, num_visible=None):
    """Official boolean mask (B, N), True = masked, the same number of visible tokens per sample
    -> visible_idx (B, K) int64, ascending.

    With `num_visible` given there is no host synchronisation (the equal-count check then runs as
    an asynchronous device assert); without it, K is read from the mask (one sync) and checked.
    """
    _check_tensor("mask", mask, ndim=2, dtypes=(torch.bool,))
    visible = (~mask).sum(dim=1)  # (B,)
    if num_visible is None:
        lo, hi = (int(v) for v in torch.stack([visible.min(), visible.max()]).tolist()) if mask.shape[0] else (0, 0)
        if lo != hi:
            raise ValueError(f"mask must keep the same number of visible tokens in every sample; "
                             f"got between {lo} and {hi}")
        num_visible = lo
    else:
        torch._assert_async(torch.all(visible == num_visible),
                            f"mask does not keep exactly num_visible={num_visible} tokens per sample")
    # stable sort of the 0/1 'masked' flags puts visible positions first, in ascending order
    order = torch.sort(mask.to(torch.uint8), dim=1, stable=True).indices
    return order[:, :num_visible].contiguous()
