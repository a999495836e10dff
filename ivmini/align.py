"""The stage-2 model: video-text alignment (paper §3.2; facts §3.4-3.6; official MM
models/internvideo2_stage2_visual.py, InternVideo2_Stage2_visual).

    video (B, 3, T, H, W) --vision_encoder (VideoViT, heads="align"), visible tokens only-->
        tokens (B, 1+Nvis, C) (last block, no norm) --clip_projector--> pooled (B, Dv) --vision_proj--> (B, E)
    input_ids (B, L) --text_encoder.bert, text layers [0, fusion_layer)--> text (B, L, H), [CLS] --text_proj--> (B, E)
    losses:  VTC  cos(vision_proj, text_proj) / temp over the global batch
             VTM  fusion layers on (text, media tokens) pairs [pos | neg video | neg text] -> itm_head
             MLM  masked ids -> text layers -> fusion layers with the media tokens -> MLM head

A T=1 input is an image (official use_image): the vision encoder then uses its image position table
(img_pos_embed when cfg.vision.sep_image_video_pos_embed, else the frame mean of the video table).
The stage-1 distillation heads the official class still builds (clip_decoder, final_clip_decoder,
clip_pos_embed, clip_img_pos_embed) are kept so checkpoints have the official layout, but they take no
part in stage 2: they are frozen here and never run.

`temp` is clamped to [0.001, 0.5] in place before every forward, like the official
clip_contrastive_temperature, and has no weight decay. It is a (1,) tensor, not the official 0-d one:
FSDP2 cannot shard 0-d parameters (the checkpoint key map reshapes). Under FSDP2 the clamp inside
forward() only reaches the gathered copy, so losses() clamps the stored (sharded) value first and then
calls the module: call losses(), or clamp_temp() after each optimizer step, not forward() directly.

Loading (official stage-2 files, stage-1 initialisation) is in ivmini/checkpoint/stage2.py.
Tests: tests/test_align.py (model), tests/test_losses_stage2.py (the losses).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from .config import VisionConfig
from .losses import mask_tokens, mlm_loss, vtc_loss, vtm_loss
from .masking import num_visible, random_visible_idx
from .text import BertConfig, BertForMaskedLM
from .vit import VideoViT

TEMP_MIN, TEMP_MAX = 0.001, 0.5


@dataclass
class AlignConfig:
    vision: VisionConfig                # heads="align"; num_frames 4 in the official recipe
    bert: BertConfig                    # encoder_width = vision.embed_dim, fusion_layer < num_hidden_layers
    embed_dim: int = 512                # shared VTC space (official 1B: 512)
    temp: float = 0.07                  # initial temperature
    loss_vtc: float = 1.0               # loss weights (official 1, 1, 1)
    loss_vtm: float = 1.0
    loss_mlm: float = 1.0
    mlm_prob: float = 0.5               # share of the text tokens masked for MLM (official 0.5)
    vtm_hard_negatives: bool = True     # VTM negatives drawn by similarity (True) or uniformly (False)
    video_mask_ratio: float = 0.8       # random masking of the vision tokens in the masked phase
    image_mask_ratio: float = 0.5
    cls_token_id: int = 101             # token ids mask_tokens needs (bert-base/large-uncased, MiniLM vocab)
    mask_token_id: int = 103
    text_pool: str = "cls"              # the text feature for text_proj: "cls" (official) or "mean" over the
                                        # caption's tokens (for sentence encoders trained so, e.g. all-MiniLM-L6-v2)

    def __post_init__(self):
        # asdict() output (meta.json, exported .json) rebuilds the nested configs: AlignConfig(**d)
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        if isinstance(self.bert, dict):
            self.bert = BertConfig(**self.bert)
        v, b, problems = self.vision, self.bert, []
        if v.heads != "align":
            problems.append(f"vision.heads={v.heads!r} must be 'align' (the stage-2 vision encoder)")
        if b.encoder_width != v.embed_dim:
            problems.append(f"bert.encoder_width={b.encoder_width} must equal the vision width "
                            f"vision.embed_dim={v.embed_dim} (the fusion layers cross-attend to the vision tokens)")
        if b.fusion_layer is None or not 0 <= b.fusion_layer < b.num_hidden_layers:
            problems.append(f"bert.fusion_layer={b.fusion_layer} must be in [0, num_hidden_layers="
                            f"{b.num_hidden_layers}): VTM and MLM need fusion layers")
        for name in ("video_mask_ratio", "image_mask_ratio"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"{name}={getattr(self, name)} must be in [0, 1)")
        if not 0.0 <= self.mlm_prob <= 1.0:
            problems.append(f"mlm_prob={self.mlm_prob} must be in [0, 1]")
        if self.text_pool not in ("cls", "mean"):
            problems.append(f"text_pool={self.text_pool!r} must be 'cls' or 'mean'")
        if not TEMP_MIN <= self.temp <= TEMP_MAX:
            problems.append(f"temp={self.temp} must be in [{TEMP_MIN}, {TEMP_MAX}]")
        if problems:
            raise ValueError("invalid AlignConfig: " + "; ".join(problems))


class VideoTextModel(nn.Module):
    # stage-1 heads the official class builds and saves but stage 2 never runs: frozen
    UNUSED = ("clip_decoder", "final_clip_decoder", "clip_pos_embed", "clip_img_pos_embed")

    def __init__(self, cfg: AlignConfig, text_encoder: BertForMaskedLM = None):
        """text_encoder: an already built (e.g. HF-loaded) BertForMaskedLM whose cfg equals cfg.bert; None
        builds a freshly initialised one."""
        super().__init__()
        self.cfg = cfg
        self.vision_encoder = VideoViT(cfg.vision)
        if text_encoder is not None and text_encoder.cfg != cfg.bert:
            raise ValueError(f"text_encoder.cfg {text_encoder.cfg} differs from the AlignConfig's bert {cfg.bert}")
        self.text_encoder = text_encoder if text_encoder is not None else BertForMaskedLM(cfg.bert)
        # nn.Linear's own initialisation, as the official class (it applies no init of its own to these)
        self.vision_proj = nn.Linear(cfg.vision.clip_embed_dim, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.bert.hidden_size, cfg.embed_dim)
        self.itm_head = nn.Linear(cfg.bert.hidden_size, 2)
        self.temp = nn.Parameter(torch.full((1,), float(cfg.temp)))  # (1,): FSDP2 shards no 0-d parameter
        for name, p in self.vision_encoder.named_parameters():
            if name.split(".")[0] in self.UNUSED:
                p.requires_grad_(False)

    def no_weight_decay(self):
        """Own parameter names without weight decay (train.param_groups also reads the vision encoder's)."""
        return {"temp"}

    def clamp_temp(self):
        # on .data: an in-place op on the parameter itself bumps the version counter autograd checks, so a
        # second forward before the backward would invalidate the first graph even when nothing changes
        # (the value only changes after an optimizer step left it out of range, i.e. before any graph uses it)
        self.temp.data.clamp_(TEMP_MIN, TEMP_MAX)

    def encode_vision(self, video, mask=None):
        """video (B, 3, T, H, W) (T=1: an image); mask: None (all tokens), bool (B, 1+N) True = dropped
        with the CLS column False, or visible indices (B, 1+Nvis) int64 ascending with CLS (0) first.
        -> (tokens (B, 1+Nvis, C): the last block's output, no norm; pooled (B, clip_embed_dim))."""
        if video.dim() != 5:
            raise ValueError(f"video must be (B, 3, T, H, W), got {tuple(video.shape)}")
        kw = {}
        if mask is not None:
            kw["mask" if mask.dtype == torch.bool else "visible_idx"] = mask
        # pool=False: the stage-1 decoders are not run; the pool is applied here
        out = self.vision_encoder(video, image=video.shape[2] == 1, pool=False, **kw)
        return out.tokens, self.vision_encoder.clip_projector(out.tokens)

    def encode_text(self, input_ids, attention_mask):
        """input_ids, attention_mask (B, L) -> (tokens (B, L, H) after the text layers, the text feature (B, H):
        the [CLS] state (official), or with cfg.text_pool="mean" the mean over the caption's tokens)."""
        tokens = self.text_encoder.bert(input_ids, attention_mask, mode="text").last_hidden_state
        if self.cfg.text_pool == "cls":
            return tokens, tokens[:, 0]
        m = attention_mask[..., None].to(tokens.dtype)                     # (B, L, 1)
        return tokens, (tokens * m).sum(1) / m.sum(1).clamp_min(1)

    def losses(self, video, input_ids, attention_mask, idx, mask=None, vtm_negatives=None, mlm_inputs=None):
        """Clamp the stored temp, then run the module (forward, through FSDP's hooks when wrapped)."""
        self.clamp_temp()
        return self(video, input_ids, attention_mask, idx, mask=mask, vtm_negatives=vtm_negatives,
                    mlm_inputs=mlm_inputs)

    def forward(self, video, input_ids, attention_mask, idx, mask=None, vtm_negatives=None, mlm_inputs=None):
        """The weighted stage-2 losses -> {"vtc", "vtm", "mlm", "loss" (their sum), "temp" (detached)}.

        video (B, 3, T, H, W) normalised (T=1: image); input_ids, attention_mask (B, L); idx (B,) sample
        ids (duplicates are positives) or None; mask: see encode_vision; vtm_negatives: (vision_neg_idx,
        text_neg_idx) to replace VTM's draws; mlm_inputs: (masked_ids, labels), or None to draw them with
        mask_tokens from torch's default generator. A loss with weight 0 is not computed (0 is returned)."""
        cfg = self.cfg
        self.clamp_temp()
        vision, pooled = self.encode_vision(video, mask)                   # (B, 1+Nvis, C), (B, Dv)
        text, text_cls = self.encode_text(input_ids, attention_mask)      # (B, L, H), (B, H)
        vision_proj, text_proj = self.vision_proj(pooled), self.text_proj(text_cls)   # (B, E) each
        zero = vision_proj.new_zeros(())
        out = {"vtc": zero, "vtm": zero, "mlm": zero}
        if cfg.loss_vtc:
            out["vtc"] = cfg.loss_vtc * vtc_loss(vision_proj, text_proj, idx, self.temp, all_gather=True)
        if cfg.loss_vtm:
            vtm, _ = vtm_loss(self.text_encoder.bert, self.itm_head, self.temp, vision, text, vision_proj, text_proj,
                              attention_mask, idx, hard_negatives=cfg.vtm_hard_negatives, negatives=vtm_negatives)
            out["vtm"] = cfg.loss_vtm * vtm
        if cfg.loss_mlm:
            if mlm_inputs is None:
                mlm_inputs = mask_tokens(input_ids, cfg.bert.vocab_size, cfg.mask_token_id, cfg.bert.pad_token_id,
                                         cfg.cls_token_id, prob=cfg.mlm_prob)
            masked_ids, labels = mlm_inputs
            out["mlm"] = cfg.loss_mlm * mlm_loss(self.text_encoder, masked_ids, attention_mask, labels, vision)
        out["loss"] = out["vtc"] + out["vtm"] + out["mlm"]
        out["temp"] = self.temp.detach().reshape(())
        return out


def stage2_visible_idx(cfg: AlignConfig, batch, image, seeds, device="cpu"):
    """Stage-2 random masking (official RandomMaskingGenerator with only_mask): per sample an independent
    uniform choice over all T*N patch tokens of the clip, int(ratio*T*N) of them masked (ratio
    cfg.video_mask_ratio, or cfg.image_mask_ratio for an image, T=1), CLS always visible.
    seeds: one int per sample (see ivmini/masking.py). -> visible_idx (batch, 1 + T*N - int(ratio*T*N))."""
    v = cfg.vision
    T = 1 if image else v.t_size
    ratio = cfg.image_mask_ratio if image else cfg.video_mask_ratio
    n = T * v.grid ** 2
    return random_visible_idx(batch, T, v.grid ** 2, num_visible(n, ratio), seeds, device=device)

