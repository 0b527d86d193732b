"""The cached pseudo-label store: K rotations and the teacher's six face answers per panorama, in LMDB.

Written by ``python -m teacher_server.precompute``, read by ``labels.CachedLabels``. Layout of the LMDB
(one directory, ``data.mdb`` + ``lock.mdb``); every value carries a crc32 (:mod:`sharding.lmdb_base`):

* ``__format__``: the format record (``panodistill-pseudo-labels``, version, checksum);
* ``__header__``: JSON ``{"format", "version", "model", "face_size", "input_size", "seed", "rotations",
  "max_deg", "dtype", "compression", "created", ...}``; :meth:`PseudoLabelStore.check` compares it with the
  training configuration and refuses a mismatch (``StoreMismatchError``, a ``sharding.cli.UserError``),
  listing every differing field;
* ``__stats__``: JSON totals (panoramas, teacher seconds spent computing, bytes) for :meth:`report`;
* ``p:<key>``: ``zlib(rotations float32 (K, 3, 3) bytes + disparity float16 (K, 6, 1, F, F) bytes)``; the
  disparity is the teacher's per-face normalised answer (NaN faces kept as NaN).

An entry whose checksum fails is skipped and counted (:attr:`PseudoLabelStore.corrupt_keys`): ``get``
returns None and ``key in store`` is False for it, so precompute recomputes it and hybrid labels fall back
to the online teacher. Opening, fork handling (the object pickles into DataLoader workers and Ray tasks
and reopens in each process), map growth and the truncated-file check are :mod:`sharding.lmdb_base`'s.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from typing import Any, Iterator

import numpy as np
import torch

from sharding.lmdb_base import (  # noqa: F401 - StoreMismatchError is part of this module's API
    LmdbStore,
    StoreDamagedError,
    StoreMismatchError,
    differences,
    mismatch_error,
    pack,
)

FORMAT = "panodistill-pseudo-labels"
VERSION = 2  # 2: every value carries a crc32
_HEADER = b"__header__"
_STATS = b"__stats__"
_PREFIX = b"p:"
CHECKED_FIELDS = ("model", "face_size", "input_size", "rotations", "max_deg", "seed")


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


class PseudoLabelStore(LmdbStore):
    """``PseudoLabelStore(path)`` opens an existing store; ``PseudoLabelStore(path, header=...)`` creates
    one (or opens it if its header matches). ``readonly=True`` for training readers."""

    WHAT = "pseudo-label store"
    FORMAT = FORMAT
    VERSION = VERSION
    CREATE_HINT = "build one with python -m teacher_server.precompute --store PATH ..."

    def __init__(self, path: str | os.PathLike, *, header: dict | None = None, readonly: bool = False,
                 map_size: int = 1 << 28, lock: bool = True, compress_level: int = 6):
        if readonly and header is not None:
            raise ValueError("a read-only store cannot be given a header to create")
        super().__init__(path, readonly=readonly, map_size=map_size, lock=lock)
        self.compress_level = int(compress_level)
        existing = self._get_raw(_HEADER)
        if existing is None:
            if self._raw_present(_HEADER):
                raise StoreDamagedError(f"pseudo-label store {self.path}: its header is corrupt; rebuild it "
                                        f"({self.CREATE_HINT})")
            if header is None:
                self.close()
                raise StoreMismatchError(f"{self.path} holds no pseudo-label header; create it with a header "
                                         f"({self.CREATE_HINT})")
            self._put_raw(_HEADER, json.dumps(header).encode())
            self._header = dict(header)
        else:
            self._header = json.loads(existing)
            if self._header.get("format") != FORMAT:
                raise StoreMismatchError(f"{self.path} is not a pseudo-label store "
                                         f"(format {self._header.get('format')!r})")
            if header is not None:
                self.check(**{k: header[k] for k in CHECKED_FIELDS if k in header})

    def _is_empty(self, txn: Any, dbs: dict) -> bool:
        return txn.stat()["entries"] == 0

    def _get_raw(self, key: bytes) -> bytes | None:
        """The payload under ``key``; None when absent or corrupt (counted)."""

        def fn(txn: Any, dbs: dict) -> bytes | None:
            payload = self._payload(key.decode(errors="replace"), txn.get(key))
            return None if payload is None else bytes(payload)

        return self._read(fn)

    def _raw_present(self, key: bytes) -> bool:
        return self._read(lambda txn, dbs: txn.get(key) is not None)

    def _put_raw(self, key: bytes, value: bytes) -> None:
        if self.readonly:
            raise PermissionError(f"the pseudo-label store {self.path} is open read-only")
        blob = pack(value)
        self._write(lambda txn, dbs: txn.put(key, blob))

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
        """Refuse (``StoreMismatchError``, naming the store and every differing field) when a given field
        differs from the header; None = not checked. Model names are compared after resolving aliases and
        local paths."""
        from .models import resolve_model_name

        want = {"model": model, "face_size": face_size, "input_size": input_size, "rotations": rotations,
                "max_deg": None if max_deg is None else _max_deg_list(max_deg), "seed": seed}
        want = {k: v for k, v in want.items() if v is not None}

        def same(name: str, have: Any, value: Any) -> bool:
            if name == "model":
                return resolve_model_name(str(value)) == resolve_model_name(str(have))
            if name == "max_deg":
                return bool(np.allclose(_max_deg_list(value), _max_deg_list(have)))
            return have is not None and int(value) == int(have)

        diffs = differences(self._header, want, same)
        if diffs:
            raise mismatch_error(self.WHAT, self.path, diffs,
                                 "Recompute it (python -m teacher_server.precompute --store NEW ...) with these "
                                 "settings, or change the run's teacher settings to the store's.")

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
        """(rotations float32 (K, 3, 3), disparity float32 (K, 6, 1, F, F)); None when not stored or corrupt
        (a corrupt entry is logged with its key and counted in :attr:`corrupt_keys`)."""
        kb = _PREFIX + key.encode()

        def fn(txn: Any, dbs: dict) -> bytes | None:
            payload = self._payload(key, txn.get(kb))
            return None if payload is None else bytes(payload)

        blob = self._read(fn)
        if blob is None:
            return None
        k, f = self.rotations, self.face_size
        n_rot = k * 9 * 4
        try:
            raw = zlib.decompress(blob)
            if len(raw) != n_rot + k * 6 * f * f * 2:
                raise ValueError(f"{len(raw)} bytes, expected {n_rot + k * 6 * f * f * 2}")
        except (zlib.error, ValueError) as exc:  # checksum fine, contents not: written by something else
            self._mark_corrupt(key, str(exc))
            return None
        rot = np.frombuffer(raw, dtype="<f4", count=k * 9).reshape(k, 3, 3)
        disp = np.frombuffer(raw, dtype="<f2", offset=n_rot).reshape(k, 6, 1, f, f)
        return torch.from_numpy(rot.astype(np.float32)), torch.from_numpy(disp.astype(np.float32))

    def __contains__(self, key: str) -> bool:
        """True when ``key`` has a sound entry (a corrupt one is counted and reported as absent)."""
        kb = _PREFIX + key.encode()
        return self._read(lambda txn, dbs: self._payload(key, txn.get(kb)) is not None)

    def keys(self) -> Iterator[str]:
        """Stored keys (corrupt entries included: their values are not read), read in one transaction."""

        def fn(txn: Any, dbs: dict) -> list[str]:
            out = []
            with txn.cursor() as cur:
                if cur.set_range(_PREFIX):
                    for k in cur.iternext(keys=True, values=False):
                        k = bytes(k)
                        if not k.startswith(_PREFIX):
                            break
                        out.append(k[len(_PREFIX):].decode())
            return out

        return iter(self._read(fn))

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
        info, stat = self._env_info()
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
