"""Everything distributed: the process group, FSDP2 wrapping, cross-rank agreement, faults and stops, checkpoints.
The model code never imports torch.distributed; this file wraps finished models (torchtitan order:
activation checkpointing and torch.compile per Block, then `fully_shard` each Block, then the root) and
owns the checkpoint format:

    OUT/checkpoints/step_00000100/      a complete checkpoint (COMPLETE marker inside)
        .metadata, __*.distcp          DCP shards of {"model", "optim"} (the trained module and optimizer)
        rank_<r>.pt                    per-rank RNG states (python, numpy, torch) as tensors and plain values
        meta.json                      run_id, step, epoch, data position, fault and bad-data counts, world
                                       size, the config and the trained module's config
        COMPLETE                       written last; a directory without it is ignored
Writing happens in step_XXXXXXXX.tmp, renamed after every rank has finished, so a crash mid-save leaves the
previous checkpoint as the latest; the last `keep` checkpoints of the same run are kept. Loading never lets
a checkpoint's bytes reach pickle unchecked (see _check_index).

Single process: `python train.py` makes a 1-rank gloo group in init(): the same FSDP2 path runs everywhere.
"""
import contextlib
import ctypes
import io
import json
import logging
import math
import os
import pickle
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
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from .data.datasets import DataError, DecodeFailures
from .layers import Block

log = logging.getLogger("ivmini.dist")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent():
    """Under a launcher (torchrun sets TORCHELASTIC_RUN_ID), ask Linux to SIGKILL this process when the
    launcher dies: after a `kill -9` of torchrun no orphan rank keeps training and writing checkpoints (its
    DataLoader workers notice their parent is gone and exit too). A plain `python train.py` is left alone."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:                                      # the launcher died before the prctl
        os._exit(1)


def init():
    """Join (or create) the process group -> (rank, world_size, device). torchrun sets RANK etc.;
    a plain `python` run becomes a 1-rank group on localhost."""
    die_with_parent()
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


def shutdown(wait=True):
    """Leave the process group; wait=False skips the barrier (a run ending on an error: a gloo group still alive
    at interpreter exit was seen to abort the process with -6 instead of letting it exit with its code)."""
    if dist.is_initialized():
        if wait:
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


def from_rank_zero(fn):
    """fn() runs on rank 0 only; every rank returns its result, or raises the exception it raised."""
    box = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = (True, fn())
        except Exception as e:       # handed to every rank, re-raised there
            box[0] = (False, e)
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


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


def _all_reduce(values, op=dist.ReduceOp.SUM):
    """all_reduce of a list of numbers over ranks (on the GPU under nccl) -> a list of floats."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = t.cuda() if dist.get_backend() == "nccl" else t
        dist.all_reduce(t, op=op)
    return t.cpu().tolist()


def agree(*flags):
    """Max of each flag over all ranks (e.g. 'my loss is not finite', 'I was asked to stop')."""
    return [bool(v) for v in _all_reduce(flags, dist.ReduceOp.MAX)]


def ranks_where(flag):
    """The ranks on which `flag` is true (every rank learns all of them)."""
    onehot = [0.0] * dist.get_world_size()
    onehot[dist.get_rank()] = float(flag)
    return [r for r, v in enumerate(_all_reduce(onehot)) if v]


def clip_grad_norm(model, max_norm):
    """Clip the global gradient norm (over all shards and ranks) -> the norm before clipping, a float."""
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


class Guard:
    """Faults, bad data and stops, agreed by every rank so that no collective is left waiting.

    - SIGTERM / SIGINT (Ctrl-C) set a flag; `end_step()` is true on every rank once any rank got one, and
      the loop then checkpoints and calls `exit()` (exit code 143 / 130). DataLoader workers ignore both
      signals (ivmini.data.datasets.worker_init_fn), so a signal sent to the whole process group (terminals,
      schedulers, `kill -TERM` of torchrun) still finds the workers alive for the last step.
    - A non-finite loss on any rank makes `finite()` false on every rank (everyone skips the backward),
      a non-finite global gradient norm likewise; `take_step()` then counts the skip, logs it (step, the
      ranks it happened on, lr, grad norm, sample ids) and aborts with exit code 3 and no new checkpoint
      once more than `max_skips` steps were skipped.
    - Undecodable samples: `end_step()` sums over ranks the samples drawn and the ones that failed to decode
      (each batch reports its skipped (path, reason) pairs, from whichever DataLoader worker), for the whole
      run, resumes included (ivmini.data.datasets.DecodeFailures keeps the counts and the rule). Rank 0
      logs every failed path once with its reason; once more than `max_fail_fraction` of the samples drawn
      failed (past a grace of a few), every rank stops with exit code 4, naming examples.
    - Fault injection for tests, read here only: IVMINI_INJECT_NAN="STEP[:RANK]" makes RANK's (default 0)
      loss count as non-finite at optimizer step STEP.
    `state()` is what a checkpoint keeps of it (skips, drawn, failed).
    """

    def __init__(self, max_skips, max_fail_fraction=0.01, skips=0, drawn=0, failed=0):
        self.max_skips, self.skips, self.signal = max_skips, skips, 0
        self.data = DecodeFailures(max_fail_fraction, drawn=drawn, failed=failed)
        self.logged = set()                          # failed paths already logged
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        step, _, rank = os.environ.get("IVMINI_INJECT_NAN", "").partition(":")
        self.inject_nan = (int(step), int(rank or 0)) if step else None

    def _on_signal(self, signum, frame):
        self.signal = signum

    def state(self):
        return dict(skips=self.skips, **self.data.state())

    def finite(self, loss, step):
        self.bad_ranks = ranks_where(not torch.isfinite(loss).item() or self.inject_nan == (step, dist.get_rank()))
        return not self.bad_ranks

    def take_step(self, finite, grad_norm, step, lr, samples):
        """Whether to apply the optimizer step (the loss and the global gradient norm are finite)."""
        if finite and math.isfinite(grad_norm):
            return True
        self.skips += 1
        where = f"loss on rank(s) {self.bad_ranks}" if not finite else "gradient"
        log.warning("non-finite %s at step %d (lr %.3g, grad norm %s, samples %s); skipped (%d of at most %d)",
                    where, step, lr, grad_norm, samples[:8], self.skips, self.max_skips)
        if self.skips > self.max_skips:
            log.error("more than --max-skips=%d non-finite steps: aborting without a checkpoint", self.max_skips)
            sys.exit(3)
        return False

    def end_step(self, drawn, skipped):
        """After each step: `drawn` samples tried on this rank, `skipped` their (path, reason) failures.
        -> whether to stop (a signal reached some rank). Exits (code 4) once too much data failed."""
        stop, drawn, failed = _all_reduce([self.signal != 0, drawn, len(skipped)])
        if failed:                                   # every rank's (path, reason) pairs, for the log and examples
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, list(skipped))
            skipped = [tuple(pair) for pairs in gathered for pair in pairs]
            for path, reason in skipped:
                if path not in self.logged:
                    self.logged.add(path)
                    log.warning("skipped %s: %s", path, reason)
        self.data.add(drawn, failed, skipped)
        try:
            self.data.check()
        except DataError as e:
            log.error("%s", e)
            sys.exit(4)
        return bool(stop)

    def exit(self, step):
        log.warning("stopping on a signal after step %d", step)
        shutdown()
        sys.exit(130 if self.signal == signal.SIGINT else 143)


def all_reduce_mean(values):
    """Mean over ranks of a dict of python floats (for logging)."""
    keys = sorted(values)
    return dict(zip(keys, (v / dist.get_world_size() for v in _all_reduce([values[k] for k in keys]))))


class AllGatherWithGrad(torch.autograd.Function):
    """all_gather + cat along dim 0 for contrastive losses over the global batch (stage 2 VTC), with the
    official backward (MM models/utils.py AllGather): each rank keeps only ITS OWN SLICE of the incoming
    gradient, with no all-reduce. Why that is the whole gradient: every rank computes the same loss over
    the same gathered batch, so the gradient that arrives here on rank r, restricted to rank r's rows, is
    already d(loss)/d(rank r's rows); the other ranks' copies of it are identical, and summing them (an
    all-reduce) would scale the contrastive gradient by the world size. The FSDP/DDP mean over ranks
    then gives the parameters d(loss)/d(params) / world_size, as the official DeepSpeed run does."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        ctx.n = x.shape[0]
        return torch.cat(out)                                        # (world * B, ...)

    @staticmethod
    def backward(ctx, grad):
        start = dist.get_rank() * ctx.n
        return grad[start:start + ctx.n]                             # (B, ...) this rank's rows only


def all_gather_with_grad(x):
    """x (B, ...) -> (world * B, ...), rank-major; differentiable as AllGatherWithGrad. Every rank must
    pass the same B. Without a process group (or with one rank) x itself."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    return AllGatherWithGrad.apply(x)


# ---------------------------------------------------------------------------------------------
# checkpoints

def rng_state():
    """This process's RNG states as tensors and plain Python values: loadable with weights_only=True."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(mt), gauss], "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos,
                                                             has_gauss, cached],
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
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


def latest_checkpoint(path):
    """The newest complete checkpoint at `path`: path itself if it is one (a step_* folder), else the newest
    under path (a checkpoints/ folder) or under path/checkpoints (a run folder); None if there is none."""
    if os.path.isfile(os.path.join(path, "COMPLETE")):
        return path
    found = _step_dirs(path) or _step_dirs(os.path.join(path, "checkpoints"))
    return found[-1][1] if found else None


def read_meta(path):
    with open(os.path.join(path, "meta.json")) as f:
        return json.load(f)


def save_checkpoint(root, step, model, optimizer, meta, keep=2):
    """Sharded save of model + optimizer, per-rank RNG, and meta (rank 0); atomic (see module doc). Of the
    older checkpoints, only those of the same run (meta["run_id"]) beyond the newest `keep` are removed."""
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
        ours = [d for _, d in _step_dirs(root) if read_meta(d).get("run_id") == meta["run_id"]]
        for old in ours[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


# Untrusted bytes never reach pickle: DCP keeps its index (.metadata) as a pickle and unpickles non-tensor
# entries (optimizer hyperparameters) with torch.load(weights_only=False). The index is read first with only
# the classes such a file holds, and non-tensor entries with weights_only=True.
_METADATA_MODULES = {"torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                     "torch.distributed.checkpoint.planner", "torch", "torch.serialization", "pathlib", "collections"}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module in _METADATA_MODULES:      # checked before anything is imported
            obj = super().find_class(module, name)
            if (module.startswith("torch.distributed") and isinstance(obj, type)) or isinstance(obj, torch.dtype) \
                    or (module, name) in {("torch", "Size"), ("torch.serialization", "_get_layout"),
                                          ("pathlib", "PosixPath"), ("collections", "OrderedDict")}:
                return obj
        raise pickle.UnpicklingError(f"{module}.{name} is not something a checkpoint index holds")


def _check_index(path):
    """The checkpoint's DCP index, read with only the classes an index holds (-> Metadata)."""
    try:
        with open(os.path.join(path, ".metadata"), "rb") as f:
            return _MetadataUnpickler(io.BytesIO(f.read())).load()
    except (pickle.UnpicklingError, EOFError, OSError, AttributeError, ValueError) as e:
        raise ValueError(f"{path}/.metadata is not a plain checkpoint index ({e}); refusing to load it") from e


class _WeightsOnlyBytes:
    """Mixin for DCP load planners: a non-tensor entry must load with torch.load(weights_only=True) (tensors
    and plain Python values) before DCP's own torch.load sees it."""

    def load_bytes(self, read_item, value):
        data = value.read()
        try:
            torch.load(io.BytesIO(data), weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(f"checkpoint entry {read_item.dest_index.fqn} holds more than tensors and plain "
                             f"values ({e}); refusing to load it") from e
        super().load_bytes(read_item, io.BytesIO(data))


class _SafeLoadPlanner(_WeightsOnlyBytes, DefaultLoadPlanner):
    pass


class _SafeEmptyLoadPlanner(_WeightsOnlyBytes, _EmptyStateDictLoadPlanner):
    pass


def load_checkpoint(path, model, optimizer):
    """Restore model + optimizer (any world size) and this rank's RNG (same world size); -> meta dict."""
    if not os.path.isfile(os.path.join(path, "COMPLETE")):
        raise FileNotFoundError(f"{path} is not a complete ivmini checkpoint (no COMPLETE marker)")
    meta = read_meta(path)
    saved = _check_index(path).state_dict_metadata.keys()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    # get_state_dict gives every trained parameter an optimizer state (a zero-gradient step); the checkpoint has
    # states only for parameters that had a gradient by then (e.g. not the image position table before the first
    # image batch). Those stay without state, as in the run that wrote the checkpoint: resume stays exact.
    optim_sd["state"] = {fqn: s for fqn, s in optim_sd["state"].items()
                         if any(f"optim.state.{fqn}.{name}" in saved for name in s)}
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path, planner=_SafeLoadPlanner())
    # strict=False only lets those parameters stay without state; dcp.load above already required every key
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=False))
    rank_file = os.path.join(path, f"rank_{dist.get_rank()}.pt")
    if meta["world_size"] == dist.get_world_size() and os.path.isfile(rank_file):
        try:
            set_rng_state(torch.load(rank_file, weights_only=True))
        except pickle.UnpicklingError as e:
            raise ValueError(f"{rank_file} holds more than RNG states ({e}); refusing to load it") from e
    return meta


def consolidate(path):
    """Read a DCP checkpoint directory without a process group -> the full model state dict (CPU tensors)."""
    _check_index(path)
    state = {}   # filled by the planner, as torch's own dcp_to_torch_save does
    _load_state_dict(state, storage_reader=dcp.FileSystemReader(path), planner=_SafeEmptyLoadPlanner(), no_dist=True)
    return state["model"]


__all__ = ["init", "shutdown", "rank_zero_first", "mixed_precision", "parallelize", "agree", "ranks_where",
           "clip_grad_norm", "Guard", "all_reduce_mean", "all_gather_with_grad", "save_checkpoint", "load_checkpoint",
           "latest_checkpoint", "read_meta", "consolidate"]
