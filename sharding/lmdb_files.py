"""File-level operations on LMDB store directories: the truncated-file check and the atomic swap.

Part of :mod:`sharding.lmdb_base` (which re-exports both); kept apart because they read and rename files
and never open an environment.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import struct
from pathlib import Path

_META_MAGIC = 0xBEEFC0DE
_PAGE_HEADER = 16  # MDB_page header on 64-bit builds (pgno 8, pad 2, flags 2, lower 2, upper 2)


def check_data_file(path: str | os.PathLike, what: str) -> None:
    """Refuse a truncated ``data.mdb`` before it is memory-mapped (reading past its end would be SIGBUS).

    Reads both meta pages, takes the one with the newer transaction id and checks that the file holds
    every page up to its ``mm_last_pg``. ``what`` names the store in the message ("mask store", ...)."""
    from sharding.lmdb_base import StoreDamagedError  # defined there, with the other store errors

    data = Path(path) / "data.mdb"
    try:
        size = data.stat().st_size
        with open(data, "rb") as f:
            head = f.read(_PAGE_HEADER + 136)
            metas = []
            if len(head) == _PAGE_HEADER + 136:
                metas.append(_parse_meta(head))
                psize = metas[0][1]
                if psize >= 512:
                    f.seek(psize)
                    second = f.read(_PAGE_HEADER + 136)
                    if len(second) == _PAGE_HEADER + 136:
                        metas.append(_parse_meta(second))
    except OSError as exc:
        raise StoreDamagedError(f"{what} {path}: cannot read {data}: {exc}") from exc
    good = [m for m in metas if m[0] == _META_MAGIC and m[1] >= 512]
    if size == 0 or not good:
        raise StoreDamagedError(f"{what} {path}: {data} ({size} bytes) is not an LMDB data file or is truncated "
                                "before its meta pages; rebuild the store")
    _, psize, last_pg, txnid = max(good, key=lambda m: m[3])
    if len(good) < 2 or size < 2 * psize:
        raise StoreDamagedError(f"{what} {path}: {data} is truncated ({size} bytes, shorter than its two "
                                f"{psize}-byte meta pages); rebuild the store")
    need = (last_pg + 1) * psize
    if size < need:
        raise StoreDamagedError(
            f"{what} {path}: {data} is truncated: {size} bytes, but its last committed transaction "
            f"({txnid}) uses pages up to {last_pg} ({need} bytes). The file was cut (disk full, an "
            "interrupted copy?); restore it or rebuild the store")


def _parse_meta(page: bytes) -> tuple[int, int, int, int]:
    """(magic, page size, last page number, transaction id) of one LMDB meta page."""
    m = page[_PAGE_HEADER:]
    magic = struct.unpack_from("<I", m, 0)[0]
    psize = struct.unpack_from("<I", m, 24)[0]  # mm_dbs[FREE_DBI].md_pad holds the page size
    last_pg, txnid = struct.unpack_from("<QQ", m, 120)
    return magic, psize, last_pg, txnid


def swap_store(new: str | os.PathLike, old: str | os.PathLike) -> None:
    """Put the store directory ``new`` in place of ``old`` atomically (Linux ``renameat2(RENAME_EXCHANGE)``:
    at every moment ``old`` names a complete store), then delete what was there. Where the exchange is not
    available, two renames leave a moment with no store (never a half-written one)."""
    new, old = os.fspath(new), os.fspath(old)
    exchanged = False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = getattr(libc, "renameat2", None)
        if renameat2 is not None:
            at_fdcwd, rename_exchange = -100, 2
            exchanged = renameat2(at_fdcwd, new.encode(), at_fdcwd, old.encode(), rename_exchange) == 0
    except OSError:
        exchanged = False
    if exchanged:  # ``new`` now holds the old store
        shutil.rmtree(new)
        return
    aside = f"{old}.replaced-{os.getpid()}"
    os.rename(old, aside)
    os.rename(new, old)
    shutil.rmtree(aside)
