"""The stage-3 video chat model (InternVideo2-Chat / VideoChat2, facts §5.1-5.2): its prompt layout, the
instruction data's token ids and loss mask, the HD tiling geometry, and `VideoChat` itself.

    conversation(qa, ...)          an instruction record's turns as segments; conversation_text() joins them
    encode_conversation(...)       -> Encoded(ids, labels, dropped): training ids with the answers supervised
    encode_prompt(...)             -> Encoded: a chat prompt (history + question) ending at " [/INST]"
    collate(samples, pad_id)       left padding -> ids, attention_mask, labels (B, L)
    qformer_batch(texts, tok, n)   the Q-Former's instruction ids, left-truncated and left-padded
    hd_grid / hd_tiles             the HD mode's aspect-matched grid of 224^2 tiles (+ a global view)
    VideoChat                      vision_encoder -> qformer -> project_up -> spliced into lm's inputs_embeds

Layout (upstream it_dataset_mistral.py, with the released chat's placeholder written in):
    [system][i + " "]"[INST] <Video>[<VID_PLH>]</Video>"[msg.rstrip()]" [/INST]"
    then per QA: " [INST] q [/INST]" (left out when q is empty) and " a </s>".
msg is the optional frame-times message " The video contains N frames sampled at t1, t2, ... seconds. ".
Token ids are built segment by segment, bos first: text segments through tokenizer.encode, the placeholder as
n_visual VISUAL_ID positions (their embeddings are replaced by the visual tokens; HD: n_tiles * n_queries of
them), and "</s>" as the tokenizer's eos id, not as characters. Labels are IGNORE (-100) everywhere except the
answer tokens and their eos (facts §5.2), so the supervised tokens are known exactly, not re-derived by
splitting the text at "[/INST]" as upstream does. Upstream pads on the right and cuts the tail at
max_txt_len (mid-answer if need be); here batches are padded on the LEFT (as ivmini.llm expects) and a
conversation that does not fit loses whole later turns (Encoded.dropped counts them, with a warning); if even
the first turn does not fit it is an error. Not replicated: upstream's `inputs_embeds[:, :1] = bos_token_id`
quirk (facts §5.2); the real BOS embedding is used. The HF chat() spaces its history turns slightly
differently (a + "</s>", "msg[/INST]"); ivmini chats in the layout it trains on.

Tokenizer: any object with encode(text, bos=False, eos=False) -> list[int], decode(ids) -> str, bos_id,
eos_id, pad_id and vocab_size (a sentencepiece wrapper for real models, a toy in the tests).
Shapes: ids, attention_mask, labels (B, L); video (B, C, T, S, S) or a list of per-sample tiles
(K_i, C, T, S, S); visual tokens (B, K*Nq, llm hidden). Tests: python -m pytest tests/test_chat.py -q.
"""
import logging
from dataclasses import dataclass, replace
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from .llm import LLM
from .qformer import QFormer
from .vit import VideoViT

log = logging.getLogger(__name__)

VID_PLH = "[<VID_PLH>]"      # the placeholder as written in the prompt text
VISUAL_ID = -1               # its id: never a vocabulary id, so `ids == VISUAL_ID` marks the visual positions
IGNORE = -100                # label of an unsupervised position (F.cross_entropy's ignore_index)
EOS_TEXT = " </s>"


class Tokenizer(Protocol):
    bos_id: int
    eos_id: int
    pad_id: int
    vocab_size: int

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


# ---------------------------------------------------------------------------------------------
# prompt and data

def frames_message(seconds):
    """The optional second message (upstream add_second_msg): frame times in seconds, one decimal."""
    return f" The video contains {len(seconds)} frames sampled at {', '.join(f'{t:.1f}' for t in seconds)} seconds. "


def conversation(qa, *, instruction=None, msg="", system="", video_text=None):
    """(header, turns): lists of (kind, text) segments, kind in prompt | visual | answer | eos. header is
    the system text, the instruction (default qa[0]["i"]) and the video; each turn one QA. A QA whose "a" is
    None ends at " [/INST]" (the question the model is to answer). video_text: text written where the video
    goes instead of the placeholder (unsupervised; stage 3's phase lm teaches the tiny LLM to read that slot)."""
    if not qa:
        raise ValueError("an instruction record needs at least one QA")
    if instruction is None:
        instruction = qa[0].get("i", "")
    head = system + (instruction + " " if instruction else "") + "[INST] <Video>"
    video = ("visual", VID_PLH) if video_text is None else ("prompt", video_text)
    header = [("prompt", head), video, ("prompt", "</Video>" + msg.rstrip() + " [/INST]")]
    turns = []
    for t in qa:
        turn = [("prompt", f" [INST] {t['q']} [/INST]")] if t.get("q") else []
        if t.get("a") is not None:
            turn += [("answer", " " + t["a"]), ("eos", EOS_TEXT)]
        turns.append(turn)
    return header, turns


def conversation_text(header, turns):
    """The conversation as one string (what upstream feeds its tokenizer, with the placeholder written in)."""
    return "".join(text for seg in [header, *turns] for _, text in seg)


@dataclass
class Encoded:
    ids: list            # bos first; n_visual VISUAL_ID at the placeholder
    labels: list         # IGNORE except the answers and their eos
    dropped: int = 0     # whole turns left out to fit max_len
    instruction: str = ""   # the Q-Former's text: the record's qa[0]["i"]


def encode_segments(segments, tokenizer, n_visual):
    """(ids, labels) of a list of segments."""
    ids, labels = [], []
    for kind, text in segments:
        if kind == "visual":
            new = [VISUAL_ID] * n_visual
        elif kind == "eos":
            new = [tokenizer.eos_id]
        else:
            new = tokenizer.encode(text, bos=False, eos=False)
        ids += new
        labels += new if kind in ("answer", "eos") else [IGNORE] * len(new)
    return ids, labels


def fit(header, turns, tokenizer, n_visual, max_len, keep):
    """Encode bos + header + turns, dropping whole turns until it fits max_len (None: no limit):
    keep="first" drops later turns (training), keep="last" the earliest (a chat's history)."""
    head_ids, head_labels = encode_segments(header, tokenizer, n_visual)
    parts = [encode_segments(t, tokenizer, n_visual) for t in turns]
    used = 1 + len(head_ids)
    kept = []
    order = parts if keep == "first" else parts[::-1]
    for i, (ids, labels) in enumerate(order):
        if max_len is not None and used + len(ids) > max_len:
            if i == 0:
                raise ValueError(f"the conversation's {'first' if keep == 'first' else 'last'} turn needs "
                                 f"{used + len(ids)} tokens ({n_visual} visual), more than max_len={max_len}")
            break
        kept.append((ids, labels))
        used += len(ids)
    if keep == "last":
        kept = kept[::-1]
    dropped = len(parts) - len(kept)
    if dropped:
        log.warning("conversation of %d turns does not fit max_len=%d: %d %s turn(s) dropped",
                    len(parts), max_len, dropped, "later" if keep == "first" else "earlier")
    ids = [tokenizer.bos_id] + head_ids + [i for p, _ in kept for i in p]
    labels = [IGNORE] + head_labels + [lab for _, p in kept for lab in p]
    return Encoded(ids, labels, dropped)


def encode_conversation(record, tokenizer, n_visual, max_len=None, *, seconds=None, system="", video_text=None):
    """Training ids and labels of an instruction record {"video", "QA": [{"i", "q", "a"}, ...]}; seconds:
    the sampled frame times for the frame message (None: no message); video_text: see conversation()."""
    if any(t.get("a") is None for t in record["QA"]):
        raise ValueError("every training QA needs an answer 'a'")
    msg = frames_message(seconds) if seconds is not None else ""
    header, turns = conversation(record["QA"], msg=msg, system=system, video_text=video_text)
    enc = fit(header, turns, tokenizer, n_visual, max_len, keep="first")
    enc.instruction = record["QA"][0].get("i", "")
    return enc


def encode_prompt(question, tokenizer, n_visual, *, history=(), instruction="", seconds=None, system="",
                  max_len=None):
    """A chat prompt: the video, history [(q, a), ...], then the question, ending at " [/INST]". The earliest
    history turns are dropped (with a warning) to fit max_len."""
    qa = [{"q": q, "a": a} for q, a in history] + [{"q": question, "a": None}]
    msg = frames_message(seconds) if seconds is not None else ""
    header, turns = conversation(qa, instruction=instruction, msg=msg, system=system)
    enc = fit(header, turns, tokenizer, n_visual, max_len, keep="last")
    enc.instruction = instruction
    return enc


def pad_left(rows, pad):
    """list of int lists -> (B, L) long tensor left-padded with `pad`, and its (B, L) 0/1 mask."""
    L = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (L - len(r)) + list(r) for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return ids, mask


def collate(samples, pad_id):
    """Encoded samples -> ids, attention_mask, labels (B, L), padded on the left (pads: labels IGNORE)."""
    ids, mask = pad_left([s.ids for s in samples], pad_id)
    labels, _ = pad_left([s.labels for s in samples], IGNORE)
    return ids, mask, labels


def qformer_batch(texts, tokenizer, max_len):
    """The Q-Former's instruction: encode(text, bos, eos) (BERT: [DEC]/[CLS] ... [SEP]), keeping the LAST
    max_len tokens (upstream truncation_side="left"), left-padded -> ids, mask (B, L)."""
    rows = [tokenizer.encode(t, bos=True, eos=True)[-max_len:] for t in texts]
    return pad_left(rows, tokenizer.pad_id)


# ---------------------------------------------------------------------------------------------
# HD tiling (upstream hd_utils.py HD_transform_no_padding, the InternVL-1.5 rule; facts §5.2 HD)

def hd_grid(height, width, hd_num=6, local=224):
    """(rows, cols) with rows * cols <= hd_num whose aspect cols/rows is closest to width/height. Candidates
    are visited by area (ascending); an equal distance replaces the best so far when the image's area exceeds
    half the candidate's area in local^2 tiles, so a large image takes the larger of two equally close grids.
    (Upstream orders candidates of one area by Python's set iteration; this visits them by cols. The two can
    differ only on an exact tie between two grids of equal area, such as 1x2 vs 2x1 at aspect 5:4.)"""
    if height <= 0 or width <= 0 or hd_num < 1:
        raise ValueError(f"need height, width > 0 and hd_num >= 1, got {height}, {width}, {hd_num}")
    aspect = width / height
    candidates = sorted(((c, r) for c in range(1, hd_num + 1) for r in range(1, hd_num + 1) if c * r <= hd_num),
                        key=lambda g: (g[0] * g[1], g[0]))
    best, best_diff = (1, 1), float("inf")
    for c, r in candidates:
        diff = abs(aspect - c / r)
        if diff < best_diff:
            best, best_diff = (c, r), diff
        elif diff == best_diff and width * height > 0.5 * local * local * c * r:
            best = (c, r)
    return best[1], best[0]


def hd_tiles(video, local=224, hd_num=6, add_global=True):
    """video (T, C, H, W) -> [(T, C, local, local), ...]: resized (bicubic) to the hd_grid, split into
    rows x cols tiles in row-major order, then (add_global) the resized video shrunk to one tile, last."""
    if video.dim() != 4:
        raise ValueError(f"video must be (T, C, H, W), got {tuple(video.shape)}")
    rows, cols = hd_grid(video.shape[2], video.shape[3], hd_num, local)
    big = F.interpolate(video.float(), size=(rows * local, cols * local), mode="bicubic", align_corners=False)
    T, C = big.shape[:2]
    tiles = big.view(T, C, rows, local, cols, local).permute(2, 4, 0, 1, 3, 5)   # (rows, cols, T, C, l, l)
    out = list(tiles.reshape(rows * cols, T, C, local, local))
    if add_global:
        out.append(F.interpolate(big, size=(local, local), mode="bicubic", align_corners=False))
    return [t.to(video.dtype) for t in out]


# ---------------------------------------------------------------------------------------------
# the model

class VideoChat(nn.Module):
    """vision_encoder (VideoViT, depth - 1 blocks: the stage-2 encoder's penultimate output, as the released
    model builds 39 of the 1B's 40 blocks; x_vis_only, no pooling) -> qformer (with the instruction) ->
    project_up -> the LLM (`lm`), the visual tokens replacing the VISUAL_ID positions of its inputs."""

    def __init__(self, vision_cfg, qformer_cfg, llm_cfg):
        super().__init__()
        if vision_cfg.depth < 2:
            raise ValueError(f"the chat model reads the penultimate block: vision depth {vision_cfg.depth} < 2")
        if qformer_cfg.vision_width != vision_cfg.embed_dim:
            raise ValueError(f"qformer vision_width={qformer_cfg.vision_width} != vision embed_dim="
                             f"{vision_cfg.embed_dim}")
        self.vision_encoder = VideoViT(replace(vision_cfg, depth=vision_cfg.depth - 1, heads="none"))
        del self.vision_encoder.clip_projector      # x_vis_only: the released chat ViT has no pooling head
        self.qformer = QFormer(qformer_cfg)
        self.project_up = nn.Linear(qformer_cfg.hidden_size, llm_cfg.hidden_size)
        # LLM width -> Q-Former width: in the released model only for its optional vision-regression loss (off,
        # never called in forward); kept so the released file's project_down.* loads key for key
        self.project_down = nn.Linear(llm_cfg.hidden_size, qformer_cfg.hidden_size)
        self.lm = LLM(llm_cfg)

    @property
    def n_visual(self):
        """Visual tokens per video tile."""
        return self.qformer.num_queries

    def encode_video(self, video, qformer_ids=None, qformer_mask=None):
        """video (B, C, T, S, S) -> (B, Nq, llm hidden); or a list of B per-sample tiles (K_i, C, T, S, S)
        -> list of (K_i * Nq, llm hidden), each tile encoded with its sample's instruction, tiles in order."""
        if isinstance(video, (list, tuple)):
            counts = [v.shape[0] for v in video]
            if qformer_ids is not None and qformer_ids.shape[0] != len(counts):
                raise ValueError(f"{len(counts)} videos but {qformer_ids.shape[0]} Q-Former instructions")
            tiles = torch.cat(list(video), dim=0)                                    # (sum K_i, C, T, S, S)
            rep = torch.tensor(counts, device=tiles.device)
            ids = qformer_ids.repeat_interleave(rep, dim=0) if qformer_ids is not None else None
            mask = qformer_mask.repeat_interleave(rep, dim=0) if qformer_mask is not None else None
            out = self.encode_video(tiles, ids, mask)                                # (sum K_i, Nq, D)
            return [o.flatten(0, 1) for o in out.split(counts)]                      # [(K_i * Nq, D)]
        x = self.vision_encoder(video, pool=False).tokens                           # (B, 1 + T*L, C)
        q = self.qformer(x, qformer_ids, qformer_mask)                               # (B, Nq, H_qformer)
        return self.project_up(q)                                                    # (B, Nq, D)

    def embed(self, ids, visual):
        """inputs_embeds (B, L, D): token embeddings, with the visual tokens written in order into the
        VISUAL_ID positions (sample by sample, left to right). visual: (B, N, D) or a list of (N_i, D)."""
        slots = ids == VISUAL_ID                                                     # (B, L) bool
        vis = torch.cat(list(visual), dim=0) if isinstance(visual, (list, tuple)) else visual.flatten(0, 1)
        if int(slots.sum()) != vis.shape[0]:
            raise ValueError(f"{int(slots.sum())} placeholder positions in the ids but {vis.shape[0]} visual "
                             "tokens: n_visual of the prompt must equal the tiles x queries encoded")
        x = self.lm.embed(ids.masked_fill(slots, 0))                                  # (B, L, D)
        return x.masked_scatter(slots[..., None], vis.to(x.dtype))

    def forward(self, video, ids, attention_mask=None, labels=None, qformer_ids=None, qformer_mask=None):
        """-> (loss or None, logits (B, L, V)); loss = mean cross-entropy of the supervised next tokens
        (labels[:, 1:] against logits[:, :-1], IGNORE skipped). video None: text only (ids without placeholders;
        stage 3's phase lm), still through this forward so that a sharded model gathers its weights."""
        if video is None:
            logits = self.lm(ids, attention_mask=attention_mask)
        else:
            visual = self.encode_video(video, qformer_ids, qformer_mask)
            logits = self.lm(inputs_embeds=self.embed(ids, visual), attention_mask=attention_mask)
        if labels is None:
            return None, logits
        if not bool((labels[:, 1:] != IGNORE).any()):
            raise ValueError("no supervised token in the batch (every label is IGNORE)")
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)
        return loss, logits

    @torch.no_grad()
    def chat(self, video, question, tokenizer, qformer_tokenizer, *, history=(), instruction="", seconds=None,
             system="", max_len=None, qformer_max_len=512, **generate_kw):
        """Answer `question` about one video ((C, T, S, S), or (K, C, T, S, S) HD tiles) -> the answer text.
        history: [(q, a), ...] earlier turns (the earliest dropped with a warning to fit max_len, default
        the LLM's max_position_embeddings); generate_kw go to lm.generate (max_new_tokens, do_sample, ...)."""
        if tokenizer.vocab_size != self.lm.cfg.vocab_size:
            raise ValueError(f"tokenizer vocab_size {tokenizer.vocab_size} != the LLM's embedding rows "
                             f"{self.lm.cfg.vocab_size}")
        tiles = video[None] if video.dim() == 4 else video                          # (K, C, T, S, S)
        max_len = max_len or self.lm.cfg.max_position_embeddings
        enc = encode_prompt(question, tokenizer, tiles.shape[0] * self.n_visual, history=history,
                            instruction=instruction, seconds=seconds, system=system, max_len=max_len)
        device = self.project_up.weight.device
        qids, qmask = qformer_batch([instruction], qformer_tokenizer, qformer_max_len)
        visual = self.encode_video([tiles.to(device)], qids.to(device), qmask.to(device))
        ids = torch.tensor([enc.ids], device=device)                                 # (1, L)
        out = self.lm.generate(inputs_embeds=self.embed(ids, visual), eos_token_id=tokenizer.eos_id, **generate_kw)
        answer = out[0].tolist()
        if tokenizer.eos_id in answer:                   # the positions after the first eos are filler
            answer = answer[:answer.index(tokenizer.eos_id)]
        return tokenizer.decode(answer).strip()
