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
    p.add_argument("--json", default=str(ROOT / "bench" / "out" / "teacher.json"))
    args = p.parse_args(argv)

    cuda = args.device.startswith("cuda")
    if not cuda:
        torch.set_num_threads(args.inprocess_threads)
    from sharding.ray_connect import connect
    from teacher_server.inprocess import InProcessTeacher
    from teacher_server.pool import RayTeacherPool

    connect(num_cpus=max(4, os.cpu_count() or 1))  # logical CPUs: 3 replicas of 1 CPU fit on 2 cores
    gpus = (args.gpus_per_replica if args.gpus_per_replica is not None else 1.0 / 3.0) if cuda else 0.0
    common = dict(input_size=args.input_size, dtype=args.dtype, max_inflight=args.max_inflight,
                  max_batch_faces=args.max_batch_faces, num_gpus=gpus, num_cpus=1,
                  device="cuda" if cuda else "cpu")
    t0 = time.perf_counter()
    inproc = InProcessTeacher(args.model, device=args.device, dtype=args.dtype, input_size=args.input_size)
    pools = {1: RayTeacherPool(args.model, replicas=1, **common), 2: RayTeacherPool(args.model, replicas=2, **common)}
    print(f"set-up {time.perf_counter() - t0:.1f} s: {args.model} on {args.device} ({inproc.teacher.dtype}), "
          f"faces {args.face_size} px -> input {args.input_size} px, {args.faces_per_request} faces per request",
          flush=True)

    faces = torch.rand(args.faces_per_request, 3, args.face_size, args.face_size)
    faces_in = faces.to(args.device)  # in-process: faces already on the student's device
    modes = {"inprocess": (inproc, faces_in, 2), "1 replica": (pools[1], faces, args.max_inflight),
             "2 replicas": (pools[2], faces, 2 * args.max_inflight)}
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
    for pool in pools.values():
        pool.close()
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
