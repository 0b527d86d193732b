"""``python -m student.train [--config configs/X.yaml] [key=value ...]``: train a 360-degree student.

With no arguments it runs the offline demo (``configs/demo.yaml``): generated scenes and the best
teacher that can be had (see ``student.labels``). With ``cluster.num_workers >= 1``, or when started by
``ray job submit``, the same run goes to a Ray cluster with DeepSpeed data-parallel workers
(``cluster.launch``); otherwise it is one process on one GPU or the CPU.

The run folder (``run.out_dir``) receives ``config.yaml``, ``metrics.jsonl``, ``checkpoints/``,
``eval.json`` and ``train.log``; running the same command again resumes from its last checkpoint. One run
folder has one writer: a second run on it is refused (``<run>/.lock``). ``--help`` lists every key.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from sharding import cli
from sharding.cli import UserError
from student.config import TrainConfig, dump_yaml, help_text, load_config

log = logging.getLogger("pano_distill.train")
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def under_ray_job() -> bool:
    """True in the entrypoint of ``ray job submit`` (the job supervisor sets this variable)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m student.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="configuration keys (set in the YAML file or as key=value overrides, e.g. "
                                       "optim.steps=20 run.out_dir=/tmp/run teacher.mode=oracle):\n" + help_text())
    p.add_argument("--config", default=None, help=f"YAML run configuration (default: {DEMO_CONFIG.name})")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration as YAML and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    cli.add_common_arguments(p)
    return p


def _run_dir(cfg: TrainConfig) -> Path:
    run_dir = Path(cfg.run.out_dir).expanduser()
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run.out_dir {run_dir} is a file, not a folder; choose another run.out_dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"run.out_dir {run_dir} cannot be created: {err.strerror}") from err
    return run_dir


def print_summary(summary: dict, cfg: TrainConfig) -> None:
    from student.evaluate import format_table, protocol_rows

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
        lines += ["", format_table(protocol_rows(cfg.model.label, ev),
                                   f"evaluation: {ev['images']} panoramas, {ev['protocol']} alignment first "
                                   f"(the other protocol beside it), 0 < gt <= {ev['max_depth']} m")]
    print("\n".join(lines))


def _log_to_file(err: Exception) -> None:
    """The error into train.log only (stderr gets its one line from ``cli.run``): the run folder says why
    the run stopped."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (err,), None)
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(record)


def main(argv: list[str] | None = None) -> int:
    """The command; ``cli.run(main)`` turns a ``UserError`` into one line and exit code 2."""
    from student.checkpoint import lock_run_dir

    args = _parser().parse_args(argv)
    config = args.config or (str(DEMO_CONFIG) if DEMO_CONFIG.is_file() else None)
    cfg = load_config(config, args.overrides)  # every key checked, the model included, before any write
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    cli.setup_logging(args.log_level)
    run_dir = _run_dir(cfg)
    lock = lock_run_dir(run_dir)  # before the log file: a refused second run writes nothing here
    cli.setup_logging(args.log_level, file=run_dir / "train.log")
    if not args.config and not args.overrides:
        log.info("no arguments: running the offline demo (%s)", config or "built-in defaults")

    try:
        if cfg.cluster.num_workers >= 1 or under_ray_job():
            # The launcher is found through an entry point, not imported: student sits below cluster
            # (pyproject: [project.entry-points."pano_distill.launchers"] ray = "cluster.launch:run_cluster").
            from importlib.metadata import distributions

            # every distribution, not entry_points()'s first one per name: a stale pano_distill.egg-info in
            # the current folder (an old build) would otherwise hide the installed project's entry points
            found = [ep for dist in distributions() for ep in dist.entry_points
                     if ep.group == "pano_distill.launchers" and ep.name == "ray"]
            if not found:
                raise UserError("cluster mode (cluster.num_workers >= 1 or a Ray job) needs the launcher registered "
                                "as entry point 'ray' in group 'pano_distill.launchers', and none is installed: "
                                "reinstall the project (pip install -e .), which registers cluster.launch:run_cluster")
            summary = found[0].load()(cfg)
        else:
            from student.session import run_training_process

            summary = run_training_process(cfg)
    except UserError as err:
        _log_to_file(err)
        raise
    finally:
        lock.release()
    print_summary(summary, cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
