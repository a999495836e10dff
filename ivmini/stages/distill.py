"""Distillation of the S/B/L students from a stage-2 video encoder (facts §2.6; official SM
scripts/distillation/*_dist_1B_stage2.sh, run_distill.py). Per batch of 8-frame clips:
    the teacher (the stage-2 vision encoder, frozen, eval mode; its decoders and clip position tables
        dropped, its position table resized to the student's frames and resolution) sees the whole clip ->
        blocks depth-1 - int(i * interval) for i < K (1B: K 6, interval 3.34 -> 23 26 29 33 36 39), its pooled
        output, and the pool attention over all T*N patches
    masking over the whole clip: num_visible(T*N, 0.8) patches drawn with probability ∝ that attention (CLS
        always kept), seeded per sample from (seed, epoch, sample index) as in stage 1
    the student (VideoViT heads="distill" with MLP clip decoders and no MAE branch) sees the visible tokens;
        its last K blocks go through the decoders to the teacher's width, its pooled output through the final
        decoder to the teacher's pool width: loss = middle + final, each 2 - 2 cos (stage 1's cosine_distill)
The student exports with `python -m ivmini.checkpoint export RUN OUT.pt` as load_official("stage1_pretrain")
(kwargs clip_decoder_mlp=True, mae_return_layer=0). Tests: tests/test_distill.py.
"""
import dataclasses
import json
import logging
import os

import torch

from ..checkpoint import official_config, read_state_dict, resize_pos_embeds, select_prefix
from ..checkpoint.state_dicts import check_keys
from ..config import VisionConfig, vision_config
from ..dist import consolidate, latest_checkpoint, read_meta
from ..losses import cosine_distill, gather_targets
from ..masking import clip_attention_visible_idx, num_visible
from ..teachers import Stage2Teacher
from ..vit import VideoViT, count_params
from . import common, stage1
from .common import sample_seed

log = logging.getLogger("ivmini.stages")

optimizer_groups = common.optimizer_groups     # the stage hooks: the shared AdamW groups, one run
phases = common.one_phase

STAGE2_RUNS = "runs/stage2"   # where teacher=auto looks (the stage-2 default --out)
# the stage-2 encoder's parts the teacher does not use (official: dropped when the teacher is built)
UNUSED = ("clip_decoder.", "final_clip_decoder.", "clip_pos_embed", "clip_img_pos_embed")


def _teacher_weights(src):
    """(the stage-2 vision encoder's weights (no prefix), its VisionConfig, its position table's frames, where)
    from a stage-2 run / checkpoint folder, an ivmini export (its .json beside it) or an official stage-2 file
    (no .json: the official 1B config, with image tables if the file has them)."""
    if os.path.isdir(src):
        path = latest_checkpoint(src) or latest_checkpoint(os.path.join(src, "checkpoints"))
        if path is None:
            raise FileNotFoundError(f"--teacher={src}: no complete checkpoint there")
        model_cfg = read_meta(path)["model_config"]
        if "vision" not in model_cfg:
            raise ValueError(f"--teacher={src}: {path} is not a stage-2 (video-text) checkpoint")
        sd = {k.removeprefix("vision_encoder."): v for k, v in consolidate(path).items()
              if k.startswith("vision_encoder.")}
        cfg = VisionConfig(**model_cfg["vision"])
        return sd, cfg, cfg.t_size, path
    sd = select_prefix(read_state_dict(src), "auto")                     # the vision_encoder.* sub-dict
    side = os.path.splitext(src)[0] + ".json"
    if os.path.isfile(side):
        with open(side) as f:
            info = json.load(f)
        if info["kind"] == "stage2":
            kw = dict(info["kwargs"]["vision"], mlp_act=info["kwargs"].get("mlp_act"))
        elif info["kind"] == "stage2_vision":
            kw = info["kwargs"]
        else:
            raise ValueError(f"--teacher={src}: {side} says kind {info['kind']!r}; the teacher is a stage-2 model "
                             "(kind stage2 or stage2_vision)")
    else:
        kw = dict(sep_image_video_pos_embed="img_pos_embed" in sd)
    cfg = official_config("stage2_vision", **kw)
    return sd, cfg, None, src


def build_teacher(src, num_frames, img_size, return_layers, return_interval, orig_t_size=0, seed=0):
    """The frozen Stage2Teacher of `src` at the student's frames and resolution; src "" = a small random one."""
    if not src:
        log.warning("SMOKE RUN: no stage-2 teacher given (and none under %s); using a small RANDOM frozen "
                    "stage-2 encoder. Pass --teacher=RUN_OR_FILE for a real distillation.", STAGE2_RUNS)
        torch.manual_seed(seed)
        cfg = vision_config("tiny", num_frames=num_frames, img_size=img_size, depth=3, embed_dim=96, num_heads=4,
                            clip_embed_dim=64)
        return Stage2Teacher(cfg, return_layers, return_interval), "random (smoke run)"
    sd, cfg, t_size, where = _teacher_weights(src)
    cfg = dataclasses.replace(cfg, num_frames=num_frames, img_size=img_size)
    sd = {k: v for k, v in sd.items() if not k.startswith(UNUSED)}
    sd = resize_pos_embeds(sd, cfg, orig_t_size or t_size)                # e.g. 4 -> 8 frames (official)
    with torch.device("meta"):
        teacher = Stage2Teacher(cfg, return_layers, return_interval)
    sd, _ = check_keys(teacher, sd)
    teacher.to_empty(device="cpu")
    teacher.load_state_dict(sd)
    return teacher, where


def dataset(cfg):
    return stage1.list_dataset(cfg, cfg.task.num_frames)     # the student and the teacher see the same frames


sampler = stage1.sampler


def build(cfg, device):
    t = cfg.task
    size = t.img_size or vision_config(cfg.preset).img_size
    src = t.teacher
    if src == "auto":
        src = STAGE2_RUNS if latest_checkpoint(os.path.join(STAGE2_RUNS, "checkpoints")) else ""
    teacher, where = build_teacher(src, t.num_frames, size, t.return_layer, t.teacher_interval,
                                   orig_t_size=t.teacher_t_size, seed=cfg.seed + 1)
    student_cfg = vision_config(cfg.preset, heads="distill", num_frames=t.num_frames, img_size=size,
                                clip_teacher_embed_dim=teacher.embed_dim, clip_teacher_final_dim=teacher.pooled_dim,
                                clip_return_layer=t.return_layer, clip_decoder_mlp=True, mae_return_layer=0)
    if t.return_layer > student_cfg.depth:
        raise ValueError(f"--return-layer={t.return_layer} exceeds the {cfg.preset} student's {student_cfg.depth} "
                         "blocks")
    torch.manual_seed(cfg.seed)
    student = VideoViT(student_cfg)
    n = student.param_counts()
    log.info("student %s: %.2f M parameters = backbone %.2f M + decoders %.2f M; teacher %s (%.1f M, %d blocks, "
             "targets from blocks %s)", cfg.preset, count_params(student) / 1e6, n["backbone"] / 1e6,
             n["heads"] / 1e6, where, count_params(teacher) / 1e6, teacher.cfg.depth, list(teacher.return_index))
    return student.to(device), {"teacher": teacher.to(device)}


def forward_loss(student, frozen, batch, cfg, epoch):
    t = cfg.task
    video = batch["video"].to(student.pos_embed.device, non_blocking=True)   # (B, 3, T, H, W), normalised
    target = frozen["teacher"](video)                  # layers (K, B, 1+T*N, C), pooled (B, D), attn (B, T*N)
    seeds = [sample_seed(cfg.seed, epoch, i) for i in batch["index"].tolist()]
    keep = num_visible(target.attn.shape[-1], t.mask_ratio)                # over the whole clip (410 of 2048)
    visible_idx = clip_attention_visible_idx(target.attn.float(), keep, seeds).to(video.device)
    out = student(video, visible_idx=visible_idx)
    terms = {"middle": cosine_distill(out.clip_align, gather_targets(target.layers, visible_idx, with_cls=True)),
             "final": cosine_distill(out.final_align, target.pooled)}
    loss = t.loss_middle * terms["middle"] + t.loss_final * terms["final"]
    return loss, {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in terms.items()}}


def flops_per_clip(student, frozen, cfg):
    """Model FLOPs per clip: 6 x params x visible tokens for the student (forward + backward), 2 x params x
    tokens for the teacher (forward only); attention's N^2 terms left out."""
    t, n = cfg.task, student.cfg.num_patches
    return 6 * count_params(student) * (1 + num_visible(n, t.mask_ratio)) + 2 * count_params(frozen["teacher"]) * (1 + n)
