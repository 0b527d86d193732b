"""Cluster-mode scaling: panoramas/s with 1 and 2 Ray Train workers, as a ratio measured in one run.

    python bench/scaling.py                          # CPU, configs/tiny.yaml, 1,2,1,2 ... within ~5 minutes
    python bench/scaling.py --pairs 3 --steps 60 --out /tmp/scaling.json
    python bench/scaling.py --gpu --height 256 --set model.name=unifuse model.encoder=resnet18 \\
        teacher.model=random:small teacher.input_size=518 data.batch_size=8      # needs >= 2 GPUs

Each run is the real command line, ``python -m student.train --config CONFIG cluster.num_workers=N ...``
(``cluster.launch`` starts its own local Ray on 127.0.0.1; Ray Train workers with DeepSpeed, gloo on the
CPU, NCCL with ``--gpu``), in a fresh run folder, with ``run.progress=false``, checkpoints only at the end,
a one-image final evaluation, free Prometheus ports, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``,
``RAY_AUTH_MODE=disabled`` and a private ``RAY_TMPDIR``. Worker counts alternate 1, 2, 1, 2 ... for
``--pairs`` pairs (fewer if the next pair would overrun ``--budget-s``; at least one pair always runs).

Throughput comes from the run's ``metrics.jsonl`` (written by rank 0, one record per ``run.log_every``
steps): the first window (warm-up) is dropped and the median of the others is taken. ``panoramas_per_s``
there is rank 0's own rate; every rank trains ``data.batch_size`` panoramas per step in lockstep (the
gradient all-reduce synchronises them), so the job's rate is N x that. The script prints, per worker count,
the median over its runs, then ratio = rate(2) / rate(1) and scaling efficiency = ratio / 2.

On the CPU, the 2 workers (1 torch thread each, ``cluster.cpus_per_worker=1``) share the machine's cores
with their data loaders, the in-process teachers, Ray itself and anything else running: on a 2-core
machine the expected efficiency is low, and the figure measures the plumbing's overhead rather than a
cluster. The core count and load average are printed next to the result.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sharding import cli
from sharding.cli import UserError

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port_pair() -> int:
    """A port p such that p and p + 1 are free on 127.0.0.1 (worker r exports on metrics_port + r)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p >= 65535:
            continue
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue
    raise RuntimeError("found no pair of free consecutive ports on 127.0.0.1")


def child_env(ray_tmp: Path) -> dict:
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled",
               RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1", RAY_TMPDIR=str(ray_tmp))
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS", None)  # always the run's own local Ray, never someone else's cluster
    return env


def read_windows(run_dir: Path) -> list[dict]:
    f = run_dir / "metrics.jsonl"
    if not f.is_file():
        return []
    out = []
    for line in f.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        rec = json.loads(line)
        if "panoramas_per_s" in rec and "eval" not in rec:
            out.append(rec)
    return out


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop the run we started (its own process group: the trainer, its Ray and its workers)."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def one_run(index: int, workers: int, args, work: Path) -> dict:
    run_dir = work / f"run{index:02d}-w{workers}"
    ray_tmp = Path(tempfile.mkdtemp(prefix="pdscal-", dir="/tmp"))  # short: Ray's socket paths < 107 chars
    h = args.height
    overrides = [f"cluster.num_workers={workers}", f"run.out_dir={run_dir}", "run.progress=false",
                 "run.metrics_port=-1", f"cluster.metrics_port={free_port_pair()}", f"optim.steps={args.steps}",
                 f"run.log_every={args.log_every}", "run.ckpt_every=0", f"data.height={h}",
                 f"data.generated.height={h}", f"distill.face_size={h // 2}",
                 f"data.num_workers={args.data_workers}", "eval.max_images=1",
                 f"cluster.use_gpu={'true' if args.gpu else 'false'}"] + list(args.set)
    cmd = [sys.executable, "-m", "student.train", "--config", str(args.config)] + overrides
    run_dir.mkdir(parents=True, exist_ok=True)
    log_file = run_dir / "stdout.log"
    print(f"[{index}] {workers} worker(s) -> {run_dir}", flush=True)
    t0 = time.perf_counter()
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(ray_tmp), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=args.timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc = "timeout"
    wall = time.perf_counter() - t0
    shutil.rmtree(ray_tmp, ignore_errors=True)
    windows = read_windows(run_dir)
    steady = windows[1:]
    rec: dict = {"index": index, "workers": workers, "rc": rc, "wall_s": wall, "windows": len(windows),
                 "run_dir": str(run_dir), "log": str(log_file)}
    if rc != 0 or not steady:
        tail = log_file.read_text(errors="replace").splitlines()[-15:] if log_file.is_file() else []
        rec["error"] = f"exit {rc}, {len(windows)} window(s)"
        print(f"    FAILED ({rec['error']}); last lines of {log_file}:\n      " + "\n      ".join(tail), flush=True)
        return rec
    per_rank = statistics.median(r["panoramas_per_s"] for r in steady)
    rec.update(rank0_panoramas_per_s=per_rank, panoramas_per_s=workers * per_rank,
               step_time_s=statistics.median(r["step_time"] for r in steady),
               wait_data_fraction=statistics.median(r["wait_data_fraction"] for r in steady),
               wait_teacher_fraction=statistics.median(r["wait_teacher_fraction"] for r in steady),
               window_rates=[r["panoramas_per_s"] for r in steady])
    print(f"    {rec['panoramas_per_s']:.2f} panoramas/s (rank 0: {per_rank:.2f}; step {rec['step_time_s']:.3f} s; "
          f"{len(steady)} steady windows; run wall {wall:.0f} s)", flush=True)
    return rec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python bench/scaling.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    ap.add_argument("--pairs", type=int, default=2, help="(1 worker, 2 workers) pairs, alternated")
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    ap.add_argument("--log-every", type=int, default=5, help="steps per metrics window (the first is dropped)")
    ap.add_argument("--height", type=int, default=64, help="panorama height (data.height, generated height; "
                                                           "face size = height / 2)")
    ap.add_argument("--data-workers", type=int, default=1, help="data.num_workers per rank")
    ap.add_argument("--gpu", action="store_true", help="cluster.use_gpu=true (a GPU per worker; with one card the two workers share it)")
    ap.add_argument("--set", nargs="*", default=[], metavar="key=value", help="more overrides for every run")
    ap.add_argument("--budget-s", type=float, default=300.0,
                    help="start no new pair that would end after this many seconds (one pair always runs)")
    ap.add_argument("--timeout-s", type=float, default=420.0, help="limit of one run")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--keep", action="store_true", help="keep the run folders (printed)")
    args = ap.parse_args(argv)
    if args.steps % args.log_every or args.steps // args.log_every < 3:
        ap.error("--steps must be a multiple of --log-every with at least 3 windows")

    if args.gpu:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n < 1:
            raise UserError("--gpu needs a GPU, and torch sees none here")
        if n < 2:  # two workers share the one card: each gets half of it
            args.set = list(args.set) + ["cluster.gpus_per_worker=0.5"]
            print("note: one GPU visible: the 2-worker runs share it (cluster.gpus_per_worker=0.5), so the ratio "
                  "measures sharing one card, not scaling across cards", file=sys.stderr)

    cores = os.cpu_count()
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    load0 = os.getloadavg()
    meta = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "host": socket.gethostname(),
            "python": platform.python_version(), "cores": cores, "cores_usable": affinity, "gpu": args.gpu,
            "config": str(args.config), "steps": args.steps, "log_every": args.log_every, "height": args.height,
            "data_workers": args.data_workers, "overrides": list(args.set), "load_avg_start": load0}
    print(f"bench/scaling.py {meta['date']}: {'GPU' if args.gpu else 'CPU'}, {affinity} usable core(s) of {cores}, "
          f"load average {load0[0]:.1f}; {args.config}, {args.steps} steps, window {args.log_every}, "
          f"height {args.height}", flush=True)
    if not args.gpu and affinity <= 2:
        print(f"note: {affinity} core(s): 2 workers compete for the same cores (plus data loaders, teachers and Ray),"
              " so a low CPU scaling efficiency is expected here", flush=True)

    work = Path(tempfile.mkdtemp(prefix="pano-scaling-"))
    runs: list[dict] = []
    t_start = time.perf_counter()
    pair_times: list[float] = []
    try:
        for pair in range(args.pairs):
            elapsed = time.perf_counter() - t_start
            if pair_times and elapsed + statistics.median(pair_times) > args.budget_s:
                print(f"stopping after {pair} pair(s): another (~{statistics.median(pair_times):.0f} s) would "
                      f"overrun --budget-s {args.budget_s:.0f}", flush=True)
                break
            t_pair = time.perf_counter()
            for workers in (1, 2):
                runs.append(one_run(len(runs), workers, args, work))
            pair_times.append(time.perf_counter() - t_pair)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    result: dict = {"meta": meta, "runs": runs}
    rates = {n: [r["panoramas_per_s"] for r in runs if r["workers"] == n and "error" not in r] for n in (1, 2)}
    meta["load_avg_end"] = os.getloadavg()
    meta["elapsed_s"] = time.perf_counter() - t_start
    print("\n" + "=" * 90)
    print(f"{'workers':>8}{'runs':>6}{'median pano/s':>15}{'per run':>30}")
    for n in (1, 2):
        if rates[n]:
            print(f"{n:>8}{len(rates[n]):>6}{statistics.median(rates[n]):>15.2f}    "
                  f"{', '.join(f'{x:.2f}' for x in rates[n])}")
        else:
            print(f"{n:>8}{0:>6}{'-':>15}    (no successful run)")
    if rates[1] and rates[2]:
        m1, m2 = statistics.median(rates[1]), statistics.median(rates[2])
        ratio = m2 / m1
        pairs = [(a, b) for a, b in zip(runs[0::2], runs[1::2]) if "error" not in a and "error" not in b]
        pair_ratios = [b["panoramas_per_s"] / a["panoramas_per_s"] for a, b in pairs]
        result.update(median_panoramas_per_s={"1": m1, "2": m2}, ratio=ratio, efficiency=ratio / 2,
                      pair_ratios=pair_ratios)
        print(f"ratio 2 workers / 1 worker = {ratio:.3f}; scaling efficiency = ratio / 2 = {ratio / 2:.1%}"
              + (f"  (per pair: {', '.join(f'{x:.3f}' for x in pair_ratios)})" if pair_ratios else ""))
    else:
        result.update(ratio=None, efficiency=None)
        print("ratio: not available (a worker count has no successful run)")
    print(f"{'GPU' if args.gpu else 'CPU'}: {affinity} usable core(s); load average {meta['load_avg_start'][0]:.1f} at "
          f"start, {meta['load_avg_end'][0]:.1f} at end; {meta['elapsed_s']:.0f} s in all"
          + ("; on <= 2 cores the 2 workers share the cores, so low CPU efficiency is expected"
             if not args.gpu and affinity <= 2 else ""))
    if args.keep:
        print(f"run folders kept in {work}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"JSON: {args.out}")
    return 0 if result["ratio"] is not None else 1


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
