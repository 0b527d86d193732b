"""``panorama.equirect_to_cube`` / ``cube_to_equirect`` against py360convert, as ratios measured in one run.

    python bench/projection.py [--device cpu|cuda] [--batch 8] [--face 256] [--height 512] [--rounds 11]
                               [--threads N] [--seed 0]

Input: ``--batch`` real panoramas from ``../shared/samples`` (indoor JPEGs and outdoor PNGs, alternating,
resized to 2H x H with PIL bilinear), or generated scenes (``sharding.synthetic.generate_panorama``) when
that folder is missing. They are converted once, outside the timed region, to float32 in [0, 1]: HWC numpy
arrays for py360convert and one (B, 3, H, 2H) tensor for us (on ``--device``).

Each round times, alternating, these pairs (same inputs, same outputs, both float32):

* **cube**: ``[py360convert.e2c(img, F, cube_format="list") for img in batch]`` vs
  ``equirect_to_cube(batch, F)``;
* **rotated cube**: for every image, ``py360convert.e2p`` of the 6 faces of its rotated cube (yaw/pitch/roll
  of ``R @ FACE_ROTATIONS[k]``; e2c cannot rotate) vs ``equirect_to_cube(batch, F, rotation=R)``, with fresh
  ``random_rotations(B)`` every round as in training;
* **equirect**: ``py360convert.c2e`` of each image's 6 faces vs ``cube_to_equirect`` of the same faces given
  as one contiguous (B, 6, 3, F, F) tensor.

It prints per-round times, the medians and the ratio py360convert / ours per pair, in wall time and in CPU
time of the process (goal for the cube pair: >= 5 on CPU), the max and mean absolute difference of the two
outputs (and stops if they disagree beyond py360convert's own cv2 rounding), the threads, CPU model and load
average, and a breakdown of one call (page faults of a fresh output). ``--threads N`` sets both torch's and
cv2's thread count. With ``--device cuda`` our side runs on the GPU, synchronised around each call;
py360convert stays on the CPU.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402  (py360convert's fast path)
import py360convert  # noqa: E402
import torch  # noqa: E402

from panorama import FACE_ROTATIONS, cube_to_equirect, equirect_to_cube, random_rotations, rotation_matrix  # noqa: E402

SAMPLES = Path(os.environ.get("PANO_SAMPLES", ROOT.parent / "shared" / "samples"))

# Agreement required between the two sides (mean absolute difference, images in [0, 1]). py360convert runs
# cv2.remap with fixed-point weights (1/32 pixel), so it is not bit-exact; the tests check the exact seam/pole
# agreement on its scipy path. Its c2e samples faces half a face pixel off its own e2c (see
# ``cube_to_equirect``): on the real samples that alone gives ~1.6e-2, a further one-pixel shift ~2.9e-2,
# swapped or mirrored faces > 0.15.
MAX_MEAN_DIFF = {"cube": 2e-3, "rotated cube": 2e-3, "equirect": 2.5e-2}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_panoramas(n: int, height: int) -> tuple[list[np.ndarray], str]:
    """n float32 (H, 2H, 3) images in [0, 1] and a description of where they came from."""
    from PIL import Image

    indoor = sorted(SAMPLES.glob("indoor/*.jpg"))
    outdoor = sorted(p for p in SAMPLES.glob("outdoor/*.png") if not p.stem.endswith("_valid"))
    files = [f for pair in zip(indoor, outdoor) for f in pair] + indoor[len(outdoor):] + outdoor[len(indoor):]
    if files:
        imgs = []
        for i in range(n):
            with Image.open(files[i % len(files)]) as im:
                im = im.convert("RGB").resize((2 * height, height), Image.BILINEAR)
                imgs.append(np.asarray(im, dtype=np.float32) / 255.0)
        return imgs, f"{min(n, len(files))} real panoramas from {SAMPLES} (indoor JPEG / outdoor PNG)"
    from sharding.synthetic import generate_panorama

    imgs = [generate_panorama(seed, height=height)["rgb"].astype(np.float32) / 255.0 for seed in range(n)]
    return imgs, f"{n} generated scenes (samples not found at {SAMPLES})"


def rotation_to_euler(r: np.ndarray) -> tuple[float, float, float]:
    """Inverse of ``rotation_matrix``: R = Ry(yaw) Rx(-pitch) Rz(-roll) -> (yaw, pitch, roll) in degrees."""
    fwd = r[:, 2]
    pitch = math.asin(max(-1.0, min(1.0, fwd[1])))
    yaw = math.atan2(fwd[0], fwd[2])
    ry = rotation_matrix(math.degrees(yaw), 0, 0, dtype=torch.float64).numpy()
    rx = rotation_matrix(0, math.degrees(pitch), 0, dtype=torch.float64).numpy()
    rz = rx.T @ ry.T @ r  # = Rz(-roll)
    roll = -math.atan2(rz[1, 0], rz[0, 0])
    return math.degrees(yaw), math.degrees(pitch), math.degrees(roll)


def face_angles(rots: torch.Tensor) -> list[list[tuple[float, float, float]]]:
    """Per image, the e2p (yaw, pitch, roll) of the 6 faces of its rotated cube, checked to round-trip."""
    out = []
    for r in rots.double().numpy():
        faces = []
        for k in range(6):
            m = r @ FACE_ROTATIONS.double().numpy()[k]
            ang = rotation_to_euler(m)
            assert np.abs(rotation_matrix(*ang, dtype=torch.float64).numpy() - m).max() < 1e-6
            faces.append(ang)
        out.append(faces)
    return out


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="device of our side (cpu or cuda); py360convert is CPU")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--face", type=int, default=256)
    p.add_argument("--height", type=int, default=512, help="equirect height (width is twice)")
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="set both torch's and cv2's thread count (default: leave each library's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        cv2.setNumThreads(args.threads)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device available", file=sys.stderr)
        return 2
    b, f, h = args.batch, args.face, args.height

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    imgs, source = load_panoramas(b, h)
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous().to(dev)  # (B, 3, H, 2H)
    ref_faces = [py360convert.e2c(im, f, cube_format="list") for im in imgs]  # c2e input, both sides
    faces_t = torch.from_numpy(np.stack([np.stack(fl) for fl in ref_faces])).permute(0, 1, 4, 2, 3)
    faces_t = faces_t.contiguous().to(dev)  # (B, 6, 3, F, F)

    gen = torch.Generator().manual_seed(args.seed)
    state = {}

    def new_rotations():  # outside the timed region
        state["rots"] = random_rotations(b, generator=gen)
        state["rots_dev"] = state["rots"].to(dev)
        state["angles"] = face_angles(state["rots"])

    def p360_cube():
        return [py360convert.e2c(im, f, cube_format="list") for im in imgs]

    def ours_cube():
        out = equirect_to_cube(x, f)
        sync()
        return out

    def p360_rot():
        return [[py360convert.e2p(im, 90, yaw, pitch, (f, f), in_rot_deg=roll) for yaw, pitch, roll in angs]
                for im, angs in zip(imgs, state["angles"])]

    def ours_rot():
        out = equirect_to_cube(x, f, rotation=state["rots_dev"])
        sync()
        return out

    def p360_equi():
        return [py360convert.c2e(fl, h, 2 * h, cube_format="list") for fl in ref_faces]

    def ours_equi():
        out = cube_to_equirect(faces_t, h, 2 * h)
        sync()
        return out

    pairs = {"cube": (p360_cube, ours_cube), "rotated cube": (p360_rot, ours_rot),
             "equirect": (p360_equi, ours_equi)}

    def as_numpy(name, out):  # ours -> py360convert's layout
        if name == "equirect":
            return out.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
        return out.permute(0, 1, 3, 4, 2).cpu().numpy()  # (B, 6, F, F, 3)

    print(f"pano-distill projection benchmark, {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores visible, load average "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), cv2 {cv2.__version__} ({cv2.getNumThreads()} threads), "
          f"py360convert {getattr(py360convert, '__version__', '?')}")
    if dev.type == "cuda":
        print(f"ours on {torch.cuda.get_device_name(dev)}; py360convert on the CPU")
    thp = os.environ.get("THP_MEM_ALLOC_ENABLE")
    print(f"input: {source}; batch {b}, {2 * h}x{h}x3 float32 -> faces {f}x{f}; {args.rounds} rounds"
          + (f"; THP_MEM_ALLOC_ENABLE={thp}" if thp else ""))

    # Correctness first: the benchmark must not compare different results.
    new_rotations()
    ok = True
    for name, (theirs, ours) in pairs.items():
        ref = np.stack([np.stack(o) if isinstance(o, list) else o for o in theirs()])
        got = as_numpy(name, ours())
        assert got.shape == ref.shape, (name, got.shape, ref.shape)
        diff = np.abs(got - ref)
        good = diff.mean() <= MAX_MEAN_DIFF[name]
        ok &= good
        extra = ""
        if name == "equirect":  # both re-project py360convert's faces: which lands closer to the input?
            orig = np.stack(imgs)
            extra = (f"; vs the original panoramas: ours {np.abs(got - orig).mean():.2e}, "
                     f"py360convert {np.abs(ref - orig).mean():.2e}")
        print(f"check {name:13s}: max |ours - py360convert| {diff.max():.2e}, mean {diff.mean():.2e}"
              f" ({'ok' if good else 'MISMATCH'}){extra}")
    if not ok:
        print("outputs disagree: not timing", file=sys.stderr)
        return 1

    # Wall time is the measure; CPU time of the process (all threads) is printed next to it because the
    # machine may be shared: it hardly changes when other processes take our cores, wall time does.
    wall = {name: ([], []) for name in pairs}
    cpu = {name: ([], []) for name in pairs}
    for r in range(args.rounds):
        new_rotations()
        line = []
        for name, (theirs, ours) in pairs.items():
            order = (theirs, ours) if r % 2 == 0 else (ours, theirs)  # alternate who goes first
            for fn in order:
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
                t1, c1 = time.perf_counter(), time.process_time()
                side = 0 if fn is theirs else 1
                wall[name][side].append(t1 - t0)
                cpu[name][side].append(c1 - c0)
            line.append(f"{name} {1e3 * wall[name][0][-1]:6.1f} / {1e3 * wall[name][1][-1]:6.1f} ms")
        print(f"round {r + 1:2d}: " + "   ".join(line) + "  (py360convert / ours, wall)")

    print("medians (py360convert vs ours; ratio = py360convert / ours):")
    for name in pairs:
        mt, mo = (statistics.median(v) for v in wall[name])
        ct, co = (statistics.median(v) for v in cpu[name])
        goal = f"  goal >= 5: {'met' if mt / mo >= 5 else 'NOT met'}" if name == "cube" else ""
        print(f"  {name:13s}: wall {1e3 * mt:7.1f} vs {1e3 * mo:7.1f} ms, ratio {mt / mo:5.2f}x | "
              f"cpu {1e3 * ct:7.1f} vs {1e3 * co:7.1f} ms, ratio {ct / co:5.2f}x{goal}")

    # Where our time goes: one call of the cube pair next to the cost of a fresh output buffer of the same
    # size (page faults: glibc maps allocations above 32 MiB fresh from the kernel on every call) and of
    # refilling an existing one (memory bandwidth only).
    if dev.type == "cpu":
        buf = torch.empty(b, 3, 6 * f * f)
        parts = {
            "equirect_to_cube": ours_cube,
            "new output-sized buffer: empty + fill": lambda: torch.empty(b, 3, 6 * f * f).fill_(0.0),
            "existing buffer: fill": lambda: buf.fill_(0.0),
            "py360convert e2c (batch)": p360_cube,
        }
        print("breakdown (medians of 5 calls: wall, cpu, minor page faults):")
        for name, fn in parts.items():
            fn()
            ts, cs, faults = [], [], []
            for _ in range(5):
                f0, c0, t0 = minor_faults(), time.process_time(), time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
                cs.append(time.process_time() - c0)
                faults.append(minor_faults() - f0)
            print(f"  {name:38s} {1e3 * statistics.median(ts):7.1f} ms, {1e3 * statistics.median(cs):7.1f} ms cpu, "
                  f"{statistics.median(faults):6.0f} faults")
    print(f"load average at the end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
