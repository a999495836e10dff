"""Zero-shot evaluation of a stage-2 model, one task per sub-command, the protocol printed with every result.

    python eval.py retrieval --ckpt runs/stage2 [--data EVAL_JSON --data-root DIR] [--out results.json]
                             [--k 128] [--no-itm] [--frames 4] [--batch-size 16]
    python eval.py classify  --ckpt runs/stage2 [--data CSV --classes NAMES]
    python eval.py retrieval|classify --ckpt clip.pt --tokenizer LLAMA/tokenizer.model   (InternVideo2-CLIP)
    python eval.py classify  --ckpt runs/finetune --finetuned [--data CSV] [--clips 4 --crops 3]
    python eval.py mcqa      --ckpt runs/stage2 [--data JSON] [--no-itm]
    python eval.py features  --ckpt runs/stage1 --videos DIR|LIST --out DIR [--layer -7] [--pool] [--stride S]
                             (any video encoder; the options: python eval.py features --help, ivmini/features.py)
    python eval.py qa        --ckpt runs/stage3 [--data INSTRUCT_JSON]        (the stage-3 chat model: multiple
    python eval.py chat      --ckpt runs/stage3 --video V [--question Q]     choice by likelihood; a conversation,
                             streamed; options: python eval.py qa|chat --help, ivmini/chat_eval.py)

--ckpt: a stage-2 run folder or checkpoints/step_* folder, or a file (an export of `python -m ivmini.checkpoint
export`, or an official stage-2 release) with its kind and keywords in --spec (default: the .json beside it).
Without --data: the synthetic world's test split, with seen / novel attribute combinations reported apart.
Each task prints one protocol line first, shows progress, and writes --out (default results_<task>.json)
atomically, never over an existing file without --overwrite; retrieval also writes its score matrices
(<out>.itc.npy, .itm_t2v.npy, .itm_v2t.npy, all (texts, videos)), classify its (videos, classes) scores.
The protocols, score sets and metric names: ivmini/evaluate.py (retrieval), ivmini/classify.py (classify, mcqa).
An InternVideo2-CLIP file (spec kind "clip"; retrieval and classify): ITC only, so --no-itm is implied and the
protocol line says so; 8 frames unless --frames; the official CLIP text format ("summarize:" + caption + </s>,
right padding, max 80 tokens) with the LLaMA sentencepiece model of --tokenizer (default: tokenizer.model beside
--ckpt); classify ensembles the raw cosines, as the official CLIP evaluation.
Tests: tests/test_eval.py, tests/test_eval_clip.py.
"""
import argparse
import json
import os
import sys

import numpy as np

from ivmini import chat_eval, classify, evaluate, features
from ivmini.data import synthetic
from ivmini.data.datasets import read_classify_csv, read_eval_json
from ivmini.stages.stage2 import tokenizer
from ivmini.text import minilm_path


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="zero-shot evaluation of a stage-2 (video-text) model; features of "
                                             "your own videos with any video encoder")
    sub = ap.add_subparsers(dest="task", required=True)
    for task, help_ in (("retrieval", "text-to-video and video-to-text retrieval (ITC, ITM re-rank)"),
                        ("classify", "zero-shot classification: class names x 16 templates, score ensembling"),
                        ("mcqa", "multiple choice by similarity (MSR-VTT MC, or the synthetic world's QA)"),
                        ("features", "features of your own videos (any layer, tokens or pooled) as .npy + a manifest; "
                                     "options: python eval.py features --help"),
                        ("qa", "stage-3 chat model: multiple choice by the LLM's likelihood, per question type; "
                               "options: python eval.py qa --help"),
                        ("chat", "stage-3 chat model: answer questions about a video (streamed); options: "
                                 "python eval.py chat --help")):
        p = sub.add_parser(task, help=help_)
        if task in ("features", "qa", "chat"):    # parsed by ivmini/features.py, chat_eval.py (see main)
            continue
        p.add_argument("--ckpt", required=True, help="stage-2 run / step_* folder, or an exported / official file")
        p.add_argument("--spec", help="JSON {kind, kwargs} for a --ckpt file (default: the .json beside it)")
        p.add_argument("--data", help="annotations (default: the synthetic world's test split)")
        p.add_argument("--data-root", help="root of the annotation's video paths (default: the file's folder)")
        p.add_argument("--out", help=f"result JSON (default: results_{task}.json)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
        p.add_argument("--frames", type=int, help="frames per video (default: the official zero-shot 4; 8 for a "
                                                  "CLIP checkpoint)")
        p.add_argument("--batch-size", type=int, default=16, help="videos per forward")
        p.add_argument("--text-model", help="folder with the vocab.txt (default: the run's, else all-MiniLM-L6-v2)")
        p.add_argument("--max-txt-l", type=int, help="text tokens (default: the run's, else 32; CLIP: 80)")
        p.add_argument("--tokenizer", help="a CLIP checkpoint's sentencepiece tokenizer.model (LLaMA's) or its "
                                           "folder (default: tokenizer.model beside --ckpt)")
        if task == "retrieval":
            p.add_argument("--k", type=int, default=128, help="ITM re-ranks each query's top k (official 128)")
            p.add_argument("--modality", choices=list(evaluate.MODALITIES), default="video",
                           help="what the texts retrieve: video (ITC/ITM), audio (ATC/ATM) or audio-video (AVTC/AVTM; "
                                "the last two need a model trained with --set audio=true)")
            p.add_argument("--caption-key", help="the annotation key of the query texts (default by modality: "
                           + ", ".join(f"{m} {c}" for m, (c, _) in evaluate.MODALITIES.items()) + ")")
            p.add_argument("--same-text-gt", action="store_true",
                           help="every video whose caption is the same text is a ground truth (official "
                                "has_multi_vision_gt; on by default for --modality audio, whose captions repeat)")
        if task in ("retrieval", "mcqa"):
            p.add_argument("--no-itm", action="store_true", help="ITC only (no fusion-encoder scores)")
        if task == "classify":
            p.add_argument("--classes", help="class names: a JSON list or one name per line (default with --data: "
                                             "classes.json beside it)")
            p.add_argument("--finetuned", action="store_true", help="a fine-tuned classifier (train.py --stage "
                           "finetune): its logits at the model's frames, multi-view (--clips x --crops, softmax "
                           "averaged)")
            p.add_argument("--clips", type=int, default=2, help="--finetuned: clips per video (official 4)")
            p.add_argument("--crops", type=int, default=1, help="--finetuned: crops per clip (official 3)")
    return ap.parse_args(argv)


def data_files(args, default_name):
    """(annotation path, data root, subsets or None): --data, else the synthetic world's test split."""
    if args.data:
        return args.data, args.data_root or os.path.dirname(os.path.abspath(args.data)), None
    world = synthetic.ensure_world()
    return (os.path.join(world, "annotations", default_name), args.data_root or world,
            evaluate.synthetic_subsets(world))


def read_class_names(path):
    with open(path) as f:
        text = f.read()
    names = json.loads(text) if path.endswith(".json") else [line.strip() for line in text.splitlines()
                                                            if line.strip()]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{path}: expected a list of class names (JSON list of strings, or one per line)")
    return names


def write_atomic(path, write):
    tmp = f"{path}.tmp-{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def save_results(args, out, stem, protocol, data, root, result, mats, summary, itm=False):
    """Write the score matrices (.npy) and the result JSON atomically, then print the summary."""
    result = {"task": args.task, "protocol": protocol, "ckpt": os.path.abspath(args.ckpt), "data": data,
              "data_root": root, "k": getattr(args, "k", None), "itm": itm} | result

    def save(m):
        def write(tmp):
            with open(tmp, "wb") as f:          # a file object: np.save would add .npy to a path
                np.save(f, m)
        return write
    for name, m in mats.items():
        write_atomic(f"{stem}.{name}.npy", save(m))
        result.setdefault("matrices", {})[name] = f"{os.path.basename(stem)}.{name}.npy"

    def dump(tmp):
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
    write_atomic(out, dump)
    print(json.dumps(summary, indent=1))
    print(f"headline {result['headline']} -> {out}")


def classify_finetuned(args, out, stem):
    """eval.py classify --finetuned: the classifier's own logits over clips x crops views (ivmini/classify.py)."""
    if args.clips < 1 or args.crops < 1:
        sys.exit(f"--clips={args.clips} and --crops={args.crops} must be at least 1")
    try:
        model, info = classify.load_finetuned(args.ckpt, spec=args.spec)
    except evaluate.CheckpointKindError as e:
        sys.exit(f"error: {e}")
    cfg = model.cfg
    data, root, subsets = data_files(args, "classify_test.csv")
    names = args.classes or os.path.join(os.path.dirname(os.path.abspath(data)), "classes.json")
    names = read_class_names(names) if os.path.isfile(names) or args.classes else \
        [str(i) for i in range(cfg.num_classes)]           # a CSV without class names: the label numbers
    protocol = (f"classify (fine-tuned) | {info['kind']} {info['source']} (step {info['step']}) | {cfg.num_frames} "
                f"frames x {args.clips} clips (evenly spaced, each at its own offset) x {args.crops} crops (short side "
                f"square, start / centre / end), {cfg.img_size}x{cfg.img_size} | the classifier's softmax averaged "
                f"over the {args.clips * args.crops} views; headline: top1")
    print(protocol, flush=True)
    result, mats = classify.finetuned_classify_eval(model, read_classify_csv(data), root, names, clips=args.clips,
                                                    crops=args.crops, batch_size=args.batch_size, subsets=subsets,
                                                    progress=True)
    result = result | {"clips": args.clips, "crops": args.crops}
    save_results(args, out, stem, protocol, data, root, result, mats,
                 result["metrics"] | {"chance_top1": result["chance_top1"]})


def clip_text(args, model):
    """A CLIP checkpoint's text side -> (tokenizer, max tokens, the protocol's text part); --tokenizer, else the
    tokenizer.model beside --ckpt."""
    if args.text_model:
        sys.exit("error: --text-model is the stage-2 WordPiece vocabulary; a CLIP checkpoint reads --tokenizer "
                 "(its LLaMA sentencepiece tokenizer.model)")
    path = args.tokenizer or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "tokenizer.model")
    if not os.path.exists(path):
        sys.exit(f"error: a CLIP checkpoint needs its LLaMA sentencepiece tokenizer: pass --tokenizer PATH to "
                 f"tokenizer.model (no {path})")
    try:
        vocab = evaluate.CLIPTextTokenizer(path, model.cfg.text)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: --tokenizer: {e}")
    max_txt_l = args.max_txt_l or evaluate.CLIP_MAX_TXT_L
    return vocab, max_txt_l, (f"text {evaluate.CLIP_PREFIX!r} + caption + </s> ({vocab.path}, <s> first, right "
                              f"padding), max {max_txt_l} tokens")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["features"]:
        features.main(argv[1:], prog="eval.py features")
        return
    if argv[:1] in (["qa"], ["chat"]):
        chat_eval.main(argv, prog="eval.py")
        return
    args = parse_args(argv)
    out = args.out or f"results_{args.task}.json"
    stem = os.path.splitext(out)[0]
    arrays = {"retrieval": ["itc", "itm_t2v", "itm_v2t"], "classify": ["scores"], "mcqa": []}[args.task]
    for path in [out] + [f"{stem}.{a}.npy" for a in arrays]:
        if os.path.exists(path) and not args.overwrite:
            sys.exit(f"{path} exists; pass --overwrite to replace it (or another --out)")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)   # before the work, not after it

    if args.task == "classify" and args.finetuned:
        classify_finetuned(args, out, stem)
        return
    try:
        model, info = evaluate.load_model(args.ckpt, args.task, spec=args.spec)
    except evaluate.CheckpointKindError as e:
        sys.exit(f"error: {e}")
    clip = info["kind"] == "clip"                           # InternVideo2-CLIP: ITC only, its own text format
    if clip:
        vocab, max_txt_l, text = clip_text(args, model)
    elif args.tokenizer:
        sys.exit("error: --tokenizer is for a CLIP checkpoint; a stage-2 model reads the WordPiece --text-model")
    else:
        vocab = tokenizer(args.text_model or info["text_model"] or minilm_path())
        max_txt_l = args.max_txt_l or info["max_txt_l"] or 32
        text = f"text max {max_txt_l} tokens"
    frames = args.frames if args.frames is not None else evaluate.CLIP_FRAMES if clip else 4
    size = model.cfg.vision.img_size
    itm = args.task != "classify" and not args.no_itm and not clip     # classify: ITC scores only
    common = dict(num_frames=frames, size=size, max_txt_l=max_txt_l, batch_size=args.batch_size, progress=True)
    if args.task == "retrieval":
        tc, tm = {"video": ("ITC", "ITM"), "audio": ("ATC", "ATM"), "audio-video": ("AVTC", "AVTM")}[args.modality]
        caption_key = args.caption_key or evaluate.MODALITIES[args.modality][0]
        same_text = args.same_text_gt or args.modality == "audio"
        gt = "every video with the same text is a ground truth" if same_text else "each caption's own video"
        scores = (f"{args.modality} vs texts {caption_key!r}, {gt} | sim ({tc} cosine, temp 1), dsl (dual softmax), match "
                  f"({tm} re-rank of each query's top-{args.k} by {tc}, others -100); headline: match t2v_r1" if itm else
                  f"{args.modality} vs texts {caption_key!r}, {gt} | sim ({tc} cosine, temp 1), dsl (dual softmax), no "
                  f"{tm}{' (ITC only: a CLIP model has no ITM head, --no-itm implied)' if clip else ''}; headline: "
                  f"sim t2v_r1")
        try:
            evaluate.check_modality(model, args.modality, itm)
        except evaluate.CheckpointKindError as e:
            sys.exit(f"error: {e}")
    elif args.task == "classify":
        scores = (f"{'ITC cosine (raw, as the official CLIP evaluation)' if clip else 'ITC softmax'} over the "
                  f"{len(classify.TEMPLATES)} x classes texts, averaged over the {len(classify.TEMPLATES)} templates; "
                  f"headline: top1")
    else:
        scores = ("option with the highest score; ITC cosine and ITM positive logit; headline: ITM accuracy" if itm
                  else "option with the highest ITC cosine; headline: ITC accuracy")
    protocol = (f"{args.task} | {info['kind']} {info['source']} (step {info['step']}) | {frames} frames, middle "
                f"sampling, {size}x{size} square resize (no crop), no masking | {text} | {scores}")
    print(protocol, flush=True)

    if args.task == "retrieval":
        data, root, subsets = data_files(args, "retrieval_test.json")
        result, mats = evaluate.retrieval_eval(model, read_eval_json(data, caption_key), root, vocab, k=args.k,
                                               itm=itm, subsets=subsets, modality=args.modality,
                                               same_text_gt=same_text, **common)
        summary = {name: {g: {m: round(v, 2) for m, v in r.items() if m in ("t2v_r1", "v2t_r1", "r_mean")}
                          for g, r in groups.items()} for name, groups in result["metrics"].items()}
    elif args.task == "classify":
        data, root, subsets = data_files(args, "classify_test.csv")
        names = args.classes or os.path.join(os.path.dirname(os.path.abspath(data)), "classes.json")
        result, mats = classify.classify_eval(model, read_classify_csv(data), root, vocab, read_class_names(names),
                                              subsets=subsets, softmax=not clip, **common)
        summary = result["metrics"] | {"chance_top1": result["chance_top1"]}
    else:
        data, root, _ = data_files(args, "instruct_test.json")
        result, mats = classify.mcqa_eval(model, classify.read_multiple_choice(data), root, vocab, itm=itm,
                                          **common), {}
        summary = result["metrics"]

    save_results(args, out, stem, protocol, data, root, result, mats, summary, itm)


if __name__ == "__main__":
    main()
