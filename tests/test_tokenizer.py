"""ivmini/tokenizer.py: the sentencepiece tokenizer of the stage-3 LLM and the tiny one trained on the world.

Round trips over all the world's text, the prompt markers as single ids (the tiny model, and models where
"[INST]" is a control piece as in Mistral v0.3 or plain text as in v0.2), left padding and truncation, the
cache (reused, atomic, the same bytes in any folder), check_vocab and missing files. ~2 s.
Run: python -m pytest tests/test_tokenizer.py -q
"""
import io
import json
import os
import shutil
import threading

import pytest
import sentencepiece as spm
import torch

from ivmini import tokenizer as tk
from ivmini.llm import llm_config
from ivmini.tokenizer import MARKERS, SPTokenizer, check_vocab, tiny_tokenizer, tokenizer_path

PROMPT = ("watch and listen to the video, then answer the question. [INST] <Video></Video> The video contains 8 "
          "frames sampled at 0.1, 0.4 seconds. [/INST] [INST] what colour is the square? [/INST] red </s>"
          " [INST] what does it do first? [/INST] it moves left </s>")     # facts §5.2's conversation layout


def texts(world, split):
    ann = os.path.join(world, "annotations")
    with open(os.path.join(ann, f"stage2_{split}.json")) as f:
        out = [r[k] for r in json.load(f) for k in ("caption", "audio_caption", "av_caption") if k in r]
    with open(os.path.join(ann, f"instruct_{split}.json")) as f:
        out += [s for r in json.load(f) for qa in r["QA"] for s in (qa["i"], qa["q"], qa["a"], *qa["options"])]
    return out


@pytest.fixture
def bare_world(world, tmp_path):
    """A copy of the world's annotations and COMPLETE marker (all the tokenizer reads), with no tokenizer yet."""
    out = tmp_path / "world"
    shutil.copytree(os.path.join(world, "annotations"), out / "annotations")
    shutil.copy(os.path.join(world, "COMPLETE"), out / "COMPLETE")
    return str(out)


@pytest.fixture(scope="module")
def tok(world):
    return tiny_tokenizer(world)


def sp_model(tmp_path, name, **kw):
    """A small sentencepiece model written to tmp_path/name/tokenizer.model (the HF directory layout)."""
    out = io.BytesIO()
    lines = ["a red square moves left", "what colour is it?", "it moves up"] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=out, model_type="bpe",
                                   vocab_size=300, hard_vocab_limit=False, byte_fallback=True,
                                   remove_extra_whitespaces=False, minloglevel=2, num_threads=1, **kw)
    os.makedirs(tmp_path / name)
    (tmp_path / name / "tokenizer.model").write_bytes(out.getvalue())
    return SPTokenizer(str(tmp_path / name))


def test_ids_and_vocab_match_the_tiny_llm(tok):
    cfg = llm_config("tiny")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (cfg.vocab_size, 1, 2, 0)
    check_vocab(tok, cfg)                                  # no error
    assert tok.special_ids["</s>"] == tok.eos_id and tok.special_ids["<s>"] == tok.bos_id


def test_round_trip_over_all_the_worlds_text(tok, world):
    for split in ("train", "val", "test"):                 # val/test text was not trained on
        for t in texts(world, split) + [PROMPT, " leading and trailing  spaces ", "digits 2026, café ☃\n"]:
            ids = tok.encode(t, bos=True, eos=True)
            assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and tok.unk_id not in ids
            assert tok.decode(ids[1:-1]) == t
            if not any(m in t for m in tok.special_ids):
                assert tok.decode(ids, skip_special_tokens=True) == t
            assert tok.decode(torch.tensor(ids)) == "<s>" + t + "</s>"


def test_train_words_are_single_pieces(tok, world):
    words = {w.strip(",.?") for t in texts(world, "train") for w in t.split()}
    assert len(words) > 30
    for w in words:
        assert len(tok.encode(w)) == 1, (w, [tok.sp.id_to_piece(i) for i in tok.encode(w)])
    assert len(tok.encode("a large red square moves left, then moves up")) == 10   # 9 words and ","


def test_markers_are_single_tokens(tok):
    ids = tok.encode(PROMPT)
    for m in MARKERS:                                      # each occurrence is one id (sentencepiece may put
        i = tok.sp.piece_to_id(m)                          # a "▁" before a user-defined piece: <Video> at the
        assert tok.sp.id_to_piece(i) == m                  # start of a text is ["▁", "<Video>"])
        assert tok.encode(m)[-1] == i and tok.decode(tok.encode(m)) == m
        assert ids.count(i) == PROMPT.count(m) > 0
    assert ids.count(tok.eos_id) == 2 and ids[-1] == tok.eos_id          # "</s>" in the text is eos
    assert tok.encode("<Video></Video>")[-2:] == [tok.sp.piece_to_id("<Video>"), tok.sp.piece_to_id("</Video>")]
    # after a marker, the space is the next word's "▁" (no second dummy prefix)
    assert tok.encode("[INST] red") == [tok.sp.piece_to_id("[INST]"), tok.sp.piece_to_id("\u2581red")]


def test_inst_as_control_piece_or_plain_text(tmp_path):
    """Mistral v0.3 has [INST]/[/INST] as control pieces (single ids from text); v0.2 / Llama-2 have none
    (the strings are ordinary text). Both round-trip."""
    v3 = sp_model(tmp_path, "v3", control_symbols=["[INST]", "[/INST]"])
    v2 = sp_model(tmp_path, "v2")
    text = "[INST] what colour is it? [/INST] red</s>"
    ids = v3.encode(text)
    assert ids[0] == v3.sp.piece_to_id("[INST]") and v3.sp.is_control(ids[0])
    assert v3.sp.piece_to_id("[/INST]") in ids and ids[-1] == v3.eos_id
    assert v3.decode(ids) == text and v3.decode(ids, skip_special_tokens=True) == " what colour is it?  red"
    assert "[INST]" not in v2.special_ids and len(v2.encode("[INST]")) > 1
    assert v2.decode(v2.encode(text)) == text and v2.encode(text)[-1] == v2.eos_id
    assert v2.pad_id == 0 and v2.sp.pad_id() == -1         # no pad piece: the documented fallback


def test_left_padding_and_truncation(tok):
    a, b, c = "red", "what colour is the square?", "a large red square moves left, then moves up"
    enc = tok([a, b, c], bos=True, eos=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    L = len(tok.encode(c)) + 2
    assert ids.shape == mask.shape == (3, L) and ids.dtype == mask.dtype == torch.long
    for row, m, t in zip(ids, mask, (a, b, c)):
        want = [tok.bos_id] + tok.encode(t) + [tok.eos_id]
        pad = L - len(want)
        assert row.tolist() == [tok.pad_id] * pad + want and m.tolist() == [0] * pad + [1] * len(want)
    assert not enc["truncated"].any()

    body = tok.encode(c)
    left = tok([a, c], bos=True, max_length=5)             # the newest text stays, bos stays first
    assert left["input_ids"][1].tolist() == [tok.bos_id] + body[-4:]
    assert left["input_ids"][0].tolist() == [tok.pad_id] * 3 + [tok.bos_id] + tok.encode(a)
    assert left["truncated"].tolist() == [False, True]
    right = tok([c], bos=False, eos=True, max_length=5, truncation="right")
    assert right["input_ids"][0].tolist() == body[:4] + [tok.eos_id] and right["truncated"].item()
    fixed = tok(a, padding="max_length", max_length=7)
    assert fixed["input_ids"].shape == (1, 7) and fixed["attention_mask"].sum() == 1 + len(tok.encode(a))

    with pytest.raises(ValueError, match="max_length"):
        tok(a, padding="max_length")
    with pytest.raises(ValueError, match="truncation"):
        tok(a, truncation="middle")
    with pytest.raises(ValueError, match="no room"):
        tok(a, bos=True, eos=True, max_length=2)
    with pytest.raises(TypeError, match="list of str"):
        tok([a, 3])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


def test_cache_reused_and_deterministic(bare_world, tmp_path, monkeypatch):
    path = tokenizer_path(bare_world, 2000)
    assert not os.path.exists(path)
    first = tiny_tokenizer(bare_world)
    assert first.path == path and os.path.isfile(path)
    data, mtime = open(path, "rb").read(), os.stat(path).st_mtime_ns
    assert os.listdir(os.path.dirname(path)) == [os.path.basename(path)]        # no temp file left

    other = tmp_path / "elsewhere"                         # the same world in another folder: the same bytes
    shutil.copytree(bare_world, other)
    shutil.rmtree(other / "tokenizer")
    assert open(tiny_tokenizer(str(other)).path, "rb").read() == data

    def no_training(*a, **k):
        raise AssertionError("retrained although the cached model exists")
    monkeypatch.setattr(tk, "train_sp", no_training)
    again = tiny_tokenizer(bare_world)
    assert again.path == path and os.stat(path).st_mtime_ns == mtime and open(path, "rb").read() == data
    assert again.encode(PROMPT) == first.encode(PROMPT)


def test_concurrent_callers_and_other_sizes(bare_world):
    got, errors = [], []

    def call():
        try:
            got.append(tiny_tokenizer(bare_world, vocab_size=1000).vocab_size)
        except Exception as e:                             # reported below, with the thread's error
            errors.append(e)
    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and got == [1000] * 3
    assert os.listdir(os.path.join(bare_world, "tokenizer")) == [os.path.basename(tokenizer_path(bare_world, 1000))]
    with pytest.raises(ValueError, match="1000 pieces.*vocab_size=2000"):
        check_vocab(tiny_tokenizer(bare_world, vocab_size=1000), llm_config("tiny"))


def test_check_vocab_names_both_sizes(tok):
    with pytest.raises(ValueError, match="2000 pieces.*vocab_size=2048"):
        check_vocab(tok, llm_config("tiny", vocab_size=2048))
    with pytest.raises(ValueError, match="eos_id=2.*eos_token_id=5"):
        check_vocab(tok, llm_config("tiny", eos_token_id=5))


def test_missing_files_are_clear_errors(tmp_path):
    missing = tmp_path / "llm" / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        SPTokenizer(str(missing))
    os.makedirs(tmp_path / "llm")
    with pytest.raises(FileNotFoundError, match=str(missing)):   # a directory without tokenizer.model
        SPTokenizer(str(tmp_path / "llm"))
    with pytest.raises(FileNotFoundError, match="not a finished synthetic world"):
        tiny_tokenizer(str(tmp_path / "llm"))
