"""The synthetic video-audio-text world: the default data of every stage (DESIGN.md §4).

No dataset can be downloaded, so ivmini generates one: real .mp4 files (H.264 yuv420p + AAC mono 16 kHz,
2 s at 8 fps = 16 frames, `size` x `size` px) with captions, labels and QA in the official annotation
formats, so that real data goes through the same loaders. Every clip comes from a numpy Generator
seeded with (seed, clip index) only, so any worker count gives the same bytes.

    picture  a smooth low-contrast grey background and 1 or 2 solid, anti-aliased shapes of distinct
             colour (red green blue yellow white purple), shape (square circle triangle rectangle) and
             size (small large). The shapes share a motion program of 1 or 2 phases from MOTIONS (left
             right up down rotate grow shrink static; circles never rotate); a two-phase clip does one
             motion per second ("moves left, then moves up"): direction and order need several frames.
    sound    beeps (1-4, 0.15 s, evenly spaced), a steady tone, a hiss of noise, or silence. The pitch
             tells the size of the first-named shape: large -> low (400 Hz), small -> high (1200 Hz).
             The beep count is only in the sound (and in the audio and fused captions).
    text     caption "a large red square moves left, then moves up"; audio_caption "three high beeps";
             av_caption "<caption> with three high beeps" / "<caption> in silence"; image_caption "a large
             red square" (what a still shows: size, colour, shape); label = the first
             phase's motion (CLASSES); QA on colour, shape, motion ("what does it do at the end?"),
             order ("what does it do first?", two-phase clips) and beep count, each with 4 options.
    splits   clip i is train when i % 20 < 14, val for 14-16, test for 17-19. Combinations in HELD_OUT
             never occur in train; 4 of every 6 val/test clips ("novel") contain one (cycling through
             HELD_OUT, so with n >= 40 each occurs), the other 2 none: seen vs. novel accuracy.

Layout under DIR (annotation paths are relative to DIR); COMPLETE is written last, then one os.replace:
    videos/<id>.mp4, README.txt, COMPLETE, annotations/classes.json (label -> class name)
    images/<id>.png                    one still per clip: the first frame where the shapes have their base
                                       size (the first frame unless they grow or shrink), so "large" holds
    annotations/stage1_<split>.txt     "synthetic videos/<id>.mp4 2 -1 -1 <label>" (single_modality list)
    annotations/stage2_<split>.json    [{"video", "caption", "audio_caption", "av_caption"}, ...] (every clip),
                                       then [{"image", "caption": image_caption}, ...] (every clip's still)
    annotations/retrieval_<split>.json [{"video", "caption", "audio_caption", "av_caption"}]  (VINDLU eval format;
                                       eval.py retrieval --modality picks the caption key)
    annotations/classify_<split>.csv   "videos/<id>.mp4,<label>"  (Kinetics csv, no header)
    annotations/instruct_<split>.json  [{"video", "QA": [{"i", "q", "a", "options", "answer_idx", "type"}]}]
    annotations/meta_<split>.json      all attributes, per-frame centre/scale/angle of each shape, the sound
Left and right are labels here: train on this world without horizontal flips.

    python -m ivmini.data.synthetic --out DIR [--n 400] [--size 112] [--seed 0] [--workers 2]
    python -m ivmini.data.synthetic --out DIR --contact-sheet sheet.png   # 6 clips x 8 decoded frames (contact_sheet.py)
2-core CPU, 112 px: ~43 clips/s with 1 worker, ~78 with 2; 400 clips = 6 MB of video, 2 MB of stills
and 1 MB of annotations.
"""
import argparse
import json
import logging
import multiprocessing
import os
import shutil

import numpy as np
from tqdm import tqdm

from .synthetic_media import (BOUND, COLOURS, SECONDS, SIZES, beep_onsets, program, render, soundtrack, tracks,
                              write_mp4, write_still)

log = logging.getLogger("ivmini.data")

VERSION = 3                     # bump when the world changes: it is part of the cache directory name
DEFAULT_N = 400                 # enough for a CPU smoke run of every stage, ~10 s to generate
SHAPES = ("square", "circle", "triangle", "rectangle")
MOTIONS = ("left", "right", "up", "down", "rotate", "grow", "shrink", "static")
CLASSES = ["moving left", "moving right", "moving up", "moving down", "rotating", "growing",
           "shrinking", "staying still"]       # label = index into MOTIONS = index into CLASSES
VERBS = {"left": ("moves left", "move left"), "right": ("moves right", "move right"),
         "up": ("moves up", "move up"), "down": ("moves down", "move down"),
         "rotate": ("rotates", "rotate"), "grow": ("grows", "grow"), "shrink": ("shrinks", "shrink"),
         "static": ("stays still", "stay still")}     # (one shape, two shapes)
MOTION_ANSWERS = ["it " + VERBS[m][0] for m in MOTIONS]     # "it moves left", ...: the motion/order answers
PITCH = {"large": ("low", 400.0), "small": ("high", 1200.0)}
SOUNDS, SOUND_P = ("beeps", "tone", "noise", "silence"), (0.55, 0.2, 0.1, 0.15)
NUMBERS = ("zero", "one", "two", "three", "four")
INSTRUCTION = "watch and listen to the video, then answer the question."
HELD_OUT = [("colour-shape", "red", "circle"), ("colour-shape", "green", "square"),
            ("colour-shape", "blue", "triangle"), ("colour-shape", "yellow", "rectangle"),
            ("colour-motion", "white", "left"), ("colour-motion", "purple", "grow"),
            ("colour-motion", "green", "down")]   # a shape with this colour and shape / with this motion
SPLITS = ("train", "val", "test")
NOVEL_POS = (14, 15, 17, 18)                      # positions i % 20 of the novel val/test clips


# ----------------------------------------------------------------------------- sampling a clip

def split_of(i):
    """-> (split, forced held-out combination or None). Fixed by the index, so even tiny worlds have all splits."""
    p = i % 20
    split = "train" if p < 14 else "val" if p < 17 else "test"
    if p not in NOVEL_POS:
        return split, None
    return split, HELD_OUT[(i // 20 * len(NOVEL_POS) + NOVEL_POS.index(p)) % len(HELD_OUT)]


def held_out_in(objects, phases):
    return [list(h) for h in HELD_OUT if any(
        o["colour"] == h[1] and (o["shape"] == h[2] if h[0] == "colour-shape" else h[2] in phases)
        for o in objects)]


def _draw(rng, force):
    """One attempt at a clip's content (may be invalid: the caller rejects and draws again)."""
    n_obj = 2 if rng.random() < 0.3 else 1
    cols = [list(COLOURS)[c] for c in rng.choice(len(COLOURS), n_obj, replace=False)]
    shps = [SHAPES[s] for s in rng.choice(len(SHAPES), n_obj, replace=False)]
    objs = [{"colour": c, "shape": s, "size": ["small", "large"][rng.integers(2)]} for c, s in zip(cols, shps)]
    phases = [MOTIONS[m] for m in rng.choice(len(MOTIONS), 2 if rng.random() < 0.3 else 1, replace=False)]
    if force is not None:
        objs[0]["colour"] = force[1]
        if force[0] == "colour-shape":
            objs[0]["shape"] = force[2]
        else:
            phases[rng.integers(len(phases))] = force[2]
    valid = (len({o["colour"] for o in objs}) == n_obj and len({o["shape"] for o in objs}) == n_obj
             and len(set(phases)) == len(phases)
             and not ("rotate" in phases and any(o["shape"] == "circle" for o in objs)))
    if not valid:
        return None
    off, scale, _ = program(phases)
    centres, margin = [], 0.03
    for o in objs:                      # place each shape so that it stays inside and apart all clip long
        o["bound"] = SIZES[o["size"]] * BOUND[o["shape"]] * scale.max()
        lo = margin + o["bound"] - off.min(0)
        hi = 1 - margin - o["bound"] - off.max(0)
        if np.any(hi < lo):
            return None
        for _ in range(20):
            c = lo + rng.random(2) * (hi - lo)
            if all(np.hypot(*(c - c2)) > o["bound"] + o2["bound"] + margin for c2, o2 in zip(centres, objs)):
                break
        else:
            return None
        centres.append(c)
    for o, c in zip(objs, centres):
        o["start"] = c.tolist()
        del o["bound"]
    return objs, phases


def sample_clip(seed, i):
    """The content of clip i (no pixels): objects, phases, sound, split. Depends on (seed, i) only."""
    rng = np.random.default_rng([seed, i])
    split, force = split_of(i)
    for _ in range(1000):
        drawn = _draw(rng, force)
        if drawn is not None:
            held = held_out_in(*drawn)
            if (list(force) in held) if force else not held:
                break
    else:
        raise RuntimeError(f"clip {i}: no valid content in 1000 draws")
    objs, phases = drawn
    kind = SOUNDS[rng.choice(len(SOUNDS), p=SOUND_P)]
    pitch, hz = PITCH[objs[0]["size"]]
    pitched = kind in ("beeps", "tone")
    sound = {"kind": kind, "beeps": int(rng.integers(1, 5)) if kind == "beeps" else 0,
             "pitch": pitch if pitched else None, "pitch_hz": hz if pitched else None}
    return {"id": f"{i:06d}", "index": i, "split": split, "novel": force is not None, "held_out": held,
            "objects": objs, "phases": phases, "label": MOTIONS.index(phases[0]), "sound": sound,
            "background_seed": int(rng.integers(2 ** 31)), "noise_seed": int(rng.integers(2 ** 31))}


# ----------------------------------------------------------------------------- text

def captions(clip):
    objs, phases, snd = clip["objects"], clip["phases"], clip["sound"]
    subject = " and ".join(f"a {o['size']} {o['colour']} {o['shape']}" for o in objs)
    visual = subject + " " + ", then ".join(VERBS[m][len(objs) - 1] for m in phases)
    n = snd["beeps"]
    audio = {"beeps": f"{NUMBERS[n]} {snd['pitch']} beep" + "s" * (n > 1), "tone": f"a steady {snd['pitch']} tone",
             "noise": "a soft hiss of noise", "silence": "silence"}[snd["kind"]]
    av_caption = f"{visual} in silence" if snd["kind"] == "silence" else f"{visual} with {audio}"
    return {"caption": visual, "audio_caption": audio, "av_caption": av_caption, "image_caption": subject}


def _mc(rng, answer, pool, must=()):
    """4 shuffled options: the answer, the `must` distractors, then random others from pool."""
    rest = [p for p in pool if p != answer and p not in must]
    opts = [answer, *must, *[rest[k] for k in rng.permutation(len(rest))[:3 - len(must)]]]
    opts = [opts[k] for k in rng.permutation(4)]
    return {"options": opts, "answer_idx": opts.index(answer)}


def qa_pairs(clip, seed):
    rng = np.random.default_rng([seed, clip["index"], 1])   # independent of how many draws the content took
    objs, phases = clip["objects"], clip["phases"]
    o = objs[rng.integers(len(objs))]
    qa = [{"type": "colour", "q": f"what colour is the {o['shape']}?", "a": o["colour"],
           **_mc(rng, o["colour"], list(COLOURS))},
          {"type": "shape", "q": f"what shape is the {o['colour']} object?", "a": o["shape"],
           **_mc(rng, o["shape"], SHAPES)}]
    name = f"the {o['colour']} {o['shape']}"
    first, last = MOTION_ANSWERS[MOTIONS.index(phases[0])], MOTION_ANSWERS[MOTIONS.index(phases[-1])]
    if len(phases) == 1:
        qa.append({"type": "motion", "q": f"what does {name} do?", "a": last, **_mc(rng, last, MOTION_ANSWERS)})
    else:   # the other phase is always among the options: only the order tells them apart
        qa.append({"type": "motion", "q": f"what does {name} do at the end?", "a": last,
                   **_mc(rng, last, MOTION_ANSWERS, must=(first,))})
        qa.append({"type": "order", "q": f"what does {name} do first?", "a": first,
                   **_mc(rng, first, MOTION_ANSWERS, must=(last,))})
    n = NUMBERS[clip["sound"]["beeps"]]
    qa.append({"type": "beeps", "q": "how many beeps do you hear?", "a": n, **_mc(rng, n, NUMBERS)})
    return [{"i": INSTRUCTION, **q} for q in qa]


def make_clip(job):
    """Worker: sample, render, encode clip i into dir -> its meta record (pure function of the job)."""
    root, i, size, seed = job
    clip = sample_clip(seed, i)
    video, image = f"videos/{clip['id']}.mp4", f"images/{clip['id']}.png"
    frames = render(clip, size)
    write_mp4(os.path.join(root, video), frames, soundtrack(clip))
    still = int(np.argmin(np.abs(np.log(program(clip["phases"])[1]))))   # the first frame at base size
    write_still(os.path.join(root, image), frames[still])
    r3 = lambda a: np.round(np.asarray(a), 3).tolist()   # noqa: E731  (compact, stable json)
    objects = [{**{k: o[k] for k in ("colour", "shape", "size")}, "rgb": list(COLOURS[o["colour"]]),
                "radius_px": round(tr["radius_px"], 3), "positions": r3(tr["positions"]),
                "scales": r3(tr["scales"]), "angles": r3(tr["angles"])}
               for o, tr in zip(clip["objects"], tracks(clip, size))]
    snd = dict(clip["sound"], onsets_s=r3(beep_onsets(clip["sound"]["beeps"])) if clip["sound"]["beeps"] else [])
    return {"id": clip["id"], "video": video, "image": image, "image_frame": still, "split": clip["split"],
            "novel": clip["novel"], "held_out": clip["held_out"], "label": clip["label"],
            "label_name": CLASSES[clip["label"]],
            "phases": clip["phases"], "objects": objects, "sound": snd, "background_seed": clip["background_seed"],
            **captions(clip), "QA": qa_pairs(clip, seed)}


# ----------------------------------------------------------------------------- the world on disk

def _dump(path, items):     # one record per line: small diffs, stable bytes
    with open(path, "w") as f:
        f.write("[\n" + ",\n".join(json.dumps(x) for x in items) + "\n]\n")


def write_annotations(root, records):
    ann = os.path.join(root, "annotations")
    os.makedirs(ann, exist_ok=True)
    _dump(os.path.join(ann, "classes.json"), CLASSES)
    for split in SPLITS:
        rs = [r for r in records if r["split"] == split]
        with open(os.path.join(ann, f"stage1_{split}.txt"), "w") as f:
            f.writelines(f"synthetic {r['video']} {SECONDS} -1 -1 {r['label']}\n" for r in rs)
        with open(os.path.join(ann, f"classify_{split}.csv"), "w") as f:
            f.writelines(f"{r['video']},{r['label']}\n" for r in rs)
        keep = lambda *keys: [{k: r[k] for k in keys} for r in rs]   # noqa: E731
        stills = [{"image": r["image"], "caption": r["image_caption"]} for r in rs]
        _dump(os.path.join(ann, f"stage2_{split}.json"), keep("video", "caption", "audio_caption", "av_caption")
              + stills)
        _dump(os.path.join(ann, f"retrieval_{split}.json"), keep("video", "caption", "audio_caption", "av_caption"))
        _dump(os.path.join(ann, f"instruct_{split}.json"), keep("video", "QA"))
        _dump(os.path.join(ann, f"meta_{split}.json"), [{k: v for k, v in r.items() if k != "QA"} for r in rs])


def is_complete(out, n=None, size=None, seed=None):
    """True when `out` holds a finished world (its COMPLETE marker), made with these args if given."""
    try:
        with open(os.path.join(out, "COMPLETE")) as f:
            args = json.load(f)
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return False
    want = {"n": n, "size": size, "seed": seed, "version": VERSION}
    return all(v is None or args.get(k) == v for k, v in want.items())


def generate(out, n=DEFAULT_N, size=112, seed=0, workers=None, progress=False, overwrite=True):
    """Write a world to `out` atomically: everything goes to out.tmp-<pid>, the COMPLETE marker last, then
    one os.replace. An existing world at `out` is replaced (overwrite=True) or kept when it is complete
    (overwrite=False: another process finished first); any other existing non-empty directory is an error.
    workers > 1 uses spawned processes: a calling script needs the usual `if __name__ == "__main__":` guard."""
    assert size % 2 == 0 and size >= 32, "size must be even (yuv420p) and >= 32 (>= 64 keeps small shapes >= 6 px)"
    out = os.path.abspath(out)
    if os.path.isdir(out) and os.listdir(out) and not is_complete(out):
        raise FileExistsError(f"{out} exists and is not a finished synthetic world; not overwriting it")
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "videos"))
    os.makedirs(os.path.join(tmp, "images"))
    jobs = [(tmp, i, size, seed) for i in range(n)]
    workers = workers or min(os.cpu_count() or 1, 8)
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:   # imap keeps the order: records[i] is clip i
        clips = pool.imap(make_clip, jobs, chunksize=4) if pool else map(make_clip, jobs)
        log.info("synthetic world: generating %d clips into %s", n, out)      # the path once, not in the bar
        records = list(tqdm(clips, total=n, desc="synthetic world", unit="clip", disable=not progress))
    finally:
        if pool:
            pool.terminate()
    write_annotations(tmp, records)
    with open(os.path.join(tmp, "README.txt"), "w") as f:
        f.write(f"ivmini synthetic world v{VERSION}: n={n} size={size} seed={seed}\n"
                f"held out of train: {HELD_OUT}\n\n{__doc__}")
    with open(os.path.join(tmp, "COMPLETE"), "w") as f:
        json.dump({"n": n, "size": size, "seed": seed, "version": VERSION}, f)
    if overwrite and os.path.isdir(out):
        shutil.rmtree(out)
    try:
        os.replace(tmp, out)
    except OSError:     # out is a non-empty directory: with overwrite=False, a world someone else finished
        if overwrite or not is_complete(out, n, size, seed):
            raise
        shutil.rmtree(tmp)
    return out


def default_root():
    return os.environ.get("IVMINI_DATA") or os.path.expanduser("~/.cache/ivmini/synthetic")


def ensure_world(root=None, n=DEFAULT_N, size=112, seed=0, workers=None, progress=True):
    """The complete world with these args under root (default: default_root()), generated if missing.
    Ranks of a distributed job may all call it: each builds its own tmp copy and the first one to finish wins."""
    path = os.path.join(root or default_root(), f"world-n{n}-s{size}-seed{seed}-v{VERSION}")
    if not is_complete(path, n, size, seed):
        generate(path, n, size, seed, workers, progress=progress, overwrite=False)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description="Generate the ivmini synthetic video-audio-text world.")
    ap.add_argument("--out", help="output directory (default: the cached world under default_root())")
    ap.add_argument("--n", type=int, default=DEFAULT_N, help=f"number of clips (default {DEFAULT_N})")
    ap.add_argument("--size", type=int, default=112, help="frame side in pixels (even)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=None, help="processes (default: the number of CPUs, at most 8)")
    ap.add_argument("--contact-sheet", metavar="PNG", help="also write a PNG of decoded frames (of --out)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.out is None:
        out = ensure_world(None, args.n, args.size, args.seed, args.workers)
    elif args.contact_sheet and is_complete(args.out):
        out = os.path.abspath(args.out)
    else:
        out = generate(args.out, args.n, args.size, args.seed, args.workers, progress=True)
    print(f"world: {out}\n  videos:      {out}/videos/ ({len(os.listdir(os.path.join(out, 'videos')))} mp4)\n"
          f"  images:      {out}/images/ ({len(os.listdir(os.path.join(out, 'images')))} png)\n"
          f"  annotations: {out}/annotations/ ({', '.join(sorted(os.listdir(os.path.join(out, 'annotations'))))})")
    if args.contact_sheet:
        from .contact_sheet import contact_sheet
        for r, cap in enumerate(contact_sheet(out, args.contact_sheet)):
            print(f"  row {r}: {cap}")
        print(f"contact sheet: {os.path.abspath(args.contact_sheet)}")


if __name__ == "__main__":
    main()
