"""What the stages share: where the data is, per-sample seeds, and full batches of a sharded order."""
import os

import numpy as np

from ..data import synthetic
from ..data.datasets import ShardedSampler


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
