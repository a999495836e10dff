"""Fine-tuning and probing (facts §2.7, §6): a video encoder with a classification head on a Kinetics-style CSV
("path,label"; default the synthetic world's classify_train.csv), through the one training loop:

    torchrun --nproc_per_node=2 train.py --stage finetune [--data TRAIN.csv --data-root DIR] [--init RUN|FILE]
        [--head full|linear|attentive]

Model: VideoViT with heads="classify" (official `InternVideo2`): blocks -> attention pool (B, clip_embed_dim)
-> fc_norm -> head (B, num_classes). The backbone comes from --init (a stage-1 or stage-2 run, an export, an
official file; its position tables resized to this run's frames), loaded strictly; heads the fine-tune model
does not have (distillation decoders, the text tower) are dropped by name and logged; fc_norm and head are fresh.
    head=full       every parameter trained, layer-wise lr decay: group lr x decay^(depth + 1 - layer id),
                    layer id 0 = patch embed / CLS / position table, i + 1 = block i, depth + 1 = pool and head
    head=linear     frozen encoder (attention pool included): fc_norm + head on the pooled feature
    head=attentive  frozen blocks; a fresh attention pool + fc_norm + head on the last block's tokens
                    (the official attentive probe, which retrains the pool: --open_clip_projector)
Frozen parts have requires_grad False inside the one trained module; the probes run without drop path.
Loss: cross-entropy with label smoothing (optionally on mixup / cutmix targets); logged: loss, top1 (%, batch).
Evaluation: python eval.py classify --ckpt runs/finetune --finetuned (multi-view, ivmini/classify.py).
Tests: tests/test_finetune.py.
"""
import json
import logging
import os

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoint import check_keys, read_state_dict, rename_hf_layerscale, resize_pos_embeds, select_prefix
from ..config import vision_config
from ..data.datasets import VideoDataset, read_classify_csv
from ..dist import consolidate, latest_checkpoint
from ..vit import VideoViT, count_params
from .common import Batches, data_paths, one_phase, param_groups, sample_seed

log = logging.getLogger("ivmini.stages")

AUTO_INIT = ("runs/stage2", "runs/stage1")   # where init=auto looks, in this order (the stages' default --out)
phases = one_phase                            # the stage hook: one run
TRAINED = {"full": None, "linear": ("fc_norm", "head"), "attentive": ("clip_projector", "fc_norm", "head")}


def dataset(cfg):
    t = cfg.task
    path, root = data_paths(cfg, "classify_train.csv")
    # RandomResizedCrop (scale 0.5-1); no flips on the synthetic world: its classes say left and right
    return VideoDataset(read_classify_csv(path), root, num_frames=t.num_frames,
                        size=t.img_size or vision_config(cfg.preset).img_size, transform="stage2", sample="rand",
                        flip=bool(cfg.data), seed=cfg.seed)


def sampler(dataset, cfg, rank, world):
    return Batches(len(dataset), cfg.batch_size, rank, world, seed=cfg.seed)


def num_classes(cfg):
    """task.num_classes, else the classes.json beside the CSV (the synthetic world), else the max label + 1."""
    if cfg.task.num_classes:
        return cfg.task.num_classes
    path, _ = data_paths(cfg, "classify_train.csv")
    names = os.path.join(os.path.dirname(os.path.abspath(path)), "classes.json")
    if os.path.isfile(names):
        with open(names) as f:
            return len(json.load(f))
    return 1 + max(r.label for r in read_classify_csv(path))


def _init_state(init):
    """(a state dict in the official stage-1 names or None, how the log says it) for task.init."""
    if init == "":
        return None, "from scratch (init is empty)"
    if init == "auto" or os.path.isdir(init):
        folders = AUTO_INIT if init == "auto" else (init,)
        for folder in folders:
            path = latest_checkpoint(folder) or latest_checkpoint(os.path.join(folder, "checkpoints"))
            if path is not None:
                return consolidate(path), f"from the checkpoint {path}"
        if init == "auto":
            return None, f"from scratch (no checkpoint under {' or '.join(AUTO_INIT)})"
        raise FileNotFoundError(f"--init={init}: no complete checkpoint there")
    return read_state_dict(init), f"from {init}"


def backbone_state(sd, model, orig_t_size=None, fresh=()):
    """A stage-1 / stage-2 / fine-tune state dict -> (the keys `model` loads, the names dropped): the vision
    encoder's keys (a stage-2 model's are under vision_encoder.), the heads the fine-tune model lacks dropped by
    name, position tables resized; the backbone must then match `model` exactly (else a KeyError naming keys).
    fresh: top-level names kept at their initialisation (always fc_norm and head)."""
    sd = rename_hf_layerscale(select_prefix(sd))
    own = {k.split(".")[0] for k in model.state_dict()}
    keep = own - {"fc_norm", "head", *fresh}
    dropped = sorted({k.split(".")[0] for k in sd} - keep)
    sd = resize_pos_embeds({k: v for k, v in sd.items() if k.split(".")[0] in keep}, model.cfg, orig_t_size)
    sd, _ = check_keys(model, sd, ignore=[f"{name}.*" for name in own - keep])
    return sd, dropped


def layer_id(name, depth):
    """Official get_num_layer_for_vit: 0 for the patch embedding, CLS and position table, i + 1 for block i,
    depth + 1 for everything after the blocks (pool, fc_norm, head)."""
    top = name.split(".")[0]
    if top in ("patch_embed", "cls_token", "pos_embed", "img_pos_embed"):
        return 0
    if top == "blocks":
        return int(name.split(".")[1]) + 1
    return depth + 1


def optimizer_groups(model, cfg):
    """AdamW groups: the weight-decay rules x one lr scale per depth, decay^(depth + 1 - layer id)."""
    depth, decay = model.cfg.depth, cfg.task.layer_decay
    return param_groups(model, cfg.weight_decay, lr_scale=lambda name: decay ** (depth + 1 - layer_id(name, depth)))


def build(cfg, device):
    t = cfg.task
    size = t.img_size or vision_config(cfg.preset).img_size
    drop_path = 0.0 if t.head != "full" else (vision_config(cfg.preset).drop_path_rate if t.drop_path < 0
                                              else t.drop_path)
    vcfg = vision_config(cfg.preset, heads="classify", num_frames=t.num_frames, img_size=size,
                         num_classes=num_classes(cfg), drop_path_rate=drop_path)
    torch.manual_seed(cfg.seed)
    model = VideoViT(vcfg)
    sd, how = _init_state(t.init)
    if sd is not None:
        sd, dropped = backbone_state(sd, model, t.orig_t_size or None,
                                     fresh=("clip_projector",) if t.head == "attentive" else ())
        model.load_state_dict(sd, strict=False)       # strict above: every backbone key present, no other
        log.info("fine-tune: backbone loaded %s; dropped (not in the fine-tune model, or fresh here): %s", how,
                 ", ".join(dropped) or "nothing")
    else:
        log.info("fine-tune: backbone %s", how)
    if TRAINED[t.head] is not None:               # a probe: only the named parts learn
        model.requires_grad_(False)
        for name in TRAINED[t.head]:
            getattr(model, name).requires_grad_(True)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("fine-tune %s, head=%s: %d classes, %d frames at %d px, %.2f M parameters (%.3f M trained), "
             "drop path %.2f, layer decay %s", cfg.preset, t.head, vcfg.num_classes, t.num_frames, size,
             count_params(model) / 1e6, trained / 1e6, drop_path, t.layer_decay if t.head == "full" else "off")
    return model.to(device), {}


def mix(video, labels, n_classes, cfg, seed):
    """Mixup / cutmix of a batch with its reverse (timm's batch mode), the targets smoothed one-hot mixed alike;
    one of the two per batch when both are on. -> (video, soft targets (B, n_classes))."""
    t = cfg.task
    rng = np.random.default_rng(seed)
    smooth = F.one_hot(labels, n_classes).float() * (1 - t.label_smoothing) + t.label_smoothing / n_classes
    use_cutmix = t.cutmix > 0 and (t.mixup == 0 or rng.random() < 0.5)
    lam = float(rng.beta(t.cutmix, t.cutmix) if use_cutmix else rng.beta(t.mixup, t.mixup))
    if use_cutmix:                                # one box for every frame; lam = the share left unboxed
        H, W = video.shape[-2:]
        cut_h, cut_w = int(H * (1 - lam) ** 0.5), int(W * (1 - lam) ** 0.5)
        cy, cx = int(rng.integers(H)), int(rng.integers(W))
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, H)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, W)
        video = video.clone()
        video[..., y0:y1, x0:x1] = video.flip(0)[..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)
    else:
        video = lam * video + (1 - lam) * video.flip(0)
    return video, lam * smooth + (1 - lam) * smooth.flip(0)


def forward_loss(model, frozen, batch, cfg, epoch):
    t = cfg.task
    device = next(model.parameters()).device
    video = batch["video"].to(device, non_blocking=True)       # (B, 3, T, H, W) normalised
    labels = batch["label"].to(device)
    if t.mixup > 0 or t.cutmix > 0:
        seed = sample_seed(cfg.seed, epoch, int(batch["index"][0]))
        video, target = mix(video, labels, model.cfg.num_classes, cfg, seed)
        logits = model(video).logits
        loss = torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
    else:
        logits = model(video).logits                                               # (B, num_classes)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=t.label_smoothing)
    top1 = 100.0 * float((logits.detach().argmax(-1) == labels).float().mean())
    return loss, {"loss": float(loss.detach()), "top1": top1}


def flops_per_clip(model, frozen, cfg):
    """Model FLOPs per clip: 6 x params x tokens when everything trains (forward + backward), 2 x params x tokens
    for a frozen encoder plus 6 x the trained parameters; attention's N^2 terms left out."""
    tokens = 1 + model.cfg.num_patches
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return 2 * count_params(model) * tokens + 4 * trained * tokens
