"""Tests of ivmini/chat.py: the prompt layout, the loss mask (answers + eos only), left padding, truncation by
whole turns, the splice of the visual tokens into the LLM's inputs, VideoChat's loss against a hand-computed
cross-entropy, and the HD grid / tiles. A character-level toy tokenizer (one token per character) stands in
for sentencepiece, so a text offset maps to a token offset by hand.
Run: python -m pytest tests/test_chat.py -q
"""
import logging
import string

import pytest
import torch
import torch.nn.functional as F

from ivmini.chat import (IGNORE, VID_PLH, VISUAL_ID, VideoChat, collate, conversation, conversation_text,
                         encode_conversation, encode_prompt, frames_message, hd_grid, hd_tiles, qformer_batch)
from ivmini.config import VisionConfig
from ivmini.llm import llm_config
from ivmini.qformer import QFormerConfig


class CharTokenizer:
    """Toy tokenizer: pad 0, bos 1, eos 2, then one id per printable character."""
    chars = string.printable
    pad_id, bos_id, eos_id = 0, 1, 2
    vocab_size = 3 + len(string.printable)

    def encode(self, text, bos=False, eos=False):
        return [self.bos_id] * bos + [3 + self.chars.index(c) for c in text] + [self.eos_id] * eos

    def decode(self, ids):
        return "".join(self.chars[i - 3] for i in ids if i >= 3)


TOK = CharTokenizer()
QA3 = [{"i": "Watch it.", "q": "what colour?", "a": "red"},
       {"i": "", "q": "what shape?", "a": "a small square"},
       {"i": "", "q": "", "a": "it moves left"}]


def expected_labels(text, answers, n_visual):
    """Labels by hand from the text: one token per character, bos first, the placeholder n_visual tokens,
    each " </s>" one token; the answers " a </s>" supervised."""
    shift = lambda pos: 1 + pos + (n_visual - len(VID_PLH)) - 4 * text[:pos].count(" </s>")  # char -> token
    n = shift(len(text))
    labels = [IGNORE] * n
    start = 0
    for a in answers:
        pos = text.index(" " + a + " </s>", start)
        ids = TOK.encode(" " + a) + [TOK.eos_id]
        labels[shift(pos):shift(pos) + len(ids)] = ids
        start = pos + len(a) + 6
    return labels


@pytest.mark.parametrize("n_turns", [1, 3])
@pytest.mark.parametrize("seconds", [None, [0.0, 1.5, 3.25]])
def test_labels_cover_exactly_the_answers(n_turns, seconds):
    qa = QA3[:n_turns]
    n_visual = 7
    enc = encode_conversation({"video": "v.mp4", "QA": qa}, TOK, n_visual, seconds=seconds)
    msg = frames_message(seconds) if seconds else ""
    text = conversation_text(*conversation(qa, msg=msg))
    want = "Watch it. [INST] <Video>[<VID_PLH>]</Video>" + msg.rstrip() + " [/INST]" + "".join(
        (f" [INST] {t['q']} [/INST]" if t["q"] else "") + f" {t['a']} </s>" for t in qa)
    assert text == want
    if seconds:
        assert msg == " The video contains 3 frames sampled at 0.0, 1.5, 3.2 seconds. "
    assert enc.labels == expected_labels(text, [t["a"] for t in qa], n_visual)
    assert len(enc.ids) == len(enc.labels) and enc.ids[0] == TOK.bos_id and enc.dropped == 0
    assert enc.instruction == "Watch it."
    # the placeholder: n_visual VISUAL_ID right after "<Video>", labels IGNORE there
    start = len(TOK.encode("Watch it. [INST] <Video>")) + 1
    assert enc.ids[start:start + n_visual] == [VISUAL_ID] * n_visual
    assert VISUAL_ID not in enc.ids[:start] + enc.ids[start + n_visual:]
    # supervised ids are the ids themselves (next-token targets), the eos included
    sup = [i for i, lab in zip(enc.ids, enc.labels) if lab != IGNORE]
    assert sup == [x for t in qa for x in TOK.encode(" " + t["a"]) + [TOK.eos_id]]


def test_left_padding_puts_pads_first_and_masks_them():
    a = encode_conversation({"QA": QA3[:1]}, TOK, 3)
    b = encode_conversation({"QA": QA3}, TOK, 3)
    ids, mask, labels = collate([a, b], TOK.pad_id)
    L = len(b.ids)
    n_pad = L - len(a.ids)
    assert ids.shape == mask.shape == labels.shape == (2, L) and n_pad > 0
    assert ids[0, :n_pad].eq(TOK.pad_id).all() and mask[0, :n_pad].eq(0).all() and labels[0, :n_pad].eq(IGNORE).all()
    assert ids[0, n_pad:].tolist() == a.ids and labels[0, n_pad:].tolist() == a.labels and mask[0, n_pad:].eq(1).all()
    assert ids[1].tolist() == b.ids and mask[1].eq(1).all()


def test_truncation_drops_whole_turns(caplog):
    n_visual = 5
    full = encode_conversation({"QA": QA3}, TOK, n_visual)
    two = encode_conversation({"QA": QA3[:2]}, TOK, n_visual)
    with caplog.at_level(logging.WARNING, logger="ivmini.chat"):
        cut = encode_conversation({"QA": QA3}, TOK, n_visual, max_len=len(full.ids) - 1)
    assert cut.dropped == 1 and "1 later turn(s) dropped" in caplog.text
    assert cut.ids == two.ids and cut.labels == two.labels           # never mid-answer: exactly two whole turns
    assert encode_conversation({"QA": QA3}, TOK, n_visual, max_len=len(full.ids)).dropped == 0
    one = encode_conversation({"QA": QA3[:1]}, TOK, n_visual)
    with pytest.raises(ValueError, match="first turn"):
        encode_conversation({"QA": QA3}, TOK, n_visual, max_len=len(one.ids) - 1)
    # a chat prompt drops the EARLIEST history turns and keeps the question
    hist = [("q one", "a one"), ("q two", "a two")]
    whole = encode_prompt("last?", TOK, n_visual, history=hist)
    recent = encode_prompt("last?", TOK, n_visual, history=hist[1:])
    kept = encode_prompt("last?", TOK, n_visual, history=hist, max_len=len(whole.ids) - 1)
    assert kept.dropped == 1 and kept.ids == recent.ids
    assert TOK.decode(whole.ids).endswith("a two [INST] last? [/INST]")


def test_qformer_batch_truncates_left_and_pads_left():
    ids, mask = qformer_batch(["abcdef", "xy"], TOK, max_len=5)
    assert ids[0].tolist() == TOK.encode("cdef", eos=True)            # bos and "ab" cut from the left
    assert ids[1].tolist() == [TOK.pad_id] + TOK.encode("xy", bos=True, eos=True)
    assert mask.tolist() == [[1] * 5, [0, 1, 1, 1, 1]]


# ---------------------------------------------------------------------------------------------
# the model

def tiny_chat(seed=0):
    torch.manual_seed(seed)
    vision = VisionConfig(img_size=28, patch_size=14, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0,
                          attn_pool_num_heads=2, clip_embed_dim=16, num_frames=2, drop_path_rate=0.0, init_values=0.1)
    qformer = QFormerConfig(vocab_size=TOK.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=64, hidden_dropout_prob=0.0,
                            num_query_token=3, extra_num_query_token=2, vision_width=32)
    llm = llm_config("tiny", vocab_size=TOK.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = VideoChat(vision, qformer, llm).eval()
    torch.nn.init.normal_(model.qformer.extra_query_tokens, std=0.02)   # zero-init upstream; give them signal
    return model


def batch(model, records):
    encs = [encode_conversation(r, TOK, model.n_visual) for r in records]
    ids, mask, labels = collate(encs, TOK.pad_id)
    qids, qmask = qformer_batch([e.instruction for e in encs], TOK, 16)
    video = torch.randn(len(records), 3, 2, 28, 28)
    return video, ids, mask, labels, qids, qmask


def test_splice_puts_the_visual_tokens_at_the_placeholders():
    model = tiny_chat()
    assert len(model.vision_encoder.blocks) == 2                         # the penultimate of 3 blocks
    video, ids, mask, labels, qids, qmask = batch(model, [{"QA": QA3[:1]}, {"QA": QA3[:2]}])
    slots = ids == VISUAL_ID
    # a known projection: zero weight, bias b -> every visual token is b
    b = torch.randn(32)
    with torch.no_grad():
        model.project_up.weight.zero_()
        model.project_up.bias.copy_(b)
    visual = model.encode_video(video, qids, qmask)
    assert visual.shape == (2, 5, 32) and torch.equal(visual, b.expand(2, 5, 32))
    emb = model.embed(ids, visual)
    assert torch.equal(emb[slots], b.expand(int(slots.sum()), 32))
    assert torch.equal(emb[~slots], model.lm.embed(ids[~slots]))
    # the LLM sees them: forward = the LLM on hand-built embeddings, and a different b changes the logits
    hand = model.lm.embed(ids.clamp(min=0))
    hand[slots] = b
    _, logits = model(video, ids, mask, None, qids, qmask)
    torch.testing.assert_close(logits, model.lm(inputs_embeds=hand, attention_mask=mask))
    with torch.no_grad():
        model.project_up.bias.add_(1.0)
    _, moved = model(video, ids, mask, None, qids, qmask)
    after = slots.int().cumsum(1) > 0                                    # positions at or after the video
    assert (moved - logits)[after].abs().amax() > 1e-3
    assert torch.equal(moved[~after & mask.bool()], logits[~after & mask.bool()])
    # distinct tokens land in order: sample by sample, left to right (also from a per-sample list)
    rand = torch.randn(2, 5, 32)
    for vis in (rand, list(rand)):
        spliced = model.embed(ids, vis)
        for s in range(2):
            torch.testing.assert_close(spliced[s][slots[s]], rand[s], rtol=0, atol=0)
    with pytest.raises(ValueError, match="placeholder positions"):
        model.embed(ids, visual[:, :4])


def test_forward_loss_is_the_cross_entropy_of_the_supervised_tokens():
    model = tiny_chat(1)
    video, ids, mask, labels, qids, qmask = batch(model, [{"QA": QA3[:1]}, {"QA": QA3}])
    loss, logits = model(video, ids, mask, labels, qids, qmask)
    lp = torch.log_softmax(logits.double(), dim=-1)
    terms = [-lp[b, t, labels[b, t + 1]] for b in range(2) for t in range(ids.shape[1] - 1)
             if labels[b, t + 1] != IGNORE]
    assert len(terms) == int((labels != IGNORE).sum())
    torch.testing.assert_close(loss.double(), torch.stack(terms).mean(), rtol=1e-5, atol=1e-6)
    loss.backward()
    for name in ("vision_encoder.blocks.0.attn.qkv.weight", "qformer.query_tokens", "qformer.extra_query_tokens",
                 "project_up.weight", "lm.layers.0.mlp.fc1.weight"):
        g = dict(model.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name


def test_hd_tiles_through_the_model_and_chat():
    model = tiny_chat(2)
    # sample 0 has 3 tiles, sample 1 one: 3 * 5 and 5 visual tokens
    encs = [encode_conversation({"QA": QA3[:1]}, TOK, 3 * model.n_visual),
            encode_conversation({"QA": QA3[:2]}, TOK, model.n_visual)]
    ids, mask, labels = collate(encs, TOK.pad_id)
    qids, qmask = qformer_batch([e.instruction for e in encs], TOK, 16)
    tiles = [torch.randn(3, 3, 2, 28, 28), torch.randn(1, 3, 2, 28, 28)]
    visual = model.encode_video(tiles, qids, qmask)
    assert [v.shape for v in visual] == [(15, 32), (5, 32)]
    # each tile is encoded alone with its sample's instruction
    alone = model.encode_video(tiles[0][1:2], qids[:1], qmask[:1])
    torch.testing.assert_close(visual[0][5:10], alone[0])
    loss, _ = model(tiles, ids, mask, labels, qids, qmask)
    assert torch.isfinite(loss)
    answer = model.chat(torch.randn(3, 2, 28, 28), "what colour?", TOK, TOK, instruction="Watch it.",
                        history=[("q", "a")], max_new_tokens=4)
    assert isinstance(answer, str) and len(answer) <= 4
    class Wrong(CharTokenizer):
        vocab_size = 7
    with pytest.raises(ValueError, match="vocab_size"):
        model.chat(torch.randn(3, 2, 28, 28), "what colour?", Wrong(), TOK)


# ---------------------------------------------------------------------------------------------
# HD geometry

@pytest.mark.parametrize("height, width, hd_num, want", [
    (224, 224, 6, (1, 1)),     # 1:1 ties with 2x2; the image is too small (50176 <= 0.5*4*224^2) for 2x2
    (448, 448, 6, (2, 2)),     # same tie, 200704 > 100352: the larger grid
    (224, 448, 6, (1, 2)),     # 2:1 -> one row, two columns
    (300, 400, 6, (2, 3)),     # 4:3 -> 3/2 is closest (|1.333 - 1.5| = 0.167 < 0.333)
    (100, 1000, 6, (1, 6)),    # 10:1 -> the widest grid
    (1000, 100, 6, (6, 1)),    # 1:10 -> the tallest
    (500, 1000, 1, (1, 1)),    # hd_num 1: one tile
    (200, 700, 4, (1, 4)),     # 3.5:1, at most 4 tiles: 3/1 and 4/1 tie (0.5); 140000 > 0.5*4*224^2: 4/1
])
def test_hd_grid(height, width, hd_num, want):
    assert hd_grid(height, width, hd_num) == want


def test_hd_grid_is_a_closest_aspect_ratio():
    g = torch.Generator().manual_seed(0)
    for h, w in torch.randint(16, 2000, (50, 2), generator=g).tolist():
        rows, cols = hd_grid(h, w, 6)
        best = min(abs(w / h - c / r) for r in range(1, 7) for c in range(1, 7) if r * c <= 6)
        assert rows * cols <= 6 and abs(w / h - cols / rows) == best


def test_hd_tiles_cover_the_image():
    video = torch.randn(2, 3, 32, 48)                     # (T, C, H, W), 2 x 3 tiles of 16 exactly
    tiles = hd_tiles(video, local=16, hd_num=6)
    assert len(tiles) == 7 and all(t.shape == (2, 3, 16, 16) for t in tiles)
    for r in range(2):
        for c in range(3):
            torch.testing.assert_close(tiles[r * 3 + c], video[..., 16 * r:16 * (r + 1), 16 * c:16 * (c + 1)])
    torch.testing.assert_close(tiles[-1], F.interpolate(video, size=(16, 16), mode="bicubic", align_corners=False))
    odd = hd_tiles(torch.randn(1, 3, 30, 95), local=16, hd_num=6, add_global=False)   # ~3.2:1 -> 1 x 3
    assert len(odd) == 3 and all(t.shape == (1, 3, 16, 16) for t in odd)
    with pytest.raises(ValueError, match="T, C, H, W"):
        hd_tiles(torch.randn(3, 32, 48))
