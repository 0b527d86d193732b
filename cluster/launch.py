"""Cluster mode: the same ``student.train`` run on N Ray Train workers with DeepSpeed.

Driver (``run_cluster``, the process ``ray job submit`` starts):
  1. connects to Ray (``cluster.address``, the job's cluster, or a local one bound to 127.0.0.1);
  2. prepares the data once (generated shards are rendered here, not raced by the workers);
  3. creates the teacher replicas once, on their own resources (``teacher.mode=ray``), and hands their
     actor handles to every worker, so all workers share one pool;
  4. runs ``_worker`` on ``cluster.num_workers`` workers through Ray Train's ``TorchTrainer`` (gloo on the
     CPU, NCCL on GPUs); Ray Train restarts a failed worker group up to ``cluster.max_failures`` times;
  5. tears everything down, whatever happened, and returns rank 0's summary.

Worker: exactly the single-process assembly (``student.session.run_training_process``) with a
``DeepSpeedEngine`` instead of the local one; it is not a second loop. Every checkpoint is saved by all
ranks (DeepSpeed) into the run folder and reported to Ray Train. The run folder must be on storage that
all nodes share (NFS, EFS, a bucket mount): checkpoints and rank 0's metrics live there.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from student.config import TrainConfig, from_dict, to_dict

log = logging.getLogger("pano_distill.cluster")


def _connect(cfg: TrainConfig) -> bool:
    """Connect to Ray; True if we started a local instance (and so must shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if cfg.cluster.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=cfg.cluster.address or os.environ["RAY_ADDRESS"], log_to_driver=True)
        return False
    workers_cpu = cfg.cluster.num_workers * cfg.cluster.cpus_per_worker
    teacher_cpu = cfg.teacher.replicas * cfg.teacher.cpus_per_replica if cfg.teacher.mode == "ray" else 0
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False,
             num_cpus=max(2, int(workers_cpu + teacher_cpu + 1)), log_to_driver=True)
    return True


def _worker(config: dict) -> None:
    import ray.train
    import torch

    from cluster.deepspeed_engine import DeepSpeedEngine
    from student.session import run_training_process

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = from_dict(config["cfg"])
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s")
    torch.set_num_threads(max(1, int(cfg.cluster.cpus_per_worker)))
    run_dir = Path(cfg.run.out_dir).expanduser()
    (run_dir / "workers").mkdir(parents=True, exist_ok=True)
    (run_dir / "workers" / f"rank{rank}.pid").write_text(str(os.getpid()))
    if rank == 0:
        _restore_from_ray_checkpoint(run_dir)
    if cfg.cluster.use_gpu:
        from ray.train.torch import get_device

        device = get_device()  # right also when workers share a card (fractional gpus_per_worker)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    def make_engine(model, cfg_, dev):
        return DeepSpeedEngine(model, cfg_.optim, dev, zero_stage=cfg_.cluster.zero_stage,
                               micro_batch=cfg_.data.batch_size)

    def on_checkpoint(folder: Path, step: int) -> None:
        from ray.train import Checkpoint

        ray.train.report({"step": step}, checkpoint=Checkpoint.from_directory(str(folder)) if rank == 0 else None,
                         checkpoint_dir_name=folder.name)

    summary = run_training_process(cfg, rank=rank, world_size=world, make_engine=make_engine, device=device,
                                   teacher_service=config.get("teacher_service"), on_checkpoint=on_checkpoint)
    if rank == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _restore_from_ray_checkpoint(run_dir: Path) -> None:
    """If Ray Train holds a checkpoint the run folder lacks (a node's disk was lost), put it back."""
    import ray.train

    from student import checkpoint as ckpt

    reported = ray.train.get_checkpoint()
    if reported is None:
        return
    with reported.as_directory() as d:
        src = Path(d)
        try:
            step = int(src.name.split("_")[-1])
        except ValueError:
            return
        if ckpt.step_dir(run_dir, step).is_dir():
            return
        tmp = ckpt.begin(run_dir, step)
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        ckpt.commit(run_dir, tmp, step, keep=0)
        log.info("restored checkpoint step %d from Ray Train's storage into %s", step, run_dir)


def _teacher_service(cfg: TrainConfig):
    """The shared teacher replicas, created once by the driver (teacher.mode=ray), behind one service."""
    if cfg.teacher.mode != "ray" or cfg.distill.pseudo_weight <= 0:
        return None
    from student.labels import pool_options, resolve_teacher
    from teacher_server.service import ServiceClient, start_service

    model, input_size, description = resolve_teacher(cfg.teacher)
    handle = start_service(model, **pool_options(cfg.teacher, input_size, cfg.cluster.teacher_resources))
    log.info("started %d shared teacher replica(s): %s", cfg.teacher.replicas, description)
    return ServiceClient(handle)


def run_cluster(cfg: TrainConfig) -> dict:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from student.data import prepare_data

    if cfg.cluster.num_workers < 1:
        cfg.cluster.num_workers = 1  # started by `ray job submit` without a worker count: one worker
    started = _connect(cfg)
    pool = None
    try:
        cfg = prepare_data(cfg)
        pool = _teacher_service(cfg)
        run_dir = Path(cfg.run.out_dir).expanduser().resolve()
        cfg.run.out_dir = str(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        resources = {"CPU": cfg.cluster.cpus_per_worker}
        if cfg.cluster.use_gpu:
            resources["GPU"] = cfg.cluster.gpus_per_worker
        if cfg.cluster.student_resources:  # e.g. student_node: workers only on the student node type
            resources[cfg.cluster.student_resources] = 1
        trainer = TorchTrainer(
            _worker,
            train_loop_config={"cfg": to_dict(cfg), "teacher_service": pool.handle if pool is not None else None},
            scaling_config=ScalingConfig(num_workers=cfg.cluster.num_workers, use_gpu=cfg.cluster.use_gpu,
                                         resources_per_worker=resources),
            torch_config=TorchConfig(backend="nccl" if cfg.cluster.use_gpu else "gloo"),
            run_config=RunConfig(name="ray_train", storage_path=str(run_dir / "ray_storage"),
                                 failure_config=FailureConfig(max_failures=cfg.cluster.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=max(1, cfg.run.keep_checkpoints))))
        log.info("training on %d Ray Train worker(s) (DeepSpeed ZeRO-%d, %s)", cfg.cluster.num_workers,
                 cfg.cluster.zero_stage, "GPU" if cfg.cluster.use_gpu else "CPU/gloo")
        trainer.fit()
        summary_file = run_dir / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
        if pool is not None:
            summary["teacher"] = {k: v for k, v in pool.stats().items() if k in ("faces", "retries", "restarts")}
        return summary
    finally:
        if pool is not None:
            pool.shutdown()
        if started:
            ray.shutdown()
