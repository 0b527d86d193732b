"""Streaming reader for the shards of ``sharding.build``: decoded panoramas, split by rank and DataLoader
worker, with equal batch counts on every rank, half labeled / half unlabeled batches and exact resume.

Public API
----------
* ``panoramas(urls, ...)`` -- an ``IterableDataset`` of decoded samples (or of batches with ``batch_size``).
* ``mixed_batches(labeled_urls, unlabeled_urls, batch_size=...)`` -- an ``IterableDataset`` of mixed batches
  ``{"labeled": {...}, "unlabeled": {...}}`` (``batch_size // 2`` samples each).
* ``make_loader(urls, batch_size=..., unlabeled_urls=None, num_workers=2, ...)`` -- a ``PanoLoader``: a
  ``torch.utils.data.DataLoader`` (``batch_size=None``, batches are built inside the workers) plus epoch
  and position bookkeeping, ``skipped()``, ``state_dict()`` / ``load_state_dict()``.
* ``read_samples(urls, height=None)`` -- a plain sequential iterator over every sample (offline tools).

Samples are ``{"key", "rgb": float32 (3, H, 2H) in [0, 1], "depth": float32 (1, H, 2H) metres (labeled only),
"valid": bool (1, H, 2H), "meta": dict}`` (``docs/CONTRACTS.md``); batches stack them (``key`` and ``meta``
become lists) and add ``labeled``: bool (B,) when any sample has depth. RGB is resized with area interpolation
when shrinking by 1.25x or more, else bilinear; depth and masks with nearest neighbour. ``valid`` is the shard
mask AND the mask store's mask (nearest-resized) AND depth > 0.

Shards, ranks and workers (epoch mode, the default)
----------------------------------------------------
Each epoch the shard list is permuted with a generator seeded by ``(seed, epoch)`` (when shuffling is on),
identically on every rank. Rank ``r`` takes ``perm[r::world_size]``; its DataLoader worker ``w`` takes every
``num_workers``-th of those. Every shard is read by exactly one worker of one rank per epoch, so coverage is
disjoint. A worker shuffles samples with a buffer of ``shuffle`` raw (undecoded) samples seeded by
``(seed, epoch, rank, worker)``. There must be at least ``world_size * num_workers`` shards, else a
``ValueError`` says how to re-shard or how many workers fit.

Equal batches on every rank: from the per-shard sample counts (manifest, else tar headers; minus samples the
mask store rejected) every rank computes, for every rank, the full batches its workers can fill, and the
number of batches per rank and epoch is the minimum over ranks, ``N``. Every rank delivers exactly ``N``
batches, so data-parallel ranks never wait for each other at the end of an epoch. **The remainder** (the
partial last batch of each worker, and the excess of ranks that hold more samples) is dropped for this
epoch; because shards and samples are reshuffled every epoch, other samples are dropped next epoch. A worker
that runs short anyway (a sample was corrupt on disk, a shard truncated) reads its shards again in a new
order to fill its quota, so a few samples repeat instead of a rank hanging.

Resampled mode (``resampled=True``): each worker draws shards at random with replacement (seeded by
``(seed, epoch, rank, worker)``) forever; ranks overlap by design; an explicit ``epoch_length`` (batches, or
samples without ``batch_size``) sets what a rank delivers per epoch.

Mixed batches: the epoch is defined by the labeled stream (epoch mode, as above, in units of ``batch_size //
2`` labeled samples). The unlabeled half comes from the unlabeled shards in resampled mode, seeded by
``(seed, epoch, rank, worker)``, so any number (>= 1) of unlabeled shards works and every epoch sees a fresh
draw of unlabeled panoramas.

Order and resume
----------------
The DataLoader takes batches from its workers round-robin, so the batch order of an epoch is a pure function
of ``(seed, epoch, world_size, rank, num_workers, batch_size)`` and the data. ``PanoLoader.position`` is
``(epoch, batch_in_epoch)`` of the next batch; ``state_dict()`` holds it plus, per worker, how many raw
samples each stream has consumed. Starting a loader at a position (``load_state_dict`` or ``set_epoch(e,
b)``) rotates the workers so that the first one asked owns batch ``b``, and each worker skips what it had
delivered without decoding it; the batches then equal those of an uninterrupted run. Resuming from a bare
``(epoch, batch)`` without the per-worker counts replays the cheap checks (members present, mask-store
rejection) only; it is exact unless an image failed to decode before that position in this epoch.

OpenCV and fork
---------------
Decoding uses OpenCV, whose thread pool does not survive ``fork()``. ``PanoLoader`` forks its workers inside
``sharding.format.cv2_fork_guard()``; wrap your own ``DataLoader`` iteration over ``panoramas`` /
``mixed_batches`` the same way (``with cv2_fork_guard(): it = iter(loader)``) if the main process uses
OpenCV. Workers run OpenCV single-threaded.

Skipped samples
---------------
A sample that cannot be used is skipped, logged with its key and reason, and counted by reason when a worker
meets it (reasons in ``sharding.format.REASONS``; ``rejected_by_mask_store`` for mask-store rejections,
``truncated_shard`` once per damaged shard). Workers carry their cumulative counts inside each batch, and
send one last count after their last batch; ``PanoLoader.skipped()`` sums them in the main process. (A
rejected sample that falls in a worker's dropped remainder is never met, so never counted.)
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import random
import tarfile
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from .format import SampleError, check_raw, cv2_fork_guard, decode_sample, resize_nearest
from .manifest import ShardInfo, resolve_shards, tar_keys

log = logging.getLogger("sharding.stream")

__all__ = ["panoramas", "mixed_batches", "make_loader", "read_samples", "PanoLoader", "plan_epoch",
           "EpochPlan", "iter_shard", "cv2_fork_guard"]


# ------------------------------------------------------------------------------- shard reading

def iter_shard(url: str, expected: int | None = None, on_skip=None) -> Iterator[dict]:
    """Complete raw samples (``{"__key__", "__url__", "rgb.jpg": bytes, ...}``) of one shard, in order.

    A sample is handed on as soon as the header of the next sample's first member has been read. A damaged
    tar ends the shard: a sample whose member data cannot be read completely is dropped, and one
    ``truncated_shard`` event is reported through ``on_skip(reason, name, detail)``; so is a shard that ends
    cleanly but holds fewer samples than ``expected`` (its manifest count). (Members are written in sorted
    order -- depth, mask, meta, rgb -- so a sample cut after some members lacks its rgb or meta and is
    skipped as ``incomplete_sample`` downstream.)
    """
    n = 0
    current = None
    reading_data = False
    try:
        stream = gopen(url, "rb")
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as tf:
                for ti in tf:
                    if not ti.isreg():
                        continue
                    prefix, suffix = base_plus_ext(ti.name)
                    if prefix is None:
                        continue
                    if current is not None and prefix != current["__key__"]:
                        done, current = current, None
                        n += 1
                        yield done
                    if current is None:
                        current = {"__key__": prefix, "__url__": url}
                    reading_data = True
                    data = tf.extractfile(ti).read()
                    if len(data) != ti.size:
                        raise tarfile.ReadError(f"member {ti.name} is truncated")
                    reading_data = False
                    current[suffix.lower()] = data
                    tf.members = []
        finally:
            stream.close()
    except Exception as exc:  # tarfile.ReadError, EOFError, OSError, ...: the rest of this shard is lost
        if on_skip is not None:
            lost = f"; dropped the partial sample {current['__key__']}" if current and reading_data else ""
            on_skip("truncated_shard", url, f"{type(exc).__name__}: {exc} after {n} samples{lost}")
        if current is not None and not reading_data:  # its members were all read; later checks decide
            yield current
        return
    if current is not None:
        n += 1
        yield current
    if expected is not None and n < expected and on_skip is not None:
        on_skip("truncated_shard", url, f"{n} of {expected} samples (manifest count); the rest are lost")


def _shuffled(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """Reservoir shuffle with a buffer of ``size`` items (``size <= 1``: pass through)."""
    if size <= 1:
        yield from items
        return
    buf: list = []
    for x in items:
        if len(buf) < size:
            buf.append(x)
            continue
        i = rng.randrange(len(buf))
        out, buf[i] = buf[i], x
        yield out
    rng.shuffle(buf)
    yield from buf


def _rng(*parts) -> random.Random:
    return random.Random("/".join(str(p) for p in parts))


# ------------------------------------------------------------------------------------- planning

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
    """Assign shards to (rank, worker) for ``epoch`` and compute the equal per-rank batch count (see the
    module docstring). ``counts``: samples per shard; ``num_workers``: DataLoader workers (1 for none)."""
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
        _rng("shards", seed, epoch).shuffle(order)
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


# ------------------------------------------------------------------------------- per-worker state

@dataclass(frozen=True)
class StreamSpec:
    """One stream's configuration (picklable: it travels to the DataLoader workers)."""

    name: str
    shards: tuple[ShardInfo, ...]
    counts: tuple[int | None, ...]  # effective counts (manifest minus mask-store rejections)
    labeled: bool | None
    height: int | None
    shuffle: int
    shuffle_shards: bool
    resampled: bool
    mask_store: Any = None


def _open_store(ms):
    if ms is None or not isinstance(ms, (str, os.PathLike)):
        return ms
    from .mask_store import MaskStore

    return MaskStore(ms, readonly=True)


class _Skips:
    """Per-process skip counter; logs every skipped sample with its key and reason."""

    def __init__(self):
        self.counts: Counter = Counter()

    def __call__(self, reason: str, name: str, detail: str = "") -> None:
        self.counts[reason] += 1
        log.warning("skipped %s (%s)%s", name, reason, f": {detail}" if detail else "")


class _WorkerStream:
    """The samples one logical worker reads from one stream in one epoch: raw samples (shard passes or
    resampled shards, through a seeded shuffle buffer) -> checks -> decode -> mask store."""

    def __init__(self, spec: StreamSpec, shard_ids, seed_parts: tuple, skips: _Skips, store, cycle: bool):
        self.spec, self.ids, self.seed_parts, self.skips, self.store = spec, shard_ids, seed_parts, skips, store
        self.cycle = cycle
        self.consumed = 0
        pool = range(len(spec.shards)) if shard_ids is None else shard_ids
        self.pass_size = sum(spec.counts[i] or 0 for i in pool) or 1
        self._raw = self._raw_iter()
        self._samples = self._sample_iter()

    def _read(self, i: int):
        s = self.spec.shards[i]
        return iter_shard(s.url, s.count, self.skips)

    def _raw_iter(self):
        spec = self.spec
        if spec.resampled:
            yield from _shuffled(self._resampled(), spec.shuffle, _rng("buffer", *self.seed_parts))
            return
        for p in itertools.count():
            ids = list(self.ids)
            if p > 0:
                _rng("pass", p, *self.seed_parts).shuffle(ids)
            n = 0
            for raw in _shuffled(itertools.chain.from_iterable(map(self._read, ids)), spec.shuffle,
                                 _rng("buffer", p, *self.seed_parts)):
                n += 1
                yield raw
            if n == 0:
                raise RuntimeError(f"{spec.name}: shards {[spec.shards[i].url for i in ids]} yielded no sample")
            if not self.cycle:
                return

    def _resampled(self):
        """Raw samples of shards drawn at random with replacement, forever."""
        pick = _rng("resample", *self.seed_parts)
        empty = 0
        while True:
            got = False
            for raw in self._read(pick.randrange(len(self.spec.shards))):
                got = True
                yield raw
            empty = 0 if got else empty + 1
            if empty > 3 * len(self.spec.shards) + 10:
                raise RuntimeError(f"{self.spec.name}: the last {empty} shards drawn held no readable sample")

    def _cheap_reason(self, raw: dict) -> str | None:
        reason = check_raw(raw, self.spec.labeled)
        if reason is None and self.store is not None and self.store.is_rejected(raw["__key__"]):
            reason = "rejected_by_mask_store"
        return reason

    def _sample_iter(self):
        spec = self.spec
        misses = 0
        for raw in self._raw:
            self.consumed += 1
            key = raw["__key__"]
            reason, detail = self._cheap_reason(raw), ""
            sample = None
            if reason is None:
                try:
                    sample = decode_sample(raw, height=spec.height, labeled=spec.labeled, bgr=True)
                except SampleError as exc:
                    reason, detail = exc.reason, exc.detail
            if sample is None:
                self.skips(reason, f"{key} in {raw['__url__']}", detail)
                misses += 1
                if misses > 2 * self.pass_size + 64:
                    raise RuntimeError(f"{spec.name}: the last {misses} samples read were all skipped "
                                       f"({dict(self.skips.counts)}); is this the right dataset "
                                       f"(labeled={spec.labeled})?")
                continue
            misses = 0
            if self.store is not None:
                m = self.store.get(key)
                if m is not None:
                    h, w = sample["valid"].shape
                    sample["valid"] &= resize_nearest(np.asarray(m, dtype=bool), h, w)
            yield sample

    def skip_raw(self, n: int) -> None:
        """Skip exactly ``n`` raw samples (a saved offset)."""
        for _ in range(n):
            if next(self._raw, None) is None:
                return
            self.consumed += 1

    def skip_valid(self, n: int) -> None:
        """Skip raw samples until ``n`` passed the cheap checks (resume without saved offsets)."""
        k = 0
        while k < n:
            raw = next(self._raw, None)
            if raw is None:
                return
            self.consumed += 1
            if self._cheap_reason(raw) is None:
                k += 1

    def take(self, n: int) -> list[dict]:
        return list(itertools.islice(self._samples, n))


# ------------------------------------------------------------------------------------ tensors

def _empty(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor; inside a DataLoader worker its storage is allocated in shared memory (as
    torch's default_collate does), so that sending the batch to the main process copies nothing."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    base = torch.empty(0, dtype=dtype)
    storage = base._typed_storage()._new_shared(math.prod(shape), device=base.device)
    return base.new(storage).resize_(*shape)


def _fill_rgb(out: torch.Tensor, s: dict) -> None:
    """The sample's uint8 (H, W, 3) image (``"bgr"`` or ``"rgb"``) -> float32 RGB (3, H, W) in [0, 1],
    written into ``out`` (strided copies + a scale)."""
    if "bgr" in s:
        src = torch.from_numpy(s["bgr"])
        for c in range(3):
            out[c].copy_(src[..., 2 - c])
    else:
        out.copy_(torch.from_numpy(s["rgb"]).permute(2, 0, 1))
    out.mul_(1.0 / 255.0)


def to_tensors(s: dict) -> dict:
    """Numpy sample from ``decode_sample`` -> the contract's tensors."""
    h, w = s["valid"].shape
    rgb = _empty((3, h, w), torch.float32)
    _fill_rgb(rgb, s)
    out = {"key": s["key"], "rgb": rgb, "valid": torch.from_numpy(s["valid"])[None], "meta": s["meta"]}
    if s["depth"] is not None:
        out["depth"] = torch.from_numpy(s["depth"])[None]
    return out


def collate(samples: list[dict]) -> dict:
    """Numpy samples -> a batch: ``key``/``meta`` lists, stacked tensors; ``depth`` and ``labeled`` (B,) when
    any sample has depth (zeros, all invalid, for those without)."""
    n = len(samples)
    h, w = samples[0]["valid"].shape
    rgb, valid = _empty((n, 3, h, w), torch.float32), _empty((n, 1, h, w), torch.bool)
    valid_np = valid.numpy()
    for i, s in enumerate(samples):
        _fill_rgb(rgb[i], s)
        valid_np[i, 0] = s["valid"]
    out = {"key": [s["key"] for s in samples], "rgb": rgb, "valid": valid, "meta": [s["meta"] for s in samples]}
    has = [s["depth"] is not None for s in samples]
    if any(has):
        depth = _empty((n, 1, h, w), torch.float32)
        d = depth.numpy()
        for i, s in enumerate(samples):
            d[i, 0] = s["depth"] if s["depth"] is not None else 0.0
        out["depth"] = depth
        out["labeled"] = torch.tensor(has)
    return out


# ------------------------------------------------------------------------------------ datasets

class PanoramaStream(IterableDataset):
    """One epoch of samples or batches from one or more streams (the first defines the epoch; the others
    must be resampled). Built by ``panoramas`` / ``mixed_batches`` / ``make_loader``; see the module doc."""

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
        skips = _Skips()
        readers = []
        for i, spec in enumerate(self.streams):
            ids = None if spec.resampled else plan.shards[self.rank][w]
            seed_parts = (spec.name, i, self.seed, self.epoch, self.rank, w)
            readers.append(_WorkerStream(spec, ids, seed_parts, skips, _open_store(spec.mask_store),
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
                item["_stats"] = {"worker": w, "raw": [r.consumed for r in readers], "skipped": dict(skips.counts)}
            yield item
        if self.stats:  # skips met after the last batch (e.g. a truncated shard at the end) reach the loader too;
            # this item comes after all of this worker's batches, so the batch order does not change
            yield {"_stats": {"worker": w, "raw": None, "skipped": dict(skips.counts)}, "_final": True}


def _effective_counts(shards: list[ShardInfo], store) -> tuple:
    """Per-shard counts minus the samples the mask store rejected (found by reading tar headers)."""
    counts = [s.count for s in shards]
    if store is None:
        return tuple(counts)
    rejected = set(store.rejected())
    if not rejected:
        return tuple(counts)
    out = []
    for s, c in zip(shards, counts):
        if c is None or "://" in s.url or s.url.startswith("pipe:"):
            out.append(c)
            continue
        out.append(max(0, c - sum(1 for k in tar_keys(s.url) if k in rejected)))
    return tuple(out)


def _spec(name, urls, split, *, height, labeled, shuffle, shuffle_shards, resampled, mask_store) -> StreamSpec:
    shards = resolve_shards(urls, split)
    store = _open_store(mask_store)
    desc = f"{name} stream ({urls if isinstance(urls, (str, os.PathLike)) else f'{len(shards)} shards'}" + \
           (f", split {split})" if split else ")")
    shuffle_shards = bool(shuffle > 0) if shuffle_shards is None else bool(shuffle_shards)
    return StreamSpec(desc, tuple(shards), _effective_counts(shards, store), labeled,
                      None if height is None else int(height), int(shuffle), shuffle_shards, bool(resampled),
                      mask_store)


def panoramas(urls, *, height: int | None = 256, labeled: bool | None = None, rank: int = 0,
              world_size: int = 1, resampled: bool = False, shuffle: int = 0, seed: int = 0, epoch: int = 0,
              mask_store=None, split: str | None = None, batch_size: int | None = None,
              epoch_length: int | None = None, start: int = 0, num_workers: int | None = None,
              drop_last: bool = True, shuffle_shards: bool | None = None) -> PanoramaStream:
    """An ``IterableDataset`` of decoded panoramas (``batch_size=None``) or of batches built inside each
    DataLoader worker (use ``DataLoader(ds, batch_size=None, num_workers=...)``).

    ``urls``: tar paths, a glob, a brace pattern, or a ``manifest.json`` (or its folder) with ``split``.
    ``labeled``: None = as stored, True = depth required (others skipped as ``missing_depth``), False = depth
    ignored. ``shuffle``: sample shuffle buffer (0 = off); shards are permuted per epoch when ``shuffle > 0``
    unless ``shuffle_shards`` says otherwise. ``epoch``/``start``: epoch and first batch (or sample) to
    deliver; ``set_epoch(e)`` changes them. ``num_workers``: the DataLoader's, to fail early; otherwise
    taken from the worker info. ``mask_store``: a ``MaskStore`` (or its path). Epoch, remainder and
    worker semantics: module docstring."""
    spec = _spec("panoramas", urls, split, height=height, labeled=labeled, shuffle=shuffle,
                 shuffle_shards=shuffle_shards, resampled=resampled, mask_store=mask_store)
    return PanoramaStream([spec], None if batch_size is None else [int(batch_size)], rank=rank,
                          world_size=world_size, num_workers=num_workers, seed=seed, epoch=epoch, start=start,
                          epoch_length=epoch_length, drop_last=drop_last)


def mixed_batches(labeled_urls, unlabeled_urls, *, batch_size: int, height: int = 256, rank: int = 0,
                  world_size: int = 1, shuffle: int = 64, seed: int = 0, epoch: int = 0, mask_store=None,
                  split: str | None = None, unlabeled_split: str | None = None, start: int = 0,
                  num_workers: int | None = None, stats: bool = False) -> PanoramaStream:
    """An ``IterableDataset`` of ``{"labeled": batch, "unlabeled": batch}`` with ``batch_size // 2`` samples
    each; the labeled stream defines the epoch, the unlabeled one is resampled (module docstring)."""
    if batch_size < 2 or batch_size % 2:
        raise ValueError(f"mixed batches need an even batch_size >= 2, got {batch_size}")
    lab = _spec("labeled", labeled_urls, split, height=height, labeled=True, shuffle=shuffle, shuffle_shards=None,
                resampled=False, mask_store=mask_store)
    # labeled=None: depth rides along when the unlabeled shards have it (generated scenes), for the oracle
    # teacher and held-out scoring; the labeled loss only ever reads the labeled half
    unl = _spec("unlabeled", unlabeled_urls, unlabeled_split, height=height, labeled=None, shuffle=shuffle,
                shuffle_shards=None, resampled=True, mask_store=mask_store)
    half = batch_size // 2
    return PanoramaStream([lab, unl], [half, half], rank=rank, world_size=world_size, num_workers=num_workers,
                          seed=seed, epoch=epoch, start=start, stats=stats)


# -------------------------------------------------------------------------------------- loader

class PanoLoader:
    """A DataLoader over a ``PanoramaStream`` (batches built in the workers) that knows its position.

    ``for batch in loader`` yields the rest of the current epoch, then moves to the next epoch (a loop that
    is interrupted and restarted continues where it stopped). ``len(loader)``: batches in the current epoch
    (equal on every rank). ``position``: ``(epoch, batch_in_epoch)`` of the next batch. ``state_dict()`` /
    ``load_state_dict()`` checkpoint it exactly; ``set_epoch(e, b)`` jumps. ``skipped()``: counts by reason,
    summed over workers and epochs.
    """

    def __init__(self, dataset: PanoramaStream, *, num_workers: int, pin_memory: bool = False,
                 prefetch_factor: int | None = 2, timeout: float = 0):
        self.dataset = dataset
        self.num_workers = int(num_workers)
        self._dl_kwargs = dict(pin_memory=pin_memory, timeout=timeout)
        if num_workers > 0:
            self._dl_kwargs["prefetch_factor"] = prefetch_factor
        self.epoch, self.batch_in_epoch = dataset.epoch, dataset.start
        self._offsets: dict[int, list[int]] | None = None
        self._skipped_base: Counter = Counter()
        self._latest: dict[int, dict] = {}
        self._fp: str | None = None

    # -- position
    @property
    def position(self) -> tuple[int, int]:
        return self.epoch, self.batch_in_epoch

    def __len__(self) -> int:
        return self.batches_in_epoch(self.epoch)

    def batches_in_epoch(self, epoch: int) -> int:
        n = self.dataset.plan(max(1, self.num_workers), epoch).batches
        if n is None:
            raise TypeError("unbounded stream: pass epoch_length")
        return n

    def set_epoch(self, epoch: int, batch_in_epoch: int = 0) -> None:
        self._fold()
        self.epoch, self.batch_in_epoch, self._offsets = int(epoch), int(batch_in_epoch), None

    def _fingerprint(self) -> str:
        if self._fp is not None:
            return self._fp
        ds = self.dataset
        desc = [ds.world_size, ds.rank, self.num_workers, ds.sizes, ds.seed, ds.epoch_length, ds.drop_last,
                [(s.name, [x.url for x in s.shards], s.counts, s.shuffle, s.shuffle_shards, s.resampled, s.height)
                 for s in ds.streams]]
        self._fp = hashlib.sha1(json.dumps(desc, default=str).encode()).hexdigest()[:16]
        return self._fp

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "offsets": {str(k): list(v) for k, v in (self._offsets or {}).items()},
                "skipped": self.skipped(), "fingerprint": self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        fp = state.get("fingerprint")
        if fp is not None and fp != self._fingerprint():
            raise ValueError("this loader state was saved with different shards, ranks, workers, batch size, seed "
                             "or resolution; resume with the same settings to get the same batches (or call "
                             "set_epoch(epoch, batch) to continue approximately)")
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
        offs = state.get("offsets")
        self._offsets = {int(k): list(v) for k, v in offs.items()} if offs is not None else None
        self._skipped_base = Counter(state.get("skipped", {}))
        self._latest = {}

    # -- skipped
    def _fold(self) -> None:
        for c in self._latest.values():
            self._skipped_base.update(c)
        self._latest = {}

    def skipped(self) -> dict[str, int]:
        total = Counter(self._skipped_base)
        for c in self._latest.values():
            total.update(c)
        return dict(sorted(total.items()))

    # -- iteration
    def __iter__(self):
        self._fold()
        if self.batch_in_epoch >= self.batches_in_epoch(self.epoch):
            self.epoch, self.batch_in_epoch, self._offsets = self.epoch + 1, 0, None
        ds = self.dataset
        ds.set_epoch(self.epoch, self.batch_in_epoch, None if self._offsets is None else dict(self._offsets))
        if self._offsets is None:
            self._offsets = {}
        with cv2_fork_guard():  # the workers are forked here
            it = iter(DataLoader(ds, batch_size=None, num_workers=self.num_workers, **self._dl_kwargs))
        try:
            for batch in it:
                st = batch.pop("_stats")
                self._latest[st["worker"]] = st["skipped"]
                if batch.pop("_final", False):
                    continue
                self._offsets[st["worker"]] = st["raw"]
                self.batch_in_epoch += 1
                yield batch
        finally:
            # Stop the workers now: left to the garbage collector (a loop that breaks, an exception whose
            # traceback holds the iterator) torch's shutdown can wait 5 s per worker.
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        self._fold()
        self.epoch, self.batch_in_epoch, self._offsets = self.epoch + 1, 0, None


def make_loader(urls, *, batch_size: int, unlabeled_urls=None, num_workers: int = 2, height: int = 256,
                split: str | None = None, unlabeled_split: str | None = None, labeled: bool | None = None,
                rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: int = 64, epoch: int = 0,
                start_batch: int = 0, mask_store=None, resampled: bool = False, epoch_length: int | None = None,
                drop_last: bool = True, pin_memory: bool = False, prefetch_factor: int | None = 2) -> PanoLoader:
    """A ``PanoLoader`` of batches of ``batch_size`` from ``urls``, or, with ``unlabeled_urls``, of mixed
    batches: ``urls`` give the labeled half and define the epoch, ``unlabeled_urls`` the (resampled) unlabeled
    half. Raises ``ValueError`` up front when there are fewer shards than ``world_size * num_workers``."""
    if unlabeled_urls is not None:
        if labeled is False:
            raise ValueError("the first stream of mixed batches is the labeled one")
        ds = mixed_batches(urls, unlabeled_urls, batch_size=batch_size, height=height, rank=rank,
                           world_size=world_size, shuffle=shuffle, seed=seed, epoch=epoch, mask_store=mask_store,
                           split=split, unlabeled_split=unlabeled_split, start=start_batch,
                           num_workers=num_workers, stats=True)
    else:
        if resampled and epoch_length is None:
            raise ValueError("resampled streams are infinite: pass epoch_length (batches per epoch)")
        ds = panoramas(urls, height=height, labeled=labeled, rank=rank, world_size=world_size, resampled=resampled,
                       shuffle=shuffle, seed=seed, epoch=epoch, mask_store=mask_store, split=split,
                       batch_size=batch_size, epoch_length=epoch_length, start=start_batch,
                       num_workers=num_workers, drop_last=drop_last)
        ds.stats = True
    return PanoLoader(ds, num_workers=num_workers, pin_memory=pin_memory, prefetch_factor=prefetch_factor)


# ----------------------------------------------------------------------------- offline reading

def read_samples(urls, height: int | None = None, *, split: str | None = None, labeled: bool | None = None,
                 skipped: dict | None = None) -> Iterator[dict]:
    """Every readable sample of ``urls`` in shard order, decoded (``height=None``: stored resolution), in
    one process, no splitting or shuffling: for offline tools (mask computation, teacher precompute).
    Skipped samples are logged and, if ``skipped`` is a dict, counted into it by reason."""
    skips = _Skips()

    def count(reason, name, detail=""):
        skips(reason, name, detail)
        if skipped is not None:
            skipped[reason] = skipped.get(reason, 0) + 1

    for shard in resolve_shards(urls, split, count=False):
        for raw in iter_shard(shard.url, shard.count, count):
            try:
                reason = check_raw(raw, labeled)
                if reason is not None:
                    raise SampleError(reason)
                sample = decode_sample(raw, height=height, labeled=labeled)
            except SampleError as exc:
                count(exc.reason, f"{raw['__key__']} in {shard.url}", exc.detail)
                continue
            yield to_tensors(sample)
