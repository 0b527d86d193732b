"""Throughput of ``python -m sharding.masks``: local, the previous ``--ray`` (an actor pool fed by
``ray.wait``) and the Ray Data ``--ray`` (``sharding.masks_ray``), side by side on the same shards.

    python bench/masks.py [--panoramas 36] [--height 128] [--replicas 2] [--repeats 2] [--baseline-rev REV]

Tiny random models (``--tiny-random``: the plumbing, not the models' cost), generated panoramas written to
shards once. Ray is started once (``sharding.ray_connect``) and shared by both Ray variants, so the figures
exclude Ray's start-up; each run writes a fresh store. The previous implementation is loaded from git
(``--baseline-rev``, default the last commit before the Ray Data rewrite) as a module of its own. Runs
alternate (local, before, after, local, ...) so that a busy machine hurts all variants alike.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BASELINE_REV = "e7fca1d"  # sharding.masks before the Ray Data rewrite (actors + ray.wait)


def write_shards(folder: Path, n: int, height: int, per_shard: int = 12) -> list[str]:
    from webdataset import TarWriter

    from sharding.format import encode_png, encode_sample
    from sharding.synthetic import generate_panorama

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(0, n, per_shard):
        path = folder / f"bench-{s // per_shard:06d}.tar"
        with TarWriter(str(path), encoder=False) as w:
            for i in range(s, min(n, s + per_shard)):
                key = f"b{i:04d}"
                rgb = generate_panorama(i, "house", height)["rgb"]
                w.write(encode_sample(key, encode_png(rgb), meta={"source": "bench", "split": "all", "path": key}))
        paths.append(str(path))
    return paths


def load_baseline(rev: str, into: Path):
    src = subprocess.run(["git", "show", f"{rev}:sharding/masks.py"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    path = into / "masks_before.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("masks_before", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["masks_before"] = mod
    spec.loader.exec_module(mod)
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(mod)  # its actor class travels to the workers by value
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--panoramas", type=int, default=36)
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--baseline-rev", default=BASELINE_REV)
    ap.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from sharding import masks
    from sharding.cli import setup_logging
    from sharding.ray_connect import connect
    from sharding.segmenters import TINY_RANDOM, MaskerConfig

    setup_logging("WARNING")
    cfg = MaskerConfig(detector=TINY_RANDOM, sam=TINY_RANDOM, device="cpu")
    tmp = Path(tempfile.mkdtemp(prefix="bench-masks-"))
    shards = write_shards(tmp / "shards", args.panoramas, args.height)
    before = load_baseline(args.baseline_rev, tmp)
    t = time.perf_counter()
    started = connect(None, num_cpus=max(os.cpu_count() or 1, args.replicas + 1), object_store_memory=1_000_000_000)
    ray_start = time.perf_counter() - t

    def run(name: str, i: int) -> float:
        store = tmp / f"{name}-{i}.lmdb"
        t0 = time.perf_counter()
        if name == "local":
            s = masks.run_masks(shards, store, cfg, progress=False)
        elif name == "ray_before":
            s = before.run_masks(shards, store, cfg, use_ray=True, replicas=args.replicas, progress=False)
        else:
            s = masks.run_masks(shards, store, cfg, use_ray=True, replicas=args.replicas,
                                batch_size=args.batch_size, progress=False)
        dt = time.perf_counter() - t0
        assert s.processed == args.panoramas and not s.failed, (name, s.processed, s.failed)
        return args.panoramas / dt

    names = ("local", "ray_before", "ray_data")
    rates: dict[str, list[float]] = {n: [] for n in names}
    try:
        for i in range(args.repeats):
            for n in names:
                rates[n].append(run(n, i))
                print(f"[{time.strftime('%H:%M:%S')}] {n} run {i}: {rates[n][-1]:.2f} panoramas/s", flush=True)
    finally:
        if started:
            import ray

            ray.shutdown()
    med = {n: statistics.median(v) for n, v in rates.items()}
    result = {"panoramas": args.panoramas, "height": args.height, "replicas": args.replicas,
              "batch_size": args.batch_size, "cpus": os.cpu_count(), "ray_start_s": ray_start,
              "baseline_rev": args.baseline_rev, "rates": rates, "median": med,
              "ray_data_over_before": med["ray_data"] / med["ray_before"]}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
