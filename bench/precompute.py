"""Precompute throughput: the Ray Data pipeline (``--ray``) against today's pool path, same input, one run.

    python bench/precompute.py                      # 36 generated panoramas, tiny-random teacher, CPU
    python bench/precompute.py --count 96 --model random:small --device cuda --num-gpus 1 --face-size 256 \\
        --input-size 518 --rotations 8              # a GPU node

Writes ``--count`` generated panoramas into shards once (``teacher_server.testing.write_panorama_shards``),
then, per round, runs ``teacher_server.precompute.precompute`` into a fresh store in each mode, in turn, so
that a machine's drift hits all modes alike:

* ``inprocess``: ``replicas=0`` (the teacher in this process);
* ``pool``: ``replicas=R`` Ray actors of ``RayTeacherPool`` fed by this process (today's default);
* ``ray-data``: ``ray=True``, the same R teacher actors inside a Ray Data pipeline with parallel readers.

Each figure is the whole command's wall time, start-up of the actors included (that is what a user waits
for); ``--rounds`` medians. Printed: panoramas/s per mode and the ratios ray-data / pool and
ray-data / inprocess. Results also go to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("inprocess", "pool", "ray-data")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=36, help="generated panoramas")
    p.add_argument("--height", type=int, default=64, help="panorama height (width 2x)")
    p.add_argument("--per-shard", type=int, default=6)
    p.add_argument("--model", default="tiny-random")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per teacher actor")
    p.add_argument("--rotations", type=int, default=4)
    p.add_argument("--face-size", type=int, default=64)
    p.add_argument("--input-size", type=int, default=98)
    p.add_argument("--replicas", type=int, default=1, help="teacher actors in the pool and in Ray Data")
    p.add_argument("--max-batch-faces", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--json", default=str(ROOT / "bench" / "out" / "precompute.json"))
    args = p.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        p.error(f"unknown modes {sorted(unknown)}; choose from {MODES}")

    import torch

    from sharding.ray_connect import connect
    from teacher_server.precompute import precompute
    from teacher_server.testing import write_panorama_shards

    if args.device == "cpu":
        torch.set_num_threads(1)  # like one CPU replica
    connect(num_cpus=max(4, os.cpu_count() or 1))  # logical CPUs: readers and actors share 2 cores here
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    work = Path(tempfile.mkdtemp(prefix="bench-precompute-"))
    try:
        t0 = time.perf_counter()
        keys, shards = write_panorama_shards(work / "shards", n=args.count, per_shard=args.per_shard,
                                             height=args.height)
        print(f"wrote {len(keys)} panoramas {args.height}x{2 * args.height} in {len(shards)} shards "
              f"({time.perf_counter() - t0:.1f} s); {args.model} on {args.device}, K={args.rotations}, faces "
              f"{args.face_size} px -> input {args.input_size} px, {args.replicas} teacher actor(s)", flush=True)
        kw = dict(rotations=args.rotations, model=args.model, face_size=args.face_size, input_size=args.input_size,
                  device=args.device, dtype=args.dtype, num_gpus=args.num_gpus,
                  max_batch_faces=args.max_batch_faces, log_every=0)
        settings = {"inprocess": dict(replicas=0), "pool": dict(replicas=args.replicas),
                    "ray-data": dict(replicas=args.replicas, ray=True)}
        runs: dict[str, list[float]] = {m: [] for m in modes}
        teacher_s: dict[str, list[float]] = {m: [] for m in modes}
        for r in range(args.rounds):
            line = []
            for m in modes:
                store = work / f"{m}-{r}.lmdb"
                t = time.perf_counter()
                out = precompute(shards, str(store), **kw, **settings[m])
                wall = time.perf_counter() - t
                if out["computed"] != len(keys):
                    raise RuntimeError(f"{m}: computed {out['computed']} of {len(keys)} panoramas")
                runs[m].append(len(keys) / wall)
                teacher_s[m].append(out["teacher_seconds_this_run"])
                shutil.rmtree(store, ignore_errors=True)
                line.append(f"{m} {len(keys) / wall:.2f} ({wall:.1f} s)")
            print(f"round {r + 1}: " + ", ".join(line) + " panoramas/s", flush=True)
        med = {m: statistics.median(v) for m, v in runs.items()}
        print("panoramas/s (median of %d): " % args.rounds + ", ".join(f"{m} {v:.2f}" for m, v in med.items()))
        ratios = {}
        for a, b in (("ray-data", "pool"), ("ray-data", "inprocess"), ("pool", "inprocess")):
            if a in med and b in med:
                ratios[f"{a}/{b}"] = med[a] / med[b]
                per_round = [x / y for x, y in zip(runs[a], runs[b])]
                print(f"{a} / {b} = {med[a] / med[b]:.2f} (ratio of medians; median of per-round ratios "
                      f"{statistics.median(per_round):.2f}; per round: " + ", ".join(f"{v:.2f}" for v in per_round) + ")")
        load = os.getloadavg()
        print(f"machine: {os.cpu_count()} CPUs, load average {load[0]:.1f} / {load[1]:.1f} (1 / 5 min) at the end")
        result = {"args": vars(args), "panoramas": len(keys), "rounds_panoramas_per_s": runs,
                  "median_panoramas_per_s": med, "ratios": ratios, "teacher_seconds": teacher_s,
                  "cpu_count": os.cpu_count(), "loadavg_end": load}
        out_path = Path(args.json)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2))
        print(f"wrote {out_path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
