"""Teacher throughput: in-process vs a Ray pool of 1 and of 2 replicas, measured interleaved in one run.

CPU (CI-sized, tiny random Depth Anything):

    python bench/teacher.py                       # tiny-random, faces 64 px, teacher input 98 px

GPU, the real DA-V2 architecture sizes with random weights (no download):

    python bench/teacher.py --model random:small --device cuda --input-size 518 --face-size 256 --dtype bf16

Each round measures every mode for ``--seconds`` (in-process, 1 replica, 2 replicas, in turn), so that a
machine's drift hits all modes alike; figures are medians over ``--rounds``. A request is one panorama's six
faces (``--faces-per-request``); the client keeps ``replicas x max_inflight`` requests outstanding, like a
trainer running ahead. Printed: faces/s per mode, the scaling efficiency ``faces_s(2) / (2 x faces_s(1))``,
the pool's overhead against in-process, and, for the DA-V2 sizes, MFU from the FLOPs of one panorama of six
518 px faces (S/B/L: 0.69 / 2.28 / 7.83 TFLOP; scaled by (input/518)^2 for other inputs) against
``--peak-tflops`` (989: H100 SXM bf16 dense).

``--serve-replicas N`` (needs ``pip install "ray[serve]"``) adds a Ray Serve deployment of the same teacher
with N replicas (``@serve.batch`` merging requests, like the pool's micro-batching) to every round, and
measures beside throughput the median latency of one request alone, then a fault drill for the pool and for
Serve with N replicas each: a stream of requests during which one replica is killed; printed are the
requests that failed and the wall time.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from teacher_server.models import TFLOP_PER_PANORAMA, TEACHER_MODELS, resolve_model_name  # noqa: E402


def tflop_per_panorama(model: str, input_size: int) -> float | None:
    size = None
    if model.startswith("random:"):
        size = model.split(":", 1)[1]
    else:
        rid = resolve_model_name(model)
        for alias, entry in TEACHER_MODELS.items():
            if entry["id"] == rid:
                size = {"s": "small", "b": "base", "l": "large"}[alias.split("-")[1][0]]
    if size not in TFLOP_PER_PANORAMA:
        return None
    return TFLOP_PER_PANORAMA[size] * (input_size / 518.0) ** 2


def measure(backend, faces: torch.Tensor, seconds: float, window: int) -> float:
    """Faces per second with ``window`` requests outstanding, over at least ``seconds``."""
    pending = collections.deque()
    done = 0
    t0 = time.perf_counter()
    while True:
        pending.append(backend.submit(faces))
        if len(pending) >= window:
            done += pending.popleft().result().shape[0]
        if time.perf_counter() - t0 >= seconds and done > 0:
            break
    while pending:
        done += pending.popleft().result().shape[0]
    if faces.is_cuda:
        torch.cuda.synchronize()
    return done / (time.perf_counter() - t0)


def latency(backend, faces: torch.Tensor, n: int) -> float:
    """Median seconds of one request alone (nothing else outstanding)."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        backend.submit(faces).result()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class ServeTeacher:
    """The same teacher as a Ray Serve deployment, behind the backend interface (benchmark only)."""

    APP = "teacher-bench"

    def __init__(self, model: str, *, replicas: int, max_inflight: int, max_batch_faces: int,
                 faces_per_request: int, **teacher_kw):
        import numpy as np
        from ray import serve

        from teacher_server.models import teacher_factory

        serve.start(proxy_location="Disabled", http_options={"host": "127.0.0.1"})
        per_batch = max(1, max_batch_faces // faces_per_request)

        @serve.deployment(name="teacher", num_replicas=replicas, ray_actor_options={"num_cpus": 1},
                          max_ongoing_requests=max_inflight * per_batch)
        class Teacher:
            def __init__(self, factory):
                torch.set_num_threads(1)
                self.teacher = factory()

            @serve.batch(max_batch_size=per_batch, batch_wait_timeout_s=0.0)
            async def __call__(self, faces_list):
                sizes = [len(f) for f in faces_list]
                out = self.teacher(torch.from_numpy(np.concatenate(faces_list))).numpy()
                return np.split(out, np.cumsum(sizes)[:-1])

        self.handle = serve.run(Teacher.bind(teacher_factory(model, **teacher_kw)), name=self.APP, route_prefix=None)

    def submit(self, faces: torch.Tensor):
        resp = self.handle.remote(faces.numpy())

        class _Handle:
            def result(self, timeout=None):
                return torch.from_numpy(resp.result(timeout_s=timeout))

        return _Handle()

    def kill_one_replica(self) -> None:
        import ray

        names = [a for a in ray.util.list_named_actors(all_namespaces=True)
                 if "SERVE_REPLICA" in a["name"] and self.APP in a["name"]]
        ray.kill(ray.get_actor(names[0]["name"], namespace=names[0]["namespace"]), no_restart=True)

    def stats(self) -> dict:
        return {}

    def close(self) -> None:
        from ray import serve

        serve.delete(self.APP)
        serve.shutdown()


def fault_drill(backend, kill, faces: torch.Tensor, n: int, window: int, kill_at: int) -> dict:
    """``n`` requests with ``window`` outstanding; ``kill()`` one replica before request ``kill_at``."""
    import collections as _c

    pending, errors = _c.deque(), _c.Counter()
    ok = 0
    t0 = time.perf_counter()

    def finish():
        nonlocal ok
        try:
            pending.popleft().result(timeout=180)
            ok += 1
        except Exception as exc:  # noqa: BLE001 - what the caller of this backend would see
            errors[type(exc).__name__] += 1

    for i in range(n):
        if i == kill_at:
            kill()
        try:
            pending.append(backend.submit(faces))
        except Exception as exc:  # noqa: BLE001
            errors[type(exc).__name__] += 1
        while len(pending) >= window:
            finish()
    while pending:
        finish()
    return {"ok": ok, "failed": sum(errors.values()), "errors": dict(errors), "wall_s": time.perf_counter() - t0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-random")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--input-size", type=int, default=98)
    p.add_argument("--face-size", type=int, default=64)
    p.add_argument("--faces-per-request", type=int, default=6)
    p.add_argument("--max-inflight", type=int, default=2)
    p.add_argument("--max-batch-faces", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--gpus-per-replica", type=float, default=None,
                   help="default on CUDA: 1/3 (the three replicas of both pools share one GPU)")
    p.add_argument("--inprocess-threads", type=int, default=1, help="torch threads in-process (a CPU replica has 1)")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--serve-replicas", type=int, default=0, help="add a Ray Serve deployment of N replicas")
    p.add_argument("--latency-requests", type=int, default=10, help="single requests timed per round (with --serve-replicas)")
    p.add_argument("--drill-requests", type=int, default=60, help="requests in each fault drill (with --serve-replicas)")
    p.add_argument("--json", default=str(ROOT / "bench" / "out" / "teacher.json"))
    args = p.parse_args(argv)

    cuda = args.device.startswith("cuda")
    if not cuda:
        torch.set_num_threads(args.inprocess_threads)
    from sharding.ray_connect import connect
    from teacher_server.inprocess import InProcessTeacher
    from teacher_server.pool import RayTeacherPool

    # logical CPUs (each actor asks for 1): 3 pool replicas, plus N more pool and N Serve replicas with --serve
    need = 3 + (2 * args.serve_replicas + 1 if args.serve_replicas else 0)
    connect(num_cpus=max(4, need, os.cpu_count() or 1))
    gpus = (args.gpus_per_replica if args.gpus_per_replica is not None else 1.0 / 3.0) if cuda else 0.0
    common = dict(input_size=args.input_size, dtype=args.dtype, max_inflight=args.max_inflight,
                  max_batch_faces=args.max_batch_faces, num_gpus=gpus, num_cpus=1,
                  device="cuda" if cuda else "cpu")
    t0 = time.perf_counter()
    inproc = InProcessTeacher(args.model, device=args.device, dtype=args.dtype, input_size=args.input_size)
    pools = {1: RayTeacherPool(args.model, replicas=1, **common), 2: RayTeacherPool(args.model, replicas=2, **common)}
    nserve = args.serve_replicas
    serve = None
    if nserve:
        if nserve not in pools:
            pools[nserve] = RayTeacherPool(args.model, replicas=nserve, **common)
        serve = ServeTeacher(args.model, replicas=nserve, max_inflight=args.max_inflight,
                             max_batch_faces=args.max_batch_faces, faces_per_request=args.faces_per_request,
                             device=common["device"], dtype=args.dtype, input_size=args.input_size)
    print(f"set-up {time.perf_counter() - t0:.1f} s: {args.model} on {args.device} ({inproc.teacher.dtype}), "
          f"faces {args.face_size} px -> input {args.input_size} px, {args.faces_per_request} faces per request",
          flush=True)

    faces = torch.rand(args.faces_per_request, 3, args.face_size, args.face_size)
    faces_in = faces.to(args.device)  # in-process: faces already on the student's device
    modes = {"inprocess": (inproc, faces_in, 2), "1 replica": (pools[1], faces, args.max_inflight),
             "2 replicas": (pools[2], faces, 2 * args.max_inflight)}
    if serve is not None:
        if nserve > 2:
            modes[f"{nserve} replicas"] = (pools[nserve], faces, nserve * args.max_inflight)
        modes[f"serve {nserve}"] = (serve, faces, nserve * args.max_inflight)
    lat: dict[str, list[float]] = {}
    lat_modes = ["inprocess", f"{nserve} replica{'s' if nserve > 1 else ''}", f"serve {nserve}"] if serve else []
    for name, (backend, x, window) in modes.items():  # warm-up
        measure(backend, x, min(1.0, args.seconds), window)
    runs: dict[str, list[float]] = {name: [] for name in modes}
    for r in range(args.rounds):
        line = []
        for name, (backend, x, window) in modes.items():
            fps = measure(backend, x, args.seconds, window)
            runs[name].append(fps)
            line.append(f"{name} {fps:.1f}")
        print(f"round {r + 1}: " + ", ".join(line) + " faces/s", flush=True)
        for name in lat_modes:
            backend, x, _ = modes[name]
            lat.setdefault(name, []).append(latency(backend, x, args.latency_requests))
        if lat_modes:
            print(f"round {r + 1} latency of one request alone: "
                  + ", ".join(f"{k} {v[-1] * 1000:.1f} ms" for k, v in lat.items()), flush=True)
    med = {name: statistics.median(v) for name, v in runs.items()}
    eff = med["2 replicas"] / (2 * med["1 replica"])
    eff_rounds = [b / (2 * a) for a, b in zip(runs["1 replica"], runs["2 replicas"])]
    print(f"faces/s (median of {args.rounds}): in-process {med['inprocess']:.1f}, 1 replica {med['1 replica']:.1f}, "
          f"2 replicas {med['2 replicas']:.1f}")
    print(f"scaling efficiency faces_s(2) / (2 x faces_s(1)) = {eff:.2f} (per round: "
          + ", ".join(f"{e:.2f}" for e in eff_rounds) + ")")
    print(f"1 replica / in-process = {med['1 replica'] / med['inprocess']:.2f}")
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} CPUs, load average {load[0]:.1f} / {load[1]:.1f} (1 / 5 min) at the end; "
          f"on a busy machine the replicas compete for cores and the scaling efficiency falls")
    result = {"model": args.model, "device": args.device, "dtype": str(inproc.teacher.dtype),
              "input_size": args.input_size, "face_size": args.face_size, "faces_per_request": args.faces_per_request,
              "rounds": runs, "median_faces_per_s": med, "scaling_efficiency": eff,
              "replica_over_inprocess": med["1 replica"] / med["inprocess"], "cpu_count": os.cpu_count(),
              "loadavg_end": os.getloadavg(),
              "pool_stats": {k: v.stats() for k, v in pools.items()}}
    tflop = tflop_per_panorama(args.model, args.input_size)
    if tflop is not None:
        mfu = {name: fps / 6.0 * tflop / args.peak_tflops for name, fps in med.items()}
        result.update(tflop_per_panorama=tflop, peak_tflops=args.peak_tflops, mfu=mfu)
        print(f"MFU at {args.peak_tflops:g} TFLOP/s peak ({tflop:.2f} TFLOP per panorama): "
              + ", ".join(f"{k} {v * 100:.1f}%" for k, v in mfu.items()))
    if serve is not None:
        import ray

        result["latency_s"] = {k: statistics.median(v) for k, v in lat.items()}
        print("median latency of one request alone: "
              + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in result["latency_s"].items()))
        per_round = [a / b for a, b in zip(runs[f"serve {nserve}"], runs[lat_modes[1]])]
        print(f"serve {nserve} / pool {nserve} faces/s = {med[f'serve {nserve}'] / med[lat_modes[1]]:.2f} (ratio of "
              f"medians; median of per-round ratios {statistics.median(per_round):.2f}; per round: "
              + ", ".join(f"{v:.2f}" for v in per_round) + ")")
        window = nserve * args.max_inflight
        drills = {
            f"pool {nserve}": fault_drill(pools[nserve], lambda: ray.kill(pools[nserve].actors[0]), faces,
                                          args.drill_requests, window, args.drill_requests // 4),
            f"serve {nserve}": fault_drill(serve, serve.kill_one_replica, faces, args.drill_requests, window,
                                           args.drill_requests // 4),
        }
        for k, v in drills.items():
            print(f"fault drill {k}: {v['ok']} answered, {v['failed']} failed {v['errors'] or ''}, "
                  f"{v['wall_s']:.1f} s for {args.drill_requests} requests")
        result["fault_drill"] = drills
        result["pool_stats"] = {k: v.stats() for k, v in pools.items()}
        serve.close()
    for pool in pools.values():
        pool.close()
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
