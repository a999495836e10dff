"""The InternVideo2-CLIP variant (facts §4; official MM models/internvideo2_clip.py, InternVideo2_CLIP, and
backbones/internvideo2/internvideo2_clip_text.py, LLaMA): the stage-2 video encoder with an LLM text tower,
trained with VTC only, and only through the vision attention pool (and temp).

    video (B, 3, T, H, W) --vision_encoder (VideoViT, heads="none", 8 frames)--> tokens (B, 1+N, C)
        --clip_projector (attention pool)--> pooled (B, E)
    input_ids, attention_mask (B, L) --text_encoder (ivmini.llm.LLM with LoRA, no lm_head).hidden_states-->
        (B, L, H) final-norm states --state of the LAST real token (EOS)--> (B, H) @ text_projection (H, E) -> (B, E)
    loss: vtc_loss(pooled, text feature, idx, temp) over the global batch

Which token: the official tower takes x[b, mask.sum(1) - 1] with mask = ids > 0, which is the last real token
only for RIGHT padding. ivmini takes the last position whose mask is 1, which is the same token for right
padding and still the last real token (EOS) for left padding. The official HF forward also numbers positions
0..L-1 whatever the padding, while ivmini.llm numbers real tokens from 0 (see llm.py): the two agree exactly for
right padding, the layout the official tokenizer call (padding="max_length", pad " " -> id 0) is used with here.

LoRA: the official tower wraps LlamaForCausalLM with peft LoraConfig(r=16, lora_alpha=32, lora_dropout=0.1) and
no target_modules, so peft's default for model_type "llama" applies: q_proj and v_proj only
(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["llama"] = ["q_proj", "v_proj"]). CLIPConfig's defaults.
The adapters come from the InternVL-C checkpoint and stay frozen; in train() mode their dropout (0.1) is active,
as in the official training (its text tower is frozen but not put in eval mode).

Training (official scripts/pretraining/clip/1B/config.py): freeze_vision with open_vision_clip_projector, text
frozen: only vision_encoder.clip_projector.* and temp train (freeze_for_training(), called by the constructor
unless freeze=False). temp starts at 1/100 and is clamped to >= temp_min (1/100) before every forward, on
.data as in align.py; it is a (1,) Parameter (FSDP2 shards no 0-d parameter; the checkpoint map reshapes).

Eval compatibility: encode_vision / encode_text return (tokens, feature) pairs and vision_proj / text_proj are
nn.Identity, the stage-2 model's (align.VideoTextModel) interface, so ivmini.evaluate's ITC path (eval.py
retrieval / classify --no-itm) reads this model unchanged; there is no itm_head (ITC only, as tasks_clip).

Loading the released layout: ivmini/checkpoint/clip.py (load_official("clip", ...)).
Tests: python -m pytest tests/test_clip.py -q
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from .config import VisionConfig
from .llm import LLM, LLMConfig
from .lora import LoRAConfig, apply_lora
from .losses import vtc_loss
from .vit import VideoViT


@dataclass
class CLIPConfig:
    vision: VisionConfig                 # heads="none" (backbone + pool); num_frames 8 in the official recipe
    text: LLMConfig                      # the LLaMA text tower (InternVL-C: LLaMA-7B, hidden 4096)
    use_lora: bool = True                # official use_lora: peft adapters on the text tower
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    lora_targets: tuple = ("q", "v")     # peft's default targets for Llama
    temp: float = 0.01                   # initial temperature (official 1/100, as ViCLIP)
    temp_min: float = 0.01               # clamp floor

    def __post_init__(self):
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        if isinstance(self.text, dict):
            self.text = LLMConfig(**self.text)
        self.lora_targets = tuple(self.lora_targets)
        problems = []
        if self.vision.heads != "none":
            problems.append(f"vision.heads={self.vision.heads!r} must be 'none' (the CLIP vision encoder: "
                            f"backbone + attention pool)")
        if self.temp < self.temp_min:
            problems.append(f"temp={self.temp} must be >= temp_min={self.temp_min}")
        if problems:
            raise ValueError("invalid CLIPConfig: " + "; ".join(problems))

    @property
    def embed_dim(self):
        return self.vision.clip_embed_dim

    def lora(self):
        return LoRAConfig(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout, targets=self.lora_targets)


class VideoCLIP(nn.Module):
    def __init__(self, cfg: CLIPConfig, freeze=True):
        """freeze=True: the official training set-up (freeze_for_training); False leaves every parameter
        trainable."""
        super().__init__()
        self.cfg = cfg
        self.vision_encoder = VideoViT(cfg.vision)
        self.text_encoder = LLM(cfg.text)
        self.text_encoder.lm_head = None         # the tower is LlamaModel only: no LM head, no lm_head weights
        if cfg.use_lora:
            apply_lora(self.text_encoder, cfg.lora())
        # official: torch.empty, always loaded from InternVL-C; from scratch, CLIP's text_projection init
        self.text_projection = nn.Parameter(torch.empty(cfg.text.hidden_size, cfg.embed_dim))
        nn.init.normal_(self.text_projection, std=cfg.text.hidden_size ** -0.5)
        self.temp = nn.Parameter(torch.full((1,), float(cfg.temp)))    # (1,): FSDP2 shards no 0-d parameter
        # the stage-2 interface ivmini.evaluate reads: both features already live in the shared space
        self.vision_proj, self.text_proj = nn.Identity(), nn.Identity()
        if freeze:
            self.freeze_for_training()

    def freeze_for_training(self):
        """requires_grad only for vision_encoder.clip_projector.* and temp (official freeze_vision with
        open_vision_clip_projector, freeze_text); returns self."""
        for name, p in self.named_parameters():
            p.requires_grad_(name == "temp" or name.startswith("vision_encoder.clip_projector."))
        return self

    def no_weight_decay(self):
        return {"temp"}

    def clamp_temp(self):
        # on .data, as align.VideoTextModel.clamp_temp (why: see there)
        self.temp.data.clamp_(min=self.cfg.temp_min)

    def encode_vision(self, video):
        """video (B, 3, T, H, W) (T=1: an image) -> (tokens (B, 1+N, C) after the last block, pooled (B, E))."""
        if video.dim() != 5:
            raise ValueError(f"video must be (B, 3, T, H, W), got {tuple(video.shape)}")
        out = self.vision_encoder(video, image=video.shape[2] == 1)
        return out.tokens, out.pooled

    def encode_text(self, input_ids, attention_mask):
        """input_ids, attention_mask (B, L) (1 = token, 0 = pad; left or right padding) -> (hidden (B, L, H) the
        final-norm states, feature (B, E) = hidden at the last real token @ text_projection)."""
        if attention_mask is None or attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must be given with the shape of input_ids {tuple(input_ids.shape)}")
        real = attention_mask.bool()
        empty = (~real.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"text rows {empty} have no real token (attention_mask all 0)")
        hidden = self.text_encoder.hidden_states(input_ids, attention_mask=real)        # (B, L, H)
        L = real.shape[1]
        last = L - 1 - real.flip(1).int().argmax(dim=1)                                  # (B,) last 1 per row
        eos = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]          # (B, H)
        return hidden, eos @ self.text_projection.to(eos.dtype)

    def losses(self, video, input_ids, attention_mask, idx):
        """Clamp the stored temp, then run the module (through FSDP's hooks when wrapped), as align.py."""
        self.clamp_temp()
        return self(video, input_ids, attention_mask, idx)

    def forward(self, video, input_ids, attention_mask, idx):
        """-> {"vtc", "loss" (= vtc), "temp" (detached)}; idx (B,) sample ids (duplicates are positives) or None."""
        self.clamp_temp()
        _, vision = self.encode_vision(video)                          # (B, E)
        _, text = self.encode_text(input_ids, attention_mask)          # (B, E)
        vtc = vtc_loss(vision, text, idx, self.temp, all_gather=True)
        return {"vtc": vtc, "loss": vtc, "temp": self.temp.detach().reshape(())}
