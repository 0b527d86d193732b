"""``python -m teacher_server.precompute --ray``: the same cache, computed as a Ray Data pipeline.

    shards ──► from_items(shard addresses) ──► flat_map(read + project)   CPU tasks, one shard each
           ──► map_batches(RayDataTeacher, concurrency=replicas, num_gpus=...)   actor pool, model loaded once
           ──► iter_batches() on the driver ──► the one LMDB writer (PseudoLabelStore)

Contract, the same as the in-process / pool path of :func:`teacher_server.precompute.precompute`:

* **Same answers.** Rotations are a function of ``(seed, key)`` (:func:`~teacher_server.precompute.rotations_for_key`)
  and the faces are projected with :func:`~teacher_server.precompute.cube_faces`, so a key gets the same
  stored answer whichever path computed it, and the two paths may resume each other's stores.
* **Resumable.** The driver opens the store first (an existing store must have the same header:
  ``StoreMismatchError``) and hands its keys to the readers, which skip those samples before decoding
  them; ``limit`` caps the *new* panoramas (``Dataset.limit`` after the skip). The driver is the only
  writer: LMDB allows one, and the readers never open the store.
* **Bad samples counted, not fatal.** We read with ``sharding.stream.read_samples`` per shard instead of
  ``ray.data.read_webdataset``: it checks each shard's sha256 against its manifest, ends a truncated shard
  cleanly and skips undecodable samples, logging each with its key and reason; ``read_webdataset`` would
  fail the whole dataset on a damaged tar. Each read task reports its counts per reason to a small tally
  actor, and the summary has them (``skipped_bad``), like the other path.
* **Throughput knobs.** ``replicas`` teacher actors (``concurrency``), each with ``num_gpus`` / ``num_cpus``;
  a teacher batch holds ``max(1, max_batch_faces // (6 K))`` panoramas. Decoding and projection run in
  the read tasks, beside the teacher, and Ray Data's streaming executor bounds the rows in flight between
  the stages by its object-store budget (its backpressure), so memory stays flat on any number of shards.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from .models import resolve_model_name, teacher_factory
from .precompute import cube_faces, rotations_for_key
from .store import PseudoLabelStore, make_header

log = logging.getLogger("teacher_server.precompute")


def _tally_class():
    import ray

    @ray.remote(num_cpus=0)
    class SkipTally:
        """Counts of skipped samples by reason, sent by the read tasks (one message per shard)."""

        def __init__(self):
            self.counts: dict[str, int] = {}

        def add(self, counts: dict) -> None:
            for reason, n in counts.items():
                self.counts[reason] = self.counts.get(reason, 0) + int(n)

        def get(self) -> dict:
            return dict(self.counts)

    return SkipTally


def read_and_project(item: dict, *, existing, tally, rotations: int, face_size: int, seed: int, max_deg,
                     height: int | None):
    """flat_map: one shard -> rows ``{"key", "rotations" (K, 3, 3), "faces" (6K, 3, F, F)}`` of the samples
    not stored yet. Skips (bad samples, stored keys) go to ``tally``."""
    from sharding.stream import read_samples

    skipped: dict[str, int] = {}
    stored = 0
    try:
        for sample in read_samples([item["shard"]], height=height, labeled=False, skipped=skipped):
            key = sample["key"]
            if key in existing:
                stored += 1
                continue
            rots = rotations_for_key(seed, key, rotations, max_deg)
            faces = cube_faces(sample["rgb"], rots, face_size)
            yield {"key": key, "rotations": rots.numpy().astype(np.float32),
                   "faces": faces.numpy().astype(np.float32)}
    finally:
        if stored:
            skipped["stored_already"] = stored
        if skipped:
            tally.add.remote(skipped)


class RayDataTeacher:
    """The teacher as a Ray Data callable class: loaded once per actor, answers a batch of panoramas.

    In: ``{"key" (B,), "rotations" (B, K, 3, 3), "faces" (B, 6K, 3, F, F)}``; out: ``key``, ``rotations``,
    ``disparity`` (B, K, 6, 1, F, F) float32 (invalid faces all-NaN), ``teacher_seconds`` (B,) (the model
    time of the batch, shared out per panorama)."""

    def __init__(self, factory, torch_threads: int | None = None):
        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        self.teacher = factory()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        faces = np.ascontiguousarray(batch["faces"])  # Ray hands over read-only arrays
        b, n = faces.shape[:2]
        f = faces.shape[-1]
        t0 = time.perf_counter()
        out = self.teacher(torch.from_numpy(faces.reshape(b * n, *faces.shape[2:]).copy()))
        secs = time.perf_counter() - t0
        disp = out.float().cpu().numpy().reshape(b, n // 6, 6, 1, f, f)
        return {"key": batch["key"], "rotations": batch["rotations"], "disparity": disp,
                "teacher_seconds": np.full(b, secs / max(b, 1), dtype=np.float64)}


def precompute_ray(shards, store: str, *, rotations: int = 8, model: str = "tiny-random", face_size: int = 256,
                   input_size: int = 518, seed: int = 0, max_deg=45.0, replicas: int = 1, limit: int | None = None,
                   height: int | None = None, split: str | None = None, device: str = "auto", dtype: str = "auto",
                   num_gpus: float = 0.0, num_cpus: float = 1.0, max_batch_faces: int = 48,
                   ray_address: str | None = None, log_every: int = 50, progress: bool = False,
                   flush_every: int = 32) -> dict:
    """Fill ``store`` through Ray Data (see the module docstring); returns the same summary as
    :func:`teacher_server.precompute.precompute` (``computed``, ``skipped_existing``, ``skipped_bad``,
    ``invalid_faces``, ``wall_seconds``, ``teacher_seconds_this_run`` and the store's report)."""
    from sharding.manifest import resolve_shards
    from sharding.ray_connect import connect

    if replicas < 1:
        raise ValueError(f"the Ray Data precompute needs at least one teacher replica, got {replicas}")
    urls = [s.url for s in resolve_shards(shards, split, count=False)]
    header = make_header(model=resolve_model_name(model), face_size=face_size, input_size=input_size, seed=seed,
                         rotations=rotations, max_deg=max_deg)
    db = PseudoLabelStore(store, header=header)  # refuses an existing store built with other settings
    t0 = time.perf_counter()
    connect(ray_address)
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bool(progress)
    if device == "auto":
        device = "cuda" if num_gpus > 0 else "cpu"
    # ``seed`` seeds the rotations, not a random teacher's weights (as in the other path)
    factory = teacher_factory(model, device=device, dtype=dtype, input_size=input_size)
    tally = _tally_class().remote()
    existing = frozenset(db.keys())
    per_batch = max(1, int(max_batch_faces) // (6 * int(rotations)))
    ds = ray.data.from_items([{"shard": u} for u in urls], override_num_blocks=len(urls))
    ds = ds.flat_map(read_and_project, num_cpus=1,
                     fn_kwargs=dict(existing=existing, tally=tally, rotations=rotations, face_size=face_size,
                                    seed=seed, max_deg=max_deg, height=height))
    if limit is not None:
        ds = ds.limit(int(limit))
    ds = ds.map_batches(RayDataTeacher, batch_size=per_batch, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=int(replicas)), num_gpus=num_gpus, num_cpus=num_cpus,
                        fn_constructor_kwargs=dict(factory=factory,
                                                   torch_threads=max(1, int(num_cpus)) if num_gpus == 0 else None))

    done = duplicates = invalid = nbytes = 0
    secs = 0.0
    flushed: tuple[float, int, int] = (0.0, 0, 0)

    def flush() -> None:
        nonlocal flushed
        db.add_totals(teacher_seconds=secs - flushed[0], panoramas=done - flushed[1], nbytes=nbytes - flushed[2])
        flushed = (secs, done, nbytes)

    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
            for i, key in enumerate(batch["key"]):
                key = str(key)
                secs += float(batch["teacher_seconds"][i])
                if key in db:  # the same key in two shards: the first one wins, as in the other path
                    duplicates += 1
                    continue
                disp = torch.from_numpy(np.array(batch["disparity"][i]))
                invalid += int((~torch.isfinite(disp).flatten(2).all(-1)).sum())
                nbytes += db.put(key, torch.from_numpy(np.array(batch["rotations"][i])), disp)
                done += 1
                if done % flush_every == 0:
                    flush()
                if log_every and done % log_every == 0:
                    log.info("%d panoramas stored, %.2f panoramas/s", done, done / (time.perf_counter() - t0))
    finally:
        flush()
    skipped: dict[str, Any] = ray.get(tally.get.remote())
    ray.kill(tally)
    stored_already = int(skipped.pop("stored_already", 0)) + duplicates
    wall = time.perf_counter() - t0
    summary = {"computed": done, "skipped_existing": stored_already, "skipped_bad": skipped,
               "invalid_faces": invalid, "wall_seconds": wall, "teacher_seconds_this_run": flushed[0]}
    summary.update(db.report())
    log.info(db.format_report())
    db.close()
    return summary
