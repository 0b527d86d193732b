"""``sharding.stream``: rank/worker splitting, equal batches, half/half mixing, faults, mask store, resume."""

from __future__ import annotations

import logging
import os
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from webdataset import TarWriter

from sharding.format import cv2_fork_guard, encode_jpeg, encode_png, encode_sample
from sharding.manifest import resolve_shards, sha256_file, write_manifest
from sharding.loader import stop_workers
from sharding.stream import make_loader, panoramas, plan_epoch, read_samples

H = 8


def _sample(key: str, seed: int, *, labeled: bool = False, h: int = H, mask: np.ndarray | None = None) -> dict:
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (h, 2 * h, 3), dtype=np.uint8)
    depth = None
    if labeled:
        depth = rng.integers(500, 9000, (h, 2 * h)).astype(np.uint16)
        depth[0, :3] = 0
    return encode_sample(key, encode_png(rgb), meta={"source": "test", "split": "train", "path": key},
                         depth_mm=depth, mask=mask)


def _write(out: Path, groups: list[list[dict]], split: str = "train") -> Path:
    """Shards ``{split}-{i:06d}.tar`` (one per group) and a manifest with their counts."""
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for i, group in enumerate(groups):
        name = f"{split}-{i:06d}.tar"
        with TarWriter(str(out / name), encoder=False) as tw:
            for s in group:
                tw.write(s)
        shards.append({"path": name, "count": len(group), "sha256": sha256_file(out / name)})
    write_manifest(out, {"tool": "test", "version": "0", "source": "test", "input": None, "created": "",
                         "splits": {split: {"count": sum(len(g) for g in groups), "shards": shards}},
                         "skipped": {}, "skipped_samples": []})
    return out


def _dataset(out: Path, counts: list[int], prefix: str, *, labeled=False, seed0=0) -> tuple[Path, list[str]]:
    groups, keys, n = [], [], seed0
    for si, c in enumerate(counts):
        g = []
        for j in range(c):
            k = f"{prefix}{si}_{j}"
            g.append(_sample(k, n, labeled=labeled))
            keys.append(k)
            n += 1
        groups.append(g)
    return _write(out, groups), keys


def _keys(loader) -> list[list[str]]:
    return [list(b["key"]) for b in loader]


# ----------------------------------------------------------------------- ranks and workers

def test_two_ranks_two_workers_cover_every_sample_once_with_equal_batches(tmp_path):
    d, keys = _dataset(tmp_path / "ds", [3] * 8, "s")
    per_epoch = []
    for epoch in range(2):
        per_rank = []
        for rank in range(2):
            loader = make_loader(d, batch_size=3, num_workers=2, world_size=2, rank=rank, height=H, shuffle=4,
                                 seed=1, epoch=epoch)
            assert len(loader) == 4
            batches = _keys(loader)
            assert len(batches) == 4 and all(len(b) == 3 for b in batches)
            assert loader.position == (epoch + 1, 0)
            per_rank.append([k for b in batches for k in b])
        a, b = set(per_rank[0]), set(per_rank[1])
        assert not a & b
        assert sorted(per_rank[0] + per_rank[1]) == sorted(keys)  # every sample exactly once
        per_epoch.append(per_rank)
    assert per_epoch[0] != per_epoch[1]  # reshuffled per epoch

    # the plain sample-level dataset splits the same way (DataLoader without batching, 2 workers)
    seen = []
    for rank in range(2):
        ds = panoramas(str(d / "train-*.tar"), height=4, rank=rank, world_size=2, shuffle=0)
        with cv2_fork_guard():
            it = iter(DataLoader(ds, batch_size=None, num_workers=2))
        got = [s["key"] for s in it]
        assert len(got) == 12
        seen += got
    assert sorted(seen) == sorted(keys)


def test_uneven_shards_give_equal_batches_per_rank(tmp_path):
    counts = [5, 1, 4, 2, 3, 7, 2, 6, 1]  # the plan itself: tests/test_plan.py
    d, keys = _dataset(tmp_path / "ds", counts, "u")
    got = []
    n = plan_epoch(counts, world_size=2, num_workers=2, batch_size=2, epoch=0, seed=3).batches
    for rank in range(2):
        loader = make_loader(d, batch_size=2, num_workers=2, world_size=2, rank=rank, height=H, shuffle=3, seed=3)
        assert len(loader) == n
        batches = _keys(loader)
        assert len(batches) == n
        got += [k for b in batches for k in b]
    assert len(got) == len(set(got)) == 2 * 2 * n  # no sample twice; the remainder is dropped this epoch
    assert set(got) <= set(keys)


def test_fewer_shards_than_readers_fails_with_a_helpful_message(tmp_path):
    d, _ = _dataset(tmp_path / "ds", [4, 4, 4], "f")
    with pytest.raises(ValueError) as e:
        make_loader(d, batch_size=2, num_workers=2, world_size=2, rank=0, height=H)
    msg = str(e.value)
    assert "3 shard(s)" in msg and "2 rank(s) x 2 DataLoader worker(s)" in msg
    assert "--samples-per-shard 3" in msg and "num_workers <= 1" in msg
    # without telling the dataset the worker count, the worker raises the same message through the DataLoader
    ds = panoramas(d, height=H, world_size=2, rank=1, batch_size=2)
    with cv2_fork_guard():
        it = iter(DataLoader(ds, batch_size=None, num_workers=2))
    with pytest.raises(Exception, match="Re-shard with"):
        next(it)
    stop_workers(it)  # not via the garbage collector, where torch's shutdown waits 5 s per worker
    with pytest.raises(ValueError, match="not enough samples"):
        make_loader(d, batch_size=16, num_workers=2, height=H)


# ------------------------------------------------------------------------------ half / half

def test_mixed_batches_are_half_labeled_half_unlabeled(tmp_path):
    lab, lab_keys = _dataset(tmp_path / "lab", [4, 4, 4, 4], "L", labeled=True)
    unl, unl_keys = _dataset(tmp_path / "unl", [5, 5], "U", labeled=False)
    # an unlabeled shard with depth in it: the unlabeled half carries that depth along (the oracle teacher and
    # held-out scoring read it), flagged per sample in "labeled"; samples without depth get zeros
    g = [_sample(f"UD{j}", 100 + j, labeled=True) for j in range(3)]
    _write(tmp_path / "unl_d", [g])
    loader = make_loader(lab, batch_size=4, unlabeled_urls=[str(unl / "train-000000.tar"),
                                                            str(unl / "train-000001.tar"),
                                                            str(tmp_path / "unl_d" / "train-000000.tar")],
                         num_workers=2, height=H, shuffle=4, seed=2)
    assert len(loader) == 8
    seen_lab, seen_unl = [], []
    for batch in loader:
        assert set(batch) == {"labeled", "unlabeled"}
        lb, ub = batch["labeled"], batch["unlabeled"]
        assert len(lb["key"]) == 2 and len(ub["key"]) == 2
        assert lb["rgb"].shape == ub["rgb"].shape == (2, 3, H, 2 * H)
        assert lb["depth"].shape == (2, 1, H, 2 * H) and lb["labeled"].all()
        if "depth" in ub:
            has = [k.startswith("UD") for k in ub["key"]]
            assert ub["labeled"].tolist() == has
            for i, h in enumerate(has):
                assert (ub["depth"][i] > 0).any() == h
        else:
            assert not any(k.startswith("UD") for k in ub["key"])
        assert lb["valid"].dtype == torch.bool and not lb["valid"][:, 0, 0, 0].any()  # depth 0 -> invalid
        seen_lab += lb["key"]
        seen_unl += ub["key"]
    assert sorted(seen_lab) == sorted(lab_keys)  # the labeled stream defines the epoch: each once
    assert set(seen_unl) <= set(unl_keys) | {"UD0", "UD1", "UD2"} and len(seen_unl) == 16
    with pytest.raises(ValueError, match="even batch_size"):
        make_loader(lab, batch_size=3, unlabeled_urls=unl, num_workers=0, height=H)


# ------------------------------------------------------------------------------------ resume

def test_resume_at_epoch_and_batch_reproduces_the_batches(tmp_path):
    counts = [4, 3, 5, 2, 9]
    groups, n = [], 0
    for si, c in enumerate(counts):
        groups.append([_sample(f"r{si}_{j}", si * 10 + j) for j in range(c)])
    bad = dict(groups[2][1])
    bad["rgb.png"] = bad["rgb.png"][:40]  # corrupt image: only exact (state) resume can skip it blindly
    groups[2][1] = bad
    d = _write(tmp_path / "ds", groups)
    kw = dict(batch_size=2, num_workers=2, height=H, shuffle=3, seed=5)
    for epoch in (0, 1):  # unequal worker quotas: the round-robin bookkeeping matters
        plan = plan_epoch(counts, world_size=1, num_workers=2, batch_size=2, epoch=epoch, seed=5)
        assert len(set(plan.quotas[0])) > 1

    ref, states = {}, {}
    loader = make_loader(d, **kw)
    for _ in range(2):
        for batch in loader:
            ref[(loader.epoch, loader.batch_in_epoch - 1)] = (batch["key"], batch["rgb"].sum().item())
            states[(loader.epoch, loader.batch_in_epoch)] = loader.state_dict()
    skipped = loader.skipped()
    assert set(skipped) == {"unreadable_image"} and skipped["unreadable_image"] >= 2  # at least once per epoch

    for epoch, start in [(1, 1), (1, 4), (0, 3), (0, 9)]:
        n_ep = max(b for (e, b) in ref if e == epoch) + 1
        want = [ref[(epoch, b)] for b in range(start, n_ep)]
        fresh = make_loader(d, **kw)
        fresh.load_state_dict(states[(epoch, start)])
        assert fresh.position == (epoch, start)
        got = [(b["key"], b["rgb"].sum().item()) for b in fresh]
        assert got == want
        assert fresh.position == (epoch + 1, 0)
    # a bare (epoch, batch) position (no saved per-worker offsets) replays only the cheap checks: exact when
    # no image failed to decode before it (a clean copy of the data here)
    groups[2][1] = _sample("r2_1", 21)
    clean = _write(tmp_path / "clean", groups)
    whole = make_loader(clean, **kw)
    whole.set_epoch(1)
    want = [(b["key"], b["rgb"].sum().item()) for b in whole]
    for start in (3, 4):
        fresh = make_loader(clean, **kw)
        fresh.set_epoch(1, start)
        assert [(b["key"], b["rgb"].sum().item()) for b in fresh] == want[start:]
    # a loop interrupted mid-epoch continues where it stopped
    it = make_loader(d, **kw)
    first = []
    for batch in it:
        first.append(batch["key"])
        if len(first) == 2:
            break
    state = it.state_dict()
    assert state["epoch"] == 0 and state["batch_in_epoch"] == 2
    rest = [b["key"] for b in it]
    assert first + rest == [ref[(0, b)][0] for b in range(len(first) + len(rest))]
    with pytest.raises(ValueError, match="same settings"):
        make_loader(d, **{**kw, "num_workers": 1}).load_state_dict(state)


# ------------------------------------------------------------------------------------ faults

def _faulty_dataset(tmp_path: Path) -> tuple[Path, set[str]]:
    g0 = [_sample(f"a{j}", j) for j in range(4)]
    bad_jpeg = _sample("a_badjpeg", 50)
    del bad_jpeg["rgb.png"]
    bad_jpeg["rgb.jpg"] = encode_jpeg(np.full((H, 2 * H, 3), 128, np.uint8))[:60]  # truncated JPEG
    g0.insert(2, bad_jpeg)
    g1 = [_sample(f"b{j}", 10 + j) for j in range(4)]
    wide = _sample("b_wide", 60)
    wide["rgb.png"] = encode_png(np.zeros((H, 3 * H, 3), np.uint8))  # 3:1
    g1.insert(1, wide)
    g2 = [_sample(f"c{j}", 20 + j) for j in range(6)]
    g3 = [_sample(f"d{j}", 30 + j) for j in range(4)]
    d = _write(tmp_path / "faulty", [g0, g1, g2, g3])
    # truncate shard 2 in the middle of sample c4: c0..c3 survive, c4 is partial, c5 is gone
    p = d / "train-000002.tar"
    with tarfile.open(p) as tf:
        cut = next(ti for ti in tf.getmembers() if ti.name.startswith("c4.")).offset_data + 100
    with open(p, "r+b") as f:
        f.truncate(cut)
    good = {f"a{j}" for j in range(4)} | {f"b{j}" for j in range(4)} | {f"c{j}" for j in range(4)} | \
        {f"d{j}" for j in range(4)}
    return d, good


def test_injected_faults_are_skipped_counted_and_named(tmp_path, caplog):
    d, good = _faulty_dataset(tmp_path)
    # verify=False reads the damaged tar itself (as for shards without a manifest hash): every sample once
    # (no remainder dropping), each fault counted exactly once, no good sample lost
    loader = make_loader(d, batch_size=1, num_workers=2, height=H, shuffle=0, drop_last=False, verify=False)
    got = [k for b in loader for k in b["key"]]
    assert sorted(got) == sorted(good)
    assert loader.skipped() == {"not_2to1": 1, "truncated_shard": 1, "unreadable_image": 1}
    # with drop_last (equal batches across ranks) the quota still holds: short workers re-read their shards
    loader = make_loader(d, batch_size=2, num_workers=2, height=H, shuffle=2, verify=False)
    batches = _keys(loader)
    assert len(batches) == len(loader) and set(k for b in batches for k in b) <= good
    # the offline reader names what it skips
    counts = {}
    with caplog.at_level(logging.WARNING, logger="sharding.stream"):
        keys = [s["key"] for s in read_samples(d / "manifest.json", skipped=counts, verify=False)]
    assert sorted(keys) == sorted(good)
    assert counts == {"not_2to1": 1, "truncated_shard": 1, "unreadable_image": 1}
    text = caplog.text
    assert "a_badjpeg" in text and "unreadable_image" in text and "b_wide" in text and "not_2to1" in text
    assert "train-000002.tar" in text and "truncated_shard" in text
    # verified (the default): the truncated shard's bytes differ from its manifest sha256 -> skipped whole
    caplog.clear()
    counts = {}
    with caplog.at_level(logging.WARNING, logger="sharding.stream"):
        keys = [s["key"] for s in read_samples(d / "manifest.json", skipped=counts)]
    assert sorted(keys) == sorted(good - {f"c{j}" for j in range(4)})
    assert counts == {"not_2to1": 1, "corrupt_shard": 1, "unreadable_image": 1}
    assert "train-000002.tar (corrupt_shard)" in caplog.text


def test_mask_store_masks_and_rejections(tmp_path):
    mask_store = pytest.importorskip("sharding.mask_store")
    d, keys = _dataset(tmp_path / "ds", [2, 2, 2, 2], "m", labeled=True)
    store = mask_store.MaskStore(tmp_path / "masks.lmdb")
    half = np.zeros((2 * H, 4 * H), bool)  # stored at twice the resolution: resized with nearest
    half[:, : 2 * H] = True
    store.put("m1_0", half)
    tiny = np.zeros((H, 2 * H), bool)
    tiny[0, :3] = True  # < 20 % valid: rejected
    store.put("m2_0", tiny)
    assert store.is_rejected("m2_0") and not store.is_rejected("m1_0")
    store.close()
    loader = make_loader(d, batch_size=1, num_workers=2, height=H, shuffle=0,
                         mask_store=str(tmp_path / "masks.lmdb"))
    assert len(loader) == 7  # the rejected sample is known before reading (from the store and tar headers)
    valid = {b["key"][0]: b["valid"][0, 0] for b in loader}
    assert sorted(valid) == sorted(set(keys) - {"m2_0"})
    assert loader.skipped() == {"rejected_by_mask_store": 1}
    v = valid["m1_0"]
    assert not v[:, H:].any() and v[1:, :H].all() and not v[0, :3].any()  # store mask AND depth > 0


def test_a_corrupt_mask_store_entry_skips_its_panorama_and_is_counted(tmp_path, caplog):
    # a mask whose checksum fails must not silently become "no mask": sky would enter the loss
    mask_store = pytest.importorskip("sharding.mask_store")
    from test_mask_store import flip_value_byte

    d, keys = _dataset(tmp_path / "ds", [2, 2], "c", labeled=True)
    store = mask_store.MaskStore(tmp_path / "masks.lmdb")
    rng = np.random.default_rng(0)
    for k in keys:
        store.put(k, rng.random((H, 2 * H)) < 0.9)
    store.close()
    flip_value_byte(tmp_path / "masks.lmdb", b"c1_0", b"masks")
    with caplog.at_level(logging.WARNING):
        loader = make_loader(d, batch_size=1, num_workers=0, height=H, shuffle=0,
                             mask_store=str(tmp_path / "masks.lmdb"))
        got = [b["key"][0] for b in loader]
    assert "c1_0" not in got and set(got) == set(keys) - {"c1_0"}  # the epoch keeps its length (plan)
    skipped = loader.skipped()  # counted each time the refill of the fixed-length epoch meets it again
    assert set(skipped) == {"corrupt_mask_entry"} and skipped["corrupt_mask_entry"] >= 1
    assert "skipped c1_0 in" in caplog.text and "corrupt_mask_entry" in caplog.text


# ----------------------------------------------------------------------------- other modes

def test_resampled_mode_has_an_explicit_epoch_length_and_is_seeded(tmp_path):
    d, keys = _dataset(tmp_path / "ds", [3, 3], "z")
    runs = []
    for seed in (7, 7, 8):
        loader = make_loader(d, batch_size=2, num_workers=2, height=H, resampled=True, epoch_length=5, seed=seed,
                             shuffle=2)
        runs.append(_keys(loader))
        assert len(runs[-1]) == 5 == len(loader)
    assert runs[0] == runs[1] and runs[0] != runs[2]
    assert {k for b in runs[0] for k in b} <= set(keys)
    with pytest.raises(ValueError, match="epoch_length"):
        make_loader(d, batch_size=2, resampled=True)


def test_url_forms_and_nearest_resizing(tmp_path):
    d, keys = _dataset(tmp_path / "ds", [2, 3, 1], "q", labeled=True)
    forms = [d, d / "manifest.json", str(d / "train-*.tar"), str(d / "train-{000000..000002}.tar"),
             [str(d / "train-000000.tar"), str(d / "train-000001.tar"), str(d / "train-000002.tar")]]
    for form in forms:
        shards = resolve_shards(form, "train")
        assert [s.count for s in shards] == [2, 3, 1]
    os.remove(d / "manifest.json")
    assert [s.count for s in resolve_shards(str(d / "*.tar"))] == [2, 3, 1]  # counted from tar headers
    with pytest.raises(ValueError, match="no shards match"):
        resolve_shards(str(d / "val-*.tar"))
    full = {s["key"]: s for s in read_samples(str(d / "*.tar"))}
    small = {s["key"]: s for s in read_samples(str(d / "*.tar"), height=4)}
    assert sorted(full) == sorted(keys)
    for k in keys:
        f, s = full[k], small[k]
        assert f["rgb"].shape == (3, H, 2 * H) and s["rgb"].shape == (3, 4, 8)
        assert set(s["depth"].unique().tolist()) <= set(f["depth"].unique().tolist())  # nearest: no new values
        area = cv2.resize((f["rgb"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), (8, 4),
                          interpolation=cv2.INTER_AREA)
        assert np.array_equal((s["rgb"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), area)
        assert torch.equal(s["valid"], s["depth"] > 0)
