"""Zero-shot retrieval with stage-2 (video-text) models, and what every eval.py task shares: loading a checkpoint
for a task, encoding videos and texts, ITM scoring. eval.py is the command line; the computation is here and in
ivmini/classify.py (classification, fine-tuned classifiers, multiple choice), as functions the tests call.

Retrieval (facts §3.8, the official retrieval_utils.evaluation / itm_eval):
    videos (4 frames, middle sampling, square resize without crop, no masking) -> vision_proj(pool), normalised
    captions (pre_text, WordPiece, max_txt_l) -> text_proj(text feature), normalised
    itc (Nt, Nv) = text x video cosines (temperature 1)
    ITM re-rank: for each text its top-k videos by ITC, for each video its top-k texts, scored with the fusion
    layers + itm_head(...)[:, 1] (the positive logit); every other entry -100
    score sets   sim:   t2v = itc,                     v2t = itc^T
                 dsl:   t2v = itc * softmax(itc, 0),   v2t = itc^T * softmax(itc^T, 0)   (dual softmax)
                 match: t2v = itm_t2v,                 v2t = itm_v2t
    The official code row-softmaxes every set before ranking; a softmax is monotonic along the row, so ranks
    are taken on the scores before it (float32 softmax would only add ties). A query's rank = how many
    candidates score at least as high as its best ground truth, less one (ties count against it).
    Metrics (official names, percent): v2t_r1/5/10, v2t_r_mean, t2v_r1/5/10, t2v_r_mean, r_mean.
InternVideo2-CLIP (facts §4, ivmini/clip.py; official tasks_clip evaluation_video_clip): eval.py retrieval and
classify also take a load_official kind "clip" file. ITC only (no ITM head: the sim and dsl sets); 8 frames by
default; the texts as the official CLIP Tokenizer makes them (CLIPTextTokenizer): "summarize:" + the pre_text
caption, <s> ... </s>, right padding, at most 80 tokens (truncated at the right, </s> kept).
`load_run`, `itc_features`, `t2v_ranks` and `retrieval` are the ITC-only core used by tests/test_train_stage2.py
and `python -m ivmini.evaluate RUN`. Tests: tests/test_eval.py, tests/test_eval_clip.py.
"""
import argparse
import json
import os
import warnings

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .align import AlignConfig, VideoTextModel
from .align_av import AudioVisualConfig, AudioVisualModel
from .data import synthetic
from .data.datasets import DataError, VideoDataset, collate, read_eval_json
from .data.transforms import make_rng
from .data.video import DecodeError
from .dist import consolidate, latest_checkpoint, read_meta
from .text import WordPieceTokenizer, minilm_path
from .tokenizer import SPTokenizer, check_vocab


def load_run(path):
    """A stage-2 run folder (its newest checkpoint) or step_* folder -> (VideoTextModel in eval mode, meta)."""
    ckpt = latest_checkpoint(path) or latest_checkpoint(os.path.join(path, "checkpoints"))
    if ckpt is None:
        raise FileNotFoundError(f"no complete checkpoint at {path}")
    meta = read_meta(ckpt)
    if "bert" not in meta["model_config"]:
        raise ValueError(f"{ckpt} is not a stage-2 (video-text) checkpoint")
    if "audio" in meta["model_config"]:                          # the audio-visual model (train --set audio=true)
        model = AudioVisualModel(AudioVisualConfig(**meta["model_config"]))
    else:
        model = VideoTextModel(AlignConfig(**meta["model_config"]))
    model.load_state_dict(consolidate(ckpt))
    return model.eval(), meta


@torch.no_grad()
def itc_features(model, videos, captions, tokenizer, max_txt_l=32, batch_size=16):
    """(text features (Nt, E), video features (Nv, E)), L2-normalised. videos: a dataset of {"video"}."""
    vis = []
    for start in range(0, len(videos), batch_size):
        batch = collate([videos[i] for i in range(start, min(start + batch_size, len(videos)))])
        _, pooled = model.encode_vision(batch["video"])
        vis.append(F.normalize(model.vision_proj(pooled), dim=-1))
    txt = []
    for start in range(0, len(captions), batch_size):
        tokens = tokenizer(captions[start:start + batch_size], padding=True, max_length=max_txt_l)
        _, cls = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
        txt.append(F.normalize(model.text_proj(cls), dim=-1))
    return torch.cat(txt), torch.cat(vis)


def t2v_ranks(sim, video_of_caption):
    """sim (Nt, Nv); video_of_caption (Nt,) -> the rank (0 = first) of each caption's own video."""
    own = sim.gather(1, video_of_caption[:, None])                    # (Nt, 1)
    return (sim >= own).sum(1) - 1                                     # videos scoring at least as high, less itself


def retrieval(model, annotations, root, tokenizer, *, num_frames=4, size=None, max_txt_l=32, subsets=None):
    """Text-to-video R@1/5/10 over an eval JSON (every caption of every video) -> dict; subsets: {name: set of
    video paths} also reported separately (e.g. seen / novel combinations), with chance R@1 = 1 / videos."""
    records = read_eval_json(annotations)
    size = size or model.cfg.vision.img_size
    videos = VideoDataset(records, root, num_frames=num_frames, size=size, transform="test", sample="middle",
                          flip=False)
    captions, owner = [], []
    for v, rec in enumerate(records):
        captions += rec.caption_list
        owner += [v] * len(rec.caption_list)
    text, vision = itc_features(model, videos, captions, tokenizer, max_txt_l)
    ranks = t2v_ranks(text @ vision.T, torch.tensor(owner))
    out = {"videos": len(records), "captions": len(captions), "chance_r1": 1 / len(records)}
    groups = {"all": [True] * len(captions)}
    for name, paths in (subsets or {}).items():
        groups[name] = [records[v].path in paths for v in owner]
    for name, keep in groups.items():
        r = ranks[torch.tensor(keep)]
        out[name] = {f"r{k}": float((r < k).float().mean()) for k in (1, 5, 10)} | {"captions": int(r.numel())}
    return out


def synthetic_subsets(world, split="test"):
    """{"seen": paths, "novel": paths} of a synthetic world split (novel = holds a held-out combination)."""
    with open(os.path.join(world, "annotations", f"meta_{split}.json")) as f:
        meta = json.load(f)
    return {name: {m["video"] for m in meta if m["novel"] == novel} for name, novel in (("seen", False),
                                                                                        ("novel", True))}


# ---------------------------------------------------------------------------------------------
# the full protocol (eval.py): checkpoints, features, ITM re-ranking, score sets, metrics

class CheckpointKindError(ValueError):
    """A checkpoint of a kind the task does not accept; the message names the kinds it does."""


# the checkpoint kinds each eval.py task takes (CLIP: ITC only, so the tasks that need no ITM head)
ACCEPTS = {"retrieval": ("stage2", "clip"), "classify": ("stage2", "clip")}


def load_model(ckpt, task, accepts=None, spec=None):
    """ckpt: a run folder / step_* folder, or a file (an export, or an official release) with its load_official
    arguments in `spec` (default: the .json beside it, as `python -m ivmini.checkpoint export` writes)
    -> (model in eval mode, info {kind, step, num_frames, max_txt_l, text_model} (None where the file says nothing)).
    accepts: the kinds allowed (default: ACCEPTS[task], else stage2 only)."""
    accepts = accepts or ACCEPTS.get(task, ("stage2",))
    if os.path.isdir(ckpt):
        path = latest_checkpoint(ckpt) or latest_checkpoint(os.path.join(ckpt, "checkpoints"))
        if path is None:
            raise FileNotFoundError(f"no complete checkpoint at {ckpt}")
        meta = read_meta(path)
        kind = "stage2" if "bert" in meta["model_config"] else "stage1"
        _check_kind(ckpt, kind, task, accepts)
        model, meta = load_run(path)
        t = meta["config"]["task"]
        return model, {"kind": kind, "step": meta["step"], "num_frames": t["num_frames"],
                       "max_txt_l": t["max_txt_l"], "text_model": t["text_model"] or None, "source": path}
    if not os.path.isfile(ckpt):
        raise FileNotFoundError(f"--ckpt {ckpt} does not exist")
    spec = spec or os.path.splitext(ckpt)[0] + ".json"
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"{ckpt} has no {spec} beside it saying its kind and arguments: pass --spec JSON "
                                f'({{"kind": "stage2", "kwargs": {{...load_official keywords}}}}, as '
                                f"`python -m ivmini.checkpoint export` writes) or --ckpt a run folder")
    with open(spec) as f:
        desc = json.load(f)
    _check_kind(ckpt, desc["kind"], task, accepts)
    from .checkpoint import load_official    # the checkpoint package is only needed for files
    model = load_official(desc["kind"], ckpt, **desc.get("kwargs", {}))
    return model, {"kind": desc["kind"], "step": desc.get("step"), "num_frames": None, "max_txt_l": None,
                   "text_model": None, "source": ckpt}


def _check_kind(ckpt, kind, task, accepts):
    if kind not in accepts:
        raise CheckpointKindError(f"{ckpt} is a {kind!r} checkpoint; `eval.py {task}` accepts kind "
                                  f"{' or '.join(map(repr, accepts))} (a stage-2 run or checkpoint folder, or a "
                                  f"file exported from one / released as load_official kind 'stage2'"
                                  f"{'; an InternVideo2-CLIP file, kind clip' if 'clip' in accepts else ''})")


CLIP_FRAMES = 8              # the official CLIP zero-shot configs (scripts/evaluation/clip/zero_shot): 8 frames
CLIP_MAX_TXT_L = 80          # the official CLIP Tokenizer's max_length (it ignores the config's max_txt_l)
CLIP_PREFIX = "summarize:"   # glued to every text, no space (the official Tokenizer.forward)


class CLIPTextTokenizer:
    """The InternVideo2-CLIP text input (facts §4; the official LlamaTokenizer with add_eos_token, pad " "):
    CLIP_PREFIX + text, <s> first and </s> last, RIGHT padding, rows longer than max_length cut at the right with
    </s> kept (HF truncation=True). The official pads to max_length=80; here to the longest row: with right
    padding the extra pads change no feature (ivmini/clip.py). A text cut is warned about.

        tok = CLIPTextTokenizer(path, llm_cfg)     path: the LLaMA tokenizer.model (or its folder); its vocabulary
                                                   must match llm_cfg (ivmini.tokenizer.check_vocab)
        tok(texts, padding=True, max_length=80) -> {"input_ids", "attention_mask"}: int64 (B, L), as
                                                   encode_texts calls a tokenizer"""

    def __init__(self, path, llm_cfg):
        self.sp = SPTokenizer(path)
        check_vocab(self.sp, llm_cfg)
        self.path = self.sp.path

    def __call__(self, texts, padding=True, max_length=CLIP_MAX_TXT_L):
        if padding not in (True, "longest"):
            raise ValueError(f"CLIPTextTokenizer pads to the longest row only, got padding={padding!r}")
        enc = self.sp([CLIP_PREFIX + t for t in texts], bos=True, eos=True, max_length=max_length,
                      truncation="right")
        cut = int(enc["truncated"].sum())
        if cut:
            warnings.warn(f"{cut} of {len(texts)} texts are longer than {max_length} tokens: cut at the right "
                          f"(</s> kept), as the official CLIP tokenizer does", stacklevel=2)
        ids, mask = enc["input_ids"], enc["attention_mask"]                  # (B, L) left-padded
        B, L = ids.shape
        n = mask.sum(1, keepdim=True)                                        # (B, 1) real tokens per row
        # left -> right padding: position j takes the left-padded position (j + L - n) mod L, i.e. the n real
        # tokens first, then the L - n pads
        src = (torch.arange(L)[None] + L - n) % L                            # (B, L)
        return {"input_ids": ids.gather(1, src), "attention_mask": mask.gather(1, src)}


# retrieval --modality -> (the caption key of the queries, the matching head of the ITM re-rank); audio ones need the
# audio-visual model (train.py --stage 2 --set audio=true)
MODALITIES = {"video": ("caption", "itm_head"), "audio": ("audio_caption", "atm_head"),
              "audio-video": ("av_caption", "avtm_head")}


def check_modality(model, modality, itm):
    """A clear error when the model cannot do `modality` (no audio tower, or no matching head for ITM)."""
    if modality == "video":
        return
    if getattr(model, "audio_encoder", None) is None:
        raise CheckpointKindError(f"--modality {modality} needs an audio-visual stage-2 model (train.py --stage 2 "
                                  f"--set audio=true); this one has no audio tower")
    if modality == "audio-video" and model.av_fusion is None:
        raise CheckpointKindError("--modality audio-video needs av_fusion, built only when AVTC or AVTM was trained")
    head = MODALITIES[modality][1]
    if itm and getattr(model, head) is None:
        raise CheckpointKindError(f"this model has no {head} (its {head[:-5].upper()} loss weight was 0 in training): "
                                  f"pass --no-itm for ITC only")


@torch.no_grad()
def encode_videos(model, records, root, *, num_frames, size, batch_size=16, progress=False, modality="video"):
    """Each record's video (modality "video"), audio track ("audio") or both ("audio-video": the AVTC feature and
    the audio+video memory) -> (tokens (Nv, Nm, W): what the fusion layers cross-attend to, features (Nv, E)
    normalised, kept indices, failed [(path, reason)]). Videos that fail to decode are left out and listed (the
    caller decides what that means); a video without sound is its silence (has_audio False)."""
    data = VideoDataset(records, root, num_frames=num_frames, size=size, transform="test", sample="middle",
                        flip=False, audio=modality != "video")
    samples, kept, failed = [], [], []
    for i in range(len(records)):
        try:
            samples.append(data.load(i, make_rng(0, 0, i)))      # "middle" sampling draws nothing: rng unused
            kept.append(i)
        except DecodeError as e:
            failed.append((records[i].path, e.reason))
    tokens, feats = [], []
    for start in tqdm(range(0, len(samples), batch_size), desc="videos", unit="batch", disable=not progress):
        batch = collate(samples[start:start + batch_size])
        if modality != "audio":
            tok, pooled = model.encode_vision(batch["video"])
            feat = model.vision_proj(pooled)
        if modality != "video":
            audio_tok, audio_pooled = model.encode_audio(batch["audio"])
            audio_feat = model.audio_proj(audio_pooled)
            if modality == "audio":
                tok, feat = audio_tok, audio_feat
            else:                                                # the training memory order: audio, then video
                tok, feat = torch.cat([audio_tok, tok], dim=1), model.av_feature(audio_feat, feat)
        tokens.append(tok)
        feats.append(F.normalize(feat, dim=-1))
    if not samples:
        return None, None, kept, failed
    return torch.cat(tokens), torch.cat(feats), kept, failed


@torch.no_grad()
def encode_texts(model, texts, tokenizer, max_txt_l, batch_size=64, progress=False):
    """-> (tokens (Nt, L, H) after the text layers, attention (Nt, L), features (Nt, E) normalised)."""
    enc = tokenizer(texts, padding=True, max_length=max_txt_l)       # one common L for all texts
    ids, atts = enc["input_ids"], enc["attention_mask"]
    tokens, feats = [], []
    for start in tqdm(range(0, len(texts), batch_size), desc="texts", unit="batch", disable=not progress):
        tok, feat = model.encode_text(ids[start:start + batch_size], atts[start:start + batch_size])
        tokens.append(tok)
        feats.append(F.normalize(model.text_proj(feat), dim=-1))
    return torch.cat(tokens), atts, torch.cat(feats)


def itm_scorer(model, text_tokens, text_atts, vision_tokens, head="itm_head"):
    """-> score(text_idx (n,), video_idx (n,)) -> (n,): the matching head's positive logit on the fusion layers'
    [CLS] (itm_head; atm_head / avtm_head with audio / audio+video memories)."""
    @torch.no_grad()
    def score(t, v):
        out = model.text_encoder.bert(encoder_embeds=text_tokens[t], attention_mask=text_atts[t],
                                      encoder_hidden_states=vision_tokens[v], mode="fusion")
        return getattr(model, head)(out.last_hidden_state[:, 0])[:, 1]
    return score


def rerank(itc, k, scorer, batch_size=64, progress=False):
    """itc (Nt, Nv) -> (itm_t2v (Nt, Nv), itm_v2t (Nv, Nt)): scorer(t, v) on each text's top-k videos and each
    video's top-k texts by ITC, -100 everywhere else. A pair in both top-k lists is scored once."""
    Nt, Nv = itc.shape
    top_v = itc.topk(min(k, Nv), dim=1).indices                              # (Nt, k) videos of each text
    top_t = itc.T.topk(min(k, Nt), dim=1).indices                            # (Nv, k) texts of each video
    flat = torch.cat([(torch.arange(Nt)[:, None] * Nv + top_v).flatten(),
                      (top_t * Nv + torch.arange(Nv)[:, None]).flatten()]).unique()   # pair t, v -> t * Nv + v
    table = torch.full((Nt * Nv,), float("nan"), dtype=torch.float64)
    for start in tqdm(range(0, len(flat), batch_size), desc="ITM re-rank", unit="batch", disable=not progress):
        pairs = flat[start:start + batch_size]
        table[pairs] = scorer(pairs // Nv, pairs % Nv).double()
    table = table.view(Nt, Nv)
    t2v = torch.full((Nt, Nv), -100.0, dtype=torch.float64).scatter_(1, top_v, table.gather(1, top_v))
    v2t = torch.full((Nv, Nt), -100.0, dtype=torch.float64).scatter_(1, top_t, table.T.gather(1, top_t))
    return t2v, v2t


def score_sets(itc, itm_t2v=None, itm_v2t=None):
    """The official score sets (module docstring) -> {name: (t2v (Nt, Nv), v2t (Nv, Nt))}, float64."""
    s = torch.as_tensor(itc).double()
    sets = {"sim": (s, s.T), "dsl": (s * s.softmax(dim=0), s.T * s.T.softmax(dim=0))}
    if itm_t2v is not None:
        sets["match"] = (torch.as_tensor(itm_t2v).double(), torch.as_tensor(itm_v2t).double())
    return sets


def best_ranks(scores, truths):
    """scores (Nq, Nc); truths: per query its ground-truth candidates -> (Nq,) the rank (0 = first) of the best
    ranked one: the other candidates scoring at least as high (ties with them count against the query; ties
    among ground truths do not)."""
    scores = torch.as_tensor(scores)
    ranks = []
    for q, cands in enumerate(truths):
        others = torch.ones(scores.shape[1], dtype=torch.bool)
        others[cands] = False
        ranks.append(int((scores[q][others] >= scores[q, cands].max()).sum()))
    return torch.tensor(ranks)


def recall_metrics(t2v_ranks, v2t_ranks):
    """Ranks -> the official itm_eval metrics, in percent."""
    out = {}
    for name, r in (("v2t", torch.as_tensor(v2t_ranks)), ("t2v", torch.as_tensor(t2v_ranks))):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * float((r < k).double().mean()) if r.numel() else float("nan")
        out[f"{name}_r_mean"] = (out[f"{name}_r1"] + out[f"{name}_r5"] + out[f"{name}_r10"]) / 3
    out["r_mean"] = (out["t2v_r_mean"] + out["v2t_r_mean"]) / 2
    return out


def ground_truths(owner, texts=None):
    """-> (videos of each caption, captions of each video). owner (Nt,): the video each caption belongs to; with
    texts (Nt,) every video holding an identical text is a ground truth too (the official has_multi_vision_gt,
    for captions that repeat, e.g. "three high beeps")."""
    owner = [int(v) for v in owner]
    Nv = max(owner) + 1 if owner else 0
    if texts is None:
        videos_of = [[v] for v in owner]
    else:
        by_text = {}
        for t, v in zip(texts, owner):
            by_text.setdefault(t, set()).add(v)
        videos_of = [sorted(by_text[t]) for t in texts]
    captions_of = [[] for _ in range(Nv)]
    for c, vs in enumerate(videos_of):
        for v in vs:
            captions_of[v].append(c)
    return videos_of, captions_of


def retrieval_metrics(sets, owner, subsets=None, texts=None):
    """sets: score_sets(...); owner (Nt,) the video of each caption; subsets {name: bool (Nv,)} of videos also
    reported alone (their captions for t2v, the videos for v2t, ranked among all candidates); texts: the caption
    texts, to count every video with the same text as a ground truth (ground_truths)
    -> (metrics {set: {"all": {...}, subset: {...}}}, ranks {set: {"t2v": [...], "v2t": [...]}})."""
    owner = torch.as_tensor(owner)
    Nv = sets["sim"][0].shape[1]
    videos_of, captions_of = ground_truths(owner.tolist(), texts)
    captions_of += [[] for _ in range(Nv - len(captions_of))]
    groups = {"all": torch.ones(Nv, dtype=torch.bool)} | {n: torch.as_tensor(m) for n, m in (subsets or {}).items()}
    metrics, ranks = {}, {}
    for name, (t2v, v2t) in sets.items():
        rt = best_ranks(t2v, videos_of)
        rv = best_ranks(v2t, captions_of)
        metrics[name] = {g: recall_metrics(rt[keep[owner]], rv[keep]) for g, keep in groups.items()}
        ranks[name] = {"t2v": rt.tolist(), "v2t": rv.tolist()}
    return metrics, ranks


def refuse_missing(failed, what):
    if failed:
        listed = "; ".join(f"{p}: {r}" for p, r in failed[:10])
        raise DataError(f"{len(failed)} {what} could not be decoded, so no result is reported (every query and "
                        f"target must be present): {listed}")


def retrieval_eval(model, records, root, tokenizer, *, num_frames=4, size=None, max_txt_l=32, k=128, itm=True,
                   batch_size=16, subsets=None, progress=False, modality="video", same_text_gt=False):
    """Records with caption_list -> (result {protocol facts, metrics, ranks}, matrices {name: (Nt, Nv) array}).
    subsets: {name: set of video paths}; modality: see MODALITIES; same_text_gt: videos with an identical caption
    are all ground truths (ground_truths). Refuses (DataError) if any video cannot be decoded."""
    check_modality(model, modality, itm)
    size = size or model.cfg.vision.img_size
    vis_tokens, vis, _, failed = encode_videos(model, records, root, num_frames=num_frames, size=size,
                                               batch_size=batch_size, progress=progress, modality=modality)
    refuse_missing(failed, f"of the {len(records)} videos")
    captions, owner = [], []
    for v, rec in enumerate(records):
        captions += rec.caption_list
        owner += [v] * len(rec.caption_list)
    txt_tokens, atts, txt = encode_texts(model, captions, tokenizer, max_txt_l, progress=progress)
    itc = (txt @ vis.T).double()                                             # (Nt, Nv) cosines, temperature 1
    matrices = {"itc": itc}
    if itm:
        t2v, v2t = rerank(itc, k, itm_scorer(model, txt_tokens, atts, vis_tokens, MODALITIES[modality][1]),
                          progress=progress)
        matrices |= {"itm_t2v": t2v, "itm_v2t": v2t.T}                       # both (Nt, Nv)
    sets = score_sets(itc, matrices.get("itm_t2v"), matrices["itm_v2t"].T if itm else None)
    masks = {n: [rec.path in paths for rec in records] for n, paths in (subsets or {}).items()}
    texts = captions if same_text_gt else None
    metrics, ranks = retrieval_metrics(sets, owner, masks, texts)
    videos_of, _ = ground_truths(owner, texts)
    result = {"modality": modality, "same_text_gt": same_text_gt, "videos": len(records), "captions": len(captions),
              "chance_r1": 100.0 * sum(len(v) for v in videos_of) / len(videos_of) / len(records),
              "headline": {"set": "match" if itm else "sim", "metric": "t2v_r1",
                           "value": metrics["match" if itm else "sim"]["all"]["t2v_r1"]},
              "metrics": metrics, "ranks": ranks, "caption_video": owner,
              "video_paths": [rec.path for rec in records], "captions_text": captions}
    return result, {n: m.numpy() for n, m in matrices.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description="ITC text-to-video retrieval of a stage-2 run on the synthetic "
                                             "world's test split (or --data)")
    ap.add_argument("run", help="a stage-2 run folder or checkpoint")
    ap.add_argument("--data", help="eval JSON [{video, caption}]; default: the synthetic world's retrieval_test.json")
    ap.add_argument("--data-root", help="root of its paths (default: its folder)")
    ap.add_argument("--text-model", help="HF BERT folder with vocab.txt (default: the run's)")
    args = ap.parse_args(argv)
    model, meta = load_run(args.run)
    task = meta["config"]["task"]
    vocab_dir = args.text_model or task["text_model"] or minilm_path()
    tok = WordPieceTokenizer(os.path.join(vocab_dir, "vocab.txt"))
    if args.data:
        data, root, subsets = args.data, args.data_root or os.path.dirname(os.path.abspath(args.data)), None
    else:
        root = synthetic.ensure_world()
        data, subsets = os.path.join(root, "annotations", "retrieval_test.json"), synthetic_subsets(root)
    print(json.dumps(retrieval(model, data, root, tok, num_frames=task["num_frames"], max_txt_l=task["max_txt_l"],
                               subsets=subsets), indent=1))


if __name__ == "__main__":
    main()
