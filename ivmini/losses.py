"""Stage-1 distillation losses and the stage-2 alignment losses VTC / VTM / MLM.

Stage 2 (facts §3.6; official MM models/criterions.py) is below the stage-1 part: vtc_loss, vtm_loss,
mask_tokens, mlm_loss. The functions take no loss weights: the stage-2 model (ivmini/align.py) multiplies.
Tests: tests/test_masking_losses.py (stage 1), tests/test_losses_stage2.py (stage 2).

Stage-1 distillation losses (paper §3.1; facts §2.4; official SM engines/engine_for_pretraining.py L127-141).

The student sees only its visible tokens; each teacher target is the teacher's L2-normalised feature
at the same token positions, and each term is the squared distance of unit vectors:

    loss = w0 * clip_middle + w1 * clip_final + w2 * mae        (official weights 1, 1, 1)
    clip_middle = mean over K layers, B, CLS + visible patches of (2 - 2 <s, t>)   multimodal teacher
    clip_final  = mean over B of (2 - 2 <s, t>)                                     its pooled output
    mae         = mean over K layers, B, visible patches of (2 - 2 <s, t>)           motion teacher

Token positions: the multimodal teacher sees the student's frames (frames[::2]) with a CLS token, so
its tokens have the student's indices. The motion teacher sees all 2T frames with tubelet 2 and no
CLS: its token frame t covers frames 2t, 2t+1, which hold student frame t, so its patch t*N + p is the
student's token 1 + t*N + p. One visible_idx therefore gathers both (gather_targets).
"""
import torch
import torch.nn.functional as F

import kernels
from . import dist


def cosine_distill(student, teacher):
    """mean over all leading positions of 2 - 2 <s, t> = |s - t|^2 for unit vectors s, t.

    student, teacher (..., C), both L2-normalised along C (not checked: otherwise this is just
    2 - 2 x dot product). 0 when equal, 4 when opposite. The teacher is a fixed target: it is
    detached, so gradient reaches the student only. Returns a float32 scalar.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ in shape")
    dtype = torch.promote_types(student.dtype, teacher.dtype)
    # einsum runs as a batched matmul: no (..., C) product tensor is materialised, and bf16 inputs are
    # accumulated in fp32 (the official (s * t).sum(-1) under autocast rounds every product to bf16)
    dot = torch.einsum("...c,...c->...", student.to(dtype), teacher.detach().to(dtype))
    return (2 - 2 * dot.float()).mean()


def _check_shape(name, t, expected, hint):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(expected)} ({hint})")


def stage1_distill_losses(out, clip_targets, final_target, mae_targets, weights=(1.0, 1.0, 1.0)):
    """The three stage-1 terms and their weighted sum.

    out: the student's VisionOutput (heads="distill"), with
        clip_align (K, B, 1+Nvis, Dc), final_align (B, Df), mae_align (Km, B, Nvis, Dm).
    clip_targets (K, B, 1+Nvis, Dc): the multimodal teacher's last K layers at the visible tokens.
    final_target (B, Df): its pooled output (frame mean, L2-normalised).
    mae_targets (Km, B, Nvis, Dm): the motion teacher's last Km layers at the visible patches.
    Layer k of the targets is compared with layer k of the student, both ascending: the student's
    blocks depth-K .. depth-1 against the teacher's last K blocks; the caller stacks them so.
    weights: (clip_middle, clip_final, mae), official (1, 1, 1).
    Returns dict(loss, clip_middle, clip_final, mae) of scalar tensors.
    """
    if out.clip_align is None or out.final_align is None or out.mae_align is None:
        raise ValueError("the student output has no clip_align/final_align/mae_align: build it with heads='distill'")
    _check_shape("clip_targets", clip_targets, out.clip_align.shape,
                 "(K, B, 1+Nvis, Dc) like the student's clip_align")
    _check_shape("final_target", final_target, out.final_align.shape, "(B, Df) like the student's final_align")
    _check_shape("mae_targets", mae_targets, out.mae_align.shape, "(K, B, Nvis, Dm) like the student's mae_align")
    if len(weights) != 3:
        raise ValueError(f"weights must be (clip_middle, clip_final, mae), got {weights!r}")
    terms = {"clip_middle": cosine_distill(out.clip_align, clip_targets),
             "clip_final": cosine_distill(out.final_align, final_target),
             "mae": cosine_distill(out.mae_align, mae_targets)}
    loss = sum(w * t for w, t in zip(weights, terms.values()))
    return {"loss": loss, **terms}


def gather_targets(teacher_layers, visible_idx, with_cls=True):
    """A teacher's stacked layers at the student's visible tokens.

    teacher_layers (K, B, 1+T*N, C) with CLS (multimodal teacher) or (K, B, T*N, C) without
    (motion teacher); visible_idx (B, 1+Nvis) int64 ascending with CLS (index 0) first.
    Returns (K, B, 1+Nvis, C) with CLS, or (K, B, Nvis, C) without: there the CLS slot is dropped and
    the patch indices are shifted down by one (token 1 + t*N + p is patch t*N + p).
    """
    if not isinstance(teacher_layers, torch.Tensor) or teacher_layers.dim() != 4:
        got = tuple(teacher_layers.shape) if isinstance(teacher_layers, torch.Tensor) else type(teacher_layers)
        raise ValueError(f"teacher_layers must be (K, B, tokens, C), got {got}")
    if not with_cls:
        # CLS must be the first visible slot; checked on the device without a host sync
        torch._assert_async(torch.all(visible_idx[:, 0] == 0), "visible_idx[:, 0] must be the CLS token 0")
        visible_idx = visible_idx[:, 1:] - 1
    return kernels.masked_gather(teacher_layers, visible_idx.contiguous())


# ---------------------------------------------------------------------------------------------
# stage 2: video-text contrastive (VTC), matching (VTM) and masked language modelling (MLM)

def _similarity(vision_proj, text_proj, temp, agg_method="mean"):
    """Cosine similarities / temp -> sim_v2t (Bv, Bt), float32 at least (float64 stays float64).

    vision_proj (Bv, D) or (Bv, K, D), text_proj (Bt, D). With K, every one of the K vision vectors is
    normalised on its own and the K similarities to each text are reduced by agg_method: "mean" (equal
    to the cosine with the mean of the unit vectors, not with the mean vector) or "max". This is the
    official get_sim; its sim_t2v is always sim_v2t transposed, so only one is returned."""
    if agg_method not in ("mean", "max"):
        raise ValueError(f"agg_method must be 'mean' or 'max', got {agg_method!r}")
    if text_proj.dim() != 2 or vision_proj.dim() not in (2, 3) or vision_proj.shape[-1] != text_proj.shape[-1]:
        raise ValueError(f"vision_proj must be (B, D) or (B, K, D) and text_proj (B, D) with the same D, got "
                         f"{tuple(vision_proj.shape)} and {tuple(text_proj.shape)}")
    dtype = torch.promote_types(torch.promote_types(vision_proj.dtype, text_proj.dtype), torch.float32)
    v = F.normalize(vision_proj.to(dtype), dim=-1)
    t = F.normalize(text_proj.to(dtype), dim=-1)
    if v.dim() == 2:
        return v @ t.T / temp                                              # (Bv, Bt)
    sim = torch.einsum("bkd,nd->bkn", v, t) / temp                         # (Bv, K, Bt)
    return sim.mean(1) if agg_method == "mean" else sim.amax(1)


def _same_id(n, idx, device):
    """(n, n) bool: True where rows i, j share a sample id (idx None: the diagonal only)."""
    if idx is None:
        return torch.eye(n, dtype=torch.bool, device=device)
    idx = idx.reshape(-1)
    if idx.shape[0] != n:
        raise ValueError(f"idx has {idx.shape[0]} entries for a batch of {n}")
    return idx[:, None] == idx[None, :]


def vtc_loss(vision_proj, text_proj, idx, temp, all_gather=True, agg_method="mean"):
    """Video-text contrastive loss over the global batch -> scalar (float32, float64 for float64 input).

    vision_proj (B, D) or (B, K, D) (reduced over K, see _similarity), text_proj (B, D), idx (B,) int
    sample ids or None (positives on the diagonal only), temp a scalar tensor or float.
    all_gather=True gathers vision_proj, text_proj and idx over the default process group when there is
    one (ivmini.dist.all_gather_with_grad: the backward keeps each rank's own slice, as the official
    AllGather). Then sim = cos(v, t) / temp over the gathered batch, targets = [id_i == id_j] with each
    row normalised to sum 1 (duplicate ids are all positives), and
        loss = (CE_soft(sim, targets) + CE_soft(sim.T, targets)) / 2
        CE_soft(s, y) = mean_i -sum_j y_ij log softmax(s_i)_j
    """
    if vision_proj.shape[0] != text_proj.shape[0]:
        raise ValueError(f"vision_proj has {vision_proj.shape[0]} rows and text_proj {text_proj.shape[0]}")
    if all_gather:
        vision_proj = dist.all_gather_with_grad(vision_proj)               # (world*B, [K,] D)
        text_proj = dist.all_gather_with_grad(text_proj)                   # (world*B, D)
        if idx is not None:
            idx = dist.all_gather_with_grad(idx.reshape(-1).contiguous())  # (world*B,)
    sim = _similarity(vision_proj, text_proj, temp, agg_method)            # (N, N) v2t
    with torch.no_grad():
        targets = _same_id(sim.shape[0], idx, sim.device).to(sim.dtype)
        targets = targets / targets.sum(1, keepdim=True)                   # symmetric: row i and column i agree
    v2t = -(F.log_softmax(sim, dim=1) * targets).sum(1).mean()
    t2v = -(F.log_softmax(sim.T, dim=1) * targets).sum(1).mean()
    return (v2t + t2v) / 2


def _draw_negatives(weights, what):
    """One index per row of the (B, B) non-negative weights with torch.multinomial (global RNG); a row
    with no admissible entry is an error (every sample in the batch shares that row's id)."""
    torch._assert_async(torch.all(weights.sum(1) > 0),
                        f"VTM: a sample has no {what} with another id in its batch to draw a negative from")
    return torch.multinomial(weights, 1)[:, 0]                             # (B,)


def vtm_loss(text_encoder_bert, itm_head, temp, vision_embeds, text_embeds, vision_proj, text_proj, text_atts,
             idx, hard_negatives=True, negatives=None):
    """Video-text matching on the local batch -> (loss, logits (3B, 2)).

    text_encoder_bert: the BertModel (fusion layers), called in mode="fusion"; itm_head Linear(H, 2);
    vision_embeds (B, Nv, C) media tokens (cross-attended in full, no mask); text_embeds (B, L, H) text
    hidden states after the text layers; vision_proj (B, [K,] D), text_proj (B, D) choose the negatives;
    text_atts (B, L) 0/1; idx (B,) sample ids or None (then only the diagonal is a positive).

    Negatives (no gradient): weights = softmax(cos/temp + 1e-4) per row, entries sharing the row's id set
    to 0, NaN -> 1e-2 (the official recipe; the + 1e-4 cancels in the softmax); hard_negatives draws one
    video per text from the text's row (vision_neg_idx) and one text per video from the video's row
    (text_neg_idx) with torch.multinomial; hard_negatives=False draws uniformly among the other ids.
    negatives=(vision_neg_idx, text_neg_idx) (B,) int64 replaces the draws. The 3B pairs are
        [ (video i, text i) | (video vision_neg_idx[i], text i) | (video i, text text_neg_idx[i]) ]
    with labels [1]*B + [0]*2B; loss = mean cross-entropy of itm_head on the fusion output's [CLS].
    """
    B = text_embeds.shape[0]
    if vision_embeds.shape[0] != B or text_atts.shape[:2] != text_embeds.shape[:2]:
        raise ValueError(f"vision_embeds {tuple(vision_embeds.shape)}, text_embeds {tuple(text_embeds.shape)} and "
                         f"text_atts {tuple(text_atts.shape)} must share the batch (and text length)")
    if negatives is None:
        with torch.no_grad():
            sim = _similarity(vision_proj, text_proj, temp)                # (B, B) v2t
            same = _same_id(B, idx, sim.device)
            if hard_negatives:
                w_v2t = torch.nan_to_num(F.softmax(sim + 1e-4, dim=1).masked_fill(same, 0), nan=1e-2,
                                         posinf=1e-2, neginf=1e-2)
                w_t2v = torch.nan_to_num(F.softmax(sim.T + 1e-4, dim=1).masked_fill(same, 0), nan=1e-2,
                                         posinf=1e-2, neginf=1e-2)
            else:
                w_v2t = w_t2v = (~same).to(sim.dtype)                       # uniform over the other ids
            vision_neg_idx = _draw_negatives(w_t2v, "video")               # text i -> a video
            text_neg_idx = _draw_negatives(w_v2t, "text")                  # video i -> a text
    else:
        vision_neg_idx, text_neg_idx = (torch.as_tensor(n, device=text_embeds.device).long() for n in negatives)
        if vision_neg_idx.shape != (B,) or text_neg_idx.shape != (B,):
            raise ValueError(f"negatives must be two (B,) = ({B},) index tensors, got "
                             f"{tuple(vision_neg_idx.shape)} and {tuple(text_neg_idx.shape)}")
    vision_all = torch.cat([vision_embeds, vision_embeds[vision_neg_idx], vision_embeds])   # (3B, Nv, C)
    text_all = torch.cat([text_embeds, text_embeds, text_embeds[text_neg_idx]])             # (3B, L, H)
    atts_all = torch.cat([text_atts, text_atts, text_atts[text_neg_idx]])                   # (3B, L)
    out = text_encoder_bert(encoder_embeds=text_all, attention_mask=atts_all, encoder_hidden_states=vision_all,
                            encoder_attention_mask=None, mode="fusion")
    logits = itm_head(out.last_hidden_state[:, 0])                                          # (3B, 2)
    labels = torch.zeros(3 * B, dtype=torch.long, device=logits.device)
    labels[:B] = 1
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels), logits


def mask_tokens(input_ids, vocab_size, mask_token_id, pad_token_id, cls_token_id, prob=0.5, generator=None):
    """BERT masking for MLM (official MLMLoss.mask) -> (masked_ids, labels), new tensors.

    input_ids (B, L) int64. Each token except [PAD] and [CLS] ([SEP] included) is chosen with probability
    `prob`; a chosen token becomes [MASK] with probability 0.8, else a uniform random id in [0, vocab_size)
    with probability 0.5, else stays (so 80 / 10 / 10). labels = the original id where chosen, -100
    elsewhere. Every draw comes from `generator` (torch's default generator when None), made on the
    generator's device (the input's when None) and moved to the input's device.
    """
    if input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"input_ids must be (B, L) integer ids, got {input_ids.dtype} {tuple(input_ids.shape)}")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be in [0, 1], got {prob}")
    device = generator.device if generator is not None else input_ids.device
    shape = tuple(input_ids.shape)

    def coin(p):                                                            # (B, L) bool, True with probability p
        return torch.bernoulli(torch.full(shape, p, device=device), generator=generator).bool().to(input_ids.device)

    chosen = coin(prob) & (input_ids != pad_token_id) & (input_ids != cls_token_id)
    replaced = coin(0.8) & chosen
    randomised = coin(0.5) & chosen & ~replaced
    random_ids = torch.randint(vocab_size, shape, device=device, generator=generator).to(input_ids.device)
    masked_ids = torch.where(replaced, torch.full_like(input_ids, mask_token_id), input_ids)
    masked_ids = torch.where(randomised, random_ids, masked_ids)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    return masked_ids, labels


def mlm_loss(mlm, masked_ids, attention_mask, labels, vision_embeds, vision_atts=None):
    """Masked language modelling conditioned on the media tokens -> scalar.

    mlm: ivmini.text.BertForMaskedLM. Pass 1 runs the text layers on the masked ids (mode="text"); pass
    2 runs the fusion layers from those hidden states with cross-attention to vision_embeds (B, Nv, C)
    (vision_atts (B, Nv) 0/1, None = all) and the MLM head; its loss is the mean cross-entropy over the
    positions whose label is not -100 (official MLMLoss.mlm_loss)."""
    text = mlm.bert(masked_ids, attention_mask, mode="text").last_hidden_state          # (B, L, H)
    out = mlm(encoder_embeds=text, attention_mask=attention_mask, encoder_hidden_states=vision_embeds,
              encoder_attention_mask=vision_atts, labels=labels, mode="fusion")
    return out.loss
