"""sharding.lmdb_base: checksums, the truncated-file check, header differences, the fork gate."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import lmdb
import pytest

from sharding import lmdb_base as L
from sharding.cli import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_pack_unpack_round_trip_and_flipped_bytes():
    payload = bytes(range(256)) * 3
    blob = L.pack(payload)
    assert len(blob) == len(payload) + 4 and bytes(L.unpack(blob)) == payload
    for i in (0, 3, 4, 100, len(blob) - 1):  # the checksum itself or the payload
        bad = bytearray(blob)
        bad[i] ^= 0x40
        with pytest.raises(L.CorruptValue, match="checksum mismatch"):
            L.unpack(bytes(bad))
    with pytest.raises(L.CorruptValue, match="shorter"):
        L.unpack(b"ab")


def _fill(path: Path, n: int = 60, size: int = 5000) -> None:
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i in range(n):
            txn.put(b"k%03d" % i, os.urandom(size))
    env.close()


def test_check_data_file_accepts_sound_and_refuses_cut_files(tmp_path):
    _fill(tmp_path / "s")
    data = tmp_path / "s" / "data.mdb"
    L.check_data_file(tmp_path / "s", "test store")  # sound: silent
    full = data.stat().st_size
    for cut, what in ((full // 2, "last committed transaction"), (4096 + 10, "meta pages"), (100, "truncated"),
                      (0, "not an LMDB data file")):
        os.truncate(data, cut)
        with pytest.raises(L.StoreDamagedError, match=what) as err:
            L.check_data_file(tmp_path / "s", "test store")
        assert isinstance(err.value, UserError) and f"test store {tmp_path / 's'}" in str(err.value)
    data.write_bytes(b"x" * 9000)
    with pytest.raises(L.StoreDamagedError, match="not an LMDB data file"):
        L.check_data_file(tmp_path / "s", "test store")


def test_a_cut_file_would_be_sigbus_without_the_check(tmp_path):
    """The hazard the check exists for: py-lmdb reading a cut file dies with SIGBUS, no message."""
    _fill(tmp_path / "s")
    data = tmp_path / "s" / "data.mdb"
    os.truncate(data, data.stat().st_size // 2)
    code = ("import lmdb, sys; env = lmdb.open(sys.argv[1], readonly=True)\n"
            "with env.begin() as t: print(sum(len(v) for _, v in t.cursor()))")
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s")], capture_output=True, timeout=60)
    assert p.returncode == -7, (p.returncode, p.stderr[-500:])  # SIGBUS


def test_differences_and_mismatch_message_name_store_and_fields():
    stored = {"a": 1, "b": [1, 2], "c": "x"}
    diffs = L.differences(stored, {"a": 1, "b": (1, 2), "c": "y", "d": 0})
    assert diffs == {"c": ("x", "y"), "d": ("<missing>", 0)}  # tuples equal lists after JSON
    err = L.mismatch_error("widget store", "/data/w.lmdb", diffs, "rebuild it")
    assert isinstance(err, UserError) and isinstance(err, ValueError)
    msg = str(err)
    assert msg.startswith("widget store /data/w.lmdb was made with different settings (2 field(s) differ)")
    assert "c: store has 'x', expected 'y'" in msg and "d: store has '<missing>'" in msg and "rebuild it" in msg
    close = L.differences({"v": 1.0000001}, {"v": 1.0}, same=lambda k, a, b: abs(a - b) < 1e-3)
    assert close == {}


def _fork_child(q) -> None:
    q.put("forked")


def test_fork_waits_for_open_transactions():
    """A fork started while another thread is inside a transaction happens only after it ends."""
    gate = L._GATE
    inside, release, events = threading.Event(), threading.Event(), []

    def txn():
        with gate.shared():
            inside.set()
            release.wait(10)
            events.append("txn end")

    t = threading.Thread(target=txn)
    t.start()
    inside.wait(10)
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_fork_child, args=(q,))

    def forker():
        p.start()
        events.append("forked")

    f = threading.Thread(target=forker)
    f.start()
    time.sleep(0.3)
    assert events == []  # the fork is waiting for the transaction
    release.set()
    t.join(10)
    f.join(10)
    assert events == ["txn end", "forked"] and q.get(timeout=30) == "forked"
    p.join(30)
    assert p.exitcode == 0


def test_exclusive_inside_own_transaction_is_refused():
    gate = L._Gate()
    with gate.shared():
        with pytest.raises(RuntimeError, match="inside a transaction"):
            gate.acquire_exclusive()
    with gate.exclusive():
        pass


def test_swap_store_exchanges_directories(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "data.mdb").write_text("old")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "data.mdb").write_text("new")
    L.swap_store(tmp_path / "new", tmp_path / "old")
    assert (tmp_path / "old" / "data.mdb").read_text() == "new" and not (tmp_path / "new").exists()
