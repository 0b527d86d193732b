"""Prometheus metrics of one teacher replica (prefix ``panodistill_teacher_``).

Each Ray replica owns a :class:`TeacherMetrics` on its own registry and serves it on
``127.0.0.1:<metrics_port + replica index>`` (``RayTeacherPool(metrics_port=...)``). The trainer exports
what it sees of the teacher under ``panodistill_teacher_client_`` (``student.monitor``); the pool's own
summary is ``RayTeacherPool.stats()``.

One metric per quantity, a ``replica`` label (the replica index) on all of them (``REPLICA_METRICS``):

* ``panodistill_teacher_faces_total`` (counter): faces answered; ``rate()`` of it is faces per second;
* ``panodistill_teacher_requests_total``, ``..._batches_total``: requests (client jobs) and model calls;
* ``panodistill_teacher_invalid_faces_total``: faces answered all-NaN (non-finite or constant output);
* ``panodistill_teacher_retries_total``: requests this replica received again after another replica died;
* ``panodistill_teacher_restarts_total``: how many times this replica was restarted before this process;
* ``panodistill_teacher_request_latency_seconds`` (histogram): from arrival at the replica to the answer,
  including the wait for the model; ``panodistill_teacher_compute_seconds`` (histogram): the model call alone;
* ``panodistill_teacher_inflight_requests`` (gauge): requests inside the replica now (bounded by the
  pool's ``max_inflight``); ``panodistill_teacher_queued_requests`` (gauge): of those, waiting for the model.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

PREFIX = "panodistill_teacher_"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# name -> type: the replica's series, for documentation and tests
REPLICA_METRICS = {
    PREFIX + "faces_total": "counter",
    PREFIX + "requests_total": "counter",
    PREFIX + "batches_total": "counter",
    PREFIX + "invalid_faces_total": "counter",
    PREFIX + "retries_total": "counter",
    PREFIX + "restarts_total": "counter",
    PREFIX + "request_latency_seconds": "histogram",
    PREFIX + "compute_seconds": "histogram",
    PREFIX + "inflight_requests": "gauge",
    PREFIX + "queued_requests": "gauge",
}


class TeacherMetrics:
    """The metric objects of one replica (or of an in-process teacher), on a private registry. Attributes
    (already bound to this replica's label): counters ``faces``, ``requests``, ``batches``, ``invalid_faces``,
    ``retries``, ``restarts``; histograms ``latency``, ``compute``; gauges ``inflight``, ``queue_depth``."""

    def __init__(self, replica: str = "0", registry=None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry if registry is not None else CollectorRegistry()
        self.replica = str(replica)
        lab = ("replica",)

        def counter(name, doc):
            # prometheus_client appends _total to a counter's name
            return Counter(PREFIX + name, doc, lab, registry=self.registry).labels(self.replica)

        def histogram(name, doc):
            return Histogram(PREFIX + name, doc, lab, buckets=LATENCY_BUCKETS,
                             registry=self.registry).labels(self.replica)

        def gauge(name, doc):
            return Gauge(PREFIX + name, doc, lab, registry=self.registry).labels(self.replica)

        self.faces = counter("faces", "Cube faces answered by the teacher")
        self.requests = counter("requests", "Requests answered by the teacher")
        self.batches = counter("batches", "Model calls (micro-batches of requests)")
        self.invalid_faces = counter("invalid_faces", "Faces answered all-NaN (non-finite or constant output)")
        self.retries = counter("retries", "Requests received again after the replica that held them died")
        self.restarts = counter("restarts", "Restarts of this replica before the running process")
        self.latency = histogram("request_latency_seconds", "Request latency inside the replica, from arrival "
                                 "to answer (waiting for the model included)")
        self.compute = histogram("compute_seconds", "Duration of one model call")
        self.inflight = gauge("inflight_requests", "Requests inside the replica now")
        self.queue_depth = gauge("queued_requests", "Requests inside the replica waiting for the model")

    def serve(self, port: int, addr: str = "127.0.0.1") -> bool:
        """Serve this registry over HTTP; False (and a warning) when the port cannot be bound."""
        self._server = start_metrics_server(self.registry, port, addr)
        return self._server is not None

    def close(self) -> None:
        """Stop serving (a replica's process ends with its server; tests and in-process teachers call this)."""
        server, self._server = getattr(self, "_server", None), None
        if server is not None:
            server.shutdown()
            server.server_close()


def start_metrics_server(registry, port: int, addr: str = "127.0.0.1"):
    """The HTTP server of ``registry`` on ``addr:port``, or None (and a warning) when it cannot listen."""
    from prometheus_client import start_http_server

    try:
        server, _ = start_http_server(int(port), addr=addr, registry=registry)
        return server
    except OSError as exc:
        log.warning("teacher metrics: could not listen on %s:%s (%s); metrics stay off", addr, port, exc)
        return None
