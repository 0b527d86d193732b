"""teacher_server.metrics: a live replica's Prometheus series, by the book and checked by promtool.

The replica runs in this process (the class Ray wraps as an actor; tests/test_teacher_pool.py scrapes real
actors) with a stand-in model: what is under test is what the replica counts and exposes."""

from __future__ import annotations

import threading
import time

import numpy as np
import torch
from promlint import check_by_the_book, families, free_port, promtool_check, scrape, value

from teacher_server.metrics import REPLICA_METRICS, TeacherMetrics

try:
    from teacher_server.replica import TeacherReplica
except ImportError:  # before the pool was split into scheduler and replica
    from teacher_server.pool import TeacherReplica


class _Teacher(torch.nn.Module):
    """Per-face disparity = channel mean; counts the faces it answers all-NaN, like the real teachers.
    ``gate`` holds a call inside the model, so that others queue behind it."""

    def __init__(self):
        super().__init__()
        self.invalid_faces = 0
        self.gate = threading.Event()
        self.gate.set()

    def forward(self, x):
        self.gate.wait(10)
        out = x.float().mean(1, keepdim=True)
        bad = ~torch.isfinite(out).flatten(1).all(1)
        self.invalid_faces += int(bad.sum())
        return out


def _faces(n, bad=0):
    x = np.random.default_rng(0).random((n, 3, 8, 8), dtype=np.float32)
    x[:bad] = np.nan
    return x


def test_live_replica_series_pass_promtool_and_count_what_happened():
    port = free_port()
    rep = TeacherReplica(_Teacher, index=1, incarnation=2, metrics_port=port - 1)  # replica i on port + i
    assert rep.metrics_port == port
    rep.infer(_faces(4), [0, 1], [0, 0])
    rep.infer(_faces(3, bad=1), [2], [1])  # a retried request with one broken face
    rep.teacher.gate.clear()  # one call holds the model, the other waits for it
    calls = [threading.Thread(target=rep.infer, args=(_faces(1), [3 + i], [0])) for i in range(2)]
    for t in calls:
        t.start()
    deadline = time.time() + 10
    while rep.stats()["active"] < 2 and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    busy = families(scrape(port))
    rep.teacher.gate.set()
    for t in calls:
        t.join(10)
    text = scrape(port)
    fams = check_by_the_book(text, {name: (kind, ()) for name, kind in REPLICA_METRICS.items()}, "replica")
    assert set(fams) == set(REPLICA_METRICS)
    assert value(fams, "panodistill_teacher_faces_total", replica="1") == 9
    assert value(fams, "panodistill_teacher_requests_total") == 5
    assert value(fams, "panodistill_teacher_batches_total") == 4
    assert value(fams, "panodistill_teacher_invalid_faces_total") == 1
    assert value(fams, "panodistill_teacher_retries_total") == 1
    assert value(fams, "panodistill_teacher_restarts_total") == 2
    assert value(fams, "panodistill_teacher_request_latency_seconds") == 4  # a histogram: one per call
    assert value(fams, "panodistill_teacher_compute_seconds") == 4
    assert value(fams, "panodistill_teacher_inflight_requests") == 0
    assert value(busy, "panodistill_teacher_inflight_requests") == 2
    assert value(busy, "panodistill_teacher_queued_requests") == 1
    promtool_check(text)


def test_a_taken_port_leaves_metrics_off_instead_of_failing():
    port = free_port()
    first, second = TeacherMetrics("0"), TeacherMetrics("1")
    assert first.serve(port)
    try:
        assert second.serve(port) is False
        assert 'panodistill_teacher_faces_total{replica="0"}' in scrape(port)
    finally:
        first.close()
    assert second.serve(port)  # free again after close()
    second.close()
