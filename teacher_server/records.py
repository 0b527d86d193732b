"""The records the teacher pool's scheduler keeps: a caller's handle, requests, jobs, calls and replicas.

Vocabulary (used by :mod:`teacher_server.scheduler` and :mod:`teacher_server.pool`):

* a **request** is one ``submit(faces)``; its caller holds a :class:`TeacherFuture`;
* a request is cut into **jobs** of at most ``max_batch_faces`` faces; a job is the unit that is retried
  and it is answered exactly once (``_Job.done``);
* a **batch** is one model call on one replica: one or more jobs merged, in order;
* a **replica slot** is one index of the pool; its ``incarnation`` counts the actors that have held it, so
  that answers of an actor already replaced can be told apart and dropped.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


class TeacherFuture:
    """Handle of one ``submit``: ``result(timeout=None)`` blocks and returns (N, 1, F, F) on the faces'
    device, or raises the request's error. Set once: a second answer or error is ignored."""

    def __init__(self, request_id: int, n_faces: int, face_size: int, device: torch.device):
        self.request_id = request_id
        self._n, self._f, self._device = n_faces, face_size, device
        self._event = threading.Event()
        self._parts: list[torch.Tensor] | None = None
        self._error: BaseException | None = None
        self._value: torch.Tensor | None = None

    def _set(self, parts: list[torch.Tensor]) -> bool:
        if self._event.is_set():
            return False
        self._parts = parts
        self._event.set()
        return True

    def _fail(self, exc: BaseException) -> bool:
        if self._event.is_set():
            return False
        self._error = exc
        self._event.set()
        return True

    def done(self) -> bool:
        return self._event.is_set()

    def result(self, timeout: float | None = None) -> torch.Tensor:
        if not self._event.wait(timeout):
            raise TimeoutError(f"teacher request {self.request_id} not answered within {timeout} s")
        if self._error is not None:
            raise self._error
        if self._value is None:
            parts = self._parts or [torch.zeros(0, 1, self._f, self._f)]
            out = parts[0] if len(parts) == 1 else torch.cat(parts)
            self._value = out.to(self._device)
            self._parts = None
        return self._value


@dataclass(eq=False)
class _Request:
    rid: int
    future: TeacherFuture
    n_jobs: int
    t_submit: float
    parts: dict = field(default_factory=dict)  # job offset -> tensor
    failed: bool = False


@dataclass(eq=False)
class _Job:
    jid: int
    req: _Request
    offset: int
    faces: np.ndarray
    attempts: int = 0
    dispatched: bool = False
    done: bool = False

    @property
    def n(self) -> int:
        return int(self.faces.shape[0])

    @property
    def shape(self) -> tuple:
        return tuple(self.faces.shape[1:])


@dataclass(eq=False)
class _Replica:
    index: int
    actor: Any
    incarnation: int = 0
    restarts: int = 0
    alive: bool = True
    inflight: dict = field(default_factory=dict)  # batch id -> _Batch
    max_inflight_seen: int = 0
    ready: bool = False  # constructed (model loaded); a starting replica gets work only if none is ready
    restart_times: list = field(default_factory=list)


@dataclass(eq=False)
class _Batch:
    bid: int
    replica: _Replica
    incarnation: int
    jobs: list
    t_dispatch: float


def is_replica_failure(exc: BaseException) -> bool:
    """Crashes and lost workers (retry elsewhere) vs errors raised by the model code (fail the request)."""
    import ray.exceptions as rex

    from .replica import ReplicaBroken

    if isinstance(exc, rex.RayActorError):
        return True
    if isinstance(exc, rex.RayTaskError):
        return isinstance(getattr(exc, "cause", None), ReplicaBroken) or isinstance(exc, ReplicaBroken)
    return isinstance(exc, (rex.RayError, TimeoutError, ConnectionError))
