"""Which samples each rank loads, in which batches, and the DataLoader that loads them.

ShardedSampler gives each rank its slice of a per-epoch permutation and can start mid-epoch, so a resumed run
sees exactly the samples it would have seen; MediaBatchSampler does the same for stage 2's mixed image/video
data in batches of one media type each (the official MetaLoader). make_loader wraps either in a DataLoader
with the dataset's collate and workers that leave signals to the main process.
"""
import logging
import signal

import numpy as np
import torch

from .datasets import collate
from .transforms import make_rng

log = logging.getLogger("ivmini.data")


class ShardedSampler(torch.utils.data.Sampler):
    """Indices for one rank: a permutation of range(n) drawn from (seed, epoch) (or the identity
    without shuffle), padded by wrapping to a multiple of world_size, rank r taking every world-th
    index from r; `start` skips the first `start` indices of this rank (resuming mid-epoch)."""

    def __init__(self, n, rank=0, world_size=1, shuffle=True, seed=0):
        self.n, self.rank, self.world, self.shuffle, self.seed = n, rank, world_size, shuffle, seed
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def indices(self):
        order = make_rng(self.seed, self.epoch).permutation(self.n) if self.shuffle else np.arange(self.n)
        per_rank = -(-self.n // self.world)
        order = np.resize(order, per_rank * self.world)          # wrap around to an equal share
        return order[self.rank::self.world].tolist()

    def __iter__(self):
        return iter(self.indices()[self.start:])

    def __len__(self):
        return -(-self.n // self.world) - self.start


class MediaBatchSampler(torch.utils.data.Sampler):
    """Batches of dataset indices for one rank, each batch of a single media type (the official stage-2
    MetaLoader: one loader per media type, one media type per optimizer step). A DataLoader batch_sampler:

        sampler = MediaBatchSampler([r.media for r in dataset.records], batch_size, rank, world, seed=seed)
        sampler.set_epoch(epoch, start=batches_already_consumed_this_epoch)
        loader = make_loader(dataset, batch_sampler=sampler, num_workers=workers)

    Per epoch, for each media type (sorted by name): a permutation of its indices drawn from (seed, epoch),
    cut into global batches of world_size x batch_size with the remainder dropped; rank r takes the r-th
    slice of each, so ranks never overlap and all get the same number of batches of each type. The order
    of the types over the epoch is a shuffle drawn from the same (seed, epoch) stream. The official code
    draws this order on rank 0 and broadcasts it; here every rank computes the identical order from the
    seed, which gives the same result without a collective (and without a process group in tests).

    accum: batches per optimizer step. The order is shuffled in groups of `accum` batches of one type
    and each type's batch count is cut to a multiple of accum, so the micro-batches of a step share a type.
    set_epoch(epoch, start): start = batches of that epoch already consumed (resume mid-epoch).
    num_batches: batches per epoch (the same every epoch); len(): the batches left from `start` on, the
    whole epoch when start=0 (as ShardedSampler).
    """

    def __init__(self, media, batch_size, rank=0, world_size=1, seed=0, accum=1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size < 1 or accum < 1:
            raise ValueError(f"batch_size ({batch_size}) and accum ({accum}) must be positive")
        self.batch_size, self.rank, self.world, self.seed, self.accum = batch_size, rank, world_size, seed, accum
        self.types = sorted(set(media))
        self.members = {t: np.array([i for i, m in enumerate(media) if m == t]) for t in self.types}
        per_step = batch_size * world_size * accum          # samples of one type one optimizer step takes
        self.counts = {t: len(self.members[t]) // per_step * accum for t in self.types}   # batches per rank
        self.num_batches = sum(self.counts.values())
        if self.num_batches == 0:
            sizes = ", ".join(f"{len(self.members[t])} {t}" for t in self.types) or "no samples"
            raise ValueError(f"{sizes} over {world_size} ranks cannot fill one step of {accum} x {batch_size} "
                             f"samples of one media type per rank")
        for t in self.types:
            if self.counts[t] == 0:
                log.warning("the %d %s samples cannot fill one step of %d x %d per rank over %d ranks: "
                            "none are used", len(self.members[t]), t, accum, batch_size, world_size)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        if not 0 <= start <= self.num_batches:
            raise ValueError(f"start {start} is outside the epoch's {self.num_batches} batches")
        self.epoch, self.start = epoch, start

    def batches(self):
        """This rank's batches of the epoch -> list of lists of dataset indices."""
        rng = make_rng(self.seed, self.epoch)
        per_type = {}
        for t in self.types:                                # the same draws, in the same order, on every rank
            n = self.counts[t]
            order = self.members[t][rng.permutation(len(self.members[t]))]
            per_type[t] = iter(order[:n * self.world * self.batch_size]          # (n, world, batch) -> (n, batch)
                               .reshape(n, self.world, self.batch_size)[:, self.rank].tolist())
        groups = [t for t in self.types for _ in range(self.counts[t] // self.accum)]
        return [next(per_type[groups[g]]) for g in rng.permutation(len(groups)) for _ in range(self.accum)]

    def __iter__(self):
        return iter(self.batches()[self.start:])

    def __len__(self):
        return self.num_batches - self.start


def worker_init_fn(worker_id):
    """Seed python/numpy in each worker from the loader's base seed (for any library randomness;
    ivmini's own sampling uses per-sample seeds and does not need it). Workers ignore SIGINT and
    SIGTERM: a signal sent to the whole process group (Ctrl-C, a scheduler) is handled by the main
    process (dist.Guard), which still needs its workers for the last step; they exit with it."""
    import random
    seed = torch.initial_seed() % 2 ** 32
    random.seed(seed)
    np.random.seed(seed)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def make_loader(dataset, batch_size=None, sampler=None, num_workers=0, pin_memory=None, drop_last=True, *,
                batch_sampler=None, seed=0):
    """A DataLoader over `dataset` with collate: either batch_size + sampler (ShardedSampler) or
    batch_sampler (MediaBatchSampler, which yields whole batches), not both. The loader draws its workers'
    base seed from its own generator seeded with `seed`, not from torch's global one: starting a loader
    then leaves the global RNG (stage 2's MLM masking and VTM negatives) alone, so a resumed run, whose
    loader starts at another point, draws what the uninterrupted run draws."""
    given = (batch_size is not None, sampler is not None, batch_sampler is not None)
    if given not in ((True, True, False), (False, False, True)):
        raise ValueError("make_loader takes either batch_size and sampler, or batch_sampler")
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    batching = dict(batch_sampler=batch_sampler) if batch_sampler is not None else \
        dict(batch_size=batch_size, sampler=sampler, drop_last=drop_last)
    return torch.utils.data.DataLoader(dataset, num_workers=num_workers, collate_fn=collate, pin_memory=pin,
                                       worker_init_fn=worker_init_fn, persistent_workers=False,
                                       generator=torch.Generator().manual_seed(seed), **batching)
