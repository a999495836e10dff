"""Stage 2 (paper §3.2; facts §3): video-text alignment. Per batch of one media type (video or image):
    captions -> WordPiece ids ([CLS] ... [SEP], padded to max_txt_l; longer captions truncated and counted)
    phase "masked": random masking per sample (video 0.8, image 0.5 of the patches; CLS kept), seeded from
        (seed, epoch, sample index); phase "unmasked": every token, the vision tower frozen
    the model (ivmini/align.py) returns the weighted VTC + VTM + MLM losses; VTC over the global batch
The vision tower starts from a stage-1 run or export (position tables resized to 4 frames), the text tower
from a HF BERT directory (all-MiniLM-L6-v2 by default) with fresh cross-attention in its fusion layers.

audio=true (the official 6B audio-visual model, ivmini/align_av.py): videos become audio-video samples (their
first audio stream, 10 s at most, as the 998 x 64 BEATs features; a video without one gets silence and counts
under "no_audio"), the BEATs tower is tiny and trained from random init, or audio_model= an official beats.pth
(freeze_audio=true as official), and each loss reads the caption key loss_caption gives it; image batches run
VTC / VTM / MLM only.
"""
import functools
import json
import logging
import os

import torch

from ..align import AlignConfig, VideoTextModel, stage2_visible_idx
from ..align_av import TEXT_LOSSES, AudioVisualConfig, AudioVisualModel
from ..audio import BEATS_PRESETS
from ..checkpoint import check_keys, init_vision_from_stage1, load_official, read_state_dict, stage2_from_official
from ..config import vision_config
from ..data.datasets import VideoDataset, read_stage2_json
from ..data.sampling import MediaBatchSampler
from ..dist import consolidate, latest_checkpoint
from ..text import WordPieceTokenizer, load_hf_bert, minilm_path
from ..vit import count_params
from . import common
from .common import data_paths, sample_seed

log = logging.getLogger("ivmini.stages")

optimizer_groups = common.optimizer_groups     # the stage hooks: the shared AdamW groups, one run
phases = common.one_phase

STAGE1_RUNS = "runs/stage1"   # where vision_init=auto looks (the stage-1 default --out)


def dataset(cfg):
    t = cfg.task
    path, root = data_paths(cfg, "stage2_train.json")
    # no flips on the synthetic world: its captions say left and right
    return VideoDataset(read_stage2_json(path), root, num_frames=t.num_frames,
                        size=t.img_size or vision_config(cfg.preset).img_size, transform="stage2", sample="rand",
                        flip=bool(cfg.data), seed=cfg.seed, audio=t.audio)


def sampler(dataset, cfg, rank, world):
    """Batches of one media type each, in an order every rank shares (official MetaLoader)."""
    return MediaBatchSampler([r.media for r in dataset.records], cfg.batch_size, rank, world, seed=cfg.seed,
                             accum=cfg.accum)   # the micro-batches of one step share a media type


def text_dir(cfg):
    return cfg.task.text_model or minilm_path()


def _bert_width(directory):
    """hidden_size of the HF BERT in `directory` (its config.json): the default width of the audio-visual memories."""
    with open(os.path.join(directory, "config.json")) as f:
        return json.load(f)["hidden_size"]


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
    # the fusion layers cross-attend to the vision tokens, or with audio to the av_concat_dim memories
    width = (t.av_concat_dim or _bert_width(text_dir(cfg))) if t.audio else vision.embed_dim
    text = load_hf_bert(text_dir(cfg), fusion_layer=t.fusion_layer, encoder_width=width, mlm=True)
    text.cfg.gradient_checkpointing = t.text_ckpt
    tok = tokenizer(text_dir(cfg))
    shared = dict(vision=vision, bert=text.cfg, embed_dim=t.embed_dim, temp=t.temp, loss_vtc=t.loss_vtc,
                  loss_vtm=t.loss_vtm, loss_mlm=t.loss_mlm, mlm_prob=t.mlm_prob,
                  vtm_hard_negatives=t.vtm_hard_negatives, video_mask_ratio=t.mask_ratio_video,
                  image_mask_ratio=t.mask_ratio_image, cls_token_id=tok.cls_token_id,
                  mask_token_id=tok.mask_token_id, text_pool=t.text_pool)
    torch.manual_seed(cfg.seed)
    if t.audio:
        beats = load_official("beats", t.audio_model) if t.audio_model else None
        if beats is not None and not t.freeze_audio and (beats.cfg.attention_dropout or beats.cfg.activation_dropout):
            raise ValueError(f"--audio-model={t.audio_model}: its cfg has attention_dropout "
                             f"{beats.cfg.attention_dropout} / activation_dropout {beats.cfg.activation_dropout}, "
                             f"which ivmini's BEATs does not implement; train it frozen (--set freeze_audio=true, "
                             f"as the official recipe does)")
        captions = t.captions_of_losses()
        acfg = AudioVisualConfig(**shared, audio=beats.cfg if beats else BEATS_PRESETS["tiny"], av_concat_dim=width,
                                 freeze_audio=t.freeze_audio,
                                 loss_caption={k: v for k, v in captions.items() if k in TEXT_LOSSES},
                                 **{f"loss_{n}": getattr(t, f"loss_{n}") for n in
                                    ("avtc", "avtm", "avmlm", "atc", "avc", "atm", "amlm")})
        model = AudioVisualModel(acfg, text_encoder=text).train()
        if beats is not None and model.audio_encoder is not None:
            model.audio_encoder.load_state_dict(beats.state_dict())
            if t.freeze_audio:              # load_state_dict keeps requires_grad; the model froze it already
                model.audio_encoder.requires_grad_(False)
    else:
        acfg = AlignConfig(**shared)
        model = VideoTextModel(acfg, text_encoder=text).train()
    if t.init:                                # strict: another architecture is an error naming the keys
        if official and t.audio:
            raise ValueError(f"--init={t.init}: starting an audio-visual run from an official stage-2 file is not "
                             f"supported; pass an ivmini stage-2 run folder")
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
    if t.audio:
        log.info("stage 2: audio BEATs %s (%.2f M, %s), memories of width %d, losses %s", t.audio_model or
                 "tiny from random init", count_params(model.audio_encoder) / 1e6 if model.audio_encoder else 0,
                 "frozen" if t.freeze_audio else "trained", width,
                 ", ".join(f"{n} on {acfg.loss_caption.get(n, '-')}" for n in ("vtc", "vtm", "mlm", "avtc", "avtm",
                           "avmlm", "atc", "avc", "atm", "amlm") if getattr(acfg, f"loss_{n}")))
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
    if not t.audio:
        losses = model.losses(video, tokens["input_ids"].to(device), tokens["attention_mask"].to(device),
                              batch["index"].to(device), mask=visible_idx)
        values = {k: float(v.detach()) for k, v in losses.items()}
        values["truncated"] = float(tokens["truncated"].sum())
        return losses["loss"], values
    audio = batch["audio"].to(device) if "audio" in batch else None     # (B, 998, 64); absent for images
    texts, truncated = {}, float(tokens["truncated"].sum())
    captions = batch.get("captions", {})
    for key in sorted(set(model.cfg.caption_keys()) - {"caption"}):
        if audio is None:
            break                                                 # images: only the vision losses run
        if key not in captions:
            raise KeyError(f"loss_caption needs the caption key {key!r}, but these samples have only "
                           f"{sorted(captions)} (e.g. {batch['path'][0]})")
        enc = tokenizer(text_dir(cfg))(captions[key], padding="max_length", max_length=t.max_txt_l)
        texts[key] = (enc["input_ids"].to(device), enc["attention_mask"].to(device))
        truncated += float(enc["truncated"].sum())
    texts["caption"] = (tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
    losses = model.losses(video, audio, texts, batch["index"].to(device), mask=visible_idx)
    cfg_m = model.cfg
    values = {k: float(v.detach()) for k, v in losses.items()
              if k in ("loss", "temp") or getattr(cfg_m, f"loss_{k}", 0)}
    values["truncated"] = truncated
    values["no_audio"] = float((~batch["has_audio"]).sum()) if "has_audio" in batch else 0.0
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
    text_passes = 4 * (1 + (len(model.cfg.caption_keys()) - 1 if t.audio else 0))    # per caption key read
    audio = 0
    if t.audio and model.audio_encoder is not None:       # 998 fbank frames -> 62 x 4 tokens
        audio = (2 if t.freeze_audio else 6) * count_params(model.audio_encoder) * (998 // 16) * 4
    return vision + audio + 6 * count_params(model.text_encoder) * t.max_txt_l * text_passes
