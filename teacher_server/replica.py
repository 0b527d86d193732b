"""One teacher replica: a Ray actor that loads the frozen teacher once and answers batches of faces.

Contract with the scheduler (:mod:`teacher_server.scheduler`):

* ``ready()`` returns a description once the model is loaded, or raises :class:`ReplicaBroken` when it
  could not be (the scheduler treats that like a crash: restart, retry elsewhere);
* ``infer(faces, job_ids, attempts)`` answers one merged batch ``(N, C, F, F)`` with ``(N, 1, F, F)``
  per-face normalised disparity and a small info dict. Calls wait inside the actor for the model lock, so
  the number inside is observable (``stats()["max_active"]``); the scheduler never sends more than
  ``max_inflight``, which is how backpressure reaches the replica. Errors raised by the model itself (bad
  input) propagate and fail only the requests of that call;
* ``crash()`` exits the process at once (fault drills).

With a ``metrics_port`` each replica serves its Prometheus series (:mod:`teacher_server.metrics`) on
``127.0.0.1:metrics_port + index``.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from typing import Callable

import numpy as np
import torch


class ReplicaBroken(RuntimeError):
    """The replica could not build its teacher; the client treats it like a crash (restart, retry).
    ``original`` is the exception raised while loading (pickled along, unlike ``__cause__``)."""

    def __init__(self, message: str, original: BaseException | None = None):
        super().__init__(message, original)
        self.message, self.original = message, original

    def __str__(self) -> str:
        return self.message


class TeacherReplica:
    """One teacher replica (a threaded Ray actor: calls wait in it for the model lock, so that the number
    inside is observable; the client never sends more than ``max_inflight``)."""

    def __init__(self, factory: Callable[[], torch.nn.Module], index: int = 0, incarnation: int = 0,
                 metrics_port: int | None = None, extra_latency_s: float = 0.0, torch_threads: int | None = None):
        from .metrics import TeacherMetrics

        self.index, self.incarnation = int(index), int(incarnation)
        self.extra_latency_s = float(extra_latency_s)
        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        self.metrics = TeacherMetrics(replica=str(index))
        if incarnation:
            self.metrics.restarts.inc(incarnation)
        self.metrics_port = None
        if metrics_port is not None and int(metrics_port) >= 0:
            port = int(metrics_port) + self.index
            if self.metrics.serve(port):
                self.metrics_port = port
        self._count_lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._active = self._max_active = 0
        self._faces = self._batches = self._requests = self._invalid = self._retried = 0
        self._compute_s = 0.0
        self.error: BaseException | None = None
        self.teacher = None
        try:
            self.teacher = factory()
        except Exception as exc:  # noqa: BLE001 - reported by ready() and infer()
            self.error = exc

    def _check(self):
        if self.error is not None:
            raise ReplicaBroken(f"teacher replica {self.index} could not load its model: "
                                f"{type(self.error).__name__}: {self.error}", self.error)

    def ready(self) -> dict:
        self._check()
        info = dict(self.teacher.describe()) if hasattr(self.teacher, "describe") else {}
        info.update(pid=os.getpid(), index=self.index, incarnation=self.incarnation, metrics_port=self.metrics_port,
                    torch_threads=torch.get_num_threads())
        return info

    def infer(self, faces: np.ndarray, job_ids: list[int], attempts: list[int]):
        t_in = time.perf_counter()
        with self._count_lock:
            self._active += 1
            self._max_active = max(self._max_active, self._active)
            self.metrics.inflight.set(self._active)
            self.metrics.queue_depth.set(self._active - 1)
        try:
            self._check()
            with self._model_lock:
                self.metrics.queue_depth.dec()
                t0 = time.perf_counter()
                if self.extra_latency_s > 0:
                    time.sleep(self.extra_latency_s)
                inv0 = self.teacher.invalid_faces
                with warnings.catch_warnings():  # Ray hands over read-only arrays; nothing writes into them
                    warnings.filterwarnings("ignore", message=".*not writable.*")
                    x = torch.from_numpy(np.ascontiguousarray(faces))
                out = self.teacher(x).float().cpu().numpy()
                invalid = self.teacher.invalid_faces - inv0
                compute = time.perf_counter() - t0
            n = int(faces.shape[0])
            retried = sum(1 for a in attempts if a > 0)
            with self._count_lock:
                self._faces += n
                self._batches += 1
                self._requests += len(job_ids)
                self._invalid += invalid
                self._retried += retried
                self._compute_s += compute
            m = self.metrics
            m.faces.inc(n)
            m.batches.inc()
            m.requests.inc(len(job_ids))
            m.invalid_faces.inc(invalid)
            if retried:
                m.retries.inc(retried)
            m.compute.observe(compute)
            latency = time.perf_counter() - t_in
            m.latency.observe(latency)
            return out, {"compute_s": compute, "latency_s": latency, "invalid": invalid, "pid": os.getpid(),
                         "incarnation": self.incarnation}
        finally:
            with self._count_lock:
                self._active -= 1
                self.metrics.inflight.set(self._active)
                self.metrics.queue_depth.set(max(0, self._active - (1 if self._model_lock.locked() else 0)))

    def stats(self) -> dict:
        with self._count_lock:
            return {"index": self.index, "incarnation": self.incarnation, "pid": os.getpid(),
                    "active": self._active, "max_active": self._max_active, "faces": self._faces,
                    "batches": self._batches, "requests": self._requests, "invalid_faces": self._invalid,
                    "retried_requests": self._retried, "compute_seconds": self._compute_s,
                    "metrics_port": self.metrics_port}

    def crash(self) -> None:
        """Exit the process at once (fault-injection for tests and drills)."""
        os._exit(1)


_ACTOR_CLASS = None


def actor_class():
    """``ray.remote(TeacherReplica)``, made once per process (Ray is imported only when a pool starts)."""
    global _ACTOR_CLASS
    if _ACTOR_CLASS is None:
        import ray

        _ACTOR_CLASS = ray.remote(TeacherReplica)
    return _ACTOR_CLASS
