"""The Triton backend inside the model and under torch.compile.

- the encoder run with backend 'triton' equals the same encoder with 'ref' (forward and gradients);
- a function using all four ops compiles with torch.compile(fullgraph=True) (the ops are torch custom
  ops with fake implementations) and gives the eager result.
"""
import pytest
import torch

import kernels
from ivmini.config import VisionConfig
from ivmini.vit import VideoViT

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_encoder_triton_equals_ref(seed, monkeypatch):
    cfg = VisionConfig(img_size=28, patch_size=14, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0,
                       attn_pool_num_heads=4, clip_embed_dim=32, num_frames=4, init_values=0.5, drop_path_rate=0.0,
                       heads="distill", clip_teacher_embed_dim=24, clip_teacher_final_dim=16, clip_return_layer=2,
                       mae_teacher_embed_dim=20, mae_return_layer=1)
    model = VideoViT(cfg).to(DEVICE)
    video = torch.randn(2, 3, 4, 28, 28, device=DEVICE)
    idx = torch.cat([torch.zeros(2, 1, dtype=torch.long), 1 + torch.stack(
        [torch.randperm(16)[:6].sort().values for _ in range(2)])], dim=1).to(DEVICE)
    results = {}
    for backend in ("ref", "triton"):
        monkeypatch.setenv("IVMINI_BACKEND", backend)
        model.zero_grad()
        out = model(video, visible_idx=idx)
        loss = out.clip_align.sum() + out.mae_align.square().sum() + out.final_align.sum() + out.pooled.square().sum()
        loss.backward()
        results[backend] = [out.tokens, out.pooled, out.clip_align, out.mae_align] + \
                           [p.grad.clone() for p in model.parameters()]
    for a, b in zip(results["ref"], results["triton"]):
        # fp32 rounding of different summation orders; some bias gradients are sums of O(100) terms that
        # cancel to O(1), so the bound is absolute at that level
        scale = max(1.0, a.abs().max().item())
        assert (b - a).abs().max().item() <= 1e-4 * scale, (a.shape, (b - a).abs().max().item(), scale)


def test_all_ops_under_torch_compile(seed):
    B, N, C, H = 2, 33, 32, 4
    x = torch.randn(B, N, C, device=DEVICE, requires_grad=True)
    w = torch.randn(C, device=DEVICE, requires_grad=True)
    pool = [torch.randn(C, device=DEVICE) for _ in range(6)] + \
           [torch.randn(*s, device=DEVICE) * 0.2 for s in ((C, C), (C,), (C, C), (C,), (C, C), (C,), (16, C), (16,))]
    pool = [p.requires_grad_() for p in pool]
    idx = torch.stack([torch.randperm(N)[:9].sort().values for _ in range(B)]).to(DEVICE)
    pos = torch.randn(1, N, C, device=DEVICE, requires_grad=True)

    def f(x, w, pos, *pool):
        h = kernels.masked_gather(x, idx, pos, backend="triton")                    # (B, 9, C)
        h = kernels.rms_norm(h, w, backend="triton")
        q = h.view(B, 9, H, C // H).transpose(1, 2)
        h = kernels.attention(q, q, q, causal=True, backend="triton").transpose(1, 2).reshape(B, 9, C)
        return kernels.attn_pool(h, *pool, num_heads=H, backend="triton")

    eager = f(x, w, pos, *pool)                  # first call eager: backend modules are imported here
    eager_grads = torch.autograd.grad(eager.square().sum(), [x, w, pos, *pool])
    compiled = torch.compile(f, fullgraph=True)(x, w, pos, *pool)
    grads = torch.autograd.grad(compiled.square().sum(), [x, w, pos, *pool])
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)
