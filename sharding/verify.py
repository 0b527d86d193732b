"""Shard integrity: the sha256 that ``sharding.build`` writes into ``manifest.json``, checked.

Readers (``sharding.shard_reader.iter_shard`` with ``sha256=``) call ``check_shard`` when a process first
opens a local shard. The answer is cached per ``(path, size, mtime, expected hash)``, so a shard read again
(the next epoch, a worker re-reading its shards to fill its quota) is not hashed again while its file is
unchanged; a changed file (new size or mtime) is hashed again. A shard whose hash differs is skipped whole
and reported as ``corrupt_shard`` (``sharding.format.REASONS``), every time it is opened, exactly like a
truncated shard is reported as ``truncated_shard``.

DataLoader workers are forked afresh each epoch, so a cache that lived only in a worker would be lost with
it. Workers therefore hand what they verified to the main process (``take_new`` in the worker,
``remember`` in the main process, carried in the batches' ``_stats``): the next epoch's workers are forked
with it. Remote shards are not verified (that would mean downloading them twice).

``python -m sharding.verify --manifest M [--split S]`` hashes every shard of a manifest: exit 0 when all are
intact; otherwise one line per bad shard (``bad shard <path>: <what>``) and exit 1. An invalid manifest is
a user error (exit 2).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from . import cli
from .manifest import MANIFEST, load_manifest, sha256_file

log = logging.getLogger("sharding.verify")

_cache: dict[tuple, str | None] = {}  # (abspath, size, mtime_ns, expected) -> None (intact) or the problem
_new: list[tuple[tuple, str | None]] = []  # verified in this process since the last take_new()


def _stamp(path: str, expected: str) -> tuple:
    st = os.stat(path)
    return os.path.abspath(path), st.st_size, st.st_mtime_ns, expected


def check_shard(path: str | os.PathLike, expected: str) -> str | None:
    """None when the file's sha256 is ``expected``, else what is wrong (one line, naming both digests).
    Cached per (path, size, mtime, expected): the file is read at most once while it is unchanged."""
    path = os.fspath(path)
    try:
        key = _stamp(path, expected)
    except OSError as exc:
        return f"cannot stat: {exc}"
    if key in _cache:
        return _cache[key]
    try:
        got = sha256_file(path)
        problem = None if got == expected else \
            f"sha256 {got[:16]}... differs from the manifest's {expected[:16]}... (the stored bytes changed)"
    except OSError as exc:
        problem = f"cannot read: {exc}"
    _cache[key] = problem
    _new.append((key, problem))
    return problem


def take_new() -> list[tuple[tuple, str | None]]:
    """The verification results of this process since the last call (to send to the parent process)."""
    out = list(_new)
    _new.clear()
    return out


def remember(entries) -> None:
    """Adopt results verified in another process (a DataLoader worker); inherited by later forks."""
    for key, problem in entries or ():
        _cache[tuple(key)] = problem


def clear_cache() -> None:
    """Forget every result (benchmarks; tests)."""
    _cache.clear()
    _new.clear()


def verify_manifest(manifest: str | os.PathLike, split: str | None = None) -> tuple[int, list[tuple[str, str]]]:
    """Hash every shard of ``manifest`` (or of one ``split``): (shards checked, [(shard path, problem)]).
    Always reads the files (the cache is bypassed). ``ManifestError`` for an invalid manifest."""
    mpath = Path(manifest)
    if mpath.is_dir():
        mpath = mpath / MANIFEST
    m = load_manifest(mpath)
    splits = m["splits"]
    if split is not None and split not in splits:
        raise cli.UserError(f"{mpath} has no split {split!r} (it has {', '.join(sorted(splits))})")
    bad, n = [], 0
    for name in [split] if split is not None else list(splits):
        for sh in splits[name]["shards"]:
            path = mpath.parent / sh["path"]
            n += 1
            if not path.is_file():
                bad.append((str(path), "missing"))
                continue
            try:
                got = sha256_file(path)
            except OSError as exc:
                bad.append((str(path), f"cannot read: {exc}"))
                continue
            if got != sh["sha256"]:
                bad.append((str(path), f"sha256 {got} differs from the manifest's {sh['sha256']}"))
    return n, bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sharding.verify",
                                description="Check every shard of a manifest against its sha256: exit 0 when "
                                            "all are intact, else one line per bad shard and exit 1.")
    p.add_argument("--manifest", required=True, help="manifest.json (or the folder holding it)")
    p.add_argument("--split", default=None, help="check only this split")
    cli.add_common_arguments(p)
    args = p.parse_args(argv)
    cli.setup_logging(args.log_level)
    n, bad = verify_manifest(args.manifest, args.split)
    for path, problem in bad:
        print(f"bad shard {path}: {problem}")
    if bad:
        print(f"{len(bad)} of {n} shard(s) are damaged or missing", file=sys.stderr)
        return 1
    print(f"ok: {n} shard(s) match their sha256")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
