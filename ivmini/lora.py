"""LoRA (Hu et al. 2021, "Low-Rank Adaptation") for the LLM of stage 3, without peft.

A target projection W (out x in, frozen) gets a trainable low-rank update:

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T        A (r x in), B (out x r)

A starts kaiming-uniform (a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in)), as peft and nn.Linear), B starts at zero,
so a freshly wrapped model computes exactly what the base model does. Dropout acts on the adapter's input only;
the base path never sees it. The released InternVideo2-Chat-8B uses r 16, alpha 32, dropout 0.1 on q, k, v, o,
gate, up, down and lm_head of Mistral-7B (facts §5.1): LoRAConfig's defaults.

ivmini fuses projections (layers.py), so one target may be a ROW SLICE of one Linear, with its own A and B:

    target  module      rows                               peft name (layers.N. = model.layers.N.)
    q       attn.qkv    [0, Hq*d)                          self_attn.q_proj
    k       attn.qkv    [Hq*d, Hq*d + Hkv*d)               self_attn.k_proj
    v       attn.qkv    [Hq*d + Hkv*d, Hq*d + 2*Hkv*d)     self_attn.v_proj
    o       attn.proj   all                                self_attn.o_proj
    gate    mlp.fc1     [0, hidden)                        mlp.gate_proj
    up      mlp.fc1     [hidden, 2*hidden)                 mlp.up_proj
    down    mlp.fc2     all                                mlp.down_proj
    lm_head lm_head     all                                lm_head

A slice's adapter is exactly a separate q_proj/k_proj/... adapter (same shapes, same init law, its own dropout
draw), so the adapter keys map to peft's one line per target:

    layers.N.attn.qkv.lora.q.A   <->  model.layers.N.self_attn.q_proj.lora_A.default.weight   (r, in)
    layers.N.attn.qkv.lora.q.B   <->  model.layers.N.self_attn.q_proj.lora_B.default.weight   (Hq*d, r)

The wrapper (LoRALinear) is an nn.Linear that keeps the base's weight and bias Parameters under their own names,
so the base keys (`layers.N.attn.qkv.weight`) are unchanged and a base checkpoint loads into a wrapped model.
merge_lora folds each adapter into its rows (W[rows] += alpha/r * B A) and puts plain nn.Linear back: the
export for inference, with the base model's keys and no LoRA cost.

Targets are found by type: every self-attention `Attention` (q, k, v, o), every gated `Mlp` (gate, up, down),
and a module named `lm_head`; cross-attentions are left alone. Pass the LLM (not the whole chat model) so the
Q-Former's layers are not wrapped. A tied lm_head is refused: merging would change the embedding table too.
Adapters are created on the base weight's device and dtype.

Test: python -m pytest tests/test_lora.py -q
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ivmini.layers import Attention, Mlp

TARGETS = ("q", "k", "v", "o", "gate", "up", "down", "lm_head")


@dataclass
class LoRAConfig:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.1
    targets: tuple = TARGETS

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown:
            raise ValueError(f"unknown LoRA targets {unknown}; known: {list(TARGETS)}")
        self.targets = tuple(self.targets)

    @property
    def scale(self):
        return self.alpha / self.r


class LoRA(nn.Module):
    """One adapter: (..., in) -> (..., stop - start), the update of output rows [start, stop) of its Linear."""

    def __init__(self, in_features, start, stop, r, scale, dropout, device=None, dtype=None):
        super().__init__()
        self.start, self.stop, self.scale, self.dropout = start, stop, scale, dropout
        self.A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.empty(stop - start, r, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.zeros_(self.B)

    def forward(self, x):
        x = F.dropout(x, self.dropout, self.training)     # the adapter's own draw; the base path sees x
        return F.linear(F.linear(x, self.A), self.B) * self.scale

    def extra_repr(self):
        return f"rows=[{self.start}, {self.stop}), r={self.A.shape[0]}, scale={self.scale}, dropout={self.dropout}"


class LoRALinear(nn.Linear):
    """A frozen nn.Linear plus adapters on row slices of its output, held in `lora` by target name."""

    def __init__(self, base, slices, cfg):
        """base: the nn.Linear to wrap (its Parameters are taken over, not copied); slices: {target: (start, stop)}
        output rows, each getting its own adapter."""
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias     # same Parameter objects: same keys, no copy
        w = base.weight
        self.lora = nn.ModuleDict({t: LoRA(base.in_features, a, b, cfg.r, cfg.scale, cfg.dropout, w.device, w.dtype)
                                   for t, (a, b) in slices.items()})

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)             # (..., out)
        for lora in self.lora.values():
            y[..., lora.start:lora.stop] += lora(x)         # in place: F.linear's backward does not need y
        return y

    @torch.no_grad()
    def merged(self):
        """A plain nn.Linear holding this one's Parameters, each adapter folded into its rows."""
        dtype = torch.promote_types(self.weight.dtype, torch.float32)     # at least fp32 for bf16 weights
        for lora in self.lora.values():
            delta = lora.scale * (lora.B.to(dtype) @ lora.A.to(dtype))    # (rows, in)
            self.weight[lora.start:lora.stop] += delta.to(self.weight.dtype)
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        plain.weight, plain.bias = self.weight, self.bias
        return plain


def _slices(module, targets):
    """{child name: {target: (start, stop)}} for the targets this module holds."""
    found = {}
    if isinstance(module, Attention) and module.kv_dim is None:     # self-attention: qkv rows [q; k; v]
        q_rows, kv_rows = module.num_heads * module.head_dim, module.num_kv_heads * module.head_dim
        rows = {"q": (0, q_rows), "k": (q_rows, q_rows + kv_rows), "v": (q_rows + kv_rows, q_rows + 2 * kv_rows)}
        found["qkv"] = {t: rows[t] for t in ("q", "k", "v") if t in targets}
        found["proj"] = {"o": (0, module.proj.out_features)} if "o" in targets else {}
    elif isinstance(module, Mlp) and module.gated:                   # fc1 rows [gate; up], fc2 = down
        hidden = module.fc2.in_features
        found["fc1"] = {t: rows for t, rows in (("gate", (0, hidden)), ("up", (hidden, 2 * hidden))) if t in targets}
        found["fc2"] = {"down": (0, module.fc2.out_features)} if "down" in targets else {}
    lm_head = dict(module.named_children()).get("lm_head")
    if "lm_head" in targets and isinstance(lm_head, nn.Linear):
        found["lm_head"] = {"lm_head": (0, lm_head.out_features)}
    return {child: s for child, s in found.items() if s}


def apply_lora(model, cfg):
    """Wrap every target projection of `model` in place (LoRALinear) and return the model. Every target in
    cfg.targets must be found at least once; a Linear already wrapped is an error."""
    hits = {t: 0 for t in cfg.targets}
    shared = {}                                          # id(Parameter) -> names, to find a tied lm_head
    for name, p in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(p), []).append(name)
    plan = []
    for name, module in model.named_modules():
        for child, slices in _slices(module, cfg.targets).items():
            plan.append((module, child, slices))
            for t in slices:
                hits[t] += 1
    missing = [t for t, n in hits.items() if n == 0]
    if missing:
        raise ValueError(f"LoRA targets {missing} not found in {type(model).__name__} (q/k/v/o: self-attention "
                         f"Attention modules, gate/up/down: gated Mlp modules, lm_head: a Linear named lm_head)")
    for module, child, slices in plan:
        linear = getattr(module, child)
        if isinstance(linear, LoRALinear):
            raise ValueError(f"{type(module).__name__}.{child} already has LoRA adapters {list(linear.lora)}")
        if child == "lm_head" and len(shared[id(linear.weight)]) > 1:
            raise ValueError(f"lm_head shares its weight with {shared[id(linear.weight)]} (tied embeddings): "
                             f"merging a LoRA on it would change the embeddings too; drop 'lm_head' from targets")
        setattr(module, child, LoRALinear(linear, slices, cfg))
    return model


def _wrapped(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def merge_lora(model):
    """Fold every adapter into its base weight (W[rows] += alpha/r * B @ A) and put plain nn.Linear modules
    back, in place; returns the model. The base Parameters are kept (requires_grad as it was)."""
    wrapped = _wrapped(model)
    if not wrapped:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters to merge")
    for name, m in wrapped:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, m.merged())
    return model


def lora_state_dict(model):
    """The adapters only, {'<module>.lora.<target>.A' | '.B': tensor}: what a LoRA run saves."""
    sd = {}
    for name, m in _wrapped(model):
        for t, lora in m.lora.items():
            sd[f"{name}.lora.{t}.A"], sd[f"{name}.lora.{t}.B"] = lora.A.detach(), lora.B.detach()
    return sd


@torch.no_grad()
def load_lora_state_dict(model, sd):
    """Copy adapters saved by lora_state_dict into a model wrapped with the same targets; strict: every
    missing, unexpected and mis-shaped key is named."""
    own = lora_state_dict(model)
    missing = sorted(k for k in own if k not in sd)
    unexpected = sorted(k for k in sd if k not in own)
    shapes = sorted(f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
                    for k, v in own.items() if k in sd and sd[k].shape != v.shape)
    if missing or unexpected or shapes:
        parts = [f"{what} ({len(keys)}): {', '.join(keys[:20])}{' ...' if len(keys) > 20 else ''}"
                 for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)) if keys]
        raise KeyError("LoRA state dict does not fit the model: " + "; ".join(parts))
    for k, v in own.items():
        v.copy_(sd[k])
    return model


def mark_only_lora_trainable(model):
    """requires_grad = True for the adapters' A and B, False for every other parameter; returns the model."""
    for p in model.parameters():
        p.requires_grad_(False)
    for _, m in _wrapped(model):
        for p in m.lora.parameters():
            p.requires_grad_(True)
    return model
