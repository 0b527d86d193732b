"""``sharding.shard_reader.iter_shard``: raw samples in order; damage reported once, never raised."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
from webdataset import TarWriter

from sharding import verify
from sharding.format import encode_png, encode_sample
from sharding.manifest import sha256_file
from sharding.shard_reader import iter_shard


def _shard(path: Path, n: int) -> Path:
    with TarWriter(str(path), encoder=False) as tw:
        for j in range(n):
            rgb = np.random.default_rng(j).integers(0, 256, (4, 8, 3), dtype=np.uint8)
            tw.write(encode_sample(f"k{j}", encode_png(rgb), meta={"source": "t", "split": "train", "path": "x"}))
    return path


def _read(url, expected=None, **kw):
    events = []
    keys = [s["__key__"] for s in iter_shard(str(url), expected, lambda *e: events.append(e), **kw)]
    return keys, events


def test_complete_shard_in_order_with_members(tmp_path):
    p = _shard(tmp_path / "a.tar", 3)
    samples = list(iter_shard(str(p)))
    assert [s["__key__"] for s in samples] == ["k0", "k1", "k2"]
    assert set(samples[0]) == {"__key__", "__url__", "rgb.png", "meta.json"} and samples[0]["__url__"] == str(p)
    assert _read(p, 3) == (["k0", "k1", "k2"], [])


def test_truncation_mid_member_and_between_samples(tmp_path):
    p = _shard(tmp_path / "a.tar", 4)
    with tarfile.open(p) as tf:
        members = tf.getmembers()
    k2 = next(ti for ti in members if ti.name.startswith("k2."))
    data = p.read_bytes()
    mid = tmp_path / "mid.tar"
    mid.write_bytes(data[: k2.offset_data + 10])  # inside k2's first member
    keys, events = _read(mid, 4)
    assert keys == ["k0", "k1"]
    assert len(events) == 1 and events[0][0] == "truncated_shard" and events[0][1] == str(mid)
    assert "dropped the partial sample k2" in events[0][2]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: k2.offset])  # between k1 and k2: a clean end, but fewer samples than the manifest
    keys, events = _read(cut, 4)
    assert keys == ["k0", "k1"] and events == [("truncated_shard", str(cut), "2 of 4 samples (manifest count); "
                                                                            "the rest are lost")]
    keys, events = _read(tmp_path / "missing.tar")
    assert keys == [] and [e[0] for e in events] == ["truncated_shard"]


def test_sha256_mismatch_skips_the_whole_shard(tmp_path):
    verify.clear_cache()
    p = _shard(tmp_path / "a.tar", 3)
    good = sha256_file(p)
    assert _read(p, 3, sha256=good) == (["k0", "k1", "k2"], [])
    keys, events = _read(p, 3, sha256="f" * 64)
    assert keys == [] and len(events) == 1 and events[0][:2] == ("corrupt_shard", str(p))
    assert "differs from the manifest" in events[0][2]
    verify.clear_cache()
