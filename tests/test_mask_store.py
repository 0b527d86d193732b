"""MaskStore: bit-packing, rejection, metadata, map growth, crash safety, pickling, concurrent readers."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from sharding.mask_store import MaskStore, load_mask_png


def _mask(i: int) -> np.ndarray:
    """A deterministic mask for entry ``i``: odd sizes, valid fraction spread over [0, 1]."""
    rng = np.random.default_rng(i)
    h, w = 3 + i % 7, 5 + 2 * (i % 11)  # odd widths, sizes not multiples of 8
    return rng.random((h, w)) < (i % 10) / 9.0


# ------------------------------------------------------------------------------------ basics
def test_round_trip_is_exact_for_odd_shapes(tmp_path):
    store = MaskStore(tmp_path / "m.lmdb")
    rng = np.random.default_rng(0)
    shapes = [(1, 1), (1, 9), (3, 7), (5, 13), (17, 33), (2, 8), (31, 1)]
    masks = {f"s{i}": rng.random(s) < 0.6 for i, s in enumerate(shapes)}
    for k, m in masks.items():
        assert store.put(k, m) == pytest.approx(m.mean())
    assert len(store) == len(masks)
    assert sorted(store.keys()) == sorted(masks) == sorted(store)
    for k, m in masks.items():
        got = store.get(k)
        assert got.dtype == bool and got.shape == m.shape
        np.testing.assert_array_equal(got, m)
        assert store.valid_fraction(k) == pytest.approx(m.mean(), abs=1e-12)
        assert k in store and store.source(k) == "model"
    assert store.get("nope") is None and "nope" not in store
    with pytest.raises(KeyError, match="nope"):
        store.valid_fraction("nope")
    # (1, H, W) torch-style masks and 0/1 integer masks are accepted; overwriting replaces
    store.put("s0", np.ones((1, 4, 6), np.uint8), source="imported")
    e = store.entry("s0")
    assert e.mask.shape == (4, 6) and e.mask.all() and e.source == "imported" and e.valid_fraction == 1.0


def test_bad_masks_are_refused_with_the_key(tmp_path):
    store = MaskStore(tmp_path / "m.lmdb")
    with pytest.raises(ValueError, match="'pano7'.*boolean"):
        store.put("pano7", np.full((4, 4), 255, np.uint8))
    with pytest.raises(ValueError, match="'pano8'.*shape"):
        store.put("pano8", np.ones((2, 3, 4), bool))
    with pytest.raises(ValueError, match="non-empty"):
        store.put("", np.ones((2, 2), bool))
    assert len(store) == 0


def test_rejected_under_min_valid_and_cleared_on_overwrite(tmp_path):
    store = MaskStore(tmp_path / "m.lmdb")
    assert store.min_valid == 0.2
    low = np.zeros((10, 10), bool)
    low.flat[:19] = True  # 19 % valid
    edge = np.zeros((10, 10), bool)
    edge.flat[:20] = True  # exactly 20 %: not rejected ("under 20 %")
    store.put("b_low", low)
    store.put("a_edge", edge)
    store.put("c_none", np.zeros((3, 5), bool))
    assert store.rejected() == ["b_low", "c_none"]
    assert store.is_rejected("b_low") and not store.is_rejected("a_edge")
    np.testing.assert_array_equal(store.get("b_low"), low)  # the mask is stored too
    assert store.entry("c_none").rejected
    store.put("b_low", np.ones((10, 10), bool))
    assert store.rejected() == ["c_none"]
    assert store.delete("c_none") and store.rejected() == [] and "c_none" not in store
    # a store made with another threshold keeps it (read from metadata)
    other = MaskStore(tmp_path / "m2.lmdb", min_valid=0.5)
    other.set_metadata({"detector": "x"})
    other.put("k", edge)
    assert other.is_rejected("k") and other.metadata["min_valid"] == 0.5
    other.close()
    assert MaskStore(tmp_path / "m2.lmdb").min_valid == 0.5


def test_metadata_mismatch_lists_the_fields(tmp_path):
    store = MaskStore(tmp_path / "m.lmdb")
    assert store.metadata == {}
    meta = {"detector": "IDEA-Research/grounding-dino-base", "sam": "sam_vit_b_01ec64.pth",
            "box_threshold": 0.3, "text_threshold": 0.25, "prompts": ("sky", "watermark"), "min_valid": 0.2}
    store.set_metadata(meta)
    store.check_metadata(meta)  # tuples and lists compare equal after the JSON round trip
    assert store.metadata["prompts"] == ["sky", "watermark"]
    changed = {**meta, "detector": "IDEA-Research/grounding-dino-tiny", "box_threshold": 0.35, "new_field": 1}
    with pytest.raises(ValueError) as err:
        store.check_metadata(changed)
    msg = str(err.value)
    assert "3 field(s) differ" in msg
    assert "detector" in msg and "grounding-dino-tiny" in msg and "grounding-dino-base" in msg
    assert "box_threshold" in msg and "0.35" in msg and "new_field" in msg and "<missing>" in msg
    assert "sam:" not in msg and "text_threshold" not in msg
    # metadata survives re-opening, also read-only
    store.close()
    ro = MaskStore(tmp_path / "m.lmdb", readonly=True)
    assert ro.metadata["sam"] == "sam_vit_b_01ec64.pth"
    with pytest.raises(PermissionError):
        ro.put("x", np.ones((2, 2), bool))


def test_readonly_missing_store_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.lmdb"):
        MaskStore(tmp_path / "nowhere.lmdb", readonly=True)


def test_map_grows_from_a_tiny_map_size(tmp_path):
    store = MaskStore(tmp_path / "m.lmdb", map_size=64 * 1024)
    rng = np.random.default_rng(1)
    masks = [rng.random((301, 603)) < 0.5 for _ in range(12)]  # ~23 KB each packed, ~280 KB in all
    for i, m in enumerate(masks):
        store.put(f"k{i:02d}", m)
    assert store.map_size > 64 * 1024
    store.close()
    ro = MaskStore(tmp_path / "m.lmdb", readonly=True)
    for i, m in enumerate(masks):
        np.testing.assert_array_equal(ro.get(f"k{i:02d}"), m)


def test_pickle_drops_the_environment_and_reopens(tmp_path):
    store = MaskStore(tmp_path / "m.lmdb")
    store.put("a", _mask(3))
    assert store._h is not None
    clone = pickle.loads(pickle.dumps(store))
    assert clone._h is None and clone.path == store.path
    np.testing.assert_array_equal(clone.get("a"), _mask(3))  # same process: shares the environment
    assert clone._h is store._h
    assert store.__getstate__()["_h"] is None and store._h is not None
    clone.close()
    store.put("b", _mask(4))  # still open for the other store
    ro = MaskStore(store.path, readonly=True)  # a read-only store of the same path in the same process
    np.testing.assert_array_equal(ro.get("b"), _mask(4))
    ro.close()
    store.close()
    assert MaskStore(store.path, readonly=True).keys() == ["a", "b"]


# ------------------------------------------------------------------------------------ crash safety
class _CrashAfterFirstPut:
    """Wraps an LMDB environment: the first ``put`` of a write transaction is followed by ``os._exit``."""

    def __init__(self, env):
        self._env = env

    def __getattr__(self, name):
        return getattr(self._env, name)

    def begin(self, **kw):
        txn = self._env.begin(**kw)
        outer = self

        class Txn:
            def __enter__(self):
                txn.__enter__()
                return self

            def __exit__(self, *exc):
                return txn.__exit__(*exc)

            def put(self, *a, **k):
                txn.put(*a, **k)
                os._exit(17)  # dies inside the transaction: mask written, rejected flag not yet

            def __getattr__(self, name):
                return getattr(txn, name)

        return Txn() if kw.get("write") else txn


def _crash_writer(store: MaskStore) -> None:
    h = store._handle()  # a forked child: its own environment
    h.env = _CrashAfterFirstPut(h.env)
    store.put("crashy", np.zeros((9, 13), bool))  # would be rejected
    store.put("never", np.ones((9, 13), bool))
    os._exit(0)


def _bulk_writer(store: MaskStore, n: int) -> None:
    for i in range(n):  # n is larger than it gets to: it is killed while writing
        store.put(f"bulk{i:04d}", np.random.default_rng(i).random((64, 129)) < (i % 5) / 8)
    os._exit(0)


def test_writer_dying_mid_transaction_leaves_no_partial_entry(tmp_path):
    ctx = mp.get_context("fork")
    store = MaskStore(tmp_path / "m.lmdb")
    keep = _mask(9)
    store.put("crashy", keep)  # the old entry must survive the crashed overwrite
    p = ctx.Process(target=_crash_writer, args=(store,))
    p.start()
    p.join(30)
    assert p.exitcode == 17
    e = store.entry("crashy")
    np.testing.assert_array_equal(e.mask, keep)
    assert not e.rejected and store.rejected() == [] and "never" not in store
    # the write lock was released by the dead writer: this process can write again
    store.put("after", np.ones((2, 3), bool))
    assert "after" in store

    # SIGKILL at an arbitrary moment: every entry present is whole and consistent
    p = ctx.Process(target=_bulk_writer, args=(store, 10**6))
    p.start()
    deadline = time.time() + 20
    while len(store) < 50 and time.time() < deadline:
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)
    p.join(30)
    assert p.exitcode == -signal.SIGKILL
    keys = [k for k in store.keys() if k.startswith("bulk")]
    assert len(keys) >= 48
    for k in keys:
        i = int(k[4:])
        e = store.entry(k)
        want = np.random.default_rng(i).random((64, 129)) < (i % 5) / 8
        np.testing.assert_array_equal(e.mask, want)
        assert e.valid_fraction == pytest.approx(want.mean())
        assert e.rejected == (want.mean() < 0.2)
    assert sorted(store.rejected()) == sorted(k for k in store.keys() if store.valid_fraction(k) < 0.2)


# ------------------------------------------------------------------------------------ concurrent readers
def _reader(store: MaskStore, n_total: int, ready, queue) -> None:
    """Reads until the writer's last key appears; checks every entry it sees against ``_mask``."""
    checked, errors, lengths = 0, [], set()
    deadline = time.time() + 60
    try:
        ready.put(len(store))  # first use in this process: opens its own environment
        while time.time() < deadline:
            keys = [k for k in store.keys() if k.startswith("k")]
            lengths.add(len(keys))
            for k in keys:
                e = store.entry(k)
                want = _mask(int(k[1:]))
                if not (e.mask.shape == want.shape and (e.mask == want).all()):
                    errors.append(f"{k}: mask differs")
                elif abs(e.valid_fraction - want.mean()) > 1e-12 or e.rejected != (want.mean() < 0.2):
                    errors.append(f"{k}: fraction/rejected inconsistent")
                checked += 1
            if len(keys) == n_total:
                break
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        errors.append(f"{type(exc).__name__}: {exc}")
    queue.put((os.getpid(), checked, errors[:5], len(lengths)))


def test_four_reader_processes_while_a_writer_appends(tmp_path):
    n = 300
    store = MaskStore(tmp_path / "m.lmdb", map_size=128 * 1024)  # small: the map grows while they read
    store.put("k0000", _mask(0))  # opened here before the readers fork: they must re-open their own
    procs, queues, readies = [], [], []
    for method in ("fork", "fork", "spawn", "spawn"):
        ctx = mp.get_context(method)
        q, ready = ctx.Queue(), ctx.Queue()
        r = store if method == "fork" else MaskStore(store.path, readonly=True)  # spawn: pickled
        p = ctx.Process(target=_reader, args=(r, n, ready, q))
        p.start()
        procs.append(p)
        queues.append(q)
        readies.append(ready)
    assert [r.get(timeout=60) for r in readies] == [1, 1, 1, 1]
    big = np.random.default_rng(5).random((400, 801)) < 0.5  # ~40 KB packed, incompressible
    for i in range(1, n):
        store.put(f"k{i:04d}", _mask(i))
        time.sleep(0.002)
        if i % 40 == 0:
            # Kept, not deleted: seven of them (~280 KB) cannot fit in the 128 KiB map whatever pages LMDB
            # manages to reuse, so the map must grow while the readers hold it (on a fast machine a
            # put-then-delete pair could be absorbed by freed pages and never trigger growth).
            store.put(f"zz_big{i}", big)
    results = [q.get(timeout=90) for q in queues]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert store.map_size > 128 * 1024
    for pid, checked, errors, n_lengths in results:
        assert errors == [], f"reader {pid}: {errors}"
        assert checked >= n
        assert n_lengths > 1, f"reader {pid} did not read while the writer appended"
    assert len({r[0] for r in results} | {os.getpid()}) == 5


def test_load_mask_png_rejects_non_images(tmp_path):
    bad = tmp_path / "b9_valid.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="b9_valid.png"):
        load_mask_png(bad)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_mask_png(tmp_path / "missing.png")


def test_import_real_sample_masks_gives_their_valid_fractions(tmp_path, samples_dir):
    from PIL import Image

    store = MaskStore(tmp_path / "m.lmdb")
    pngs = sorted((samples_dir / "outdoor").glob("*_valid.png"))
    assert len(pngs) >= 1
    for png in pngs:
        key = png.stem[: -len("_valid")]
        frac = store.import_mask(key, png)
        ref = np.asarray(Image.open(png))
        ref = (ref[..., 0] if ref.ndim == 3 else ref) == 255
        assert frac == pytest.approx(ref.mean(), abs=1e-12)
        assert store.valid_fraction(key) == pytest.approx(ref.mean(), abs=1e-12)
        np.testing.assert_array_equal(store.get(key), ref)
        assert store.source(key) == "imported" and not store.is_rejected(key)
    assert 0.5 < store.valid_fraction("b0") < 0.9


# ------------------------------------------------------------------------------------ damage
def flip_value_byte(path, key: bytes, db: bytes | None = None) -> None:
    """Flip one byte in the middle of the value stored under ``key`` (found in data.mdb by its bytes).
    Shared with tests/test_teacher_store.py."""
    import lmdb

    env = lmdb.open(str(path), readonly=True, max_dbs=8, lock=False)
    with env.begin() as txn:
        value = txn.get(key, db=env.open_db(db, txn=txn, create=False) if db else None)
    env.close()
    data = bytearray(Path(path, "data.mdb").read_bytes())
    at = data.find(value)
    assert at >= 0
    while at >= 0:  # every copy (an older transaction's freed page may hold one too)
        data[at + len(value) // 2] ^= 0xFF
        at = data.find(value, at + 1)
    Path(path, "data.mdb").write_bytes(bytes(data))


def test_flipped_bytes_are_reported_as_corrupt_not_returned(tmp_path, caplog):
    path = tmp_path / "m.lmdb"
    store = MaskStore(path)
    masks = {f"k{i}": np.random.default_rng(i).random((40, 81)) < 0.5 for i in range(5)}
    for k, m in masks.items():
        store.put(k, m)
    store.close()
    flip_value_byte(path, b"k2", b"masks")

    ro = MaskStore(path, readonly=True)
    with caplog.at_level("WARNING", logger="sharding.lmdb_base"):
        assert ro.get("k2") is None and ro.entry("k2") is None and "k2" not in ro
    assert ro.corrupt == 1 and list(ro.corrupt_keys) == ["k2"] and "checksum" in ro.corrupt_keys["k2"]
    assert sum("'k2' is corrupt" in r.getMessage() for r in caplog.records) == 1  # logged once, with the key
    with pytest.raises(KeyError, match="'k2' is corrupt"):
        ro.valid_fraction("k2")
    for k in ("k0", "k1", "k3", "k4"):  # the others are untouched
        np.testing.assert_array_equal(ro.get(k), masks[k])
    s = ro.summary()
    assert (s["entries"], s["corrupt"], s["corrupt_keys"]) == (4, 1, ["k2"])
    assert ro.keys() == sorted(masks) and len(ro) == 5  # the key is still listed; its value is not trusted
    ro.close()
    rw = MaskStore(path)  # rewriting the entry heals it
    rw.put("k2", masks["k2"])
    np.testing.assert_array_equal(rw.get("k2"), masks["k2"])
    assert rw.corrupt == 0


def test_truncated_store_is_a_user_error_naming_the_store_not_sigbus(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "m.lmdb"
    store = MaskStore(path)
    for i in range(30):
        store.put(f"k{i:02d}", np.random.default_rng(i).random((200, 400)) < 0.5)
    store.close()
    data = path / "data.mdb"
    os.truncate(data, data.stat().st_size // 2)
    code = ("import sys\nfrom sharding import cli\nfrom sharding.mask_store import MaskStore\n"
            "sys.exit(cli.run(lambda a: len(MaskStore(a[0], readonly=True).keys()) and 0))")
    for extra in ([], ["--writable"]):
        if extra:
            code = code.replace("readonly=True", "readonly=False")
        p = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                           cwd=Path(__file__).resolve().parents[1])
        assert p.returncode == 2, (p.returncode, p.stderr[-800:])
        assert f"error: mask store {path}" in p.stderr and "truncated" in p.stderr
        assert "shared memory" not in p.stderr


def test_missing_store_and_mismatch_are_user_errors(tmp_path):
    from sharding.cli import UserError

    with pytest.raises(UserError, match="mask store not found at .*nowhere.lmdb"):
        MaskStore(tmp_path / "nowhere.lmdb", readonly=True)
    store = MaskStore(tmp_path / "m.lmdb")
    store.set_metadata({"detector": "a", "box_threshold": 0.3})
    with pytest.raises(UserError, match=r"(?s)mask store .*m.lmdb .*1 field\(s\) differ.*detector: store has 'a'"):
        store.check_metadata({"detector": "b", "box_threshold": 0.3})


def test_a_store_without_checksums_is_refused(tmp_path):
    """A store of the first format (no format record, no checksums) is named and refused, not misread."""
    import lmdb

    from sharding.lmdb_base import StoreMismatchError

    env = lmdb.open(str(tmp_path / "old.lmdb"), max_dbs=4)
    db = env.open_db(b"masks")
    env.open_db(b"rejected")
    env.open_db(b"meta")
    with env.begin(write=True) as txn:
        txn.put(b"k", b"PDM1 old layout", db=db)
    env.close()
    with pytest.raises(StoreMismatchError, match="old.lmdb holds data but no format record.*older"):
        MaskStore(tmp_path / "old.lmdb", readonly=True).keys()
    with pytest.raises(StoreMismatchError, match="not a mask store"):
        PseudoLabelLike = __import__("teacher_server.store", fromlist=["PseudoLabelStore"]).PseudoLabelStore
        PseudoLabelLike(tmp_path / "p.lmdb", header={"format": "panodistill-pseudo-labels", "face_size": 4,
                                                     "rotations": 1}).close()
        MaskStore(tmp_path / "p.lmdb", readonly=True).keys()
