"""Configs as dataclasses, and the named presets.

The numbers of the S/B/L/1B/6B presets are the official InternVideo2 ones (single_modality
`models/internvideo2*.py` factories; see shared facts §1.2): patch 14, 224 px, qk-norm, no qkv bias,
a 16-head attention pool that outputs 768, LayerScale 1e-5. `tiny` is ivmini's own CPU size.
"""
import math
from dataclasses import dataclass, field, fields, is_dataclass, replace

from .tasks import AlignTask, ChatTask, DistillSTask, DistillTask, FinetuneTask, failed_rules


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
    task: DistillTask | AlignTask | FinetuneTask | DistillSTask | ChatTask = field(default_factory=DistillTask)  # the stage's
                                     # own options

    def problems(self):
        finite = lambda v: math.isfinite(v) and v >= 0  # noqa: E731
        return failed_rules(self, [
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
            ("max_skips", lambda v: v >= 0, ">= 0"), ("max_bad_data", lambda v: 0 <= v < 1, "in [0, 1)")], prefix="") \
            + self.task.problems()


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


def stage3(preset="tiny") -> TrainConfig:
    """Stage 3. Official (VideoChat2's recipe, facts §5.2; the InternVideo2-Chat training code is not released):
    caption then instruct, AdamW wd 0.02, betas (0.9, 0.999), cosine; pass --llm (Mistral-7B-Instruct) and its
    tokenizer. tiny: the tiny LLM trained first on the world's text (phase lm), a 2-layer Q-Former of width 128
    with 16 + 8 queries, a few CPU minutes per phase on 2 ranks, 10x the official rates. Measured on the world's
    test QA: whole records as conversations (split_qa=false, the official way) reach 80 % on colour where one QA
    per sample reached 67 %; training the vision tower in instruct (lr 5e-4) fell to 37 %."""
    cfg = TrainConfig(stage=3, preset=preset, out="runs/stage3", lr_scaling="none", weight_decay=0.02, beta2=0.999,
                      eps=1e-8, clip_grad=1.0, warmup_steps=20, task=ChatTask())
    if preset == "tiny":
        task = ChatTask(num_query_token=16, extra_num_query_token=8, qformer_hidden=128, qformer_layers=2,
                        qformer_heads=4, max_txt_len=128, lm_lr=2e-3, caption_lr=1e-3, instruct_lr=5e-4)
        return replace(cfg, batch_size=8, log_every=10, ckpt_every=100, task=task,
                       max_steps=max(task.lm_steps, task.caption_steps, task.instruct_steps))
    return replace(cfg, batch_size=4, workers=8, act_ckpt=True, log_every=50, ckpt_every=1000,
                   max_steps=max(cfg.task.caption_steps, cfg.task.instruct_steps))


RECIPES = {1: stage1, 2: stage2, 3: stage3, "finetune": finetune, "distill": distill}


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
