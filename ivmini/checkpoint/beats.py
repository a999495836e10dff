"""BEATs checkpoints: the official BEATs / InternVideo2 audio-tower layout -> ivmini.audio.BEATs.

    load_beats(src, **cfg)     load_official("beats", ...): src is a path to an official {'cfg': {...}, 'model': {...}}
                               file (its cfg gives the sizes; keywords override it) or a state dict plus BEATsConfig
                               fields as keywords. Strict; the model is returned in eval mode.
    beats_from_official(sd)    the key map

Key map (official -> ivmini), per layer N under `encoder.layers.N.`:
    self_attn.{q,k,v}_proj                      -> attn.qkv   (rows concatenated [q; k; v])
    self_attn.out_proj                          -> attn.proj
    self_attn_layer_norm / final_layer_norm     -> norm1 / norm2
    fc1 / fc2                                   -> mlp.fc1 / mlp.fc2
    self_attn.grep_linear, self_attn.grep_a     -> grep_linear, grep_a
    self_attn.relative_attention_bias.weight    -> encoder.relative_attention_bias.weight (one table)
and encoder.pos_conv.0.{weight_g, weight_v, bias} (torch.nn.utils.weight_norm) or
encoder.pos_conv.0.parametrizations.weight.{original0, original1} (torch.nn.utils.parametrizations.weight_norm:
original0 = g, original1 = v) -> encoder.pos_conv.{weight_g, weight_v, bias}. patch_embedding, layer_norm,
post_extract_proj and encoder.layer_norm keep their names.

The official encoder shares layer 0's relative position table with every layer (one nn.Embedding object), so
its state dict repeats the same tensor under every layer's name; the copies must be equal (an error names the
first layer that differs) and the map keeps one. A file with only layer 0's key loads too.
Tests: tests/test_beats.py.
"""
import dataclasses
import os
import re

import torch

from ..audio import BEATs, BEATsConfig
from .state_dicts import check_keys, read_state_dict

LAYER_MAP = {"self_attn.out_proj": "attn.proj", "self_attn_layer_norm": "norm1", "final_layer_norm": "norm2",
             "fc1": "mlp.fc1", "fc2": "mlp.fc2", "self_attn.grep_linear": "grep_linear",
             "self_attn.grep_a": "grep_a"}
POS_CONV = {"weight_g": "weight_g", "weight_v": "weight_v", "bias": "bias",
            "parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}
LAYER_KEY = re.compile(r"^encoder\.layers\.(\d+)\.(.+?)(?:\.(weight|bias))?$")
REL_TABLE = "self_attn.relative_attention_bias"
QKV = ("q_proj", "k_proj", "v_proj")


def beats_from_official(sd):
    """Official BEATs keys -> ivmini.audio.BEATs keys (see the module docstring). Unknown keys pass through
    unchanged for the strict check to name; a missing part of q/k/v leaves the others unfused (named too)."""
    out, qkv, tables = {}, {}, {}
    for k, v in sd.items():
        if k.startswith("encoder.pos_conv.0."):
            tail = k[len("encoder.pos_conv.0."):]
            out[f"encoder.pos_conv.{POS_CONV.get(tail, tail)}"] = v
            continue
        m = LAYER_KEY.match(k)
        if not m:
            out[k] = v
            continue
        n, mod, kind = m.groups()
        n, suffix = int(n), f".{kind}" if kind else ""
        if mod == REL_TABLE and kind == "weight":
            tables[n] = v
        elif mod.startswith("self_attn.") and mod[len("self_attn."):] in QKV and kind:
            qkv.setdefault((n, kind), {})[mod[len("self_attn."):]] = v
        elif mod in LAYER_MAP:
            out[f"encoder.layers.{n}.{LAYER_MAP[mod]}{suffix}"] = v
        else:
            out[k] = v
    for (n, kind), parts in qkv.items():
        if set(parts) == set(QKV):
            out[f"encoder.layers.{n}.attn.qkv.{kind}"] = torch.cat([parts[p] for p in QKV])   # rows [q; k; v]
        else:
            out.update({f"encoder.layers.{n}.self_attn.{p}.{kind}": t for p, t in parts.items()})
    if tables:
        first = min(tables)
        for n, t in sorted(tables.items()):
            if t.shape != tables[first].shape or not torch.equal(t, tables[first]):
                raise ValueError(f"encoder.layers.{n}.{REL_TABLE}.weight differs from layer {first}'s: the official "
                                 f"encoder shares one relative position table across layers")
        out["encoder.relative_attention_bias.weight"] = tables[first]
    return out


def load_beats(state_dict_or_path, **cfg):
    """ivmini BEATs from an official file or state dict (module docstring); cfg: BEATsConfig fields."""
    fields = {f.name for f in dataclasses.fields(BEATsConfig)}
    unknown = sorted(set(cfg) - fields)
    if unknown:
        raise TypeError(f"unknown BEATsConfig field(s) {unknown}; the fields are {sorted(fields)}")
    src = state_dict_or_path
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"BEATs checkpoint not found: {path}")
        raw = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(raw, dict) or not isinstance(raw.get("cfg"), dict) or "model" not in raw:
            raise ValueError(f"{path}: an official BEATs file is a dict {{'cfg': {{...}}, 'model': {{...}}}}, "
                             f"got {type(raw).__name__} with keys {list(raw)[:5] if isinstance(raw, dict) else ''}")
        file_unknown = sorted(set(raw["cfg"]) - fields)
        if file_unknown:
            raise ValueError(f"{path}: cfg holds field(s) BEATsConfig does not have: {file_unknown}")
        cfg = {**raw["cfg"], **cfg}
        src = raw["model"]
    sd = beats_from_official(read_state_dict(src))
    model = BEATs(BEATsConfig(**cfg))
    sd, _ = check_keys(model, sd)
    model.load_state_dict(sd)
    return model.eval()
