"""Choosing among given texts or classes: zero-shot classification, fine-tuned classifiers, multiple choice
(eval.py classify / mcqa). Shared loading and encoding: ivmini/evaluate.py.

Classification (facts §3.9): class names x the 16 official action templates (TEMPLATES), each through
pre_text; the (videos x texts) ITC matrix is softmax-ed over the texts (the stage-2 official scores; a CLIP
model's are the raw cosines, softmax=False, as the official get_sim mean over the prompts), reshaped
(Nv, n_cls, 16) and averaged over the templates (score ensembling, not embedding averaging).
Fine-tuned classifiers (train.py --stage finetune; eval.py classify --finetuned; facts §2.7, §6): clips x crops
views per video (clip c: frames c, c + clips, ... of clips x T evenly spaced ones; crops: squares of the short
side at the start, centre and end of the long side), the classifier's softmax averaged over the views.
Multiple choice: each option becomes a caption (MSR-VTT MC: the option as given; the synthetic world's QA:
"<question> <option>", through pre_text); the option with the highest score wins, by ITC and by ITM.

Tests: tests/test_eval.py, tests/test_finetune.py.
"""
import json
import os

import torch
from tqdm import tqdm

from .config import VisionConfig
from .data.datasets import Record, pre_text
from .data.transforms import crop_resize, normalize
from .data.video import DecodeError, read_frames
from .dist import consolidate, latest_checkpoint, read_meta
from .evaluate import CheckpointKindError, encode_texts, encode_videos, itm_scorer, refuse_missing
from .vit import VideoViT

# the official kinetics_templates_action_clip (multi_modality dataset/text_prompt.py), in their order
TEMPLATES = [
    "a photo of action {}", "a picture of action {}", "Human action of {}", "{}, an action", "{} this is an action",
    "{}, a video of action", "Playing action of {}", "{}", "Playing a kind of action, {}",
    "Doing a kind of action, {}", "Look, the human is {}", "Can you recognize the action of {}?",
    "Video classification of {}", "A video of {}", "The man is {}", "The woman is {}",
]




def class_prompts(class_names):
    """class x template texts, class-major (text c * 16 + t), each through pre_text (as the official dataset)."""
    return [pre_text(t.format(c)) for c in class_names for t in TEMPLATES]


def ensemble_templates(scores, n_templates=len(TEMPLATES)):
    """(Nv, n_cls * T) class-major scores -> (Nv, n_cls): the mean over each class's templates."""
    Nv = scores.shape[0]
    return scores.reshape(Nv, -1, n_templates).mean(-1)                     # (Nv, n_cls, T) -> (Nv, n_cls)


def topk_correct(scores, labels, k):
    """(Nv,) bool: the label is among the k best (ties count against: k or fewer others score at least as high)."""
    labels = torch.as_tensor(labels)
    own = scores.gather(1, labels[:, None])                                  # (Nv, 1)
    return (scores >= own).sum(1) - 1 < k


def classify_eval(model, records, root, tokenizer, class_names, *, num_frames=4, size=None, max_txt_l=32,
                  batch_size=16, subsets=None, progress=False, softmax=True):
    """Records with .label -> (result, {"scores": (Nv, n_cls) ensembled}). softmax: ensemble the ITC softmax
    over all texts (stage 2), else the raw cosines (CLIP). Undecodable videos are skipped and counted."""
    size = size or model.cfg.vision.img_size
    for i, rec in enumerate(records):
        if not 0 <= rec.label < len(class_names):
            raise ValueError(f"record {i} ({rec.path}): label {rec.label} is not one of the {len(class_names)} "
                             f"classes")
    _, vis, kept, failed = encode_videos(model, records, root, num_frames=num_frames, size=size,
                                         batch_size=batch_size, progress=progress)
    refuse_missing([] if kept else failed, f"of the {len(records)} videos (all of them)")
    _, _, txt = encode_texts(model, class_prompts(class_names), tokenizer, max_txt_l, progress=progress)
    itc = (vis @ txt.T).double()                                            # (Nv, n_cls * 16) cosines
    scores = ensemble_templates(itc.softmax(dim=1) if softmax else itc)     # (Nv, n_cls)
    return class_result(scores, [records[i] for i in kept], failed, class_names, subsets), {"scores": scores.numpy()}


def class_result(scores, kept_recs, failed, class_names, subsets=None):
    """(Nv, n_cls) scores of the decoded records -> the result JSON: top-1/top-5 overall and per subset,
    per-class top-1, every video's label and prediction, the skipped videos."""
    labels = torch.tensor([r.label for r in kept_recs])
    top1, top5 = topk_correct(scores, labels, 1), topk_correct(scores, labels, 5)
    groups = {"all": torch.ones(len(kept_recs), dtype=torch.bool)}
    groups |= {n: torch.tensor([r.path in paths for r in kept_recs]) for n, paths in (subsets or {}).items()}
    metrics = {g: {"top1": 100.0 * float(top1[m].double().mean()), "top5": 100.0 * float(top5[m].double().mean()),
                   "videos": int(m.sum())} for g, m in groups.items()}
    per_class = {c: (100.0 * float(top1[labels == i].double().mean()) if (labels == i).any() else None)
                 for i, c in enumerate(class_names)}
    result = {"videos": len(kept_recs), "skipped": [{"path": p, "reason": r} for p, r in failed],
              "classes": list(class_names), "chance_top1": 100.0 / len(class_names), "metrics": metrics,
              "per_class_top1": per_class, "headline": {"metric": "top1", "value": metrics["all"]["top1"]},
              "predictions": [{"path": r.path, "label": int(r.label), "pred": int(p)}
                              for r, p in zip(kept_recs, scores.argmax(1))]}
    return result


# ---------------------------------------------------------------------------------------------
# fine-tuned classifiers (train.py --stage finetune): the official multi-view test

def load_finetuned(ckpt, spec=None):
    """A fine-tune run / step_* folder, or a file of load_official kind "finetune" (its kind in `spec`, default
    the .json beside it) -> (VideoViT with heads="classify" in eval mode, info {kind, step, source})."""
    accepts = "a fine-tuned classifier: a `train.py --stage finetune` run or checkpoint folder, or a file of " \
              "load_official kind 'finetune'"
    if os.path.isdir(ckpt):
        path = latest_checkpoint(ckpt) or latest_checkpoint(os.path.join(ckpt, "checkpoints"))
        if path is None:
            raise FileNotFoundError(f"no complete checkpoint at {ckpt}")
        meta = read_meta(path)
        if meta["model_config"].get("heads") != "classify":
            kind = "stage2" if "bert" in meta["model_config"] else meta["model_config"].get("heads", "unknown")
            raise CheckpointKindError(f"{ckpt} is not fine-tuned (its model: {kind!r}); `eval.py classify "
                                      f"--finetuned` accepts {accepts}; for zero-shot classification leave out "
                                      f"--finetuned")
        model = VideoViT(VisionConfig(**meta["model_config"]))
        model.load_state_dict(consolidate(path))
        return model.eval(), {"kind": "finetune", "step": meta["step"], "source": path}
    if not os.path.isfile(ckpt):
        raise FileNotFoundError(f"--ckpt {ckpt} does not exist")
    spec = spec or os.path.splitext(ckpt)[0] + ".json"
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"{ckpt} has no {spec} beside it saying its kind and arguments: pass --spec JSON "
                                f'({{"kind": "finetune", "kwargs": {{...load_official keywords}}}})')
    with open(spec) as f:
        desc = json.load(f)
    if desc["kind"] != "finetune":
        raise CheckpointKindError(f"{ckpt} is a {desc['kind']!r} checkpoint; `eval.py classify --finetuned` "
                                  f"accepts {accepts}")
    from .checkpoint import load_official
    model = load_official("finetune", ckpt, **desc.get("kwargs", {}))
    return model, {"kind": "finetune", "step": desc.get("step"), "source": ckpt}


def multi_view(frames, clips, crops, size):
    """uint8 (clips * T, H, W, 3), evenly spaced over the video -> float32 (clips * crops, 3, T, size, size).
    Clip c takes frames c, c + clips, ...: T frames over the whole video, each clip at its own offset (the
    official sparse test sampling); each crop is a square of the short side at the start, centre or end of the
    long side (crops = 1: the centre), resized to `size` (official: short side to size, then crops)."""
    H, W = frames.shape[1:3]
    side, room = min(H, W), abs(H - W)
    offsets = [room // 2] if crops == 1 else [room * i // (crops - 1) for i in range(crops)]
    views = []
    for c in range(clips):
        clip = frames[c::clips]                                               # (T, H, W, 3)
        for o in offsets:
            top, left = (o, 0) if H > W else (0, o)
            views.append(normalize(crop_resize(clip, top, left, side, side, size, "bicubic")))
    return torch.stack(views)                                                 # (views, 3, T, size, size)


@torch.no_grad()
def finetuned_classify_eval(model, records, root, class_names, *, clips=2, crops=1, batch_size=8, subsets=None,
                            progress=False):
    """Records with .label -> (result, {"scores": (Nv, n_cls)}): each video's softmax over the classes averaged
    over its clips x crops views. Undecodable videos are skipped and counted."""
    cfg = model.cfg
    if len(class_names) != cfg.num_classes:
        raise ValueError(f"{len(class_names)} class names for a classifier of {cfg.num_classes} classes")
    for i, rec in enumerate(records):
        if not 0 <= rec.label < cfg.num_classes:
            raise ValueError(f"record {i} ({rec.path}): label {rec.label} is not one of the {cfg.num_classes} "
                             f"classes")
    kept, failed, scores = [], [], []
    for start in tqdm(range(0, len(records), batch_size), desc="videos", unit="batch", disable=not progress):
        views = []
        for i in range(start, min(start + batch_size, len(records))):
            path = records[i].path if os.path.isabs(records[i].path) else os.path.join(root, records[i].path)
            try:
                frames = read_frames(path, cfg.num_frames * clips, "middle")   # (clips * T, H, W, 3)
            except DecodeError as e:
                failed.append((records[i].path, e.reason))
                continue
            views.append(multi_view(frames, clips, crops, cfg.img_size))
            kept.append(i)
        if views:
            logits = model(torch.cat(views)).logits.double()                  # (n * views, n_cls)
            scores.append(logits.softmax(-1).view(len(views), clips * crops, -1).mean(1))   # (n, n_cls)
    refuse_missing([] if kept else failed, f"of the {len(records)} videos (all of them)")
    scores = torch.cat(scores)
    return class_result(scores, [records[i] for i in kept], failed, class_names, subsets), {"scores": scores.numpy()}


def read_multiple_choice(path):
    """MSR-VTT MC [{"video", "caption": [options], "answer": index}] or the synthetic world's instruct JSON
    [{"video", "QA": [{"q", "options", "answer_idx", "type"}]}] -> questions [{"video", "type", "options"
    (captions, pre_text), "answer"}]. A malformed entry is an error naming it."""
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON list of questions")
    questions = []
    for i, item in enumerate(data):
        if not isinstance(item, dict) or "video" not in item:
            raise ValueError(f"{path}: entry {i}: expected an object with 'video', got {item!r}")
        if "QA" in item:
            for j, qa in enumerate(item["QA"]):
                if not {"q", "options", "answer_idx"} <= set(qa):
                    raise ValueError(f"{path}: entry {i}: QA {j}: needs 'q', 'options' and 'answer_idx': {qa}")
                questions.append(_question(path, i, item["video"], qa.get("type", "all"),
                                           [f"{qa['q']} {o}" for o in qa["options"]], qa["answer_idx"]))
        elif "caption" in item and "answer" in item:
            questions.append(_question(path, i, item["video"], "all", item["caption"], item["answer"]))
        else:
            raise ValueError(f"{path}: entry {i}: needs 'caption' (the options) and 'answer', or 'QA': {item}")
    return questions


def _question(path, i, video, qtype, options, answer):
    if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
        raise ValueError(f"{path}: entry {i}: the options must be a list of 2 or more strings, got {options!r}")
    if not isinstance(answer, int) or not 0 <= answer < len(options):
        raise ValueError(f"{path}: entry {i}: answer must be an index into the {len(options)} options, got "
                         f"{answer!r}")
    return {"video": video, "type": qtype, "options": [pre_text(o) for o in options], "answer": answer}


def mcqa_eval(model, questions, root, tokenizer, *, num_frames=4, size=None, max_txt_l=32, itm=True,
              batch_size=16, progress=False):
    """Questions (read_multiple_choice) -> result: accuracy by ITC (and by ITM: the fusion layers' positive logit)
    overall and per question type. A question is right when its answer scores strictly above every other option.
    Questions on undecodable videos are skipped and counted."""
    size = size or model.cfg.vision.img_size
    paths = sorted({q["video"] for q in questions})
    records = [Record(p) for p in paths]
    vis_tokens, vis, kept, failed = encode_videos(model, records, root, num_frames=num_frames, size=size,
                                                  batch_size=batch_size, progress=progress)
    refuse_missing([] if kept else failed, f"of the {len(records)} videos (all of them)")
    row = {paths[i]: r for r, i in enumerate(kept)}
    asked = [q for q in questions if q["video"] in row]
    texts, t_idx, v_idx = [], [], []
    for q in asked:
        t_idx.append(list(range(len(texts), len(texts) + len(q["options"]))))
        v_idx.append(row[q["video"]])
        texts += q["options"]
    txt_tokens, atts, txt = encode_texts(model, texts, tokenizer, max_txt_l, progress=progress)
    scorers = {"itc": lambda t, v: (txt[t] * vis[v]).sum(-1)}
    if itm:
        scorers["itm"] = itm_scorer(model, txt_tokens, atts, vis_tokens)
    per_q = [{"video": q["video"], "type": q["type"], "answer": q["answer"]} for q in asked]
    t_all = torch.tensor([t for ts in t_idx for t in ts])                    # every (option, video) pair
    v_all = torch.tensor([v for ts, v in zip(t_idx, v_idx) for _ in ts])
    for name, score in scorers.items():
        flat = torch.cat([score(t_all[i:i + 64], v_all[i:i + 64]).double() for i in
                          tqdm(range(0, len(t_all), 64), desc=name, unit="batch", disable=not progress)])
        for q, ts in zip(per_q, t_idx):
            s = flat[ts[0]:ts[-1] + 1]                                      # this question's options
            q[f"{name}_scores"] = s.tolist()
            q[f"{name}_correct"] = bool((s >= s[q["answer"]]).sum() == 1)   # strictly above every other option
    metrics = {}
    for name in scorers:
        for qtype in ["all"] + sorted({q["type"] for q in per_q} - {"all"}):
            group = [q for q in per_q if qtype == "all" or q["type"] == qtype]
            metrics.setdefault(qtype, {})[f"{name}_acc"] = 100.0 * sum(q[f"{name}_correct"] for q in group) / len(group)
            metrics[qtype]["questions"] = len(group)
            metrics[qtype]["chance"] = 100.0 * sum(1 / len(q["itc_scores"]) for q in group) / len(group)
    headline = "itm_acc" if itm else "itc_acc"
    return {"questions": len(per_q), "skipped_questions": len(questions) - len(asked),
            "skipped": [{"path": p, "reason": r} for p, r in failed], "metrics": metrics,
            "headline": {"metric": headline, "value": metrics["all"][headline]}, "per_question": per_q}
