"""``PanoLoader``: a DataLoader over a ``PanoramaStream`` that knows its position in the data.

Order and resume contract
-------------------------
The DataLoader takes batches from its workers round-robin, so the batch order of an epoch is a pure function
of ``(seed, epoch, world_size, rank, num_workers, batch_size)`` and the data (``sharding.plan``).
``position`` is ``(epoch, batch_in_epoch)`` of the next batch; ``state_dict()`` holds it plus, per worker,
how many raw samples each stream has consumed. Starting a loader at a position (``load_state_dict`` or
``set_epoch(e, b)``) rotates the workers so that the first one asked owns batch ``b``, and each worker
skips what it had delivered without decoding it; the batches then equal those of an uninterrupted run.
Resuming from a bare ``(epoch, batch)`` without the per-worker counts replays the cheap checks (members
present, mask-store rejection) only; it is exact unless an image failed to decode before that position in
this epoch.

Skips: workers carry their cumulative skip counts (and the shard hashes they verified, see
``sharding.verify``) in a ``_stats`` entry of each batch, and send one last ``_final`` item after their
last batch; ``skipped()`` sums the counts over workers and epochs.

Workers are forked each epoch inside ``cv2_fork_guard()`` (OpenCV's thread pool does not survive ``fork``).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter

from torch.utils.data import DataLoader

from . import verify
from .format import cv2_fork_guard


def stop_workers(it) -> None:
    """Stop a DataLoader iterator's worker processes now.

    Why the private ``_shutdown_workers``: dropping our reference is not enough when a traceback still holds
    the iterator (an exception raised inside ``next(it)`` keeps its ``__next__`` frame, and so ``it``, alive);
    the workers then live until the garbage collector runs, and torch's shutdown from there can wait 5 s per
    worker. torch has no public way to stop them; this is the one place that calls the private method.
    """
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


class PanoLoader:
    """A DataLoader over a ``PanoramaStream`` (batches built in the workers) that knows its position.

    ``for batch in loader`` yields the rest of the current epoch, then moves to the next epoch (a loop that
    is interrupted and restarted continues where it stopped). ``len(loader)``: batches in the current epoch
    (equal on every rank). ``position``: ``(epoch, batch_in_epoch)`` of the next batch. ``state_dict()`` /
    ``load_state_dict()`` checkpoint it exactly; ``set_epoch(e, b)`` jumps. ``skipped()``: counts by reason,
    summed over workers and epochs.
    """

    def __init__(self, dataset, *, num_workers: int, pin_memory: bool = False,
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
                verify.remember(st.get("verified"))  # the next epoch's forked workers inherit it
                if batch.pop("_final", False):
                    continue
                self._offsets[st["worker"]] = st["raw"]
                self.batch_in_epoch += 1
                yield batch
        finally:
            stop_workers(it)  # now, not when the garbage collector gets to it
        self._fold()
        self.epoch, self.batch_in_epoch, self._offsets = self.epoch + 1, 0, None
