"""ivmini/lora.py on a tiny Llama-like stack built here from layers.Block (GQA, RoPE, causal, SwiGLU, untied
lm_head; the LLM module names), float64 on CPU: init equals the base, merge equals the unmerged model and the
hand-merged weights, the sliced forward and every gradient against a formula written out here, slice locality,
dropout only on the adapter path, bad targets, the adapter state dict round trip.

Run: python -m pytest tests/test_lora.py -q
"""
import copy
import io

import pytest
import torch
import torch.nn as nn

from ivmini.layers import Block, RMSNorm
from ivmini.lora import (LoRAConfig, LoRALinear, apply_lora, load_lora_state_dict, lora_state_dict,
                         mark_only_lora_trainable, merge_lora)

D64 = torch.float64
DIM, HEADS, KV_HEADS, HIDDEN, VOCAB, DEPTH = 24, 4, 2, 20, 13, 2
Q_ROWS, KV_ROWS = DIM, KV_HEADS * DIM // HEADS            # 24, 12
CFG = LoRAConfig(r=4, alpha=6.0, dropout=0.1)              # scale 1.5, all eight targets
# (module, target) per layer, as in the released chat model
LAYER_TARGETS = [("attn.qkv", "q"), ("attn.qkv", "k"), ("attn.qkv", "v"), ("attn.proj", "o"),
                 ("mlp.fc1", "gate"), ("mlp.fc1", "up"), ("mlp.fc2", "down")]


def llama_block(gated=True):
    return Block(DIM, HEADS, HIDDEN, num_kv_heads=KV_HEADS, causal=True, rope_theta=10000.0, act="silu",
                 gated=gated, bias=False, norm="rms")


class TinyLM(nn.Module):
    """embed_tokens -> layers.N (Block) -> norm -> lm_head: the LLM's module names, not ivmini.llm."""

    def __init__(self, tied=False):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(llama_block() for _ in range(DEPTH))
        self.norm = RMSNorm(DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)
        if tied:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, ids):
        h = self.embed_tokens(ids)                           # (B, N, DIM)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(self.norm(h))                    # (B, N, VOCAB)


def base_model(seed=0):
    torch.manual_seed(seed)
    return TinyLM().to(D64).eval()


def randomize_adapters(model, seed=1):
    """Non-zero B (and fresh A), so the adapters change the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                for lora in m.lora.values():
                    lora.A.copy_(torch.randn(lora.A.shape, generator=g, dtype=D64) * 0.3)
                    lora.B.copy_(torch.randn(lora.B.shape, generator=g, dtype=D64) * 0.3)
    return model


def ids(seed=2):
    return torch.randint(VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))


def test_defaults_and_init_equals_base():
    cfg = LoRAConfig()
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.scale) == (16, 32.0, 0.1, 2.0)
    assert cfg.targets == ("q", "k", "v", "o", "gate", "up", "down", "lm_head")
    base = base_model()
    x = ids()
    ref = base(x)
    wrapped = apply_lora(copy.deepcopy(base), cfg).train()     # train: dropout is drawn, B = 0 still adds 0
    assert torch.equal(wrapped(x), ref)
    sd, base_sd = wrapped.state_dict(), base.state_dict()
    for k, v in base_sd.items():                               # base keys unchanged, values untouched
        assert torch.equal(sd[k], v), k
    assert set(sd) - set(base_sd) == set(lora_state_dict(wrapped))
    for name, m in wrapped.named_modules():
        if isinstance(m, LoRALinear):
            for t, lora in m.lora.items():
                bound = m.in_features ** -0.5                  # kaiming-uniform a=sqrt(5): U(-1/sqrt(in), 1/sqrt(in))
                assert lora.A.abs().max() <= bound and lora.A.abs().max() > 0.5 * bound, (name, t)
                assert torch.equal(lora.B, torch.zeros_like(lora.B)), (name, t)


def test_merge_equals_unmerged_and_hand_merged_weights():
    base = base_model()
    model = randomize_adapters(apply_lora(copy.deepcopy(base), CFG)).eval()
    x = ids()
    out = model(x)
    assert not torch.allclose(out, base(x), atol=1e-3)       # the adapters do something
    # expected weights: W[rows] + scale * B @ A, rows by target, written out here
    adapters, expected = lora_state_dict(model), {k: v.clone() for k, v in base.state_dict().items()}
    rows = {"q": (0, Q_ROWS), "k": (Q_ROWS, Q_ROWS + KV_ROWS), "v": (Q_ROWS + KV_ROWS, Q_ROWS + 2 * KV_ROWS),
            "o": (0, DIM), "gate": (0, HIDDEN), "up": (HIDDEN, 2 * HIDDEN), "down": (0, DIM)}
    targets = [(f"layers.{i}.{mod}", t, rows[t]) for i in range(DEPTH) for mod, t in LAYER_TARGETS]
    for mod, t, (a, b) in targets + [("lm_head", "lm_head", (0, VOCAB))]:
        expected[f"{mod}.weight"][a:b] += 1.5 * adapters[f"{mod}.lora.{t}.B"] @ adapters[f"{mod}.lora.{t}.A"]
    merged = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert all(type(m) is nn.Linear for name, m in merged.named_modules() if name.endswith(("qkv", "proj", "fc1",
                                                                                           "fc2", "lm_head")))
    sd = merged.state_dict()
    assert set(sd) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(sd[k], v, rtol=1e-13, atol=1e-13, msg=k)
    torch.testing.assert_close(merged(x), out, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        merge_lora(merged)


def test_sliced_forward_and_every_gradient_against_formula():
    torch.manual_seed(3)
    block = apply_lora(llama_block().to(D64), LoRAConfig(r=3, alpha=4.5, dropout=0.0, targets=("q", "k", "v")))
    qkv = randomize_adapters(block).attn.qkv
    x = torch.randn(2, 5, DIM, dtype=D64, requires_grad=True)
    y = qkv(x)
    # the same computation from independent leaf copies: x W^T, then each slice + 1.5 x A^T B^T
    leaf = lambda t: t.detach().clone().requires_grad_()     # noqa: E731
    AB = {t: (leaf(lora.A), leaf(lora.B)) for t, lora in qkv.lora.items()}
    x2, W = leaf(x), leaf(qkv.weight)
    base = x2 @ W.T                                            # (2, 5, 48)
    parts = [base[..., a:b] + 1.5 * (x2 @ AB[t][0].T) @ AB[t][1].T
             for t, (a, b) in (("q", (0, 24)), ("k", (24, 36)), ("v", (36, 48)))]
    y_ref = torch.cat(parts, dim=-1)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(qkv.weight.grad, W.grad, rtol=1e-12, atol=1e-12)
    for t, lora in qkv.lora.items():
        torch.testing.assert_close(lora.A.grad, AB[t][0].grad, rtol=1e-12, atol=1e-12, msg=t)
        torch.testing.assert_close(lora.B.grad, AB[t][1].grad, rtol=1e-12, atol=1e-12, msg=t)


def test_gradients_reach_only_adapters():
    model = mark_only_lora_trainable(randomize_adapters(apply_lora(base_model(), CFG))).train()
    model(ids()).square().mean().backward()
    adapters = set(lora_state_dict(model))
    assert len(adapters) == 2 * (7 * DEPTH + 1)
    for name, p in model.named_parameters():
        if name in adapters:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


@pytest.mark.parametrize("module, rows", [("attn.qkv", {"q": (0, Q_ROWS), "k": (Q_ROWS, Q_ROWS + KV_ROWS),
                                                         "v": (Q_ROWS + KV_ROWS, Q_ROWS + 2 * KV_ROWS)}),
                                          ("mlp.fc1", {"gate": (0, HIDDEN), "up": (HIDDEN, 2 * HIDDEN)})])
def test_each_slice_changes_only_its_rows(module, rows):
    torch.manual_seed(4)
    block = apply_lora(llama_block().to(D64), LoRAConfig(r=2, dropout=0.0, targets=tuple(rows) + ("o", "down")))
    linear = block.get_submodule(module)
    x = torch.randn(3, 4, DIM, dtype=D64)
    base = x @ linear.weight.T
    assert {t: (lora.start, lora.stop) for t, lora in linear.lora.items()} == rows
    for t, (a, b) in rows.items():
        with torch.no_grad():
            for other, lora in linear.lora.items():
                lora.B.copy_(torch.randn_like(lora.B) if other == t else torch.zeros_like(lora.B))
        changed = (linear(x) - base).abs().amax(dim=(0, 1)) > 1e-12    # (out,) rows that moved
        expect = torch.zeros_like(changed)
        expect[a:b] = True
        assert torch.equal(changed, expect), t


def test_dropout_only_on_the_adapter_path():
    """A = B = identity, scale 1, x = 1: the adapter adds dropout(x), i.e. exactly 0 or 1/(1-p) = 2 per input;
    a dropped base input would shift the output by -W x terms instead."""
    torch.manual_seed(5)
    block = Block(8, 2, 8, gated=True, act="silu").to(D64)
    apply_lora(block, LoRAConfig(r=8, alpha=8.0, dropout=0.5, targets=("q", "gate", "up")))
    fc1 = block.mlp.fc1
    with torch.no_grad():
        for lora in fc1.lora.values():
            lora.A.copy_(torch.eye(8, dtype=D64))
            lora.B.copy_(torch.eye(8, dtype=D64))
    x = torch.ones(64, 8, dtype=D64)
    base = x @ fc1.weight.T + fc1.bias
    fc1.train()
    delta = fc1(x) - base                                      # (64, 16): [gate | up]
    near = lambda v: (delta - v).abs() < 1e-12                 # noqa: E731
    assert torch.all(near(0.0) | near(2.0))
    dropped = near(0.0).double().mean().item()
    assert 0.4 < dropped < 0.6, dropped
    assert not torch.equal(near(0.0)[:, :8], near(0.0)[:, 8:])   # gate and up draw their own masks
    fc1.eval()
    torch.testing.assert_close(fc1(x) - base, torch.ones(64, 16, dtype=D64), rtol=0, atol=1e-12)


def test_bad_targets_are_errors_naming_them():
    with pytest.raises(ValueError, match="qproj"):
        LoRAConfig(targets=("q", "qproj"))
    with pytest.raises(ValueError, match="lm_head"):                # a stack without lm_head
        apply_lora(nn.ModuleList([llama_block()]), LoRAConfig())
    with pytest.raises(ValueError, match="gate"):                   # an ungated Mlp has no gate/up slices
        apply_lora(llama_block(gated=False), LoRAConfig(targets=("q", "gate")))
    with pytest.raises(ValueError, match="tied"):
        apply_lora(TinyLM(tied=True), LoRAConfig())
    model = apply_lora(base_model(), CFG)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, CFG)


def test_lora_state_dict_round_trip():
    base = base_model()
    model = randomize_adapters(apply_lora(copy.deepcopy(base), CFG)).eval()
    sd = lora_state_dict(model)
    names = {f"layers.{i}.{mod}.lora.{t}.{p}" for i in range(DEPTH) for mod, t in LAYER_TARGETS for p in "AB"}
    assert set(sd) == names | {"lm_head.lora.lm_head.A", "lm_head.lora.lm_head.B"}
    shapes = {"attn.qkv.lora.q": (DIM, Q_ROWS), "attn.qkv.lora.k": (DIM, KV_ROWS), "attn.proj.lora.o": (DIM, DIM),
              "mlp.fc1.lora.up": (DIM, HIDDEN), "mlp.fc2.lora.down": (HIDDEN, DIM)}
    for key, (fan_in, rows) in shapes.items():
        assert sd[f"layers.1.{key}.A"].shape == (4, fan_in) and sd[f"layers.1.{key}.B"].shape == (rows, 4), key
    assert sd["lm_head.lora.lm_head.B"].shape == (VOCAB, 4)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    fresh = apply_lora(copy.deepcopy(base), CFG).eval()        # new random A, B = 0
    x = ids()
    load_lora_state_dict(fresh, loaded)
    assert torch.equal(fresh(x), model(x))
    bad = dict(loaded)
    del bad["layers.0.attn.qkv.lora.v.B"]
    bad["layers.0.attn.qkv.lora.x.A"] = torch.zeros(4, DIM, dtype=D64)
    bad["lm_head.lora.lm_head.A"] = torch.zeros(4, DIM + 1, dtype=D64)
    with pytest.raises(KeyError) as err:
        load_lora_state_dict(fresh, bad)
    for key in ("layers.0.attn.qkv.lora.v.B", "layers.0.attn.qkv.lora.x.A", "lm_head.lora.lm_head.A"):
        assert key in str(err.value)
