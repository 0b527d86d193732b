"""Prometheus metrics of the teacher (prefix ``panodistill_teacher_``).

Each Ray replica owns a :class:`TeacherMetrics` on its own registry and serves it on
``127.0.0.1:<metrics_port + replica index>`` (``RayTeacherPool(metrics_port=...)``). The same numbers, summed
over replicas and as seen by the client, are in ``RayTeacherPool.stats()``; :func:`register_stats` turns any
``stats()`` callable into gauges so that the trainer can export them from its own endpoint.

Series (``replica`` label on all of them):

* ``panodistill_teacher_faces_total`` (counter): faces answered; ``rate()`` of it is faces per second;
* ``panodistill_teacher_requests_total``, ``..._batches_total``: requests (client jobs) and model calls;
* ``panodistill_teacher_invalid_faces_total``: faces answered all-NaN (non-finite or constant output);
* ``panodistill_teacher_retries_total``: requests this replica received again after another replica died;
* ``panodistill_teacher_restarts_total``: how many times this replica was restarted before this process;
* ``panodistill_teacher_request_latency_seconds`` (histogram): from arrival at the replica to the answer,
  including the wait for the model; ``..._compute_seconds``: the model call alone;
* ``panodistill_teacher_inflight_requests`` (gauge): requests inside the replica now (bounded by the
  pool's ``max_inflight``); ``panodistill_teacher_queue_depth``: of those, waiting for the model.
"""

from __future__ import annotations

import logging
from typing import Callable

log = logging.getLogger(__name__)

PREFIX = "panodistill_teacher_"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class TeacherMetrics:
    """The metric objects of one replica (or of an in-process teacher), on a private registry."""

    def __init__(self, replica: str = "0", registry=None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry if registry is not None else CollectorRegistry()
        self.replica = str(replica)
        lab = ("replica",)

        def counter(name, doc):
            return Counter(PREFIX + name, doc, lab, registry=self.registry).labels(self.replica)

        self.faces = counter("faces", "Cube faces answered by the teacher")
        self.requests = counter("requests", "Requests answered by the teacher")
        self.batches = counter("batches", "Model calls (micro-batches of requests)")
        self.invalid_faces = counter("invalid_faces", "Faces answered all-NaN (non-finite or constant output)")
        self.retries = counter("retries", "Requests received again after the replica that held them died")
        self.restarts = counter("restarts", "Restarts of this replica")
        self.latency = Histogram(PREFIX + "request_latency_seconds", "Request latency inside the replica",
                                 lab, buckets=LATENCY_BUCKETS, registry=self.registry).labels(self.replica)
        self.compute = Histogram(PREFIX + "compute_seconds", "Duration of one model call", lab,
                                 buckets=LATENCY_BUCKETS, registry=self.registry).labels(self.replica)
        self.inflight = Gauge(PREFIX + "inflight_requests", "Requests inside the replica", lab,
                              registry=self.registry).labels(self.replica)
        self.queue_depth = Gauge(PREFIX + "queue_depth", "Requests waiting for the model inside the replica", lab,
                                 registry=self.registry).labels(self.replica)

    def serve(self, port: int, addr: str = "127.0.0.1") -> bool:
        """Serve this registry over HTTP; False (and a warning) when the port cannot be bound."""
        return start_metrics_server(self.registry, port, addr)


def start_metrics_server(registry, port: int, addr: str = "127.0.0.1") -> bool:
    from prometheus_client import start_http_server

    try:
        start_http_server(int(port), addr=addr, registry=registry)
        return True
    except OSError as exc:
        log.warning("teacher metrics: could not listen on %s:%s (%s); metrics stay off", addr, port, exc)
        return False


class _StatsCollector:
    def __init__(self, stats: Callable[[], dict], prefix: str):
        self.stats, self.prefix = stats, prefix

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        try:
            values = self.stats()
        except Exception as exc:  # noqa: BLE001 - a scrape must not crash the exporter
            log.debug("teacher stats unavailable: %s", exc)
            return
        for key, value in sorted(values.items()):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                name = self.prefix + "".join(c if c.isalnum() or c == "_" else "_" for c in key)
                yield GaugeMetricFamily(name, f"teacher client stat {key}", value=float(value))


def register_stats(stats: Callable[[], dict], registry=None, prefix: str = PREFIX + "client_"):
    """Expose every number of ``stats()`` (e.g. ``RayTeacherPool.stats``) as a gauge on ``registry``
    (default: prometheus_client's global registry), read at scrape time. Returns the collector."""
    if registry is None:
        from prometheus_client import REGISTRY as registry  # noqa: N811
    collector = _StatsCollector(stats, prefix)
    registry.register(collector)
    return collector
