"""What differs between the training stages: the data, the models and the loss. One module per stage.

train.py calls, for STAGES[cfg.stage] (cfg.task holds the stage's own options):
    dataset(cfg) -> torch Dataset          (the synthetic world when cfg.data is empty)
    sampler(dataset, cfg, rank, world)     this rank's batches: an iterable of index lists with
                                           len() = batches per epoch (equal on every rank) and
                                           set_epoch(epoch, start) skipping `start` batches (exact resume)
    build(cfg, device) -> (model, frozen)  model: the one trained nn.Module (any number of towers), with
                                           `.cfg`, a dataclass saved in checkpoints; frozen: {name: module}
                                           never trained (teachers); parameters with requires_grad=False
                                           inside `model` are frozen parts of it (not optimised)
    forward_loss(model, frozen, batch, cfg, epoch) -> (loss tensor, {name: float} for logging)
    flops_per_clip(model, frozen, cfg) -> model FLOPs per clip (for MFU)
    optimizer_groups(model, cfg) -> AdamW groups (common.param_groups' weight-decay rules; a group's
                                           "lr_scale" multiplies its learning rate, e.g. layer-wise decay);
                                           common.optimizer_groups where a stage has nothing of its own
    phases(cfg) -> [TrainConfig, ...]      the runs of one command, in order (common.one_phase: [cfg]; stage 3:
                                           one per phase, each with its own out folder)

stage1.py  unmasked-token distillation from a multimodal and a motion teacher (paper §3.1)
stage2.py  video-text alignment: VTC, VTM, MLM with a BERT text tower (paper §3.2)
finetune.py  fine-tuning and linear / attentive probing on classification (facts §2.7)
distill.py  distillation of the S/B/L students from a stage-2 video encoder (facts §2.6)
stage3.py  video chat: Q-Former + LLM (+ LoRA) on the stage-2 encoder, phases lm, caption, instruct (facts §5)
"""
from . import distill, finetune, stage1, stage2, stage3

STAGES = {1: stage1, 2: stage2, 3: stage3, "finetune": finetune, "distill": distill}
