"""The stage-3 Q-Former bridge (ivmini/qformer.py) and its loader (ivmini/checkpoint/chat.py).

The reference is written here from the BLIP-2 Q-Former formulas, in float64, directly on a state dict in the
released chat layout (query_tokens, extra_query_tokens, vision_layernorm.*, qformer.bert.*): post-LN BERT layers,
queries prepended without positions, shared self-attention with the (1 - m) * -10000 bias, cross-attention (bias
(1 - m) * finfo.min) for the queries only on layers 0, 2, ..., the queries' own FFN, the text's plain FFN. The
model is loaded from that same dict with load_official("chat_qformer", ...), so every test checks the key map too.
Tiny config (3 layers, 3 heads of 8): the whole file runs in a few seconds.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from ivmini.checkpoint import chat_qformer_from_official, chat_qformer_to_official, load_official

NQ, NE, VW = 5, 3, 20                             # queries, extra queries, vision width
CFG = dict(vocab_size=37, hidden_size=24, num_hidden_layers=3, num_attention_heads=3, intermediate_size=40,
           max_position_embeddings=16, type_vocab_size=2)
H, LAYERS, HEADS, FREQ = CFG["hidden_size"], CFG["num_hidden_layers"], CFG["num_attention_heads"], 2
EPS = 1e-12


def official_sd(seed=0, extra=NE):
    """Random weights in the released key layout, LayerNorm scales around 1; float64 holding float32 values, so
    the loader's float32 model, made float64 after loading, holds exactly these numbers."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.3                         # noqa: E731
    ln = lambda n: {"weight": 1 + r(n), "bias": r(n)}                                 # noqa: E731
    sd = {"query_tokens": r(1, NQ, H), "vision_layernorm.weight": 1 + r(VW), "vision_layernorm.bias": r(VW)}
    if extra:
        sd["extra_query_tokens"] = r(1, extra, H)
    e = "qformer.bert.embeddings."
    sd |= {e + "word_embeddings.weight": r(CFG["vocab_size"], H),
           e + "position_embeddings.weight": r(CFG["max_position_embeddings"], H),
           e + "position_ids": torch.arange(CFG["max_position_embeddings"])[None]}
    sd |= {f"{e}LayerNorm.{k}": v for k, v in ln(H).items()}
    linear = {"attention.self.query": (H, H), "attention.self.key": (H, H), "attention.self.value": (H, H),
              "attention.output.dense": (H, H), "intermediate.dense": (40, H), "output.dense": (H, 40),
              "intermediate_query.dense": (40, H), "output_query.dense": (H, 40)}
    cross = {"crossattention.self.query": (H, H), "crossattention.self.key": (H, VW),
             "crossattention.self.value": (H, VW), "crossattention.output.dense": (H, H)}
    for n in range(LAYERS):
        p = f"qformer.bert.encoder.layer.{n}."
        for name, shape in (linear | (cross if n % FREQ == 0 else {})).items():
            sd[p + name + ".weight"], sd[p + name + ".bias"] = r(*shape), r(shape[0])
        norms = ["attention.output", "output", "output_query"] + (["crossattention.output"] if n % FREQ == 0 else [])
        for name in norms:
            sd |= {f"{p}{name}.LayerNorm.{k}": v for k, v in ln(H).items()}
    return {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}


def load(sd, **kw):
    args = dict(num_query_token=NQ, extra_num_query_token=NE, vision_width=VW) | CFG | kw
    return load_official("chat_qformer", sd, **args).double()


# ---------------------------------------------------------------------------------------------
# reference: BLIP-2 Q-Former formulas on the released keys

def linear(P, name, x):
    return x @ P[name + ".weight"].T + P[name + ".bias"]


def layer_norm(P, name, x):
    return F.layer_norm(x, (x.shape[-1],), P[name + ".weight"], P[name + ".bias"], EPS)


def attend(P, name, x, ctx, bias):
    """BertSelfAttention + BertSelfOutput's dense: softmax(q k^T / sqrt(d) + bias) v, heads split and joined."""
    B, N, _ = x.shape
    d = H // HEADS
    split = lambda t: t.view(B, t.shape[1], HEADS, d).transpose(1, 2)                 # noqa: E731
    q, k, v = (split(linear(P, f"{name}.self.{w}", t)) for w, t in (("query", x), ("key", ctx), ("value", ctx)))
    s = q @ k.transpose(-1, -2) / math.sqrt(d) + bias
    o = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, N, H)
    return linear(P, f"{name}.output.dense", o)


def ref_bert(P, ids, mask, q, v, vmask):
    """Hidden states (embedding output first) of BLIP-2's Qformer bert(ids, mask, query_embeds=q, encoder...)."""
    e = "qformer.bert.embeddings."
    parts = [] if q is None else [q]
    if ids is not None:
        parts.append(P[e + "word_embeddings.weight"][ids] + P[e + "position_embeddings.weight"][:ids.shape[1]])
    x = layer_norm(P, e + "LayerNorm", torch.cat(parts, 1))
    nq = 0 if q is None else q.shape[1]
    self_bias = 0.0 if mask is None else (1.0 - mask.double())[:, None, None, :] * -10000.0
    cross_bias = 0.0 if vmask is None else (1.0 - vmask.double())[:, None, None, :] * torch.finfo(torch.float64).min
    hidden = [x]
    for n in range(LAYERS):
        p = f"qformer.bert.encoder.layer.{n}."
        a = layer_norm(P, p + "attention.output.LayerNorm", x + attend(P, p + "attention", x, x, self_bias))
        aq, at = a[:, :nq], a[:, nq:]
        if nq and n % FREQ == 0:
            aq = layer_norm(P, p + "crossattention.output.LayerNorm",
                            aq + attend(P, p + "crossattention", aq, v, cross_bias))
        outs = []
        for t, inter, out in ((aq, "intermediate_query", "output_query"), (at, "intermediate", "output")):
            h = linear(P, p + out + ".dense", F.gelu(linear(P, p + inter + ".dense", t)))   # exact erf GELU
            outs.append(layer_norm(P, p + out + ".LayerNorm", t + h))
        x = torch.cat(outs, 1)
        hidden.append(x)
    return hidden


def ref_encode_vision(P, vision, ids, text_mask):
    """The released encode_vision after the ViT: vision_layernorm, queries, Q-Former, first Nq+Ne positions."""
    B = vision.shape[0]
    v = layer_norm(P, "vision_layernorm", vision)
    q = torch.cat([P["query_tokens"], P["extra_query_tokens"]], 1).expand(B, -1, -1)
    mask = None if ids is None else torch.cat([torch.ones(B, NQ + NE, dtype=torch.long), text_mask], 1)
    return ref_bert(P, ids, mask, q, v, torch.ones(B, v.shape[1]))[-1][:, :NQ + NE]


def inputs(seed, B=2, L=6, Nv=7):
    """Vision tokens, a left-padded instruction (row 0: 2 pads, row 1: none), its mask, queries, a vision mask."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(B, Nv, VW, generator=g, dtype=torch.float64)
    ids = torch.randint(1, CFG["vocab_size"], (B, L), generator=g)
    text_mask = torch.ones(B, L, dtype=torch.long)
    ids[0, :2], text_mask[0, :2] = 0, 0                                     # [PAD] = 0, on the left
    q = torch.randn(B, NQ + NE, H, generator=g, dtype=torch.float64)
    vmask = torch.ones(B, Nv, dtype=torch.long)
    vmask[1, -3:] = 0
    return v, ids, text_mask, q, vmask


# ---------------------------------------------------------------------------------------------

def test_bert_with_text_matches_blip2_formulas():
    P = official_sd(1)
    qf = load(P)
    v, ids, text_mask, q, vmask = inputs(2)
    mask = torch.cat([torch.ones(2, NQ + NE, dtype=torch.long), text_mask], 1)
    out = qf.bert(ids, mask, query_embeds=q, encoder_hidden_states=v, encoder_attention_mask=vmask,
                  output_hidden_states=True)
    ref = ref_bert(P, ids, mask, q, v, vmask)
    assert out.last_hidden_state.shape == (2, NQ + NE + 6, H)
    assert len(out.hidden_states) == LAYERS + 1
    for i, (a, b) in enumerate(zip(out.hidden_states, ref)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=f"hidden_states[{i}]")
    torch.testing.assert_close(out.last_hidden_state, ref[-1], atol=1e-10, rtol=1e-10)
    assert not torch.allclose(out.hidden_states[1], out.hidden_states[2])   # the order is the layers' order


def test_bert_queries_only_and_text_only():
    P = official_sd(3)
    qf = load(P)
    v, ids, _, q, vmask = inputs(4)
    out = qf.bert(query_embeds=q, encoder_hidden_states=v, encoder_attention_mask=vmask).last_hidden_state
    torch.testing.assert_close(out, ref_bert(P, None, None, q, v, vmask)[-1], atol=1e-10, rtol=1e-10)
    assert out.shape == (2, NQ + NE, H)
    text = qf.bert(ids, output_hidden_states=True)                          # no queries: no cross-attention
    for a, b in zip(text.hidden_states, ref_bert(P, ids, None, None, None, None)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_encode_vision_with_left_padded_instruction():
    P = official_sd(5)
    qf = load(P)
    v, ids, text_mask, _, _ = inputs(6)
    out = qf(v, ids, text_mask)
    assert out.shape == (2, NQ + NE, H)
    torch.testing.assert_close(out, ref_encode_vision(P, v, ids, text_mask), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(qf(v), ref_encode_vision(P, v, None, None), atol=1e-10, rtol=1e-10)
    # the instruction matters, and pads do not: other ids under the mask leave the output as it was
    assert (out - qf(v)).abs().max() > 1e-3
    other = ids.clone()
    other[0, :2] = 7
    torch.testing.assert_close(qf(v, other, text_mask), out, atol=1e-12, rtol=0)
    # positions start at 0 at the first (pad) token: the unpadded row 0 is a different input
    assert (qf(v[:1], ids[:1, 2:], text_mask[:1, 2:]) - out[:1]).abs().max() > 1e-3


def test_queries_use_their_own_ffn_and_text_does_not_cross_attend():
    P = official_sd(7)
    v, ids, text_mask, q, _ = inputs(8)
    mask = torch.cat([torch.ones(2, NQ + NE, dtype=torch.long), text_mask], 1)
    run = lambda P, v: load(P).bert(ids, mask, query_embeds=q, encoder_hidden_states=v,     # noqa: E731
                                    output_hidden_states=True).hidden_states[1]              # layer 0's output
    base = run(P, v)
    # other vision tokens: layer 0 changes the queries only (text does not cross-attend)
    moved = run(P, v + 1.0)
    assert (moved[:, :NQ + NE] - base[:, :NQ + NE]).abs().min() > 0
    torch.testing.assert_close(moved[:, NQ + NE:], base[:, NQ + NE:], atol=0, rtol=0)
    # another query FFN changes the queries only; another text FFN the text only
    for name, changed in (("intermediate_query", slice(0, NQ + NE)), ("intermediate", slice(NQ + NE, None))):
        key = f"qformer.bert.encoder.layer.0.{name}.dense.weight"
        P2 = dict(P) | {key: P[key] * 2}
        out = run(P2, v)
        same = slice(NQ + NE, None) if changed.start == 0 else slice(0, NQ + NE)
        assert (out[:, changed] - base[:, changed]).abs().max() > 1e-3, name
        torch.testing.assert_close(out[:, same], base[:, same], atol=0, rtol=0)


def test_gradients_match_reference():
    P = official_sd(9)
    qf = load(P).train()
    for m in qf.modules():                                                  # dropout off, autograd on
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    v, ids, text_mask, _, _ = inputs(10)
    v.requires_grad_(True)
    w = torch.randn(2, NQ + NE, H, dtype=torch.float64)
    (qf(v, ids, text_mask) * w).sum().backward()
    Pg = {k: t.clone().requires_grad_(t.is_floating_point()) for k, t in P.items()}
    vr = v.detach().clone().requires_grad_(True)
    (ref_encode_vision(Pg, vr, ids, text_mask) * w).sum().backward()
    torch.testing.assert_close(v.grad, vr.grad, atol=1e-9, rtol=1e-9)
    grads = chat_qformer_to_official({k: p.grad for k, p in qf.named_parameters()})
    del grads["qformer.bert.embeddings.position_ids"]                     # written by the map, not a parameter
    for k, g in grads.items():
        assert g is not None, k
        torch.testing.assert_close(g, Pg[k].grad, atol=1e-9, rtol=1e-9, msg=k)
    assert len(grads) == sum(1 for k in P if not k.endswith("position_ids"))


# ---------------------------------------------------------------------------------------------
# loader

def test_key_map_round_trip_and_whole_chat_file():
    P = official_sd(11)
    back = chat_qformer_to_official(chat_qformer_from_official(P))
    assert back.keys() == P.keys() and all(torch.equal(back[k], P[k]) for k in P)
    whole = dict(P) | {"vision_encoder.blocks.0.ls1": torch.ones(4), "project_up.weight": torch.ones(8, H),
                       "lm.base_model.model.lm_head.weight": torch.ones(3, 8)}
    del whole["qformer.bert.embeddings.position_ids"]                     # accepted with or without it
    qf = load(whole)
    assert not qf.training
    torch.testing.assert_close(qf.extra_query_tokens, P["extra_query_tokens"])


def test_loader_names_bad_keys():
    P = official_sd(12)
    missing = {k: v for k, v in P.items() if k != "qformer.bert.encoder.layer.1.output_query.dense.weight"}
    with pytest.raises(KeyError, match=r"missing keys.*layer\.1\.output_query\.dense\.weight"):
        load(missing)
    extra = dict(P) | {"qformer.bert.encoder.layer.1.crossattention.self.query.weight": torch.zeros(H, H)}
    with pytest.raises(KeyError, match=r"unexpected keys.*layer\.1\.crossattention\.self\.query\.weight"):
        load(extra)                                                        # cross_attention_freq=2: no layer-1 cross
    with pytest.raises(KeyError, match=r"missing keys.*extra_query_tokens"):
        load({k: v for k, v in P.items() if k != "extra_query_tokens"})
    with pytest.raises(KeyError, match=r"shape mismatches.*vision_layernorm\.weight"):
        load(P, vision_width=VW + 4)
    with pytest.raises(KeyError, match=r"crossattention"):
        load(P, cross_attention_freq=1)                                    # every layer would cross-attend
    with pytest.raises(TypeError, match="not_a_bert_key"):
        load(P, not_a_bert_key=1)
    load(official_sd(12, extra=0), extra_num_query_token=0)                # no extras: no key


def test_bad_inputs_are_named():
    qf = load(official_sd(13))
    v, ids, text_mask, q, _ = inputs(14)
    with pytest.raises(ValueError, match="vision_width=20"):
        qf(torch.randn(2, 7, VW + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="vision_width=20"):
        qf.bert(query_embeds=q, encoder_hidden_states=torch.randn(2, 7, VW + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        qf.bert(query_embeds=q)
    with pytest.raises(ValueError, match="over the queries and the text"):
        qf.bert(ids, text_mask, query_embeds=q, encoder_hidden_states=v)   # mask over the text only
    with pytest.raises(ValueError, match="covers the instruction only"):
        qf(v, ids, torch.ones(2, NQ + NE + 6, dtype=torch.long))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        qf(v, torch.ones(2, 17, dtype=torch.long))


def test_config_round_trips_through_asdict_and_refuses_stage2_fusion_fields():
    """A checkpoint saves dataclasses.asdict(QFormerConfig); BertConfig fills in fusion_layer = num_hidden_layers,
    which must read back. A stage-2 fusion split or an encoder_width is still refused."""
    import dataclasses
    from ivmini.qformer import QFormerConfig
    cfg = QFormerConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_query_token=3, vision_width=48)
    assert QFormerConfig(**dataclasses.asdict(cfg)) == cfg
    with pytest.raises(ValueError, match="fusion_layer"):
        QFormerConfig(**{**dataclasses.asdict(cfg), "fusion_layer": 1})
    with pytest.raises(ValueError, match="encoder_width"):
        QFormerConfig(**{**dataclasses.asdict(cfg), "encoder_width": 48})
