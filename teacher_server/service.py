"""One teacher pool shared by every training worker of a cluster run.

A ``RayTeacherPool`` client owns its replicas: it restarts the ones that die and re-sends what they held.
Several training workers cannot each own the same replicas, so in cluster mode the driver starts the pool
inside one ``TeacherService`` actor, and every worker reaches it through a ``ServiceClient``, which has the
backend interface (``submit`` / ``pseudo_label`` / ``stats`` / ``close``). Replica faults are handled once,
in the service, with the pool's exactly-once guarantee.

Bounds: a training worker keeps at most ``teacher.lookahead + 1`` requests out, so the service never holds
more than ``workers x (lookahead + 1)``; the pool inside bounds what each replica holds (``max_inflight``).
Cost: faces travel worker -> service -> replica through Ray's object store (shared memory on one node).
"""

from __future__ import annotations

import numpy as np
import torch


def _service_class():
    import ray

    @ray.remote(num_cpus=0, max_concurrency=64)
    class TeacherService:
        def __init__(self, pool_kwargs: dict):
            from teacher_server.pool import RayTeacherPool

            model = pool_kwargs.pop("model")
            self.pool = RayTeacherPool(model, **pool_kwargs)

        def pseudo_label(self, faces: np.ndarray) -> np.ndarray:
            return self.pool.pseudo_label(torch.from_numpy(faces)).numpy()

        def stats(self) -> dict:
            return self.pool.stats()

        def actors(self) -> list:
            return self.pool.actors

        def close(self) -> None:
            self.pool.close()

    return TeacherService


def start_service(model: str, *, actor_options: dict | None = None, **pool_kwargs):
    """Start the shared pool's actor (from the driver); returns its handle once the replicas are up.

    ``actor_options`` go to ``.options()`` of the service actor (e.g. a resource that pins it to the head
    node). If the replicas cannot start, the actor is killed and the error raised here."""
    import ray

    handle = _service_class().options(**(actor_options or {})).remote(dict(pool_kwargs, model=model))
    try:
        ray.get(handle.stats.remote())  # raises here if the replicas could not start
    except Exception:
        ray.kill(handle, no_restart=True)
        raise
    return handle


class _RefHandle:
    def __init__(self, ref, device: torch.device):
        self.ref, self.device = ref, device

    def result(self, timeout: float | None = None) -> torch.Tensor:
        import ray

        # Ray hands back a read-only view of its object store: copy it into a tensor we own
        return torch.tensor(ray.get(self.ref, timeout=timeout)).to(self.device)

    def done(self) -> bool:
        import ray

        ready, _ = ray.wait([self.ref], timeout=0)
        return bool(ready)


class ServiceClient:
    """A training worker's view of the shared teacher service (same interface as the backends)."""

    def __init__(self, handle):
        self.handle = handle

    def submit(self, faces: torch.Tensor) -> _RefHandle:
        ref = self.handle.pseudo_label.remote(np.ascontiguousarray(faces.detach().float().cpu().numpy()))
        return _RefHandle(ref, faces.device)

    def pseudo_label(self, faces: torch.Tensor) -> torch.Tensor:
        return self.submit(faces).result()

    def stats(self) -> dict[str, float]:
        import ray

        return ray.get(self.handle.stats.remote())

    def close(self) -> None:
        """The driver owns the service; a worker only lets go of its handle."""

    def shutdown(self) -> None:
        """Stop the pool and its replicas (the driver, at the end of the run)."""
        import ray

        try:
            ray.get(self.handle.close.remote(), timeout=60)
        finally:
            ray.kill(self.handle, no_restart=True)
