"""What differs between the training stages: the models, the data and the loss.

train.py calls, for STAGES[cfg.stage]:
    dataset(cfg) -> torch Dataset            (the synthetic world when cfg.data is empty)
    build(cfg, device) -> {"student": trained module, other name: frozen module, ...}
    forward_loss(models, batch, cfg, epoch, device) -> (loss tensor, {name: float} for logging)

Stage 1 (paper §3.1; facts §2): unmasked-token distillation. Per batch of 16-frame clips:
    the multimodal teacher sees frames[::2] frame by frame -> last-K layer tokens, pooled output and
        the pool attention over each frame's patches
    the motion teacher sees all 16 frames (tubelet 2)      -> last-K layer tokens
    semantic masking: per frame keep N - int(0.8 N) patches drawn with probability ∝ that attention
        (CLS always kept), seeded per sample from (seed, epoch, sample index)
    the student sees the same 8 frames, visible tokens only; its decoders are compared with the
        teachers' tokens at the same positions: loss = clip_middle + clip_final + mae (each 2 - 2 cos)
"""
import logging
import os
from types import SimpleNamespace

import numpy as np
import torch

from .config import vision_config
from .data import synthetic
from .data.datasets import VideoDataset, read_stage1_list
from .losses import gather_targets, stage1_distill_losses
from .masking import num_visible, semantic_visible_idx
from .teachers import build_teachers
from .vit import VideoViT

log = logging.getLogger("ivmini.stages")


def sample_seed(seed, epoch, index):
    """A per-sample seed that does not depend on the rank, the worker or the batch composition."""
    return int(np.random.SeedSequence([seed, epoch, int(index), 1]).generate_state(1)[0])


def _data_paths(cfg):
    """(annotation file, root of its paths): cfg.data, or the synthetic world's stage-1 train list."""
    if cfg.data:
        return cfg.data, cfg.data_root or os.path.dirname(os.path.abspath(cfg.data))
    world = synthetic.ensure_world()
    return os.path.join(world, "annotations", "stage1_train.txt"), world


def stage1_dataset(cfg):
    path, root = _data_paths(cfg)
    size = cfg.img_size or vision_config(cfg.preset).img_size
    # 2 x num_frames frames, TSN-sampled: the motion teacher takes all, the student and the
    # multimodal teacher take frames[::2] (official td_ratio = 2)
    return VideoDataset(read_stage1_list(path), root, num_frames=2 * cfg.num_frames, size=size, transform="stage1",
                        sample="rand", seed=cfg.seed)


def stage1_build(cfg, device):
    size = cfg.img_size or vision_config(cfg.preset).img_size
    torch.manual_seed(cfg.seed)
    mm, motion = build_teachers(cfg.teacher_multimodal, cfg.teacher_motion, multimodal_kind=cfg.teacher_multimodal_kind,
                                clip_return_layer=cfg.clip_return_layer, mae_return_layer=cfg.mae_return_layer,
                                img_size=size, motion_frames=2 * cfg.num_frames, seed=cfg.seed + 1)
    big = cfg.preset in ("1B", "6B")
    student_cfg = vision_config(cfg.preset, heads="distill", num_frames=cfg.num_frames, img_size=size,
                                clip_teacher_embed_dim=mm.embed_dim, clip_teacher_final_dim=mm.pooled_dim,
                                clip_return_layer=cfg.clip_return_layer, mae_teacher_embed_dim=motion.embed_dim,
                                mae_return_layer=cfg.mae_return_layer,
                                checkpoint_num=vision_config(cfg.preset).depth if big else 0)
    torch.manual_seed(cfg.seed)
    student = VideoViT(student_cfg)
    log.info("student %s: %.2f M parameters; teachers: %s (%.1f M), %s (%.1f M)", cfg.preset,
             sum(p.numel() for p in student.parameters()) / 1e6, type(mm).__name__,
             sum(p.numel() for p in mm.parameters()) / 1e6, type(motion).__name__,
             sum(p.numel() for p in motion.parameters()) / 1e6)
    return {"student": student.to(device), "teacher_multimodal": mm.to(device), "teacher_motion": motion.to(device)}


def stage1_forward_loss(models, batch, cfg, epoch, device):
    video = batch["video"].to(device, non_blocking=True)          # (B, 3, 2T, H, W), normalised
    frames = video[:, :, ::2]                                      # (B, 3, T, H, W): student + multimodal teacher
    mm = models["teacher_multimodal"](frames)                      # layers (K, B, 1+T*N, C), pooled, attn (B, T, N)
    motion = models["teacher_motion"](video)                       # (K, B, T*N, C)
    n = mm.attn.shape[-1]
    seeds = [sample_seed(cfg.seed, epoch, i) for i in batch["index"].tolist()]
    visible_idx = semantic_visible_idx(mm.attn.float(), num_visible(n, cfg.mask_ratio), seeds).to(device)
    out = models["student"](frames, visible_idx=visible_idx)
    losses = stage1_distill_losses(
        out, gather_targets(mm.layers, visible_idx, with_cls=True), mm.pooled,
        gather_targets(motion, visible_idx, with_cls=False),
        weights=(cfg.loss_clip_middle, cfg.loss_clip_final, cfg.loss_mae))
    return losses["loss"], {k: float(v.detach()) for k, v in losses.items()}


def stage1_flops_per_clip(models, cfg):
    """Model FLOPs per clip, the usual 6 x params x tokens for the trained student (forward + backward)
    and 2 x params x tokens for the teachers (forward only); attention's N^2 terms left out."""
    student, mm, motion = models["student"].cfg, models["teacher_multimodal"], models["teacher_motion"]
    n = student.grid ** 2
    visible = 1 + cfg.num_frames * num_visible(n, cfg.mask_ratio)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731  (global sizes, also when sharded)
    return (6 * count(models["student"]) * visible + 2 * count(mm) * cfg.num_frames * (1 + n)
            + 2 * count(motion) * cfg.num_frames * n)


STAGES = {1: SimpleNamespace(dataset=stage1_dataset, build=stage1_build, forward_loss=stage1_forward_loss,
                             flops_per_clip=stage1_flops_per_clip)}
