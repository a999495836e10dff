"""Stage-1 masking (ivmini/masking.py) and distillation losses (ivmini/losses.py).

The statistical tests draw fresh weights every run (the `seed` fixture) and accept at z = 5
(one-sided p ~ 3e-7 per test), so a correct sampler fails about once in millions of runs.
"""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from ivmini.config import VisionConfig
from ivmini.losses import cosine_distill, gather_targets, stage1_distill_losses
from ivmini.masking import (clip_attention_visible_idx, num_visible, random_visible_idx, semantic_visible_idx,
                            tube_visible_idx)
from ivmini.vit import VideoViT, VisionOutput

Z = 5.0  # acceptance bound of the statistical tests, in standard deviations


def chi2_bound(df, z=Z):
    """Wilson-Hilferty approximation of the chi-square quantile at standard-normal quantile z."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def chi2(counts, expected):
    return float(((counts - expected) ** 2 / expected).sum())


def seeds_for(seed, n):
    """n per-sample seeds derived from the test's seed (as the training loop derives them from the run)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**62, (n,), generator=g).tolist()


def check_layout(idx, B, T, N, per_frame=None, total=None):
    """CLS first, strictly ascending (so unique), in range; `per_frame` patches in every frame or
    `total` patches in all."""
    assert idx.dtype == torch.int64
    assert (idx[:, 0] == 0).all()
    assert (idx[:, 1:] >= 1).all() and (idx[:, 1:] <= T * N).all()
    assert (idx[:, 1:] > idx[:, :-1]).all()
    frame = (idx[:, 1:] - 1) // N                                            # (B, Nvis)
    counts = F.one_hot(frame, T).sum(1)                                        # (B, T)
    if per_frame is not None:
        assert idx.shape == (B, 1 + T * per_frame)
        assert (counts == per_frame).all()
    else:
        assert idx.shape == (B, 1 + total)


# ---------------------------------------------------------------------------------------------
# layout and counts

def test_num_visible_matches_official():
    assert num_visible(256, 0.8) == 52
    assert num_visible(8 * 256, 0.8) == 410          # the whole-clip count differs from 8 * 52
    assert num_visible(256, 0.0) == 256 and num_visible(256, 1.0) == 0
    with pytest.raises(ValueError, match="mask_ratio"):
        num_visible(256, 1.5)


@pytest.mark.parametrize("T,N,keep", [(4, 17, 5), (1, 1, 1), (3, 9, 0), (2, 9, 9), (8, 256, 52)])
def test_counts_per_frame(seed, T, N, keep):
    B = 3
    attn = torch.rand(B, T, N)
    attn[attn < 0.2] = 0                               # some zero weights
    attn[..., :keep] += 0.1                            # but always at least `keep` positive ones
    seeds = seeds_for(seed, B)
    check_layout(semantic_visible_idx(attn, keep, seeds), B, T, N, per_frame=keep)
    check_layout(tube_visible_idx(B, T, N, keep, seeds), B, T, N, per_frame=keep)
    check_layout(random_visible_idx(B, T, N, T * keep, seeds), B, T, N, total=T * keep)
    check_layout(clip_attention_visible_idx(attn.flatten(1), T * keep, seeds), B, T, N, total=T * keep)


def test_argument_errors():
    with pytest.raises(ValueError, match="one seed per sample"):
        semantic_visible_idx(torch.rand(2, 3, 9), 2, [1])
    with pytest.raises(ValueError, match="keep=10 must be between 0 and 9"):
        semantic_visible_idx(torch.rand(2, 3, 9), 10, [1, 2])
    with pytest.raises(ValueError, match=r"attn must be a floating \(B, T, N\)"):
        semantic_visible_idx(torch.rand(2, 27), 2, [1, 2])
    with pytest.raises(RuntimeError, match="non-negative"):
        semantic_visible_idx(-torch.rand(2, 3, 9), 2, [1, 2])
    with pytest.raises(ValueError, match="1-D integer CPU tensor"):
        tube_visible_idx(2, 3, 9, 2, torch.tensor([1.0, 2.0]))


def test_tube_is_the_same_in_every_frame(seed):
    B, T, N, keep = 4, 5, 16, 6
    idx = tube_visible_idx(B, T, N, keep, seeds_for(seed, B))
    patches = ((idx[:, 1:] - 1) % N).view(B, T, keep)
    assert (patches == patches[:, :1]).all()
    assert not (patches[0, 0] == patches[1, 0]).all()        # but differs between samples (p ~ 1e-4)


# ---------------------------------------------------------------------------------------------
# seeds: per sample, independent of the batch and of the global RNG

def test_mask_depends_only_on_the_sample_seed(seed):
    B, T, N, keep = 6, 4, 32, 7
    attn = torch.rand(B, T, N)
    seeds = seeds_for(seed, B)
    state = torch.get_rng_state()
    torch.manual_seed(1)
    full = semantic_visible_idx(attn, keep, seeds)
    torch.manual_seed(2)
    again = semantic_visible_idx(attn, keep, torch.tensor(seeds))               # tensor seeds = list seeds
    assert torch.equal(full, again)
    for b in range(B):                                                          # alone = inside the batch
        assert torch.equal(semantic_visible_idx(attn[b:b + 1], keep, seeds[b:b + 1]), full[b:b + 1])
    perm = torch.randperm(B)                                                    # another batch composition
    assert torch.equal(semantic_visible_idx(attn[perm], keep, [seeds[i] for i in perm]), full[perm])
    other = semantic_visible_idx(attn, keep, [s + 1 for s in seeds])
    assert not torch.equal(other, full)
    torch.set_rng_state(state)
    # the other generators too
    for fn in (lambda rows: tube_visible_idx(len(rows), T, N, keep, [seeds[i] for i in rows]),
               lambda rows: random_visible_idx(len(rows), T, N, 20, [seeds[i] for i in rows]),
               lambda rows: clip_attention_visible_idx(attn.flatten(1)[rows], 20, [seeds[i] for i in rows])):
        torch.manual_seed(3)
        a = fn(list(range(B)))
        torch.manual_seed(4)
        assert torch.equal(fn(list(range(B))), a)
        assert torch.equal(fn([2]), a[2:3])
        assert torch.equal(fn(perm.tolist()), a[perm])


def test_global_rng_is_not_consumed(seed):
    torch.manual_seed(seed)
    before = torch.get_rng_state()
    semantic_visible_idx(torch.rand(2, 3, 9), 3, [5, 6])
    # torch.rand above consumed the global RNG; the masking call after it must not
    after = torch.get_rng_state()
    torch.manual_seed(seed)
    torch.rand(2, 3, 9)
    assert torch.equal(after, torch.get_rng_state()) and not torch.equal(before, after)


def test_generators_share_one_sampler(seed):
    """Same seeds and the same noise shape give the same draw: semantic with T = 1 is the whole-clip
    variant, uniform weights are random masking, and random with T = 1 is tube."""
    B, N, keep = 5, 20, 6
    seeds = seeds_for(seed, B)
    attn = torch.rand(B, 1, N)
    assert torch.equal(semantic_visible_idx(attn, keep, seeds), clip_attention_visible_idx(attn[:, 0], keep, seeds))
    assert torch.equal(clip_attention_visible_idx(torch.ones(B, 3 * N), keep, seeds),
                       random_visible_idx(B, 3, N, keep, seeds))
    assert torch.equal(random_visible_idx(B, 1, N, keep, seeds), tube_visible_idx(B, 1, N, keep, seeds))


# ---------------------------------------------------------------------------------------------
# the sampling law

def draws(attn, keep, seed):
    """(B, T, keep) patch indices per frame from semantic_visible_idx with one seed per sample."""
    B, T, N = attn.shape
    idx = semantic_visible_idx(attn, keep, seeds_for(seed, B))
    return ((idx[:, 1:] - 1) % N).view(B, T, keep)


def test_keep_one_follows_the_weights(seed):
    """keep = 1: the drawn patch is categorical(w / sum w); chi-square over the positive entries."""
    n, N = 20000, 10
    w = torch.rand(N) + 0.1
    w[3] = 0.0
    counts = torch.bincount(draws(w.expand(n, 1, N), 1, seed).flatten(), minlength=N).double()
    assert counts[3] == 0
    pos = w > 0
    expected = n * (w / w.sum()).double()
    stat = chi2(counts[pos], expected[pos])
    assert stat < chi2_bound(int(pos.sum()) - 1), (stat, counts, expected)


def exact_subset_probs(w, keep):
    """P(drawn set = S) for `keep` sequential draws without replacement, P(i) ∝ w_i among those left."""
    w = [float(x) for x in w]
    probs = {}
    for seq in itertools.permutations(range(len(w)), keep):
        p, left = 1.0, sum(w)
        for i in seq:
            p *= w[i] / left if left > 0 else 0.0
            left -= w[i]
        key = tuple(sorted(seq))
        probs[key] = probs.get(key, 0.0) + p
    return probs


def test_drawn_sets_follow_sampling_without_replacement(seed):
    """keep = 3 of 6 per frame, two frames with different weights (one zero): the law of the drawn
    set, per frame, against the exact law of sequential weighted sampling without replacement."""
    n, N, keep = 8000, 6, 3
    w = torch.rand(2, N) + 0.3
    w[1, 2] = 0.0
    got = draws(w.expand(n, 2, N), keep, seed)                               # (n, 2, keep), sorted
    for t in range(2):
        probs = exact_subset_probs(w[t], keep)
        sets = list(probs)
        counts = torch.zeros(len(sets), dtype=torch.float64)
        index = {s: i for i, s in enumerate(sets)}
        for row in got[:, t].tolist():
            counts[index[tuple(row)]] += 1
        p = torch.tensor([probs[s] for s in sets], dtype=torch.float64)
        assert counts[p == 0].sum() == 0                                       # sets with the zero patch
        stat = chi2(counts[p > 0], n * p[p > 0])
        assert stat < chi2_bound(int((p > 0).sum()) - 1), (t, stat)


def test_zero_weights_fill_uniformly_when_too_few_are_positive(seed):
    """2 positive weights, keep = 4 of 8: both positive patches always, the 2 others a uniform pair
    of the 6 zero-weight patches (chi-square over the 15 pairs)."""
    n, N, keep = 6000, 8, 4
    w = torch.zeros(N)
    w[1], w[5] = torch.rand(2) + 0.1
    got = draws(w.expand(n, 1, N), keep, seed)[:, 0]                          # (n, 4)
    has = F.one_hot(got, N).sum(1).bool()                                     # (n, N)
    assert has[:, 1].all() and has[:, 5].all()
    zeros = [i for i in range(N) if i not in (1, 5)]
    pairs = list(itertools.combinations(zeros, 2))
    counts = torch.tensor([float((has[:, a] & has[:, b]).sum()) for a, b in pairs], dtype=torch.float64)
    assert counts.sum() == n
    assert chi2(counts, torch.full_like(counts, n / len(pairs))) < chi2_bound(len(pairs) - 1)


def test_inclusion_matches_official_multinomial(seed):
    """Realistic size (52 of 256, peaked attention): per-patch inclusion frequencies against the
    official procedure torch.multinomial(attn, N)[:, :52]. Each of the 256 differences must lie within 6
    two-sample standard deviations (per-patch p ~ 2e-9, so ~5e-7 for the max over 256 patches; the sd
    is floored at 3/n so that rarely drawn patches, where the normal tail is too thin, are not flagged)."""
    n, N, keep = 2000, 256, 52
    w = torch.softmax(2 * torch.randn(N), 0)
    ours = F.one_hot(draws(w.expand(n, 1, N), keep, seed)[:, 0], N).sum(1).double().mean(0)
    official = F.one_hot(torch.multinomial(w.expand(n, N), N)[:, :keep], N).sum(1).double().mean(0)
    pooled = (ours + official) / 2
    sd = (pooled * (1 - pooled) * 2 / n).sqrt().clamp_min(3 / n)
    assert ((ours - official).abs() <= 6 * sd).all(), ((ours - official).abs() / sd).max()
    # and inclusion rises with the weight: frequent where the attention is high
    rank = lambda v: v.argsort().argsort().double()
    assert torch.corrcoef(torch.stack([rank(ours), rank(w.double())]))[0, 1] > 0.9


def test_random_is_uniform_over_the_clip(seed):
    n, T, N, keep = 3000, 2, 8, 5
    idx = random_visible_idx(n, T, N, keep, seeds_for(seed, n))
    counts = torch.bincount(idx[:, 1:].flatten() - 1, minlength=T * N).double()
    # each draw is a uniform keep-subset of M = T N positions: a position is in with probability q = keep / M,
    # Cov = n q (1-q) M/(M-1) (I - 1 1^T / M), so sum (c - n q)^2 / (n q (1-q) M/(M-1)) ~ chi2(M - 1)
    M, q = T * N, keep / (T * N)
    stat = float(((counts - n * q) ** 2).sum()) / (n * q * (1 - q) * M / (M - 1))
    assert stat < chi2_bound(M - 1), stat
    per_frame = F.one_hot((idx[:, 1:] - 1) // N, T).sum(1)
    assert (per_frame[:, 0] != keep).any() and (per_frame[:, 0] != 0).any()   # not per frame


# ---------------------------------------------------------------------------------------------
# losses

def unit(*shape, dtype=torch.float32):
    return F.normalize(torch.randn(*shape, dtype=dtype), dim=-1)


def test_cosine_distill_is_squared_distance_of_unit_vectors(seed):
    s, t = unit(3, 4, 5, 16, dtype=torch.float64), unit(3, 4, 5, 16, dtype=torch.float64)
    S, Tt = s.reshape(-1, 16), t.reshape(-1, 16)
    expected = torch.cdist(S, Tt).diagonal().pow(2).mean()
    torch.testing.assert_close(cosine_distill(s.float(), t.float()).double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cosine_distill(s.bfloat16(), t.bfloat16()).double(), expected, rtol=0, atol=1e-2)
    assert cosine_distill(s.float(), s.float()).abs() < 1e-6
    torch.testing.assert_close(cosine_distill(s.float(), -s.float()), torch.tensor(4.0))
    with pytest.raises(ValueError, match="differ in shape"):
        cosine_distill(s, t[..., :8])


def test_cosine_distill_gradient_reaches_the_student_only(seed):
    s = unit(6, 9, dtype=torch.float64).requires_grad_()
    t = unit(6, 9, dtype=torch.float64).requires_grad_()
    cosine_distill(s, t).backward()
    assert t.grad is None
    torch.testing.assert_close(s.grad, -2 * t.detach() / 6)


def fake_output(K, Km, B, nvis, Dc, Df, Dm, grad=False):
    out = VisionOutput(tokens=torch.zeros(B, 1 + nvis, 4), clip_align=unit(K, B, 1 + nvis, Dc),
                       final_align=unit(B, Df), mae_align=unit(Km, B, nvis, Dm))
    for t in (out.clip_align, out.final_align, out.mae_align):
        t.requires_grad_(grad)
    return out


def loop_loss(s, t):
    """float64, one position at a time: 2 - 2 sum_c s_c t_c, averaged."""
    s, t = s.detach().double().reshape(-1, s.shape[-1]), t.detach().double().reshape(-1, t.shape[-1])
    return sum(2 - 2 * sum(float(a) * float(b) for a, b in zip(s[i], t[i])) for i in range(len(s))) / len(s)


def test_stage1_losses_against_loops(seed):
    K, Km, B, nvis = 3, 2, 2, 5
    out = fake_output(K, Km, B, nvis, 12, 8, 10, grad=True)
    clip_t, final_t, mae_t = unit(K, B, 1 + nvis, 12), unit(B, 8), unit(Km, B, nvis, 10)
    weights = (0.5, 2.0, 3.0)
    losses = stage1_distill_losses(out, clip_t, final_t, mae_t, weights=weights)
    assert set(losses) == {"loss", "clip_middle", "clip_final", "mae"}
    expected = {"clip_middle": loop_loss(out.clip_align, clip_t), "clip_final": loop_loss(out.final_align, final_t),
                "mae": loop_loss(out.mae_align, mae_t)}
    for name, value in expected.items():
        assert abs(losses[name].item() - value) < 1e-5, name
    assert abs(losses["loss"].item() - sum(w * v for w, v in zip(weights, expected.values()))) < 1e-5
    losses["loss"].backward()
    assert all(t.grad is not None for t in (out.clip_align, out.final_align, out.mae_align))
    # identical targets: every term is zero
    same = stage1_distill_losses(out, out.clip_align, out.final_align, out.mae_align)
    assert float(same["loss"].abs()) < 1e-5


def test_stage1_losses_name_the_wrong_tensor():
    out = fake_output(3, 2, 2, 5, 12, 8, 10)
    good = dict(clip_targets=unit(3, 2, 6, 12), final_target=unit(2, 8), mae_targets=unit(2, 2, 5, 10))
    for name, bad in (("clip_targets", unit(3, 2, 5, 12)), ("final_target", unit(2, 9)),
                      ("mae_targets", unit(2, 2, 6, 10))):
        with pytest.raises(ValueError, match=name):
            stage1_distill_losses(out, **dict(good, **{name: bad}))
    with pytest.raises(ValueError, match="heads='distill'"):
        stage1_distill_losses(VisionOutput(tokens=torch.zeros(1)), **good)


# ---------------------------------------------------------------------------------------------
# gather_targets

@pytest.mark.parametrize("with_cls", [True, False])
def test_gather_targets_matches_boolean_indexing(seed, with_cls):
    K, B, T, N, keep, C = 3, 4, 3, 7, 2, 5
    idx = semantic_visible_idx(torch.rand(B, T, N), keep, seeds_for(seed, B))
    layers = torch.randn(K, B, (1 if with_cls else 0) + T * N, C)
    got = gather_targets(layers, idx, with_cls=with_cls)
    visible = torch.zeros(B, 1 + T * N, dtype=torch.bool)
    visible[torch.arange(B).unsqueeze(1), idx] = True
    if not with_cls:
        visible = visible[:, 1:]                      # the official mask with the CLS slot dropped
    slow = torch.stack([torch.stack([layers[k, b][visible[b]] for b in range(B)]) for k in range(K)])
    assert got.shape == (K, B, (1 if with_cls else 0) + T * keep, C)
    assert torch.equal(got, slow)


def test_one_step_with_the_student(seed):
    """Mask from teacher attention -> student forward on the visible tokens -> targets gathered with
    the same indices -> losses -> gradient in the student."""
    cfg = VisionConfig(img_size=42, patch_size=14, embed_dim=32, depth=3, num_heads=4, mlp_ratio=2.0,
                       attn_pool_num_heads=2, clip_embed_dim=24, num_frames=4, init_values=0.1, drop_path_rate=0.0,
                       clip_teacher_embed_dim=20, clip_teacher_final_dim=16, clip_return_layer=2,
                       mae_teacher_embed_dim=12, mae_return_layer=2, heads="distill")
    student = VideoViT(cfg)
    B, T, N, keep = 2, 4, 9, 3
    idx = semantic_visible_idx(torch.rand(B, T, N), keep, seeds_for(seed, B))
    out = student(torch.randn(B, 3, T, 42, 42), visible_idx=idx)
    mm_layers, motion = unit(2, B, 1 + T * N, 20), unit(2, B, T * N, 12)
    losses = stage1_distill_losses(out, gather_targets(mm_layers, idx), unit(B, 16),
                                   gather_targets(motion, idx, with_cls=False))
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"]) and 0 < float(losses["loss"]) < 12
    no_grad = [name for name, p in student.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, no_grad
