"""Zero-shot text-to-video retrieval by contrastive similarity (ITC), the measure of what stage 2 learned.

    videos (4 frames, middle sampling, square resize, no masking) -> vision_proj(pool) -> L2-normalised
    captions (pre_text, WordPiece, max_txt_l) -> text_proj([CLS] after the text layers) -> L2-normalised
    sim = text x video cosines (temperature 1, as the official ITC scores); a caption's rank = the position of
    its own video among all videos (ties counted against it). R@k = share of captions ranked < k.

The full protocol (ITM re-ranking, dual softmax, v2t, classification) is eval.py's; this is the ITC core it
builds on. Used by tests/test_train_stage2.py and `python -m ivmini.evaluate RUN`.
"""
import argparse
import json
import os

import torch
import torch.nn.functional as F

from .align import AlignConfig, VideoTextModel
from .data import synthetic
from .data.datasets import VideoDataset, collate, read_eval_json
from .dist import consolidate, latest_checkpoint, read_meta
from .text import WordPieceTokenizer, minilm_path


def load_run(path):
    """A stage-2 run folder (its newest checkpoint) or step_* folder -> (VideoTextModel in eval mode, meta)."""
    ckpt = latest_checkpoint(path) or latest_checkpoint(os.path.join(path, "checkpoints"))
    if ckpt is None:
        raise FileNotFoundError(f"no complete checkpoint at {path}")
    meta = read_meta(ckpt)
    if "bert" not in meta["model_config"]:
        raise ValueError(f"{ckpt} is not a stage-2 (video-text) checkpoint")
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
