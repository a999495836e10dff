"""Which tokens the stage-1 student sees: visible_idx (B, 1+Nvis) int64 ascending, CLS (index 0) always in.

Token layout (ivmini/vit.py): index 0 is CLS, patch p of frame t is index 1 + t*N + p.

    semantic_visible_idx        per frame, `keep` patches drawn without replacement with probability
                                ∝ the multimodal teacher's pool attention (the stage-1 default; facts §2.3,
                                official SM engines/engine_for_pretraining.py L112-124)
    clip_attention_visible_idx  the same over the whole clip (distillation to S/B/L, SM engine_for_distill.py)
    random_visible_idx          uniform over the whole clip (SM datasets/masking_generator.py RandomMaskingGenerator)
    tube_visible_idx            uniform per frame, the same patches in every frame (TubeMaskingGenerator)

The official engine builds the random and tube masks without a CLS slot and never reaches them (its
pretraining loop reads the teacher attention unconditionally); here every generator prepends CLS, so
all four are interchangeable inputs to VideoViT.forward(visible_idx=...).

Randomness. Each sample b draws only from its own torch.Generator seeded with seeds[b]; the global
torch RNG is never touched. The training loop derives seeds[b] from (run seed, epoch, sample index),
so a sample's mask does not depend on the batch it sits in, the number of processes, the rank, or
how many steps ran before a resume. The noise is drawn on the CPU (one small draw per sample) and
copied to the weights' device without waiting: the CPU generator gives the same stream on every
machine, so a mask computed in a CPU test equals the one drawn in a GPU run for the same weights.

Sampling without replacement ∝ w, vectorised (the Gumbel-top-k trick): give entry i the key
log w_i + G_i with G_i i.i.d. Gumbel(0, 1); the indices of the k largest keys, in decreasing key
order, have exactly the law of k sequential draws without replacement with P(i) ∝ w_i among the
entries not yet drawn (Gumbel-max gives the first draw; by memorylessness of the exponential race
w_i / E_i the remaining keys are again a race over the rest). The official code draws all N with
torch.multinomial(w, N) and keeps the first 52: the first 52 of that sequence have the same law.
"""
import torch

# A zero weight's key is G - _ZERO_OFFSET. Positive keys are log w + G >= log(4.9e-324) - 6.6 > -752
# (float64 keys; G lies in [-6.6, 36.7] for float64 uniforms), and zero keys are <= 36.7 - 1e4, so every
# positive entry outranks every zero entry, and zero entries rank among themselves by G alone.
_ZERO_OFFSET = 1e4


def num_visible(n, mask_ratio):
    """Visible count when masking `mask_ratio` of n tokens, as the official code: n - int(mask_ratio * n).
    Examples: 52 of 256 at 0.8; 410 of 8*256 over a whole clip (not 8*52 = 416)."""
    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
    return n - int(mask_ratio * n)


def _seed_list(seeds, batch):
    """seeds: a list of ints or a 1-D integer CPU tensor, one per sample -> list of Python ints."""
    if isinstance(seeds, torch.Tensor):
        if seeds.dim() != 1 or seeds.is_floating_point() or seeds.device.type != "cpu":
            raise ValueError(f"seeds must be a 1-D integer CPU tensor (or a list of ints), got "
                             f"{seeds.dtype} {tuple(seeds.shape)} on {seeds.device}")
        seeds = seeds.tolist()
    seeds = [int(s) for s in seeds]
    if len(seeds) != batch:
        raise ValueError(f"need one seed per sample: got {len(seeds)} seeds for a batch of {batch}")
    return seeds


def _gumbel(seeds, shape, device):
    """(len(seeds), *shape) float64 Gumbel(0, 1) noise; row b comes from torch.Generator seeded seeds[b]."""
    u = torch.empty((len(seeds), *shape), dtype=torch.float64)
    for b, s in enumerate(seeds):
        torch.rand(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(s), out=u[b])
    # u in [0, 1): clamp the (probability 2^-53) zero so that -log(-log(u)) stays finite
    g = -torch.log(-torch.log(u.clamp_(min=torch.finfo(torch.float64).tiny)))
    return g.to(device, non_blocking=True)  # pageable source: staged by the host, no wait on the device


def _top_keys(noise, keep, weights=None):
    """noise (..., M) Gumbel, weights (..., M) >= 0 or None (uniform) -> (..., keep) int64 ascending:
    `keep` of the M entries drawn without replacement ∝ weights. Entries with zero weight are taken
    only when fewer than `keep` are positive, and then uniformly at random among the zero ones (the
    official torch.multinomial raises there instead)."""
    key = noise
    if weights is not None:
        w = weights.to(torch.float64)
        key = torch.where(w > 0, w.log() + noise, noise - _ZERO_OFFSET)
    return key.topk(keep, dim=-1, sorted=False).indices.sort(dim=-1).values


def _with_cls(patch_idx):
    """patch_idx (B, Nvis) token indices without the CLS slot (0-based patches) -> (B, 1+Nvis)."""
    cls = patch_idx.new_zeros(patch_idx.shape[0], 1)
    return torch.cat([cls, patch_idx + 1], dim=1)


def _per_frame(frame_idx, N):
    """frame_idx (B, T, keep) patch indices within each frame -> (B, 1+T*keep) token indices."""
    B, T, keep = frame_idx.shape
    offset = torch.arange(T, device=frame_idx.device).view(1, T, 1) * N
    return _with_cls((frame_idx + offset).reshape(B, T * keep))   # frames in order, so still ascending


def _check_keep(keep, n, what):
    if not 0 <= keep <= n:
        raise ValueError(f"{what}={keep} must be between 0 and {n}")


def _check_weights(attn, ndim):
    if not isinstance(attn, torch.Tensor) or attn.dim() != ndim or not attn.is_floating_point():
        shape = "(B, T, N)" if ndim == 3 else "(B, T*N)"
        got = f"{attn.dtype} {tuple(attn.shape)}" if isinstance(attn, torch.Tensor) else type(attn).__name__
        raise ValueError(f"attn must be a floating {shape} tensor, got {got}")
    # checked on the device without a host sync (a failure surfaces at the next sync on CUDA)
    torch._assert_async(torch.all(attn >= 0), "attn weights must be non-negative and not NaN")


def semantic_visible_idx(attn, keep, seeds):
    """Semantic (attention) masking, frame by frame: the stage-1 default.

    attn (B, T, N) non-negative weights (the multimodal teacher's pool attention over each frame's N
    patches; rows need not sum to 1); keep: patches kept per frame (num_visible(N, 0.8) = 52 for N=256);
    seeds: B ints (list or 1-D CPU tensor), one stream per sample.
    Returns visible_idx (B, 1 + T*keep) int64 ascending on attn's device: CLS, then per frame t the
    `keep` drawn patches p as 1 + t*N + p.
    """
    _check_weights(attn, 3)
    B, T, N = attn.shape
    _check_keep(keep, N, "keep")
    noise = _gumbel(_seed_list(seeds, B), (T, N), attn.device)         # (B, T, N)
    return _per_frame(_top_keys(noise, keep, attn), N)


def clip_attention_visible_idx(attn, keep_total, seeds):
    """Semantic masking over the whole clip (the official distillation to S/B/L, whose video teacher
    gives one attention row per clip). attn (B, T*N) >= 0 -> visible_idx (B, 1 + keep_total);
    the count need not be the same in every frame. Official count: num_visible(T*N, 0.8)."""
    _check_weights(attn, 2)
    B, M = attn.shape
    _check_keep(keep_total, M, "keep_total")
    noise = _gumbel(_seed_list(seeds, B), (M,), attn.device)           # (B, T*N)
    return _with_cls(_top_keys(noise, keep_total, attn))


def random_visible_idx(B, T, N, keep_total, seeds, device="cpu"):
    """Uniformly random visible patches over the whole clip, as the official RandomMaskingGenerator
    (it shuffles one mask of T*N entries, so frames keep different counts). keep_total is the clip's
    visible count; the official one is num_visible(T*N, mask_ratio). -> (B, 1 + keep_total)."""
    _check_keep(keep_total, T * N, "keep_total")
    noise = _gumbel(_seed_list(seeds, B), (T * N,), device)           # (B, T*N)
    return _with_cls(_top_keys(noise, keep_total))


def tube_visible_idx(B, T, N, keep, seeds, device="cpu"):
    """Tube masking, as the official TubeMaskingGenerator: one uniformly random set of `keep`
    patches per sample, the same in every frame. -> (B, 1 + T*keep)."""
    _check_keep(keep, N, "keep")
    noise = _gumbel(_seed_list(seeds, B), (N,), device)                # (B, N)
    frame_idx = _top_keys(noise, keep)                                  # (B, keep)
    return _per_frame(frame_idx.unsqueeze(1).expand(B, T, keep), N)
