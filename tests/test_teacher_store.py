"""The cached pseudo-label store, precompute (in process) and the cached / hybrid label sources."""

from __future__ import annotations

import pickle

import pytest
import torch

from panorama import random_rotations
from teacher_server.inprocess import InProcessTeacher
from teacher_server.labels import CachedLabels, HybridLabels, OnlineLabels
from teacher_server.precompute import cube_faces, main, precompute, rotations_for_key
from teacher_server.store import PseudoLabelStore, StoreMismatchError, make_header

K, F_SIZE, INPUT, H = 3, 16, 28, 32


def _header(**kw):
    base = dict(model="tiny-random", face_size=F_SIZE, input_size=INPUT, seed=0, rotations=K, max_deg=45.0)
    base.update(kw)
    return make_header(**base)


def _entry(seed):
    g = torch.Generator().manual_seed(seed)
    rots = random_rotations(K, generator=g)
    disp = torch.rand(K, 6, 1, F_SIZE, F_SIZE, generator=g)
    disp[1, 2] = float("nan")  # an invalid face survives as NaN
    return rots, disp


def test_round_trip_header_and_values(tmp_path):
    path = tmp_path / "pseudo.lmdb"
    store = PseudoLabelStore(path, header=_header(), map_size=1 << 16)  # tiny map: it must grow
    entries = {f"key_{i}": _entry(i) for i in range(12)}  # ~12 x 9 KiB > 64 KiB
    for key, (r, d) in entries.items():
        assert store.put(key, r, d) > 0
    store.close()

    ro = pickle.loads(pickle.dumps(PseudoLabelStore(path, readonly=True)))  # no env travels along
    assert len(ro) == 12 and sorted(ro.keys()) == sorted(entries) and "key_3" in ro and "nope" not in ro
    hdr = ro.header
    assert (hdr["model"], hdr["face_size"], hdr["input_size"], hdr["seed"], hdr["rotations"], hdr["max_deg"]) == \
        ("tiny-random", F_SIZE, INPUT, 0, K, [45.0, 45.0, 45.0])
    for key, (r, d) in entries.items():
        got_r, got_d = ro.get(key)
        assert torch.equal(got_r, r)  # rotations are stored in float32
        nan = torch.isnan(d)
        assert torch.equal(torch.isnan(got_d), nan)
        assert (got_d[~nan] - d[~nan]).abs().max() < 5e-4  # fp16
    assert ro.get("missing") is None
    with pytest.raises(PermissionError):
        ro.put("x", *entries["key_0"])
    with pytest.raises(ValueError, match="expected rotations"):
        PseudoLabelStore(path).put("bad", torch.eye(3)[None], torch.zeros(1, 6, 1, F_SIZE, F_SIZE))


def test_mismatched_header_is_refused(tmp_path):
    path = tmp_path / "pseudo.lmdb"
    PseudoLabelStore(path, header=_header()).close()
    store = PseudoLabelStore(path, readonly=True)
    store.check(model="tiny-random", face_size=F_SIZE, input_size=INPUT)  # matches: silent
    with pytest.raises(StoreMismatchError) as err:
        store.check(model="depth-anything/Depth-Anything-V2-Small-hf", face_size=64, input_size=INPUT)
    msg = str(err.value)
    assert "model: store has 'tiny-random'" in msg and "face_size: store has 16" in msg and "input_size" not in msg
    with pytest.raises(StoreMismatchError, match="rotations"):
        PseudoLabelStore(path, header=_header(rotations=K + 1))  # resuming with other settings
    with pytest.raises(FileNotFoundError, match="precompute"):
        PseudoLabelStore(tmp_path / "absent.lmdb", readonly=True)


def write_shards(folder, n=5, per_shard=3, h=H):
    """WebDataset shards of generated panoramas, as sharding.build writes them (RGB only: unlabeled)."""
    from teacher_server.testing import write_panorama_shards

    return write_panorama_shards(folder, n, per_shard, h)


def test_precompute_stores_seeded_rotations_and_resumes(tmp_path):
    keys, shards = write_shards(tmp_path / "shards")
    store_path = str(tmp_path / "pseudo.lmdb")
    kw = dict(rotations=K, model="tiny-random", face_size=F_SIZE, input_size=INPUT, seed=7, max_deg=30.0)
    first = precompute(shards, store_path, replicas=0, limit=2, **kw)
    assert (first["computed"], first["skipped_existing"], first["panoramas"]) == (2, 0, 2)
    # resume through the command line: the two stored keys are skipped, the rest computed
    assert main(["--shards", *shards, "--store", store_path, "--rotations", str(K), "--model", "tiny-random",
                 "--face-size", str(F_SIZE), "--input-size", str(INPUT), "--seed", "7", "--max-deg", "30",
                 "--replicas", "0"]) == 0
    store = PseudoLabelStore(store_path, readonly=True)
    assert sorted(store.keys()) == sorted(keys)
    rep = store.report()
    assert rep["teacher_seconds"] > 0 and 0 < rep["bytes_per_panorama"] < rep["uncompressed_bytes_per_panorama"]
    assert rep["teacher_seconds_per_epoch"] == pytest.approx(rep["teacher_seconds"] / K, rel=1e-6)
    again = precompute(shards, store_path, replicas=0, **kw)
    assert (again["computed"], again["skipped_existing"]) == (0, len(keys))

    # rotations are a function of (seed, key); answers are the teacher's on those faces
    from sharding.stream import read_samples

    sample = next(s for s in read_samples(shards[1:]) if s["key"] == keys[3])
    rots, disp = store.get(keys[3])
    assert torch.allclose(rots, rotations_for_key(7, keys[3], K, 30.0))
    assert not torch.allclose(rots, rotations_for_key(8, keys[3], K, 30.0))
    angles = torch.rad2deg(torch.atan2(rots[:, 0, 2], rots[:, 2, 2]))  # yaw within the range
    assert angles.abs().max() <= 30.0 + 1e-3
    teacher = InProcessTeacher("tiny-random", device="cpu", input_size=INPUT)
    want = teacher.pseudo_label(cube_faces(sample["rgb"], rots, F_SIZE)).reshape(K, 6, 1, F_SIZE, F_SIZE)
    assert (disp - want).abs().max() < 1e-3


def _labels_store(tmp_path):
    path = tmp_path / "pseudo.lmdb"
    store = PseudoLabelStore(path, header=_header())
    entries = {f"key_{i}": _entry(10 + i) for i in range(3)}
    for key, (r, d) in entries.items():
        store.put(key, r, d)
    store.close()
    return path, entries


def _batch(keys, h=H):
    g = torch.Generator().manual_seed(0)
    b = len(keys)
    return {"key": list(keys), "rgb": torch.rand(b, 3, h, 2 * h, generator=g),
            "valid": torch.ones(b, 1, h, 2 * h, dtype=torch.bool)}


def _which(entries, key, rotation):
    """Index of the stored rotation that was returned."""
    r, _ = entries[key]
    hits = [k for k in range(K) if torch.allclose(r[k], rotation)]
    assert len(hits) == 1
    return hits[0]


def test_cached_labels_return_stored_rotations_and_answers(tmp_path):
    path, entries = _labels_store(tmp_path)
    src = CachedLabels(path, seed=0, check={"model": "tiny-random", "face_size": F_SIZE})
    seen = set()
    for _ in range(6):
        labels = src.request(_batch(["key_2", "key_0"]), None, F_SIZE).result()
        for i, key in enumerate(["key_2", "key_0"]):
            k = _which(entries, key, labels.rotations[i])
            seen.add((key, k))
            want = entries[key][1][k]
            assert torch.equal(torch.isnan(labels.disparity[i]), torch.isnan(want))
            assert torch.equal(labels.face_valid[i], torch.isfinite(want).flatten(1).all(-1))
    assert len(seen) > 2  # different stored rotations get drawn
    again = CachedLabels(path, seed=0)
    first = again.request(_batch(["key_2", "key_0"]), None, F_SIZE).result()
    assert torch.equal(first.rotations, CachedLabels(path, seed=0).request(_batch(["key_2", "key_0"]), None,
                                                                          F_SIZE).result().rotations)  # seeded
    with pytest.raises(KeyError, match=r"'key_9'.*pseudo.lmdb"):
        src.request(_batch(["key_0", "key_9"]), None, F_SIZE)
    with pytest.raises(ValueError, match="face_size=16"):
        src.request(_batch(["key_0"]), None, 32)
    with pytest.raises(StoreMismatchError):
        CachedLabels(path, check={"model": "other-model"})
    assert src.stats()["faces"] == 6 * 2 * 6


def test_hybrid_labels_mix_per_sample(tmp_path):
    path, entries = _labels_store(tmp_path)
    online = OnlineLabels(InProcessTeacher("tiny-random", device="cpu", input_size=INPUT))
    keys = ["key_0", "fresh_a", "key_1", "fresh_b"]
    batch = _batch(keys)
    rots = random_rotations(4, generator=torch.Generator().manual_seed(4))
    direct = online.request(batch, rots, F_SIZE).result()

    all_cached = HybridLabels(online, CachedLabels(path), online_fraction=0.0)
    labels = all_cached.request(batch, rots, F_SIZE).result()
    for i in (0, 2):  # stored keys: cached, with a stored rotation
        _which(entries, keys[i], labels.rotations[i])
    for i in (1, 3):  # keys not in the store: online, with the caller's rotation
        assert torch.equal(labels.rotations[i], rots[i])
        assert torch.allclose(labels.disparity[i], direct.disparity[i], atol=1e-5)
    assert all_cached.stats()["cached_samples"] == 2

    all_online = HybridLabels(online, CachedLabels(path), online_fraction=1.0)
    labels = all_online.request(batch, rots, F_SIZE).result()
    assert torch.equal(labels.rotations, rots) and torch.allclose(labels.disparity, direct.disparity, atol=1e-5)

    half = HybridLabels(online, CachedLabels(path), online_fraction=0.5, seed=3)
    for _ in range(20):
        half.request(_batch(["key_0", "key_1"]), rots[:2], F_SIZE).result()
    frac = half.stats()["online_fraction_observed"]
    assert 0.25 < frac < 0.75


def test_flipped_bytes_are_counted_and_recomputed(tmp_path):
    from test_mask_store import flip_value_byte

    path, entries = _labels_store(tmp_path)
    flip_value_byte(path, b"p:key_1")
    ro = PseudoLabelStore(path, readonly=True)
    assert ro.get("key_1") is None and "key_1" not in ro
    assert ro.corrupt == 1 and "checksum" in ro.corrupt_keys["key_1"]
    assert ro.get("key_0") is not None and "key_2" in ro and sorted(ro.keys()) == sorted(entries)
    ro.close()


def test_truncated_store_is_a_user_error_naming_the_store(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    path = tmp_path / "pseudo.lmdb"
    store = PseudoLabelStore(path, header=_header())
    for i in range(20):
        store.put(f"key_{i}", *_entry(i))
    store.close()
    data = path / "data.mdb"
    os.truncate(data, data.stat().st_size // 2)
    code = ("import sys\nfrom sharding import cli\nfrom teacher_server.store import PseudoLabelStore\n"
            "sys.exit(cli.run(lambda a: len(PseudoLabelStore(a[0], readonly=True)) and 0))")
    p = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 2, (p.returncode, p.stderr[-800:])  # not 135 (SIGBUS)
    assert f"error: pseudo-label store {path}" in p.stderr and "truncated" in p.stderr


def test_missing_store_and_mismatch_are_user_errors(tmp_path):
    from sharding.cli import UserError

    with pytest.raises(UserError, match="pseudo-label store not found at .*absent.lmdb.*precompute"):
        PseudoLabelStore(tmp_path / "absent.lmdb", readonly=True)
    PseudoLabelStore(tmp_path / "p.lmdb", header=_header()).close()
    with pytest.raises(UserError, match=r"(?s)pseudo-label store .*p.lmdb.*seed: store has 0, expected 3"):
        PseudoLabelStore(tmp_path / "p.lmdb", header=_header(seed=3))
