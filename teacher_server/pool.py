"""The Ray teacher pool: N frozen-teacher replicas behind one client with batching, backpressure and retries.

``RayTeacherPool(model, replicas=N, ...)`` starts N Ray actors (:class:`~teacher_server.replica.TeacherReplica`,
each loads the teacher once, on ``num_gpus`` of a GPU or on the CPU) and answers ``submit(faces) -> handle``
/ ``pseudo_label(faces)`` like the in-process backend. The pieces, one concern each:

* :mod:`teacher_server.replica`: the actor (loading, one model call per merged batch, its own metrics);
* :mod:`teacher_server.records`: the handle (:class:`TeacherFuture`) and the scheduler's records;
* :mod:`teacher_server.scheduler`: micro-batching, backpressure (``max_inflight`` calls per replica,
  ``submit`` blocks while all are full), retries of the jobs of a dead replica and restarts of the
  replica (``max_restarts`` within ``restart_window_s``), exactly-once answers. Its docstring holds the
  contracts;
* this module: building the replicas on Ray (connecting with :func:`sharding.ray_connect.connect`), the
  public client API and ``stats()``.

Metrics: ``stats()`` has the client's view (faces, faces/s, latency, in flight, queue depth, retries,
restarts, ...); ``replica_stats()`` each actor's own counters; with ``metrics_port`` each replica serves its
Prometheus series on ``127.0.0.1:metrics_port + index``.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from .records import TeacherFuture, _Replica
from .replica import ReplicaBroken, TeacherReplica, actor_class
from .scheduler import Scheduler

__all__ = ["RayTeacherPool", "ReplicaBroken", "TeacherFuture", "TeacherReplica"]

log = logging.getLogger(__name__)


class RayTeacherPool:
    """N Ray replicas of a frozen teacher behind one thread-safe client (see the module docstring).

    ``model`` is anything ``load_teacher`` takes by name (hub id, alias, local folder or state dict,
    ``tiny-random``, ``random:<size>``, ``toy:<kind>[:sleep=S]``) or a picklable zero-argument callable that
    returns a face model. ``device="auto"`` uses CUDA in a replica when ``num_gpus > 0``.

    ``max_inflight`` bounds the model calls (each carrying one or more merged requests) held by one
    replica; ``max_restarts`` bounds restarts of one replica within ``restart_window_s`` (beyond: it stays
    dead, and when all are dead requests fail); ``max_retries`` bounds how often one request is re-sent;
    ``request_timeout_s`` (off by default) treats a call that takes longer as a hung replica;
    ``extra_latency_s`` sleeps in each call (simulates a slower teacher in tests and benchmarks).
    ``resources`` adds Ray custom resources to each replica (placement on teacher nodes).
    The constructor returns once every replica has loaded its model; if one cannot, it raises the
    loading error (e.g. :class:`~teacher_server.models.TeacherUnavailableError`) after killing the others.
    """

    RATE_WINDOW_S = Scheduler.RATE_WINDOW_S

    def __init__(self, model: str | Callable[[], torch.nn.Module] = "tiny-random", *, replicas: int = 1,
                 num_gpus: float = 0.0, num_cpus: float = 1.0, max_inflight: int = 2, max_batch_faces: int = 48,
                 metrics_port: int | None = None, device: str = "auto", dtype: str = "auto",
                 input_size: int = 518, seed: int = 0, architecture: str | None = None,
                 local_files_only: bool = False, max_restarts: int = 3, restart_window_s: float = 600.0,
                 max_retries: int = 3,
                 request_timeout_s: float | None = None, startup_timeout_s: float = 600.0,
                 extra_latency_s: float = 0.0, ray_address: str | None = None, name: str = "teacher",
                 resources: dict[str, float] | None = None):
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        if max_inflight < 1 or max_batch_faces < 1:
            raise ValueError(f"max_inflight and max_batch_faces must be >= 1, got {max_inflight}, {max_batch_faces}")
        from sharding.ray_connect import connect

        connect(ray_address)
        import ray

        self.ray = ray
        from .models import teacher_factory

        self.model_name = model if isinstance(model, str) else getattr(model, "__name__", type(model).__name__)
        if device == "auto":
            device = "cuda" if num_gpus > 0 else "cpu"
        if isinstance(model, str):
            self._factory = teacher_factory(model, device=device, dtype=dtype, input_size=input_size, seed=seed,
                                            architecture=architecture, local_files_only=local_files_only)
        else:
            self._factory = teacher_factory(model, device=device, dtype=dtype)
        self.max_inflight, self.max_batch_faces = int(max_inflight), int(max_batch_faces)
        self.metrics_port = metrics_port
        self._actor_opts = dict(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0, max_task_retries=0,
                                max_concurrency=self.max_inflight + 2)
        if resources:  # e.g. {"teacher_node": 1}: replicas only on nodes that advertise it
            self._actor_opts["resources"] = dict(resources)
        self._actor_args = dict(metrics_port=metrics_port, extra_latency_s=extra_latency_s,
                                torch_threads=max(1, int(num_cpus)) if num_gpus == 0 else None)
        self.name = name

        slots = [_Replica(i, self._spawn(i, 0)) for i in range(replicas)]
        self._sched = Scheduler(slots, spawn=self._spawn, kill=self._kill, max_inflight=max_inflight,
                                max_batch_faces=max_batch_faces, max_retries=max_retries,
                                max_restarts=max_restarts, restart_window_s=restart_window_s,
                                request_timeout_s=request_timeout_s, name=name)
        self.replica_info: list[dict] = []
        try:
            self.replica_info = ray.get([r.actor.ready.remote() for r in slots], timeout=startup_timeout_s)
            for r in slots:
                r.ready = True
        except Exception as exc:
            for r in slots:
                self._kill(r.actor)
            cause = getattr(exc, "cause", None)
            if isinstance(cause, ReplicaBroken) and isinstance(cause.original, Exception):
                raise cause.original from None
            raise RuntimeError(f"the teacher pool ({replicas} replicas of {self.model_name!r}) did not start: "
                               f"{exc}") from exc
        self._sched.start()

    # -- actors --------------------------------------------------------------------------------------------

    def _spawn(self, index: int, incarnation: int):
        return actor_class().options(**self._actor_opts).remote(self._factory, index, incarnation, **self._actor_args)

    def _kill(self, actor) -> None:
        try:
            self.ray.kill(actor, no_restart=True)
        except Exception as exc:  # noqa: BLE001 - already gone
            log.debug("kill: %s", exc)

    @property
    def actors(self) -> list:
        """The current actor handle of each replica (for fault drills: ``ray.kill(pool.actors[0])``)."""
        with self._sched.lock:
            return [r.actor for r in self._sched.replicas]

    @property
    def replicas(self) -> int:
        return len(self._sched.replicas)

    @property
    def max_restarts(self) -> int:
        return self._sched.max_restarts

    @property
    def max_retries(self) -> int:
        return self._sched.max_retries

    def replica_stats(self, timeout: float = 10.0) -> list[dict]:
        """Each live replica's own counters (``TeacherReplica.stats``); ``{"index", "error"}`` for one that
        does not answer (e.g. while it restarts)."""
        with self._sched.lock:
            reps = [(r.index, r.actor) for r in self._sched.replicas if r.alive]
        out = []
        for index, actor in reps:
            try:
                out.append(self.ray.get(actor.stats.remote(), timeout=timeout))
            except Exception as exc:  # noqa: BLE001
                out.append({"index": index, "error": str(exc)})
        return out

    # -- client API ----------------------------------------------------------------------------------------

    def submit(self, faces: torch.Tensor, timeout: float | None = None) -> TeacherFuture:
        """Queue (N, C, F, F) faces; returns once they are sent to a replica (blocks while all are full,
        up to ``timeout`` seconds, then raises ``TimeoutError``)."""
        if not isinstance(faces, torch.Tensor):
            faces = torch.as_tensor(faces)
        if faces.ndim != 4 or faces.shape[-1] != faces.shape[-2]:
            raise ValueError(f"teacher faces must be (N, C, F, F), got shape {tuple(faces.shape)}")
        arr = faces.detach().to("cpu", torch.float32).contiguous().numpy()
        return self._sched.submit(arr, faces.device, timeout)

    def pseudo_label(self, faces: torch.Tensor) -> torch.Tensor:
        return self.submit(faces).result()

    def stats(self) -> dict[str, float]:
        return self._sched.stats()

    def close(self) -> None:
        """Fail what is not answered yet, stop the scheduler thread and kill the replicas."""
        if self._sched.close():
            for r in self._sched.replicas:
                self._kill(r.actor)

    def __enter__(self) -> "RayTeacherPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
