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
  other settings is noticed (:meth:`MaskStore.check_metadata`).

A mask, its fraction and its rejected flag are written in one transaction: a writer that dies part-way
leaves either the whole entry or nothing.

Processes: py-lmdb environments must not cross ``fork()``. A :class:`MaskStore` keeps only its path and
opens the environment on first use in each process (it re-opens when ``os.getpid()`` changed); it pickles
without the environment. So a store can be handed to DataLoader workers (fork or spawn) and Ray actors,
which read concurrently while one writer appends. Within one process every store of a path shares one
environment (LMDB forbids opening it twice per process; py-lmdb refuses). A forked child closes the
environment it inherited before opening its own (py-lmdb needs that); LMDB's close then releases the
reader slots registered under the parent's pid, which would hurt a parent transaction in flight, so every
transaction runs under a lock that ``fork()`` also takes (``os.register_at_fork``): no store transaction
is ever in flight while a process forks.

Readers of a store that nothing writes any more may pass ``lock=False`` (faster, see STACK-NOTES); while a
writer is active keep the default ``lock=True``.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import lmdb
import numpy as np

log = logging.getLogger(__name__)

DEFAULT_MIN_VALID = 0.2
DEFAULT_MAP_SIZE = 1 << 30  # 1 GiB to start with; grows by doubling when full (sparse on Linux)
FORMAT_VERSION = 1

_MAGIC = b"PDM1"
_HEADER = struct.Struct("<4sIIdH")  # magic, height, width, valid fraction, length of the source string
_DB_MASKS = b"masks"
_DB_REJECTED = b"rejected"
_DB_META = b"meta"
_META_KEY = b"metadata"
_MAX_KEY_BYTES = 500  # LMDB's default key limit is 511 bytes

# One LMDB environment per (process, store directory), shared by every MaskStore of that path in the
# process: LMDB forbids opening the same environment twice in one process, and py-lmdb refuses it.
_HANDLES: dict[str, "_Handle"] = {}
_HANDLES_LOCK = threading.Lock()
# Held during every transaction and across fork(), so that a child never inherits a transaction in
# flight: the child closes the inherited environment (py-lmdb needs that before re-opening the path), and
# LMDB's close releases the reader slots registered under the parent's pid.
_TXN_LOCK = threading.RLock()


def _after_fork_in_child() -> None:
    global _TXN_LOCK
    _TXN_LOCK = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=lambda: _TXN_LOCK.acquire(),
        after_in_parent=lambda: _TXN_LOCK.release(),
        after_in_child=_after_fork_in_child,
    )


class _Handle:
    """A process's environment for one store directory, with its named databases."""

    def __init__(self, path: str, writable: bool, lock: bool, map_size: int) -> None:
        self.path, self.writable, self.lock = path, writable, lock
        self.pid = os.getpid()
        self.refs = 0
        self.env: Any = None
        self.dbs: dict[bytes, Any] = {}
        self._open(map_size)

    def _open(self, map_size: int) -> None:
        if self.writable:
            Path(self.path).mkdir(parents=True, exist_ok=True)
            env = lmdb.open(self.path, map_size=map_size, max_dbs=4, readahead=False, max_spare_txns=0)
            dbs = {name: env.open_db(name) for name in (_DB_MASKS, _DB_REJECTED, _DB_META)}
        else:
            env = lmdb.open(self.path, readonly=True, lock=self.lock, readahead=False, max_dbs=4,
                            create=False, max_spare_txns=0)
            dbs = {}
            for name in (_DB_MASKS, _DB_REJECTED, _DB_META):
                try:
                    dbs[name] = env.open_db(name, create=False)
                except lmdb.NotFoundError as exc:
                    env.close()
                    raise ValueError(f"{self.path} is not a mask store (no {name.decode()!r} database)") from exc
        self.env, self.dbs = env, dbs

    def upgrade(self, writable: bool, lock: bool, map_size: int) -> None:
        """Re-open in place when a store of this process needs writing (or locking) that this lacks."""
        if (writable and not self.writable) or (lock and not self.lock):
            self.env.close()
            self.writable = self.writable or writable
            self.lock = self.lock or lock or self.writable
            self._open(map_size)

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
        self.env, self.dbs = None, {}


def _acquire_handle(path: str, writable: bool, lock: bool, map_size: int) -> _Handle:
    key = os.path.realpath(path)
    pid = os.getpid()
    with _HANDLES_LOCK:
        h = _HANDLES.get(key)
        if h is not None and (h.pid != pid or h.env is None):
            if h.pid != pid:  # inherited through fork(): no transaction was in flight (_TXN_LOCK)
                h.close()
            del _HANDLES[key]
            h = None
        if h is None:
            h = _Handle(path, writable, lock, map_size)
            _HANDLES[key] = h
        else:
            h.upgrade(writable, lock, map_size)
        h.refs += 1
        return h


def _release_handle(h: _Handle) -> None:
    with _HANDLES_LOCK:
        h.refs -= 1
        if h.refs <= 0 and h.pid == os.getpid():
            h.close()
            key = os.path.realpath(h.path)
            if _HANDLES.get(key) is h:
                del _HANDLES[key]


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


def _jsonable(value: Any) -> Any:
    """Normalise a metadata value the way it round-trips through JSON (tuples become lists, ...)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def load_mask_png(path: str | os.PathLike) -> np.ndarray:
    """Read a validity mask PNG (255 = valid, 0 = invalid; grey, RGB or RGBA) as a bool (H, W) array.

    Pixels above 127 are valid. Raises ``ValueError`` naming the file when it cannot be read as an image.
    """
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"mask file not found: {p}")
    try:
        with Image.open(p) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "PA"):
                im = im.convert("RGBA").convert("RGB")
            arr = np.asarray(im.convert("L"))
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"cannot read mask image {p}: {exc}") from exc
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"mask image {p} has an unexpected shape {arr.shape}")
    return arr > 127


class MaskStore:
    """Boolean validity masks in LMDB, keyed by sample key; see the module docstring.

    ``MaskStore(path, readonly=False, map_size=DEFAULT_MAP_SIZE, min_valid=None, lock=True)``.
    ``min_valid`` (the rejection threshold) defaults to the store's metadata, else 0.2.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        readonly: bool = False,
        map_size: int = DEFAULT_MAP_SIZE,
        min_valid: float | None = None,
        lock: bool = True,
    ) -> None:
        self.path = str(path)
        self.readonly = bool(readonly)
        self.map_size = int(map_size)
        self.lock = bool(lock)
        if min_valid is not None and not 0.0 <= float(min_valid) <= 1.0:
            raise ValueError(f"min_valid must be in [0, 1], got {min_valid}")
        self._min_valid_arg = None if min_valid is None else float(min_valid)
        self._min_valid: float | None = self._min_valid_arg
        self._h: _Handle | None = None
        if self.readonly and not Path(self.path, "data.mdb").is_file():
            raise FileNotFoundError(
                f"mask store not found at {self.path} (expected an LMDB directory with data.mdb); "
                "create it with `python -m sharding.masks --store PATH ...`"
            )

    # ------------------------------------------------------------------ process-local environment
    def _handle(self) -> _Handle:
        h = self._h
        if h is not None and h.pid == os.getpid() and h.env is not None:
            return h
        h = _acquire_handle(self.path, not self.readonly, self.lock, self.map_size)
        self._h = h
        if self._min_valid_arg is None:
            stored = self._read(lambda txn, dbs: txn.get(_META_KEY, db=dbs[_DB_META]))
            stored = json.loads(bytes(stored).decode("utf-8")).get("min_valid") if stored is not None else None
            self._min_valid = float(stored) if stored is not None else DEFAULT_MIN_VALID
        return h

    def _read(self, fn: Callable[[Any, dict], Any]) -> Any:
        h = self._handle()
        for _ in range(3):
            try:
                with _TXN_LOCK, h.env.begin(write=False, buffers=True) as txn:
                    return fn(txn, h.dbs)
            except lmdb.MapResizedError:  # a writer in another process grew the map: adopt its size
                h.env.set_mapsize(0)
        raise RuntimeError(f"mask store {self.path}: the map kept being resized while reading")

    def _write(self, fn: Callable[[Any, dict], Any]) -> Any:
        if self.readonly:
            raise PermissionError(f"mask store {self.path} was opened read-only")
        h = self._handle()
        while True:
            try:
                with _TXN_LOCK, h.env.begin(write=True) as txn:  # commits on success, aborts on any exception
                    return fn(txn, h.dbs)
            except lmdb.MapFullError:
                old = h.env.info()["map_size"]
                new = max(2 * old, old + (64 << 20))
                log.info("mask store %s: map full at %d MiB, growing to %d MiB", self.path, old >> 20, new >> 20)
                with _TXN_LOCK:
                    h.env.set_mapsize(new)
                self.map_size = new
            except lmdb.MapResizedError:
                with _TXN_LOCK:
                    h.env.set_mapsize(0)

    def close(self) -> None:
        """Release this store's share of the process's environment (closed when no store uses it)."""
        h, self._h = self._h, None
        if h is not None:
            _release_handle(h)

    def __enter__(self) -> "MaskStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_h"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        mode = "readonly" if self.readonly else "read-write"
        return f"MaskStore({self.path!r}, {mode})"

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
        value = _encode(arr, fraction, source)
        min_valid = self.min_valid
        rejected = fraction < min_valid
        flag = json.dumps({"valid_fraction": fraction, "min_valid": min_valid}).encode()

        def txn_fn(txn: Any, dbs: dict) -> None:
            txn.put(kb, value, db=dbs[_DB_MASKS])
            if rejected:
                txn.put(kb, flag, db=dbs[_DB_REJECTED])
            else:
                txn.delete(kb, db=dbs[_DB_REJECTED])

        self._write(txn_fn)
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
    def get(self, key: str) -> np.ndarray | None:
        """The stored mask, bool (H, W), True = valid; ``None`` if ``key`` is not stored."""
        kb = _key_bytes(key)

        def fn(txn: Any, dbs: dict) -> np.ndarray | None:
            buf = txn.get(kb, db=dbs[_DB_MASKS])
            return None if buf is None else _decode_mask(key, buf)[0]

        return self._read(fn)

    def entry(self, key: str) -> MaskEntry | None:
        """Mask, valid fraction, source and rejected flag of ``key``, read in one transaction."""
        kb = _key_bytes(key)

        def fn(txn: Any, dbs: dict) -> MaskEntry | None:
            buf = txn.get(kb, db=dbs[_DB_MASKS])
            if buf is None:
                return None
            mask, fraction, source = _decode_mask(key, buf)
            rejected = txn.get(kb, db=dbs[_DB_REJECTED]) is not None
            return MaskEntry(key, mask, fraction, source, rejected)

        return self._read(fn)

    def valid_fraction(self, key: str) -> float:
        """The stored valid fraction of ``key`` (read from the header; the mask is not unpacked)."""
        kb = _key_bytes(key)

        def fn(txn: Any, dbs: dict) -> float | None:
            buf = txn.get(kb, db=dbs[_DB_MASKS])
            return None if buf is None else _decode_header(key, buf)[2]

        value = self._read(fn)
        if value is None:
            raise KeyError(f"{key!r} is not in the mask store {self.path}")
        return value

    def source(self, key: str) -> str:
        """Where the mask of ``key`` came from: ``"model"``, ``"imported"`` or ``"combined"``."""
        kb = _key_bytes(key)

        def fn(txn: Any, dbs: dict) -> str | None:
            buf = txn.get(kb, db=dbs[_DB_MASKS])
            return None if buf is None else _decode_header(key, buf)[3]

        value = self._read(fn)
        if value is None:
            raise KeyError(f"{key!r} is not in the mask store {self.path}")
        return value

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        kb = _key_bytes(key)
        return self._read(lambda txn, dbs: txn.get(kb, db=dbs[_DB_MASKS]) is not None)

    def is_rejected(self, key: str) -> bool:
        kb = _key_bytes(key)
        return self._read(lambda txn, dbs: txn.get(kb, db=dbs[_DB_REJECTED]) is not None)

    def rejected(self) -> list[str]:
        """Keys of the stored panoramas with a valid fraction below ``min_valid``, sorted."""
        return self._read(lambda txn, dbs: [bytes(k).decode() for k in txn.cursor(db=dbs[_DB_REJECTED]).iternext(values=False)])

    def keys(self) -> list[str]:
        """All stored keys, sorted (LMDB order)."""
        return self._read(lambda txn, dbs: [bytes(k).decode() for k in txn.cursor(db=dbs[_DB_MASKS]).iternext(values=False)])

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return self._read(lambda txn, dbs: txn.stat(dbs[_DB_MASKS])["entries"])

    def summary(self) -> dict:
        """Counts for reports: entries, rejected, entries per source, mean valid fraction."""

        def fn(txn: Any, dbs: dict) -> dict:
            by_source: dict[str, int] = {}
            total, fsum = 0, 0.0
            for k, v in txn.cursor(db=dbs[_DB_MASKS]):
                _, _, fraction, source, _ = _decode_header(bytes(k).decode(), v)
                by_source[source] = by_source.get(source, 0) + 1
                total += 1
                fsum += fraction
            n_rej = txn.stat(dbs[_DB_REJECTED])["entries"]
            return {
                "entries": total,
                "rejected": n_rej,
                "by_source": by_source,
                "mean_valid_fraction": fsum / total if total else None,
            }

        return self._read(fn)

    # ------------------------------------------------------------------ metadata
    @property
    def metadata(self) -> dict:
        """The models and thresholds that made this store (``{}`` for a new store)."""
        buf = self._read(lambda txn, dbs: txn.get(_META_KEY, db=dbs[_DB_META]))
        return {} if buf is None else json.loads(bytes(buf).decode("utf-8"))

    def set_metadata(self, metadata: dict) -> None:
        """Replace the metadata. ``min_valid`` is always recorded (the store's threshold unless given)."""
        meta = _jsonable(dict(metadata))
        if "min_valid" in meta:
            mv = float(meta["min_valid"])
            if not 0.0 <= mv <= 1.0:
                raise ValueError(f"min_valid must be in [0, 1], got {mv}")
            self._min_valid = mv
        else:
            meta["min_valid"] = self.min_valid
        meta.setdefault("format_version", FORMAT_VERSION)
        blob = json.dumps(meta, sort_keys=True).encode("utf-8")
        self._write(lambda txn, dbs: txn.put(_META_KEY, blob, db=dbs[_DB_META]))

    def metadata_differences(self, expected: dict) -> dict[str, tuple[Any, Any]]:
        """``{field: (stored, expected)}`` for every field of ``expected`` that the store has differently
        (a field the store lacks shows as ``"<missing>"``)."""
        stored = self.metadata
        diffs = {}
        for name, want in _jsonable(dict(expected)).items():
            have = stored.get(name, "<missing>")
            if have != want:
                diffs[name] = (have, want)
        return diffs

    def check_metadata(self, expected: dict) -> None:
        """Raise ``ValueError`` listing every field of ``expected`` that differs from the stored metadata."""
        diffs = self.metadata_differences(expected)
        if diffs:
            lines = "\n".join(f"  {k}: store has {v[0]!r}, expected {v[1]!r}" for k, v in sorted(diffs.items()))
            raise ValueError(
                f"mask store {self.path} was made with different settings ({len(diffs)} field(s) differ):\n{lines}"
            )
