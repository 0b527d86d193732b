"""``manifest.json`` and shard lists: which shards a dataset has and how many samples each holds.

The manifest (written last by ``sharding.build``, so its presence marks a complete build) is::

    {"tool": "sharding.build", "version": <pano-distill version>, "source", "input", "created",
     "splits": {split: {"count": n, "shards": [{"path": "train-000000.tar", "count": k, "sha256": hex}]}},
     "skipped": {reason: n}, "skipped_samples": [{"path", "reason", "detail"}], ...}

Shard paths are relative to the manifest's folder. ``resolve_shards`` turns what a user passes to the reader
(a manifest path or its folder plus a split, tar paths, globs, brace patterns) into ``ShardInfo`` entries
whose ``count`` comes from a manifest when one lists the shard, or from reading the tar headers.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import braceexpand

MANIFEST = "manifest.json"
SHARD_RE = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<index>\d{6})\.tar$")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def tool_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pano-distill")
    except PackageNotFoundError:
        return "unknown"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(out_dir: str | os.PathLike, manifest: dict) -> Path:
    """Write atomically (temp file + rename), so that a manifest is never half written."""
    path = Path(out_dir) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def load_manifest(path: str | os.PathLike) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST
    try:
        m = json.loads(p.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no manifest at {p}; build shards with `python -m sharding.build`") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p} is not valid JSON: {exc}") from None
    if not isinstance(m, dict) or "splits" not in m:
        raise ValueError(f"{p} is not a sharding manifest (no 'splits')")
    return m


@dataclass(frozen=True)
class ShardInfo:
    url: str  # local path (or any URL webdataset's gopen accepts)
    count: int | None  # samples in the shard; None when unknown (remote URL, not counted)


def count_tar_samples(path: str | os.PathLike) -> int:
    """Number of distinct sample keys in a local tar (reads headers only; a damaged tail ends the count)."""
    keys = set()
    try:
        with tarfile.open(path, "r:") as tf:
            for ti in tf:
                if ti.isreg():
                    base = os.path.basename(ti.name)
                    keys.add(os.path.join(os.path.dirname(ti.name), base.split(".", 1)[0]))
    except (tarfile.TarError, OSError, EOFError):
        pass
    return len(keys)


def tar_keys(path: str | os.PathLike) -> list[str]:
    """Sample keys of a local tar in order (headers only)."""
    keys: list[str] = []
    try:
        with tarfile.open(path, "r:") as tf:
            for ti in tf:
                if ti.isreg():
                    k = os.path.basename(ti.name).split(".", 1)[0]
                    if not keys or keys[-1] != k:
                        keys.append(k)
    except (tarfile.TarError, OSError, EOFError):
        pass
    return keys


def _manifest_shards(mpath: Path, split: str | None) -> list[ShardInfo]:
    m = load_manifest(mpath)
    splits = m["splits"]
    if split is None:
        if len(splits) != 1:
            raise ValueError(f"{mpath} has splits {sorted(splits)}; pass split= to choose one")
        split = next(iter(splits))
    if split not in splits:
        raise ValueError(f"{mpath} has no split {split!r} (it has {', '.join(sorted(splits)) or 'none'})")
    base = mpath.parent
    return [ShardInfo(str(base / s["path"]), int(s["count"])) for s in splits[split]["shards"]]


_counts_cache: dict[str, dict[str, int]] = {}


def _count_from_nearby_manifest(path: str) -> int | None:
    d = os.path.dirname(os.path.abspath(path))
    mp = os.path.join(d, MANIFEST)
    try:
        stamp = f"{d}@{os.stat(mp).st_mtime_ns}"
    except OSError:
        return None
    if stamp not in _counts_cache:
        counts: dict[str, int] = {}
        if os.path.isfile(mp):
            try:
                for sp in load_manifest(mp)["splits"].values():
                    for s in sp["shards"]:
                        counts[os.path.abspath(os.path.join(d, s["path"]))] = int(s["count"])
            except (ValueError, KeyError, TypeError):
                counts = {}
        _counts_cache[stamp] = counts
    return _counts_cache[stamp].get(os.path.abspath(path))


def resolve_shards(urls, split: str | None = None, *, count: bool = True) -> list[ShardInfo]:
    """Shards named by ``urls``: a ``manifest.json`` path or a folder holding one (``split`` picks the
    split), a tar path, a glob (``data/train-*.tar``), a brace pattern (``train-{000000..000009}.tar``), or a
    list of those. Counts come from the manifest next to the shards, else (``count=True``) from the tar
    headers of local files. Raises ``ValueError`` when nothing matches."""
    items = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    shards: list[ShardInfo] = []
    for item in items:
        item = os.fspath(item)
        p = Path(item)
        if p.name == MANIFEST or (p.is_dir() and (p / MANIFEST).is_file()):
            shards.extend(_manifest_shards(p if p.name == MANIFEST else p / MANIFEST, split))
            continue
        if p.is_dir():
            raise ValueError(f"{p} is a folder without {MANIFEST}; pass its tar files (e.g. '{p}/*.tar')")
        expanded = []
        for e in braceexpand.braceexpand(item):
            if any(c in e for c in "*?[") and "://" not in e and not e.startswith("pipe:"):
                matched = sorted(glob.glob(e))
                if not matched:
                    raise ValueError(f"no shards match {e!r}")
                expanded.extend(matched)
            else:
                expanded.append(e)
        for e in expanded:
            local = "://" not in e and not e.startswith("pipe:")
            if local and not os.path.isfile(e):
                raise ValueError(f"shard {e} does not exist")
            n = _count_from_nearby_manifest(e) if local else None
            if n is None and local and count:
                n = count_tar_samples(e)
            shards.append(ShardInfo(e, n))
    if not shards:
        raise ValueError(f"no shards in {urls!r}")
    return shards
