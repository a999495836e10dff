"""The released InternVideo2-Chat-8B bridge: its Q-Former keys <-> ivmini.qformer's. Facts:
../shared/ref/internvideo2_facts.md §1 (the HF chat layout) and §5.1; key names from upstream BLIP-2 Qformer.py.

    load_chat_qformer(src, num_query_token, extra_num_query_token, vision_width, **bert_config)
        load_official("chat_qformer", ...): query_tokens, extra_query_tokens, vision_layernorm.*, qformer.bert.*
        -> an ivmini QFormer, strictly, in eval mode. The other parts of a whole chat file (CHAT_OTHER_KEYS:
        the ViT, project_up / project_down, the LLM) are dropped by name; any other key is an error naming it.
    chat_qformer_from_official(sd) / chat_qformer_to_official(sd)   the key map alone, both ways

Key map under qformer.bert. -> bert. (ivmini.checkpoint.text's BERT map for the shared parts):
    embeddings.{word,position}_embeddings, embeddings.LayerNorm    -> the same names
    embeddings.position_ids                                        dropped (a buffer upstream, not a weight)
    encoder.layer.N.attention / crossattention / intermediate / output   -> layer.N.* as in checkpoint/text.py
    encoder.layer.N.intermediate_query.dense                       -> layer.N.mlp_query.fc1
    encoder.layer.N.output_query.dense                             -> layer.N.mlp_query.fc2
    encoder.layer.N.output_query.LayerNorm                         -> layer.N.norm2_query
query_tokens, extra_query_tokens, vision_layernorm.{weight,bias} keep their names. Crossattention keys exist
for layers 0, freq, 2*freq, ... only; K/V weights are (hidden, vision_width).
Tests: tests/test_qformer.py.
"""
import re

from ..qformer import QFormer, QFormerConfig
from .state_dicts import check_keys, key_problems, read_state_dict
from .text import bert_from_official, bert_to_official, drop_logged

# parts of the released chat file that are not the Q-Former bridge (loaded by their own loaders)
CHAT_OTHER_KEYS = ("vision_encoder.", "project_up.", "project_down.", "lm.")
QUERY_FFN_MAP = {"intermediate_query.dense": "mlp_query.fc1", "output_query.dense": "mlp_query.fc2",
                 "output_query.LayerNorm": "norm2_query"}
OFFICIAL_QUERY_FFN = re.compile(r"^qformer\.bert\.encoder\.layer\.(\d+)\.(intermediate_query\.dense|"
                                r"output_query\.dense|output_query\.LayerNorm)\.(weight|bias)$")
OURS_QUERY_FFN = re.compile(r"^bert\.layer\.(\d+)\.(mlp_query\.fc1|mlp_query\.fc2|norm2_query)\.(weight|bias)$")


def chat_qformer_from_official(sd):
    """Released chat keys -> ivmini QFormer keys. Keys outside the Q-Former map pass through unchanged, for the
    loader's strict check to name."""
    out, bert = {}, {}
    for k, v in sd.items():
        query = OFFICIAL_QUERY_FFN.match(k)
        if query:
            n, tail, kind = query.groups()
            out[f"bert.layer.{n}.{QUERY_FFN_MAP[tail]}.{kind}"] = v
        elif k.startswith("qformer.bert."):
            bert[k[len("qformer."):]] = v                 # bert.embeddings.*, bert.encoder.layer.N.*
        else:
            out[k] = v
    out.update(bert_from_official(bert))                  # drops bert.embeddings.position_ids
    return out


def chat_qformer_to_official(sd):
    """ivmini QFormer keys -> the released chat layout (with qformer.bert.embeddings.position_ids)."""
    out, bert = {}, {}
    back = {v: k for k, v in QUERY_FFN_MAP.items()}
    for k, v in sd.items():
        query = OURS_QUERY_FFN.match(k)
        if query:
            n, tail, kind = query.groups()
            out[f"qformer.bert.encoder.layer.{n}.{back[tail]}.{kind}"] = v
        elif k.startswith("bert."):
            bert[k] = v
        else:
            out[k] = v
    out.update({"qformer." + k: v for k, v in bert_to_official(bert).items()})
    return out


def check_official_keys(model, sd):
    """Strict check in the file's own names: every missing, unexpected or mis-shaped key of the released
    layout named (position_ids may be absent)."""
    own = {k: v.shape for k, v in chat_qformer_to_official(model.state_dict()).items()
           if not k.endswith("position_ids")}
    problems = key_problems(own, {k: v for k, v in sd.items() if not k.endswith("embeddings.position_ids")})
    if problems:
        cfg = model.cfg
        raise KeyError("checkpoint does not match the chat Q-Former (num_query_token="
                       f"{cfg.num_query_token}, extra_num_query_token={cfg.extra_num_query_token}, vision_width="
                       f"{cfg.vision_width}, hidden_size={cfg.hidden_size}, num_hidden_layers="
                       f"{cfg.num_hidden_layers}, cross_attention_freq={cfg.cross_attention_freq}): {problems}")


def load_chat_qformer(src, num_query_token, vision_width, extra_num_query_token=0, **bert_config):
    """load_official("chat_qformer", src, ...): the released bridge (see the module docstring) as a QFormer of
    QFormerConfig(num_query_token, extra_num_query_token, vision_width, **bert_config), strictly, in eval mode.
    bert_config: HF BertConfig keywords (vocab_size after the [DEC] resize) and cross_attention_freq /
    drop_path_rate; an unknown keyword is a TypeError naming it."""
    cfg = QFormerConfig(num_query_token=num_query_token, extra_num_query_token=extra_num_query_token,
                        vision_width=vision_width, **bert_config)
    sd = read_state_dict(src)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    sd = drop_logged(sd, CHAT_OTHER_KEYS, "chat checkpoint parts outside the Q-Former bridge")
    model = QFormer(cfg)
    check_official_keys(model, sd)
    sd, _ = check_keys(model, chat_qformer_from_official(sd))
    model.load_state_dict(sd)
    return model.eval()
