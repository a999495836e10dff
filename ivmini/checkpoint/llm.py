"""HF Llama/Mistral checkpoints <-> ivmini.llm.LLM: the key map, the config.json reader, the safetensors files.

    load_llm(src, config=None, **overrides)   load_official("llm", ...): src is an HF model directory
                        (config.json + model.safetensors, or shards listed in model.safetensors.index.json),
                        a single .safetensors/.bin file or a state dict (then config= an LLMConfig or a preset
                        name). Strict; the model is returned in eval mode.
    llm_config_from_hf(d)    an HF config.json dict -> LLMConfig (unknown or unsupported fields are errors)
    llm_from_hf(sd, cfg), llm_to_hf(sd, cfg)   the key map both ways
    save_hf(model, directory, shard_bytes=None)  write the HF layout (one file, or shards + index)

Key map (HF -> ivmini), per layer N (`model.layers.N.` -> `layers.N.`):
    self_attn.{q,k,v}_proj.weight        -> attn.qkv.weight   (rows concatenated [q; k; v])
    self_attn.o_proj.weight              -> attn.proj.weight
    mlp.{gate,up}_proj.weight            -> mlp.fc1.weight    (rows concatenated [gate; up])
    mlp.down_proj.weight                 -> mlp.fc2.weight
    input_layernorm / post_attention_layernorm .weight -> norm1 / norm2 .weight
and model.embed_tokens.weight -> embed_tokens.weight, model.norm.weight -> norm.weight, lm_head.weight ->
lm_head.weight (absent when tie_word_embeddings: the head is the embedding). Old Llama files also hold
`self_attn.rotary_emb.inv_freq` buffers: they are recomputed from rope_theta, so they are dropped by name.

Strictness: the file is checked in its own names first (every missing, unexpected and mis-shaped HF key is
named, with the shape the config implies), then the converted dict goes through state_dicts.check_keys.
Tests: tests/test_llm.py (files written by the test in both layouts).
"""
import json
import logging
import os
import re

import torch

from ..llm import LLM, LLM_PRESETS, LLMConfig, llm_config
from .state_dicts import check_keys, key_problems, read_state_dict

log = logging.getLogger("ivmini.checkpoint")

ROTARY_BUFFER = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
# config.json fields that do not change the numerics (bookkeeping, training-only or HF-runtime options)
HF_INFO_FIELDS = {"architectures", "model_type", "torch_dtype", "transformers_version", "use_cache",
                  "attention_dropout", "pretraining_tp", "_name_or_path", "hidden_act", "attention_bias",
                  "mlp_bias", "rope_scaling", "head_dim"}


def llm_config_from_hf(d, **overrides):
    """LLMConfig from a LlamaConfig/MistralConfig dict. Fields that would change the model ivmini cannot build
    (another activation, biases, rope_scaling, a head_dim other than hidden/heads) are errors, as is any field
    LLMConfig does not know and HF_INFO_FIELDS does not list."""
    d = {**d, **overrides}
    act = d.get("hidden_act", "silu")
    heads = d.get("num_attention_heads", LLMConfig.num_attention_heads)
    head_dim = d.get("head_dim")
    bad = [f"{k}=true (ivmini's LLM has no biases)" for k in ("attention_bias", "mlp_bias") if d.get(k)]
    if act != "silu":
        bad.append(f"hidden_act={act!r} (only 'silu')")
    if d.get("rope_scaling"):
        bad.append(f"rope_scaling={d['rope_scaling']!r} (not implemented)")
    if head_dim is not None and head_dim * heads != d.get("hidden_size", LLMConfig.hidden_size):
        bad.append(f"head_dim={head_dim} (ivmini needs hidden_size / num_attention_heads)")
    fields = set(LLMConfig.__dataclass_fields__)
    unknown = sorted(k for k in d if k not in fields and k not in HF_INFO_FIELDS)
    if unknown:
        bad.append(f"unknown fields {unknown}")
    if bad:
        raise ValueError("unsupported LLM config: " + "; ".join(bad))
    return LLMConfig(**{k: v for k, v in d.items() if k in fields})


def hf_key_map(cfg):
    """[(ivmini key, [(HF key, shape), ...])]: the parts of each ivmini tensor, in concatenation order."""
    C, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    d = C // cfg.num_attention_heads
    kvw = cfg.num_key_value_heads * d
    rows = [("embed_tokens.weight", [("model.embed_tokens.weight", (V, C))]),
            ("norm.weight", [("model.norm.weight", (C,))])]
    if not cfg.tie_word_embeddings:
        rows.append(("lm_head.weight", [("lm_head.weight", (V, C))]))
    for n in range(cfg.num_hidden_layers):
        hf, iv = f"model.layers.{n}.", f"layers.{n}."
        rows += [
            (iv + "norm1.weight", [(hf + "input_layernorm.weight", (C,))]),
            (iv + "attn.qkv.weight", [(hf + "self_attn.q_proj.weight", (C, C)),
                                      (hf + "self_attn.k_proj.weight", (kvw, C)),
                                      (hf + "self_attn.v_proj.weight", (kvw, C))]),
            (iv + "attn.proj.weight", [(hf + "self_attn.o_proj.weight", (C, C))]),
            (iv + "norm2.weight", [(hf + "post_attention_layernorm.weight", (C,))]),
            (iv + "mlp.fc1.weight", [(hf + "mlp.gate_proj.weight", (I, C)), (hf + "mlp.up_proj.weight", (I, C))]),
            (iv + "mlp.fc2.weight", [(hf + "mlp.down_proj.weight", (C, I))]),
        ]
    return rows


def check_hf_keys(sd, cfg):
    """Fail naming every missing, unexpected and mis-shaped HF key of `sd` for `cfg`."""
    want = {k: shape for _, parts in hf_key_map(cfg) for k, shape in parts}
    problems = key_problems(want, sd, against="config")
    if problems:
        raise KeyError(f"HF LLM checkpoint does not match the config: {problems}")


def llm_from_hf(sd, cfg):
    """HF Llama/Mistral state dict -> ivmini LLM state dict (strict, see the module docstring)."""
    dropped = [k for k in sd if ROTARY_BUFFER.match(k)]
    if dropped:
        log.info("dropped %d rotary_emb.inv_freq buffer(s): recomputed from rope_theta", len(dropped))
    sd = {k: v for k, v in sd.items() if k not in dropped}
    check_hf_keys(sd, cfg)
    out = {iv: torch.cat([sd[k] for k, _ in parts], dim=0) for iv, parts in hf_key_map(cfg)}
    if cfg.tie_word_embeddings:
        out["lm_head.weight"] = out["embed_tokens.weight"]          # the same Parameter in the model
    return out


def llm_to_hf(sd, cfg):
    """ivmini LLM state dict -> HF names (fused rows split back; contiguous copies, as safetensors needs)."""
    out = {}
    for iv, parts in hf_key_map(cfg):
        sizes = [shape[0] for _, shape in parts]
        for (k, _), t in zip(parts, sd[iv].split(sizes, dim=0)):
            out[k] = t.detach().contiguous().clone()
    return out


def read_hf_weights(directory):
    """The state dict of an HF model directory: model.safetensors, or the shards its index names."""
    index = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]                 # HF key -> shard file name
        sd = {}
        for shard in sorted(set(weight_map.values())):
            part = read_state_dict(os.path.join(directory, shard))
            wrong = sorted(k for k in part if weight_map.get(k) != shard)
            if wrong:
                raise KeyError(f"{shard} holds keys its index does not assign to it: {wrong[:10]}")
            sd.update(part)
        absent = sorted(k for k in weight_map if k not in sd)
        if absent:
            raise KeyError(f"keys listed in {index} but in none of its shards: {absent[:10]}")
        return sd
    if os.path.isfile(single):
        return read_state_dict(single)
    raise FileNotFoundError(f"{directory} has neither model.safetensors nor model.safetensors.index.json")


def load_llm(src, config=None, dtype=None, **overrides):
    """An LLM loaded strictly from an HF directory, a file or a state dict (see the module docstring).
    config: an LLMConfig, a preset name, or None (read config.json of the directory); overrides replace fields."""
    if isinstance(src, (str, os.PathLike)) and os.path.isdir(src):
        if config is None:
            with open(os.path.join(src, "config.json")) as f:
                config = llm_config_from_hf(json.load(f), **overrides)
            overrides = {}
        sd = read_hf_weights(src)
    else:
        if config is None:
            raise ValueError("loading an LLM from a file or a state dict needs config= (an LLMConfig or one of "
                             f"{sorted(LLM_PRESETS)})")
        sd = read_state_dict(src)
    if isinstance(config, str):
        config = llm_config(config, **overrides)
    elif overrides:
        raise ValueError(f"keyword overrides {sorted(overrides)} need config= to be a preset name or None")
    model = LLM(config)
    converted, _ = check_keys(model, llm_from_hf(sd, config))
    model.load_state_dict(converted)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def save_hf(model, directory, shard_bytes=None):
    """Write `model` in the HF layout: config.json and model.safetensors, or (shard_bytes given) shards of at
    most shard_bytes each (a tensor is never split) with model.safetensors.index.json."""
    from safetensors.torch import save_file
    os.makedirs(directory, exist_ok=True)
    cfg = model.cfg
    hf = llm_to_hf(model.state_dict(), cfg)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_act": "silu",
                   **{k: getattr(cfg, k) for k in LLMConfig.__dataclass_fields__}}, f, indent=2)
    if shard_bytes is None:
        save_file(hf, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
        return
    shards, size = [{}], 0
    for k, t in hf.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in hf.values())
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
