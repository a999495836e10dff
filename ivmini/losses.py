"""Stage-1 distillation losses (paper §3.1; facts §2.4; official SM engines/engine_for_pretraining.py L127-141).

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

import kernels


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
