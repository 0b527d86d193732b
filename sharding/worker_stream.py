"""What one DataLoader worker reads from one stream in one epoch (worker semantics).

Worker contract
---------------
A ``WorkerStream`` is built inside a worker for one logical worker ``w`` of rank ``r`` (``sharding.plan``
says which shards it owns and its quota). It reads raw samples from its shards (epoch mode: in the planned
order, then again in a new seeded order if it runs short, so a few samples repeat instead of a rank
hanging; resampled mode: shards drawn with replacement, forever), passes them through a shuffle buffer of
``shuffle`` raw samples seeded by ``(seed, epoch, rank, worker)`` (webdataset's ``shuffle`` stage), checks
them cheaply (members present, mask-store rejection), decodes them (``sharding.format.decode_sample``) and
ANDs the mask store's mask into ``valid`` (a mask-store entry that fails its checksum skips the panorama,
counted as ``corrupt_mask_entry``: training it unmasked would put sky and watermark into the loss). ``consumed`` counts raw samples taken from the buffer, so that a
resumed worker skips exactly what it had delivered without decoding it (``skip_raw``), or, without saved
counts, replays only the cheap checks (``skip_valid``).

Skipped samples are logged with key, shard and reason on the ``sharding.stream`` logger (the data plane's
one skip log) and counted by reason in a ``SkipCounter``.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
from webdataset.filters import shuffle as wds_shuffle

from .addresses import is_local, local_path
from .format import SampleError, check_raw, decode_sample, resize_nearest
from .manifest import ShardInfo, tar_keys
from .plan import seeded_rng
from .shard_reader import iter_shard

log = logging.getLogger("sharding.stream")


def shuffled(items, size: int, rng):
    """``items`` through webdataset's shuffle buffer of ``size`` (``size <= 1``: unchanged order)."""
    if size <= 1:
        return iter(items)
    return wds_shuffle(size, size, rng=rng)(iter(items))


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
    verify: bool = True  # check each local shard against its manifest sha256 when first opened
    allow_pipe: bool = False  # pipe: addresses (shell commands) allowed; see sharding.addresses


def open_store(ms):
    if ms is None or not isinstance(ms, (str, os.PathLike)):
        return ms
    from .mask_store import MaskStore

    return MaskStore(ms, readonly=True)


class SkipCounter:
    """Per-process skip counter; logs every skipped sample with its key and reason."""

    def __init__(self):
        self.counts: Counter = Counter()

    def __call__(self, reason: str, name: str, detail: str = "") -> None:
        self.counts[reason] += 1
        log.warning("skipped %s (%s)%s", name, reason, f": {detail}" if detail else "")


class WorkerStream:
    """The samples one logical worker reads from one stream in one epoch: raw samples (shard passes or
    resampled shards, through a seeded shuffle buffer) -> checks -> decode -> mask store."""

    def __init__(self, spec: StreamSpec, shard_ids, seed_parts: tuple, skips: SkipCounter, store, cycle: bool):
        self.spec, self.ids, self.seed_parts, self.skips, self.store = spec, shard_ids, seed_parts, skips, store
        self.cycle = cycle
        self.consumed = 0
        pool = range(len(spec.shards)) if shard_ids is None else shard_ids
        self.pass_size = sum(spec.counts[i] or 0 for i in pool) or 1
        self._raw = self._raw_iter()
        self._samples = self._sample_iter()

    def _read(self, i: int):
        s = self.spec.shards[i]
        return iter_shard(s.url, s.count, self.skips, sha256=s.sha256 if self.spec.verify else None,
                          allow_pipe=self.spec.allow_pipe)

    def _raw_iter(self):
        spec = self.spec
        if spec.resampled:
            yield from shuffled(self._resampled(), spec.shuffle, seeded_rng("buffer", *self.seed_parts))
            return
        for p in itertools.count():
            ids = list(self.ids)
            if p > 0:
                seeded_rng("pass", p, *self.seed_parts).shuffle(ids)
            n = 0
            for raw in shuffled(itertools.chain.from_iterable(map(self._read, ids)), spec.shuffle,
                                 seeded_rng("buffer", p, *self.seed_parts)):
                n += 1
                yield raw
            if n == 0:
                raise RuntimeError(f"{spec.name}: shards {[spec.shards[i].url for i in ids]} yielded no sample")
            if not self.cycle:
                return

    def _resampled(self):
        """Raw samples of shards drawn at random with replacement, forever."""
        pick = seeded_rng("resample", *self.seed_parts)
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
            if sample is not None and self.store is not None:
                m = self.store.get(key)
                if m is not None:
                    h, w = sample["valid"].shape
                    sample["valid"] &= resize_nearest(np.asarray(m, dtype=bool), h, w)
                elif key in self.store.corrupt_keys:
                    # never train on a panorama whose sky/watermark mask failed its checksum: the loss would
                    # see exactly the pixels the mask exists to hide
                    sample, reason, detail = None, "corrupt_mask_entry", self.store.corrupt_keys[key]
            if sample is None:
                self.skips(reason, f"{key} in {raw['__url__']}", detail)
                misses += 1
                if misses > 2 * self.pass_size + 64:
                    raise RuntimeError(f"{spec.name}: the last {misses} samples read were all skipped "
                                       f"({dict(self.skips.counts)}); is this the right dataset "
                                       f"(labeled={spec.labeled})?")
                continue
            misses = 0
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


def effective_counts(shards: list[ShardInfo], store) -> tuple:
    """Per-shard counts minus the samples the mask store rejected (found by reading tar headers)."""
    counts = [s.count for s in shards]
    if store is None:
        return tuple(counts)
    rejected = set(store.rejected())
    if not rejected:
        return tuple(counts)
    out = []
    for s, c in zip(shards, counts):
        if c is None or not is_local(s.url):
            out.append(c)
            continue
        out.append(max(0, c - sum(1 for k in tar_keys(local_path(s.url)) if k in rejected)))
    return tuple(out)
