"""Seconds per generated panorama (scene + ray cast + shading) for each style, on one CPU thread.

    python bench/synthetic.py [--height 256] [--n 8]

Prints the resolution and, per style, the median (and max) seconds per panorama over ``--n`` seeds.
Target: a 512 x 256 panorama in under 0.5 s.
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy is imported: numpy's BLAS single-threaded too

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sharding.synthetic import STYLES, generate_panorama  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--n", type=int, default=8, help="seeds per style")
    args = parser.parse_args()
    torch.set_num_threads(1)
    generate_panorama(0, STYLES[0], args.height)  # warm-up: direction caches, imports
    print(f"resolution {2 * args.height}x{args.height} (W x H), {args.n} seeds per style, 1 thread")
    for style in STYLES:
        times = []
        for seed in range(args.n):
            t0 = time.perf_counter()
            out = generate_panorama(seed, style, args.height, watermark=True)
            times.append(time.perf_counter() - t0)
            assert out["depth"].shape == (args.height, 2 * args.height)
        print(f"{style:10s} median {statistics.median(times):.3f} s/panorama   max {max(times):.3f} s")


if __name__ == "__main__":
    main()
