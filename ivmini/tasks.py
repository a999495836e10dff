"""The stage's own options (TrainConfig.task, `--task.NAME` or `--NAME` on the command line): one dataclass per
stage. Field comments are the `train.py --help` text; problems() lists what is wrong with the values (each as
"--task.name=value must be ..."), which train_config (ivmini/config.py) raises together.
"""
from dataclasses import dataclass


def failed_rules(cfg, rules, prefix="task."):
    """'--name=value must be ...' for each (field, test, requirement) rule the value of cfg fails."""
    return [f"--{prefix}{name.replace('_', '-')}={getattr(cfg, name)!r} must be {must}"
            for name, ok, must in rules if not ok(getattr(cfg, name))]


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
        return failed_rules(self, [
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
        return failed_rules(self, [
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
        return failed_rules(self, [
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
        return failed_rules(self, [
            ("teacher_t_size", lambda v: v >= 0, ">= 0"), ("return_layer", lambda v: v >= 1, "at least 1"),
            ("teacher_interval", lambda v: v > 0, "> 0"), ("num_frames", lambda v: v >= 1, "at least 1"),
            ("img_size", lambda v: v >= 0 and v % 14 == 0, "0 (the preset's) or a multiple of the patch size 14"),
            ("mask_ratio", lambda v: 0 <= v < 1, "in [0, 1)")])


CHAT_PHASES = ("lm", "caption", "instruct")


@dataclass
class ChatTask:
    """Stage 3, video chat (facts §5.1, §5.2): vision encoder -> Q-Former -> LLM, trained in phases (VideoChat2's
    recipe; ivmini/stages/stage3.py). Each phase writes OUT/<phase>/ and starts from the previous phase's result."""
    phase: str = "all"               # lm | caption | instruct | all (the phases in order; a released --llm skips lm)
    vision_init: str = "auto"        # stage-2 run / checkpoint for the video encoder; auto = newest under runs/stage2;
                                     # "" = random (smoke run)
    init: str = "auto"               # the stage-3 run this phase starts from; auto = the previous phase's folder
    caption_data: str = ""           # stage-2 JSON of phase caption (its videos' captions); "" = the synthetic
                                     # world's (--data is the instruction JSON of phases lm and instruct)
    llm: str = ""                    # HF Llama/Mistral folder (config.json + safetensors); "" = the tiny LLM
    tokenizer: str = ""              # sentencepiece tokenizer.model (or its folder); "" = the --llm folder's, or the
                                     # synthetic world's tiny tokenizer
    qformer_vocab: str = ""          # BERT vocab.txt of the Q-Former's instruction ids; "" = the LLM tokenizer
    num_frames: int = 8              # frames per video (stage 2's position table interpolated)
    img_size: int = 0                # input resolution; 0 = the preset's
    num_query_token: int = 32        # Q-Former queries (official 32)
    extra_num_query_token: int = 64  # extra queries (official 64)
    qformer_hidden: int = 768        # Q-Former width (official BERT-base: 768, 12 layers, 12 heads)
    qformer_layers: int = 12         # Q-Former layers (cross-attention every 2nd, from layer 0)
    qformer_heads: int = 12          # Q-Former attention heads
    max_txt_len: int = 512           # LLM tokens per sample; later whole turns are dropped to fit (counted)
    qformer_max_len: int = 64        # Q-Former instruction tokens (the last ones kept)
    split_qa: bool = False           # lm, instruct: each QA its own sample (else a record is one conversation)
    train_vision: bool = False       # instruct: the vision encoder trains too (else frozen, as in caption)
    caption_lora: bool = False       # caption: LoRA on the LLM trains too (official: frozen LLM); instruct goes on
                                     # with these adapters
    lora_r: int = 16                 # instruct: LoRA on q, k, v, o, gate, up, down and lm_head
    lora_alpha: float = 32.0         # LoRA scale alpha / r
    lora_dropout: float = 0.1        # dropout on the adapters' input
    lm_steps: int = 400              # steps of phase lm (--max-steps caps every phase)
    caption_steps: int = 300         # steps of phase caption
    instruct_steps: int = 600        # steps of phase instruct
    lm_lr: float = 1e-3              # peak learning rate of phase lm (--base-lr is not read by stage 3)
    caption_lr: float = 1e-4         # peak learning rate of phase caption
    instruct_lr: float = 2e-5        # peak learning rate of phase instruct

    def problems(self):
        return failed_rules(self, [
            ("phase", lambda v: v in CHAT_PHASES + ("all",), "lm, caption, instruct or all"),
            ("num_frames", lambda v: v >= 1, "at least 1"),
            ("img_size", lambda v: v >= 0 and v % 14 == 0, "0 (the preset's) or a multiple of the patch size 14"),
            ("num_query_token", lambda v: v >= 1, "at least 1"), ("extra_num_query_token", lambda v: v >= 0, ">= 0"),
            ("qformer_layers", lambda v: v >= 1, "at least 1"),
            ("qformer_hidden", lambda v: v >= 1 and v % self.qformer_heads == 0, "a multiple of qformer_heads"),
            ("max_txt_len", lambda v: v >= 8, "at least 8"), ("qformer_max_len", lambda v: v >= 2, "at least 2"),
            ("lora_r", lambda v: v >= 1, "at least 1"), ("lora_dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
            *[(f"{p}_steps", lambda v: v >= 1, "at least 1") for p in CHAT_PHASES],
            *[(f"{p}_lr", lambda v: v > 0, "> 0") for p in CHAT_PHASES]])
