"""Evaluating the stage-3 chat model (eval.py qa / chat; facts §5.2): multiple choice by the LLM's likelihood, and
answering a question about a video with the answer streamed.

    qa_eval(model, records, root, tok, qtok, ...)   each question's options scored by the summed log-probability
                                                    of " option </s>" after the question (the training layout of
                                                    ivmini/chat.py, one turn); the highest wins. Accuracy per
                                                    question type and per subset (seen / novel).
    load_video(path, cfg)                           a video as the chat model sees it: num_frames, middle sampling,
                                                    a square resize (no crop), normalised -> (C, T, S, S)
    stream_answer(model, video, question, ...)      the chat() of VideoChat with each new piece of text printed

The sum (not the mean) of the option's token log-probabilities is the score: it is the probability of the whole
answer, which is what a chat model would say; options of one question differ in length by a token or two here.
The eos is part of the option ("it moves left </s>" vs "it moves left, then ..."), as in training.
A question is right when its answer scores strictly above every other option. Videos that fail to decode are
skipped and counted; their questions are not asked.
Tests: tests/test_stage3.py.
"""
import argparse
import json
import os
import sys

import torch
from tqdm import tqdm

from .chat import IGNORE, collate, encode_conversation, qformer_batch
from .data import synthetic
from .data.datasets import Record, VideoDataset, read_instruct_json
from .data.synthetic import INSTRUCTION
from .data.video import DecodeError
from .dist import latest_checkpoint
from .evaluate import synthetic_subsets
from .features import atomic_write
from .stages.stage3 import load_chat_run, tokenizers
from .tasks import CHAT_PHASES


def load_video(path, vision_cfg, root=""):
    """(C, T, S, S) float: the chat model's frames of one video (middle sampling, square resize, normalised)."""
    ds = VideoDataset([Record(path)], root, num_frames=vision_cfg.num_frames, size=vision_cfg.img_size,
                      transform="test", sample="middle", flip=False)
    return ds.load(0, None)["video"]


@torch.no_grad()
def option_scores(model, video, qa, tok, qtok, *, max_len=None, qformer_max_len=64):
    """Summed log-probabilities (n_options,) of each option of one QA {"i", "q", "options"} about `video`
    (C, T, S, S): one batch, the video encoded once."""
    encoded = [encode_conversation({"QA": [{"i": qa.get("i", ""), "q": qa["q"], "a": o}]}, tok, model.n_visual,
                                   max_len) for o in qa["options"]]
    ids, mask, labels = collate(encoded, tok.pad_id)                                        # (K, L)
    device = model.project_up.weight.device
    qids, qmask = qformer_batch([encoded[0].instruction], qtok, qformer_max_len)
    visual = model.encode_video(video[None].to(device), qids.to(device), qmask.to(device))  # (1, Nq, D)
    visual = visual.expand(len(encoded), -1, -1)
    ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
    logits = model.lm(inputs_embeds=model.embed(ids, visual), attention_mask=mask).float()  # (K, L, V)
    logp = logits[:, :-1].log_softmax(-1)
    target = labels[:, 1:]
    picked = logp.gather(-1, target.clamp(min=0)[..., None])[..., 0]                       # (K, L-1)
    return (picked * (target != IGNORE)).sum(-1).double().cpu()


def qa_eval(model, records, root, tok, qtok, *, subsets=None, max_len=None, qformer_max_len=64, generate=False,
            progress=False):
    """Instruction records [{"video", "QA": [{"i", "q", "options", "answer_idx", "type"}]}] -> result dict:
    accuracy (%) overall and per type, each also per subset (e.g. seen / novel: {name: set of video paths}),
    chance per group, and every question with its scores. generate: also answer each question freely (greedy,
    as eval.py chat does) and count the answers equal to "a" (case and surrounding space ignored): "gen_acc"."""
    per_q, skipped = [], []
    for rec in tqdm(records, desc="qa", unit="video", disable=not progress):
        try:
            video = load_video(rec.path, model.vision_encoder.cfg, root)
        except DecodeError as e:
            skipped.append({"path": rec.path, "reason": e.reason, "questions": len(rec.qa)})
            continue
        for qa in rec.qa:
            if not {"q", "options", "answer_idx"} <= set(qa):
                raise ValueError(f"{rec.path}: a QA needs 'q', 'options' and 'answer_idx': {qa}")
            s = option_scores(model, video, qa, tok, qtok, max_len=max_len, qformer_max_len=qformer_max_len)
            a = qa["answer_idx"]
            per_q.append({"video": rec.path, "type": qa.get("type", "all"), "q": qa["q"], "options": qa["options"],
                          "answer": a, "pred": int(s.argmax()), "scores": s.tolist(),
                          "correct": bool((s >= s[a]).sum() == 1)})
            if generate:
                said = model.chat(video, qa["q"], tok, qtok, instruction=qa.get("i", ""), max_len=max_len,
                                  qformer_max_len=qformer_max_len, max_new_tokens=16)
                per_q[-1].update(generated=said, gen_correct=said.strip().lower() == qa["options"][a].strip().lower())
    if not per_q:
        raise ValueError(f"no question could be asked: all {len(records)} videos failed to decode")
    groups = {"all": per_q} | {t: [q for q in per_q if q["type"] == t] for t in sorted({q["type"] for q in per_q})}
    metrics = {}
    for name, group in groups.items():
        metrics[name] = _accuracy(group)
        for sub, paths in (subsets or {}).items():
            inside = [q for q in group if q["video"] in paths]
            if inside:
                metrics[name][sub] = _accuracy(inside)
    return {"questions": len(per_q), "skipped": skipped, "metrics": metrics,
            "headline": {"metric": "acc", "value": metrics["all"]["acc"]}, "per_question": per_q}


def _accuracy(group):
    out = {"acc": 100.0 * sum(q["correct"] for q in group) / len(group), "questions": len(group),
           "chance": 100.0 * sum(1 / len(q["options"]) for q in group) / len(group)}
    if "gen_correct" in group[0]:
        out["gen_acc"] = 100.0 * sum(q["gen_correct"] for q in group) / len(group)
    return out


def stream_answer(model, video, question, tok, qtok, *, out=sys.stdout, **chat_kw):
    """model.chat(...) printing the answer to `out` as it is generated -> the answer text."""
    shown, new = "", []

    def on_token(token):                                 # (1,) the id just generated
        nonlocal shown
        if int(token[0]) == tok.eos_id:
            return
        new.append(int(token[0]))
        text = tok.decode(new).strip()
        out.write(text[len(shown):])
        out.flush()
        shown = text
    answer = model.chat(video, question, tok, qtok, on_token=on_token, **chat_kw)
    out.write(answer[len(shown):] + "\n")
    out.flush()
    return answer


# ---------------------------------------------------------------------------------------------
# the command line: eval.py qa | chat

def load_chat(ckpt, spec=None):
    """--ckpt -> (VideoChat in eval mode, {"source", "step", "task": the ChatTask dict or None}). A stage-3 run or
    step_* folder (the stage-3 root: its newest phase of instruct, caption, lm), or a released chat file with a
    JSON spec {"kind": "chat", "kwargs": {...load_official keywords}} (default: the .json beside it)."""
    if os.path.isdir(ckpt):
        folder = next((os.path.join(ckpt, p) for p in reversed(CHAT_PHASES)
                       if latest_checkpoint(os.path.join(ckpt, p, "checkpoints"))), ckpt)
        model, meta = load_chat_run(folder)
        return model, {"source": meta["source"], "step": meta["step"], "task": meta["config"]["task"]}
    spec = spec or os.path.splitext(ckpt)[0] + ".json"
    if not os.path.isfile(ckpt) or not os.path.isfile(spec):
        raise FileNotFoundError(f"--ckpt {ckpt}: not a stage-3 run folder, nor a chat file with its spec {spec}")
    with open(spec) as f:
        desc = json.load(f)
    if desc.get("kind") != "chat":
        raise ValueError(f"{spec}: kind {desc.get('kind')!r}; eval.py chat / qa take a stage-3 run or kind 'chat'")
    from .checkpoint import load_official
    return load_official("chat", ckpt, **desc.get("kwargs", {})), {"source": ckpt, "step": desc.get("step"),
                                                                   "task": None}


def build_parser(prog=None):
    ap = argparse.ArgumentParser(prog=prog, description="the stage-3 chat model: qa (multiple choice by likelihood) "
                                                        "or chat (answer a question about a video)")
    sub = ap.add_subparsers(dest="task", required=True)
    for task in ("qa", "chat"):
        p = sub.add_parser(task)
        p.add_argument("--ckpt", required=True, help="stage-3 run (runs/stage3: its newest phase) or step_* folder, "
                                                     "or a released chat file with its --spec")
        p.add_argument("--spec", help="JSON {kind: chat, kwargs} for a --ckpt file (default: the .json beside it)")
        p.add_argument("--tokenizer", help="the LLM's sentencepiece tokenizer.model (default: the run's)")
        p.add_argument("--qformer-vocab", help="BERT vocab.txt of the Q-Former instruction (default: the run's)")
        p.add_argument("--max-len", type=int, help="LLM tokens of a prompt (default: the run's max_txt_len)")
        if task == "qa":
            p.add_argument("--data", help="instruction JSON with options (default: the synthetic world's test split)")
            p.add_argument("--data-root", help="root of its video paths (default: the file's folder)")
            p.add_argument("--out", default="results_qa.json", help="result JSON")
            p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
            p.add_argument("--generate", action="store_true", help="also answer each question freely (greedy) and "
                                                                   "report how often the answer is exactly right")
        else:
            p.add_argument("--video", required=True, help="the video to talk about")
            p.add_argument("--question", action="append", help="a question (repeatable: a conversation); without "
                                                               "it, questions are read from the terminal")
            p.add_argument("--instruction", help="the instruction (default: the world's, for a run trained on it)")
            p.add_argument("--max-new-tokens", type=int, default=32)
            p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sampling")
            p.add_argument("--top-p", type=float, default=1.0)
            p.add_argument("--seed", type=int, default=0)
    return ap


def main(argv=None, prog=None):
    ap = build_parser(prog)
    args = ap.parse_args(argv)
    if args.task == "qa" and os.path.exists(args.out) and not args.overwrite:
        ap.error(f"{args.out} exists; pass --overwrite to replace it (or another --out)")
    try:
        model, info = load_chat(args.ckpt, args.spec)
    except (FileNotFoundError, ValueError, KeyError) as e:
        ap.error(str(e))
    task = dict(info["task"] or {"tokenizer": "", "llm": "", "qformer_vocab": "", "max_txt_len": 512,
                                 "qformer_max_len": 64})
    task.update({k: v for k, v in (("tokenizer", args.tokenizer), ("qformer_vocab", args.qformer_vocab)) if v})
    if info["task"] is None and not (args.tokenizer and args.qformer_vocab):
        ap.error("a chat file needs --tokenizer (the LLM's tokenizer.model) and --qformer-vocab (BERT's vocab.txt)")
    tok, qtok = tokenizers(task)
    max_len = args.max_len or task["max_txt_len"]
    v = model.vision_encoder.cfg
    protocol = (f"{args.task} | chat {info['source']} (step {info['step']}) | {v.num_frames} frames, middle sampling, "
                f"{v.img_size}x{v.img_size} square resize (no crop) | {model.n_visual} visual tokens | "
                + ("each option scored by the summed log-probability of ' option </s>' after the question; the "
                   "highest wins; headline: accuracy" if args.task == "qa" else
                   f"{'greedy' if args.temperature == 0 else f'sampling T={args.temperature} top-p {args.top_p}'}, "
                   f"at most {args.max_new_tokens} new tokens"))
    print(protocol, flush=True)
    if args.task == "chat":
        chat(model, args, tok, qtok, max_len)
        return
    world = None if args.data else synthetic.ensure_world()
    data = args.data or os.path.join(world, "annotations", "instruct_test.json")
    root = args.data_root or world or os.path.dirname(os.path.abspath(data))
    result = qa_eval(model, read_instruct_json(data), root, tok, qtok, subsets=synthetic_subsets(world) if world
                     else None, max_len=max_len, qformer_max_len=task["qformer_max_len"], generate=args.generate,
                     progress=True)
    result = {"task": "qa", "protocol": protocol, "ckpt": os.path.abspath(args.ckpt), "data": data,
              "data_root": root} | result

    def dump(tmp):
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
    atomic_write(args.out, dump)
    subs = [k for k in ("seen", "novel") if any(k in m for m in result["metrics"].values())]
    gen = ["gen_acc"] if args.generate else []
    print(f"{'type':10s} {'questions':>9s} {'acc %':>6s} " + " ".join(f"{k:>6s}" for k in subs) + f" {'chance':>6s}"
          + (" generated: exact %  " + " ".join(f"{k:>6s}" for k in subs) if gen else ""))
    for name, m in result["metrics"].items():
        print(f"{name:10s} {m['questions']:9d} {m['acc']:6.1f} "
              + " ".join(f"{m[k]['acc']:6.1f}" if k in m else f"{'-':>6s}" for k in subs) + f" {m['chance']:6.1f}"
              + (f" {m['gen_acc']:19.1f}  " + " ".join(f"{m[k]['gen_acc']:6.1f}" if k in m else f"{'-':>6s}"
                                                     for k in subs) if gen else ""))
    print(f"headline acc {result['headline']['value']:.1f} % ({result['questions']} questions, "
          f"{len(result['skipped'])} videos skipped) -> {args.out}")


def chat(model, args, tok, qtok, max_len):
    try:
        video = load_video(args.video, model.vision_encoder.cfg)
    except DecodeError as e:
        sys.exit(f"error: {args.video} cannot be decoded: {e.reason}")
    instruction = args.instruction if args.instruction is not None else INSTRUCTION
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
               temperature=args.temperature or 1.0, top_p=args.top_p,
               generator=torch.Generator().manual_seed(args.seed))
    history = []
    for q in args.question or typed():
        print(f"Q: {q}\nA: " if args.question else "model> ", end="", flush=True)
        answer = stream_answer(model, video, q, tok, qtok, history=history, instruction=instruction,
                               max_len=max_len, **gen)
        history.append((q, answer))


def typed():
    """Questions typed at the terminal, until an empty line or end of input."""
    print("(an empty line or Ctrl-D ends the chat)")
    while True:
        try:
            q = input("you> ").strip()
        except EOFError:
            return
        if not q:
            return
        yield q
