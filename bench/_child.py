"""Training runs as child processes, shared by the benchmark scripts that compare whole runs.

A run is ``python -m student.train --config CONFIG OVERRIDES...`` in a fresh folder (never a resume), with
one torch thread and no progress bar, so that several runs on a shared machine are comparable. Its
progress is echoed from ``metrics.jsonl`` every few seconds, and a failed run raises with its log's tail.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def child_env(**extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", TQDM_DISABLE="1",
               **extra)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def read_records(run_dir: Path) -> list[dict]:
    """The training records (those with ``losses``) of a run's ``metrics.jsonl``; a torn last line is skipped."""
    f = run_dir / "metrics.jsonl"
    if not f.is_file():
        return []
    out = []
    for line in f.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "losses" in rec:
            out.append(rec)
    return out


@dataclass
class Finished:
    command: str  # as a person would type it
    wall_s: float
    records: list[dict]
    eval: dict  # eval.json, {} when the run wrote none
    stdout: Path


def train(name: str, config: str, overrides: list[str], run_dir: Path, describe: Callable[[dict], str],
          env: dict | None = None, poll_s: float = 10.0) -> Finished:
    """Runs one fresh training run; ``describe(record)`` formats each new record for the log."""
    cmd = [sys.executable, "-m", "student.train", "--config", config, *overrides]
    command = shlex.join(["python", *cmd[1:]])
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh run, never a resume
    run_dir.mkdir(parents=True)
    log(f"train {name}: {command}")
    stdout = run_dir.parent / f"{run_dir.name}.stdout.log"
    t0 = time.perf_counter()
    with open(stdout, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env or child_env(), stdout=out, stderr=subprocess.STDOUT)
        seen = 0
        while proc.poll() is None:
            time.sleep(poll_s)
            recs = read_records(run_dir)
            for r in recs[seen:]:
                log(f"  {name} {describe(r)}")
            seen = len(recs)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"training run {name} failed (exit {proc.returncode}); log {stdout}:\n"
                           f"{stdout.read_text()[-3000:]}")
    ev = json.loads((run_dir / "eval.json").read_text()) if (run_dir / "eval.json").is_file() else {}
    log(f"train {name}: done in {wall:.0f} s")
    return Finished(command, wall, read_records(run_dir), ev, stdout)


def machine() -> dict:
    """What a result was measured on: CPU model, cores, load average, torch and Python versions."""
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average": list(os.getloadavg()),
            "torch": torch.__version__, "python": platform.python_version()}


def mean_sd(values: list[float | None]) -> tuple[float, float]:
    """Mean and sample standard deviation over the values that exist (None and NaN left out)."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)
