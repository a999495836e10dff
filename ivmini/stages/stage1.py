"""Stage 1 (paper §3.1; facts §2): unmasked-token distillation. Per batch of 16-frame clips:
    the multimodal teacher sees frames[::2] frame by frame -> last-K layer tokens, pooled output and
        the pool attention over each frame's patches
    the motion teacher sees all 16 frames (tubelet 2)      -> last-K layer tokens
    semantic masking: per frame keep N - int(0.8 N) patches drawn with probability ∝ that attention
        (CLS always kept), seeded per sample from (seed, epoch, sample index)
    the student sees the same 8 frames, visible tokens only; its decoders are compared with the
        teachers' tokens at the same positions: loss = clip_middle + clip_final + mae (each 2 - 2 cos)
"""
import logging

import torch

from ..checkpoint import build_teachers
from ..config import vision_config
from ..data.datasets import VideoDataset, read_stage1_list
from ..losses import gather_targets, stage1_distill_losses
from ..masking import num_visible, semantic_visible_idx
from ..vit import VideoViT, count_params
from . import common
from .common import Batches, data_paths, sample_seed

log = logging.getLogger("ivmini.stages")

optimizer_groups = common.optimizer_groups     # the stage hooks: the shared AdamW groups, one run
phases = common.one_phase


def list_dataset(cfg, num_frames):
    """The stage-1 list (default: the world's stage1_train.txt) as TSN-sampled clips of `num_frames` frames with
    the stage-1 transform; stage 1 and the S/B/L distillation read their data so."""
    path, root = data_paths(cfg, "stage1_train.txt")
    return VideoDataset(read_stage1_list(path), root, num_frames=num_frames,
                        size=cfg.task.img_size or vision_config(cfg.preset).img_size, transform="stage1",
                        sample="rand", seed=cfg.seed)


def dataset(cfg):
    # 2 x num_frames frames: the motion teacher takes all, the student and the multimodal teacher take
    # frames[::2] (official td_ratio = 2)
    return list_dataset(cfg, 2 * cfg.task.num_frames)


def sampler(dataset, cfg, rank, world):
    return Batches(len(dataset), cfg.batch_size, rank, world, seed=cfg.seed)


def build(cfg, device):
    t = cfg.task
    size = t.img_size or vision_config(cfg.preset).img_size
    mm, motion = build_teachers(t.teacher_multimodal, t.teacher_motion, multimodal_kind=t.teacher_multimodal_kind,
                                clip_return_layer=t.clip_return_layer, mae_return_layer=t.mae_return_layer,
                                img_size=size, motion_frames=2 * t.num_frames,
                                motion_attention=t.teacher_motion_attention, seed=cfg.seed + 1)
    student_cfg = vision_config(cfg.preset, heads="distill", num_frames=t.num_frames, img_size=size,
                                clip_teacher_embed_dim=mm.embed_dim, clip_teacher_final_dim=mm.pooled_dim,
                                clip_return_layer=t.clip_return_layer, mae_teacher_embed_dim=motion.embed_dim,
                                mae_return_layer=t.mae_return_layer)
    torch.manual_seed(cfg.seed)
    student = VideoViT(student_cfg)
    n = student.param_counts()
    log.info("student %s: %.2f M parameters = backbone %.2f M + distillation heads %.2f M; teachers: %s (%.1f M), "
             "%s (%.1f M)", cfg.preset, count_params(student) / 1e6, n["backbone"] / 1e6, n["heads"] / 1e6,
             type(mm).__name__, count_params(mm) / 1e6, type(motion).__name__, count_params(motion) / 1e6)
    return student.to(device), {"teacher_multimodal": mm.to(device), "teacher_motion": motion.to(device)}


def forward_loss(student, teachers, batch, cfg, epoch):
    t = cfg.task
    video = batch["video"].to(student.pos_embed.device, non_blocking=True)   # (B, 3, 2T, H, W), normalised
    frames = video[:, :, ::2]                                      # (B, 3, T, H, W): student + multimodal teacher
    mm = teachers["teacher_multimodal"](frames)                    # layers (K, B, 1+T*N, C), pooled, attn (B, T, N)
    motion = teachers["teacher_motion"](video)                     # (K, B, T*N, C)
    n = mm.attn.shape[-1]
    seeds = [sample_seed(cfg.seed, epoch, i) for i in batch["index"].tolist()]
    visible_idx = semantic_visible_idx(mm.attn.float(), num_visible(n, t.mask_ratio), seeds).to(video.device)
    out = student(frames, visible_idx=visible_idx)
    losses = stage1_distill_losses(
        out, gather_targets(mm.layers, visible_idx, with_cls=True), mm.pooled,
        gather_targets(motion, visible_idx, with_cls=False),
        weights=(t.loss_clip_middle, t.loss_clip_final, t.loss_mae))
    return losses["loss"], {k: float(v.detach()) for k, v in losses.items()}


def flops_per_clip(student, teachers, cfg):
    """Model FLOPs per clip, the usual 6 x params x tokens for the trained student (forward + backward)
    and 2 x params x tokens for the teachers (forward only); attention's N^2 terms left out."""
    t, n = cfg.task, student.cfg.grid ** 2
    visible = 1 + t.num_frames * num_visible(n, t.mask_ratio)
    return (6 * count_params(student) * visible + 2 * count_params(teachers["teacher_multimodal"]) * t.num_frames
            * (1 + n) + 2 * count_params(teachers["teacher_motion"]) * t.num_frames * n)

