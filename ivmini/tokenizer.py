"""The stage-3 LLM tokenizer: sentencepiece, as Llama and Mistral ship it (`tokenizer.model`), and the tiny one
ivmini trains on the synthetic world for its CPU default (issue 16 item 4; facts §5.1, §5.2).

    SPTokenizer(path)        a sentencepiece model file (or a directory holding tokenizer.model): encode, decode,
                             bos_id / eos_id / pad_id / vocab_size, and tok(texts) -> left-padded batches
    check_vocab(tok, cfg)    a tokenizer whose vocabulary differs from the LLM's embedding rows is a ValueError
    tiny_tokenizer(world)    a small BPE sentencepiece model trained once on the world's train-split text and
                             cached beside it: <world>/tokenizer/tokenizer-v<RECIPE>-<vocab_size>.model

Special strings. A text may contain "<s>", "</s>", "[INST]" and "[/INST]" written literally (the chat prompts
of facts §5.1/§5.2 do: " [INST] q [/INST] a </s>"). Each one that is a piece of the model's vocabulary becomes
that single id, as HF's Mistral tokenizer does with its special tokens: "</s>" -> eos_id; "[INST]"/"[/INST]"
are control pieces (3 and 4) of Mistral v0.3's tokenizer.model, so single ids there (from its published
vocabulary; no real file is read by the tests), while v0.2 and Llama-2 have no such pieces, so there they are
ordinary text ("▁[", "INST", "]"), as in VideoChat2-Mistral's training. The
tiny model has all four prompt markers "[INST]", "[/INST]", "<Video>", "</Video>" as user-defined pieces.
The text between special strings is encoded by sentencepiece; sentencepiece's dummy prefix ("▁" = a space
before the first word) is added only at the start of the text: a segment after a special string that starts
with a space uses that space as its "▁" (" [INST] hi" -> [INST], "▁hi": what HF's non-legacy Llama tokenizer
and mistral_common give). Limit: a segment glued to a special string ("[/INST]hi") still gets a dummy
prefix (HF's legacy behaviour), so it decodes with a space ("[/INST] hi"). decode() is the inverse: pieces
are joined with "▁" read as a space, byte pieces (<0x41>) reassembled, special ids written as their strings
(or dropped with skip_special_tokens=True, which also drops every other control id), and the one dummy
space of the first text piece removed. So decode(encode(t)) == t for every text whose special strings are
followed by a space or the end (tests/test_tokenizer.py checks the world's captions, QA and prompts).

Padding id. Llama/Mistral tokenizer.model files define none (pad_id() = -1; Mistral's config has
pad_token_id None); pad_id is then 0 (the <unk> id; also the tiny LLM preset's pad_token_id). Pad positions
are masked by attention_mask and never supervised, so the id's only job is to be a valid embedding row.

Batches: tok(texts, bos=True, eos=False, max_length=None, padding="longest", truncation="left") ->
{"input_ids", "attention_mask": int64 (B, L), "truncated": bool (B,)}, LEFT-padded (the chat prompts and
the LLM's generate() expect left padding, facts §5.2). A row longer than max_length loses text tokens from
its left (truncation="left": the newest text stays, the chat rule for long histories) or right; bos and eos
stay. Truncation is reported in "truncated"; callers that must not truncate silently warn on it.

The tiny tokenizer. Trained on the world's train split only (stage-2 captions, audio and audio-visual
captions, still captions; QA instructions, questions, answers and options), BPE with byte fallback (any
text encodes, digits as bytes), identity normalisation, no whitespace collapsing and a dummy prefix: the
settings of Llama's tokenizer.model. BPE on this small text stops once every word is one piece (~450
learned pieces for 400 clips); the rest of vocab_size is filled with control pieces "<reserved_K>" (never
produced from text, like Mistral v0.3's [control_K]) so that the vocabulary equals the tiny LLM's embedding
rows exactly. Training reads sentences from memory and writes to memory (no paths inside the model): the
same world gives the same bytes in any folder. The file is written atomically (temp file + os.replace), so
concurrent callers (ranks) are safe: each may train, all write identical bytes, and no reader sees a
partial file; later calls reuse it. Bump RECIPE when the recipe changes (it is part of the file name).

Tests: python -m pytest tests/test_tokenizer.py -q
"""
import io
import json
import os
import tempfile

import sentencepiece as spm
import torch

from .data.synthetic import is_complete
from .llm import LLM_PRESETS
from .text import split_special

SPECIAL_STRINGS = ("<s>", "</s>", "[INST]", "[/INST]")   # single ids when they are pieces of the vocabulary
MARKERS = ("[INST]", "[/INST]", "<Video>", "</Video>")    # the tiny model's user-defined pieces
RECIPE = 1                                                # tiny-tokenizer training recipe version
FALLBACK_PAD_ID = 0                                       # <unk>: for models that define no pad piece


class SPTokenizer:
    """A sentencepiece tokenizer.model (Llama/Mistral, or tiny_tokenizer's). See the module docstring."""

    def __init__(self, path):
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.model")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"sentencepiece model file not found: {path}")
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=path)
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id, self.unk_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else FALLBACK_PAD_ID
        # the special strings this vocabulary has as pieces: text -> id, and back
        self.special_ids = {s: self.sp.piece_to_id(s) for s in SPECIAL_STRINGS
                            if self.sp.id_to_piece(self.sp.piece_to_id(s)) == s}
        self.special_strings = {i: s for s, i in self.special_ids.items()}

    # ------------------------------------------------------------------ one text

    def encode(self, text, bos=False, eos=False):
        """text -> list of ids: [bos] + segments and special ids + [eos]."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = [self.bos_id] if bos else []
        for k, chunk in enumerate(self._split(text)):
            if k % 2:                                   # odd chunks are special strings
                ids.append(self.special_ids[chunk])
            elif chunk:
                ids += self._encode_segment(chunk, first=k == 0)
        return ids + [self.eos_id] if eos else ids

    def decode(self, ids, skip_special_tokens=False):
        """list of ids (or a 1-D tensor) -> text; the inverse of encode (see the module docstring)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        out, first_text = bytearray(), True
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
            if i in self.special_strings:
                if not skip_special_tokens:
                    out += self.special_strings[i].encode()
                if i != self.bos_id:                    # text after a special string has no dummy prefix
                    first_text = False
            elif self.sp.is_control(i):                 # reserved and other control pieces: no text
                continue
            elif self.sp.is_byte(i):
                out.append(int(self.sp.id_to_piece(i)[3:5], 16))    # "<0x41>" -> 0x41
                first_text = False
            elif self.sp.is_unknown(i):
                out += " \u2047 ".encode()              # sentencepiece's rendering of <unk>
                first_text = False
            else:
                piece = self.sp.id_to_piece(i)
                if first_text and piece.startswith("\u2581"):
                    piece = piece[1:]                   # the dummy prefix of the first word
                out += piece.replace("\u2581", " ").encode()
                first_text = False
        return out.decode("utf-8", errors="replace")

    def _encode_segment(self, chunk, first):
        """sentencepiece ids of one segment; after a special string, a leading space is the next word's "▁"
        (sp.encode would add a dummy "▁" of its own); a lone space is the piece "▁"."""
        if first or not chunk.startswith(" "):
            return self.sp.encode(chunk)
        return self.sp.encode(chunk[1:]) if len(chunk) > 1 else [self.sp.piece_to_id("\u2581")]

    def _split(self, text):
        """[text, special, text, special, ..., text] over this vocabulary's special strings."""
        return split_special(text, tuple(self.special_ids))

    # ------------------------------------------------------------------ batches

    def __call__(self, texts, bos=True, eos=False, max_length=None, padding="longest", truncation="left"):
        """texts: a str or a list of str -> {"input_ids", "attention_mask"}: int64 (B, L), LEFT-padded with
        pad_id; "truncated": bool (B,). padding "longest" (L = the longest row) or "max_length"."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"texts must be a str or a non-empty list of str, got {texts!r:.80}")
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
        if truncation not in ("left", "right"):
            raise ValueError(f"truncation must be 'left' or 'right', got {truncation!r}")
        if padding == "max_length" and max_length is None:
            raise ValueError("padding='max_length' needs max_length")
        head, tail = [self.bos_id] * bos, [self.eos_id] * eos
        if max_length is not None and max_length < len(head) + len(tail) + 1:
            raise ValueError(f"max_length={max_length} leaves no room for text between bos/eos")
        rows, truncated = [], []
        for text in texts:
            body = self.encode(text)
            room = None if max_length is None else max_length - len(head) - len(tail)
            cut = room is not None and len(body) > room
            if cut:
                body = body[len(body) - room:] if truncation == "left" else body[:room]
            rows.append(head + body + tail)
            truncated.append(cut)
        L = max_length if padding == "max_length" else max(len(r) for r in rows)
        input_ids = torch.full((len(rows), L), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), L), dtype=torch.long)
        for b, r in enumerate(rows):           # left padding: the row sits at the right end
            input_ids[b, L - len(r):] = torch.tensor(r, dtype=torch.long)
            attention_mask[b, L - len(r):] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "truncated": torch.tensor(truncated)}


def check_vocab(tokenizer, llm_cfg):
    """The tokenizer must index the LLM's embedding rows one to one, with the same bos/eos ids."""
    if tokenizer.vocab_size != llm_cfg.vocab_size:
        raise ValueError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but the LLM has "
                         f"vocab_size={llm_cfg.vocab_size} embedding rows; they must be equal")
    for name, ours, theirs in (("bos", tokenizer.bos_id, llm_cfg.bos_token_id),
                               ("eos", tokenizer.eos_id, llm_cfg.eos_token_id)):
        if theirs is not None and ours != theirs:
            raise ValueError(f"tokenizer {tokenizer.path} has {name}_id={ours} but the LLM config has "
                             f"{name}_token_id={theirs}")


# ---------------------------------------------------------------------- the tiny tokenizer

def world_text(world_dir):
    """The world's train-split text, in file order: captions of every kind, then the QA strings."""
    ann = os.path.join(world_dir, "annotations")
    lines = []
    with open(os.path.join(ann, "stage2_train.json")) as f:
        for r in json.load(f):                  # videos: caption, audio_caption, av_caption; stills: caption
            lines += [r[k] for k in ("caption", "audio_caption", "av_caption") if k in r]
    with open(os.path.join(ann, "instruct_train.json")) as f:
        for r in json.load(f):
            for qa in r["QA"]:
                lines += [qa["i"], qa["q"], qa["a"], *qa["options"]]
    return lines


def train_sp(lines, vocab_size):
    """The bytes of a BPE sentencepiece model of exactly vocab_size pieces trained on lines (see the module
    docstring): one pass finds how many pieces BPE learns, a second fills the rest with <reserved_K>."""
    def train(n_reserved):
        out = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=out, model_type="bpe", vocab_size=vocab_size,
            hard_vocab_limit=False, byte_fallback=True, character_coverage=1.0, split_digits=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=list(MARKERS),
            control_symbols=[f"<reserved_{k}>" for k in range(n_reserved)], num_threads=1, minloglevel=2)
        return out.getvalue()

    model = train(0)
    natural = spm.SentencePieceProcessor(model_proto=model).get_piece_size()
    if natural < vocab_size:
        model = train(vocab_size - natural)
    size = spm.SentencePieceProcessor(model_proto=model).get_piece_size()
    if size != vocab_size:
        raise RuntimeError(f"trained a sentencepiece model of {size} pieces, asked for {vocab_size}")
    return model


def tokenizer_path(world_dir, vocab_size):
    return os.path.join(world_dir, "tokenizer", f"tokenizer-v{RECIPE}-{vocab_size}.model")


def tiny_tokenizer(world_dir, vocab_size=LLM_PRESETS["tiny"].vocab_size):
    """The world's tokenizer: trained on first use, then read from tokenizer_path(world_dir, vocab_size)."""
    path = tokenizer_path(world_dir, vocab_size)
    if not os.path.isfile(path):
        if not is_complete(world_dir):
            raise FileNotFoundError(f"{world_dir} is not a finished synthetic world (no COMPLETE marker); "
                                    f"make one with ivmini.data.synthetic.ensure_world()")
        model = train_sp(world_text(world_dir), vocab_size)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tokenizer-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(model)
            os.replace(tmp, path)               # atomic: readers see no file or the whole file
        except BaseException:
            os.unlink(tmp)
            raise
    return SPTokenizer(path)
