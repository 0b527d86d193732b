"""Streaming reader for the shards of ``sharding.build``: decoded panoramas, split by rank and DataLoader
worker, with equal batch counts on every rank, half labeled / half unlabeled batches and exact resume.

Public API (``from sharding.stream import ...``; the pieces live in modules of one concern each)
-----------------------------------------------------------------------------------------------
* ``panoramas(urls, ...)`` -- an ``IterableDataset`` of decoded samples (or of batches with ``batch_size``).
* ``mixed_batches(labeled_urls, unlabeled_urls, batch_size=...)`` -- an ``IterableDataset`` of mixed batches
  ``{"labeled": {...}, "unlabeled": {...}}`` (``batch_size // 2`` samples each).
* ``make_loader(urls, batch_size=..., unlabeled_urls=None, num_workers=2, ...)`` -- a ``PanoLoader``
  (``sharding.loader``): a ``DataLoader`` (``batch_size=None``, batches are built inside the workers) plus
  epoch and position bookkeeping, ``skipped()``, ``state_dict()`` / ``load_state_dict()``.
* ``read_samples(urls, height=None)`` -- a plain sequential iterator over every sample (offline tools).
* ``iter_shard`` (``sharding.shard_reader``): the raw samples of one shard; ``plan_epoch`` / ``EpochPlan``
  (``sharding.plan``): who reads which shard in an epoch.

Where the contracts are written down: shard reading, damage and hash verification in
``sharding.shard_reader`` and ``sharding.verify``; shard addresses (``pipe:`` refused unless
``allow_pipe=True``) in ``sharding.addresses``; epochs, ranks, equal batch counts and the dropped remainder
in ``sharding.plan``; what a worker reads, shuffles, checks and decodes in ``sharding.worker_stream``; the
tensors in ``sharding.collate``; order, resume and skip counting in ``sharding.loader``.

Samples are ``{"key", "rgb": float32 (3, H, 2H) in [0, 1], "depth": float32 (1, H, 2H) metres (labeled only),
"valid": bool (1, H, 2H), "meta": dict}`` (``docs/CONTRACTS.md``). RGB is resized with area interpolation
when shrinking by 1.25x or more, else bilinear; depth and masks with nearest neighbour. ``valid`` is the
shard mask AND the mask store's mask (nearest-resized) AND depth > 0.

Mixed batches: the epoch is defined by the labeled stream (epoch mode, in units of ``batch_size // 2``
labeled samples). The unlabeled half comes from the unlabeled shards in resampled mode, seeded by ``(seed,
epoch, rank, worker)``, so any number (>= 1) of unlabeled shards works and every epoch sees a fresh draw.

OpenCV and fork: ``PanoLoader`` forks its workers inside ``sharding.format.cv2_fork_guard()``; wrap your own
``DataLoader`` iteration over ``panoramas`` / ``mixed_batches`` the same way (``with cv2_fork_guard(): it =
iter(loader)``) if the main process uses OpenCV. Workers run OpenCV single-threaded.

Skipped samples: a sample that cannot be used is skipped, logged with its key and reason, and counted by
reason when a worker meets it (reasons in ``sharding.format.REASONS``; ``rejected_by_mask_store`` for
mask-store rejections, ``truncated_shard`` once per damaged shard read, ``corrupt_shard`` once per shard
whose sha256 differs from its manifest). A rejected sample that falls in a worker's dropped remainder is
never met, so never counted.
"""

from __future__ import annotations

import itertools
import os
from typing import Iterator

import cv2
from torch.utils.data import IterableDataset, get_worker_info

from . import verify as _verify
from .collate import collate, to_tensors
from .format import SampleError, check_raw, cv2_fork_guard, decode_sample
from .loader import PanoLoader
from .manifest import resolve_shards
from .plan import EpochPlan, delivery_order, plan_epoch, resume_layout
from .shard_reader import iter_shard
from .worker_stream import SkipCounter, StreamSpec, WorkerStream, effective_counts, open_store

__all__ = ["panoramas", "mixed_batches", "make_loader", "read_samples", "PanoLoader", "PanoramaStream",
           "plan_epoch", "EpochPlan", "iter_shard", "cv2_fork_guard", "collate", "to_tensors", "delivery_order",
           "resume_layout", "StreamSpec"]


class PanoramaStream(IterableDataset):
    """One epoch of samples or batches from one or more streams (the first defines the epoch; the others
    must be resampled). Built by ``panoramas`` / ``mixed_batches`` / ``make_loader`` (module docstring)."""

    def __init__(self, streams: list[StreamSpec], sizes: list[int] | None, *, rank: int = 0, world_size: int = 1,
                 num_workers: int | None = None, seed: int = 0, epoch: int = 0, start: int = 0,
                 offsets: dict | None = None, epoch_length: int | None = None, drop_last: bool = True,
                 stats: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        for s in streams[1:]:
            if not s.resampled:
                raise ValueError(f"{s.name}: secondary streams must be resampled")
        self.streams, self.sizes = list(streams), sizes
        self.rank, self.world_size, self.num_workers = int(rank), int(world_size), num_workers
        self.seed, self.epoch, self.start, self.offsets = int(seed), int(epoch), int(start), offsets
        self.epoch_length, self.drop_last, self.stats = epoch_length, drop_last, stats
        if num_workers is not None:
            self.plan(max(1, num_workers))  # fail early (too few shards, too little data)

    def set_epoch(self, epoch: int, start: int = 0, offsets: dict | None = None) -> None:
        self.epoch, self.start, self.offsets = int(epoch), int(start), offsets

    def plan(self, workers: int, epoch: int | None = None) -> EpochPlan:
        lead = self.streams[0]
        return plan_epoch(list(lead.counts), world_size=self.world_size, num_workers=workers,
                          batch_size=self.sizes[0] if self.sizes else 1, epoch=self.epoch if epoch is None else epoch,
                          seed=self.seed, shuffle_shards=lead.shuffle_shards, drop_last=self.drop_last,
                          resampled=lead.resampled, epoch_length=self.epoch_length, name=lead.name)

    def __len__(self) -> int:
        n = self.plan(max(1, self.num_workers or 1)).batches
        if n is None:
            raise TypeError("an unbounded resampled stream has no length; pass epoch_length")
        return n

    def __iter__(self):
        info = get_worker_info()
        p, W = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.num_workers is not None and max(1, self.num_workers) != W:
            raise RuntimeError(f"dataset planned for num_workers={self.num_workers} but runs with {W} workers")
        if info is not None:
            cv2.setNumThreads(1)
        plan = self.plan(W)
        quotas = plan.quotas[self.rank]
        if plan.batches is None:  # unbounded
            first, done, todo = 0, [0] * W, [None] * W
        else:
            first, done, todo = resume_layout(quotas, self.start)
        w = (p + first) % W
        if todo[w] == 0:
            return
        skips = SkipCounter()
        readers = []
        for i, spec in enumerate(self.streams):
            ids = None if spec.resampled else plan.shards[self.rank][w]
            seed_parts = (spec.name, i, self.seed, self.epoch, self.rank, w)
            readers.append(WorkerStream(spec, ids, seed_parts, skips, open_store(spec.mask_store),
                                        cycle=self.drop_last))
        sizes = self.sizes or [1]
        for i, r in enumerate(readers):
            off = None
            if self.offsets is not None:  # a worker missing here has not delivered since the last resume
                off = self.offsets.get(w, self.offsets.get(str(w)))
            if off is not None:
                r.skip_raw(int(off[i]))
            else:
                r.skip_valid(done[w] * sizes[i])
        for _ in (range(todo[w]) if todo[w] is not None else itertools.count()):
            parts = [r.take(n) for r, n in zip(readers, sizes)]
            if any(len(x) == 0 for x in parts) or (self.drop_last and any(len(x) < n for x, n in zip(parts, sizes))):
                break  # exhausted (drop_last=False)
            if self.sizes is None:
                item = to_tensors(parts[0][0])
            elif len(readers) == 1:
                item = collate(parts[0])
            else:
                item = {"labeled": collate(parts[0]), "unlabeled": collate(parts[1])}
            if self.stats:
                item["_stats"] = {"worker": w, "raw": [r.consumed for r in readers], "skipped": dict(skips.counts),
                                  "verified": _verify.take_new()}
            yield item
        if self.stats:  # skips met after the last batch (e.g. a truncated shard at the end) reach the loader too;
            # this item comes after all of this worker's batches, so the batch order does not change
            yield {"_stats": {"worker": w, "raw": None, "skipped": dict(skips.counts),
                              "verified": _verify.take_new()}, "_final": True}


def _spec(name, urls, split, *, height, labeled, shuffle, shuffle_shards, resampled, mask_store, verify,
          allow_pipe) -> StreamSpec:
    shards = resolve_shards(urls, split, allow_pipe=allow_pipe)
    store = open_store(mask_store)
    desc = f"{name} stream ({urls if isinstance(urls, (str, os.PathLike)) else f'{len(shards)} shards'}" + \
           (f", split {split})" if split else ")")
    shuffle_shards = bool(shuffle > 0) if shuffle_shards is None else bool(shuffle_shards)
    return StreamSpec(desc, tuple(shards), effective_counts(shards, store), labeled,
                      None if height is None else int(height), int(shuffle), shuffle_shards, bool(resampled),
                      mask_store, bool(verify), bool(allow_pipe))


def panoramas(urls, *, height: int | None = 256, labeled: bool | None = None, rank: int = 0,
              world_size: int = 1, resampled: bool = False, shuffle: int = 0, seed: int = 0, epoch: int = 0,
              mask_store=None, split: str | None = None, batch_size: int | None = None,
              epoch_length: int | None = None, start: int = 0, num_workers: int | None = None,
              drop_last: bool = True, shuffle_shards: bool | None = None, verify: bool = True,
              allow_pipe: bool = False) -> PanoramaStream:
    """An ``IterableDataset`` of decoded panoramas (``batch_size=None``) or of batches built inside each
    DataLoader worker (use ``DataLoader(ds, batch_size=None, num_workers=...)``).

    ``urls``: tar paths, a glob, a brace pattern, or a ``manifest.json`` (or its folder) with ``split``.
    ``labeled``: None = as stored, True = depth required (others skipped as ``missing_depth``), False = depth
    ignored. ``shuffle``: sample shuffle buffer (0 = off); shards are permuted per epoch when ``shuffle > 0``
    unless ``shuffle_shards`` says otherwise. ``epoch``/``start``: epoch and first batch (or sample) to
    deliver; ``set_epoch(e)`` changes them. ``num_workers``: the DataLoader's, to fail early; otherwise
    taken from the worker info. ``mask_store``: a ``MaskStore`` (or its path). ``verify``: check local
    shards against their manifest sha256 (``sharding.verify``). ``allow_pipe``: accept ``pipe:`` addresses
    (shell commands; ``sharding.addresses``). Epoch, remainder and worker semantics: ``sharding.plan``."""
    spec = _spec("panoramas", urls, split, height=height, labeled=labeled, shuffle=shuffle,
                 shuffle_shards=shuffle_shards, resampled=resampled, mask_store=mask_store, verify=verify,
                 allow_pipe=allow_pipe)
    return PanoramaStream([spec], None if batch_size is None else [int(batch_size)], rank=rank,
                          world_size=world_size, num_workers=num_workers, seed=seed, epoch=epoch, start=start,
                          epoch_length=epoch_length, drop_last=drop_last)


def mixed_batches(labeled_urls, unlabeled_urls, *, batch_size: int, height: int = 256, rank: int = 0,
                  world_size: int = 1, shuffle: int = 64, seed: int = 0, epoch: int = 0, mask_store=None,
                  split: str | None = None, unlabeled_split: str | None = None, start: int = 0,
                  num_workers: int | None = None, stats: bool = False, verify: bool = True,
                  allow_pipe: bool = False) -> PanoramaStream:
    """An ``IterableDataset`` of ``{"labeled": batch, "unlabeled": batch}`` with ``batch_size // 2`` samples
    each; the labeled stream defines the epoch, the unlabeled one is resampled (module docstring)."""
    if batch_size < 2 or batch_size % 2:
        raise ValueError(f"mixed batches need an even batch_size >= 2, got {batch_size}")
    opts = dict(height=height, shuffle=shuffle, shuffle_shards=None, mask_store=mask_store, verify=verify,
                allow_pipe=allow_pipe)
    lab = _spec("labeled", labeled_urls, split, labeled=True, resampled=False, **opts)
    # labeled=None: depth rides along when the unlabeled shards have it (generated scenes), for the oracle
    # teacher and held-out scoring; the labeled loss only ever reads the labeled half
    unl = _spec("unlabeled", unlabeled_urls, unlabeled_split, labeled=None, resampled=True, **opts)
    half = batch_size // 2
    return PanoramaStream([lab, unl], [half, half], rank=rank, world_size=world_size, num_workers=num_workers,
                          seed=seed, epoch=epoch, start=start, stats=stats)


def make_loader(urls, *, batch_size: int, unlabeled_urls=None, num_workers: int = 2, height: int = 256,
                split: str | None = None, unlabeled_split: str | None = None, labeled: bool | None = None,
                rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: int = 64, epoch: int = 0,
                start_batch: int = 0, mask_store=None, resampled: bool = False, epoch_length: int | None = None,
                drop_last: bool = True, pin_memory: bool = False, prefetch_factor: int | None = 2,
                verify: bool = True, allow_pipe: bool = False) -> PanoLoader:
    """A ``PanoLoader`` of batches of ``batch_size`` from ``urls``, or, with ``unlabeled_urls``, of mixed
    batches: ``urls`` give the labeled half and define the epoch, ``unlabeled_urls`` the (resampled) unlabeled
    half. Raises ``ValueError`` up front when there are fewer shards than ``world_size * num_workers``, a
    ``UserError`` for an invalid manifest or a refused address. ``verify``, ``allow_pipe``: as ``panoramas``."""
    if unlabeled_urls is not None:
        if labeled is False:
            raise ValueError("the first stream of mixed batches is the labeled one")
        ds = mixed_batches(urls, unlabeled_urls, batch_size=batch_size, height=height, rank=rank,
                           world_size=world_size, shuffle=shuffle, seed=seed, epoch=epoch, mask_store=mask_store,
                           split=split, unlabeled_split=unlabeled_split, start=start_batch,
                           num_workers=num_workers, stats=True, verify=verify, allow_pipe=allow_pipe)
    else:
        if resampled and epoch_length is None:
            raise ValueError("resampled streams are infinite: pass epoch_length (batches per epoch)")
        ds = panoramas(urls, height=height, labeled=labeled, rank=rank, world_size=world_size, resampled=resampled,
                       shuffle=shuffle, seed=seed, epoch=epoch, mask_store=mask_store, split=split,
                       batch_size=batch_size, epoch_length=epoch_length, start=start_batch,
                       num_workers=num_workers, drop_last=drop_last, verify=verify, allow_pipe=allow_pipe)
        ds.stats = True
    return PanoLoader(ds, num_workers=num_workers, pin_memory=pin_memory, prefetch_factor=prefetch_factor)


# ----------------------------------------------------------------------------- offline reading

def read_samples(urls, height: int | None = None, *, split: str | None = None, labeled: bool | None = None,
                 skipped: dict | None = None, verify: bool = True, allow_pipe: bool = False) -> Iterator[dict]:
    """Every readable sample of ``urls`` in shard order, decoded (``height=None``: stored resolution), in
    one process, no splitting or shuffling: for offline tools (mask computation, teacher precompute).
    Skipped samples are logged and, if ``skipped`` is a dict, counted into it by reason. ``verify``,
    ``allow_pipe``: as ``panoramas``."""
    skips = SkipCounter()

    def count(reason, name, detail=""):
        skips(reason, name, detail)
        if skipped is not None:
            skipped[reason] = skipped.get(reason, 0) + 1

    for shard in resolve_shards(urls, split, count=False, allow_pipe=allow_pipe):
        for raw in iter_shard(shard.url, shard.count, count, sha256=shard.sha256 if verify else None,
                              allow_pipe=allow_pipe):
            try:
                reason = check_raw(raw, labeled)
                if reason is not None:
                    raise SampleError(reason)
                sample = decode_sample(raw, height=height, labeled=labeled)
            except SampleError as exc:
                count(exc.reason, f"{raw['__key__']} in {shard.url}", exc.detail)
                continue
            yield to_tensors(sample)
