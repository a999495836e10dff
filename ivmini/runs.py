"""The run folder (--out): one writer at a time, no run written over another, --resume finding what users
point at, and the summary a run ends with.

    OUT/LOCK            {"pid", "host", "started"} while a run writes here (rank 0 takes it, releases it on exit;
                        a lock whose process is gone, on this host, is stale and taken over)
    OUT/config.json     the resolved config of the latest start or resume
    OUT/metrics.jsonl   one JSON object per logged step, appended across resumes
    OUT/checkpoints/    step_* folders (ivmini/dist.py), each with the run_id of the run that wrote it

A new run into a folder that holds another run's metrics or checkpoints is refused (resume it, or pass
--overwrite to delete them first). Everything here is decided before anything is written; problems are
RunError, which train.py reports as a usage error.
"""
import json
import os
import shutil
import socket
import time
import uuid

from . import dist


class RunError(Exception):
    """The run folder or the checkpoint asked for does not allow this run; the message says why and what to do."""


def _started(pid):
    """A process's start time (clock ticks since boot, Linux /proc), to tell it from a later one with the same pid."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


def _alive(pid, started):
    try:
        return _started(pid) == started
    except (FileNotFoundError, ProcessLookupError):
        return False


class Lock:
    """OUT/LOCK, created atomically (O_EXCL) by the one process that writes the run folder."""

    def __init__(self, out):
        self.path, self.held = os.path.join(out, "LOCK"), False

    def acquire(self):
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _started(os.getpid()),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._break_if_stale(me["host"])
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise RunError(f"could not take {self.path}")

    def _break_if_stale(self, host):
        try:
            with open(self.path) as f:
                other = json.load(f)
        except (OSError, ValueError):
            other = {}
        if not other:                       # empty or unreadable: a writer that died between create and write
            os.remove(self.path)
            return
        if other.get("host") == host and not _alive(other.get("pid", -1), other.get("started")):
            os.remove(self.path)            # its process is gone: a stale lock (e.g. after kill -9)
            return
        where = "this host" if other.get("host") == host else f"host {other.get('host')}"
        raise RunError(f"{os.path.dirname(self.path)} is in use by another run (pid {other.get('pid')} on {where}, "
                       f"since {other.get('since')}); use another --out. If that run is gone, delete {self.path}.")

    def release(self):
        if self.held:
            self.held = False
            os.remove(self.path)


def prepare(cfg, lock):
    """Rank 0, before anything is written: resolve --resume, refuse to write over another run, take the lock.
    Returns (the checkpoint to resume from or None, the run's id)."""
    ckpts, metrics = os.path.join(cfg.out, "checkpoints"), os.path.join(cfg.out, "metrics.jsonl")
    resume = None
    if cfg.resume:
        where = cfg.out if cfg.resume == "auto" else cfg.resume
        resume = dist.latest_checkpoint(where)
        if resume is None:
            raise RunError(f"--resume: no complete checkpoint in {where} (looked for a step_* folder, "
                           f"{os.path.join(where, 'step_*')} and {os.path.join(where, 'checkpoints', 'step_*')})")
    run_id = dist.read_meta(resume).get("run_id", "") if resume else uuid.uuid4().hex[:12]
    held = dist.latest_checkpoint(ckpts)
    ours = held is not None and dist.read_meta(held).get("run_id") == run_id      # out holds the run resumed
    other = [] if ours else [p for p in (metrics, held) if p and os.path.exists(p)]
    if other and not cfg.overwrite:
        raise RunError(f"{cfg.out} already holds {'another' if resume else 'a'} run ({', '.join(other)}): "
                       + ("" if resume else "continue it with --resume, ")
                       + "pass --overwrite to delete it and start over, or choose another --out")
    os.makedirs(cfg.out, exist_ok=True)
    lock.acquire()
    if other:                                 # --overwrite: the other run's checkpoints and metrics go
        shutil.rmtree(ckpts, ignore_errors=True)
        if os.path.exists(metrics):
            os.remove(metrics)
    return resume, run_id


def check_resume(path, meta, model_config, max_steps):
    """The checkpoint fits this run: the same model, and steps left to train."""
    theirs = meta.get("model_config", {})
    differ = sorted(k for k in set(theirs) | set(model_config) if theirs.get(k) != model_config.get(k))
    if differ:
        said = lambda cfg: ", ".join(f"{k}={cfg.get(k)!r}" for k in differ)  # noqa: E731
        raise RunError(f"{path} holds a model with {said(theirs)}; this run builds {said(model_config)} "
                       f"(from --preset/--img-size/--num-frames/...: {meta['config']['preset']} preset in the "
                       f"checkpoint). Resume with the checkpoint's options, or start a new run in another --out.")
    if meta["step"] >= max_steps:
        raise RunError(f"{path} is at step {meta['step']}, which reaches --max-steps={max_steps} "
                       f"(or --epochs): nothing left to train. Raise it to train longer.")


def summary(cfg, step, start_step, seconds, clips, last_record, ckpt):
    """The lines a finished run ends with."""
    losses = ", ".join(f"{k} {v:.4f}" for k, v in last_record.items() if k not in
                       ("step", "lr", "grad_norm", "skips", "clips_per_s", "skipped_samples", "mfu", "drawn"))
    return [f"finished at step {step} ({step - start_step} steps in {seconds / 60:.1f} min, "
            f"{clips / max(seconds, 1e-9):.1f} clips/s): {losses}",
            f"  metrics     {os.path.join(cfg.out, 'metrics.jsonl')}",
            f"  checkpoint  {ckpt}",
            f"  export      python -m ivmini.checkpoint export {cfg.out} {cfg.out.rstrip('/')}.pt"]
