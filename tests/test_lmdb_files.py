"""sharding.lmdb_files: the truncated-file check (instead of SIGBUS) and the atomic store swap."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lmdb
import pytest

from sharding import lmdb_files as F
from sharding.cli import UserError
from sharding.lmdb_base import StoreDamagedError


def _fill(path: Path, n: int = 60, size: int = 5000) -> None:
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i in range(n):
            txn.put(b"k%03d" % i, os.urandom(size))
    env.close()


def test_check_data_file_accepts_sound_and_refuses_cut_files(tmp_path):
    _fill(tmp_path / "s")
    data = tmp_path / "s" / "data.mdb"
    F.check_data_file(tmp_path / "s", "test store")  # sound: silent
    full = data.stat().st_size
    for cut, what in ((full // 2, "last committed transaction"), (4096 + 10, "meta pages"), (100, "truncated"),
                      (0, "not an LMDB data file")):
        os.truncate(data, cut)
        with pytest.raises(StoreDamagedError, match=what) as err:
            F.check_data_file(tmp_path / "s", "test store")
        assert isinstance(err.value, UserError) and f"test store {tmp_path / 's'}" in str(err.value)
    data.write_bytes(b"x" * 9000)
    with pytest.raises(StoreDamagedError, match="not an LMDB data file"):
        F.check_data_file(tmp_path / "s", "test store")


def test_a_cut_file_would_be_sigbus_without_the_check(tmp_path):
    """The hazard the check exists for: py-lmdb reading a cut file dies with SIGBUS, no message."""
    _fill(tmp_path / "s")
    data = tmp_path / "s" / "data.mdb"
    os.truncate(data, data.stat().st_size // 2)
    code = ("import lmdb, sys; env = lmdb.open(sys.argv[1], readonly=True)\n"
            "with env.begin() as t: print(sum(len(v) for _, v in t.cursor()))")
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s")], capture_output=True, timeout=60)
    assert p.returncode == -7, (p.returncode, p.stderr[-500:])  # SIGBUS


def test_swap_store_exchanges_directories(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "data.mdb").write_text("old")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "data.mdb").write_text("new")
    F.swap_store(tmp_path / "new", tmp_path / "old")
    assert (tmp_path / "old" / "data.mdb").read_text() == "new" and not (tmp_path / "new").exists()
