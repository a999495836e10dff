"""Everything distributed: the process group, FSDP2 wrapping, cross-rank agreement, faults and stops,
checkpoints.

The model code never imports torch.distributed; this file wraps finished models (torchtitan order:
activation checkpointing and torch.compile per Block, then `fully_shard` each Block, then the root) and
owns the checkpoint format:

    OUT/checkpoints/step_00000100/      a complete checkpoint (COMPLETE marker inside)
        .metadata, __*.distcp          DCP shards of {"model", "optim"} (the trained module and optimizer)
        rank_<r>.pt                    per-rank state: RNG states (python, numpy, torch)
        meta.json                      step, epoch, data position, skip count, world size, config
        COMPLETE                       written last; a directory without it is ignored
Writing happens in step_XXXXXXXX.tmp, which is renamed after every rank has finished, so a crash
mid-save leaves the previous checkpoint as the latest. The last `keep` checkpoints are kept.

Single process: `python train.py` works too: init() then makes a 1-rank gloo group, so the same
FSDP2 code path runs everywhere.
"""
import contextlib
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import socket
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._composable import checkpoint as activation_checkpoint
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from .layers import Block

log = logging.getLogger("ivmini.dist")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init():
    """Join (or create) the process group -> (rank, world_size, device). torchrun sets RANK etc.;
    a plain `python` run becomes a 1-rank group on localhost."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), device


def shutdown():
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def rank_zero_first():
    """Rank 0 runs the block first (e.g. generates or downloads data), then the other ranks."""
    if dist.get_rank() != 0:
        dist.barrier()
    yield
    if dist.get_rank() == 0:
        dist.barrier()


def mixed_precision(device):
    """bf16 compute with fp32 gradient reduction on GPU; plain fp32 on CPU."""
    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def parallelize(model, frozen, device, *, act_ckpt=False, compile=False):
    """Wrap the trained `model` and the `frozen` modules for training on every rank, finding the
    transformer blocks by type (layers.Block) in whatever towers they sit. Trained blocks: activation
    checkpointing (recomputed in the backward) if asked, torch.compile if asked. Then FSDP2 on every
    module: each Block is its own unit (gathered just in time, freed after), then the root (embeddings,
    heads). Frozen teachers are sharded too: a 6B teacher does not fit replicated."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for m in (model, *frozen):
        blocks = [b for b in m.modules() if isinstance(b, Block)]
        for b in blocks:
            if m is model and act_ckpt:
                activation_checkpoint(b)
            if m is model and compile:
                b.compile()
            fully_shard(b, mesh=mesh, mp_policy=mixed_precision(device))
        fully_shard(m, mesh=mesh, mp_policy=mixed_precision(device))
    return model


def agree(*flags):
    """Max of each flag over all ranks (e.g. 'my loss is not finite', 'I was asked to stop')."""
    t = torch.tensor([float(f) for f in flags], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.cpu().tolist()]


def clip_grad_norm(model, max_norm):
    """Clip the global gradient norm (over all shards and ranks) -> the norm before clipping, a float."""
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


class Guard:
    """Faults and stops, agreed by every rank so that no collective is left waiting.

    - SIGTERM / SIGINT (Ctrl-C) set a flag; `stopping()` is true on every rank once any rank got one, and
      the loop then checkpoints and calls `exit()` (exit code 143 / 130).
    - A non-finite loss on any rank makes `finite()` false on every rank (everyone skips the backward),
      a non-finite global gradient norm likewise; `take_step()` then counts the skip, logs it with the
      step, rank, lr, grad norm and sample ids, and aborts with exit code 3 and no new checkpoint once
      more than `max_skips` steps were skipped.
    - Fault injection for tests, read here only: IVMINI_INJECT_NAN="STEP[:RANK]" makes RANK's (default 0)
      loss count as non-finite at optimizer step STEP.
    """

    def __init__(self, max_skips, skips=0):
        self.max_skips, self.skips, self.signal = max_skips, skips, 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        step, _, rank = os.environ.get("IVMINI_INJECT_NAN", "").partition(":")
        self.inject_nan = (int(step), int(rank or 0)) if step else None

    def _on_signal(self, signum, frame):
        self.signal = signum

    def finite(self, loss, step):
        bad = not torch.isfinite(loss).item() or self.inject_nan == (step, dist.get_rank())
        return not agree(bad)[0]

    def take_step(self, finite, grad_norm, step, lr, samples):
        """Whether to apply the optimizer step (the loss and the global gradient norm are finite)."""
        if finite and math.isfinite(grad_norm):
            return True
        self.skips += 1
        log.warning("non-finite loss or gradient at step %d (rank %d, lr %.3g, grad norm %s, samples %s); "
                    "skipped (%d of at most %d)", step, dist.get_rank(), lr, grad_norm, samples[:8], self.skips,
                    self.max_skips)
        if self.skips > self.max_skips:
            log.error("more than --max-skips=%d non-finite steps: aborting without a checkpoint", self.max_skips)
            sys.exit(3)
        return False

    def stopping(self):
        return agree(self.signal != 0)[0]

    def exit(self, step):
        log.warning("stopping on a signal after step %d", step)
        shutdown()
        sys.exit(130 if self.signal == signal.SIGINT else 143)


def all_reduce_mean(values):
    """Mean over ranks of a dict of python floats (for logging)."""
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        t = t / dist.get_world_size()
    return dict(zip(keys, t.cpu().tolist()))


class AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends each rank the gradient of its own slice (summed over ranks),
    for contrastive losses over the global batch (stage 2)."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n:(dist.get_rank() + 1) * n]


def all_gather_with_grad(x):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    return AllGatherWithGrad.apply(x)


# ---------------------------------------------------------------------------------------------
# checkpoints

def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def _step_dirs(root):
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = re.fullmatch(r"step_(\d+)", name)
        if m and os.path.isfile(os.path.join(root, name, "COMPLETE")):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def latest_checkpoint(root):
    """The newest complete checkpoint directory under root (or root itself if it is one), or None."""
    if os.path.isfile(os.path.join(root, "COMPLETE")):
        return root
    found = _step_dirs(root)
    return found[-1][1] if found else None


def save_checkpoint(root, step, model, optimizer, meta, keep=2):
    """Sharded save of model + optimizer, per-rank RNG, and meta (rank 0); atomic (see module doc)."""
    final = os.path.join(root, f"step_{step:08d}")
    tmp = final + ".tmp"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    torch.save(rng_state(), os.path.join(tmp, f"rank_{rank}.pt"))
    dist.barrier()
    if rank == 0:
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(dict(meta, step=step, world_size=dist.get_world_size()), f, indent=1)
        with open(os.path.join(tmp, "COMPLETE"), "w") as f:
            f.write(f"step {step}\n")
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in _step_dirs(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path, model, optimizer):
    """Restore model + optimizer (any world size) and this rank's RNG (same world size); -> meta dict."""
    if not os.path.isfile(os.path.join(path, "COMPLETE")):
        raise FileNotFoundError(f"{path} is not a complete ivmini checkpoint (no COMPLETE marker)")
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rank_file = os.path.join(path, f"rank_{dist.get_rank()}.pt")
    if meta["world_size"] == dist.get_world_size() and os.path.isfile(rank_file):
        set_rng_state(torch.load(rank_file, weights_only=False))   # our own file: python/numpy RNG tuples
    return meta


def consolidate(path):
    """Read a DCP checkpoint directory without a process group -> the full model state dict."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    out = os.path.join(path, "_consolidated.tmp.pt")
    try:
        dcp_to_torch_save(path, out)
        state = torch.load(out, map_location="cpu", weights_only=False)
    finally:
        if os.path.exists(out):
            os.remove(out)
    return state["model"]


__all__ = ["init", "shutdown", "rank_zero_first", "mixed_precision", "parallelize", "agree", "clip_grad_norm",
           "Guard", "all_reduce_mean", "all_gather_with_grad", "save_checkpoint", "load_checkpoint",
           "latest_checkpoint", "consolidate"]
