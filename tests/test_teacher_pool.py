"""The Ray teacher pool with real actors on a local, loopback-only Ray (one instance for the module)."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request

import pytest
import torch

from teacher_server.inprocess import InProcessTeacher
from teacher_server.labels import OnlineLabels

INPUT, F_SIZE = 42, 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def metrics_port():
    return _free_port()


@pytest.fixture(scope="module")
def pool(ray_local, metrics_port):
    from teacher_server.pool import RayTeacherPool

    # a short extra latency per call keeps calls in flight long enough to kill a replica under them
    p = RayTeacherPool("tiny-random", replicas=2, input_size=INPUT, max_inflight=2, max_batch_faces=24,
                       metrics_port=metrics_port, extra_latency_s=0.05)
    yield p
    p.close()


@pytest.fixture(scope="module")
def reference():
    return InProcessTeacher("tiny-random", device="cpu", input_size=INPUT)


def _requests(n, faces=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(faces, 3, F_SIZE, F_SIZE, generator=g) for _ in range(n)]


def test_pool_answers_like_the_in_process_teacher(pool, reference):
    reqs = _requests(6) + [torch.rand(50, 3, F_SIZE, F_SIZE)]  # the last one is cut into 3 calls
    handles = [pool.submit(r) for r in reqs]
    for r, h in zip(reqs, handles):
        got = h.result(timeout=60)
        assert got.shape == (r.shape[0], 1, F_SIZE, F_SIZE)
        assert (got - reference.pseudo_label(r)).abs().max() < 1e-5
    # the same through the label source
    g = torch.Generator().manual_seed(1)
    batch = {"key": ["a", "b"], "rgb": torch.rand(2, 3, 32, 64, generator=g)}
    rots = torch.stack([torch.eye(3), torch.tensor([[0.0, 0, 1], [0, 1, 0], [-1, 0, 0]])])
    via_pool = OnlineLabels(pool).request(batch, rots, 16).result()
    direct = OnlineLabels(reference).request(batch, rots, 16).result()
    assert (via_pool.disparity - direct.disparity).abs().max() < 1e-5
    stats = pool.stats()
    assert stats["faces"] >= 6 * 6 + 50 + 12 and stats["requests_failed"] == 0


def test_each_replica_serves_prometheus_metrics(pool, metrics_port):
    pool.pseudo_label(_requests(1)[0])
    infos = pool.replica_stats()
    assert [i["metrics_port"] for i in infos] == [metrics_port, metrics_port + 1]
    texts = [urllib.request.urlopen(f"http://127.0.0.1:{metrics_port + i}/metrics", timeout=10).read().decode()
             for i in range(2)]
    for i, text in enumerate(texts):
        assert f'panodistill_teacher_inflight_requests{{replica="{i}"}}' in text
        assert "panodistill_teacher_request_latency_seconds_bucket" in text
    faces = sum(float(line.rsplit(" ", 1)[1]) for text in texts for line in text.splitlines()
                if line.startswith("panodistill_teacher_faces_total"))
    assert faces == sum(i["faces"] for i in infos) > 0


def test_killed_replicas_lose_and_duplicate_nothing(pool, reference, ray_local):
    before = pool.stats()
    reqs = _requests(20, seed=5)
    handles = []
    for i, r in enumerate(reqs):
        handles.append(pool.submit(r, timeout=60))
        if i == 4:
            ray_local.kill(pool.actors[0])  # killed from outside, with calls in flight
        if i == 6:  # soon after, so that both restarts overlap (keeps the test short)
            pool.actors[1].crash.remote()  # the process exits inside the replica
    results = [h.result(timeout=120) for h in handles]
    for r, got in zip(reqs, results):
        assert (got - reference.pseudo_label(r)).abs().max() < 1e-5
    after = pool.stats()
    assert after["requests_completed"] - before["requests_completed"] == 20
    assert after["faces"] - before["faces"] == 20 * 6  # every face answered exactly once
    assert after["duplicates_dropped"] == 0 and after["requests_failed"] == 0
    assert after["retries"] > before["retries"]
    assert after["restarts"] - before["restarts"] == 2 and after["replica_failures"] - before["replica_failures"] == 2
    assert after["replicas_alive"] == 2
    incarnations = [s["incarnation"] for s in pool.replica_stats()]
    assert incarnations == [1, 1]
    # the pool keeps working afterwards
    r = _requests(1, seed=9)[0]
    assert (pool.pseudo_label(r) - reference.pseudo_label(r)).abs().max() < 1e-5


def test_precompute_runs_over_the_pool(pool, tmp_path, reference):
    from teacher_server.precompute import cube_faces, precompute
    from teacher_server.store import PseudoLabelStore

    g = torch.Generator().manual_seed(2)
    samples = [{"key": f"k{i}", "rgb": torch.rand(3, 32, 64, generator=g)} for i in range(4)]
    out = precompute(None, str(tmp_path / "s.lmdb"), rotations=2, model="tiny-random", face_size=16,
                     input_size=INPUT, seed=1, backend=pool, samples=samples)
    assert out["computed"] == 4 and out["teacher_seconds"] > 0
    store = PseudoLabelStore(tmp_path / "s.lmdb", readonly=True)
    rots, disp = store.get("k2")
    want = reference.pseudo_label(cube_faces(samples[2]["rgb"], rots, 16)).reshape(2, 6, 1, 16, 16)
    assert (disp - want).abs().max() < 1e-3


@pytest.fixture(scope="module")
def slow_pool(ray_local):
    from teacher_server.pool import RayTeacherPool

    p = RayTeacherPool("toy:luma:sleep=0.3", replicas=1, max_inflight=2, max_batch_faces=24)
    yield p
    p.close()


def test_backpressure_bounds_requests_in_flight(slow_pool):
    seen, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            seen.append(slow_pool.stats()["inflight"])
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    reqs = _requests(8, seed=3)
    waits, handles = [], []
    for r in reqs:
        t0 = time.perf_counter()
        handles.append(slow_pool.submit(r))
        waits.append(time.perf_counter() - t0)
    for h in handles:
        h.result(timeout=60)
    stop.set()
    watcher.join()
    assert max(seen) == 2  # the bound is reached and never exceeded
    assert max(waits[:2]) < 0.25  # the first two run ahead without waiting
    assert sum(waits[2:]) > 1.0  # the others wait for room (6 x ~0.3 s of model time)
    replica = slow_pool.replica_stats()[0]
    assert replica["max_active"] == 2  # inside the actor too: never more than max_inflight calls
    assert slow_pool.stats()["max_inflight_observed"] == 2


def test_small_requests_of_concurrent_callers_are_merged(slow_pool):
    toy = InProcessTeacher("toy:luma", device="cpu")
    before = slow_pool.stats()["batches"]
    first = [slow_pool.submit(r) for r in _requests(2, seed=4)]  # fills both slots
    reqs = _requests(4, seed=6)
    results = [None] * 4

    def call(i):
        results[i] = slow_pool.pseudo_label(reqs[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for h in first:
        h.result(timeout=60)
    assert slow_pool.stats()["batches"] - before == 3  # 2 alone, then the 4 waiting requests in one call
    for r, got in zip(reqs, results):
        assert torch.allclose(got, toy.pseudo_label(r), atol=1e-6)


def test_model_errors_fail_the_request_without_retries(pool):
    before = pool.stats()
    bad = pool.submit(torch.rand(6, 4, F_SIZE, F_SIZE))  # four channels: the RGB teacher refuses them
    with pytest.raises(ValueError, match="must be RGB"):
        bad.result(timeout=60)
    after = pool.stats()
    assert after["requests_failed"] - before["requests_failed"] == 1
    assert (after["retries"], after["restarts"]) == (before["retries"], before["restarts"])
    assert pool.pseudo_label(_requests(1)[0]).shape == (6, 1, F_SIZE, F_SIZE)
