"""The teacher pool's scheduler: one thread-safe queue in front of N replicas, and one thread behind them.

It does not know how replicas are made; :class:`~teacher_server.pool.RayTeacherPool` gives it the slots
(:class:`~teacher_server.records._Replica`) and two callbacks, ``spawn(index, incarnation) -> actor`` and
``kill(actor)``. Its contracts:

* **Micro-batching.** ``submit`` cuts a request into jobs of at most ``max_batch_faces`` faces. Jobs
  waiting to be sent (from any number of calling threads) are merged, in order, into one model call of up
  to ``max_batch_faces`` faces of the same shape whenever a replica has room.
* **Backpressure.** A replica holds at most ``max_inflight`` calls. ``submit`` puts its jobs in the staging
  queue and returns as soon as all of them have been sent to a replica; while every replica is full it
  blocks (optionally up to ``timeout``, then fails that request with ``TimeoutError``). A caller can thus
  run ahead by up to ``replicas * max_inflight`` calls, and the staging queue never holds more than the
  jobs of the callers blocked in ``submit`` plus jobs being retried: no queue anywhere is unbounded.
* **Retry and restart.** A replica that dies (crash, ``ray.kill``, ``os._exit``, lost node, a model that
  could not load, or a call older than ``request_timeout_s``) is killed for good and a fresh actor is
  started in its slot, at most ``max_restarts`` times within ``restart_window_s`` (beyond: the slot stays
  dead; when every slot is dead, waiting and new requests fail). Every job it held goes back to the front
  of the staging queue, in submission order, and is sent again, at most ``max_retries`` times. A restarting
  replica gets work only while no other replica is ready.
* **Exactly once.** Each job has an id and is answered once: late answers of a replaced incarnation are
  dropped (``stale_results_dropped``), a handle assembles its jobs in submission order. Errors raised by
  the model itself (not crashes) fail the requests of that call and are not retried.

Threads: callers take the lock in ``submit``/``stats``; Ray's callback thread only puts finished futures
on a queue (it must never wait for the lock: a holder may be inside a Ray call that needs that thread);
the scheduler thread drains that queue, completes requests, handles failures and dispatches.
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import threading
import time
from typing import Any, Callable

import numpy as np
import torch

from .records import TeacherFuture, _Batch, _Job, _Replica, _Request, is_replica_failure

log = logging.getLogger("teacher_server.pool")


class Scheduler:
    """Batching, backpressure, retries and restarts for the replica slots ``replicas`` (see the module
    docstring). ``start()`` starts its thread once the replicas are ready; ``close()`` fails what is not
    answered and stops the thread (killing the actors is the owner's job)."""

    RATE_WINDOW_S = 10.0  # faces_per_s is measured over the last this many seconds

    def __init__(self, replicas: list[_Replica], *, spawn: Callable[[int, int], Any], kill: Callable[[Any], None],
                 max_inflight: int, max_batch_faces: int, max_retries: int, max_restarts: int,
                 restart_window_s: float, request_timeout_s: float | None, name: str = "teacher"):
        self.replicas = replicas
        self._spawn, self._kill = spawn, kill
        self.max_inflight, self.max_batch_faces = int(max_inflight), int(max_batch_faces)
        self.max_restarts, self.max_retries = int(max_restarts), int(max_retries)
        self.restart_window_s = float(restart_window_s)
        self.request_timeout_s = request_timeout_s
        self.lock = threading.Condition(threading.RLock())
        self._staged: collections.deque[_Job] = collections.deque()
        self._inflight: dict[int, _Batch] = {}
        self._done_q: queue.SimpleQueue = queue.SimpleQueue()  # (batch id, future) from Ray's callback thread
        self._ids = itertools.count()
        self.closed = False
        self._c = collections.Counter()  # counters for stats()
        self._latencies: collections.deque[float] = collections.deque(maxlen=2048)
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, faces) of the window
        self._t_first: float | None = None
        self._thread = threading.Thread(target=self._run, name=f"{name}-pool", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # -- the callers' side ---------------------------------------------------------------------------------

    def submit(self, arr: np.ndarray, device: torch.device, timeout: float | None = None) -> TeacherFuture:
        """Stage (N, C, F, F) float32 faces; return once every job is sent (see Backpressure)."""
        n, f = int(arr.shape[0]), int(arr.shape[-1])
        t0 = time.perf_counter()
        with self.lock:
            if self.closed:
                raise RuntimeError("the teacher pool is closed")
            rid = next(self._ids)
            fut = TeacherFuture(rid, n, f, device)
            if n == 0:
                fut._set([torch.zeros(0, 1, f, f)])
                return fut
            if not any(r.alive for r in self.replicas):
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
                self.lock.wait(left)
            self._c["submit_wait_seconds_x1e6"] += int((time.perf_counter() - t0) * 1e6)
        if req.failed and fut._error is not None and isinstance(fut._error, TimeoutError):
            raise fut._error
        return fut

    def stats(self) -> dict[str, float]:
        with self.lock:
            c = self._c
            lat = sorted(self._latencies)
            now = time.perf_counter()
            start = max(now - self.RATE_WINDOW_S, self._t_first if self._t_first is not None else now)
            recent = sum(n for t, n in self._recent if t >= now - self.RATE_WINDOW_S)
            return {
                "faces": float(c["faces_completed"]), "faces_submitted": float(c["faces_submitted"]),
                "faces_per_s": recent / (now - start) if now > start else 0.0,  # over the last RATE_WINDOW_S
                "requests": float(c["requests"]), "requests_completed": float(c["requests_completed"]),
                "requests_failed": float(c["requests_failed"]), "batches": float(c["batches"]),
                "mean_batch_faces": c["batch_faces"] / c["batches"] if c["batches"] else 0.0,
                "invalid_faces": float(c["invalid_faces"]), "compute_seconds": c["compute_us"] / 1e6,
                "retries": float(c["retries"]), "restarts": float(c["restarts"]),
                "replica_failures": float(c["replica_failures"]),
                "stale_results_dropped": float(c["stale"]), "duplicates_dropped": float(c["duplicates"]),
                "replicas": float(len(self.replicas)),
                "replicas_alive": float(sum(r.alive for r in self.replicas)),
                "inflight": float(len(self._inflight)),
                "inflight_jobs": float(sum(len(b.jobs) for b in self._inflight.values())),
                "queue_depth": float(len(self._staged)),
                "max_inflight": float(self.max_inflight),
                "max_inflight_observed": float(max((r.max_inflight_seen for r in self.replicas), default=0)),
                "submit_wait_seconds": c["submit_wait_seconds_x1e6"] / 1e6,
                "latency_mean_s": sum(lat) / len(lat) if lat else 0.0,
                "latency_p50_s": lat[len(lat) // 2] if lat else 0.0,
                "latency_p95_s": lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else 0.0,
                "latency_max_s": lat[-1] if lat else 0.0,
            }

    def close(self) -> bool:
        """Fail every request not answered yet and stop the thread; False if it was closed already."""
        with self.lock:
            if self.closed:
                return False
            self.closed = True
            err = RuntimeError("the teacher pool was closed before answering")
            for job in list(self._staged):
                self._fail_request(job.req, err)
            self._staged.clear()
            for b in list(self._inflight.values()):
                for job in b.jobs:
                    self._fail_request(job.req, err)
            self._inflight.clear()
            self.lock.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        return True

    # -- dispatching (under the lock) ----------------------------------------------------------------------

    def _pick_replica(self) -> _Replica | None:
        alive = [r for r in self.replicas if r.alive]
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
            ref.future().add_done_callback(lambda fut, bid=bid: self._done_q.put((bid, fut)))
        self.lock.notify_all()

    # -- the scheduler thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        last_check = time.perf_counter()
        while not self.closed:
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
            with self.lock:
                if self.closed:
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
            if is_replica_failure(exc):
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
            if not any(r.alive for r in self.replicas):
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
        rep.actor.ready.remote().future().add_done_callback(lambda fut, key=key: self._done_q.put((key, fut)))

    def _replica_ready(self, rep: _Replica, incarnation: int, fut) -> None:
        try:
            info = fut.result()
        except BaseException as exc:  # noqa: BLE001 - a restart that failed to load is another failure
            with self.lock:
                self._replica_failed(rep, incarnation, exc)
                self._dispatch_locked()
            return
        with self.lock:
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
        self.lock.notify_all()
