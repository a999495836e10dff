"""Stage 2 (paper §3.2; facts §3): video-text alignment. Per batch of one media type (video or image):
    captions -> WordPiece ids ([CLS] ... [SEP], padded to max_txt_l; longer captions truncated and counted)
    phase "masked": random masking per sample (video 0.8, image 0.5 of the patches; CLS kept), seeded from
        (seed, epoch, sample index); phase "unmasked": every token, the vision tower frozen
    the model (ivmini/align.py) returns the weighted VTC + VTM + MLM losses; VTC over the global batch
The vision tower starts from a stage-1 run or export (position tables resized to 4 frames), the text tower
from a HF BERT directory (all-MiniLM-L6-v2 by default) with fresh cross-attention in its fusion layers.
"""
import functools
import logging
import os

import torch

from ..align import AlignConfig, VideoTextModel, stage2_visible_idx
from ..checkpoint import check_keys, init_vision_from_stage1, read_state_dict, stage2_from_official
from ..config import vision_config
from ..data.datasets import VideoDataset, read_stage2_json
from ..data.sampling import MediaBatchSampler
from ..dist import consolidate, latest_checkpoint
from ..text import WordPieceTokenizer, load_hf_bert, minilm_path
from ..vit import count_params
from . import common
from .common import data_paths, sample_seed

log = logging.getLogger("ivmini.stages")

optimizer_groups = common.optimizer_groups     # the stage hook: the shared AdamW groups

STAGE1_RUNS = "runs/stage1"   # where vision_init=auto looks (the stage-1 default --out)


def dataset(cfg):
    t = cfg.task
    path, root = data_paths(cfg, "stage2_train.json")
    # no flips on the synthetic world: its captions say left and right
    return VideoDataset(read_stage2_json(path), root, num_frames=t.num_frames,
                        size=t.img_size or vision_config(cfg.preset).img_size, transform="stage2", sample="rand",
                        flip=bool(cfg.data), seed=cfg.seed)


def sampler(dataset, cfg, rank, world):
    """Batches of one media type each, in an order every rank shares (official MetaLoader)."""
    return MediaBatchSampler([r.media for r in dataset.records], cfg.batch_size, rank, world, seed=cfg.seed,
                             accum=cfg.accum)   # the micro-batches of one step share a media type


def text_dir(cfg):
    return cfg.task.text_model or minilm_path()


@functools.lru_cache(maxsize=4)
def tokenizer(directory):
    return WordPieceTokenizer(os.path.join(directory, "vocab.txt"), lowercase=True)


def _stage1_state(vision_init):
    """(the stage-1 state dict to start from or None, how the log says it) for task.vision_init."""
    if vision_init == "":
        return None, "from scratch (vision_init is empty)"
    if vision_init == "auto" or os.path.isdir(vision_init):
        folder = STAGE1_RUNS if vision_init == "auto" else vision_init
        path = latest_checkpoint(folder) or latest_checkpoint(os.path.join(folder, "checkpoints"))
        if path is None:
            if vision_init == "auto":
                return None, f"from scratch (no stage-1 checkpoint under {STAGE1_RUNS})"
            raise FileNotFoundError(f"--vision-init={vision_init}: no complete checkpoint there")
        return consolidate(path), f"from the stage-1 checkpoint {path}"
    return read_state_dict(vision_init), f"from {vision_init}"


def _stage2_state(src):
    """(the weights of a stage-2 run / checkpoint folder (ivmini names) or export (the official stage-2 layout),
    where, whether they are in the official layout) for task.init."""
    if not os.path.isdir(src):
        return read_state_dict(src), src, True
    path = latest_checkpoint(src) or latest_checkpoint(os.path.join(src, "checkpoints"))
    if path is None:
        raise FileNotFoundError(f"--init={src}: no complete checkpoint there")
    return consolidate(path), path, False


def _decoder_sizes(sd, width):
    """The stage-1 clip-decoder sizes a stage-1 state dict holds (the stage-2 encoder keeps those heads, unused,
    so that its checkpoints have the official layout); without one, the smallest heads: one layer of `width`."""
    if sd is None:
        return dict(clip_teacher_embed_dim=width, clip_teacher_final_dim=width, clip_return_layer=1)
    layers = {k.split(".")[1] for k in sd if k.startswith("clip_decoder.")}
    final = sd.get("final_clip_decoder.head.weight")
    return dict(clip_teacher_embed_dim=sd["clip_decoder.0.head.weight"].shape[0], clip_return_layer=len(layers),
                clip_teacher_final_dim=0 if final is None else final.shape[0])


def build(cfg, device):
    t = cfg.task
    size = t.img_size or vision_config(cfg.preset).img_size
    if t.init:                                # every tower from a stage-2 run (e.g. the unmasked phase)
        stage2, where, official = _stage2_state(t.init)
        stage1, how = None, f"from the stage-2 weights {where}"
        vision_sd = {k.removeprefix("vision_encoder."): v for k, v in stage2.items()}
    else:
        stage1, how = _stage1_state(t.vision_init)
        vision_sd = stage1
    vision = vision_config(cfg.preset, heads="align", num_frames=t.num_frames, img_size=size,
                           sep_image_video_pos_embed=True,
                           **_decoder_sizes(vision_sd, vision_config(cfg.preset).embed_dim))
    text = load_hf_bert(text_dir(cfg), fusion_layer=t.fusion_layer, encoder_width=vision.embed_dim, mlm=True)
    text.cfg.gradient_checkpointing = t.text_ckpt
    tok = tokenizer(text_dir(cfg))
    acfg = AlignConfig(vision=vision, bert=text.cfg, embed_dim=t.embed_dim, temp=t.temp, loss_vtc=t.loss_vtc,
                       loss_vtm=t.loss_vtm, loss_mlm=t.loss_mlm, mlm_prob=t.mlm_prob,
                       vtm_hard_negatives=t.vtm_hard_negatives, video_mask_ratio=t.mask_ratio_video,
                       image_mask_ratio=t.mask_ratio_image, cls_token_id=tok.cls_token_id,
                       mask_token_id=tok.mask_token_id, text_pool=t.text_pool)
    torch.manual_seed(cfg.seed)
    model = VideoTextModel(acfg, text_encoder=text).train()
    if t.init:                                # strict: another architecture is an error naming the keys
        sd, _ = check_keys(model, stage2_from_official(stage2, acfg) if official else stage2)
        model.load_state_dict(sd)
    elif stage1 is not None:
        init_vision_from_stage1(model, stage1)
    if t.phase == "unmasked":                 # post-pretraining: only the text side and the heads learn
        model.vision_encoder.requires_grad_(False)
    log.info("stage 2: vision %s %s (%.2f M, %s), text %s (%.2f M, %d text + %d fusion layers)", cfg.preset, how,
             count_params(model.vision_encoder) / 1e6, "frozen" if t.phase == "unmasked" else "trained",
             text_dir(cfg), count_params(model.text_encoder) / 1e6, t.fusion_layer,
             text.cfg.num_hidden_layers - t.fusion_layer)
    return model.to(device), {}


def forward_loss(model, frozen, batch, cfg, epoch):
    t = cfg.task
    device = next(model.parameters()).device
    video = batch["video"].to(device, non_blocking=True)      # (B, 3, T, H, W) normalised; T = 1: images
    tokens = tokenizer(text_dir(cfg))(batch["caption"], padding="max_length", max_length=t.max_txt_l)
    visible_idx = None
    if t.phase == "masked":                                   # (B, 1 + Nvis), CLS first
        seeds = [sample_seed(cfg.seed, epoch, i) for i in batch["index"].tolist()]
        visible_idx = stage2_visible_idx(model.cfg, video.shape[0], video.shape[2] == 1, seeds, device)
    losses = model.losses(video, tokens["input_ids"].to(device), tokens["attention_mask"].to(device),
                          batch["index"].to(device), mask=visible_idx)
    values = {k: float(v.detach()) for k, v in losses.items()}
    values["truncated"] = float(tokens["truncated"].sum())
    return losses["loss"], values


def flops_per_clip(model, frozen, cfg):
    """Model FLOPs per clip, 6 x params x tokens (forward + backward) of the trained towers: the vision tower on
    its visible tokens, the text tower on max_txt_l tokens about four times (the VTC text pass, the MLM pass and
    the three VTM pairs through the fusion layers); attention's N^2 terms left out."""
    t, v = cfg.task, model.cfg.vision
    n = v.num_patches
    visible = 1 + (n - int(t.mask_ratio_video * n) if t.phase == "masked" else n)
    vision = 6 * count_params(model.vision_encoder) * visible if t.phase == "masked" else \
        2 * count_params(model.vision_encoder) * visible
    return vision + 6 * count_params(model.text_encoder) * t.max_txt_l * 4
