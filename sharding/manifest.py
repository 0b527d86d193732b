"""``manifest.json`` and shard lists: which shards a dataset has and how many samples each holds.

The manifest (written last by ``sharding.build``, so its presence marks a complete build) is::

    {"tool": "sharding.build", "version": <pano-distill version>, "source", "input", "created",
     "splits": {split: {"count": n, "shards": [{"path": "train-000000.tar", "count": k, "sha256": hex}]}},
     "skipped": {reason: n}, "skipped_samples": [{"path", "reason", "detail"}], ...}

Shard paths are relative to the manifest's folder. ``load_manifest`` validates what readers rely on
(``validate_manifest``: non-empty splits, integer counts that add up, relative paths, real sha256 digests)
and raises ``ManifestError`` -- a ``sharding.cli.UserError`` naming the file and the problem -- otherwise.
``resolve_shards`` turns what a user passes to the reader (a manifest path or its folder plus a split, tar
paths, globs, brace patterns, remote URLs) into ``ShardInfo`` entries whose ``count`` and ``sha256`` come
from a manifest when one lists the shard (else the count from the tar headers, and no hash).
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

from .addresses import check_address, is_local, local_path
from .cli import UserError

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


class ManifestError(UserError, ValueError):
    """A ``manifest.json`` that cannot be used; the message names the file and what is wrong."""


_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def validate_manifest(m, path: str | os.PathLike) -> dict:
    """Check the structure a reader relies on; raise ``ManifestError`` naming ``path`` and the problem.

    Required: ``splits`` (a non-empty object); per split ``count`` (an integer >= 0, the sum of its shards'
    counts) and ``shards`` (a non-empty list); per shard ``path`` (relative, inside the manifest's folder),
    ``count`` (an integer >= 0) and ``sha256`` (64 lower-case hex digits, not all zeros: a manifest whose
    hashes were blanked cannot vouch for its shards)."""
    def bad(what: str) -> ManifestError:
        return ManifestError(f"invalid manifest {path}: {what}")

    if not isinstance(m, dict):
        raise bad(f"expected a JSON object, got {type(m).__name__}")
    if "splits" not in m:
        raise bad("no 'splits' (is this a sharding manifest?)")
    splits = m["splits"]
    if not isinstance(splits, dict) or not splits:
        raise bad(f"'splits' must be a non-empty object, got {splits!r:.80}")
    for name, sp in splits.items():
        if not isinstance(sp, dict):
            raise bad(f"split {name!r} must be an object, got {sp!r:.80}")
        for field_ in ("count", "shards"):
            if field_ not in sp:
                raise bad(f"split {name!r} has no {field_!r}")
        if not _is_count(sp["count"]):
            raise bad(f"split {name!r}: count {sp['count']!r} is not an integer >= 0")
        shards = sp["shards"]
        if not isinstance(shards, list) or not shards:
            raise bad(f"split {name!r} lists no shards")
        for i, sh in enumerate(shards):
            where = f"split {name!r}, shard {i}"
            if not isinstance(sh, dict):
                raise bad(f"{where} must be an object, got {sh!r:.80}")
            for field_ in ("path", "count", "sha256"):
                if field_ not in sh:
                    raise bad(f"{where} has no {field_!r}")
            p = sh["path"]
            if not isinstance(p, str) or not p or os.path.isabs(p) or ".." in Path(p).parts:
                raise bad(f"{where}: path {p!r} must be a file name relative to the manifest's folder")
            if not _is_count(sh["count"]):
                raise bad(f"{where} ({p}): count {sh['count']!r} is not an integer >= 0")
            h = sh["sha256"]
            if not isinstance(h, str) or not _SHA256_RE.match(h) or not h.strip("0"):
                raise bad(f"{where} ({p}): sha256 {h!r} is not a sha256 hex digest (64 hex digits, not all "
                          f"zeros); rebuild with `python -m sharding.build`")
        total = sum(sh["count"] for sh in shards)
        if total != sp["count"]:
            raise bad(f"split {name!r}: count {sp['count']} but its shards hold {total}")
    return m


def load_manifest(path: str | os.PathLike) -> dict:
    """Read and validate a manifest (``path`` or a folder holding ``manifest.json``); ``ManifestError`` (a
    ``sharding.cli.UserError``) naming the file when it is missing, not JSON or not a valid manifest."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST
    try:
        m = json.loads(p.read_text())
    except FileNotFoundError:
        raise ManifestError(f"no manifest at {p}; build shards with `python -m sharding.build`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"cannot read manifest {p}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ManifestError(f"invalid manifest {p}: not valid JSON ({exc})") from None
    return validate_manifest(m, p)


@dataclass(frozen=True)
class ShardInfo:
    url: str  # a shard address (``sharding.addresses``): local path or remote URL
    count: int | None  # samples in the shard; None when unknown (remote URL, not counted)
    sha256: str | None = None  # from a manifest; None when no manifest lists the shard


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
            raise ManifestError(f"{mpath} has splits {sorted(splits)}; pass split= to choose one")
        split = next(iter(splits))
    if split not in splits:
        raise ManifestError(f"{mpath} has no split {split!r} (it has {', '.join(sorted(splits))})")
    base = mpath.parent
    return [ShardInfo(str(base / s["path"]), s["count"], s["sha256"]) for s in splits[split]["shards"]]


_nearby_cache: dict[str, dict[str, tuple[int, str]]] = {}


def _from_nearby_manifest(path: str) -> tuple[int | None, str | None]:
    """(count, sha256) of a local shard from the manifest in its folder, if one lists it."""
    d = os.path.dirname(os.path.abspath(path))
    mp = os.path.join(d, MANIFEST)
    try:
        stamp = f"{d}@{os.stat(mp).st_mtime_ns}"
    except OSError:
        return None, None
    if stamp not in _nearby_cache:
        entries: dict[str, tuple[int, str]] = {}
        for sp in load_manifest(mp)["splits"].values():
            for s in sp["shards"]:
                entries[os.path.abspath(os.path.join(d, s["path"]))] = (s["count"], s["sha256"])
        _nearby_cache[stamp] = entries
    return _nearby_cache[stamp].get(os.path.abspath(path), (None, None))


def resolve_shards(urls, split: str | None = None, *, count: bool = True, allow_pipe: bool = False
                   ) -> list[ShardInfo]:
    """Shards named by ``urls``: a ``manifest.json`` path or a folder holding one (``split`` picks the
    split), a tar path, a glob (``data/train-*.tar``), a brace pattern (``train-{000000..000009}.tar``), a
    remote URL, or a list of those. Counts and sha256 come from the manifest next to the shards, else
    (``count=True``) counts from the tar headers of local files. ``pipe:`` addresses are refused with a
    ``UserError`` unless ``allow_pipe`` (``sharding.addresses``); an invalid manifest raises
    ``ManifestError``. Raises ``ValueError`` when nothing matches."""
    items = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    shards: list[ShardInfo] = []
    for item in items:
        item = os.fspath(item)
        check_address(item, allow_pipe=allow_pipe)  # before expanding or globbing anything
        if not is_local(item):
            shards.extend(ShardInfo(check_address(e, allow_pipe=allow_pipe), None)
                          for e in braceexpand.braceexpand(item))
            continue
        p = Path(local_path(item))
        if p.name == MANIFEST or (p.is_dir() and (p / MANIFEST).is_file()):
            shards.extend(_manifest_shards(p if p.name == MANIFEST else p / MANIFEST, split))
            continue
        if p.is_dir():
            raise ValueError(f"{p} is a folder without {MANIFEST}; pass its tar files (e.g. '{p}/*.tar')")
        for e in braceexpand.braceexpand(item):
            matched = [e]
            if any(c in e for c in "*?["):
                matched = sorted(glob.glob(local_path(e)))
                if not matched:
                    raise ValueError(f"no shards match {e!r}")
            for path in matched:
                if not os.path.isfile(local_path(path)):
                    raise ValueError(f"shard {path} does not exist")
                n, sha = _from_nearby_manifest(local_path(path))
                if n is None and count:
                    n = count_tar_samples(local_path(path))
                shards.append(ShardInfo(path, n, sha))
    if not shards:
        raise ValueError(f"no shards in {urls!r}")
    return shards
