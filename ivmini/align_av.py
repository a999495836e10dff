"""The audio-visual stage-2 model: video, audio and text alignment (paper §3.2; facts §3.3, §3.4, §3.6;
official MM models/internvideo2_stage2_audiovisual.py, InternVideo2_Stage2_audiovisual).

It is the video-text model (ivmini/align.py) with a BEATs audio tower (ivmini/audio.py) beside the vision one:

    video (B, 3, T, H, W) --vision_encoder--> tokens (B, 1+Nvis, Cv) --av_concat_vision_proj--> Mv (B, 1+Nvis, W)
                                          `--> pooled (B, Dv) --vision_proj--> v (B, E)
    fbank (B, F, 64) --audio_encoder (BEATs)--> tokens (B, Na, Ca) --av_concat_audio_proj--> Ma (B, Na, W)
                                          `--> token mean (B, Ca), before that projection --audio_proj--> a (B, E)
    texts[key] = (ids, atts) (B, L) --text layers--> (B, L, H), [CLS] --text_proj--> t_key (B, E)
    av = av_fusion(cat(a, v)) (B, E);  the av memory Mav = cat(Ma, Mv) along the tokens (B, Na+1+Nvis, W)
av_concat_*_proj are Linear + LayerNorm; W = av_concat_dim = bert.encoder_width: every fusion layer
cross-attends to one of Mv, Ma, Mav.

    loss   function   media feature / memory    head        caption (default loss_caption)
    vtc    vtc_loss   v                                     caption
    vtm    vtm_loss   Mv, negatives from v      itm_head    caption
    mlm    mlm_loss   Mv                                    caption
    atc    vtc_loss   a                                     audio_caption
    atm    vtm_loss   Ma, negatives from a      atm_head    audio_caption
    amlm   mlm_loss   Ma                                    audio_caption
    avtc   vtc_loss   av                                    av_caption
    avtm   vtm_loss   Mav, negatives from av    avtm_head   av_caption
    avmlm  mlm_loss   Mav                                   av_caption
    avc    vtc_loss   a against v (no text)
The official weights are 1 for vtc vtm mlm avtc avtm avmlm and 0 for atc avc atm amlm; a loss with weight 0 is
not computed. The official 6B config feeds every loss the same caption key ("avs_captions"); ivmini's synthetic
world has one caption per modality, so the default loss_caption maps each loss to its own (table above).

Modules and parameter names are the official ones, built under the official conditions, so an official
state dict maps key for key (temp (1,) instead of 0-d, as VideoTextModel): av_concat_vision_proj.{0,1},
audio_encoder, audio_proj, av_concat_audio_proj.{0,1} (only when an audio loss is on), av_fusion (only when
avtc or avtm is on), atm_head (only atm), avtm_head (only avtm). With every audio loss off there is no audio
tower and forward() ignores the audio.

A clip without an audio stream arrives as the features of silence (ivmini/data, which counts it): the model
runs on them like on any clip; silence is information here (the synthetic av_caption says "in silence").
freeze_audio (official True, with a released beats.pth) stops the audio tower's gradients; ivmini's tiny
recipe trains a random-init BEATs instead, so the default here is False.

Tests: python -m pytest tests/test_align_av.py -q
"""
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn as nn

from .align import AlignConfig, VideoTextModel
from .audio import BEATs, BEATsConfig
from .config import VisionConfig
from .losses import mask_tokens, mlm_loss, vtc_loss, vtm_loss
from .text import BertConfig, BertForMaskedLM

# loss -> (function kind, media); media "v" vision, "a" audio, "av" both. avc (audio vs vision) is apart.
TEXT_LOSSES = {"vtc": ("tc", "v"), "vtm": ("tm", "v"), "mlm": ("mlm", "v"),
               "atc": ("tc", "a"), "atm": ("tm", "a"), "amlm": ("mlm", "a"),
               "avtc": ("tc", "av"), "avtm": ("tm", "av"), "avmlm": ("mlm", "av")}
LOSSES = (*TEXT_LOSSES, "avc")
MATCH_HEADS = {"vtm": "itm_head", "atm": "atm_head", "avtm": "avtm_head"}
AUDIO_LOSSES = tuple(name for name in LOSSES if name == "avc" or TEXT_LOSSES[name][1] != "v")
DEFAULT_LOSS_CAPTION = {"vtc": "caption", "vtm": "caption", "mlm": "caption",
                        "atc": "audio_caption", "atm": "audio_caption", "amlm": "audio_caption",
                        "avtc": "av_caption", "avtm": "av_caption", "avmlm": "av_caption"}


@dataclass
class AudioVisualConfig(AlignConfig):
    """AlignConfig (vision, bert, embed_dim = the official contra_dim, temp, vtc/vtm/mlm weights, masking, token
    ids) plus the audio tower. bert.encoder_width must equal av_concat_dim, not the vision width."""
    audio: BEATsConfig = None           # required (a dict is accepted, as from asdict)
    av_concat_dim: int = 768            # width of the cross-attention memories (official 768)
    loss_atc: float = 0.0               # audio losses, official weights
    loss_avc: float = 0.0
    loss_avtc: float = 1.0
    loss_atm: float = 0.0
    loss_avtm: float = 1.0
    loss_amlm: float = 0.0
    loss_avmlm: float = 1.0
    loss_caption: dict = field(default_factory=lambda: dict(DEFAULT_LOSS_CAPTION))   # loss -> caption key
    freeze_audio: bool = False          # official True (a released, frozen BEATs); the tiny recipe trains it

    def __post_init__(self):
        if isinstance(self.audio, dict):
            self.audio = BEATsConfig(**self.audio)
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        if isinstance(self.bert, dict):
            self.bert = BertConfig(**self.bert)
        problems = []
        if not isinstance(self.audio, BEATsConfig):
            problems.append(f"audio must be a BEATsConfig (or its fields as a dict), got {type(self.audio).__name__}")
        if self.bert.encoder_width != self.av_concat_dim:
            problems.append(f"bert.encoder_width={self.bert.encoder_width} must equal av_concat_dim="
                            f"{self.av_concat_dim} (the fusion layers cross-attend to the av_concat_*_proj memories)")
        for name in LOSSES:
            if getattr(self, f"loss_{name}") < 0:
                problems.append(f"loss_{name}={getattr(self, f'loss_{name}')} must be >= 0")
        unknown = sorted(set(self.loss_caption) - set(TEXT_LOSSES))
        if unknown:
            problems.append(f"loss_caption names unknown losses {unknown} (known: {sorted(TEXT_LOSSES)})")
        lacking = [n for n in TEXT_LOSSES if getattr(self, f"loss_{n}") and n not in self.loss_caption]
        if lacking:
            problems.append(f"loss_caption has no caption key for the weighted losses {lacking}")
        if problems:
            raise ValueError("invalid AudioVisualConfig: " + "; ".join(problems))
        # AlignConfig's own checks on the shared fields; its rule encoder_width == vision width is the one
        # rule that differs here (checked above against av_concat_dim), so it sees the vision width there
        shared = {f.name: getattr(self, f.name) for f in fields(AlignConfig)}
        AlignConfig(**{**shared, "bert": replace(self.bert, encoder_width=self.vision.embed_dim)})

    @property
    def uses_audio(self):
        """The official use_audio(): the audio tower exists only when an audio loss has a weight."""
        return any(getattr(self, f"loss_{name}") for name in AUDIO_LOSSES)

    def caption_keys(self):
        """The caption keys the weighted losses read (forward's texts must hold these)."""
        return sorted({self.loss_caption[n] for n in TEXT_LOSSES if getattr(self, f"loss_{n}")})


class AudioVisualModel(VideoTextModel):
    def __init__(self, cfg: AudioVisualConfig, text_encoder: BertForMaskedLM = None):
        # vision_encoder, text_encoder, vision_proj, text_proj, itm_head, temp: as the video-text model
        super().__init__(cfg, text_encoder)
        W, E = cfg.av_concat_dim, cfg.embed_dim
        self.av_concat_vision_proj = nn.Sequential(nn.Linear(cfg.vision.embed_dim, W), nn.LayerNorm(W))
        # None registers nothing: the state dict then has no such keys, as the official class that never builds them
        self.audio_encoder = self.audio_proj = self.av_concat_audio_proj = None
        self.av_fusion = self.atm_head = self.avtm_head = None
        if cfg.uses_audio:
            self.audio_encoder = BEATs(cfg.audio)
            A = cfg.audio.encoder_embed_dim
            self.audio_proj = nn.Linear(A, E)
            self.av_concat_audio_proj = nn.Sequential(nn.Linear(A, W), nn.LayerNorm(W))
            if cfg.loss_avtc or cfg.loss_avtm:
                self.av_fusion = nn.Linear(2 * E, E)
            if cfg.loss_atm:
                self.atm_head = nn.Linear(cfg.bert.hidden_size, 2)
            if cfg.loss_avtm:
                self.avtm_head = nn.Linear(cfg.bert.hidden_size, 2)
            if cfg.freeze_audio:
                self.audio_encoder.requires_grad_(False)

    def train(self, mode=True):
        """A frozen audio tower stays in eval mode (no dropout, no layer drop) while the rest trains."""
        super().train(mode)
        if self.audio_encoder is not None and self.cfg.freeze_audio:
            self.audio_encoder.eval()
        return self

    def encode_vision(self, video, mask=None):
        """As VideoTextModel.encode_vision, but the tokens are the cross-attention memory
        av_concat_vision_proj(tokens) (B, 1+Nvis, av_concat_dim); pooled (B, clip_embed_dim) is unchanged."""
        tokens, pooled = super().encode_vision(video, mask)
        return self.av_concat_vision_proj(tokens), pooled

    def encode_audio(self, fbank):
        """fbank (B, F, 64) -> (memory (B, Na, av_concat_dim) = av_concat_audio_proj(BEATs tokens),
        pooled (B, encoder_embed_dim) = the BEATs token mean before that projection; audio_proj comes after)."""
        if self.audio_encoder is None:
            raise ValueError("this model has no audio tower: every audio loss weight is 0 (cfg.uses_audio is False)")
        tokens = self.audio_encoder(fbank)                                 # (B, Na, A)
        return self.av_concat_audio_proj(tokens), tokens.mean(1)

    def av_feature(self, audio_proj, vision_proj):
        """The AVTC / AVTM embedding av_fusion(cat(audio_proj, vision_proj)): (B, E), (B, E) -> (B, E)."""
        if self.av_fusion is None:
            raise ValueError("this model has no av_fusion: it is built only when loss_avtc or loss_avtm is on")
        return self.av_fusion(torch.cat([audio_proj, vision_proj], dim=-1))

    def losses(self, video, audio_fbank, texts, idx, **kw):
        """Clamp the stored temp, then run the module (see VideoTextModel.losses for why)."""
        self.clamp_temp()
        return self(video, audio_fbank, texts, idx, **kw)

    def forward(self, video, audio_fbank, texts, idx, mask=None, vtm_negatives=None, mlm_inputs=None):
        """The weighted losses -> {each name in LOSSES, "loss" (their sum), "temp" (detached)}.

        video (B, 3, T, H, W) normalised; audio_fbank (B, F, 64) BEATs features (silence for a clip without
        audio), or None for a batch with no audio at all (e.g. images): then only vtc, vtm, mlm run;
        texts: {caption key: (input_ids, attention_mask) (B, L)} holding cfg.caption_keys(), each loss reading
        texts[cfg.loss_caption[loss]]; idx (B,) sample ids or None; mask: see encode_vision;
        vtm_negatives: {"vtm"|"atm"|"avtm": (vision_neg_idx, text_neg_idx)} replacing those draws;
        mlm_inputs: {"mlm"|"amlm"|"avmlm": (masked_ids, labels)}, a loss missing there draws its own masking
        with mask_tokens (an independent draw per loss, as the official MLMLoss). A 0-weight loss is 0."""
        cfg = self.cfg
        vtm_negatives, mlm_inputs = vtm_negatives or {}, mlm_inputs or {}
        self.clamp_temp()
        weights = {name: getattr(cfg, f"loss_{name}") for name in LOSSES}
        if audio_fbank is None:
            weights = {name: (0.0 if name in AUDIO_LOSSES else w) for name, w in weights.items()}
        active = [name for name, w in weights.items() if w]

        vision_mem, pooled = self.encode_vision(video, mask)               # (B, 1+Nvis, W), (B, Dv)
        media = {"v": (vision_mem, self.vision_proj(pooled))}              # media -> (memory, feature (B, E))
        if any(name in AUDIO_LOSSES for name in active):
            audio_mem, audio_pooled = self.encode_audio(audio_fbank)       # (B, Na, W), (B, A)
            audio_proj = self.audio_proj(audio_pooled)                     # (B, E)
            media["a"] = (audio_mem, audio_proj)
            av_proj = self.av_feature(audio_proj, media["v"][1]) if self.av_fusion is not None else None
            media["av"] = (torch.cat([audio_mem, vision_mem], dim=1), av_proj)   # (B, Na+1+Nvis, W), (B, E)
        text = {}                                                          # caption key -> (ids, atts, tokens, proj)
        # sorted: a fixed order, so dropout draws the same numbers in every process (hash order varies)
        for key in sorted({cfg.loss_caption[name] for name in active if name in TEXT_LOSSES}):
            if key not in texts:
                raise KeyError(f"texts has no caption {key!r} (has {sorted(texts)}); cfg.loss_caption needs it")
            ids, atts = texts[key]
            tokens, feature = self.encode_text(ids, atts)                  # (B, L, H), (B, H)
            text[key] = (ids, atts, tokens, self.text_proj(feature))

        zero = media["v"][1].new_zeros(())
        out = {name: zero for name in LOSSES}
        for name in active:
            if name == "avc":
                out[name] = weights[name] * vtc_loss(media["a"][1], media["v"][1], idx, self.temp, all_gather=True)
                continue
            kind, m = TEXT_LOSSES[name]
            memory, feature = media[m]
            ids, atts, tokens, text_proj = text[cfg.loss_caption[name]]
            if kind == "tc":
                loss = vtc_loss(feature, text_proj, idx, self.temp, all_gather=True)
            elif kind == "tm":
                head = getattr(self, MATCH_HEADS[name])
                loss, _ = vtm_loss(self.text_encoder.bert, head, self.temp, memory, tokens, feature, text_proj, atts,
                                   idx, hard_negatives=cfg.vtm_hard_negatives, negatives=vtm_negatives.get(name))
            else:
                masked_ids, labels = mlm_inputs[name] if name in mlm_inputs else mask_tokens(
                    ids, cfg.bert.vocab_size, cfg.mask_token_id, cfg.bert.pad_token_id, cfg.cls_token_id,
                    prob=cfg.mlm_prob)
                loss = mlm_loss(self.text_encoder, masked_ids, atts, labels, memory)
            out[name] = weights[name] * loss
        out["loss"] = sum(out[name] for name in LOSSES)
        out["temp"] = self.temp.detach().reshape(())
        return out
