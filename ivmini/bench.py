"""Encoder forward time and peak memory on the CPU, per kernels backend, one fresh process per measurement.

    python -m ivmini.bench                                # B preset, 8 x 224^2, batch 1, 2 threads, fp32: ref vs torch
    python -m ivmini.bench --preset 1B --rounds 3         # the 1B encoder (~4 GB of fp32 weights)
    python -m ivmini.bench --backends torch --rounds 1    # one quick figure

What is timed: the forward of VideoViT(vision_config(preset, num_frames=F, heads="classify", num_classes=400,
mlp_act="gelu")) under torch.no_grad(), fp32, on one random video (batch, 3, F, 224, 224 for B/1B), with
torch.set_num_threads(threads). That is the official single_modality fine-tune `InternVideo2` with
use_flash_attn = use_fused_rmsnorm = use_fused_mlp = False (exact GELU, fc_norm + 400-class head), so the
same weights give the same logits in both (see README "CPU speed" for how the official code was timed).

How: every (backend, round) runs in its own subprocess (this module with --child), and the rounds are
interleaved (ref, torch, ref, torch, ...) so that load from other processes on the machine hits every
backend alike. A child builds the model on the meta device and fills it with fill_weights() (no init
cost), runs one warm-up forward, then times `iters` forwards. Figures are medians over rounds, and the best
round (other processes only ever add time, so on a shared machine it is the least disturbed one). Memory is
the child's ru_maxrss (peak resident set, weights included) and its rise over the resident set measured
after building the model (what the forward adds; read from /proc, so Linux only). The children save their
logits, and the parent prints the largest difference between backends.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import zlib

import torch


def fill_weights(model, seed=0):
    """Give every parameter and buffer a value drawn from a generator seeded by (seed, its name), so two models
    with the same names (ivmini uses the official checkpoint keys) get the same weights. Matrices ~ N(0, 0.02^2);
    vectors named *weight / *gamma (norms, LayerScale) ~ 1 + N(0, 0.02^2); other vectors (biases) ~ N(0, 0.02^2)."""
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            t.copy_(torch.randn(t.shape, generator=g) * 0.02)
            if t.dim() == 1 and name.endswith(("weight", "gamma")):
                t.add_(1.0)


def rss_mb():
    """Current resident set of this process in MiB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def time_forward(forward, video, iters):
    """One warm-up forward, then `iters` timed ones: wall seconds and process CPU seconds per forward, and the
    output of the last one. CPU seconds add up all threads, spin-waiting OpenMP threads included."""
    with torch.no_grad():
        forward(video)
        wall, cpu = [], []
        for _ in range(iters):
            t0, c0 = time.perf_counter(), time.process_time()
            out = forward(video)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return wall, cpu, out


def video_input(cfg, batch, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(batch, cfg.in_chans, cfg.num_frames, cfg.img_size, cfg.img_size, generator=g)


def model_config(preset, frames):
    from ivmini.config import vision_config
    return vision_config(preset, num_frames=frames, heads="classify", num_classes=400, mlp_act="gelu")


def build_ivmini(cfg):
    """The model, built on the meta device and filled by fill_weights; returns video -> logits."""
    from ivmini.vit import VideoViT
    with torch.device("meta"):
        model = VideoViT(cfg)
    model.to_empty(device="cpu").eval()
    fill_weights(model)
    return lambda video: model(video).logits


def child(args, build=build_ivmini):
    """Runs in the subprocess: build, time, report one JSON line; IVMINI_BACKEND picks the kernels backend.
    `build(cfg)` returns the forward (another script may pass its own, e.g. to time other code the same way)."""
    torch.set_num_threads(args.threads)
    cfg = model_config(args.preset, args.frames)
    forward = build(cfg)
    video = video_input(cfg, args.batch)
    built = rss_mb()
    wall, cpu, out = time_forward(forward, video, args.iters)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux
    torch.save(out, args.out)
    print(json.dumps({"s": wall, "cpu_s": cpu, "peak_mb": peak, "built_mb": built}))


def run_child(argv, env_backend, out, module="ivmini.bench"):
    env = dict(os.environ, IVMINI_BACKEND=env_backend)
    cmd = [sys.executable, "-m", module, "--child", "--out", out] + argv
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def summarise(name, runs):
    """Medians over rounds: seconds per forward, peak RSS, and the forward's rise over the built model."""
    s = [statistics.median(r["s"]) for r in runs]
    return {"name": name, "s": statistics.median(s), "s_all": s, "best_s": min(s),
            "cpu_s": statistics.median(statistics.median(r["cpu_s"]) for r in runs),
            "peak_mb": statistics.median(r["peak_mb"] for r in runs),
            "fwd_mb": statistics.median(r["peak_mb"] - r["built_mb"] for r in runs)}


def print_table(rows, base):
    """One line per implementation; ratios > 1 mean faster than `base`."""
    print(f"{'impl':10s} {'wall s':>8s} {'vs ' + base:>9s} {'best s':>8s} {'vs ' + base:>9s} {'CPU s':>8s} "
          f"{'peak RSS MB':>12s} {'fwd rise MB':>12s}  wall s per round")
    b = next(r for r in rows if r["name"] == base)
    for r in rows:
        rounds = " ".join(f"{x:.2f}" for x in r["s_all"])
        print(f"{r['name']:10s} {r['s']:8.3f} {b['s'] / r['s']:8.2f}x {r['best_s']:8.3f} "
              f"{b['best_s'] / r['best_s']:8.2f}x {r['cpu_s']:8.3f} {r['peak_mb']:12.0f} {r['fwd_mb']:12.0f}  {rounds}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="B", help="tiny | S | B | L | 1B (default B)")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every child (default 2)")
    ap.add_argument("--backends", default="ref,torch", help="comma-separated kernels backends (default ref,torch)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds, one subprocess each (default 5)")
    ap.add_argument("--iters", type=int, default=1, help="timed forwards per subprocess, after one warm-up")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    same = ["--preset", args.preset, "--frames", str(args.frames), "--batch", str(args.batch),
            "--threads", str(args.threads), "--iters", str(args.iters)]
    backends = args.backends.split(",")
    img = model_config(args.preset, args.frames).img_size
    print(f"VideoViT {args.preset}, {args.frames} x {img}^2, batch {args.batch}, fp32, no grad, "
          f"{args.threads} threads; median of {args.rounds} interleaved rounds, one process each; "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs")
    runs = {b: [] for b in backends}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for b in backends:
                runs[b].append(run_child(same, b, os.path.join(tmp, f"{b}.pt")))
                print(f"  round {r + 1} {b}: {statistics.median(runs[b][-1]['s']):.3f} s", flush=True)
        outs = {b: torch.load(os.path.join(tmp, f"{b}.pt")) for b in backends}
    rows = [summarise(b, runs[b]) for b in backends]
    print_table(rows, backends[0])
    for b in backends[1:]:
        print(f"max |logits {b} - {backends[0]}| = {(outs[b] - outs[backends[0]]).abs().max().item():.3g} "
              f"(logits scale {outs[backends[0]].abs().max().item():.3g})")
    return rows


if __name__ == "__main__":
    main()
