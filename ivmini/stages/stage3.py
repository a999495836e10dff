"""Stage 3 (facts §5.1, §5.2): video chat. The stage-2 video encoder -> Q-Former -> the LLM (ivmini/chat.py
VideoChat), trained in VideoChat2's phases, each a run of its own in OUT/<phase>/ through the one loop:

    lm        the tiny LLM alone learns the world's language: its captions and QA in the chat layout, with the
              video's caption written where the video goes (no visual tokens), so that it learns to read that
              slot: the in-context reading a released LLM arrives with. The stand-in for a released LLM; with
              --llm it is skipped. (Without it the frozen LLM ignored the visual tokens: the caption phase's loss
              stayed at the text prior, 0.87, for 300 steps, shuffled videos scoring the same.)
    caption   Q-Former + project_up learn (vision and LLM frozen): "describe the video"-style instructions
              (CAPTION_PROMPTS, one drawn per sample) answered with the stage-2 captions
    instruct  + LoRA on the LLM (r 16, alpha 32, dropout 0.1; lm_head too unless tied to the embeddings), the
              vision encoder too with train_vision: the instruction JSON (the world's instruct_train.json)

    torchrun --nproc_per_node=2 train.py --stage 3                 # phase all: lm -> caption -> instruct
    torchrun --nproc_per_node=2 train.py --stage 3 --phase caption --init runs/stage3/lm
    torchrun ... train.py --stage 3 --preset 1B --llm Mistral-7B-Instruct-v0.3/ --vision-init stage2_1B.pth \\
        --data it.json --data-root /videos

phases(cfg) turns a stage-3 config into one TrainConfig per phase: out OUT/<phase>, the phase's steps (capped by
--max-steps), its learning rate (--lm-lr / --caption-lr / --instruct-lr), init = the previous phase's folder.
With --resume, a finished phase is skipped, an interrupted one resumed, a later one started.

Weights. Every phase's checkpoint holds the whole chat model (ChatModelConfig in its meta). The first phase
builds it: vision from the newest stage-2 run (vision_init; its position table resized to num_frames, the last
block and the pooling heads dropped by name: the chat model reads the penultimate block's tokens), the LLM from
--llm (or fresh, tiny), the Q-Former fresh. Later phases load the previous phase's result strictly.
Tokenizers: the LLM's sentencepiece model (--tokenizer, the --llm folder's, or the world's tiny one); the
Q-Former's instruction ids through the same tokenizer unless --qformer-vocab gives a BERT vocab.txt.
Tests: tests/test_stage3.py.
"""
import copy
import functools
import json
import logging
import os
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..chat import IGNORE, VideoChat, collate, encode_conversation, qformer_batch
from ..checkpoint import read_state_dict, resize_pos_embeds
from ..checkpoint.llm import llm_config_from_hf, load_llm
from ..config import VisionConfig, vision_config
from ..data import synthetic
from ..data.datasets import VideoDataset, read_instruct_json, read_stage2_json
from ..dist import consolidate, latest_checkpoint, read_meta
from ..llm import LLM_PRESETS, LLMConfig
from ..lora import TARGETS, LoRAConfig, apply_lora, mark_only_lora_trainable
from ..qformer import QFormerConfig
from ..tasks import CHAT_PHASES
from ..text import WordPieceTokenizer
from ..tokenizer import SPTokenizer, check_vocab, tiny_tokenizer
from ..vit import count_params
from . import common
from .common import Batches, data_paths, sample_seed

log = logging.getLogger("ivmini.stages")

optimizer_groups = common.optimizer_groups
STAGE2_RUNS = "runs/stage2"          # where vision_init=auto looks
CAPTION_PROMPTS = ("describe the video briefly.", "what happens in this video? answer in one sentence.",
                   "give a short caption for the video.", "summarise the video in a few words.",
                   "tell me concisely what you see in the video.")


@dataclass
class ChatModelConfig:
    """What rebuilds a VideoChat (saved with every checkpoint): its three parts and the LoRA of phase instruct."""
    vision: VisionConfig
    qformer: QFormerConfig
    llm: LLMConfig
    lora: LoRAConfig = None

    def __post_init__(self):         # from a checkpoint's meta.json: dicts
        for name, cls in (("vision", VisionConfig), ("qformer", QFormerConfig), ("llm", LLMConfig),
                          ("lora", LoRAConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, cls(**value))


def build_chat(mcfg: ChatModelConfig):
    """A fresh VideoChat of `mcfg` (LoRA applied when mcfg.lora), with .cfg = mcfg."""
    model = VideoChat(mcfg.vision, mcfg.qformer, mcfg.llm)
    if mcfg.lora is not None:
        apply_lora(model.lm, mcfg.lora)
    model.cfg = mcfg                 # what train.py saves with checkpoints and load_chat_run rebuilds from
    return model


def load_chat_run(path):
    """A stage-3 run / checkpoint folder -> (VideoChat in eval mode, the checkpoint's meta)."""
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise FileNotFoundError(f"no complete checkpoint at {path}")
    meta = read_meta(ckpt)
    if "qformer" not in meta.get("model_config", {}):
        raise ValueError(f"{ckpt} is not a stage-3 (chat) checkpoint: its model has no Q-Former")
    model = build_chat(ChatModelConfig(**meta["model_config"]))
    model.load_state_dict(consolidate(ckpt))
    meta["source"] = ckpt
    return model.eval(), meta


# ---------------------------------------------------------------------------------------------
# phases

def phases(cfg):
    """One TrainConfig per phase to run, in order (see the module docstring)."""
    t = cfg.task
    if t.phase == "lm" and t.llm:
        raise ValueError("--phase lm trains the tiny LLM; a released --llm skips it (use caption or instruct)")
    names = [p for p in CHAT_PHASES if not (p == "lm" and t.llm)] if t.phase == "all" else [t.phase]
    out = []
    for k, name in enumerate(names):
        p = copy.deepcopy(cfg)
        p.out, p.task.phase = os.path.join(cfg.out, name), name
        if k > 0:                                     # --init starts the chain; later phases go on from it
            p.task.init = "auto"
        p.max_steps = min(getattr(t, f"{name}_steps"), cfg.max_steps)
        p.base_lr = getattr(t, f"{name}_lr")
        p.min_lr = p.base_lr / 100
        p.warmup_steps = min(cfg.warmup_steps, p.max_steps // 10)
        if t.phase == "all" and cfg.resume:          # resume the chain: done phases skipped, later ones started
            ckpt = latest_checkpoint(os.path.join(p.out, "checkpoints"))
            if ckpt is not None and read_meta(ckpt)["step"] >= p.max_steps:
                log.info("stage 3: phase %s is complete (%s); skipping it", name, ckpt)
                continue
            p.resume = "auto" if ckpt is not None else ""
        out.append(p)
    return out


def previous_phase(cfg):
    """The checkpoint this phase starts from (task.init; auto: the previous phase's folder), or None."""
    t = cfg.task
    if t.init and t.init != "auto":
        ckpt = latest_checkpoint(t.init)
        if ckpt is None:
            raise FileNotFoundError(f"--init={t.init}: no complete stage-3 checkpoint there")
        return ckpt
    i = CHAT_PHASES.index(t.phase)
    if t.init == "" or i == 0 or (i == 1 and t.llm):
        return None                                   # the first phase of the chain builds the model
    folder = os.path.join(os.path.dirname(cfg.out.rstrip("/")), CHAT_PHASES[i - 1])
    ckpt = latest_checkpoint(os.path.join(folder, "checkpoints"))
    if ckpt is None:
        raise FileNotFoundError(f"phase {t.phase} starts from phase {CHAT_PHASES[i - 1]}'s result, but {folder} holds "
                                f"no complete checkpoint: run --phase {CHAT_PHASES[i - 1]} (or all) first, or pass "
                                f"--init RUN")
    return ckpt


# ---------------------------------------------------------------------------------------------
# data

class TextDataset(torch.utils.data.Dataset):
    """Phase lm: instruction-style records (datasets.Record) without their video, the video's caption (or "")
    written in its place -> {"qa", "video_text", "index", "path", "skipped"}."""

    def __init__(self, records, captions):
        self.records, self.captions = records, captions

    def __len__(self):
        return len(self.records)

    def set_epoch(self, epoch):
        pass

    def __getitem__(self, index):
        r = self.records[index]
        return {"qa": r.qa, "video_text": self.captions.get(r.path, ""), "index": index, "path": r.path,
                "skipped": []}


def caption_records(path):
    """The stage-2 JSON's videos as caption QA: [{"i": prompt (drawn per sample), "q": "", "a": caption}]."""
    recs = [r for r in read_stage2_json(path) if r.media == "video" and "caption" in r.captions]
    for r in recs:
        r.qa = [{"i": None, "q": "", "a": r.captions["caption"]}]
    return recs


def caption_paths(cfg):
    """(the caption phase's stage-2 JSON, its root): task.caption_data, else the synthetic world's."""
    if cfg.task.caption_data:
        return cfg.task.caption_data, cfg.data_root or os.path.dirname(os.path.abspath(cfg.task.caption_data))
    if cfg.data:
        raise ValueError("--data is the instruction JSON; phase caption reads a stage-2 JSON: pass --caption-data")
    return data_paths(cfg, "stage2_train.json")


def dataset(cfg):
    t = cfg.task
    size = t.img_size or vision_config(cfg.preset).img_size
    if t.phase == "caption":
        path, root = caption_paths(cfg)
        records = caption_records(path)
    else:
        path, root = data_paths(cfg, "instruct_train.json")
        records = read_instruct_json(path)
        if t.split_qa:                                # each QA its own sample
            records = [replace(r, qa=[qa]) for r in records for qa in r.qa]
    if t.phase == "lm":                               # the world's language: its QA and its captions, no video
        captions = [] if cfg.data and not t.caption_data else caption_records(caption_paths(cfg)[0])
        return TextDataset(records + captions, {r.path: r.captions["caption"] for r in captions})
    # no flips on the synthetic world: its captions and answers say left and right
    return VideoDataset(records, root, num_frames=t.num_frames, size=size, transform="stage2", sample="rand",
                        flip=bool(cfg.data), seed=cfg.seed)


def sampler(dataset, cfg, rank, world):
    return Batches(len(dataset), cfg.batch_size, rank, world, seed=cfg.seed)


# ---------------------------------------------------------------------------------------------
# tokenizers and the model

class BertInstructionTokenizer:
    """A BERT vocab.txt for the Q-Former's instruction: encode(text, bos, eos) = [CLS] ... [SEP]."""

    def __init__(self, vocab):
        self.wp = WordPieceTokenizer(vocab, lowercase=True)
        self.pad_id, self.vocab_size = self.wp.pad_token_id, len(self.wp.vocab)

    def encode(self, text, bos=False, eos=False):
        ids = self.wp(text)["input_ids"][0].tolist()             # [CLS] ... [SEP]
        return ids[0 if bos else 1:len(ids) if eos else -1]


def tokenizers(task):
    """(the LLM's tokenizer, the Q-Former's) for a ChatTask (or its dict from a checkpoint's meta)."""
    t = task if isinstance(task, dict) else vars(task)
    return _tokenizers(t["tokenizer"], t["llm"], t["qformer_vocab"])


@functools.lru_cache(maxsize=4)
def _tokenizers(tokenizer, llm, qformer_vocab):
    if tokenizer:
        tok = SPTokenizer(tokenizer)
    elif llm:
        tok = SPTokenizer(llm)                                      # the folder's tokenizer.model
    else:
        tok = tiny_tokenizer(synthetic.ensure_world())
    return tok, (BertInstructionTokenizer(qformer_vocab) if qformer_vocab else tok)


def _llm_config(t):
    if not t.llm:
        return LLM_PRESETS["tiny"]
    with open(os.path.join(t.llm, "config.json")) as f:
        return llm_config_from_hf(json.load(f))


def _vision_state(src, vcfg, chat_vision):
    """The stage-2 video encoder's weights for the chat model's vision_encoder: `vision_encoder.*` of a stage-2
    run, checkpoint or file, position tables resized to vcfg's frames; keys the chat encoder does not have (its
    last block, the pooling and distillation heads, the image position table) dropped and logged."""
    if src == "auto" or os.path.isdir(src):
        folder = STAGE2_RUNS if src == "auto" else src
        ckpt = latest_checkpoint(folder)
        if ckpt is None:
            if src == "auto":
                log.warning("stage 3: no stage-2 checkpoint under %s: the video encoder starts RANDOM", STAGE2_RUNS)
                return None, "random (no stage-2 run)"
            raise FileNotFoundError(f"--vision-init={src}: no complete checkpoint there")
        sd, where = consolidate(ckpt), ckpt
    else:
        sd, where = read_state_dict(src), src
    if any(k.startswith("vision_encoder.") for k in sd):
        sd = {k.removeprefix("vision_encoder."): v for k, v in sd.items() if k.startswith("vision_encoder.")}
    sd = resize_pos_embeds(sd, vcfg)
    want = chat_vision.state_dict()
    missing = sorted(set(want) - set(sd))
    if missing:
        raise KeyError(f"--vision-init={src}: the video encoder lacks {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    dropped = sorted(k for k in sd if k not in want)
    log.info("stage 3: video encoder from %s (%d keys not used by the chat model, e.g. %s)", where, len(dropped),
             dropped[:3])
    return {k: sd[k] for k in want}, where


def build(cfg, device):
    t = cfg.task
    tok, qtok = tokenizers(t)
    llm_cfg = _llm_config(t)
    check_vocab(tok, llm_cfg)
    size = t.img_size or vision_config(cfg.preset).img_size
    vcfg = vision_config(cfg.preset, heads="none", num_frames=t.num_frames, img_size=size, drop_path_rate=0.0)
    qcfg = QFormerConfig(vocab_size=qtok.vocab_size, hidden_size=t.qformer_hidden, num_hidden_layers=t.qformer_layers,
                         num_attention_heads=t.qformer_heads, intermediate_size=4 * t.qformer_hidden,
                         max_position_embeddings=max(512, t.qformer_max_len), pad_token_id=qtok.pad_id,
                         num_query_token=t.num_query_token, extra_num_query_token=t.extra_num_query_token,
                         vision_width=vcfg.embed_dim)
    torch.manual_seed(cfg.seed)
    mcfg = ChatModelConfig(vcfg, qcfg, llm_cfg)
    model = build_chat(mcfg)
    start = previous_phase(cfg)
    if start is not None:                             # the previous phase's whole model, strictly
        theirs = ChatModelConfig(**read_meta(start)["model_config"])
        if theirs.lora is not None:                   # its adapters (caption_lora) carry on
            model.cfg.lora = theirs.lora
            apply_lora(model.lm, theirs.lora)
        model.load_state_dict(consolidate(start))
        how = f"from {start}"
    else:
        vision, how = _vision_state(t.vision_init, vcfg, model.vision_encoder) if t.vision_init else \
            (None, "random (vision_init is empty)")
        if vision is not None:
            model.vision_encoder.load_state_dict(vision)
        if t.llm:
            model.lm.load_state_dict(load_llm(t.llm).state_dict())
        # upstream starts extra_query_tokens at zero; through the Q-Former's embedding LayerNorm (eps 1e-12) a zero
        # row gets gradients ~1e6 x the others (measured: global norm 3e5 at step 0), and clipping then stalls
        # every other weight: a fresh bridge starts them like query_tokens
        if model.qformer.extra_query_tokens is not None:
            torch.nn.init.normal_(model.qformer.extra_query_tokens, 0.0, qcfg.initializer_range)
        how = f"video encoder {how}, LLM {t.llm or 'tiny (fresh)'}, Q-Former fresh"
    model.requires_grad_(False)
    if t.phase == "lm":
        model.lm.requires_grad_(True)
    else:
        for part in (model.qformer, model.project_up):
            part.requires_grad_(True)
    if t.phase == "instruct" or (t.phase == "caption" and t.caption_lora):
        if model.cfg.lora is None:
            targets = tuple(x for x in TARGETS if not (x == "lm_head" and llm_cfg.tie_word_embeddings))
            model.cfg.lora = LoRAConfig(r=t.lora_r, alpha=t.lora_alpha, dropout=t.lora_dropout, targets=targets)
            apply_lora(model.lm, model.cfg.lora)
        mark_only_lora_trainable(model.lm)            # adapters are the only trainable LLM weights
    if t.phase == "instruct":
        model.vision_encoder.requires_grad_(t.train_vision)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("stage 3, phase %s: %s; %.2f M parameters, %.2f M trained (vision %.2f M, Q-Former %.2f M, LLM %.2f M)",
             t.phase, how, count_params(model) / 1e6, trained / 1e6, count_params(model.vision_encoder) / 1e6,
             count_params(model.qformer) / 1e6, count_params(model.lm) / 1e6)
    return model.train().to(device), {}


# ---------------------------------------------------------------------------------------------
# loss

def conversations(batch, cfg, epoch):
    """The batch's records as chat records {"QA": [...]}; a caption sample's instruction drawn per sample."""
    out = []
    for qa, index in zip(batch["qa"], batch["index"].tolist()):
        if qa[0].get("i", "") is None:                # a caption: one of CAPTION_PROMPTS
            rng = np.random.default_rng(sample_seed(cfg.seed, epoch, index))
            qa = [dict(qa[0], i=CAPTION_PROMPTS[rng.integers(len(CAPTION_PROMPTS))])]
        out.append({"QA": qa})
    return out


def forward_loss(model, frozen, batch, cfg, epoch):
    t = cfg.task
    device = model.project_up.weight.device
    tok, qtok = tokenizers(t)
    if t.phase == "lm":                 # the caption where the video goes: the LLM learns to read that slot
        encoded = [encode_conversation(r, tok, 0, t.max_txt_len, video_text=" " + text)
                   for r, text in zip(conversations(batch, cfg, epoch), batch["video_text"])]
    else:
        encoded = [encode_conversation(r, tok, model.n_visual, t.max_txt_len) for r in conversations(batch, cfg, epoch)]
    ids, mask, labels = (x.to(device) for x in collate(encoded, tok.pad_id))
    if t.phase == "lm":
        loss, _ = model(None, ids, mask, labels)
    else:
        qids, qmask = (x.to(device) for x in qformer_batch([e.instruction for e in encoded], qtok, t.qformer_max_len))
        loss, _ = model(batch["video"].to(device, non_blocking=True), ids, mask, labels, qids, qmask)
    return loss, {"loss": float(loss.detach()), "tokens": float((labels[:, 1:] != IGNORE).sum()),
                  "dropped_turns": float(sum(e.dropped for e in encoded))}


def flops_per_clip(model, frozen, cfg):
    """Model FLOPs per sample: 2 x params x tokens forward, x3 where weights train, x2 through frozen parts the
    gradient passes (the LLM outside phase lm); tokens: the vision encoder's, the queries, max_txt_len for the
    LLM (an upper bound). Attention's N^2 terms left out."""
    t, m = cfg.task, model.cfg
    llm = (6 if t.phase == "lm" else 4) * count_params(model.lm) * t.max_txt_len
    if t.phase == "lm":
        return llm
    vision = (6 if t.train_vision and t.phase == "instruct" else 2) * count_params(model.vision_encoder) * \
        (1 + m.vision.num_patches)
    return vision + 6 * count_params(model.qformer) * (model.n_visual + t.qformer_max_len) + llm
