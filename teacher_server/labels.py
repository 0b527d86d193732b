"""Label sources: what the training step asks for the unlabeled half of a batch.

``request(batch, rotations, face_size)`` returns a handle at once; ``handle.result()`` gives
:class:`PseudoLabels` for the batch: the rotation of each sample, the teacher's planar disparity on the six
faces of that rotated cube (normalised per face to [0, 1]) and which faces are usable.

* :class:`OnlineLabels` projects ``batch["rgb"]`` onto the rotated cube (``panorama.equirect_to_cube``)
  and asks a backend (``InProcessTeacher`` or ``RayTeacherPool``). The RGB is never augmented here.
  The caller draws the rotations (``None``: no rotation, the ablation).
* :class:`CachedLabels` ignores the RGB and the caller's rotations: for each key it picks one of the K
  rotations stored by ``python -m teacher_server.precompute`` (seeded generator) and returns the stored
  rotation and answer. The caller must use ``labels.rotations`` (not its own) for the student's faces.
* :class:`HybridLabels` mixes them per sample: cached when the key is stored and a coin flip (probability
  ``1 - online_fraction``) says so, otherwise online.

Every source's ``stats()`` has ``faces`` (cube faces answered so far), which the training loop turns into
teacher faces per second.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable

import torch
from torch import Tensor


@dataclass
class PseudoLabels:
    rotations: Tensor  # (B, 3, 3)
    disparity: Tensor  # (B, 6, 1, F, F) planar disparity per face, normalised per face to [0, 1]; NaN faces possible
    face_valid: Tensor  # (B, 6) bool: finite and non-constant answer

    def to(self, device) -> "PseudoLabels":
        return PseudoLabels(self.rotations.to(device), self.disparity.to(device), self.face_valid.to(device))

    @property
    def batch_size(self) -> int:
        return int(self.disparity.shape[0])

    @property
    def face_size(self) -> int:
        return int(self.disparity.shape[-1])

    @staticmethod
    def concat(parts: list["PseudoLabels"]) -> "PseudoLabels":
        return PseudoLabels(torch.cat([p.rotations for p in parts]), torch.cat([p.disparity for p in parts]),
                            torch.cat([p.face_valid for p in parts]))


@runtime_checkable
class Handle(Protocol):
    def result(self, timeout: float | None = None) -> Any: ...


@runtime_checkable
class LabelSource(Protocol):
    def request(self, batch: dict, rotations: Tensor | None, face_size: int) -> Handle: ...  # .result() -> PseudoLabels

    def stats(self) -> dict[str, float]: ...

    def close(self) -> None: ...


class ReadyHandle:
    """A handle whose value is already there."""

    def __init__(self, value: Any):
        self._value = value

    def result(self, timeout: float | None = None) -> Any:
        return self._value

    def done(self) -> bool:
        return True


class MappedHandle:
    """``fn(inner.result())``, computed once on the first ``result()``."""

    def __init__(self, inner: Handle, fn: Callable[[Any], Any]):
        self._inner, self._fn = inner, fn
        self._lock = threading.Lock()
        self._value, self._has = None, False

    def result(self, timeout: float | None = None) -> Any:
        with self._lock:
            if not self._has:
                self._value = self._fn(self._inner.result(timeout))
                self._has = True
            return self._value

    def done(self) -> bool:
        return self._has or bool(getattr(self._inner, "done", lambda: False)())


def face_valid_of(disparity: Tensor) -> Tensor:
    """(B, 6, 1, F, F) -> (B, 6) bool: every value of the face finite (invalid faces are all-NaN)."""
    return torch.isfinite(disparity).flatten(2).all(-1)


def _rotations_for(batch_size: int, rotations: Tensor | None, device) -> Tensor:
    if rotations is None:
        return torch.eye(3, device=device).expand(batch_size, 3, 3).clone()
    rotations = torch.as_tensor(rotations).to(device=device, dtype=torch.float32)
    if rotations.shape == (3, 3):
        rotations = rotations.expand(batch_size, 3, 3)
    if rotations.shape != (batch_size, 3, 3):
        raise ValueError(f"rotations must be (B, 3, 3) with B={batch_size}, got {tuple(rotations.shape)}")
    return rotations.clone()


def subset_batch(batch: dict, index: list[int]) -> dict:
    """The samples ``index`` of a batch dict (tensors indexed on dim 0, lists picked, the rest kept)."""
    n = len(batch["key"])
    out = {}
    for k, v in batch.items():
        if isinstance(v, Tensor) and v.ndim and v.shape[0] == n:
            out[k] = v[torch.as_tensor(index, dtype=torch.long, device=v.device)]
        elif isinstance(v, (list, tuple)) and len(v) == n:
            out[k] = [v[i] for i in index]
        else:
            out[k] = v
    return out


class OnlineLabels:
    """Project ``batch["rgb"]`` with the caller's rotations and ask ``backend`` (``submit(faces) -> handle``).

    ``batch["rgb"]`` is (B, C, H, 2H) in [0, 1]; all C channels are projected and handed over (a real
    teacher takes C = 3; test face models may read an extra channel). Results live on the RGB's device.
    """

    def __init__(self, backend):
        self.backend = backend
        self._lock = threading.Lock()
        self._panoramas = self._faces = self._invalid = self._requests = 0

    def request(self, batch: dict, rotations: Tensor | None, face_size: int) -> Handle:
        from panorama import equirect_to_cube

        rgb = batch["rgb"]
        b, c = rgb.shape[:2]
        f = int(face_size)
        rots = _rotations_for(b, rotations, rgb.device)
        faces = equirect_to_cube(rgb.float(), f, rotation=None if rotations is None else rots)
        handle = self.backend.submit(faces.reshape(b * 6, c, f, f).contiguous())
        with self._lock:
            self._requests += 1

        def finish(disp: Tensor) -> PseudoLabels:
            disp = disp.reshape(b, 6, 1, f, f).to(rgb.device)
            valid = face_valid_of(disp)
            with self._lock:
                self._panoramas += b
                self._faces += b * 6
                self._invalid += int((~valid).sum())
            return PseudoLabels(rotations=rots, disparity=disp, face_valid=valid)

        return MappedHandle(handle, finish)

    def stats(self) -> dict[str, float]:
        out = {f"backend_{k}": float(v) for k, v in self.backend.stats().items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
        with self._lock:
            out.update(faces=float(self._faces), panoramas=float(self._panoramas),
                       invalid_faces=float(self._invalid), requests=float(self._requests))
        return out

    def close(self) -> None:
        self.backend.close()


class CachedLabels:
    """Stored answers of ``teacher_server.precompute``: for each key one of its K rotations, drawn with a
    generator seeded by ``seed``. ``store`` is a :class:`~teacher_server.store.PseudoLabelStore` or its path.
    ``check`` (e.g. ``{"model": ..., "input_size": 518}``) is verified against the store's header."""

    def __init__(self, store, *, seed: int = 0, device=None, check: dict | None = None):
        from .store import PseudoLabelStore

        self.store = store if isinstance(store, PseudoLabelStore) else PseudoLabelStore(store, readonly=True)
        if check:
            self.store.check(**check)
        self._gen = torch.Generator().manual_seed(int(seed))
        self.device = device
        self._lock = threading.Lock()
        self._panoramas = self._faces = self._invalid = 0

    def has(self, key: str) -> bool:
        return key in self.store

    def request(self, batch: dict, rotations: Tensor | None = None, face_size: int | None = None) -> Handle:
        return ReadyHandle(self.lookup(batch, face_size))

    def lookup(self, batch: dict, face_size: int | None = None) -> PseudoLabels:
        fs = self.store.face_size
        if face_size is not None and int(face_size) != fs:
            raise ValueError(f"the pseudo-label store {self.store.path} holds faces of {fs} px but training asks "
                             f"for {face_size} px; set distill.face_size={fs} or recompute the store with "
                             f"--face-size {face_size}")
        rgb = batch.get("rgb")
        device = self.device or (rgb.device if isinstance(rgb, Tensor) else "cpu")
        rots, disps = [], []
        for key in batch["key"]:
            entry = self.store.get(key)
            if entry is None:
                raise KeyError(f"no cached pseudo-labels for key {key!r} in the store {self.store.path} "
                               f"({len(self.store)} panoramas, model {self.store.header.get('model')!r}); run "
                               f"python -m teacher_server.precompute over these shards, or use online or hybrid labels")
            r, d = entry
            with self._lock:
                i = int(torch.randint(r.shape[0], (1,), generator=self._gen))
            rots.append(r[i])
            disps.append(d[i])
        b = len(rots)
        if b == 0:
            return PseudoLabels(torch.zeros(0, 3, 3, device=device), torch.zeros(0, 6, 1, fs, fs, device=device),
                                torch.zeros(0, 6, dtype=torch.bool, device=device))
        disp = torch.stack(disps).to(device)
        valid = face_valid_of(disp)
        with self._lock:
            self._panoramas += b
            self._faces += b * 6
            self._invalid += int((~valid).sum())
        return PseudoLabels(rotations=torch.stack(rots).to(device), disparity=disp, face_valid=valid)

    def stats(self) -> dict[str, float]:
        with self._lock:
            return {"faces": float(self._faces), "panoramas": float(self._panoramas),
                    "invalid_faces": float(self._invalid), "store_panoramas": float(len(self.store))}

    def close(self) -> None:
        self.store.close()


class HybridLabels:
    """Per sample: cached when its key is stored and a coin flip (``P = 1 - online_fraction``) says so,
    otherwise online with the caller's rotation."""

    def __init__(self, online: OnlineLabels, cached: CachedLabels, online_fraction: float = 0.5, *, seed: int = 0):
        if not 0.0 <= float(online_fraction) <= 1.0:
            raise ValueError(f"online_fraction must be in [0, 1], got {online_fraction}")
        self.online, self.cached, self.online_fraction = online, cached, float(online_fraction)
        self._gen = torch.Generator().manual_seed(int(seed) + 1)
        self._lock = threading.Lock()
        self._n_online = self._n_cached = 0

    def request(self, batch: dict, rotations: Tensor | None, face_size: int) -> Handle:
        keys = list(batch["key"])
        b = len(keys)
        with self._lock:
            coins = torch.rand(b, generator=self._gen)
        use_cached = [self.cached.has(k) and float(coins[i]) >= self.online_fraction for i, k in enumerate(keys)]
        idx_c = [i for i in range(b) if use_cached[i]]
        idx_o = [i for i in range(b) if not use_cached[i]]
        with self._lock:
            self._n_online += len(idx_o)
            self._n_cached += len(idx_c)
        rgb = batch["rgb"]
        rots = _rotations_for(b, rotations, rgb.device) if rotations is not None else None
        on_handle = None
        if idx_o:
            on_handle = self.online.request(subset_batch(batch, idx_o), None if rots is None else rots[idx_o],
                                            face_size)
        cached = self.cached.lookup(subset_batch(batch, idx_c), face_size) if idx_c else None
        if on_handle is None:
            return ReadyHandle(cached.to(rgb.device))

        def merge(online: PseudoLabels) -> PseudoLabels:
            if cached is None:
                return online
            f = online.face_size
            dev = online.disparity.device
            out = PseudoLabels(torch.empty(b, 3, 3, device=dev), torch.empty(b, 6, 1, f, f, device=dev),
                               torch.empty(b, 6, dtype=torch.bool, device=dev))
            for src, idx in ((online, idx_o), (cached.to(dev), idx_c)):
                i = torch.as_tensor(idx, dtype=torch.long, device=dev)
                out.rotations[i], out.disparity[i], out.face_valid[i] = src.rotations, src.disparity, src.face_valid
            return out

        return MappedHandle(on_handle, merge)

    def stats(self) -> dict[str, float]:
        out = {f"online_{k}": v for k, v in self.online.stats().items()}
        out.update({f"cached_{k}": v for k, v in self.cached.stats().items()})
        with self._lock:
            n = self._n_online + self._n_cached
            out["online_samples"], out["cached_samples"] = float(self._n_online), float(self._n_cached)
            out["online_fraction_observed"] = self._n_online / n if n else 0.0
        out["faces"] = out.get("online_faces", 0.0) + out.get("cached_faces", 0.0)
        return out

    def close(self) -> None:
        self.online.close()
        self.cached.close()
