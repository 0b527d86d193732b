"""``python -m sharding.masks --ray``: the mask run as a Ray Data pipeline with one LMDB writer on the driver.

    shards (one row each) --map_batches(read_shards)--> raw samples --map_batches(MaskSegmenter, actor
    pool of --replicas, num_gpus=--gpus-per-replica)--> packed masks --iter_batches--> driver: MaskStore

* **Source.** ``ray.data.read_webdataset`` would decode with its own reader and fail the whole dataset on a
  damaged shard; instead every shard is read by :func:`read_shards` with the trainer's reader
  (``sharding.mask_samples.iter_shard_samples``), so damaged shards and bad samples become rows with a
  ``status`` that the driver counts and names, exactly as in the local run. Keys already in the store are
  passed to the readers and come back as ``status="stored"`` rows (counted, never decoded).
* **Segmenter.** :class:`MaskSegmenter` is a callable class run by an ``ActorPoolStrategy(size=replicas)``:
  each actor builds the models once (lazily: a batch of stored or shard-masked samples loads none), one
  torch thread, and returns masks packed to bits (8x less to move than bools).
* **Writer.** The driver is the only process that opens the store for writing; it consumes
  ``iter_batches`` and records every row (``masks._record``), so resumability, rejection, the header check
  and the counting of bad samples are the local run's.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Iterator

import numpy as np

from sharding.mask_samples import LazyMasker, ModelLoadError, RawSample, SampleResult, iter_shard_samples, process_sample

log = logging.getLogger(__name__)

RAW_FIELDS = ("key", "shard", "status", "detail", "rgb", "rgb_name", "mask")
OUT_FIELDS = ("key", "status", "detail", "source", "height", "width", "bits", "boxes")


def _raw_schema() -> Any:
    import pyarrow as pa

    return pa.schema([("key", pa.string()), ("shard", pa.string()), ("status", pa.string()), ("detail", pa.string()),
                      ("rgb", pa.binary()), ("rgb_name", pa.string()), ("mask", pa.binary())])


def _out_schema() -> Any:
    import pyarrow as pa

    return pa.schema([("key", pa.string()), ("status", pa.string()), ("detail", pa.string()), ("source", pa.string()),
                      ("height", pa.int32()), ("width", pa.int32()), ("bits", pa.binary()), ("boxes", pa.string())])


def _table(rows: list[dict], schema: Any) -> Any:
    import pyarrow as pa

    return pa.Table.from_pylist(rows, schema=schema)


def read_shards(batch: Any, skip: frozenset, rows_per_batch: int = 8) -> Iterator[Any]:
    """Ray Data UDF: shard rows (``url``, ``count``, ``sha256``) -> raw sample rows, a few at a time.

    ``status``: ``"ok"`` (to segment), ``"stored"`` (its key is in ``skip``), ``"shard_error"`` (``key`` is
    the shard, ``detail`` the reason)."""
    schema = _raw_schema()
    for shard in batch.to_pylist():
        count = None if shard["count"] is None or shard["count"] < 0 else int(shard["count"])
        errors: list[tuple[str, str]] = []
        rows: list[dict] = []
        for s in iter_shard_samples([(shard["url"], count, shard["sha256"] or None)], errors):
            if s.key in skip:
                rows.append({"key": s.key, "shard": s.shard, "status": "stored"})
            else:
                rows.append({"key": s.key, "shard": s.shard, "status": "ok", "rgb": s.rgb, "rgb_name": s.rgb_name,
                             "mask": s.mask})
            if len(rows) >= rows_per_batch:
                yield _table(rows, schema)
                rows = []
        rows += [{"key": name, "shard": shard["url"], "status": "shard_error", "detail": why} for name, why in errors]
        if rows:
            yield _table(rows, schema)


class MaskSegmenter:
    """Ray Data callable class: raw sample rows -> mask rows (see the module docstring)."""

    def __init__(self, cfg: Any, rule: str, torch_threads: int = 1) -> None:
        import torch

        torch.set_num_threads(max(1, torch_threads))
        self.masker = LazyMasker(cfg)
        self.rule = rule

    def __call__(self, batch: Any) -> Any:
        out = []
        for r in batch.to_pylist():
            if r["status"] != "ok":
                out.append({"key": r["key"], "status": r["status"], "detail": r["detail"]})
                continue
            sample = RawSample(r["key"], r["shard"], r["rgb"], r["rgb_name"], r["mask"])
            try:
                res = process_sample(self.masker, sample, self.rule)
            except ModelLoadError as exc:  # reported as a row: the driver stops the run with the reason
                out.append({"key": r["key"], "status": "model_error", "detail": str(exc)})
                continue
            out.append(pack_result(res))
        return _table(out, _out_schema())


def pack_result(res: SampleResult) -> dict:
    if res.error is not None or res.valid is None:
        return {"key": res.key, "status": "failed", "detail": res.error or "no mask"}
    h, w = res.valid.shape
    return {"key": res.key, "status": "done", "source": res.source, "height": h, "width": w,
            "bits": np.packbits(res.valid, axis=None).tobytes(), "boxes": json.dumps(res.boxes)}


def unpack_result(row: dict) -> SampleResult:
    if row["status"] != "done":
        return SampleResult(row["key"], error=row["detail"] or row["status"])
    h, w = int(row["height"]), int(row["width"])
    valid = np.unpackbits(np.frombuffer(row["bits"], np.uint8), count=h * w).reshape(h, w).astype(bool)
    return SampleResult(row["key"], valid, row["source"], json.loads(row["boxes"] or "{}"))


def run_ray_data(shard_list: list, cfg: Any, *, rule: str, skip: frozenset, replicas: int, gpus_per_replica: float,
                 ray_address: str | None, batch_size: int, progress: bool,
                 on_row: Callable[[dict], bool]) -> None:
    """Run the pipeline; ``on_row(row)`` gets every output row on the driver (``status``: ``done``,
    ``failed``, ``stored``, ``shard_error``) and returns False to stop early (``--limit``)."""
    from sharding.ray_connect import connect

    replicas = max(1, int(replicas))
    started = connect(ray_address, num_cpus=max(os.cpu_count() or 1, replicas + 1),
                      object_store_memory=min(2_000_000_000, 500_000_000 * max(2, replicas)))
    try:
        import ray
        from ray.data import ActorPoolStrategy, DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = bool(progress)
        shards = [{"url": i.url, "count": -1 if i.count is None else int(i.count), "sha256": i.sha256 or ""}
                  for i in shard_list]
        ds = ray.data.from_items(shards, override_num_blocks=max(1, len(shards)))
        ds = ds.map_batches(read_shards, fn_kwargs={"skip": skip}, batch_size=1, batch_format="pyarrow")
        # small blocks, so that the samples of one shard spread over every segmenter actor (otherwise the
        # reader's output of a whole shard is one block, and one block goes to one actor)
        ds = ds.repartition(target_num_rows_per_block=max(1, int(batch_size)))
        ds = ds.map_batches(MaskSegmenter, fn_constructor_kwargs={"cfg": cfg, "rule": rule},
                            batch_size=max(1, int(batch_size)), batch_format="pyarrow",
                            compute=ActorPoolStrategy(size=replicas), num_cpus=1,
                            num_gpus=gpus_per_replica if gpus_per_replica > 0 else None)
        it = ds.iter_batches(batch_size=None, batch_format="pyarrow")
        try:
            for batch in it:
                for row in batch.to_pylist():
                    if row["status"] == "model_error":
                        raise ModelLoadError(row["detail"])
                    if not on_row(row):
                        return
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
    finally:
        if started:
            import ray

            ray.shutdown()
