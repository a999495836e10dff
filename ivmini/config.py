"""Configs as dataclasses, and the named presets.

The numbers of the S/B/L/1B/6B presets are the official InternVideo2 ones (single_modality
`models/internvideo2*.py` factories; see shared facts §1.2): patch 14, 224 px, qk-norm, no qkv bias,
a 16-head attention pool that outputs 768, LayerScale 1e-5. `tiny` is ivmini's own CPU size.
"""
from dataclasses import dataclass, fields, replace


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
    checkpoint_num: int = 0             # activation checkpointing of blocks [0, checkpoint_num)
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
    mae_teacher_embed_dim: int = 1408
    mae_return_layer: int = 1
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
# training

@dataclass
class TrainConfig:
    stage: int = 1
    preset: str = "tiny"             # student size (VISION_PRESETS)
    data: str = ""                   # annotation file (stage-1 list ...); "" = the synthetic world
    data_root: str = ""              # root of the paths inside `data` (default: the world's folder)
    out: str = "runs/stage1"
    resume: str = ""                 # "" = start fresh, "auto" = newest checkpoint in out, or a checkpoint dir
    max_steps: int = 300
    batch_size: int = 8              # clips per rank per micro-batch
    accum: int = 1                   # micro-batches per optimizer step
    base_lr: float = 1.5e-4          # official: lr = base_lr * global_batch / 256
    min_lr: float = 1e-5             # likewise scaled by global_batch / 256
    warmup_steps: int = 30           # linear from 0, then step-level cosine to min_lr
    weight_decay: float = 0.05       # not on 1-D params, biases, position tables, cls token
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    clip_grad: float = 3.0
    num_frames: int = 8              # student frames; the motion teacher sees twice as many
    img_size: int = 0                # 0 = the preset's
    mask_ratio: float = 0.8
    clip_return_layer: int = 2       # official 1B: 6 (student blocks 34-39 <-> teacher 42-47)
    mae_return_layer: int = 2        # official 1B: 4
    loss_clip_middle: float = 1.0
    loss_clip_final: float = 1.0
    loss_mae: float = 1.0
    teacher_multimodal: str = ""     # InternVL-C .pth / OpenAI-CLIP visual weights; "" = small random teacher
    teacher_multimodal_kind: str = "internvl"   # internvl | clip
    teacher_motion: str = ""         # VideoMAEv2-g .pth; "" = small random teacher
    workers: int = 2                 # DataLoader worker processes per rank
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 100
    keep_ckpts: int = 2
    backend: str = ""                # kernels backend: "" = default (triton on CUDA, ref on CPU)
    compile: bool = False            # torch.compile the student's blocks
    max_skips: int = 10              # non-finite steps skipped before aborting
    fault_nan_step: int = -1         # testing: rank fault_nan_rank's loss is NaN at this step
    fault_nan_rank: int = 0


def train_config(stage=1, preset="tiny", **overrides):
    """The recipe of a stage for a preset, then `overrides`. Official stage-1 numbers (facts §2.5)
    for the 1B/6B presets; the tiny preset keeps them but trains briefly on the synthetic world."""
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"unknown TrainConfig field(s) {unknown}")
    recipe = dict(stage=stage, preset=preset, out=f"runs/stage{stage}")
    if preset == "tiny":   # a few hundred CPU steps: a 10x larger rate (1e-3 at a global batch of 16)
        recipe.update(base_lr=1.6e-2, min_lr=1.6e-3, warmup_steps=20)
    if stage == 1 and preset in ("1B", "6B"):
        recipe.update(batch_size=32 if preset == "1B" else 8, clip_return_layer=6, mae_return_layer=4,
                      max_steps=100_000, warmup_steps=10_000, ckpt_every=1000, log_every=50, workers=8)
    return replace(TrainConfig(**recipe), **overrides)
