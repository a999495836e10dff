"""Stage-2 losses (ivmini/losses.py: vtc_loss, vtm_loss, mask_tokens, mlm_loss) against independent float64
computations written as loops, the VTC all-gather on 2 gloo ranks, VTM negative sampling, MLM masking laws."""
import math
import os
import socket
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from ivmini.losses import mask_tokens, mlm_loss, vtc_loss, vtm_loss
from ivmini.text import BertConfig, BertForMaskedLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def vtc_reference(v, t, idx, temp, agg="mean"):
    """Float64 loops: sim[i][j] = agg_k cos(v[i,k], t[j]) / temp; soft targets by equal ids."""
    v, t = v.double(), t.double()
    V = v if v.dim() == 3 else v[:, None]                                  # (B, K, D)
    B, K = V.shape[:2]
    ids = list(range(B)) if idx is None else idx.tolist()
    sim = [[None] * B for _ in range(B)]
    for i in range(B):
        for j in range(B):
            cos = [V[i, k] @ t[j] / (V[i, k].norm() * t[j].norm()) / temp for k in range(K)]
            sim[i][j] = sum(cos) / K if agg == "mean" else torch.stack(cos).max()
    total = 0.0
    for i in range(B):
        pos = [j for j in range(B) if ids[j] == ids[i]]
        lse_row = torch.logsumexp(torch.stack([sim[i][j] for j in range(B)]), 0)
        lse_col = torch.logsumexp(torch.stack([sim[j][i] for j in range(B)]), 0)
        total = total - sum(sim[i][j] - lse_row for j in pos) / len(pos) - sum(sim[j][i] - lse_col for j in pos) / len(pos)
    return total / (2 * B)


@pytest.mark.parametrize("shape,agg,with_idx", [((6, 5), "mean", True), ((5, 3, 4), "mean", True),
                                                 ((5, 3, 4), "max", True), ((4, 7), "mean", False)])
def test_vtc_matches_a_float64_loop_with_duplicate_ids(shape, agg, with_idx):
    torch.manual_seed(0)
    B, D = shape[0], shape[-1]
    v = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    t = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    temp = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([3, 1, 3, 0, 1, 2][:B]) if with_idx else None           # duplicates: 3 and 1
    got = vtc_loss(v, t, idx, temp, all_gather=True, agg_method=agg)       # no process group: local
    want = vtc_reference(v, t, idx, temp, agg)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    g = torch.autograd.grad(got, (v, t, temp))
    w = torch.autograd.grad(want, (v, t, temp))
    for a, b in zip(g, w):
        assert a.abs().sum() > 0 and torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_vtc_bad_input_is_named():
    with pytest.raises(ValueError, match="agg_method"):
        vtc_loss(torch.randn(2, 3, 4), torch.randn(2, 4), None, 0.1, agg_method="sum")
    with pytest.raises(ValueError, match="same D"):
        vtc_loss(torch.randn(2, 5), torch.randn(2, 4), None, 0.1)


VTC_RANK_SCRIPT = textwrap.dedent("""
    import sys, torch
    from ivmini import dist
    from ivmini.losses import vtc_loss
    rank, world, _ = dist.init()
    torch.manual_seed(1)
    v, t = torch.randn(2 * 3, 2, 5, dtype=torch.float64), torch.randn(2 * 3, 5, dtype=torch.float64)
    idx = torch.tensor([4, 0, 4, 1, 2, 0])
    rows = slice(3 * rank, 3 * rank + 3)
    mine_v, mine_t = v[rows].clone().requires_grad_(), t[rows].clone().requires_grad_()
    temp = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    loss = vtc_loss(mine_v, mine_t, idx[rows], temp, all_gather=True)
    loss.backward()
    torch.save({"loss": loss.detach(), "v": mine_v.grad, "t": mine_t.grad, "temp": temp.grad}, sys.argv[1] + f"/{rank}.pt")
    dist.shutdown()
""")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vtc_on_two_gloo_ranks_has_the_official_local_gradient(tmp_path):
    """Each rank computes the loss over the gathered batch; the gather's backward keeps the rank's own slice
    (no all-reduce), so rank r's gradient is d(global loss)/d(rank r's rows) and temp's the whole gradient."""
    script = tmp_path / "vtc_rank.py"
    script.write_text(VTC_RANK_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",)}
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)))
             for r in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out[-3000:]
    torch.manual_seed(1)
    v = torch.randn(6, 2, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    temp = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    want = vtc_loss(v, t, torch.tensor([4, 0, 4, 1, 2, 0]), temp, all_gather=False)
    want.backward()
    for r in range(2):
        got = torch.load(tmp_path / f"{r}.pt")
        assert torch.allclose(got["loss"], want.detach(), rtol=1e-12)
        assert torch.allclose(got["v"], v.grad[3 * r:3 * r + 3], rtol=1e-10, atol=1e-14)
        assert torch.allclose(got["t"], t.grad[3 * r:3 * r + 3], rtol=1e-10, atol=1e-14)
        assert torch.allclose(got["temp"], temp.grad, rtol=1e-10)


# ---------------------------------------------------------------------------------------------
# VTM

def tiny_bert(fusion_layer=1, layers=2, width=12):
    cfg = BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=16, max_position_embeddings=16, hidden_dropout_prob=0.0,
                     fusion_layer=fusion_layer, encoder_width=width)
    torch.manual_seed(0)
    return BertForMaskedLM(cfg).double().eval()


def test_vtm_pairs_and_loss_match_a_per_pair_loop():
    mlm = tiny_bert()
    head = nn.Linear(8, 2).double()
    B, L, Nv = 4, 5, 3
    vision = torch.randn(B, Nv, 12, dtype=torch.float64, requires_grad=True)
    text = torch.randn(B, L, 8, dtype=torch.float64, requires_grad=True)
    atts = torch.ones(B, L, dtype=torch.long)
    atts[1, 3:] = 0
    atts[2, 4:] = 0
    vneg, tneg = torch.tensor([2, 0, 3, 1]), torch.tensor([1, 2, 0, 2])
    loss, logits = vtm_loss(mlm.bert, head, 0.1, vision, text, torch.randn(B, 6), torch.randn(B, 6), atts,
                            torch.arange(B), negatives=(vneg, tneg))
    assert logits.shape == (3 * B, 2)
    pairs = ([(i, i, i, 1) for i in range(B)] + [(vneg[i], i, i, 0) for i in range(B)]
             + [(i, tneg[i], tneg[i], 0) for i in range(B)])              # (video, text, mask row, label)
    total = 0.0
    for row, (vi, ti, ai, label) in enumerate(pairs):
        h = mlm.bert(encoder_embeds=text[ti:ti + 1], attention_mask=atts[ai:ai + 1],
                     encoder_hidden_states=vision[vi:vi + 1], mode="fusion").last_hidden_state
        z = head(h[0, 0])
        assert torch.allclose(logits[row], z, atol=1e-10)
        total = total - (z[label] - torch.logsumexp(z, 0))
    want = total / (3 * B)
    assert torch.allclose(loss, want, atol=1e-10)
    for a, b in zip(torch.autograd.grad(loss, (vision, text)), torch.autograd.grad(want, (vision, text))):
        assert a.abs().sum() > 0 and torch.allclose(a, b, atol=1e-10)


class Recorder:
    """A stand-in fusion encoder: remembers which video / text each of the 3B pairs holds (feature 0 of
    every token carries the sample's row) and returns zeros."""

    def __call__(self, encoder_embeds, attention_mask, encoder_hidden_states, encoder_attention_mask, mode):
        assert mode == "fusion" and encoder_attention_mask is None
        self.video = encoder_hidden_states[:, 0, 0].long()
        self.text = encoder_embeds[:, 0, 0].long()
        return SimpleNamespace(last_hidden_state=torch.zeros(*encoder_embeds.shape[:2], 4))


def draw(rec, idx, vision_proj, text_proj, temp, hard=True):
    B = idx.shape[0]
    rows = torch.arange(B, dtype=torch.float64)
    vision = rows[:, None, None].expand(B, 2, 3).clone()
    text = rows[:, None, None].expand(B, 3, 4).clone()
    vtm_loss(rec, nn.Linear(4, 2), temp, vision, text, vision_proj, text_proj, torch.ones(B, 3), idx,
             hard_negatives=hard)
    return rec.video[B:2 * B], rec.text[2 * B:]                            # neg video per text, neg text per video


@pytest.mark.parametrize("hard", [True, False])
def test_vtm_negatives_never_share_the_positive_id_and_follow_their_law(hard):
    torch.manual_seed(0)
    idx = torch.tensor([7, 7, 2, 5, 2, 9])
    B, temp = 6, 0.5
    vp, tp = torch.randn(B, 4), torch.randn(B, 4)
    rec, counts_v, counts_t = Recorder(), torch.zeros(B, B), torch.zeros(B, B)
    n = 1500
    for _ in range(n):
        vneg, tneg = draw(rec, idx, vp, tp, temp, hard)
        assert not (idx[vneg] == idx).any() and not (idx[tneg] == idx).any()
        counts_v[torch.arange(B), vneg] += 1
        counts_t[torch.arange(B), tneg] += 1
    same = idx[:, None] == idx[None, :]
    cos = torch.nn.functional.normalize(vp, dim=1) @ torch.nn.functional.normalize(tp, dim=1).T   # (v, t)
    for counts, sim in ((counts_v, cos.T), (counts_t, cos)):              # rows: text -> videos, video -> texts
        w = torch.softmax(sim / temp, dim=1) if hard else torch.ones(B, B)
        w = w.masked_fill(same, 0)
        w = w / w.sum(1, keepdim=True)
        assert (counts / n - w).abs().max() < 0.05                          # 1500 draws: sd <= 0.013


def test_vtm_without_another_id_is_an_error():
    rec = Recorder()
    with pytest.raises(RuntimeError, match="another id"):
        draw(rec, torch.tensor([3, 3, 3]), torch.randn(3, 4), torch.randn(3, 4), 0.1)


# ---------------------------------------------------------------------------------------------
# MLM

def test_mask_tokens_frequencies_specials_and_generator():
    PAD, CLS, SEP, MASK, V = 0, 1, 2, 3, 1000
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, V, (400, 120), generator=g)
    ids[:, 0] = CLS
    ids[:, 60] = SEP
    ids[::2, 100:] = PAD
    before = ids.clone()
    masked, labels = mask_tokens(ids, V, MASK, PAD, CLS, prob=0.5, generator=torch.Generator().manual_seed(5))
    assert torch.equal(ids, before)                                          # input untouched
    chosen = labels != -100
    eligible = (ids != PAD) & (ids != CLS)
    assert not chosen[~eligible].any() and torch.equal(masked[~eligible], ids[~eligible])
    assert torch.equal(labels[chosen], ids[chosen])
    n = eligible.sum().item()
    assert abs(chosen.sum().item() / n - 0.5) < 4 * math.sqrt(0.25 / n)
    assert abs(chosen[:, 60].float().mean().item() - 0.5) < 0.1              # [SEP] is maskable
    c = chosen.sum().item()
    to_mask = (masked == MASK) & chosen
    kept = (masked == ids) & chosen
    changed = chosen & ~to_mask & ~kept                                      # random ids, except when it drew its own
    for frac, want in ((to_mask, 0.8), (kept, 0.1 + 0.1 / V), (changed, 0.1 - 0.1 / V)):
        assert abs(frac.sum().item() / c - want) < 4 * math.sqrt(want * (1 - want) / c), (want, frac.sum() / c)
    assert masked[changed].min() >= 0 and masked[changed].max() < V
    again = mask_tokens(ids, V, MASK, PAD, CLS, generator=torch.Generator().manual_seed(5))
    assert torch.equal(again[0], masked) and torch.equal(again[1], labels)
    torch.manual_seed(11)                                                    # generator=None: torch's default
    a = mask_tokens(ids[:8], V, MASK, PAD, CLS)
    torch.manual_seed(11)
    b = mask_tokens(ids[:8], V, MASK, PAD, CLS)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_mlm_loss_is_the_masked_cross_entropy_of_the_multimodal_pass():
    mlm = tiny_bert(fusion_layer=1, layers=3)
    B, L = 3, 6
    ids = torch.randint(4, 40, (B, L))
    ids[:, 0] = 1
    atts = torch.ones(B, L, dtype=torch.long)
    atts[0, 4:] = 0
    masked, labels = mask_tokens(ids, 40, 3, 0, 1, prob=0.5, generator=torch.Generator().manual_seed(2))
    labels[1, 2] = ids[1, 2]                                                 # at least one label
    vision = torch.randn(B, 4, 12, dtype=torch.float64, requires_grad=True)
    got = mlm_loss(mlm, masked, atts, labels, vision)
    logits = mlm(masked, atts, encoder_hidden_states=vision, mode="multi_modal").logits   # text + fusion in one pass
    terms = [torch.logsumexp(logits[b, i], 0) - logits[b, i, labels[b, i]]
             for b in range(B) for i in range(L) if labels[b, i] != -100]
    want = sum(terms) / len(terms)
    assert torch.allclose(got.double(), want, atol=1e-6)                   # the MLM head's loss is float32
    ga, = torch.autograd.grad(got, vision)
    gb, = torch.autograd.grad(want, vision)
    assert ga.abs().sum() > 0 and torch.allclose(ga, gb, atol=1e-6)
