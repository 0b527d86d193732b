"""LMDB store of per-panorama validity masks (True = valid pixel), written by ``python -m sharding.masks``.

One entry per sample key, in one LMDB environment (a directory holding ``data.mdb`` and ``lock.mdb``) with
three named databases:

* ``masks``: ``key -> header + np.packbits(mask)``. The header holds the mask's shape, its valid fraction
  and where it came from (``"model"``: GroundingDINO + SAM, ``"imported"``: a mask that arrived with the
  data, ``"combined"``: both, ANDed). Masks are stored at the panorama's native resolution; a reader that
  works at another resolution resizes them (nearest neighbour).
* ``rejected``: ``key -> JSON {"valid_fraction", "min_valid"}`` for panoramas whose valid fraction is below
  ``min_valid`` (default 0.2, Depth Anywhere's "under 20% valid pixels"). Their mask is stored as well.
* ``meta``: the store's metadata (models, thresholds, prompts, ``min_valid``), so that a store made with
  other settings is noticed (:meth:`MaskStore.check_metadata`), and the format record.

Every value carries a crc32 (:mod:`sharding.lmdb_base`): a corrupt mask is not returned but skipped and
counted (:attr:`MaskStore.corrupt`, :attr:`MaskStore.corrupt_keys`); ``key in store`` is False for it, so
``python -m sharding.masks`` redoes it. A mask, its fraction and its rejected flag are written in one
transaction: a writer that dies part-way leaves either the whole entry or nothing.

Processes: see :mod:`sharding.lmdb_base` (one environment per process and path, reopened after ``fork``;
the store pickles without it), so a store can be handed to DataLoader workers and Ray actors, which read
concurrently while one writer appends. Readers of a store that nothing writes any more may pass
``lock=False`` (faster, see docs/DESIGN.md); while a writer is active keep the default ``lock=True``.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from sharding.lmdb_base import LmdbStore, differences, mismatch_error, pack

log = logging.getLogger(__name__)

DEFAULT_MIN_VALID = 0.2
DEFAULT_MAP_SIZE = 1 << 30  # 1 GiB to start with; grows by doubling when full (sparse on Linux)
FORMAT_VERSION = 2  # 2: every value carries a crc32

_MAGIC = b"PDM1"
_HEADER = struct.Struct("<4sIIdH")  # magic, height, width, valid fraction, length of the source string
_DB_MASKS = b"masks"
_DB_REJECTED = b"rejected"
_DB_META = b"meta"
_META_KEY = b"metadata"
_MAX_KEY_BYTES = 500  # LMDB's default key limit is 511 bytes


@dataclass(frozen=True)
class MaskEntry:
    """One stored entry: the boolean mask (H, W), its valid fraction, its source and its rejected flag."""

    key: str
    mask: np.ndarray
    valid_fraction: float
    source: str
    rejected: bool


def _encode(mask: np.ndarray, fraction: float, source: str) -> bytes:
    h, w = mask.shape
    src = source.encode("utf-8")
    return _HEADER.pack(_MAGIC, h, w, fraction, len(src)) + src + np.packbits(mask, axis=None).tobytes()


def _decode_header(key: str, buf: bytes | memoryview) -> tuple[int, int, float, str, int]:
    if len(buf) < _HEADER.size:
        raise ValueError(f"mask store entry {key!r} is corrupt: {len(buf)} bytes, shorter than its header")
    magic, h, w, fraction, slen = _HEADER.unpack_from(buf, 0)
    if magic != _MAGIC:
        raise ValueError(f"mask store entry {key!r} is corrupt: bad magic {bytes(magic)!r}")
    start = _HEADER.size + slen
    source = bytes(buf[_HEADER.size:start]).decode("utf-8")
    need = (h * w + 7) // 8
    if len(buf) - start != need:
        raise ValueError(
            f"mask store entry {key!r} is corrupt: {len(buf) - start} bytes of mask for shape ({h}, {w}), "
            f"expected {need}"
        )
    return h, w, fraction, source, start


def _decode_mask(key: str, buf: bytes | memoryview) -> tuple[np.ndarray, float, str]:
    h, w, fraction, source, start = _decode_header(key, buf)
    bits = np.frombuffer(buf, dtype=np.uint8, offset=start)
    mask = np.unpackbits(bits, count=h * w).reshape(h, w).astype(bool)
    return mask, fraction, source


def _as_mask(key: str, mask: Any) -> np.ndarray:
    arr = np.asarray(mask.detach().cpu().numpy() if hasattr(mask, "detach") else mask)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"mask for {key!r} must be a non-empty (H, W) or (1, H, W) array, got shape {arr.shape}")
    if arr.dtype != bool:
        if arr.dtype.kind not in "biuf" or not np.isin(arr, (0, 1)).all():
            raise ValueError(
                f"mask for {key!r} must be boolean (True = valid) or 0/1, got dtype {arr.dtype} with other values"
            )
        arr = arr.astype(bool)
    return np.ascontiguousarray(arr)


def _key_bytes(key: str) -> bytes:
    if not isinstance(key, str) or not key:
        raise ValueError(f"mask store keys are non-empty strings, got {key!r}")
    b = key.encode("utf-8")
    if len(b) > _MAX_KEY_BYTES:
        raise ValueError(f"mask store key is too long ({len(b)} bytes > {_MAX_KEY_BYTES}): {key[:60]!r}...")
    return b


def load_mask_png(path: str | os.PathLike) -> np.ndarray:
    """Read a validity mask PNG (255 = valid, 0 = invalid; grey, RGB or RGBA) as a bool (H, W) array with
    ``sharding.format``'s mask decoder (values >= 128 are valid). ``ValueError`` names an unreadable file."""
    from sharding import format as fmt

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"mask file not found: {p}")
    decode = getattr(fmt, "decode_mask", None) or fmt.decode_mask_png
    try:
        arr = decode(p.read_bytes())
    except fmt.SampleError as exc:
        raise ValueError(f"cannot read mask image {p}: {exc}") from exc
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"mask image {p} has an unexpected shape {arr.shape}")
    return arr


class MaskStore(LmdbStore):
    """Boolean validity masks in LMDB, keyed by sample key; see the module docstring.

    ``MaskStore(path, readonly=False, map_size=DEFAULT_MAP_SIZE, min_valid=None, lock=True)``.
    ``min_valid`` (the rejection threshold) defaults to the store's metadata, else 0.2.
    """

    WHAT = "mask store"
    FORMAT = "pano-distill-masks"
    VERSION = FORMAT_VERSION
    DBS = (_DB_MASKS, _DB_REJECTED, _DB_META)
    FORMAT_DB = _DB_META
    CREATE_HINT = "create it with `python -m sharding.masks --store PATH ...`"

    def __init__(self, path: str | os.PathLike, readonly: bool = False, map_size: int = DEFAULT_MAP_SIZE,
                 min_valid: float | None = None, lock: bool = True) -> None:
        if min_valid is not None and not 0.0 <= float(min_valid) <= 1.0:
            raise ValueError(f"min_valid must be in [0, 1], got {min_valid}")
        super().__init__(path, readonly=readonly, map_size=map_size, lock=lock)
        self._min_valid_arg = None if min_valid is None else float(min_valid)
        self._min_valid: float | None = self._min_valid_arg

    def _is_empty(self, txn: Any, dbs: dict) -> bool:
        return all(txn.stat(dbs[name])["entries"] == 0 for name in self.DBS)

    def _opened(self) -> None:
        if self._min_valid_arg is None:
            stored = self.metadata.get("min_valid")
            self._min_valid = float(stored) if stored is not None else DEFAULT_MIN_VALID

    def __repr__(self) -> str:
        return f"MaskStore({self.path!r}, {'readonly' if self.readonly else 'read-write'})"

    # ------------------------------------------------------------------ writing
    @property
    def min_valid(self) -> float:
        if self._min_valid is None:
            self._handle()
        assert self._min_valid is not None
        return self._min_valid

    def put(self, key: str, mask: Any, source: str = "model") -> float:
        """Store ``mask`` (bool (H, W) or (1, H, W), True = valid) under ``key``; returns its valid fraction.

        A mask whose valid fraction is below :attr:`min_valid` also records ``key`` as rejected; storing a
        key again replaces its mask and its rejected flag. All of it happens in one transaction.
        """
        kb = _key_bytes(key)
        arr = _as_mask(key, mask)
        fraction = float(arr.mean())
        value = pack(_encode(arr, fraction, source))
        min_valid = self.min_valid
        rejected = fraction < min_valid
        flag = pack(json.dumps({"valid_fraction": fraction, "min_valid": min_valid}).encode())

        def txn_fn(txn: Any, dbs: dict) -> None:
            txn.put(kb, value, db=dbs[_DB_MASKS])
            if rejected:
                txn.put(kb, flag, db=dbs[_DB_REJECTED])
            else:
                txn.delete(kb, db=dbs[_DB_REJECTED])

        self._write(txn_fn)
        self.corrupt_keys.pop(key, None)
        return fraction

    def import_mask(self, key: str, png_path: str | os.PathLike) -> float:
        """Store the mask PNG that arrived with the data (255 = valid) as is, with source ``"imported"``."""
        return self.put(key, load_mask_png(png_path), source="imported")

    def delete(self, key: str) -> bool:
        """Remove ``key`` (mask and rejected flag); returns whether it was there."""
        kb = _key_bytes(key)

        def txn_fn(txn: Any, dbs: dict) -> bool:
            txn.delete(kb, db=dbs[_DB_REJECTED])
            return bool(txn.delete(kb, db=dbs[_DB_MASKS]))

        return self._write(txn_fn)

    # ------------------------------------------------------------------ reading
    def _checked(self, key: str, buf: Any, decode: Any) -> Any:
        """``decode(key, payload)`` of a stored value; None (counted as corrupt) if it fails its checks."""
        payload = self._payload(key, buf)
        if payload is None:
            return None
        try:
            return decode(key, payload)
        except ValueError as exc:  # the checksum matched, the layout did not: written by something else
            self._mark_corrupt(key, str(exc))
            return None

    def get(self, key: str) -> np.ndarray | None:
        """The stored mask, bool (H, W), True = valid; ``None`` if ``key`` is not stored or is corrupt."""
        kb = _key_bytes(key)
        res = self._read(lambda txn, dbs: self._checked(key, txn.get(kb, db=dbs[_DB_MASKS]), _decode_mask))
        return None if res is None else res[0]

    def entry(self, key: str) -> MaskEntry | None:
        """Mask, valid fraction, source and rejected flag of ``key`` (one transaction); None if absent/corrupt."""
        kb = _key_bytes(key)

        def fn(txn: Any, dbs: dict) -> MaskEntry | None:
            res = self._checked(key, txn.get(kb, db=dbs[_DB_MASKS]), _decode_mask)
            if res is None:
                return None
            rejected = txn.get(kb, db=dbs[_DB_REJECTED]) is not None
            return MaskEntry(key, res[0], res[1], res[2], rejected)

        return self._read(fn)

    def _header_field(self, key: str, index: int) -> Any:
        kb = _key_bytes(key)
        value = self._read(lambda txn, dbs: self._checked(key, txn.get(kb, db=dbs[_DB_MASKS]), _decode_header))
        if value is None:
            state = "corrupt" if key in self.corrupt_keys else "not"
            raise KeyError(f"{key!r} is {state} in the mask store {self.path}")
        return value[index]

    def valid_fraction(self, key: str) -> float:
        """The stored valid fraction of ``key`` (read from the header; the mask is not unpacked)."""
        return self._header_field(key, 2)

    def source(self, key: str) -> str:
        """Where the mask of ``key`` came from: ``"model"``, ``"imported"`` or ``"combined"``."""
        return self._header_field(key, 3)

    def __contains__(self, key: object) -> bool:
        """True when ``key`` has a sound entry (a corrupt one is counted and reported as absent)."""
        if not isinstance(key, str):
            return False
        kb = _key_bytes(key)
        return self._read(lambda txn, dbs: self._payload(key, txn.get(kb, db=dbs[_DB_MASKS])) is not None)

    def is_rejected(self, key: str) -> bool:
        kb = _key_bytes(key)
        return self._read(lambda txn, dbs: txn.get(kb, db=dbs[_DB_REJECTED]) is not None)

    def rejected(self) -> list[str]:
        """Keys of the stored panoramas with a valid fraction below ``min_valid``, sorted."""
        return self._read(lambda txn, dbs: [bytes(k).decode() for k in txn.cursor(db=dbs[_DB_REJECTED]).iternext(values=False)])

    def keys(self) -> list[str]:
        """All stored keys, sorted (LMDB order); corrupt entries included (their values are not read)."""
        return self._read(lambda txn, dbs: [bytes(k).decode() for k in txn.cursor(db=dbs[_DB_MASKS]).iternext(values=False)])

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return self._read(lambda txn, dbs: txn.stat(dbs[_DB_MASKS])["entries"])

    def summary(self) -> dict:
        """Counts for reports: entries, rejected, entries per source, mean valid fraction, corrupt entries."""

        def fn(txn: Any, dbs: dict) -> dict:
            by_source: dict[str, int] = {}
            total, fsum, bad = 0, 0.0, []
            for k, v in txn.cursor(db=dbs[_DB_MASKS]):
                key = bytes(k).decode()
                head = self._checked(key, v, _decode_header)
                if head is None:
                    bad.append(key)
                    continue
                by_source[head[3]] = by_source.get(head[3], 0) + 1
                total += 1
                fsum += head[2]
            return {"entries": total, "rejected": txn.stat(dbs[_DB_REJECTED])["entries"], "by_source": by_source,
                    "mean_valid_fraction": fsum / total if total else None, "corrupt": len(bad),
                    "corrupt_keys": bad}

        return self._read(fn)

    # ------------------------------------------------------------------ metadata
    @property
    def metadata(self) -> dict:
        """The models and thresholds that made this store (``{}`` for a new store)."""

        def fn(txn: Any, dbs: dict) -> dict | None:
            raw = txn.get(_META_KEY, db=dbs[_DB_META])
            if raw is None:
                return {}
            payload = self._payload("<metadata>", raw)
            return None if payload is None else json.loads(bytes(payload).decode("utf-8"))

        meta = self._read(fn)
        if meta is None:
            from sharding.lmdb_base import StoreDamagedError

            raise StoreDamagedError(f"mask store {self.path}: its metadata record is corrupt; rebuild the store")
        return meta

    def set_metadata(self, metadata: dict) -> None:
        """Replace the metadata. ``min_valid`` is always recorded (the store's threshold unless given)."""
        meta = json.loads(json.dumps(dict(metadata), sort_keys=True, default=str))
        if "min_valid" in meta:
            mv = float(meta["min_valid"])
            if not 0.0 <= mv <= 1.0:
                raise ValueError(f"min_valid must be in [0, 1], got {mv}")
            self._min_valid = mv
        else:
            meta["min_valid"] = self.min_valid
        meta.setdefault("format_version", FORMAT_VERSION)
        blob = pack(json.dumps(meta, sort_keys=True).encode("utf-8"))
        self._write(lambda txn, dbs: txn.put(_META_KEY, blob, db=dbs[_DB_META]))

    def metadata_differences(self, expected: dict) -> dict[str, tuple[Any, Any]]:
        """``{field: (stored, expected)}`` for every field of ``expected`` that the store has differently
        (a field the store lacks shows as ``"<missing>"``)."""
        return differences(self.metadata, expected)

    def check_metadata(self, expected: dict) -> None:
        """Raise ``StoreMismatchError`` (a ``UserError`` and ``ValueError``) naming the store and every field
        of ``expected`` that differs from the stored metadata."""
        diffs = self.metadata_differences(expected)
        if diffs:
            raise mismatch_error(self.WHAT, self.path, diffs)
