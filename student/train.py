"""``python -m student.train [--config configs/X.yaml] [key=value ...]``: train a 360-degree student.

With no arguments it runs the offline demo (``configs/demo.yaml``): generated scenes and the best
teacher that can be had (see ``student.labels``). With ``cluster.num_workers >= 1``, or when started by
``ray job submit``, the same run goes to a Ray cluster with DeepSpeed data-parallel workers
(``cluster.launch``); otherwise it is one process on one GPU or the CPU.

The run folder (``run.out_dir``) receives ``config.yaml``, ``metrics.jsonl``, ``checkpoints/`` and
``eval.json``; running the same command again resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from student.config import TrainConfig, load_config

log = logging.getLogger("pano_distill.train")
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def under_ray_job() -> bool:
    """True in the entrypoint of ``ray job submit`` (the job supervisor sets this variable)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m student.train", description=__doc__.split("\n\n")[0],
                                epilog="Overrides: dotted keys of student/config.py, e.g. optim.steps=20 "
                                       "run.out_dir=/tmp/run teacher.mode=oracle cluster.num_workers=2")
    p.add_argument("--config", default=None, help=f"YAML run configuration (default: {DEMO_CONFIG.name})")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def _setup_logging(cfg: TrainConfig) -> None:
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt, stream=sys.stderr, force=True)
    run_dir = Path(cfg.run.out_dir).expanduser()
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter(fmt))
    logging.getLogger().addHandler(handler)


def print_summary(summary: dict, cfg: TrainConfig) -> None:
    from student.evaluate import format_table

    last = summary.get("last", {})
    lines = ["", f"run folder: {Path(cfg.run.out_dir).expanduser()}", f"steps: {summary.get('step')}",
             f"throughput (last window): {last.get('panoramas_per_s', 0):.2f} panoramas/s, "
             f"waiting on data {100 * last.get('wait_data_fraction', 0):.0f}% / teacher "
             f"{100 * last.get('wait_teacher_fraction', 0):.0f}% of step time",
             f"non-finite steps skipped: {summary.get('nonfinite_total', 0)}",
             f"bad samples skipped: {summary.get('skipped') or 'none'}"]
    if summary.get("teacher"):
        lines.append(f"teacher: {summary['teacher']}")
    ev = summary.get("eval")
    if ev:
        lines += ["", format_table({cfg.model.label: ev["metrics"]},
                                   f"evaluation: {ev['images']} panoramas, {ev['protocol']} alignment, "
                                   f"0 < gt <= {ev['max_depth']} m")]
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config = args.config or (str(DEMO_CONFIG) if DEMO_CONFIG.is_file() else None)
    try:
        cfg = load_config(config, args.overrides)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _setup_logging(cfg)
    if not args.config and not args.overrides:
        log.info("no arguments: running the offline demo (%s)", config or "built-in defaults")
    from student.session import ResumeRefused

    try:
        if cfg.cluster.num_workers >= 1 or under_ray_job():
            from cluster.launch import run_cluster

            summary = run_cluster(cfg)
        else:
            from student.session import run_training_process

            summary = run_training_process(cfg)
    except ResumeRefused as err:
        log.error("%s", err)
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_summary(summary, cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
