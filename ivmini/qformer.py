"""The stage-3 bridge between the video encoder and the LLM: the BLIP-2 Q-Former of InternVideo2-Chat-8B / VideoChat2.
Facts: ../shared/ref/internvideo2_facts.md §5.1; upstream semantics: BLIP-2 Qformer.py (Ask-Anything video_chat2).

    QFormerConfig  HF BertConfig keywords + num_query_token, extra_num_query_token, vision_width,
                   cross_attention_freq (2), drop_path_rate (linspace over the layers, training only)
    QFormerBert    embeddings (word + absolute position + LayerNorm, no token type; learned queries prepended
                   without a position) -> post-LN layers; `qf.bert(...)` -> BertOutput(last_hidden_state, hidden_states)
    QFormerLayer   one layer, a Block subclass: queries and text share the self-attention; then only the queries
                   cross-attend to the vision tokens (layers 0, freq, 2*freq, ...) and go through their OWN FFN
                   (mlp_query / norm2_query = official intermediate_query / output_query); text takes the plain FFN
    QFormer        the released encode_vision after the ViT: vision_layernorm (eps 1e-12) on every vision token
                   -> [query_tokens | extra_query_tokens] -> Q-Former with the (left-padded) instruction -> the first
                   Nq + Ne positions (B, Nq+Ne, H). project_up to the LLM width belongs to the chat model.

Positions: queries get none; text token i gets position i (0-based) whatever the padding, so a left-padded
instruction puts its pad tokens at positions 0.. (the official behaviour: positions come from the sequence index).
Masks are additive score biases exactly as upstream: self (1 - m) * -10000 over [queries | text], cross
(1 - m) * finfo(dtype).min over the vision tokens; a fully masked row thus gets uniform weights, as upstream.
Attention-probability dropout (attention_probs_dropout_prob) is accepted but not applied (kernels.attention has
none), as in ivmini.text. The variant without text input (upstream deletes word embeddings and the text FFN) is
not built: the released chat model feeds the instruction.

Shapes: vision_tokens (B, N, vision_width); input_ids, attention_mask (B, L) (qf) or attention_mask (B, Nq+Ne+L)
(qf.bert); outputs (B, Nq+Ne, H) (qf), (B, Nq+Ne+L, H) (qf.bert). Checkpoints: ivmini/checkpoint/chat.py.
Tests: python -m pytest tests/test_qformer.py -q (float64 BLIP-2 formulas written in the test, the released layout).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from .layers import Block, Mlp
from .text import BertConfig, BertOutput, init_bert


@dataclass
class QFormerConfig(BertConfig):
    num_query_token: int = 32
    extra_num_query_token: int = 0
    vision_width: int = 1408
    cross_attention_freq: int = 2
    drop_path_rate: float = 0.0                   # upstream qformer_drop_path_rate (0.2 in the chat recipe)
    classifier_dropout: float = None              # an HF BertConfig keyword, accepted: there is no classifier here

    def __post_init__(self):
        # the stage-2 xbert fields of BertConfig have no meaning here: the cross-attention layers are every
        # cross_attention_freq-th from layer 0, with K/V from vision_width
        # fusion_layer == num_hidden_layers is what BertConfig fills in ("no fusion"): a saved config round-trips
        if self.fusion_layer not in (None, self.num_hidden_layers) or self.encoder_width is not None:
            raise ValueError("QFormerConfig takes vision_width and cross_attention_freq, not the stage-2 "
                             f"fusion_layer={self.fusion_layer} / encoder_width={self.encoder_width}")
        super().__post_init__()
        if self.cross_attention_freq < 1:
            raise ValueError(f"cross_attention_freq must be >= 1, got {self.cross_attention_freq}")
        if self.num_query_token < 1 or self.extra_num_query_token < 0:
            raise ValueError(f"need num_query_token >= 1 and extra_num_query_token >= 0, got "
                             f"{self.num_query_token} and {self.extra_num_query_token}")


class QFormerEmbeddings(nn.Module):
    """word + position (0 .. L-1) for the text, the queries prepended as they are, then LayerNorm and dropout
    over all of them. No token-type embedding (type_vocab_size is accepted and unused)."""

    def __init__(self, cfg):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids=None, query_embeds=None):
        parts = [] if query_embeds is None else [query_embeds]                   # (B, Nq, H)
        if input_ids is not None:
            L = input_ids.shape[1]
            if L > self.position_embeddings.num_embeddings:
                raise ValueError(f"{L} text tokens exceed max_position_embeddings="
                                 f"{self.position_embeddings.num_embeddings}")
            parts.append(self.word_embeddings(input_ids) + self.position_embeddings.weight[:L])   # (B, L, H)
        return self.dropout(self.LayerNorm(torch.cat(parts, dim=1)))              # (B, Nq+L, H)


class QFormerLayer(Block):
    """A post-LN BERT layer whose first n_query tokens are queries: shared self-attention, then queries ->
    cross-attention (when built with cross_dim) -> mlp_query / norm2_query, text -> mlp / norm2."""

    def __init__(self, cfg, cross, drop_path=0.0):
        super().__init__(cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, qkv_bias=True,
                         act="gelu", norm="layer", norm_eps=cfg.layer_norm_eps, norm_first=False,
                         dropout=cfg.hidden_dropout_prob, drop_path=drop_path,
                         cross_dim=cfg.vision_width if cross else None)
        self.mlp_query = Mlp(cfg.hidden_size, cfg.intermediate_size, "gelu")
        self.norm2_query = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x, n_query, self_bias=None, context=None, context_bias=None):
        """x (B, n_query + L, H); self_bias (B, 1, 1, n_query + L) or None; context (B, Nv, vision_width) and
        context_bias (B, 1, 1, Nv) or None feed the cross-attention (used only when there are queries)."""
        x = self.sublayer(x, self.norm1, lambda h: self.attn(h, bias=self_bias))
        q, t = x[:, :n_query], x[:, n_query:]                                    # (B, Nq, H), (B, L, H)
        if n_query and self.cross_attn is not None:
            q = self.sublayer(q, self.cross_norm, lambda h: self.cross_attn(h, context, bias=context_bias))
        out = []
        if n_query:
            out.append(self.sublayer(q, self.norm2_query, self.mlp_query))
        if t.shape[1]:
            out.append(self.sublayer(t, self.norm2, self.mlp))
        return torch.cat(out, dim=1)                                              # (B, Nq+L, H)


class QFormerBert(nn.Module):
    """`qformer.bert` of the released model: embeddings + layers (no pooler, no MLM head: upstream sets cls=None)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embeddings = QFormerEmbeddings(cfg)
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.num_hidden_layers, device="cpu").tolist()   # also under
                                                                                # a meta default device
        self.layer = nn.ModuleList(QFormerLayer(cfg, i % cfg.cross_attention_freq == 0, rates[i])
                                   for i in range(cfg.num_hidden_layers))

    def forward(self, input_ids=None, attention_mask=None, *, query_embeds=None, encoder_hidden_states=None,
                encoder_attention_mask=None, output_hidden_states=False):
        """input_ids (B, L) and/or query_embeds (B, Nq, H); attention_mask (B, Nq+L) 0/1 over [queries | text]
        (None: all ones); encoder_hidden_states (B, Nv, vision_width), needed when there are queries (they
        cross-attend); encoder_attention_mask (B, Nv) 0/1 (None: all ones). Returns BertOutput: last_hidden_state
        (B, Nq+L, H), hidden_states (num_hidden_layers + 1 tensors, the embedding output first) when asked."""
        cfg = self.cfg
        if input_ids is None and query_embeds is None:
            raise ValueError("the Q-Former needs input_ids, query_embeds or both")
        if query_embeds is not None and (query_embeds.dim() != 3 or query_embeds.shape[2] != cfg.hidden_size):
            raise ValueError(f"query_embeds {tuple(query_embeds.shape)} must be (B, Nq, hidden_size={cfg.hidden_size})")
        if input_ids is not None and query_embeds is not None and input_ids.shape[0] != query_embeds.shape[0]:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and query_embeds {tuple(query_embeds.shape)} "
                             "differ in batch size")
        n_query = 0 if query_embeds is None else query_embeds.shape[1]
        x = self.embeddings(input_ids, query_embeds)                              # (B, Nq+L, H)
        B, N = x.shape[:2]
        self_bias = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, N):
                raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must be (B, Nq+L) = {(B, N)}: "
                                 "over the queries and the text")
            self_bias = (1.0 - attention_mask.to(x.dtype))[:, None, None, :] * -10000.0   # (B, 1, 1, Nq+L)
        context, context_bias = None, None
        if n_query:
            context, context_bias = self.check_context(B, x.dtype, encoder_hidden_states, encoder_attention_mask)
        hidden = [x] if output_hidden_states else None
        for layer in self.layer:
            x = layer(x, n_query, self_bias, context, context_bias)
            if hidden is not None:
                hidden.append(x)
        return BertOutput(x, tuple(hidden) if hidden is not None else None)

    def check_context(self, B, dtype, states, mask):
        """(vision tokens, their additive cross-attention bias (B, 1, 1, Nv) or None), checked."""
        width = self.cfg.vision_width
        if states is None:
            raise ValueError(f"the queries cross-attend to vision tokens: pass encoder_hidden_states (B, Nv, {width})")
        if states.dim() != 3 or states.shape[0] != B or states.shape[2] != width:
            raise ValueError(f"encoder_hidden_states {tuple(states.shape)} must be (B={B}, Nv, vision_width={width})")
        if mask is None:
            return states, None
        if tuple(mask.shape) != tuple(states.shape[:2]):
            raise ValueError(f"encoder_attention_mask {tuple(mask.shape)} must be (B, Nv) = {tuple(states.shape[:2])}")
        return states, (1.0 - mask.to(dtype))[:, None, None, :] * torch.finfo(dtype).min   # (B, 1, 1, Nv)


class QFormer(nn.Module):
    """The bridge's vision side: vision_layernorm, the learned queries, the Q-Former (`.bert`)."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_layernorm = nn.LayerNorm(cfg.vision_width, eps=1e-12)
        self.query_tokens = nn.Parameter(torch.empty(1, cfg.num_query_token, cfg.hidden_size))
        self.extra_query_tokens = None                # upstream builds it only when extra_num_query_token > 0
        if cfg.extra_num_query_token:
            self.extra_query_tokens = nn.Parameter(torch.empty(1, cfg.extra_num_query_token, cfg.hidden_size))
        self.bert = QFormerBert(cfg)
        self.init_weights()

    def init_weights(self):
        """BERT's initialisation for the Q-Former, query_tokens normal(0, initializer_range), extras zero."""
        init_bert(self.bert, self.cfg)
        nn.init.normal_(self.query_tokens, 0.0, self.cfg.initializer_range)
        if self.extra_query_tokens is not None:
            nn.init.zeros_(self.extra_query_tokens)
        self.vision_layernorm.reset_parameters()

    @property
    def num_queries(self):
        return self.cfg.num_query_token + self.cfg.extra_num_query_token

    def queries(self):
        """(1, Nq+Ne, H): [query_tokens | extra_query_tokens]."""
        if self.extra_query_tokens is None:
            return self.query_tokens
        return torch.cat([self.query_tokens, self.extra_query_tokens], dim=1)

    def forward(self, vision_tokens, input_ids=None, attention_mask=None):
        """vision_tokens (B, N, vision_width) (the ViT's tokens as (B, T*L, C)); input_ids (B, L) the left-padded
        instruction and attention_mask (B, L) over it (1 = token; None: all tokens) -> (B, Nq+Ne, H)."""
        if vision_tokens.dim() != 3 or vision_tokens.shape[2] != self.cfg.vision_width:
            raise ValueError(f"vision_tokens {tuple(vision_tokens.shape)} must be (B, N, vision_width="
                             f"{self.cfg.vision_width}); reshape the ViT output to (B, -1, C)")
        if attention_mask is not None and input_ids is None:
            raise ValueError("attention_mask is over the instruction: pass input_ids with it")
        if input_ids is not None and (input_ids.dim() != 2 or input_ids.shape[0] != vision_tokens.shape[0]):
            raise ValueError(f"input_ids {tuple(input_ids.shape)} must be (B={vision_tokens.shape[0]}, L)")
        B = vision_tokens.shape[0]
        v = self.vision_layernorm(vision_tokens)                                  # (B, N, C)
        q = self.queries().expand(B, -1, -1)                                      # (B, Nq+Ne, H)
        mask = None
        if input_ids is not None:
            text_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            if tuple(text_mask.shape) != tuple(input_ids.shape):
                raise ValueError(f"attention_mask {tuple(text_mask.shape)} must match input_ids "
                                 f"{tuple(input_ids.shape)}: it covers the instruction only")
            mask = torch.cat([text_mask.new_ones(B, q.shape[1]), text_mask], dim=1)   # (B, Nq+Ne+L)
        out = self.bert(input_ids, mask, query_embeds=q, encoder_hidden_states=v).last_hidden_state
        return out[:, :q.shape[1]]                                                # (B, Nq+Ne, H)
