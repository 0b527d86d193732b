"""The LMDB plumbing shared by our stores (``sharding.mask_store.MaskStore``,
``teacher_server.store.PseudoLabelStore``): one way to open, share across processes, grow, checksum and check.

* **One environment per (process, directory).** LMDB forbids opening an environment twice in one process
  (py-lmdb refuses), so every store object of a path shares one :class:`_Handle` from one registry.
* **Fork policy: reopen after fork.** A store object keeps only its path; it opens the environment on first
  use in each process and pickles without it, so it can be handed to DataLoader workers (fork or spawn)
  and Ray actors. A forked child closes the environment it inherited before opening its own (LMDB needs
  that). That close releases the reader slots registered under the parent's pid, which would hurt a
  parent transaction in flight, so ``fork()`` waits until no transaction of this module is open
  (``os.register_at_fork``; transactions are short and never span a ``yield``).
* **Map growth.** A write that hits ``MapFullError`` doubles the map (``set_mapsize``) and retries; a reader
  that sees ``MapResizedError`` (another process grew it) adopts the new size.
* **Checksums.** Every value is stored as ``crc32(payload) (4 bytes, little endian) + payload``
  (:func:`pack`). An entry whose checksum fails is not returned: it is skipped, logged with its key once,
  and counted (:attr:`LmdbStore.corrupt`, :attr:`LmdbStore.corrupt_keys`). A damaged format record or
  header is a :class:`StoreDamagedError` instead (nothing in the store can be trusted without it).
* **Truncated files.** Reading a page past the end of a truncated ``data.mdb`` through the memory map kills
  the process with SIGBUS (exit 135, no message). :func:`check_data_file` reads the two meta pages first
  and refuses a file shorter than ``(last page + 1) * page size`` with a :class:`StoreDamagedError`.
* **Format record and header checks.** Each store keeps ``{"format", "version", "checksum"}`` under
  ``__format__``; a store without it (made before checksums) or of another format is refused. Stores
  compare their settings with :func:`differences` and refuse with :func:`mismatch_error`, which names
  the store and every field that differs.

Errors a user can cause (missing, damaged, other settings) are ``sharding.cli.UserError`` subclasses that
are also the built-in exception they used to be (``FileNotFoundError``, ``ValueError``, ``OSError``).
"""

from __future__ import annotations

import abc
import json
import logging
import os
import struct
import threading
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import lmdb

from sharding.cli import UserError
from sharding.lmdb_files import check_data_file, swap_store  # noqa: F401 - re-exported

log = logging.getLogger(__name__)

CHECKSUM = "crc32"
FORMAT_KEY = b"__format__"
_CRC = struct.Struct("<I")


class StoreError(UserError):
    """A store the user pointed at cannot be used as asked (the message names it and says why)."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """No store at the path."""


class StoreMismatchError(StoreError, ValueError):
    """The store was made with other settings (or is of another kind) than the run that wants it."""


class StoreDamagedError(StoreError, OSError):
    """The store's files are truncated or its format record/header is corrupt."""


class CorruptValue(Exception):
    """A stored value whose checksum does not match (internal; counted by :class:`LmdbStore`)."""


# ------------------------------------------------------------------------------------------ values
def pack(payload: bytes) -> bytes:
    """``crc32(payload) + payload``: what every store writes as a value."""
    return _CRC.pack(zlib.crc32(payload)) + payload


def unpack(buf: bytes | memoryview) -> memoryview:
    """The payload of a packed value (a view, no copy); ``CorruptValue`` when the checksum fails."""
    view = memoryview(buf)
    if len(view) < _CRC.size:
        raise CorruptValue(f"{len(view)} bytes, shorter than its checksum")
    (want,) = _CRC.unpack_from(view, 0)
    payload = view[_CRC.size:]
    got = zlib.crc32(payload)
    if got != want:
        raise CorruptValue(f"checksum mismatch (stored {want:08x}, computed {got:08x})")
    return payload


# ------------------------------------------------------------------------------------------ headers
def differences(stored: dict, expected: dict, same: Callable[[str, Any, Any], bool] | None = None
                ) -> dict[str, tuple[Any, Any]]:
    """``{field: (stored, expected)}`` for each field of ``expected`` that ``stored`` has differently
    (``"<missing>"`` when absent). Values are compared after a JSON round trip (tuples equal lists) or by
    ``same(field, stored, expected)`` when given."""
    have_all = _jsonable(stored)
    out = {}
    for name, want in _jsonable(expected).items():
        have = have_all.get(name, "<missing>")
        ok = same(name, have, want) if same is not None and have != "<missing>" else have == want
        if not ok:
            out[name] = (have, want)
    return out


def mismatch_error(what: str, path: str | os.PathLike, diffs: dict[str, tuple[Any, Any]], hint: str = ""
                   ) -> StoreMismatchError:
    lines = "\n".join(f"  {k}: store has {v[0]!r}, expected {v[1]!r}" for k, v in sorted(diffs.items()))
    return StoreMismatchError(f"{what} {path} was made with different settings ({len(diffs)} field(s) differ):\n"
                              f"{lines}" + (f"\n{hint}" if hint else ""))


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


# ------------------------------------------------------------------------------------------ fork gate
class _Gate:
    """Transactions enter shared; ``fork()`` and ``set_mapsize`` wait for none to be open (exclusive)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._active = 0
        self._local = threading.local()

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._active += 1
        self._local.depth = getattr(self._local, "depth", 0) + 1
        try:
            yield
        finally:
            self._local.depth -= 1
            with self._cond:
                self._active -= 1
                if not self._active:
                    self._cond.notify_all()

    def acquire_exclusive(self, for_fork: bool = False) -> None:
        self._cond.acquire()
        if getattr(self._local, "depth", 0):
            if for_fork:  # this very thread is inside a transaction: waiting would never end
                return
            self._cond.release()
            raise RuntimeError("LMDB map resize requested inside a transaction of the same thread")
        while self._active:
            self._cond.wait()

    def release_exclusive(self) -> None:
        self._cond.release()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        self.acquire_exclusive()
        try:
            yield
        finally:
            self.release_exclusive()


_GATE = _Gate()


def _after_fork_in_child() -> None:
    global _GATE, _HANDLES_LOCK
    _GATE = _Gate()
    _HANDLES_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=lambda: _GATE.acquire_exclusive(for_fork=True),
                        after_in_parent=lambda: _GATE.release_exclusive(),
                        after_in_child=_after_fork_in_child)


# ------------------------------------------------------------------------------------------ registry
class _Handle:
    """A process's environment for one store directory, with its named databases."""

    def __init__(self, path: str, writable: bool, lock: bool, map_size: int, dbs: tuple[bytes, ...],
                 what: str) -> None:
        self.path, self.writable, self.lock, self.db_names, self.what = path, writable, lock, dbs, what
        self.pid = os.getpid()
        self.refs = 0
        self.key: tuple = ()
        self.env: Any = None
        self.dbs: dict[bytes | None, Any] = {}
        self._open(map_size)

    def _open(self, map_size: int) -> None:
        if self.writable:
            Path(self.path).mkdir(parents=True, exist_ok=True)
        if (Path(self.path) / "data.mdb").is_file():
            check_data_file(self.path, self.what)
        if self.writable:
            env = lmdb.open(self.path, map_size=map_size, max_dbs=8, readahead=False, max_spare_txns=0,
                            max_readers=512)
            dbs = {name: env.open_db(name) for name in self.db_names}
        else:
            env = lmdb.open(self.path, readonly=True, lock=self.lock, readahead=False, max_dbs=8, create=False,
                            max_spare_txns=0, max_readers=512)
            dbs = {}
            for name in self.db_names:
                try:
                    dbs[name] = env.open_db(name, create=False)
                except lmdb.NotFoundError as exc:
                    env.close()
                    raise StoreMismatchError(f"{self.path} is not a {self.what} (no {name.decode()!r} database)"
                                             ) from exc
        dbs[None] = None  # the main database
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


# Keyed by the directory's (device, inode), as py-lmdb identifies an environment by its files: a store
# directory swapped in under the same name (``--overwrite``) is another environment, and a directory renamed
# while open is still the same one.
_HANDLES: dict[tuple, _Handle] = {}
_HANDLES_LOCK = threading.Lock()


def _registry_key(path: str, writable: bool) -> tuple:
    if writable:
        Path(path).mkdir(parents=True, exist_ok=True)
    try:
        st = os.stat(path)
        return st.st_dev, st.st_ino
    except OSError:
        return (os.path.realpath(path),)


def _acquire(path: str, writable: bool, lock: bool, map_size: int, dbs: tuple[bytes, ...], what: str) -> _Handle:
    key = _registry_key(path, writable)
    pid = os.getpid()
    with _HANDLES_LOCK:
        h = _HANDLES.get(key)
        if h is not None and (h.pid != pid or h.env is None):
            if h.pid != pid:  # inherited through fork(): no transaction was in flight (the gate)
                h.close()
            del _HANDLES[key]
            h = None
        if h is None:
            h = _Handle(path, writable, lock, map_size, dbs, what)
            h.key = key
            _HANDLES[key] = h
        else:
            h.upgrade(writable, lock, map_size)
        h.refs += 1
        return h


def _release(h: _Handle) -> None:
    with _HANDLES_LOCK:
        h.refs -= 1
        if h.refs <= 0 and h.pid == os.getpid():
            h.close()
            if _HANDLES.get(h.key) is h:
                del _HANDLES[h.key]


# ------------------------------------------------------------------------------------------ the base
class LmdbStore(abc.ABC):
    """Base of our LMDB stores: per-process environment, transactions, growth, checksums, format record.

    Subclasses set ``WHAT`` (how messages name the store), ``FORMAT`` and ``VERSION`` (the format record),
    ``DBS`` (named databases), ``FORMAT_DB`` (the database holding the format record; None = main),
    ``CREATE_HINT`` (how to build one) and implement :meth:`_is_empty`.
    """

    WHAT = "LMDB store"
    FORMAT = ""
    VERSION = 1
    DBS: tuple[bytes, ...] = ()
    FORMAT_DB: bytes | None = None
    CREATE_HINT = ""

    def __init__(self, path: str | os.PathLike, *, readonly: bool, map_size: int, lock: bool = True) -> None:
        self.path = str(path)
        self.readonly = bool(readonly)
        self.map_size = int(map_size)
        self.lock = bool(lock)
        self._h: _Handle | None = None
        self.corrupt_keys: dict[str, str] = {}
        data = Path(self.path, "data.mdb")
        if self.readonly and not data.is_file():
            raise StoreNotFoundError(f"{self.WHAT} not found at {self.path} (expected an LMDB directory with "
                                     f"data.mdb)" + (f"; {self.CREATE_HINT}" if self.CREATE_HINT else ""))
        if data.is_file():
            check_data_file(self.path, self.WHAT)

    # ---------------------------------------------------------------- environment
    def _handle(self) -> _Handle:
        h = self._h
        if h is not None and h.pid == os.getpid() and h.env is not None:
            return h
        h = _acquire(self.path, not self.readonly, self.lock, self.map_size, self.DBS, self.WHAT)
        self._h = h
        try:
            self._check_format()
        except BaseException:
            self.close()
            raise
        self._opened()
        return h

    def _opened(self) -> None:
        """Hook: runs once per process after the environment is open and its format checked."""

    @abc.abstractmethod
    def _is_empty(self, txn: Any, dbs: dict) -> bool:
        """True when the store holds no entry yet (a format record may then be written)."""

    def _check_format(self) -> None:
        want = {"format": self.FORMAT, "version": self.VERSION, "checksum": CHECKSUM}
        fdb = self.FORMAT_DB

        def read(txn: Any, dbs: dict) -> tuple[Any, bool]:
            raw = txn.get(FORMAT_KEY, db=dbs[fdb])
            return (None if raw is None else bytes(raw)), self._is_empty(txn, dbs)

        raw, empty = self._read(read)
        if raw is None:
            if not empty:
                raise StoreMismatchError(
                    f"{self.path} holds data but no format record: it is not a {self.WHAT}, or was made by an "
                    f"older pano-distill without checksums; rebuild it" +
                    (f" ({self.CREATE_HINT})" if self.CREATE_HINT else ""))
            if not self.readonly:
                blob = pack(json.dumps(want, sort_keys=True).encode())
                self._write(lambda txn, dbs: txn.put(FORMAT_KEY, blob, db=dbs[fdb]))
            return
        try:
            have = json.loads(bytes(unpack(raw)).decode("utf-8"))
        except (CorruptValue, ValueError) as exc:
            raise StoreDamagedError(f"{self.WHAT} {self.path}: its format record is corrupt ({exc}); rebuild it"
                                    ) from exc
        diffs = differences(have, want)
        if diffs:
            raise mismatch_error(self.WHAT, self.path, diffs, f"it is another kind of store or another version; "
                                 f"rebuild it" + (f" ({self.CREATE_HINT})" if self.CREATE_HINT else ""))

    def _read(self, fn: Callable[[Any, dict], Any]) -> Any:
        h = self._h
        if h is None or h.pid != os.getpid() or h.env is None:
            h = self._handle()
        for _ in range(3):
            try:
                with _GATE.shared(), h.env.begin(write=False, buffers=True) as txn:
                    return fn(txn, h.dbs)
            except lmdb.MapResizedError:  # a writer in another process grew the map: adopt its size
                with _GATE.exclusive():
                    h.env.set_mapsize(0)
        raise RuntimeError(f"{self.WHAT} {self.path}: the map kept being resized while reading")

    def _write(self, fn: Callable[[Any, dict], Any]) -> Any:
        if self.readonly:
            raise PermissionError(f"{self.WHAT} {self.path} was opened read-only")
        h = self._h
        if h is None or h.pid != os.getpid() or h.env is None:
            h = self._handle()
        while True:
            try:
                with _GATE.shared(), h.env.begin(write=True) as txn:  # commits on success, aborts on exceptions
                    return fn(txn, h.dbs)
            except lmdb.MapFullError:
                old = h.env.info()["map_size"]
                new = max(2 * old, old + (64 << 20))
                log.info("%s %s: map full at %d MiB, growing to %d MiB", self.WHAT, self.path, old >> 20, new >> 20)
                with _GATE.exclusive():
                    h.env.set_mapsize(new)
                self.map_size = new
            except lmdb.MapResizedError:
                with _GATE.exclusive():
                    h.env.set_mapsize(0)

    def _env_info(self) -> tuple[dict, dict]:
        """(``env.info()``, ``env.stat()``) of this process's environment."""
        h = self._handle()
        return h.env.info(), h.env.stat()

    # ---------------------------------------------------------------- checksums
    def _payload(self, key: str, buf: Any) -> memoryview | None:
        """The payload of a stored value, or None (logged once per key, counted) when its checksum fails."""
        if buf is None:
            return None
        try:
            return unpack(buf)
        except CorruptValue as exc:
            self._mark_corrupt(key, str(exc))
            return None

    def _mark_corrupt(self, key: str, reason: str) -> None:
        if key not in self.corrupt_keys:
            log.warning("%s %s: entry %r is corrupt (%s); skipped", self.WHAT, self.path, key, reason)
        self.corrupt_keys[key] = reason

    @property
    def corrupt(self) -> int:
        """How many distinct corrupt entries this object has met (and skipped) in this process."""
        return len(self.corrupt_keys)

    # ---------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Release this store's share of the process's environment (closed when no store uses it)."""
        h, self._h = self._h, None
        if h is not None and h.pid == os.getpid():
            _release(h)

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_h"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
