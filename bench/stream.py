"""Throughput of the streaming reader against bare image decoding, as a ratio measured in one run.

    python bench/stream.py [--copies 16] [--rounds 3] [--workers 2] [--batch-size 8] [--height 512]
    python bench/stream.py --source generated --count 48

It builds shards in a temporary folder (``sharding.build``, folder source) from the real panoramas in
``../shared/samples`` (6 indoor JPEGs, 6 outdoor PNGs with ``_valid.png`` masks, each used ``--copies``
times under different keys), or from generated scenes at ``--height``. Then it alternates, ``--rounds``
times:

* **reader**: one epoch of ``sharding.stream.make_loader`` with ``--workers`` DataLoader workers, panoramas
  delivered as float32 (3, H, 2H) tensors at ``--height`` (1024x512 by default) plus depth/masks;
* **bare**: a single-process loop that only decodes the same image files (RGB and mask, and depth for
  generated scenes) with OpenCV, the decoder the reader uses; no resize, no tensors.

It prints panoramas/s for each, their medians and the ratio reader / bare (goal >= 0.8). Because
wall-clock rates on a shared machine depend on whatever else runs, it also prints the CPU time per panorama
of both (the reader's workers and main process together) and the ratio that implies on idle cores.

Shard verification (``sharding.verify``: each shard's sha256 against the manifest, on first open) is measured
side by side in the same rounds: the reader with ``verify=False``, with verification and an empty cache
(every shard hashed: the first epoch of a process), and with the cache that pass filled (later epochs). It
prints each median and the ratios verified / unverified.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sharding import verify  # noqa: E402
from sharding.build import build  # noqa: E402
from sharding.stream import make_loader  # noqa: E402

SAMPLES = Path(os.environ.get("PANO_SAMPLES", ROOT.parent / "shared" / "samples"))


def make_input(tmp: Path, copies: int) -> Path:
    src = tmp / "input"
    for c in range(copies):
        for f in sorted(SAMPLES.rglob("*")):
            if f.is_file() and f.suffix.lower() in (".jpg", ".png"):
                dst = src / f"copy{c}" / f.relative_to(SAMPLES)
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(f, dst)
    return src


def shard_members(out: Path) -> list[bytes]:
    """The encoded images (rgb, mask, depth) stored in the shards: what the bare loop decodes."""
    blobs = []
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for ti in tf:
                if ti.name.endswith((".jpg", ".png")):
                    blobs.append(tf.extractfile(ti).read())
    return blobs


def bare_pass(blobs: list[bytes]) -> None:
    """Decode every stored image with OpenCV (the reader's decoder): colour images as colour, masks and
    16-bit depth as stored. Nothing else."""
    for b in blobs:
        mode = cv2.IMREAD_UNCHANGED if b[:8] == b"\x89PNG\r\n\x1a\n" and b[25] in (0, 4) else cv2.IMREAD_COLOR
        assert cv2.imdecode(np.frombuffer(b, np.uint8), mode) is not None


def _cpu() -> tuple[float, float]:
    """(CPU seconds of this process, of its finished children: the DataLoader workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def _autogroup() -> bool:
    try:
        return Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
    except OSError:
        return False


def reader_pass(out: Path, args, check: bool = True) -> int:
    loader = make_loader(out, batch_size=args.batch_size, num_workers=args.workers, height=args.height,
                         shuffle=0, prefetch_factor=args.prefetch, verify=check)
    n = 0
    for batch in loader:
        assert batch["rgb"].shape[1:] == (3, args.height, 2 * args.height)
        n += batch["rgb"].shape[0]
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", choices=("samples", "generated"), default="samples")
    p.add_argument("--copies", type=int, default=16, help="uses of each real sample (samples source)")
    p.add_argument("--count", type=int, default=48, help="generated scenes (generated source)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--prefetch", type=int, default=2, help="DataLoader prefetch_factor (batches per worker)")
    p.add_argument("--samples-per-shard", type=int, default=8)
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_stream_") as tmp:
        tmp = Path(tmp)
        out = tmp / "shards"
        t0 = time.perf_counter()
        if args.source == "samples":
            if not SAMPLES.is_dir():
                print(f"real samples not found at {SAMPLES} (set PANO_SAMPLES)", file=sys.stderr)
                return 2
            m = build("folder", make_input(tmp, args.copies), out, samples_per_shard=args.samples_per_shard,
                      progress=False)
        else:
            m = build("generated", None, out, count=args.count, height=args.height, rgb_format="jpg",
                      samples_per_shard=args.samples_per_shard, workers=2, progress=False)
        n_samples = m["splits"]["train"]["count"]
        blobs = shard_members(out)
        print(f"built {n_samples} panoramas in {len(m['splits']['train']['shards'])} shards "
              f"({sum(map(len, blobs)) / 2**20:.1f} MiB of images) in {time.perf_counter() - t0:.1f} s; "
              f"reader: {args.workers} workers, batch {args.batch_size}, tensors {2 * args.height}x{args.height}")

        reader_pass(out, args)  # warm-up (page cache, imports in workers)
        bare_pass(blobs[: len(blobs) // 4])
        reader_rates, bare_rates, reader_cpu, bare_cpu = [], [], [], []
        plain_rates, warm_rates, plain_cpu, warm_cpu = [], [], [], []
        for r in range(args.rounds):
            cp = _cpu()
            t = time.perf_counter()
            n = reader_pass(out, args, check=False)
            plain_rates.append(n / (time.perf_counter() - t))
            plain_cpu.append(sum(_cpu()) - sum(cp))
            verify.clear_cache()  # every shard is hashed in this pass, as in a process's first epoch
            c0 = _cpu()
            t = time.perf_counter()
            n = reader_pass(out, args)
            reader_rates.append(n / (time.perf_counter() - t))
            c1 = _cpu()
            t = time.perf_counter()
            bare_pass(blobs)
            bare_rates.append(n_samples / (time.perf_counter() - t))
            c2 = _cpu()
            reader_cpu.append((c1[0] - c0[0] + c1[1] - c0[1]) / n * 1000)
            bare_cpu.append((c2[0] - c1[0]) / n_samples * 1000)
            cw = _cpu()
            t = time.perf_counter()
            n = reader_pass(out, args)  # the cache of the previous reader pass: no shard is hashed again
            warm_rates.append(n / (time.perf_counter() - t))
            warm_cpu.append(sum(_cpu()) - sum(cw))
            plain_cpu[-1], warm_cpu[-1] = plain_cpu[-1] / n * 1000, warm_cpu[-1] / n * 1000
            print(f"round {r + 1}: reader {reader_rates[-1]:7.1f} pano/s ({n} delivered, {reader_cpu[-1]:.1f} ms CPU "
                  f"each)   bare decode {bare_rates[-1]:7.1f} pano/s ({bare_cpu[-1]:.1f} ms CPU each)   "
                  f"unverified {plain_rates[-1]:7.1f}, verified (cached) {warm_rates[-1]:7.1f} pano/s")
        rm, bm = statistics.median(reader_rates), statistics.median(bare_rates)
        ratio = rm / bm
        print(f"median: reader {rm:.1f} pano/s, bare decode {bm:.1f} pano/s, ratio {ratio:.2f} "
              f"({'meets' if ratio >= 0.8 else 'BELOW'} the 0.8 goal)")
        pm, wm = statistics.median(plain_rates), statistics.median(warm_rates)
        total_mib = sum(f.stat().st_size for f in out.glob("*.tar")) / 2**20
        t = time.perf_counter()
        for f in sorted(out.glob("*.tar")):
            verify.sha256_file(f)
        hash_s = time.perf_counter() - t
        print(f"verification: unverified {pm:.1f} pano/s, verified with every shard hashed {rm:.1f} pano/s "
              f"(ratio {rm / pm:.3f}), verified from the cache {wm:.1f} pano/s (ratio {wm / pm:.3f}); hashing "
              f"all {total_mib:.1f} MiB of shards alone takes {hash_s * 1000:.0f} ms in one process "
              f"({total_mib / max(hash_s, 1e-9):.0f} MiB/s, {hash_s / n_samples * 1000:.2f} ms per panorama)")
        pc, wc, rc0 = statistics.median(plain_cpu), statistics.median(warm_cpu), statistics.median(reader_cpu)
        print(f"verification, CPU per panorama (robust to load): unverified {pc:.1f} ms, every shard hashed "
              f"{rc0:.1f} ms ({rc0 / pc:.3f}x), from the cache {wc:.1f} ms ({wc / pc:.3f}x)")
        # Wall-clock rates depend on what else runs on the machine; CPU time per panorama does not.
        rc, bc = statistics.median(reader_cpu), statistics.median(bare_cpu)
        cores = os.cpu_count() or 1
        load = os.getloadavg()[0]
        projected = min(args.workers, cores) * bc / rc
        print(f"CPU per panorama: reader {rc:.1f} ms (workers + main), bare decode {bc:.1f} ms; on {cores} idle "
              f"core(s) the reader's {args.workers} workers would give a ratio of about {projected:.2f}")
        if load > cores:
            print(f"note: load average {load:.1f} on {cores} core(s) during the run; the wall-clock ratio above "
                  f"reflects contention with other processes")
            if _autogroup():
                print("note: the kernel groups CPU time by session (sched_autogroup); the reader's workers and "
                      "the bare loop share this session's slice, so under load the wall-clock ratio tends to "
                      "the CPU ratio instead of the parallel speed-up")
    return 0


if __name__ == "__main__":
    sys.exit(main())
