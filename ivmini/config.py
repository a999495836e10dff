"""Configs as dataclasses, and the named presets.

The numbers of the S/B/L/1B/6B presets are the official InternVideo2 ones (single_modality
`models/internvideo2*.py` factories; see shared facts §1.2): patch 14, 224 px, qk-norm, no qkv bias,
a 16-head attention pool that outputs 768, LayerScale 1e-5. `tiny` is ivmini's own CPU size.
"""
import math
from dataclasses import dataclass, field, fields, is_dataclass, replace


@dataclass
class VisionConfig:
    # backbone
    img_size: int = 224
    patch_size: int = 14
    in_chans: int = 3
    embed_dim: int = 1408
    depth: int = 40
    num_heads: int = 16
    mlp_ratio: float = 48 / 11          # hidden = int(embed_dim * mlp_ratio): 6144 for 1B
    mlp_act: str = "gelu_tanh"          # "gelu_tanh": what the released weights were trained with
                                        # (flash_attn FusedMLP); "gelu": exact erf GELU (official non-fused path)
    qkv_bias: bool = False
    qk_norm: bool = True                # RMSNorm over the full width of q and of k
    init_values: float = 1e-5           # LayerScale init; 0 disables LayerScale (no ls1/ls2 params)
    layerscale_fp32: bool = True        # multiply by gamma in fp32 (official force_fp32)
    num_frames: int = 8
    tubelet_size: int = 1
    drop_path_rate: float = 0.25
    # attention pooling head (`clip_projector`)
    attn_pool_num_heads: int = 16
    clip_embed_dim: int = 768
    # which heads are built: "distill" = stage-1 student (clip/mae decoders), "align" = stage-2
    # vision encoder (clip decoders, no mae), "classify" = fine-tune (fc_norm + head), "none" = CLIP vision
    heads: str = "none"
    sep_image_video_pos_embed: bool = False  # own img_pos_embed (+ clip_img_pos_embed) for T=1 inputs
    # stage-1 distillation heads
    clip_teacher_embed_dim: int = 3200
    clip_teacher_final_dim: int = 768   # 0: no final_clip_decoder (final_align is then the pooled output)
    clip_return_layer: int = 1
    clip_student_return_interval: float = 1
    clip_norm_type: str = "l2"          # "l2" or "none": normalisation after the decoders
    clip_decoder_mlp: bool = False      # clip decoders Linear-GELU-Linear (official MLP_Decoder, the S/B/L
                                        # distillation students) instead of one Linear (stage 1)
    mae_teacher_embed_dim: int = 1408
    mae_return_layer: int = 1           # 0: no motion-teacher branch (the S/B/L distillation students)
    mae_student_return_interval: float = 1
    mae_norm_type: str = "l2"
    # classification head
    num_classes: int = 0
    fc_drop_rate: float = 0.0
    head_init_scale: float = 0.001

    def __post_init__(self):
        problems = []
        if self.embed_dim % self.num_heads:
            problems.append(f"num_heads={self.num_heads} must divide embed_dim={self.embed_dim}")
        if self.embed_dim % self.attn_pool_num_heads:
            problems.append(f"attn_pool_num_heads={self.attn_pool_num_heads} must divide embed_dim={self.embed_dim}")
        if self.embed_dim % 4:
            problems.append(f"embed_dim={self.embed_dim} must be a multiple of 4 (3D sin-cos position embedding)")
        if self.img_size % self.patch_size:
            problems.append(f"img_size={self.img_size} must be a multiple of patch_size={self.patch_size}")
        if self.num_frames % self.tubelet_size:
            problems.append(f"num_frames={self.num_frames} must be a multiple of tubelet_size={self.tubelet_size}")
        if self.mlp_act not in ("gelu", "gelu_tanh"):
            problems.append(f"mlp_act={self.mlp_act!r} must be 'gelu' or 'gelu_tanh'")
        if self.heads not in ("distill", "align", "classify", "none"):
            problems.append(f"heads={self.heads!r} must be one of distill, align, classify, none")
        for name in ("clip_norm_type", "mae_norm_type"):
            if getattr(self, name) not in ("l2", "none"):
                problems.append(f"{name}={getattr(self, name)!r} must be 'l2' or 'none'")
        if self.heads == "classify" and self.num_classes <= 0:
            problems.append("heads='classify' needs num_classes > 0")
        if problems:
            raise ValueError("invalid VisionConfig: " + "; ".join(problems))

    @property
    def grid(self):                     # patches per side
        return self.img_size // self.patch_size

    @property
    def t_size(self):                   # tokens along time
        return self.num_frames // self.tubelet_size

    @property
    def num_patches(self):
        return self.t_size * self.grid * self.grid

    @property
    def mlp_hidden(self):
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def clip_return_index(self):        # ascending block indices whose outputs feed clip_decoder
        return sorted(self.depth - 1 - int(i * self.clip_student_return_interval)
                      for i in range(self.clip_return_layer))

    @property
    def mae_return_index(self):
        return sorted(self.depth - 1 - int(i * self.mae_student_return_interval)
                      for i in range(self.mae_return_layer))


VISION_PRESETS = {
    # ivmini's CPU size: 112 px -> 8x8 patches, 8 frames -> 513 tokens, 2.2 M parameters (backbone + pool)
    "tiny": dict(img_size=112, embed_dim=192, depth=4, num_heads=3, mlp_ratio=4.0,
                 attn_pool_num_heads=4, clip_embed_dim=192, drop_path_rate=0.0),
    # S/B/L: the distilled students (drop path 0.05 as in the official distillation scripts)
    "S": dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, drop_path_rate=0.05),
    "B": dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, drop_path_rate=0.05),
    "L": dict(embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0, drop_path_rate=0.05),
    "1B": dict(embed_dim=1408, depth=40, num_heads=16, mlp_ratio=48 / 11, drop_path_rate=0.25),
    "6B": dict(embed_dim=3200, depth=48, num_heads=25, mlp_ratio=4.0, drop_path_rate=0.3),
}


def vision_config(preset="tiny", **overrides):
    """The named preset with `overrides` applied; unknown field names are an error."""
    if preset not in VISION_PRESETS:
        raise KeyError(f"unknown vision preset {preset!r}; choose one of {sorted(VISION_PRESETS)}")
    names = {f.name for f in fields(VisionConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"unknown VisionConfig field(s) {unknown}")
    return replace(VisionConfig(**VISION_PRESETS[preset]), **overrides)


# ---------------------------------------------------------------------------------------------
# training: TrainConfig (what every stage has) + the stage's own options in `task`; one recipe function
# per stage returns the official numbers for a preset. Field comments are the `train.py --help` text.

@dataclass
class DistillTask:
    """Stage 1, unmasked-token distillation (paper §3.1; facts §2)."""
    num_frames: int = 8              # student frames; the motion teacher sees twice as many
    img_size: int = 0                # input resolution; 0 = the preset's
    mask_ratio: float = 0.8          # share of each frame's patches the student does not see
    clip_return_layer: int = 2       # student blocks distilled from the multimodal teacher's last ones (official 6)
    mae_return_layer: int = 2        # student blocks distilled from the motion teacher's last ones (official 4)
    loss_clip_middle: float = 1.0    # weight of the multimodal teacher's token loss
    loss_clip_final: float = 1.0     # weight of its pooled-output loss
    loss_mae: float = 1.0            # weight of the motion teacher's token loss
    teacher_multimodal: str = ""     # InternVL-C .pth / OpenAI-CLIP weights; "" = small random teacher (smoke run)
    teacher_multimodal_kind: str = "internvl"   # internvl | clip
    teacher_motion: str = ""         # VideoMAEv2-g .pth; "" = small random teacher (smoke run)
    teacher_motion_attention: str = "per_head"   # per_head (VideoMAEv2) | across_heads (the official file's layout)

    def problems(self):
        return _problems(self, [
            ("num_frames", lambda v: v >= 1, "at least 1"),
            ("img_size", lambda v: v >= 0 and v % 14 == 0, "0 (the preset's) or a multiple of the patch size 14"),
            ("mask_ratio", lambda v: 0 <= v < 1, "in [0, 1)"),
            ("clip_return_layer", lambda v: v >= 1, "at least 1"), ("mae_return_layer", lambda v: v >= 1, "at least 1"),
            ("teacher_multimodal_kind", lambda v: v in ("internvl", "clip"), "internvl or clip"),
            ("teacher_motion_attention", lambda v: v in ("per_head", "across_heads"), "per_head or across_heads")])


@dataclass
class AlignTask:
    """Stage 2, video-text alignment (paper §3.2; facts §3): VTC + VTM + MLM with a BERT text tower."""
    phase: str = "masked"            # masked: random masking, every tower trained | unmasked: vision frozen, no mask
    num_frames: int = 4              # frames per video (official 4); an image is one frame
    img_size: int = 0                # input resolution; 0 = the preset's
    mask_ratio_video: float = 0.8    # share of a video's patches dropped (phase masked)
    mask_ratio_image: float = 0.5    # share of an image's patches dropped (phase masked)
    vision_init: str = "auto"        # stage-1 run, checkpoint or export to start from; auto = newest under runs/stage1
    init: str = ""                   # a stage-2 run or export whose weights (every tower) start this run, e.g. the
                                     # unmasked phase after the masked one; overrides vision_init
    text_model: str = ""             # HF BERT directory (config.json, weights, vocab.txt); "" = all-MiniLM-L6-v2
    fusion_layer: int = 4            # text layers [0, fusion_layer) encode, the rest fuse with the video
    text_pool: str = "mean"          # text feature: cls (official) | mean (all-MiniLM-L6-v2, whose [CLS] is constant)
    text_ckpt: bool = False          # recompute the text layers' activations in the backward (saves memory)
    max_txt_l: int = 32              # tokens per caption incl. [CLS] and [SEP]; longer ones are truncated (counted)
    embed_dim: int = 128             # contrastive embedding width (official 512)
    temp: float = 0.07               # initial contrastive temperature (learned, clamped to [0.001, 0.5])
    loss_vtc: float = 1.0            # weight of the video-text contrastive loss
    loss_vtm: float = 1.0            # weight of the video-text matching loss
    loss_mlm: float = 1.0            # weight of the masked language modelling loss
    mlm_prob: float = 0.5            # share of caption tokens masked for MLM
    vtm_hard_negatives: bool = True  # VTM negatives drawn by similarity (else uniformly)
    # audio (the official 6B audio-visual model, facts §3.3-3.6): videos become audio-video samples
    audio: bool = False              # add the BEATs audio tower and the AVTC / AVTM / AVMLM losses
    audio_model: str = ""            # official beats.pth ({'cfg', 'model'}); "" = BEATs tiny from random init
    freeze_audio: bool = False       # keep the audio tower frozen (official, with a real beats.pth)
    av_concat_dim: int = 0           # width of the audio+video memory the fusion layers read; 0 = the text width
    loss_avtc: float = 1.0           # text vs the fused audio+video feature (official weights: 1, 1, 1)
    loss_avtm: float = 1.0           # matching with the audio+video memory
    loss_avmlm: float = 1.0          # MLM with the audio+video memory
    loss_atc: float = 0.0            # text vs audio, video vs audio, text-audio matching, MLM with audio only
    loss_avc: float = 0.0            # (official weight 0)
    loss_atm: float = 0.0
    loss_amlm: float = 0.0
    loss_caption: str = "vtc=caption,vtm=caption,mlm=caption,avtc=av_caption,avtm=av_caption,avmlm=av_caption," \
                        "atc=audio_caption,atm=audio_caption,amlm=audio_caption"   # the caption key each loss reads

    def captions_of_losses(self):
        """loss_caption as a dict {loss name: caption key} (problems() has checked its form)."""
        return {k.strip(): v.strip() for k, v in (p.split("=") for p in self.loss_caption.split(",") if p.strip())}

    def problems(self):
        ratio = lambda v: 0 <= v < 1  # noqa: E731
        return _problems(self, [
            ("phase", lambda v: v in ("masked", "unmasked"), "masked or unmasked"),
            ("num_frames", lambda v: v >= 1, "at least 1"),
            ("img_size", lambda v: v >= 0 and v % 14 == 0, "0 (the preset's) or a multiple of the patch size 14"),
            ("mask_ratio_video", ratio, "in [0, 1)"), ("mask_ratio_image", ratio, "in [0, 1)"),
            ("fusion_layer", lambda v: v >= 1, "at least 1"), ("max_txt_l", lambda v: v >= 3, "at least 3"),
            ("text_pool", lambda v: v in ("cls", "mean"), "cls or mean"),
            ("embed_dim", lambda v: v >= 1, "at least 1"), ("temp", lambda v: 0.001 <= v <= 0.5, "in [0.001, 0.5]"),
            ("mlm_prob", lambda v: 0 < v < 1, "in (0, 1)"), ("av_concat_dim", lambda v: v >= 0, "0 or more"),
            ("loss_caption", _loss_caption_ok, "loss=caption_key entries for losses among " + ", ".join(AV_LOSSES))])


AV_LOSSES = ("vtc", "vtm", "mlm", "avtc", "avtm", "avmlm", "atc", "avc", "atm", "amlm")


def _loss_caption_ok(text):
    pairs = [p.split("=") for p in text.split(",") if p.strip()]
    return all(len(p) == 2 and p[0].strip() in AV_LOSSES and p[1].strip() for p in pairs)


@dataclass
class FinetuneTask:
    """Fine-tuning and probing a video encoder on classification (facts §2.7): a Kinetics-style CSV "path,label"."""
    head: str = "full"               # full: fine-tune everything | linear: frozen encoder, fc_norm + head on the pooled
                                     # feature | attentive: frozen blocks, a fresh attention pool + fc_norm + head
    init: str = "auto"               # stage-1/2 run, export or official file; auto = newest of runs/stage2, runs/stage1
    orig_t_size: int = 0             # frames of --init's position table when they cannot be inferred; 0 = infer
    num_classes: int = 0             # 0 = classes.json beside the CSV (the synthetic world), else the max label + 1
    num_frames: int = 8              # frames per clip, sparse (TSN) sampling (official 8 or 16)
    img_size: int = 0                # input resolution; 0 = the preset's
    layer_decay: float = 0.9         # layer-wise lr decay: block i's lr x decay^(depth - i) (official 1B: 0.9)
    drop_path: float = -1.0          # stochastic depth of the last block; -1 = the preset's (probes: 0)
    label_smoothing: float = 0.1     # cross-entropy label smoothing (official 0.1)
    mixup: float = 0.0               # mixup Beta alpha; 0 = off (official 0.8)
    cutmix: float = 0.0              # cutmix Beta alpha; 0 = off (official 1.0); with both, one of them per batch

    def problems(self):
        return _problems(self, [
            ("head", lambda v: v in ("full", "linear", "attentive"), "full, linear or attentive"),
            ("orig_t_size", lambda v: v >= 0, ">= 0"), ("num_classes", lambda v: v >= 0, ">= 0"),
            ("num_frames", lambda v: v >= 1, "at least 1"),
            ("img_size", lambda v: v >= 0 and v % 14 == 0, "0 (the preset's) or a multiple of the patch size 14"),
            ("layer_decay", lambda v: 0 < v <= 1, "in (0, 1]"),
            ("drop_path", lambda v: v == -1 or 0 <= v < 1, "-1 (the preset's) or in [0, 1)"),
            ("label_smoothing", lambda v: 0 <= v < 1, "in [0, 1)"),
            ("mixup", lambda v: v >= 0, ">= 0"), ("cutmix", lambda v: v >= 0, ">= 0")])


@dataclass
class DistillSTask:
    """Distillation of an S/B/L student from a stage-2 video encoder (facts §2.6): MLP decoders, whole-clip masking."""
    teacher: str = "auto"            # stage-2 run, export or official file; auto = the newest under runs/stage2;
                                     # "" (or auto without a run) = a small random teacher (smoke run)
    teacher_t_size: int = 0          # frames of the teacher file's position table when they cannot be inferred
    return_layer: int = 2            # blocks distilled: the student's last K, the teacher's (official 6)
    teacher_interval: float = 1.0    # teacher blocks depth-1 - int(i * interval), i < K (official 3.34)
    num_frames: int = 8              # frames per clip, student and teacher (official 8)
    img_size: int = 0                # input resolution; 0 = the preset's
    mask_ratio: float = 0.8          # share of the clip's patches the student does not see (by teacher attention)
    loss_middle: float = 1.0         # weight of the teacher's block-token loss
    loss_final: float = 1.0          # weight of its pooled-output loss

    def problems(self):
        return _problems(self, [
            ("teacher_t_size", lambda v: v >= 0, ">= 0"), ("return_layer", lambda v: v >= 1, "at least 1"),
            ("teacher_interval", lambda v: v > 0, "> 0"), ("num_frames", lambda v: v >= 1, "at least 1"),
            ("img_size", lambda v: v >= 0 and v % 14 == 0, "0 (the preset's) or a multiple of the patch size 14"),
            ("mask_ratio", lambda v: 0 <= v < 1, "in [0, 1)")])


@dataclass
class TrainConfig:
    stage: int | str = 1             # training stage: 1, 2 or a name (see ivmini/stages/)
    preset: str = "tiny"             # model size: tiny | S | B | L | 1B | 6B
    data: str = ""                   # annotation file; "" = the synthetic world (generated on first use)
    data_root: str = ""              # root of the paths inside `data` (default: the annotation file's folder)
    out: str = "runs/stage1"         # run folder: config.json, metrics.jsonl, checkpoints/
    resume: str = ""                 # "auto" = newest checkpoint in `out`; or a run, checkpoints/ or step_* folder
    overwrite: bool = False          # delete the run already in `out` (checkpoints, metrics) and start over
    epochs: float = 0.0              # training length in passes over the data (official scripts); 0 = use max_steps
    warmup_epochs: float = 0.0       # linear warmup in epochs (with epochs > 0)
    max_steps: int = 300             # training length in optimizer steps (when epochs = 0)
    warmup_steps: int = 30           # linear warmup from 0 in steps (when epochs = 0), then cosine to min_lr
    batch_size: int = 8              # clips per rank per micro-batch
    accum: int = 1                   # micro-batches per optimizer step
    base_lr: float = 1.5e-4          # peak learning rate (see lr_scaling)
    min_lr: float = 1e-5             # final learning rate of the cosine (see lr_scaling)
    lr_scaling: str = "batch256"     # "batch256": base_lr and min_lr x global batch / 256 (official stage 1); "none"
    weight_decay: float = 0.05       # AdamW; not on 1-D params, biases or the modules' declared no-decay names
    beta1: float = 0.9               # AdamW beta1
    beta2: float = 0.98              # AdamW beta2
    eps: float = 1e-6                # AdamW eps
    clip_grad: float = 3.0           # max global gradient norm
    act_ckpt: bool = False           # recompute every trained Block's activations in the backward (saves memory)
    compile: bool = False            # torch.compile every Block
    backend: str = ""                # kernels backend: "" = default (triton on CUDA, torch on CPU), ref, torch, ...
    workers: int = 2                 # DataLoader worker processes per rank
    seed: int = 0                    # seed of weights, data order, augmentation and masking
    log_every: int = 10              # steps between metrics lines
    ckpt_every: int = 100            # steps between checkpoints
    keep_ckpts: int = 2              # checkpoints kept (the newest)
    max_skips: int = 10              # non-finite steps skipped before the run aborts (exit code 3)
    max_bad_data: float = 0.01       # share of the samples drawn that may fail to decode before the run stops (4)
    task: DistillTask | AlignTask | FinetuneTask | DistillSTask = field(default_factory=DistillTask)  # the stage's
                                     # own options

    def problems(self):
        finite = lambda v: math.isfinite(v) and v >= 0  # noqa: E731
        return _problems(self, [
            ("epochs", finite, "a finite number >= 0"), ("warmup_epochs", finite, "a finite number >= 0"),
            ("max_steps", lambda v: v >= 1 or self.epochs > 0, "at least 1"), ("warmup_steps", lambda v: v >= 0, ">= 0"),
            ("batch_size", lambda v: v >= 1, "at least 1"), ("accum", lambda v: v >= 1, "at least 1"),
            ("base_lr", lambda v: finite(v) and v > 0, "a finite number > 0"), ("min_lr", finite, "a finite number >= 0"),
            ("lr_scaling", lambda v: v in ("batch256", "none"), "batch256 or none"),
            ("weight_decay", finite, "a finite number >= 0"), ("eps", lambda v: finite(v) and v > 0, "> 0"),
            ("beta1", lambda v: 0 <= v < 1, "in [0, 1)"), ("beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
            ("clip_grad", lambda v: finite(v) and v > 0, "a finite number > 0"),
            ("workers", lambda v: v >= 0, ">= 0"), ("log_every", lambda v: v >= 1, "at least 1"),
            ("ckpt_every", lambda v: v >= 1, "at least 1"), ("keep_ckpts", lambda v: v >= 1, "at least 1"),
            ("max_skips", lambda v: v >= 0, ">= 0"), ("max_bad_data", lambda v: 0 <= v < 1, "in [0, 1)")]) \
            + self.task.problems()


def _problems(cfg, rules):
    """'--name=value must be ...' for each (field, test, requirement) rule the value of cfg fails."""
    prefix = "" if isinstance(cfg, TrainConfig) else "task."
    return [f"--{prefix}{name.replace('_', '-')}={getattr(cfg, name)!r} must be {must}"
            for name, ok, must in rules if not ok(getattr(cfg, name))]


def stage1(preset="tiny") -> TrainConfig:
    """Stage 1. 1B/6B: the official scripts SM scripts/pretraining/{1B,6B}_pt.sh (facts §2.5): 301 epochs,
    40 warmup, lr 1.5e-4 x batch/256, per-GPU batch 32 / 8, 6 + 4 distilled layers, all blocks
    recomputed. tiny: a few hundred CPU steps on the synthetic world, 10x the rate (1e-3 at a global
    batch of 16). S/B/L: the tiny schedule with the official optimizer (their official students
    are distilled from a stage-2 InternVideo2, which is not this recipe)."""
    cfg = TrainConfig(stage=1, preset=preset, out="runs/stage1")
    if preset == "tiny":
        return replace(cfg, base_lr=1.6e-2, min_lr=1.6e-3, warmup_steps=20)
    if preset in ("1B", "6B"):
        return replace(cfg, batch_size=32 if preset == "1B" else 8, epochs=301, warmup_epochs=40, act_ckpt=True,
                       ckpt_every=1000, log_every=50, workers=8,
                       task=DistillTask(clip_return_layer=6, mae_return_layer=4))
    return cfg


def stage2(preset="tiny") -> TrainConfig:
    """Stage 2. 1B: the official MM scripts/pretraining/stage2/1B/config.py (facts §3.1): BERT-large split at layer
    19, 4 frames, captions of 32 tokens, batch 64 per GPU, AdamW lr 5e-5 (not scaled by the batch), betas
    (0.9, 0.98), eps 1e-8, wd 0.05, clip 3, 10 epochs with 1 of warmup, cosine to 1% of the peak; text layers
    recomputed. Pass the BERT directory with --text-model and the stage-1 model with --vision-init. tiny: the
    synthetic world, MiniLM split 4 + 2, 300 CPU steps at 10x the rate (5e-4), 50% of a video masked: at 1e-4 / 80%
    VTM stayed at the constant predictor's 0.637 (ITM R@1 5%); now ~0.45 (R@1 27%), ITC R@1 38% -> 42%. With
    audio=true it also trains ATC (official weight 0) so that text-to-audio retrieval has a trained embedding."""
    cfg = TrainConfig(stage=2, preset=preset, out="runs/stage2", base_lr=5e-5, min_lr=5e-7, lr_scaling="none",
                      eps=1e-8, task=AlignTask())
    if preset == "tiny":
        return replace(cfg, base_lr=5e-4, min_lr=1e-6, max_steps=300, warmup_steps=20,
                       task=AlignTask(mask_ratio_video=0.5, loss_atc=1.0))
    if preset in ("1B", "6B"):
        return replace(cfg, batch_size=64, epochs=10, warmup_epochs=1, ckpt_every=1000, log_every=50, workers=8,
                       task=AlignTask(fusion_layer=19, text_pool="cls", text_ckpt=True,
                                      embed_dim=512 if preset == "1B" else 768, max_txt_l=32 if preset == "1B" else 40))
    return cfg


def finetune(preset="tiny") -> TrainConfig:
    """Fine-tuning / probing. 1B: the official SM scripts/finetuning/full_tuning/k710/1B_ft_k710_f8.sh (facts §2.7):
    lr 5e-5 x batch/256, layer decay 0.9, drop path 0.3, 9 epochs with 2 of warmup, AdamW betas (0.9, 0.999),
    wd 0.05, label smoothing 0.1 (mixup 0.8 / cutmix 1.0 there: --mixup/--cutmix). Probes (--head linear |
    attentive; official attentive probe: lr 2e-4, wd 0, no layer decay) change only what is trained. tiny: the
    synthetic world's classify_train.csv from the default stage-2 run, 8 frames, a few CPU minutes on 2 ranks."""
    cfg = TrainConfig(stage="finetune", preset=preset, out="runs/finetune", base_lr=5e-5, min_lr=1e-6, beta2=0.999,
                      eps=1e-8, task=FinetuneTask())
    if preset == "tiny":
        return replace(cfg, base_lr=1.6e-2, min_lr=1.6e-4, max_steps=240, warmup_steps=24, log_every=10,
                       ckpt_every=120)
    if preset in ("1B", "6B"):
        return replace(cfg, epochs=9, warmup_epochs=2, ckpt_every=1000, log_every=50, workers=8, act_ckpt=True,
                       task=FinetuneTask(drop_path=0.3))
    return cfg


def distill(preset="tiny") -> TrainConfig:
    """Distillation from a stage-2 encoder. S/B/L: the official SM scripts/distillation/*_dist_1B_stage2.sh
    (facts §2.6): 8 frames, lr 1e-3 x batch/256, 101 epochs with 20 of warmup, clip 5, drop path 0.05 (the
    presets'), batch 128 per GPU, 6 blocks at teacher interval 3.34; pass the stage-2 1B file with --teacher.
    tiny: the default stage-2 run as teacher, the stage-1 tiny schedule (a few hundred CPU steps)."""
    cfg = TrainConfig(stage="distill", preset=preset, out="runs/distill", base_lr=1e-3, clip_grad=5.0,
                      task=DistillSTask())
    if preset == "tiny":
        return replace(cfg, base_lr=1.6e-2, min_lr=1.6e-3, warmup_steps=20)
    return replace(cfg, batch_size=128, epochs=101, warmup_epochs=20, ckpt_every=1000, log_every=50, workers=8,
                   act_ckpt=preset in ("1B", "6B"), task=DistillSTask(return_layer=6, teacher_interval=3.34))


RECIPES = {1: stage1, 2: stage2, "finetune": finetune, "distill": distill}


def _has(obj, name):
    return is_dataclass(obj) and name in {f.name for f in fields(obj)}


def option(cfg, key):
    """(the dataclass holding option `key`, the field's name, its type): "name", "task.name", or a task field's
    bare name. An unknown name is a ValueError naming it."""
    names = key.replace("-", "_").split(".")
    if len(names) == 1 and not _has(cfg, names[0]) and _has(cfg.task, names[0]):
        names = ["task", names[0]]                     # a task option by its bare name
    obj = cfg
    for name in names[:-1]:
        obj = getattr(obj, name) if _has(obj, name) else None
    if not _has(obj, names[-1]) or is_dataclass(getattr(obj, names[-1])):
        raise ValueError(f"unknown option {key!r}")
    return obj, names[-1], {f.name: f.type for f in fields(obj)}[names[-1]]


def set_field(cfg, key, value):
    """Set option `key` on cfg in place, converting a text value to the field's type; a bad value is a
    ValueError naming the option."""
    obj, name, kind = option(cfg, key)
    if kind is bool and isinstance(value, str):
        if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError(f"option {key} expects true or false, got {value!r}")
        value = value.lower() in ("1", "true", "yes")
    try:
        setattr(obj, name, kind(value))
    except ValueError:
        raise ValueError(f"option {key} expects {kind.__name__}, got {value!r}") from None


def train_config(stage=1, preset="tiny", **overrides) -> TrainConfig:
    """The recipe of `stage` for `preset`, then `overrides` (field names; task fields by their bare name
    or as task__name)."""
    if stage not in RECIPES:
        raise ValueError(f"unknown stage {stage!r}; stages: {list(RECIPES)}")
    if preset not in VISION_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(VISION_PRESETS)}")
    cfg = RECIPES[stage](preset)
    for key, value in overrides.items():
        set_field(cfg, key.replace("__", "."), value)
    if stage == 2 and cfg.task.audio and "out" not in overrides and cfg.out == "runs/stage2":
        cfg.out = "runs/stage2_audio"              # the audio run does not collide with the video one
    problems = cfg.problems()
    if problems:
        raise ValueError("; ".join(problems))
    return cfg
