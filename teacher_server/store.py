"""The cached pseudo-label store: K rotations and the teacher's six face answers per panorama, in LMDB.

Written by ``python -m teacher_server.precompute``, read by ``labels.CachedLabels``. Layout of the LMDB
(one directory, ``data.mdb`` + ``lock.mdb``):

* ``__header__``: JSON ``{"format", "version", "model", "face_size", "input_size", "seed", "rotations",
  "max_deg", "dtype", "compression", "created", ...}``; :meth:`PseudoLabelStore.check` compares it with the
  training configuration and refuses a mismatch, listing every differing field;
* ``__stats__``: JSON totals (panoramas, teacher seconds spent computing, bytes) for :meth:`report`;
* ``p:<key>``: ``zlib(rotations float32 (K, 3, 3) bytes + disparity float16 (K, 6, 1, F, F) bytes)``; the
  disparity is the teacher's per-face normalised answer (NaN faces kept as NaN).

The LMDB environment is opened lazily in each process (never inherited across ``fork``; the object can be
pickled into DataLoader workers or Ray tasks) and the map grows (doubles) when full.
"""

from __future__ import annotations

import json
import os
import threading
import time
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

FORMAT = "panodistill-pseudo-labels"
VERSION = 1
_HEADER = b"__header__"
_STATS = b"__stats__"
_PREFIX = b"p:"
CHECKED_FIELDS = ("model", "face_size", "input_size", "rotations", "max_deg", "seed")

# LMDB allows one environment per file and process: stores on the same path share it. Entries are
# [env, readonly, pid, users]; an entry made by another pid was inherited across fork and is never used.
_ENVS: dict[str, list] = {}
_ENVS_LOCK = threading.Lock()


def _shared_env(path: Path, readonly: bool, map_size: int, lock: bool):
    import lmdb

    key, pid = os.path.realpath(path), os.getpid()
    with _ENVS_LOCK:
        entry = _ENVS.get(key)
        if entry is not None and entry[2] != pid:
            entry = None
        if entry is not None and entry[1] and not readonly:  # a writer joins read-only users: reopen
            entry[0].close()
            entry = None
        if entry is None:
            if readonly:
                env = lmdb.open(str(path), readonly=True, lock=lock, readahead=False, max_readers=512)
            else:
                env = lmdb.open(str(path), map_size=map_size, readahead=False)
            users = _ENVS[key][3] if key in _ENVS and _ENVS[key][2] == pid else 0
            entry = _ENVS[key] = [env, readonly, pid, users]
        return entry


def _release_env(path: Path) -> None:
    key, pid = os.path.realpath(path), os.getpid()
    with _ENVS_LOCK:
        entry = _ENVS.get(key)
        if entry is None or entry[2] != pid:
            return
        entry[3] -= 1
        if entry[3] <= 0:
            entry[0].close()
            del _ENVS[key]


class StoreMismatchError(ValueError):
    """The store was computed with other settings than the run that wants to use it."""


def _max_deg_list(max_deg) -> list[float]:
    v = [float(x) for x in np.atleast_1d(np.asarray(max_deg, dtype=np.float64))]
    return v * 3 if len(v) == 1 else v


def make_header(*, model: str, face_size: int, input_size: int | None, seed: int, rotations: int, max_deg,
                **extra) -> dict:
    hdr = {"format": FORMAT, "version": VERSION, "model": str(model), "face_size": int(face_size),
           "input_size": None if input_size is None else int(input_size), "seed": int(seed),
           "rotations": int(rotations), "max_deg": _max_deg_list(max_deg), "dtype": "float16", "compression": "zlib",
           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    hdr.update(extra)
    return hdr


class PseudoLabelStore:
    """``PseudoLabelStore(path)`` opens an existing store; ``PseudoLabelStore(path, header=...)`` creates
    one (or opens it if its header matches). ``readonly=True`` for training readers."""

    def __init__(self, path: str | os.PathLike, *, header: dict | None = None, readonly: bool = False,
                 map_size: int = 1 << 28, lock: bool = True, compress_level: int = 6):
        self.path = Path(path)
        self.readonly = bool(readonly)
        self._map_size = int(map_size)
        self._lock_files = bool(lock)
        self.compress_level = int(compress_level)
        self._pid = None  # the process in which this object uses the shared LMDB environment
        self._tlock = threading.Lock()
        if self.readonly and header is not None:
            raise ValueError("a read-only store cannot be given a header to create")
        if not self.readonly:
            self.path.mkdir(parents=True, exist_ok=True)
        elif not (self.path / "data.mdb").is_file():
            raise FileNotFoundError(f"no pseudo-label store at {self.path} (expected {self.path / 'data.mdb'}); "
                                    f"build one with python -m teacher_server.precompute --store {self.path} ...")
        existing = self._get_raw(_HEADER)
        if existing is None:
            if header is None:
                raise FileNotFoundError(f"{self.path} holds no pseudo-label header; create it with a header "
                                        f"(python -m teacher_server.precompute)")
            self._put_raw(_HEADER, json.dumps(header).encode())
            self._header = dict(header)
        else:
            self._header = json.loads(existing)
            if self._header.get("format") != FORMAT:
                raise ValueError(f"{self.path} is not a pseudo-label store (format {self._header.get('format')!r})")
            if header is not None:
                self.check(**{k: header[k] for k in CHECKED_FIELDS if k in header})

    # -- LMDB, per process ----------------------------------------------------------------------------------

    def _open(self):
        entry = _shared_env(self.path, self.readonly, self._map_size, self._lock_files)
        if self._pid != os.getpid():  # first use in this process: count this store among the env's users
            with _ENVS_LOCK:
                entry[3] += 1
            self._pid = os.getpid()
        return entry[0]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_pid"], state["_tlock"] = None, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._tlock = threading.Lock()

    def _get_raw(self, key: bytes) -> bytes | None:
        import lmdb

        env = self._open()
        for _ in range(2):
            try:
                with env.begin(buffers=False) as txn:
                    return txn.get(key)
            except lmdb.MapResizedError:  # a writer grew the map meanwhile
                env.set_mapsize(0)
        return None

    def _put_raw(self, key: bytes, value: bytes) -> None:
        import lmdb

        if self.readonly:
            raise PermissionError(f"the pseudo-label store {self.path} is open read-only")
        env = self._open()
        with self._tlock:
            while True:
                try:
                    with env.begin(write=True) as txn:
                        txn.put(key, value)
                    return
                except lmdb.MapFullError:
                    env.set_mapsize(env.info()["map_size"] * 2)

    # -- header ---------------------------------------------------------------------------------------------

    @property
    def header(self) -> dict:
        return dict(self._header)

    @property
    def face_size(self) -> int:
        return int(self._header["face_size"])

    @property
    def rotations(self) -> int:
        return int(self._header["rotations"])

    def check(self, *, model: str | None = None, face_size: int | None = None, input_size: int | None = None,
              rotations: int | None = None, max_deg=None, seed: int | None = None) -> None:
        """Refuse (``StoreMismatchError``) when a given field differs from the header; None = not checked.
        Model names are compared after resolving aliases and local paths."""
        from .models import resolve_model_name

        want = {"model": model, "face_size": face_size, "input_size": input_size, "rotations": rotations,
                "max_deg": max_deg, "seed": seed}
        bad = []
        for name, value in want.items():
            if value is None:
                continue
            have = self._header.get(name)
            if name == "model":
                same = resolve_model_name(str(value)) == resolve_model_name(str(have))
            elif name == "max_deg":
                same = np.allclose(_max_deg_list(value), _max_deg_list(have if have is not None else [-1]))
            else:
                same = have is not None and int(value) == int(have)
            if not same:
                bad.append(f"{name}: store has {have!r}, the configuration asks for {value!r}")
        if bad:
            raise StoreMismatchError(
                f"the pseudo-label store {self.path} does not match this run:\n  " + "\n  ".join(bad) +
                "\nRecompute it (python -m teacher_server.precompute --store NEW ...) with these settings, or "
                "change the run's teacher settings to the store's.")

    # -- entries --------------------------------------------------------------------------------------------

    def put(self, key: str, rotations: torch.Tensor | np.ndarray, disparity: torch.Tensor | np.ndarray) -> int:
        """Store K rotations (K, 3, 3) and answers (K, 6, 1, F, F); returns the compressed size in bytes."""
        k, f = self.rotations, self.face_size
        rot = np.asarray(torch.as_tensor(rotations).detach().cpu().float().numpy(), dtype="<f4")
        disp = np.asarray(torch.as_tensor(disparity).detach().cpu().float().numpy(), dtype="<f2")
        if rot.shape != (k, 3, 3) or disp.shape != (k, 6, 1, f, f):
            raise ValueError(f"store {self.path} holds K={k} rotations of faces {f} px: expected rotations (K, 3, 3) "
                             f"and disparity (K, 6, 1, F, F), got {rot.shape} and {disp.shape}")
        blob = zlib.compress(rot.tobytes() + disp.tobytes(), self.compress_level)
        self._put_raw(_PREFIX + key.encode(), blob)
        return len(blob)

    def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rotations float32 (K, 3, 3), disparity float32 (K, 6, 1, F, F)) or None when not stored."""
        blob = self._get_raw(_PREFIX + key.encode())
        if blob is None:
            return None
        k, f = self.rotations, self.face_size
        raw = zlib.decompress(blob)
        n_rot = k * 9 * 4
        rot = np.frombuffer(raw, dtype="<f4", count=k * 9).reshape(k, 3, 3)
        disp = np.frombuffer(raw, dtype="<f2", offset=n_rot).reshape(k, 6, 1, f, f)
        return torch.from_numpy(rot.astype(np.float32)), torch.from_numpy(disp.astype(np.float32))

    def __contains__(self, key: str) -> bool:
        import lmdb

        env = self._open()
        for _ in range(2):
            try:
                with env.begin() as txn:
                    with txn.cursor() as cur:
                        return cur.set_key(_PREFIX + key.encode())
            except lmdb.MapResizedError:  # a writer in another process grew the map
                env.set_mapsize(0)
        return False

    def keys(self) -> Iterator[str]:
        env = self._open()
        with env.begin() as txn:
            with txn.cursor() as cur:
                if cur.set_range(_PREFIX):
                    for k in cur.iternext(keys=True, values=False):
                        if not k.startswith(_PREFIX):
                            break
                        yield k[len(_PREFIX):].decode()

    def __len__(self) -> int:
        return sum(1 for _ in self.keys())

    # -- accounting -----------------------------------------------------------------------------------------

    def stats_totals(self) -> dict:
        raw = self._get_raw(_STATS)
        return json.loads(raw) if raw else {"teacher_seconds": 0.0, "computed_panoramas": 0, "bytes": 0}

    def add_totals(self, *, teacher_seconds: float, panoramas: int, nbytes: int) -> None:
        tot = self.stats_totals()
        tot["teacher_seconds"] = float(tot.get("teacher_seconds", 0.0)) + float(teacher_seconds)
        tot["computed_panoramas"] = int(tot.get("computed_panoramas", 0)) + int(panoramas)
        tot["bytes"] = int(tot.get("bytes", 0)) + int(nbytes)
        self._put_raw(_STATS, json.dumps(tot).encode())

    def report(self) -> dict:
        """Size per panorama and teacher time: ``teacher_seconds`` is what computing all stored answers cost
        the teacher; one training epoch draws one rotation per panorama, so each epoch served from the store
        saves ``teacher_seconds_per_epoch = teacher_seconds / K`` of teacher time."""
        n = len(self)
        tot = self.stats_totals()
        k = self.rotations
        env = self._open()
        info = env.info()
        stat = env.stat()
        used = (info["last_pgno"] + 1) * stat["psize"]
        secs = float(tot.get("teacher_seconds", 0.0))
        computed = max(int(tot.get("computed_panoramas", 0)), 1)
        nbytes = int(tot.get("bytes", 0))
        return {"path": str(self.path), "panoramas": n, "rotations": k, "face_size": self.face_size,
                "model": self._header.get("model"), "bytes_values": nbytes,
                "bytes_per_panorama": nbytes / computed if tot.get("computed_panoramas") else 0.0,
                "bytes_on_disk": used, "uncompressed_bytes_per_panorama": k * (36 + 6 * self.face_size ** 2 * 2),
                "teacher_seconds": secs, "teacher_seconds_per_panorama": secs / computed,
                "teacher_seconds_per_epoch": secs / max(k, 1) * (n / computed)}

    def format_report(self) -> str:
        r = self.report()
        return (f"pseudo-label store {r['path']}: {r['panoramas']} panoramas x {r['rotations']} rotations of "
                f"{r['face_size']} px faces from {r['model']}; {r['bytes_per_panorama'] / 1024:.1f} KiB per panorama "
                f"(fp16+zlib; {r['uncompressed_bytes_per_panorama'] / 1024:.1f} KiB raw), {r['bytes_on_disk'] / 2**20:.1f} "
                f"MiB on disk; teacher time spent {r['teacher_seconds']:.1f} s "
                f"({r['teacher_seconds_per_panorama'] * 1000:.1f} ms per panorama), i.e. "
                f"{r['teacher_seconds_per_epoch']:.1f} s of teacher time saved per training epoch")

    def close(self) -> None:
        if self._pid == os.getpid():
            _release_env(self.path)
        self._pid = None
