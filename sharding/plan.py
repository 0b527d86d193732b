"""Epoch planning: which shards every (rank, DataLoader worker) reads in an epoch, and how many batches.

Epoch contract (epoch mode, the default)
----------------------------------------
Each epoch the shard list is permuted with a generator seeded by ``(seed, epoch)`` (when shuffling is on),
identically on every rank. Rank ``r`` takes ``perm[r::world_size]``; its DataLoader worker ``w`` takes every
``num_workers``-th of those. Every shard is read by exactly one worker of one rank per epoch, so coverage is
disjoint. There must be at least ``world_size * num_workers`` shards, else a ``ValueError`` says how to
re-shard or how many workers fit.

Equal batches on every rank: from the per-shard sample counts (manifest, else tar headers; minus samples the
mask store rejected) every rank computes, for every rank, the full batches its workers can fill, and the
number of batches per rank and epoch is the minimum over ranks, ``N``. Every rank delivers exactly ``N``
batches, so data-parallel ranks never wait for each other at the end of an epoch. **The remainder** (the
partial last batch of each worker, and the excess of ranks that hold more samples) is dropped for this
epoch; because shards and samples are reshuffled every epoch, other samples are dropped next epoch.

Resampled mode (``resampled=True``): workers draw shards at random with replacement forever; ranks overlap
by design; an explicit ``epoch_length`` (batches, or samples without a batch size) sets what a rank
delivers per epoch, split over its workers.

Delivery order and resume: the DataLoader takes batches from its workers round-robin (``delivery_order``),
so the batch order of an epoch is a pure function of the plan. ``resume_layout`` says, for a run that
starts at batch ``b``, which worker delivers it and how many batches each worker has already delivered.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


def seeded_rng(*parts) -> random.Random:
    """A generator seeded by the parts (``"/".join``): the same on every rank, process and platform."""
    return random.Random("/".join(str(p) for p in parts))


@dataclass(frozen=True)
class EpochPlan:
    """What every rank and worker reads in one epoch. ``shards[r][w]``: shard indices of worker ``w`` of rank
    ``r`` (None in resampled mode: all shards); ``quotas[r][w]``: batches it delivers; ``batches``: per rank
    (equal on all ranks; None = unbounded)."""

    batches: int | None
    shards: tuple | None
    quotas: tuple


def _too_few_shards_message(name: str, n_shards: int, world_size: int, workers: int, total: int | None) -> str:
    need = world_size * workers
    hint = f" --samples-per-shard {max(1, total // need)}" if total else " --samples-per-shard N (smaller)"
    return (f"{name} has {n_shards} shard(s), but {world_size} rank(s) x {workers} DataLoader worker(s) = {need} "
            f"readers each need at least one shard in epoch mode. Re-shard with `python -m sharding.build ... "
            f"--overwrite{hint}` to get >= {need} shards, or use fewer workers (num_workers <= "
            f"{max(0, n_shards // world_size)}), or read with resampled=True.")


def plan_epoch(counts: list[int | None], *, world_size: int, num_workers: int, batch_size: int, epoch: int,
               seed: int, shuffle_shards: bool = True, drop_last: bool = True, resampled: bool = False,
               epoch_length: int | None = None, name: str = "stream") -> EpochPlan:
    """Assign shards to (rank, worker) for ``epoch`` and compute the equal per-rank batch count (module
    docstring). ``counts``: samples per shard; ``num_workers``: DataLoader workers (1 for none)."""
    W = max(1, int(num_workers))
    if resampled:
        if not counts:
            raise ValueError(f"{name} has no shards")
        if epoch_length is None:
            return EpochPlan(None, None, tuple((None,) * W for _ in range(world_size)))
        q = tuple(epoch_length // W + (1 if w < epoch_length % W else 0) for w in range(W))
        return EpochPlan(int(epoch_length), None, tuple(q for _ in range(world_size)))
    if any(c is None for c in counts):
        raise ValueError(f"{name}: sample counts of some shards are unknown (remote shards without a manifest); "
                         f"pass the manifest, or use resampled=True with an epoch length")
    total = sum(counts)
    if len(counts) < world_size * W:
        raise ValueError(_too_few_shards_message(name, len(counts), world_size, W, total))
    if not drop_last and world_size > 1:
        raise ValueError("drop_last=False keeps partial batches and is only possible with world_size=1 "
                         "(ranks must deliver equal batch counts)")
    order = list(range(len(counts)))
    if shuffle_shards:
        seeded_rng("shards", seed, epoch).shuffle(order)
    shards = tuple(tuple(tuple(order[r::world_size][w::W]) for w in range(W)) for r in range(world_size))
    caps = []
    for r in range(world_size):
        n = [sum(counts[i] for i in shards[r][w]) for w in range(W)]
        caps.append([(k // batch_size) if drop_last else math.ceil(k / batch_size) for k in n])
    N = min(sum(c) for c in caps)
    if N == 0:
        raise ValueError(f"{name}: not enough samples for one batch of {batch_size} per rank in epoch {epoch} "
                         f"(full batches per worker of each rank: {caps}); use a smaller batch size, fewer "
                         f"workers or ranks, or more data")
    quotas = []
    for c in caps:
        q = list(c)
        for _ in range(sum(q) - N):  # trim the largest quotas first (ties: the last worker)
            i = max(range(W), key=lambda w: (q[w], w))
            q[i] -= 1
        quotas.append(tuple(q))
    return EpochPlan(N, shards, tuple(quotas))


def delivery_order(quotas) -> list[tuple[int, int]]:
    """(worker, its batch index) in the order a DataLoader yields them: round-robin over workers, skipping
    workers that are done (what torch does for an IterableDataset with in-order delivery)."""
    out = []
    for r in range(max(quotas, default=0)):
        out.extend((w, r) for w, q in enumerate(quotas) if r < q)
    return out


def resume_layout(quotas, start: int):
    """For a run starting at batch ``start``: (logical worker that delivers it, batches each logical worker
    already delivered, batches each still delivers). Physical worker ``p`` plays logical worker
    ``(p + first) % W``, so that round-robin from physical worker 0 continues the original order."""
    order = delivery_order(quotas)
    if start >= len(order):
        return 0, list(quotas), [0] * len(quotas)
    first = order[start][0]
    skips = [0] * len(quotas)
    for w, _ in order[:start]:
        skips[w] += 1
    return first, skips, [q - s for q, s in zip(quotas, skips)]
