"""What the stages share: where the data is, per-sample seeds, full batches of a sharded order, and the
optimizer's parameter groups (the weight-decay rules; a stage may add a learning-rate scale per group)."""
import os

import numpy as np

from ..data import synthetic
from ..data.sampling import ShardedSampler


def sample_seed(seed, epoch, index):
    """A per-sample seed that does not depend on the rank, the worker or the batch composition."""
    return int(np.random.SeedSequence([seed, epoch, int(index), 1]).generate_state(1)[0])


def data_paths(cfg, world_file):
    """(annotation file, root of its paths): cfg.data, or the synthetic world's annotations/`world_file`."""
    if cfg.data:
        return cfg.data, cfg.data_root or os.path.dirname(os.path.abspath(cfg.data))
    world = synthetic.ensure_world()
    return os.path.join(world, "annotations", world_file), world


class Batches:
    """Full batches (lists of dataset indices) of this rank's slice of a per-epoch permutation (ShardedSampler).
    set_epoch(epoch, start) starts after `start` batches: a resumed run sees the batches it would have seen."""

    def __init__(self, n, batch_size, rank=0, world_size=1, seed=0):
        self.batch_size = batch_size
        self.sampler = ShardedSampler(n, rank, world_size, seed=seed)

    def set_epoch(self, epoch, start=0):
        self.sampler.set_epoch(epoch, start=start * self.batch_size)

    def __len__(self):
        per_rank = -(-self.sampler.n // self.sampler.world)   # a whole epoch, whatever `start` is
        return per_rank // self.batch_size                    # the last partial batch dropped

    def __iter__(self):
        indices = list(self.sampler)
        for i in range(0, len(indices) - self.batch_size + 1, self.batch_size):
            yield indices[i:i + self.batch_size]


def param_groups(model, weight_decay, lr_scale=None):
    """Trained parameters (requires_grad) in AdamW groups: with weight decay, and without it for 1-D params,
    biases and the names each submodule declares in its `no_weight_decay()`. lr_scale: name -> factor on the
    learning rate (e.g. layer-wise decay), splitting the groups further; each group then carries "lr_scale".
    Without it: exactly [decay group, no-decay group]."""
    skip = set()
    for prefix, m in model.named_modules():
        declared = getattr(m, "no_weight_decay", None)   # a module's declaration, not a feature probe
        if callable(declared):
            skip |= {f"{prefix}.{n}" if prefix else n for n in declared()}
    groups = {}                                          # (decays, lr scale) -> group, in first-seen order
    if lr_scale is None:
        groups = {(True, None): {"params": [], "weight_decay": weight_decay},
                  (False, None): {"params": [], "weight_decay": 0.0}}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decays = not (p.ndim <= 1 or name.endswith(".bias") or name in skip)
        scale = None if lr_scale is None else float(lr_scale(name))
        group = groups.setdefault((decays, scale), {"params": [], "weight_decay": weight_decay if decays else 0.0,
                                                    "lr_scale": scale})
        group["params"].append(p)
    return list(groups.values())


def one_phase(cfg):
    """The stage hook train.py calls for the runs of one command: a single run (stage 3 has one per phase)."""
    return [cfg]


def optimizer_groups(model, cfg):
    """The stage hook train.py calls for the AdamW groups: the weight-decay rules, one learning rate."""
    return param_groups(model, cfg.weight_decay)
