"""The Llama/Mistral LLM (ivmini/llm.py) and its HF loader (ivmini/checkpoint/llm.py).

The reference is written here, in float64, from HF-named weights and the published formulas (RMSNorm,
RoPE rotate-half as HF Llama, GQA by repeating kv heads, causal softmax, SwiGLU), independent of
ivmini.layers. Also: left padding, the KV cache against full recomputation (greedy and sampled, token for
token), stop conditions, and loading HF-layout files the test writes (single, sharded, and the named errors).
Run: python -m pytest tests/test_llm.py -q
"""
import json
import math

import pytest
import torch
from safetensors.torch import save_file

from ivmini.checkpoint import check_keys, llm_to_hf, load_llm, load_official, save_hf
from ivmini.checkpoint.llm import llm_config_from_hf
from ivmini.layers import Block
from ivmini.llm import LLM, LLMConfig, llm_config

CFG = dict(vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=300.0, max_position_embeddings=64,
           bos_token_id=1, eos_token_id=2, pad_token_id=0)


# ---------------------------------------------------------------- the independent float64 reference
def rms(x, w, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x, pos, theta):
    """x (B, H, L, d), pos (B, L): HF Llama's rotate-half RoPE. As in HF, the angles and their cos/sin are
    computed in float32 whatever the model dtype (so the float64 reference rounds them the same way)."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)                   # (d/2,) fp32
    ang = torch.cat([pos[:, None, :, None].float() * inv] * 2, -1)             # (B, 1, L, d) fp32
    cos, sin = ang.cos().double(), ang.sin().double()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def ref_layer(x, w, p, cfg, pos, keep):
    """One Llama decoder layer; w: HF-named float64 weights, p: 'model.layers.N.', keep (B, L) bool."""
    B, L, C = x.shape
    H, Hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = C // H
    h = rms(x, w[p + "input_layernorm.weight"], cfg["rms_norm_eps"])
    q = (h @ w[p + "self_attn.q_proj.weight"].T).view(B, L, H, d).transpose(1, 2)
    k = (h @ w[p + "self_attn.k_proj.weight"].T).view(B, L, Hkv, d).transpose(1, 2)
    v = (h @ w[p + "self_attn.v_proj.weight"].T).view(B, L, Hkv, d).transpose(1, 2)
    q, k = rope(q, pos, cfg["rope_theta"]), rope(k, pos, cfg["rope_theta"])
    k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(d)
    allowed = torch.ones(L, L, dtype=torch.bool).tril()[None, None] & keep[:, None, None, :]
    a = s.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num()    # pad queries: no key, zeros
    o = (a @ v).transpose(1, 2).reshape(B, L, C)
    x = x + o @ w[p + "self_attn.o_proj.weight"].T
    h = rms(x, w[p + "post_attention_layernorm.weight"], cfg["rms_norm_eps"])
    g, u = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
    return x + (g * torch.sigmoid(g) * u) @ w[p + "mlp.down_proj.weight"].T


def ref_logits(w, cfg, ids, mask=None):
    keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    pos = (keep.long().cumsum(1) - 1).clamp(min=0)                             # HF position_ids from the mask
    x = w["model.embed_tokens.weight"][ids]
    for n in range(cfg["num_hidden_layers"]):
        x = ref_layer(x, w, f"model.layers.{n}.", cfg, pos, keep)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return rms(x, w["model.norm.weight"], cfg["rms_norm_eps"]) @ head.T


def hf_weights(cfg, seed, tied=False):
    """Random HF-named weights, large enough that every term matters; norms away from 1."""
    g = torch.Generator().manual_seed(seed)
    C, I, V, H, Hkv = (cfg[k] for k in ("hidden_size", "intermediate_size", "vocab_size", "num_attention_heads",
                                         "num_key_value_heads"))
    kvw = Hkv * C // H
    r = lambda *s: torch.randn(*s, generator=g) / math.sqrt(s[-1])       # noqa: E731
    w = {"model.embed_tokens.weight": torch.randn(V, C, generator=g), "model.norm.weight": 1 + 0.3 * r(C)}
    if not tied:
        w["lm_head.weight"] = r(V, C)
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        w.update({p + "input_layernorm.weight": 1 + 0.3 * r(C), p + "post_attention_layernorm.weight": 1 + 0.3 * r(C),
                  p + "self_attn.q_proj.weight": 2 * r(C, C), p + "self_attn.k_proj.weight": 2 * r(kvw, C),
                  p + "self_attn.v_proj.weight": r(kvw, C), p + "self_attn.o_proj.weight": r(C, C),
                  p + "mlp.gate_proj.weight": r(I, C), p + "mlp.up_proj.weight": r(I, C),
                  p + "mlp.down_proj.weight": r(C, I)})
    return w


def write_hf(directory, w, cfg, shards=1):
    """The HF layout, written here without ivmini: config.json + model.safetensors, or shards + index."""
    (directory / "config.json").write_text(json.dumps({**cfg, "architectures": ["MistralForCausalLM"],
                                                       "model_type": "mistral", "hidden_act": "silu",
                                                       "torch_dtype": "float32", "sliding_window": None}))
    if shards == 1:
        save_file(w, str(directory / "model.safetensors"))
        return
    keys, weight_map = sorted(w), {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: w[k].contiguous() for k in keys[i::shards]}
        save_file(part, str(directory / name))
        weight_map.update({k: name for k in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def left_padded(ids, lengths, pad=0):
    """(B, L) ids -> ids with the first L - lengths[b] positions padded, and the mask."""
    L = ids.shape[1]
    mask = torch.arange(L)[None] >= (L - torch.tensor(lengths))[:, None]
    return ids.masked_fill(~mask, pad), mask.long()


@pytest.fixture(scope="module")
def model64(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    w = hf_weights(CFG, seed=0)
    write_hf(d, w, CFG)
    return load_llm(d).double(), {k: v.double() for k, v in w.items()}


# ---------------------------------------------------------------- tests
def test_one_block_matches_reference():
    torch.manual_seed(1)
    C, H, Hkv, I = 48, 6, 2, 56
    blk = Block(C, H, I, norm="rms", norm_eps=1e-5, num_kv_heads=Hkv, causal=True, rope_theta=100.0,
                act="silu", gated=True, bias=False).double()
    for prm in blk.parameters():
        torch.nn.init.normal_(prm, 1.0 if prm.dim() == 1 else 0.0, 0.3 if prm.dim() == 1 else C ** -0.5 * 2)
    kvw = Hkv * C // H
    q, k, v = blk.attn.qkv.weight.split([C, kvw, kvw])
    gate, up = blk.mlp.fc1.weight.split([I, I])
    p = "model.layers.0."
    w = {p + "input_layernorm.weight": blk.norm1.weight, p + "post_attention_layernorm.weight": blk.norm2.weight,
         p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
         p + "self_attn.o_proj.weight": blk.attn.proj.weight, p + "mlp.gate_proj.weight": gate,
         p + "mlp.up_proj.weight": up, p + "mlp.down_proj.weight": blk.mlp.fc2.weight}
    w = {key: t.detach() for key, t in w.items()}
    cfg = dict(num_attention_heads=H, num_key_value_heads=Hkv, rms_norm_eps=1e-5, rope_theta=100.0)
    B, L = 3, 11
    x = torch.randn(B, L, C, dtype=torch.float64)
    keep = torch.ones(B, L, dtype=torch.bool)
    # plain positions 0..L-1, and a RoPE offset (a cache's position) of 5
    expect = ref_layer(x, w, p, cfg, torch.arange(L).expand(B, L), keep)
    torch.testing.assert_close(blk(x), expect, rtol=1e-10, atol=1e-10)
    expect5 = ref_layer(x, w, p, cfg, torch.arange(5, 5 + L).expand(B, L), keep)
    torch.testing.assert_close(blk(x, offset=5), expect5, rtol=1e-10, atol=1e-10)
    # per-sample positions with repeats (as left padding gives): relative distances change, so does the output
    pos = (torch.rand(B, L).lt(0.6).long().cumsum(1) - 1).clamp(min=0)
    expect_pos = ref_layer(x, w, p, cfg, pos, keep)
    torch.testing.assert_close(blk(x, positions=pos), expect_pos, rtol=1e-10, atol=1e-10)
    assert (expect_pos - expect).abs().max() > 1e-2


@pytest.mark.parametrize("tied", [False, True])
def test_model_logits_match_reference(tmp_path, tied):
    cfg = {**CFG, "tie_word_embeddings": tied}
    w = hf_weights(cfg, seed=2, tied=tied)
    write_hf(tmp_path, w, cfg)
    model = load_official("llm", tmp_path).double()
    assert (model.lm_head.weight is model.embed_tokens.weight) == tied
    ids = torch.randint(0, CFG["vocab_size"], (2, 9))
    w64 = {k: v.double() for k, v in w.items()}
    torch.testing.assert_close(model(ids), ref_logits(w64, cfg, ids), rtol=1e-9, atol=1e-9)
    ids, mask = left_padded(ids, [9, 5])
    real = mask.bool()
    torch.testing.assert_close(model(ids, attention_mask=mask)[real], ref_logits(w64, cfg, ids, mask)[real],
                               rtol=1e-9, atol=1e-9)


def test_float32_model_close_to_reference(model64):
    model, w = model64
    m32 = LLM(model.cfg)
    m32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    ids = torch.randint(0, CFG["vocab_size"], (2, 13))
    torch.testing.assert_close(m32(ids).double(), ref_logits(w, CFG, ids), rtol=1e-4, atol=1e-4)


def test_left_padding_gives_unpadded_logits(model64):
    model, _ = model64
    ids = torch.randint(3, CFG["vocab_size"], (3, 10))
    lengths = [10, 4, 7]
    padded, mask = left_padded(ids, lengths)
    out = model(padded, attention_mask=mask)
    assert torch.isfinite(out).all()                               # pad queries see no key: zeros, never NaN
    for b, n in enumerate(lengths):
        alone = model(ids[b:b + 1, -n:])                           # the same real tokens, no padding
        torch.testing.assert_close(out[b:b + 1, -n:], alone, rtol=1e-10, atol=1e-10)


def test_cached_forward_equals_full_forward(model64):
    model, _ = model64
    ids, mask = left_padded(torch.randint(3, CFG["vocab_size"], (2, 12)), [12, 6])
    full = model(ids, attention_mask=mask)
    cache = model.new_cache()
    parts = [model(ids[:, a:b], attention_mask=mask[:, a:b], cache=cache) for a, b in ((0, 7), (7, 8), (8, 12))]
    assert cache.length == 12 and cache.layers[0].k.shape == (2, CFG["num_key_value_heads"], 12, 8)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(parts, 1)[real], full[real], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sample", [False, True])
def test_generate_with_cache_equals_without(model64, sample):
    model, _ = model64
    ids, mask = left_padded(torch.randint(3, CFG["vocab_size"], (3, 8)), [8, 3, 5])
    kw = dict(attention_mask=mask, max_new_tokens=12, eos_token_id=[], do_sample=sample, temperature=0.8,
              top_p=0.9)
    runs = [model.generate(ids, generator=torch.Generator().manual_seed(7), use_cache=c, **kw) for c in (True, False)]
    assert runs[0].shape == (3, 12)
    assert torch.equal(runs[0], runs[1])
    # each sample generates what it generates alone, without padding
    alone = model.generate(ids[1:2, -3:], max_new_tokens=12, eos_token_id=[])
    if not sample:
        assert torch.equal(runs[0][1:2], alone)
    # embeddings in, same tokens out (the path a chat model uses after splicing visual embeddings)
    by_embeds = model.generate(inputs_embeds=model.embed(ids), generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(by_embeds, runs[0])


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([LLM.next_token(logits, True, 1.0, 0.7, g) for _ in range(300)])
    assert set(draws.flatten().tolist()) == {0, 1}                 # 0.5 < 0.7 <= 0.5 + 0.3
    draws = torch.stack([LLM.next_token(logits, True, 1.0, 0.4, g) for _ in range(50)])
    assert set(draws.flatten().tolist()) == {0}


def test_stop_conditions(model64):
    model, _ = model64
    ids = torch.randint(3, CFG["vocab_size"], (2, 6))
    free = model.generate(ids, max_new_tokens=10, eos_token_id=[])
    assert free.shape == (2, 10)
    # a stop token: sample 0 stops at its 4th token (kept), later positions are padding; sample 1 goes on
    stop = int(free[0, 3])
    first = [int((row == stop).nonzero()[0]) if (row == stop).any() else 10 for row in free]
    out = model.generate(ids, max_new_tokens=10, eos_token_id=stop)
    assert out.shape[1] == min(max(first) + 1, 10)
    for b, f in enumerate(first):
        assert torch.equal(out[b, :f + 1], free[b, :f + 1][:out.shape[1]])
        assert (out[b, f + 1:] == CFG["pad_token_id"]).all()
    # a stop string, found in the decoded text of the new tokens
    decode = lambda row: "".join(f"<{t}>" for t in row)          # noqa: E731
    target = f"<{int(free[1, 2])}><{int(free[1, 3])}>"
    ends = [next((t for t in range(10) if target in decode(row[:t + 1].tolist())), 9) for row in free]
    assert ends[1] <= 3
    out = model.generate(ids, max_new_tokens=10, eos_token_id=[], stop_strings=[target], decode=decode)
    assert out.shape[1] == max(ends) + 1
    for b, e in enumerate(ends):
        assert torch.equal(out[b, :e + 1], free[b, :e + 1])         # the stop string's tokens are kept
        assert (out[b, e + 1:] == CFG["pad_token_id"]).all()
    with pytest.raises(ValueError, match="decode"):
        model.generate(ids, stop_strings=["x"])


def test_load_sharded_equals_single(tmp_path, model64):
    _, w = model64
    single, sharded = tmp_path / "one", tmp_path / "three"
    single.mkdir(), sharded.mkdir()
    w32 = {k: v.float() for k, v in w.items()}
    write_hf(single, w32, CFG)
    write_hf(sharded, w32, CFG, shards=3)
    a, b = load_llm(single), load_llm(sharded)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    # ivmini's writer gives the same layout back (round trip), sharded too
    save_hf(a, tmp_path / "out", shard_bytes=20_000)
    c = load_llm(tmp_path / "out")
    assert all(torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())
    assert llm_to_hf(a.state_dict(), a.cfg).keys() == w.keys()


@pytest.mark.parametrize("fault, named", [
    ("missing", "model.layers.1.self_attn.k_proj.weight"),
    ("unexpected", "model.layers.0.self_attn.q_proj.bias"),
    ("shape", r"model.layers.0.mlp.up_proj.weight: checkpoint \(41, 32\) vs config \(40, 32\)"),
])
def test_load_errors_name_the_keys(tmp_path, fault, named):
    w = hf_weights(CFG, seed=3)
    if fault == "missing":
        del w["model.layers.1.self_attn.k_proj.weight"]
    elif fault == "unexpected":
        w["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    else:
        w["model.layers.0.mlp.up_proj.weight"] = torch.zeros(41, 32)
    write_hf(tmp_path, w, CFG)
    with pytest.raises(KeyError, match=named):
        load_llm(tmp_path)


def test_old_rotary_buffers_are_dropped_and_check_keys_passes(tmp_path):
    w = hf_weights(CFG, seed=4)
    w["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    write_hf(tmp_path, w, CFG)
    model = load_llm(tmp_path)
    check_keys(model, model.state_dict())


def test_config_errors_and_presets():
    with pytest.raises(ValueError, match="rope_scaling"):
        llm_config_from_hf({**CFG, "rope_scaling": {"type": "linear", "factor": 2.0}})
    with pytest.raises(ValueError, match="bogus_field"):
        llm_config_from_hf({**CFG, "bogus_field": 1})
    with pytest.raises(ValueError, match="num_key_value_heads"):
        LLMConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=3)
    big = llm_config("mistral-7b")
    assert (big.hidden_size, big.num_key_value_heads, big.vocab_size, big.rope_theta) == (4096, 8, 32768, 1e6)
    n = sum(p.numel() for p in LLM(llm_config("tiny")).parameters())
    assert 3e6 < n < 6e6
    windowed = LLM(LLMConfig(**{**CFG, "sliding_window": 4}))
    with pytest.raises(ValueError, match="sliding_window"):
        windowed(torch.zeros(1, 5, dtype=torch.long))


def test_bfloat16_model_runs_and_stays_close(model64):
    model, w = model64
    bf = LLM(model.cfg)
    bf.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    bf.to(torch.bfloat16)
    ids = torch.randint(3, CFG["vocab_size"], (2, 7))
    out = bf(ids)
    assert out.dtype == torch.bfloat16
    expect = ref_logits(w, CFG, ids)
    assert (out.double() - expect).abs().max() < 0.05 * expect.abs().max()
    assert bf.generate(ids, max_new_tokens=3, eos_token_id=[]).shape == (2, 3)
