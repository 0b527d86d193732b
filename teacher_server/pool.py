"""The Ray teacher pool: N frozen-teacher replicas behind one client with batching, backpressure and retries.

``RayTeacherPool(model, replicas=N, ...)`` starts N Ray actors (each loads the teacher once, on
``num_gpus`` of a GPU or on the CPU) and answers ``submit(faces) -> handle`` / ``pseudo_label(faces)`` like
the in-process backend. How it behaves:

* **Micro-batching.** A request of more than ``max_batch_faces`` faces is cut into jobs; jobs waiting to
  be sent (from any number of calling threads) are merged, in order, into one model call of up to
  ``max_batch_faces`` faces when a replica has room.
* **Backpressure.** Each replica holds at most ``max_inflight`` calls. ``submit`` puts its jobs in a
  staging queue and returns as soon as they have been sent to a replica; while every replica is full it
  blocks (optionally up to ``timeout``). So a caller can run ahead by up to ``replicas * max_inflight``
  calls, and the staging queue never holds more than the jobs of the callers blocked in ``submit`` (plus
  jobs being retried): there is no unbounded queue anywhere, not in the client and not in the actors.
* **Faults.** A replica that dies (crash, ``ray.kill``, ``os._exit``, lost node, or a call older than
  ``request_timeout_s``) is killed for good and a fresh actor is started in its place (up to
  ``max_restarts`` times per replica); every job it held goes back to the front of the staging queue and
  is sent again (up to ``max_retries`` times per job). Each job has an id and is answered exactly once:
  answers from a dead replica's calls that still arrive are dropped, and a handle assembles its jobs in
  submission order. Errors raised by the model itself (not crashes) fail the requests of that call.
* **Metrics.** ``stats()`` has the client's view (faces, faces/s, latency, in flight, queue depth,
  retries, restarts, ...). With ``metrics_port`` each replica serves its Prometheus series
  (``teacher_server.metrics``) on ``127.0.0.1:metrics_port + index``.

Ray is imported lazily; :func:`ensure_ray` starts a local, loopback-only Ray when none is running.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import queue
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- Ray setup


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None, object_store_memory: int | None = None):
    """Connect to Ray if not connected: ``address`` (or ``RAY_ADDRESS``), else start a local Ray bound to
    127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``; see ../shared/STACK-NOTES.md)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs: dict[str, Any] = {"address": address, "include_dashboard": False, "log_to_driver": True}
    if address == "local":
        kwargs["_node_ip_address"] = "127.0.0.1"
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
        if object_store_memory is not None:
            kwargs["object_store_memory"] = object_store_memory
    ray.init(**kwargs)
    return ray


# ------------------------------------------------------------------------------------------- the actor


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


def _actor_class():
    global _ACTOR_CLASS
    if _ACTOR_CLASS is None:
        import ray

        _ACTOR_CLASS = ray.remote(TeacherReplica)
    return _ACTOR_CLASS


# ------------------------------------------------------------------------------------------- client


class TeacherFuture:
    """Handle of one ``submit``: ``result(timeout=None)`` blocks and returns (N, 1, F, F) on the faces'
    device, or raises the request's error."""

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


def _is_replica_failure(exc: BaseException) -> bool:
    """Crashes and lost workers (retry elsewhere) vs errors raised by the model code (fail the request)."""
    import ray.exceptions as rex

    if isinstance(exc, rex.RayActorError):
        return True
    if isinstance(exc, rex.RayTaskError):
        return isinstance(getattr(exc, "cause", None), ReplicaBroken) or isinstance(exc, ReplicaBroken)
    return isinstance(exc, (rex.RayError, TimeoutError, ConnectionError))


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
    """

    RATE_WINDOW_S = 10.0  # faces_per_s is measured over the last this many seconds

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
        self.ray = ensure_ray(ray_address)
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
        self.max_restarts, self.max_retries = int(max_restarts), int(max_retries)
        self.restart_window_s = float(restart_window_s)
        self.request_timeout_s = request_timeout_s
        self.metrics_port = metrics_port
        self._actor_opts = dict(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0, max_task_retries=0,
                                max_concurrency=self.max_inflight + 2)
        if resources:  # e.g. {"teacher_node": 1}: replicas only on nodes that advertise it
            self._actor_opts["resources"] = dict(resources)
        self._actor_args = dict(metrics_port=metrics_port, extra_latency_s=extra_latency_s,
                                torch_threads=max(1, int(num_cpus)) if num_gpus == 0 else None)
        self.name = name

        self._cv = threading.Condition(threading.RLock())
        self._staged: collections.deque[_Job] = collections.deque()
        self._inflight: dict[int, _Batch] = {}
        self._done_q: queue.SimpleQueue = queue.SimpleQueue()  # (batch id, future) from Ray's callback thread
        self._ids = itertools.count()
        self._closed = False
        self._c = collections.Counter()  # counters for stats()
        self._latencies: collections.deque[float] = collections.deque(maxlen=2048)
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, faces) of 10 s
        self._t_first: float | None = None
        self._t_last = 0.0

        self._replicas = [_Replica(i, self._spawn(i, 0)) for i in range(replicas)]
        self.replica_info: list[dict] = []
        try:
            refs = [r.actor.ready.remote() for r in self._replicas]
            self.replica_info = self.ray.get(refs, timeout=startup_timeout_s)
            for r in self._replicas:
                r.ready = True
        except Exception as exc:
            for r in self._replicas:
                self._kill(r.actor)
            cause = getattr(exc, "cause", None)
            if isinstance(cause, ReplicaBroken) and isinstance(cause.original, Exception):
                raise cause.original from None
            raise RuntimeError(f"the teacher pool ({replicas} replicas of {self.model_name!r}) did not start: "
                               f"{exc}") from exc
        self._thread = threading.Thread(target=self._run, name=f"{name}-pool", daemon=True)
        self._thread.start()

    # -- actors --------------------------------------------------------------------------------------------

    def _spawn(self, index: int, incarnation: int):
        cls = _actor_class()
        return cls.options(**self._actor_opts).remote(self._factory, index, incarnation, **self._actor_args)

    def _kill(self, actor) -> None:
        try:
            self.ray.kill(actor, no_restart=True)
        except Exception as exc:  # noqa: BLE001 - already gone
            log.debug("kill: %s", exc)

    @property
    def actors(self) -> list:
        """The current actor handle of each replica (for fault drills: ``ray.kill(pool.actors[0])``)."""
        with self._cv:
            return [r.actor for r in self._replicas]

    @property
    def replicas(self) -> int:
        return len(self._replicas)

    def replica_stats(self, timeout: float = 10.0) -> list[dict]:
        """Each live replica's own counters (``TeacherReplica.stats``); ``{"index", "error"}`` for one that
        does not answer (e.g. while it restarts)."""
        with self._cv:
            reps = [(r.index, r.actor) for r in self._replicas if r.alive]
        out = []
        for index, actor in reps:
            try:
                out.append(self.ray.get(actor.stats.remote(), timeout=timeout))
            except Exception as exc:  # noqa: BLE001
                out.append({"index": index, "error": str(exc)})
        return out

    # -- client API ----------------------------------------------------------------------------------------

    def submit(self, faces: torch.Tensor, timeout: float | None = None) -> TeacherFuture:
        """Queue (N, C, F, F) faces; returns once they are sent to a replica (blocks while all are full)."""
        if not isinstance(faces, torch.Tensor):
            faces = torch.as_tensor(faces)
        if faces.ndim != 4 or faces.shape[-1] != faces.shape[-2]:
            raise ValueError(f"teacher faces must be (N, C, F, F), got shape {tuple(faces.shape)}")
        n, f = int(faces.shape[0]), int(faces.shape[-1])
        arr = faces.detach().to("cpu", torch.float32).contiguous().numpy()
        t0 = time.perf_counter()
        with self._cv:
            if self._closed:
                raise RuntimeError("the teacher pool is closed")
            rid = next(self._ids)
            fut = TeacherFuture(rid, n, f, faces.device)
            if n == 0:
                fut._set([torch.zeros(0, 1, f, f)])
                return fut
            if not any(r.alive for r in self._replicas):
                raise RuntimeError("every teacher replica has failed; see the log")
            step = self.max_batch_faces
            req = _Request(rid, fut, (n + step - 1) // step, t0)
            jobs = [_Job(next(self._ids), req, i, arr[i:i + step]) for i in range(0, n, step)]
            self._staged.extend(jobs)
            self._c["requests"] += 1
            self._c["faces_submitted"] += n
            if self._t_first is None:
                self._t_first = t0
            self._dispatch_locked()
            deadline = None if timeout is None else t0 + timeout
            while not all(j.dispatched for j in jobs) and not req.failed:
                left = None if deadline is None else deadline - time.perf_counter()
                if left is not None and left <= 0:
                    self._fail_request(req, TimeoutError(f"teacher pool busy: request {rid} not sent within {timeout} s"))
                    self._purge_staged()
                    break
                self._cv.wait(left)
            self._c["submit_wait_seconds_x1e6"] += int((time.perf_counter() - t0) * 1e6)
        if req.failed and fut._error is not None and isinstance(fut._error, TimeoutError):
            raise fut._error
        return fut

    def pseudo_label(self, faces: torch.Tensor) -> torch.Tensor:
        return self.submit(faces).result()

    def stats(self) -> dict[str, float]:
        with self._cv:
            c = self._c
            lat = sorted(self._latencies)
            now = time.perf_counter()
            start = max(now - self.RATE_WINDOW_S, self._t_first if self._t_first is not None else now)
            recent = sum(n for t, n in self._recent if t >= now - self.RATE_WINDOW_S)
            done = c["faces_completed"]
            out = {
                "faces": float(done), "faces_submitted": float(c["faces_submitted"]),
                "faces_per_s": recent / (now - start) if now > start else 0.0,  # over the last RATE_WINDOW_S
                "requests": float(c["requests"]), "requests_completed": float(c["requests_completed"]),
                "requests_failed": float(c["requests_failed"]), "batches": float(c["batches"]),
                "mean_batch_faces": c["batch_faces"] / c["batches"] if c["batches"] else 0.0,
                "invalid_faces": float(c["invalid_faces"]), "compute_seconds": c["compute_us"] / 1e6,
                "retries": float(c["retries"]), "restarts": float(c["restarts"]),
                "replica_failures": float(c["replica_failures"]),
                "stale_results_dropped": float(c["stale"]), "duplicates_dropped": float(c["duplicates"]),
                "replicas": float(len(self._replicas)),
                "replicas_alive": float(sum(r.alive for r in self._replicas)),
                "inflight": float(len(self._inflight)),
                "inflight_jobs": float(sum(len(b.jobs) for b in self._inflight.values())),
                "queue_depth": float(len(self._staged)),
                "max_inflight": float(self.max_inflight),
                "max_inflight_observed": float(max((r.max_inflight_seen for r in self._replicas), default=0)),
                "submit_wait_seconds": c["submit_wait_seconds_x1e6"] / 1e6,
                "latency_mean_s": sum(lat) / len(lat) if lat else 0.0,
                "latency_p50_s": lat[len(lat) // 2] if lat else 0.0,
                "latency_p95_s": lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else 0.0,
                "latency_max_s": lat[-1] if lat else 0.0,
            }
        return out

    def close(self) -> None:
        """Fail what is not answered yet, stop the client thread and kill the replicas."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            err = RuntimeError("the teacher pool was closed before answering")
            for job in list(self._staged):
                self._fail_request(job.req, err)
            self._staged.clear()
            for b in list(self._inflight.values()):
                for job in b.jobs:
                    self._fail_request(job.req, err)
            self._inflight.clear()
            self._cv.notify_all()
        self._thread.join(timeout=10)
        for r in self._replicas:
            self._kill(r.actor)

    def __enter__(self) -> "RayTeacherPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- dispatching (under the lock) ----------------------------------------------------------------------

    def _pick_replica(self) -> _Replica | None:
        alive = [r for r in self._replicas if r.alive]
        if any(r.ready for r in alive):  # a restarting replica waits while a ready one exists
            alive = [r for r in alive if r.ready]
        free = [r for r in alive if len(r.inflight) < self.max_inflight]
        return min(free, key=lambda r: (len(r.inflight), r.index)) if free else None

    def _purge_staged(self) -> None:
        self._staged = collections.deque(j for j in self._staged if not j.req.failed)

    def _dispatch_locked(self) -> None:
        while self._staged:
            rep = self._pick_replica()
            if rep is None:
                break
            first = self._staged.popleft()
            if first.req.failed or first.done:
                continue
            jobs, n, i = [first], first.n, 0
            while i < len(self._staged) and n < self.max_batch_faces:
                job = self._staged[i]
                if job.req.failed or job.done:
                    del self._staged[i]
                elif job.shape == first.shape and n + job.n <= self.max_batch_faces:
                    jobs.append(job)
                    n += job.n
                    del self._staged[i]
                else:
                    i += 1
            faces = jobs[0].faces if len(jobs) == 1 else np.concatenate([j.faces for j in jobs])
            bid = next(self._ids)
            batch = _Batch(bid, rep, rep.incarnation, jobs, time.perf_counter())
            ref = rep.actor.infer.remote(faces, [j.jid for j in jobs], [j.attempts for j in jobs])
            for j in jobs:
                j.dispatched = True
            rep.inflight[bid] = batch
            rep.max_inflight_seen = max(rep.max_inflight_seen, len(rep.inflight))
            self._inflight[bid] = batch
            self._c["batches"] += 1
            self._c["batch_faces"] += n
            ref.future().add_done_callback(lambda fut, bid=bid: self._on_done(bid, fut))
        self._cv.notify_all()

    def _on_done(self, bid: int, fut) -> None:
        # Ray's callback thread: hand over without taking the lock (whoever holds it may be inside a Ray
        # call that needs this very thread)
        self._done_q.put((bid, fut))

    # -- the client thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        last_check = time.perf_counter()
        while not self._closed:
            try:
                done = [self._done_q.get(timeout=0.25)]
            except queue.Empty:
                done = []
            while True:
                try:
                    done.append(self._done_q.get_nowait())
                except queue.Empty:
                    break
            # successes before failures: a dead replica's finished answers are kept, not recomputed
            results = []
            for bid, fut in done:
                if isinstance(bid, tuple):  # ("ready", replica, incarnation)
                    self._replica_ready(bid[1], bid[2], fut)
                    continue
                try:
                    results.append((bid, fut.result(), None))
                except BaseException as exc:  # noqa: BLE001 - classified in _complete
                    results.append((bid, None, exc))
            results.sort(key=lambda t: t[2] is not None)
            with self._cv:
                if self._closed:
                    return
                for bid, value, exc in results:
                    self._complete(bid, value, exc)
                if self.request_timeout_s and time.perf_counter() - last_check > 0.5:
                    last_check = time.perf_counter()
                    self._check_timeouts()
                if results:
                    self._dispatch_locked()

    def _check_timeouts(self) -> None:
        now = time.perf_counter()
        for b in list(self._inflight.values()):
            if now - b.t_dispatch > self.request_timeout_s and b.bid in self._inflight:
                log.warning("teacher replica %d: call %d took over %.0f s; restarting it", b.replica.index,
                            b.bid, self.request_timeout_s)
                self._replica_failed(b.replica, b.incarnation, TimeoutError("teacher call timed out"))
        self._dispatch_locked()

    def _complete(self, bid: int, value, exc: BaseException | None) -> None:
        batch = self._inflight.pop(bid, None)
        if batch is None:  # its replica was already declared dead and its jobs re-sent
            self._c["stale"] += 1
            return
        batch.replica.inflight.pop(bid, None)
        if exc is not None:
            if _is_replica_failure(exc):
                self._replica_failed(batch.replica, batch.incarnation, exc, also=[batch])
            else:
                for job in batch.jobs:
                    self._fail_request(job.req, exc)
            return
        out, info = value
        self._c["compute_us"] += int(info.get("compute_s", 0.0) * 1e6)
        self._c["invalid_faces"] += int(info.get("invalid", 0))
        now = time.perf_counter()
        o = 0
        for job in batch.jobs:
            part = torch.from_numpy(np.array(out[o:o + job.n]))  # own copy: Ray's arrays are read-only
            o += job.n
            if job.done:
                self._c["duplicates"] += 1
                continue
            job.done = True
            req = job.req
            if req.failed:
                continue
            req.parts[job.offset] = part
            self._c["faces_completed"] += job.n
            self._recent.append((now, job.n))
            if len(req.parts) == req.n_jobs:
                if req.future._set([req.parts[k] for k in sorted(req.parts)]):
                    self._c["requests_completed"] += 1
                    self._latencies.append(now - req.t_submit)
                req.parts = {}
        self._t_last = now
        while self._recent and now - self._recent[0][0] > self.RATE_WINDOW_S:
            self._recent.popleft()

    def _requeue(self, batches: list[_Batch]) -> None:
        jobs = []
        for b in batches:
            for job in b.jobs:
                if job.done or job.req.failed:
                    continue
                job.attempts += 1
                self._c["retries"] += 1
                if job.attempts > self.max_retries:
                    self._fail_request(job.req, RuntimeError(
                        f"teacher request {job.req.rid} lost its replica {job.attempts} times; giving up"))
                else:
                    jobs.append(job)
        jobs.sort(key=lambda j: j.jid)
        self._staged.extendleft(reversed(jobs))

    def _replica_failed(self, rep: _Replica, incarnation: int, exc: BaseException, also: list | None = None) -> None:
        """Declare one incarnation of a replica dead: re-send what it held (and ``also``), start a new one."""
        if rep.incarnation != incarnation or not rep.alive:
            self._requeue(also or [])
            return  # this incarnation was already replaced
        self._c["replica_failures"] += 1
        log.warning("teacher replica %d (incarnation %d) failed: %s", rep.index, incarnation,
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        held = list(also or []) + list(rep.inflight.values())
        for b in held:
            self._inflight.pop(b.bid, None)
        rep.inflight.clear()
        self._requeue(held)
        self._kill(rep.actor)
        now = time.monotonic()
        rep.restart_times = [t for t in rep.restart_times if now - t < self.restart_window_s]
        if len(rep.restart_times) >= self.max_restarts:
            rep.alive = False
            log.error("teacher replica %d failed %d times within %.0f s; leaving it dead", rep.index,
                      len(rep.restart_times) + 1, self.restart_window_s)
            if not any(r.alive for r in self._replicas):
                err = RuntimeError(f"every teacher replica has failed (last error: {exc})")
                for job in list(self._staged):
                    self._fail_request(job.req, err)
                self._staged.clear()
            return
        rep.restarts += 1
        rep.restart_times.append(now)
        rep.incarnation += 1
        rep.ready = False
        self._c["restarts"] += 1
        rep.actor = self._spawn(rep.index, rep.incarnation)
        key = ("ready", rep, rep.incarnation)
        rep.actor.ready.remote().future().add_done_callback(lambda fut, key=key: self._on_done(key, fut))

    def _replica_ready(self, rep: _Replica, incarnation: int, fut) -> None:
        try:
            info = fut.result()
        except BaseException as exc:  # noqa: BLE001
            with self._cv:
                self._replica_failed(rep, incarnation, exc)
                self._dispatch_locked()
            return
        with self._cv:
            if rep.incarnation == incarnation and rep.alive:
                rep.ready = True
                log.info("teacher replica %d is back (incarnation %d, pid %s)", rep.index, incarnation, info.get("pid"))
                self._dispatch_locked()

    def _fail_request(self, req: _Request, exc: BaseException) -> None:
        if req.failed:
            return
        req.failed = True
        if req.future._fail(exc):
            self._c["requests_failed"] += 1
        self._cv.notify_all()
