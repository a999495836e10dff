"""The one training loop of every stage.

    torchrun --nproc_per_node=2 train.py --stage 1                # tiny student, synthetic world, CPU ok
    python train.py --stage 1 --max-steps 20                       # one process works too
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        train.py --stage 1 --preset 1B --data k710.txt --data-root /videos \\
        --teacher-multimodal internvl_c_13b_224px.pth --teacher-motion vit_g_hybrid_1200e_pre.pth

Reads top to bottom: config -> process group -> data -> models (FSDP2) -> optimizer and schedule ->
resume -> loop -> final checkpoint. What differs between stages (models, data, loss) lives in
ivmini/stages.py; everything distributed (sharding, agreement, checkpoints) in ivmini/dist.py.
Every field of TrainConfig (ivmini/config.py) can be set with --key=value or --set key=value.

Outputs in --out: config.json, metrics.jsonl (one JSON object per logged step), checkpoints/.
Faults: a non-finite loss or gradient norm on any rank skips the optimizer step on every rank
(logged with the step, rank, sample ids, lr and grad norm); more than --max-skips such steps abort
with exit code 3 and no new checkpoint. SIGTERM / Ctrl-C finish the current step, write a checkpoint
and exit (143 / 130).
"""
import argparse
import dataclasses
import json
import logging
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from ivmini import dist, stages
from ivmini.config import TrainConfig, train_config
from ivmini.data.datasets import ShardedSampler, make_loader

log = logging.getLogger("ivmini.train")


# ---------------------------------------------------------------------------------------------
# config

def _parse_value(field, text):
    if field.type in (bool, "bool"):
        if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError(f"--{field.name} expects true/false, got {text!r}")
        return text.lower() in ("1", "true", "yes")
    kind = {"int": int, "float": float, "str": str}.get(field.type, field.type)
    return kind(text)


def parse_args(argv=None) -> TrainConfig:
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    tiny = dataclasses.asdict(train_config(1, "tiny"))
    listing = "\n".join(f"  --{n.replace('_', '-')}={tiny[n]!r}" for n in fields)
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every TrainConfig field (ivmini/config.py, where each is explained) is an option, as --field=value, "
               "--field value or --set field=value. Fields and defaults of the tiny stage-1 recipe:\n" + listing)
    ap.add_argument("--stage", type=int, default=1, choices=sorted(stages.STAGES), help="training stage")
    ap.add_argument("--preset", default="tiny", help="student size: tiny | S | B | L | 1B | 6B")
    ap.add_argument("--data", help="annotation file (default: the synthetic world, generated on first use)")
    ap.add_argument("--out", help="output folder (default runs/stage<N>)")
    ap.add_argument("--max-steps", type=int, help="optimizer steps")
    ap.add_argument("--resume", nargs="?", const="auto", help="resume from the newest checkpoint in --out, or DIR")
    ap.add_argument("--backend", choices=["ref", "triton", "cuda"], help="kernels backend (default: triton on "
                                                                          "GPU, ref on CPU)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    args, extra = ap.parse_known_args(argv)
    overrides = {k: v for k, v in (("data", args.data), ("out", args.out), ("max_steps", args.max_steps),
                                   ("resume", args.resume), ("backend", args.backend)) if v is not None}
    pairs, extra = list(args.set), list(extra)
    while extra:                                  # --key=value or --key value
        item = extra.pop(0)
        if not item.startswith("--"):
            ap.error(f"unrecognised argument {item!r} (config fields take the form --key=value)")
        if "=" not in item:
            if not extra:
                ap.error(f"{item} needs a value")
            item = f"{item}={extra.pop(0)}"
        pairs.append(item[2:])
    for pair in pairs:
        key, _, value = pair.partition("=")
        key = key.replace("-", "_")
        if key not in fields:
            ap.error(f"unknown config field {key!r}; fields: {', '.join(sorted(fields))}")
        overrides[key] = _parse_value(fields[key], value)
    return train_config(args.stage, args.preset, **overrides)


# ---------------------------------------------------------------------------------------------
# optimizer and schedule (official stage-1 recipe: AdamW, no decay on 1-D/bias/position/cls params,
# linear warmup from 0, then step-level cosine to min_lr)

def param_groups(model, weight_decay):
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or name in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step, cfg, peak, floor):
    if step < cfg.warmup_steps:
        return peak * step / max(1, cfg.warmup_steps - 1)         # np.linspace(0, peak, warmup)
    t = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * t))


# ---------------------------------------------------------------------------------------------

def main(argv=None):
    cfg = parse_args(argv)
    rank, world, device = dist.init()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s", datefmt="%H:%M:%S")
    if cfg.backend:
        os.environ["IVMINI_BACKEND"] = cfg.backend
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    stage = stages.STAGES[cfg.stage]
    os.makedirs(cfg.out, exist_ok=True)
    if rank == 0:
        log.info("config:\n%s", json.dumps(dataclasses.asdict(cfg), indent=1))
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1)

    # data: rank 0 prepares it first (e.g. generates the synthetic world), the others then find it
    if rank != 0:
        torch.distributed.barrier()
    dataset = stage.dataset(cfg)
    if rank == 0:
        torch.distributed.barrier()
    sampler = ShardedSampler(len(dataset), rank, world, seed=cfg.seed)
    per_step = cfg.batch_size * cfg.accum
    steps_per_epoch = len(sampler) // per_step
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(dataset)} samples over {world} ranks cannot fill one step of "
                         f"{cfg.batch_size} x {cfg.accum} clips per rank")

    # models: built identically on every rank (same seed), then sharded with FSDP2
    models = stage.build(cfg, device)
    device_mesh, mp_policy = dist.mesh(device), dist.mixed_precision(device)
    for m in models.values():
        dist.shard(m, device_mesh, mp_policy)
    student = models["student"]
    if cfg.compile:
        for block in student.blocks:
            block.compile()
    global_batch = per_step * world
    peak, floor = cfg.base_lr * global_batch / 256, cfg.min_lr * global_batch / 256
    optimizer = torch.optim.AdamW(param_groups(student, cfg.weight_decay), lr=0.0, betas=(cfg.beta1, cfg.beta2),
                                  eps=cfg.eps)
    step, skips = 0, 0
    ckpt_dir = os.path.join(cfg.out, "checkpoints")
    if cfg.resume:
        path = dist.latest_checkpoint(ckpt_dir if cfg.resume == "auto" else cfg.resume)
        if path is None:
            raise SystemExit(f"--resume: no complete checkpoint under {ckpt_dir if cfg.resume == 'auto' else cfg.resume}")
        meta = dist.load_checkpoint(path, student, optimizer)
        step, skips = meta["step"], meta["skips"]
        log.info("resumed from %s at step %d", path, step)

    stop = {"signal": 0}
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.update(signal=signum))

    def batches(step):
        """Micro-batches from the data position of `step` on: epoch and offset follow from the step."""
        epoch, offset = divmod(step, steps_per_epoch)
        while True:
            sampler.set_epoch(epoch, start=offset * per_step)
            dataset.set_epoch(epoch)
            for batch in make_loader(dataset, cfg.batch_size, sampler, cfg.workers):
                yield epoch, batch
            epoch, offset = epoch + 1, 0

    metrics_file = open(os.path.join(cfg.out, "metrics.jsonl"), "a") if rank == 0 else None
    pbar = tqdm(total=cfg.max_steps, initial=step, disable=rank != 0, desc=f"stage {cfg.stage}", dynamic_ncols=True)
    data = batches(step)
    window = {"clips": 0, "time": time.perf_counter(), "skipped_samples": 0}
    while step < cfg.max_steps:
        lr = lr_at(step, cfg, peak, floor)
        for group in optimizer.param_groups:
            group["lr"] = lr
        bad, ids, values = False, [], {}
        for _ in range(cfg.accum):
            epoch, batch = next(data)                 # consumed even after a bad micro-batch: the data
            ids += batch["path"]                      # position stays a function of the step
            window["skipped_samples"] += len(batch["skipped"])
            if bad:
                continue
            loss, values = stage.forward_loss(models, batch, cfg, epoch, device)
            if step == cfg.fault_nan_step and rank == cfg.fault_nan_rank:
                loss = loss * float("nan")
            bad, = dist.agree(not torch.isfinite(loss).item())
            if not bad:                               # every rank skips backward together: no collective mismatch
                (loss / cfg.accum).backward()
        grad_norm = float("nan")
        if not bad:
            grad_norm = dist.clip_grad_norm(student, cfg.clip_grad)
            bad = not math.isfinite(grad_norm)      # the norm is global, so every rank agrees
        if bad:
            skips += 1
            log.warning("non-finite loss or gradient at step %d (rank %d, lr %.3g, grad norm %s, samples %s); "
                        "skipped (%d of at most %d)", step, rank, lr, grad_norm, ids[:8], skips, cfg.max_skips)
            if skips > cfg.max_skips:
                log.error("more than --max-skips=%d non-finite steps: aborting without a checkpoint", cfg.max_skips)
                sys.exit(3)
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window["clips"] += per_step * world
        pbar.update(1)

        if step % cfg.log_every == 0 or step == cfg.max_steps:
            values = dist.all_reduce_mean(values)
            elapsed = time.perf_counter() - window["time"]
            record = dict(step=step, lr=lr, grad_norm=grad_norm, skips=skips, clips_per_s=window["clips"] / elapsed,
                          skipped_samples=window["skipped_samples"], **values)
            if device.type == "cuda":   # model FLOPs utilisation against the dense bf16 peak of an H100/H200
                record["mfu"] = stage.flops_per_clip(models, cfg) * record["clips_per_s"] / (989e12 * world)
            window.update(clips=0, time=time.perf_counter())
            pbar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}", clips_s=f"{record['clips_per_s']:.1f}",
                             **({"mfu": f"{record['mfu']:.1%}"} if "mfu" in record else {}))
            if metrics_file:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
        stopping, = dist.agree(stop["signal"] != 0)
        if step % cfg.ckpt_every == 0 or step == cfg.max_steps or stopping:
            meta = dict(skips=skips, epoch=step // steps_per_epoch, offset=(step % steps_per_epoch) * per_step,
                        config=dataclasses.asdict(cfg), student_config=dataclasses.asdict(student.cfg))
            path = dist.save_checkpoint(ckpt_dir, step, student, optimizer, meta, keep=cfg.keep_ckpts)
            log.info("checkpoint %s", path)
        if stopping:
            log.warning("stopping on a signal after step %d", step)
            pbar.close()
            dist.shutdown()
            sys.exit(130 if stop["signal"] == signal.SIGINT else 143)
    pbar.close()
    if metrics_file:
        metrics_file.close()
    dist.shutdown()


if __name__ == "__main__":
    main()
