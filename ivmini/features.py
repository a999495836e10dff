"""Features of your own videos: any video encoder ivmini loads -> one array per video, plus a manifest.

    python -m ivmini.features --ckpt PATH --videos DIR|LIST --out DIR [--layer -1] [--pool] [--frames T]
        [--stride S] [--batch-size N] [--format npy|safetensors] [--overwrite] [--device cpu|cuda] [--backend B]
    (eval.py features ... calls main(argv) with the same arguments)

Per video (issue 14 item 3):
    frames   without --stride: one clip of T frames, `middle` sampling over the whole video (the eval protocol);
             with --stride S: frames 0, S, 2S, ... in consecutive windows of T (clip k holds sampled frames
             kT .. kT+T-1; the last window is padded with its last frame, as frame_indices pads short videos)
    transform  the test transform: square resize to the model's img_size (bicubic, no crop), ImageNet mean/std
    output   tokens after block L (--layer, negative from the end; -7 is what the official temporal action
             localisation features use): (n_clips, 1+N, C), CLS first, t-major then row-major patches, no norm;
             or with --pool the attention-pool output (n_clips, clip_embed_dim) (last layer only).
             There is always a leading clip axis, also for the single clip without --stride.
Files under --out: <relative path without extension>.npy per video (float32), or with --format safetensors one
features.safetensors keyed by that relative path; manifest.json with the settings, per video its path, output,
shape, fps, frame indices, and the skipped videos with the reason. A video that fails to decode (a DecodeError of
ivmini.data.video: corrupt, truncated, not a video) is skipped, listed and counted, never fatal. Re-running skips
videos whose output exists, after checking the manifest's settings are the same (--overwrite redoes everything).
Clips of several videos share a forward (--batch-size clips). Every file is written atomically (tmp + os.replace).

--ckpt: an ivmini run or step_* folder (stage 1: its VideoViT; stage 2: its vision_encoder), an exported file
with its .json sidecar (python -m ivmini.checkpoint export), or any checkpoint file with --kind KIND and
--kwargs JSON (load_official's kinds and keywords; see ivmini/checkpoint/__init__.py).

Limits: decoding uses ivmini.data.video's scan/decode steps directly (read_frames takes a sampling rule, not
indices). --format safetensors writes its one file at the end of a run, so an interrupted run loses that run's
features (npy files are written per video, and the manifest every 10 s). Features are computed in float32.
Test: python -m pytest tests/test_features.py -q
"""
import argparse
import dataclasses
import json
import os
import time

import numpy as np
import torch
from tqdm import tqdm

import kernels
from .align import AlignConfig, VideoTextModel
from .checkpoint import load_official, resize_pos_embeds
from .config import VisionConfig
from .data.transforms import test_transform
from .data.video import DEFAULT_TIMEOUT, DecodeError, frame_indices, read_frames_at, video_info
from .dist import consolidate, latest_checkpoint, read_meta
from .vit import VideoViT

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v")


class FeaturesError(ValueError):
    """Bad input to the features command (checkpoint, videos, options); the message says what and what to do."""


# settings that must match for a re-run to add to an --out folder
SETTINGS = ("checkpoint", "layer", "pool", "frames", "stride", "img_size", "format")


# ---------------------------------------------------------------------------------------------
# the encoder

def load_encoder(ckpt, kind=None, kwargs=None) -> VideoViT:
    """--ckpt -> the VideoViT in eval mode (see the module docstring for what `ckpt` may be)."""
    if kwargs and not kind:
        raise FeaturesError("--kwargs needs --kind (the load_official kind they belong to)")
    if os.path.isdir(ckpt):
        if kind:
            raise FeaturesError(f"--kind {kind!r} is for checkpoint files; {ckpt} is a folder (an ivmini run)")
        path = latest_checkpoint(ckpt)
        if path is None:
            raise FeaturesError(f"no complete checkpoint at {ckpt} (an ivmini run folder, or a step_* folder)")
        config = read_meta(path)["model_config"]
        if "bert" in config:                       # stage 2 (an AlignConfig): its vision tower
            model = VideoTextModel(AlignConfig(**config))
            model.load_state_dict(consolidate(path))
            return model.vision_encoder.eval()
        model = VideoViT(VisionConfig(**config))
        model.load_state_dict(consolidate(path))
        return model.eval()
    if not os.path.isfile(ckpt):
        raise FeaturesError(f"--ckpt {ckpt}: no such file or folder")
    if not kind:
        sidecar = os.path.splitext(ckpt)[0] + ".json"
        if not os.path.isfile(sidecar):
            raise FeaturesError(f"{ckpt}: no {sidecar} next to it (what `python -m ivmini.checkpoint export` writes); "
                                f"pass --kind KIND [--kwargs JSON] for an official checkpoint")
        with open(sidecar) as f:
            spec = json.load(f)
        if not isinstance(spec, dict) or "kind" not in spec:
            raise FeaturesError(f"{sidecar} has no \"kind\": not an export sidecar; pass --kind and --kwargs")
        kind, kwargs = spec["kind"], spec.get("kwargs", {})
    try:
        model = load_official(kind, ckpt, **(kwargs or {}))
    except (ValueError, TypeError, KeyError) as e:       # unknown kind or keyword, keys that do not fit
        raise FeaturesError(f"--ckpt {ckpt} as kind {kind!r}: {e}") from e
    if isinstance(model, VideoViT):
        return model.eval()
    if not isinstance(model, VideoTextModel):
        raise FeaturesError(f"checkpoint kind {kind!r} holds no video encoder ({type(model).__name__}); "
                            f"use a vision kind or 'stage2'")
    return model.vision_encoder.eval()


def with_frames(model: VideoViT, frames: int) -> VideoViT:
    """The same encoder for clips of `frames` frames: its position table resized in time (linear, as on load)."""
    cfg = model.cfg
    if frames == cfg.num_frames:
        return model
    if frames % cfg.tubelet_size:
        raise FeaturesError(f"--frames {frames} must be a multiple of the model's tubelet size {cfg.tubelet_size}")
    with torch.device("meta"):                    # no initialisation: every tensor comes from `model`
        new = VideoViT(dataclasses.replace(cfg, num_frames=frames))
    state = resize_pos_embeds(dict(model.state_dict()), new.cfg, orig_t_size=cfg.t_size)
    new.load_state_dict(state, assign=True)
    return new.eval()


@torch.no_grad()
def encode(model: VideoViT, clips, layer=-1, pool=False):
    """clips (B, 3, T, H, W) -> tokens after block `layer` (B, 1+N, C), or the pooled (B, clip_embed_dim)."""
    out = model(clips, return_idx=layer, pool=False)
    return model.clip_projector(out.tokens) if pool else out.tokens


# ---------------------------------------------------------------------------------------------
# videos and their clips

def find_videos(videos):
    """--videos (a folder, searched recursively, or a text file of paths) -> (root, sorted paths). Paths in a
    list are relative to the list's folder unless absolute; blank lines and # comments are skipped."""
    if os.path.isdir(videos):
        found = [os.path.join(d, f) for d, _, files in os.walk(videos) for f in files
                 if f.lower().endswith(VIDEO_EXTENSIONS)]
        root = videos
    elif os.path.isfile(videos):
        base = os.path.dirname(os.path.abspath(videos))
        with open(videos) as f:
            lines = [line.strip() for line in f]
        found = [os.path.join(base, line) for line in lines if line and not line.startswith("#")]
        root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in found]) if found else base
    else:
        raise FeaturesError(f"--videos {videos}: no such folder or list file")
    if not found:
        raise FeaturesError(f"--videos {videos}: no videos ({', '.join(VIDEO_EXTENSIONS)})")
    return root, sorted(set(os.path.abspath(p) for p in found))


def clip_indices(vlen, frames, stride=None):
    """Frame indices of each clip: [[T indices]] (one `middle` clip, or windows of every stride-th frame)."""
    if stride is None:
        return [frame_indices(frames, vlen, "middle")]
    picked = list(range(0, vlen, stride))
    clips = [picked[i:i + frames] for i in range(0, len(picked), frames)]
    clips[-1] = clips[-1] + [clips[-1][-1]] * (frames - len(clips[-1]))   # pad the last window
    return clips


def read_clips(path, indices, size, timeout=DEFAULT_TIMEOUT):
    """Yield each clip of `indices` as float32 (3, T, size, size) with the test transform, decoded in one open of
    the file (video.read_frames_at); DecodeError on any failure. The time limit is per clip."""
    for frames in read_frames_at(path, indices, timeout=timeout):
        yield test_transform(frames, size)                                   # (3, T, size, size)


# ---------------------------------------------------------------------------------------------
# writing

def atomic_write(path, write):
    """write(tmp_path) then os.replace, so a reader never sees half a file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def save_npy(path, array):
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array)
    atomic_write(path, write)


def save_manifest(out, manifest):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
    atomic_write(os.path.join(out, "manifest.json"), write)


def output_names(root, paths, fmt):
    """{video path: its output, relative to --out} (relative path, extension replaced); two videos that would
    share an output (a.mp4 and a.avi) are an error before anything runs."""
    names = {}
    for p in paths:
        rel = os.path.splitext(os.path.relpath(p, root))[0]
        names[p] = rel + ".npy" if fmt == "npy" else rel
    clash = len(set(names.values())) != len(names)
    if clash:
        seen = {}
        for p, n in names.items():
            seen.setdefault(n, []).append(p)
        raise FeaturesError("videos that differ only by extension would share an output: "
                            + "; ".join(" and ".join(ps) for ps in seen.values() if len(ps) > 1))
    return names


# ---------------------------------------------------------------------------------------------
# the run

def extract(model, videos, out, *, checkpoint, layer=-1, pool=False, frames=None, stride=None, batch_size=8,
            fmt="npy", overwrite=False, device="cpu", progress=True):
    """Features of every video under `videos` written under `out` (module docstring) -> the manifest dict."""
    cfg = model.cfg
    if not -cfg.depth <= layer < cfg.depth:
        raise FeaturesError(f"--layer {layer}: the model has {cfg.depth} blocks, choose one in "
                            f"[-{cfg.depth}, {cfg.depth - 1}]")
    layer = layer - cfg.depth if layer >= 0 else layer        # VideoViT's return_idx counts from the end
    if pool and layer != -1:
        raise FeaturesError(f"--pool is the attention pool over the last block's tokens; it cannot go with --layer "
                            f"{layer} (block {cfg.depth + layer} of {cfg.depth})")
    if (stride is not None and stride < 1) or batch_size < 1:
        raise FeaturesError(f"--stride ({stride}) and --batch-size ({batch_size}) must be >= 1")
    if fmt not in ("npy", "safetensors"):
        raise FeaturesError(f"--format {fmt!r}: choose npy or safetensors")
    model = with_frames(model, frames or cfg.num_frames).to(device)
    frames = model.cfg.num_frames
    root, paths = find_videos(videos)
    names = output_names(root, paths, fmt)

    settings = dict(checkpoint=os.path.abspath(checkpoint), layer=layer, pool=pool, frames=frames, stride=stride,
                    img_size=cfg.img_size, format=fmt)
    manifest_path = os.path.join(out, "manifest.json")
    manifest = {**settings, "videos": {}, "skipped": {}}
    if os.path.exists(manifest_path) and not overwrite:
        with open(manifest_path) as f:
            old = json.load(f)
        differ = {k: (old.get(k), settings[k]) for k in SETTINGS if old.get(k) != settings[k]}
        if differ:
            raise FeaturesError(f"{out} holds features made with other settings {differ} (old, new); "
                                f"use another --out or --overwrite")
        manifest["videos"] = old.get("videos", {})
    stored = {}                                      # safetensors: the one file's arrays, kept and added to
    st_path = os.path.join(out, "features.safetensors")
    if fmt == "safetensors" and os.path.exists(st_path) and not overwrite:
        from safetensors.numpy import load_file
        stored = load_file(st_path)

    def done(p):
        return names[p] in stored if fmt == "safetensors" else os.path.exists(os.path.join(out, names[p]))

    todo = [p for p in paths if overwrite or not done(p)]
    counts = {"videos": len(paths), "already_done": len(paths) - len(todo), "written": 0, "failed": 0}
    pending = []                                     # [(video record, clip index, clip tensor)] of the next batch
    results = {}                                     # video path -> list of per-clip outputs, None until computed

    def finish(rec):
        array = np.stack(results.pop(rec["path"]))   # (n_clips, ...) float32
        if fmt == "npy":
            save_npy(os.path.join(out, rec["output"]), array)
        else:
            stored[rec["output"]] = array
        rec["shape"] = list(array.shape)
        manifest["videos"][os.path.relpath(rec["path"], root)] = rec
        manifest["skipped"].pop(os.path.relpath(rec["path"], root), None)
        counts["written"] += 1

    def flush():
        batch = torch.stack([c for _, _, c in pending]).to(device)          # (B, 3, T, H, W)
        feats = encode(model, batch, layer, pool).float().cpu().numpy()
        for (rec, k, _), f in zip(pending, feats):
            results[rec["path"]][k] = f
            if all(r is not None for r in results[rec["path"]]):
                finish(rec)
        pending.clear()

    last_save = time.monotonic()
    bar = tqdm(todo, desc="features", unit="video", disable=not progress)
    for path in bar:
        rel = os.path.relpath(path, root)
        try:
            info = video_info(path)
            indices = clip_indices(info["num_frames"], frames, stride)
            rec = dict(path=path, output=names[path], fps=info["fps"], num_frames=info["num_frames"],
                       frame_indices=indices)
            results[path] = [None] * len(indices)
            for k, clip in enumerate(read_clips(path, indices, cfg.img_size)):
                pending.append((rec, k, clip))
                if len(pending) == batch_size:
                    flush()
        except DecodeError as e:                     # drop whatever of this video is queued or computed
            pending[:] = [p for p in pending if p[0]["path"] != path]
            results.pop(path, None)
            manifest["skipped"][rel] = {"path": path, "reason": e.reason}
            manifest["videos"].pop(rel, None)
            counts["failed"] += 1
        bar.set_postfix(written=counts["written"], failed=counts["failed"])
        if fmt == "npy" and time.monotonic() - last_save > 10:    # so an interrupted run keeps its manifest
            save_manifest(out, {**manifest, "counts": counts})
            last_save = time.monotonic()
    if pending:
        flush()
    if fmt == "safetensors" and stored:
        from safetensors.numpy import save_file
        atomic_write(st_path, lambda tmp: save_file(stored, tmp))
    manifest["counts"] = counts
    save_manifest(out, manifest)
    return manifest


def build_parser(prog=None):
    ap = argparse.ArgumentParser(prog=prog, description="Features of your own videos from any ivmini video encoder "
                                                        "(tokens of a layer, or the pooled vector) -> .npy + manifest")
    ap.add_argument("--ckpt", required=True, help="an ivmini run / step_* folder, an export (with its .json), or "
                                                  "a checkpoint file with --kind")
    ap.add_argument("--kind", help="load_official kind of an official checkpoint file (e.g. stage2_vision)")
    ap.add_argument("--kwargs", default="{}", help="JSON object of load_official keyword arguments for --kind")
    ap.add_argument("--videos", required=True, help="a folder (searched recursively) or a text file of paths")
    ap.add_argument("--out", required=True, help="output folder: one .npy per video + manifest.json")
    ap.add_argument("--layer", type=int, default=-1, help="tokens after this block (negative: from the end; "
                                                          "-7 as the official temporal action localisation features)")
    ap.add_argument("--pool", action="store_true", help="the attention-pool output instead of tokens (last layer)")
    ap.add_argument("--frames", type=int, help="frames per clip (default: the model's num_frames)")
    ap.add_argument("--stride", type=int, help="clips of every stride-th frame over the whole video (default: one "
                                               "clip, middle sampling)")
    ap.add_argument("--batch-size", type=int, default=8, help="clips per forward, across videos")
    ap.add_argument("--format", choices=("npy", "safetensors"), default="npy")
    ap.add_argument("--overwrite", action="store_true", help="recompute videos whose output exists")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--backend", choices=kernels.BACKENDS, help="kernels backend (default: triton on CUDA, "
                                                                  "torch on CPU; also IVMINI_BACKEND)")
    return ap


def main(argv=None, prog=None):
    """CLI entry (also `eval.py features`): parses argv, writes the features, prints a summary; -> manifest."""
    ap = build_parser(prog)
    args = ap.parse_args(argv)
    try:
        kwargs = json.loads(args.kwargs)
    except json.JSONDecodeError as e:
        ap.error(f"--kwargs is not JSON: {e}")
    if not isinstance(kwargs, dict):
        ap.error(f"--kwargs must be a JSON object, got {args.kwargs}")
    if args.backend:
        try:                                          # one that cannot run here fails now, not after decoding
            kernels.resolve_backend("attention", args.backend, torch.device(args.device))
        except kernels.BackendUnavailable as e:
            ap.error(f"--backend {args.backend}: {e}")
        os.environ["IVMINI_BACKEND"] = args.backend   # the model's kernels read it (as train.py --backend)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    try:
        model = load_encoder(args.ckpt, args.kind, kwargs)
        manifest = extract(model, args.videos, args.out, checkpoint=args.ckpt, layer=args.layer, pool=args.pool,
                           frames=args.frames, stride=args.stride, batch_size=args.batch_size, fmt=args.format,
                           overwrite=args.overwrite, device=args.device)
    except FeaturesError as e:
        ap.error(str(e))
    c = manifest["counts"]
    print(f"features: {c['written']} written, {c['already_done']} already done, {c['failed']} skipped "
          f"(unreadable) of {c['videos']} videos -> {os.path.join(args.out, 'manifest.json')}")
    for rel, s in manifest["skipped"].items():
        print(f"  skipped {rel}: {s['reason']}")
    return manifest


if __name__ == "__main__":
    main()
