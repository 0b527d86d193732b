"""The in-process teacher backend: the frozen model on the student's own device, answered synchronously.

Same interface as :class:`~teacher_server.pool.RayTeacherPool`: ``pseudo_label(faces)``, ``submit(faces)``
(computes at once and returns a finished handle), ``stats()``, ``close()``. Answers are returned on the
device of the faces given.
"""

from __future__ import annotations

import threading
import time

import torch
from torch import nn

from .labels import ReadyHandle
from .models import FrozenTeacher, load_teacher


class InProcessTeacher:
    """``model``: anything :func:`~teacher_server.models.load_teacher` takes (hub id, alias, local folder or
    state dict, ``tiny-random``, ``random:<size>``, ``toy:<kind>``), a ready :class:`FrozenTeacher`, or any
    ``nn.Module`` face model ``(N, C, F, F) -> (N, 1, h, w)`` raw disparity (normalised here per face)."""

    def __init__(self, model: str | nn.Module = "tiny-random", *, device: str | torch.device | None = "auto",
                 dtype: str | torch.dtype | None = "auto", input_size: int = 518, seed: int = 0,
                 max_batch_faces: int | None = None, architecture: str | None = None,
                 local_files_only: bool = False):
        if isinstance(model, FrozenTeacher):
            self.teacher = model
        else:
            self.teacher = load_teacher(model, device, dtype, input_size, seed=seed, architecture=architecture,
                                        local_files_only=local_files_only, max_batch_faces=max_batch_faces)
        self._lock = threading.Lock()
        self._requests = 0
        self._latency = 0.0
        self._t0: float | None = None
        self._t_last = 0.0
        self._closed = False

    @property
    def device(self) -> torch.device:
        return self.teacher.device

    def pseudo_label(self, faces: torch.Tensor) -> torch.Tensor:
        """(N, C, F, F) in [0, 1] -> (N, 1, F, F) per-face normalised disparity (NaN faces possible)."""
        if self._closed:
            raise RuntimeError("the in-process teacher is closed")
        t0 = time.perf_counter()
        with self._lock:
            if self._t0 is None:
                self._t0 = t0
            out = self.teacher(faces).to(faces.device)
            self._requests += 1
            self._t_last = time.perf_counter()
            self._latency += self._t_last - t0
        return out

    def submit(self, faces: torch.Tensor) -> ReadyHandle:
        return ReadyHandle(self.pseudo_label(faces))

    def stats(self) -> dict[str, float]:
        t = self.teacher
        span = (self._t_last - self._t0) if self._t0 is not None else 0.0
        return {"faces": float(t.faces_total), "requests": float(self._requests),
                "invalid_faces": float(t.invalid_faces), "compute_seconds": float(t.compute_seconds),
                "faces_per_s": t.faces_total / span if span > 0 else 0.0,
                "latency_mean_s": self._latency / self._requests if self._requests else 0.0,
                "replicas": 1.0, "retries": 0.0, "restarts": 0.0, "inflight": 0.0, "queue_depth": 0.0}

    def close(self) -> None:
        self._closed = True
