"""The one training loop of every stage.

    torchrun --nproc_per_node=2 train.py --stage 1                # tiny student, synthetic world, CPU ok
    python train.py --stage 1 --max-steps 20                       # one process works too
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        train.py --stage 1 --preset 1B --data k710.txt --data-root /videos \\
        --teacher-multimodal internvl_c_13b_224px.pth --teacher-motion vit_g_hybrid_1200e_pre.pth

Reads top to bottom: config -> process group -> data -> model (FSDP2) -> optimizer and schedule ->
resume -> loop -> final checkpoint. What differs between stages (data, towers, loss) lives in
ivmini/stages/; everything distributed (sharding, agreement, faults, checkpoints) in ivmini/dist.py.
Every field of TrainConfig (ivmini/config.py) is an option: --name=value, --name value or
--set name=value; the stage's own options (cfg.task) also as --task.name=value.

Outputs in --out: config.json, metrics.jsonl (one JSON object per logged step), checkpoints/.
Faults: a non-finite loss or gradient norm on any rank skips the optimizer step on every rank
(logged with the step, rank, sample ids, lr and grad norm); more than --max-skips such steps abort
with exit code 3 and no new checkpoint. SIGTERM / Ctrl-C finish the current step, write a checkpoint
and exit (143 / 130).
"""
import argparse
import dataclasses
import inspect
import io
import json
import logging
import math
import os
import random
import time
import tokenize

import numpy as np
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import kernels
from ivmini import dist, runs, stages
from ivmini.config import RECIPES, TrainConfig, option, train_config
from ivmini.data.sampling import make_loader

log = logging.getLogger("ivmini.train")


# ---------------------------------------------------------------------------------------------
# config: the stage's recipe for the preset, then the command line

def field_help(cls):
    """{field name: its trailing comment} of a config dataclass: the one-line help of each option."""
    comments = {}
    for tok in tokenize.generate_tokens(io.StringIO(inspect.getsource(cls)).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("# ")
    lines = inspect.getsource(cls).splitlines()
    return {line.split(":")[0].strip(): comments[i + 1] for i, line in enumerate(lines)
            if i + 1 in comments and ":" in line.split("#")[0]}


def stage_name(text):
    """--stage: a number (1, 2, 3) or a name (e.g. finetune)."""
    return int(text) if text.isdigit() else text


def parse_args(argv=None) -> TrainConfig:
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--stage", type=stage_name, default=1, choices=list(RECIPES))
    first.add_argument("--preset", default="tiny")
    known, rest = first.parse_known_args(argv)
    try:
        cfg = train_config(known.stage, known.preset)
    except ValueError as e:
        first.error(str(e))
    helps = {**field_help(TrainConfig), **field_help(type(cfg.task))}
    values = {**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "task"},
              **dataclasses.asdict(cfg.task)}
    options = [f"  --{k.replace('_', '-')}={v!r}" for k, v in values.items()]
    width = max(map(len, options)) + 2
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Stages: {', '.join(map(str, RECIPES))}. Options of stage {known.stage} with preset "
               f"{known.preset}, with this recipe's defaults (the stage's own options, cfg.task, also as "
               "--task.NAME):\n" + "\n".join(o.ljust(width) + helps.get(k, "") for o, k in zip(options, values)))
    ap.add_argument("--stage", type=stage_name, default=1, choices=list(RECIPES), help="training stage")
    ap.add_argument("--preset", default="tiny", help="model size: tiny | S | B | L | 1B | 6B")
    ap.add_argument("--resume", nargs="?", const="auto", help="resume from the newest checkpoint in --out, or DIR")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="set an option")
    args, extra = ap.parse_known_args(argv)
    pairs = list(args.set) + ([f"resume={args.resume}"] if args.resume else [])
    while extra:                                  # --key=value or --key value
        item = extra.pop(0)
        if not item.startswith("--"):
            ap.error(f"unrecognised argument {item!r} (options take the form --name=value)")
        if "=" not in item:
            try:
                is_flag = option(cfg, item[2:])[2] is bool
            except ValueError as e:
                ap.error(str(e))
            if not extra or extra[0].startswith("--"):
                if not is_flag:
                    ap.error(f"{item} needs a value")
                extra.insert(0, "true")                # a bare boolean option: --overwrite
            item = f"{item}={extra.pop(0)}"
        pairs.append(item[2:])
    overrides = dict(p.partition("=")[::2] for p in pairs)
    for name in ("stage", "preset"):              # they choose the recipe: only as --stage / --preset
        if name in overrides:
            ap.error(f"set {name} with --{name}, not --set {name}=...")
    try:
        cfg = train_config(known.stage, known.preset, **overrides)
    except ValueError as e:
        ap.error(str(e))
    if cfg.backend and cfg.backend not in kernels.BACKENDS:
        ap.error(f"--backend={cfg.backend!r}: choose one of {', '.join(kernels.BACKENDS)}")
    return cfg


# ---------------------------------------------------------------------------------------------
# optimizer and schedule (official recipe: AdamW, no decay on 1-D / bias / declared params (the groups:
# stage.optimizer_groups, see ivmini/stages/common.py param_groups; a group's "lr_scale", e.g. layer-wise
# decay, multiplies its learning rate), linear warmup from 0, then step-level cosine to min_lr)

def lr_at(step, peak, floor, warmup, total):
    if step < warmup:
        return peak * step / max(1, warmup - 1)                  # np.linspace(0, peak, warmup)
    t = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * t))


# ---------------------------------------------------------------------------------------------

def main(argv=None):
    cfg = parse_args(argv)
    rank, world, device = dist.init()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.ERROR,   # one voice: rank 0's
                        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s", datefmt="%H:%M:%S")
    if cfg.backend:
        os.environ["IVMINI_BACKEND"] = cfg.backend
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    stage = stages.STAGES[cfg.stage]

    try:
        for run in phases(stage, cfg):                    # one run; stage 3: one per phase, each in its folder
            lock = runs.Lock(run.out) if rank == 0 else None      # one writer per run folder: rank 0 holds it
            try:
                train(run, stage, rank, world, device, lock)
            finally:
                if lock is not None:
                    lock.release()
        dist.shutdown()
    except runs.RunError as e:
        log.error("%s", e)
        raise SystemExit(2) from None
    finally:
        dist.shutdown(wait=False)                         # after a normal end the group is already gone


def phases(stage, cfg):
    """The runs of this command: [cfg], or stage 3's one config per phase (ivmini/stages/stage3.py)."""
    try:
        return stage.phases(cfg)
    except ValueError as e:
        raise runs.RunError(str(e)) from None


def train(cfg, stage, rank, world, device, lock):
    # data: rank 0 prepares it first (e.g. generates the synthetic world), the others then find it
    with dist.rank_zero_first():
        try:
            dataset = stage.dataset(cfg)
            sampler = stage.sampler(dataset, cfg, rank, world)      # this rank's batches, resumable at a batch
        except (OSError, ValueError) as e:      # a missing or wrong annotation file, too few samples: named
            raise runs.RunError(f"--data: {e}") from None
    per_step = cfg.batch_size * cfg.accum
    steps_per_epoch = len(sampler) // cfg.accum
    if steps_per_epoch == 0:
        raise runs.RunError(f"{len(dataset)} samples over {world} ranks cannot fill one step of "
                            f"{cfg.batch_size} x {cfg.accum} clips per rank")
    max_steps = round(cfg.epochs * steps_per_epoch) if cfg.epochs else cfg.max_steps
    warmup = round(cfg.warmup_epochs * steps_per_epoch) if cfg.epochs else cfg.warmup_steps

    # the run folder: where to resume from, never over another run, taken by this run (rank 0 decides)
    resume, run_id = dist.from_rank_zero(lambda: runs.prepare(cfg, lock))

    # model: built identically on every rank (same seed), then wrapped (FSDP2, recompute, compile)
    try:
        model, frozen = stage.build(cfg, device)
    except (OSError, KeyError, ValueError) as e:   # weights missing or of another model (the message names them)
        log.debug("building the model failed", exc_info=True)
        raise runs.RunError(f"stage {cfg.stage}: {e}") from None
    if resume:
        runs.check_resume(resume, dist.read_meta(resume), dataclasses.asdict(model.cfg), max_steps)
    dist.parallelize(model, frozen.values(), device, act_ckpt=cfg.act_ckpt, compile=cfg.compile)

    # optimizer and schedule
    optimizer = torch.optim.AdamW(stage.optimizer_groups(model, cfg), lr=0.0, betas=(cfg.beta1, cfg.beta2),
                                  eps=cfg.eps)
    scale = per_step * world / 256 if cfg.lr_scaling == "batch256" else 1.0
    peak, floor = cfg.base_lr * scale, cfg.min_lr * scale

    # resume: model, optimizer, step, fault counts and this rank's RNG; the data position follows from the step
    step, counts = 0, {}
    if resume:
        meta = dist.load_checkpoint(resume, model, optimizer)
        step, counts = meta["step"], {k: meta[k] for k in ("skips", "drawn", "failed") if k in meta}
        log.info("resumed from %s at step %d", resume, step)
    guard = dist.Guard(cfg.max_skips, cfg.max_bad_data, **counts)
    if rank == 0:
        log.info("config: %s", json.dumps(dataclasses.asdict(cfg)))
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1)

    def batches(step):
        """Micro-batches from the data position of `step` on: epoch and offset follow from the step."""
        epoch, offset = divmod(step, steps_per_epoch)
        while True:
            sampler.set_epoch(epoch, start=offset * cfg.accum)
            dataset.set_epoch(epoch)
            for batch in make_loader(dataset, batch_sampler=sampler, num_workers=cfg.workers,
                                     seed=cfg.seed * 100_003 + epoch):
                yield epoch, batch
            epoch, offset = epoch + 1, 0

    metrics_file = open(os.path.join(cfg.out, "metrics.jsonl"), "a") if rank == 0 else None
    pbar = tqdm(total=max_steps, initial=step, disable=rank != 0, desc=f"stage {cfg.stage}", dynamic_ncols=True)
    data, start = batches(step), dict(step=step, time=time.perf_counter())
    window, record, ckpt = {"clips": 0, "time": time.perf_counter()}, {}, None
    with logging_redirect_tqdm():
        while step < max_steps:
            lr = lr_at(step, peak, floor, warmup, max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)   # layer-wise lr decay, where a stage sets it

            # forward and backward over the micro-batches; a non-finite loss on any rank skips the step everywhere
            finite, ids, skipped, values = True, [], [], {}
            for _ in range(cfg.accum):
                epoch, batch = next(data)             # consumed even after a bad micro-batch: the data
                ids += batch["path"]                  # position stays a function of the step
                skipped += batch["skipped"]
                if finite:
                    loss, values = stage.forward_loss(model, frozen, batch, cfg, epoch)
                    finite = guard.finite(loss, step)
                    if finite:
                        (loss / cfg.accum).backward()

            # optimizer step, unless the loss or the global gradient norm is not finite
            grad_norm = dist.clip_grad_norm(model, cfg.clip_grad) if finite else float("nan")
            if guard.take_step(finite, grad_norm, step, lr, ids):
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window["clips"] += per_step * world
            pbar.update(1)
            stopping = guard.end_step(len(ids) + len(skipped), skipped)   # signals, bad data: agreed by all

            # metrics: means over ranks, one JSON line per logged step
            if step % cfg.log_every == 0 or step == max_steps:
                values = dist.all_reduce_mean(values)
                elapsed = time.perf_counter() - window["time"]
                record = dict(step=step, lr=lr, grad_norm=grad_norm, skips=guard.skips,
                              clips_per_s=window["clips"] / elapsed, drawn=guard.data.drawn,
                              skipped_samples=guard.data.failed, **values)
                if device.type == "cuda":   # model FLOPs utilisation against the dense bf16 peak of an H100/H200
                    record["mfu"] = stage.flops_per_clip(model, frozen, cfg) * record["clips_per_s"] / (989e12 * world)
                window.update(clips=0, time=time.perf_counter())
                pbar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}", clips_s=f"{record['clips_per_s']:.1f}",
                                 **({"mfu": f"{record['mfu']:.1%}"} if "mfu" in record else {}))
                if metrics_file:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()

            # checkpoint every ckpt_every steps, at the end, and before stopping on a signal
            if step % cfg.ckpt_every == 0 or step == max_steps or stopping:
                meta = dict(run_id=run_id, epoch=step // steps_per_epoch, offset=(step % steps_per_epoch) * per_step,
                            config=dataclasses.asdict(cfg), model_config=dataclasses.asdict(model.cfg), **guard.state())
                ckpt = dist.save_checkpoint(os.path.join(cfg.out, "checkpoints"), step, model, optimizer, meta,
                                            keep=cfg.keep_ckpts)
                log.info("checkpoint %s", ckpt)
            if stopping:
                pbar.close()
                guard.exit(step)
    pbar.close()
    seconds = time.perf_counter() - start["time"]
    for line in runs.summary(cfg, step, start["step"], seconds, (step - start["step"]) * per_step * world, record, ckpt):
        log.info("%s", line)
    if metrics_file:
        metrics_file.close()


if __name__ == "__main__":
    main()
