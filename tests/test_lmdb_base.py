"""sharding.lmdb_base: checksums, header differences, the fork gate."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time

import pytest

from sharding import lmdb_base as L
from sharding.cli import UserError


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


