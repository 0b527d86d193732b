"""Cluster mode: the same ``student.train`` run on N Ray Train workers with DeepSpeed.

Driver (``run_cluster``, the process ``ray job submit`` starts):
  1. connects to Ray (``cluster.address``, the job's cluster, or a local one bound to 127.0.0.1);
  2. prepares the data once (generated shards are rendered here, not raced by the workers);
  3. creates the teacher replicas once, on their own resources (``teacher.mode=ray``), and hands their
     actor handles to every worker, so all workers share one pool;
  4. runs ``_worker`` on ``cluster.num_workers`` workers through Ray Train's ``TorchTrainer`` (gloo on the
     CPU, NCCL on GPUs); Ray Train restarts a failed worker group up to ``cluster.max_failures`` times;
  5. tears everything down, whatever happened, and returns rank 0's summary.

Placement, so that losing any worker node loses no run: workers go only on nodes that advertise
``cluster.student_resources`` and replicas only on ``cluster.teacher_resources`` nodes; the job's singletons
(Ray Train's controller, which Ray puts on the driver's node, and the teacher service, pinned here to the
head) live on the head, where ``ray job submit`` runs the driver. A lost student node costs a worker-group
restart from the last checkpoint; a lost teacher node costs replica restarts inside the service. When no
node offers ``cluster.teacher_resources`` for ``cluster.teacher_wait_s`` seconds (default 300: time for
an autoscaler to bring one back), the run stops with ``TeacherNodesLost`` instead of waiting forever.

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
import threading
import time
from pathlib import Path

from sharding.cli import UserError, setup_logging
from student.config import TrainConfig, from_dict, to_dict

log = logging.getLogger("pano_distill.cluster")

HEAD_RESOURCE = "node:__internal_head__"  # every Ray head advertises it (Ray's own singletons use it too)


class TeacherNodesLost(UserError):
    """No node of the cluster offers the teacher resource any more, for longer than the allowed wait."""


def _connect(cfg: TrainConfig) -> bool:
    """Connect to Ray (``sharding.ray_connect``); True if we started a local instance (we must shut it down)."""
    from sharding.ray_connect import connect

    workers_cpu = cfg.cluster.num_workers * cfg.cluster.cpus_per_worker
    teacher_cpu = cfg.teacher.replicas * cfg.teacher.cpus_per_replica if cfg.teacher.mode == "ray" else 0
    return connect(cfg.cluster.address or None, num_cpus=max(2, int(workers_cpu + teacher_cpu + 1)))


def _worker(config: dict) -> None:
    import ray.train
    import torch

    from cluster.deepspeed_engine import DeepSpeedEngine
    from student.session import run_training_process

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = from_dict(config["cfg"])
    setup_logging("INFO", fmt=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s")
    torch.set_num_threads(max(1, int(cfg.cluster.cpus_per_worker)))
    run_dir = Path(cfg.run.out_dir).expanduser()
    (run_dir / "workers").mkdir(parents=True, exist_ok=True)
    # where each rank runs now (fault drills and operators read these: pid to signal, node to drain)
    (run_dir / "workers" / f"rank{rank}.pid").write_text(str(os.getpid()))
    (run_dir / "workers" / f"rank{rank}.node").write_text(ray.get_runtime_context().get_node_id())
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
    """The shared teacher replicas, created once by the driver (teacher.mode=ray), behind one service.

    The service actor is pinned to the head node: it owns the replicas (they die with it), so on a worker
    node its loss would take every replica down with it. The replicas themselves go on teacher nodes.
    """
    if cfg.teacher.mode != "ray" or cfg.distill.pseudo_weight <= 0:
        return None
    from student.labels import pool_options, resolve_teacher
    from teacher_server import service

    model, input_size, description = resolve_teacher(cfg.teacher)
    handle = service.start_service(model, actor_options={"resources": {HEAD_RESOURCE: 0.001}},
                                   **pool_options(cfg.teacher, input_size, cfg.cluster.teacher_resources))
    log.info("started %d shared teacher replica(s) on %s nodes: %s", cfg.teacher.replicas,
             cfg.cluster.teacher_resources or "any", description)
    return service.ServiceClient(handle)


class TeacherNodeWatch:
    """Notices when no alive node of the cluster offers ``resource`` (the teacher nodes) for ``wait_s``.

    Without it a run whose teacher nodes are all gone would hang: the lost replicas' replacements wait for
    a node that can host them, and every worker waits for its pseudo labels.
    """

    def __init__(self, resource: str, wait_s: float, nodes=None):
        if nodes is None:
            import ray

            nodes = ray.nodes  # the GCS's node table: [{"Alive": bool, "Resources": {...}, ...}]
        self.resource, self.wait_s = resource, float(wait_s)
        self._nodes = nodes
        self._missing_since: float | None = None

    def alive(self) -> int:
        return sum(1 for n in self._nodes() if n.get("Alive") and n.get("Resources", {}).get(self.resource, 0) > 0)

    def check(self, now: float | None = None) -> str | None:
        """None while teacher nodes exist or the wait is not over; else the message of the failure."""
        now = time.monotonic() if now is None else now
        if self.alive() > 0:
            if self._missing_since is not None:
                log.info("a node offering %r is back", self.resource)
            self._missing_since = None
            return None
        if self._missing_since is None:
            self._missing_since = now
            log.warning("no alive node offers the teacher resource %r: waiting up to %.0f s for one",
                        self.resource, self.wait_s)
        if now - self._missing_since < self.wait_s:
            return None
        return self.message(now - self._missing_since)

    def message(self, waited_s: float) -> str:
        return (f"no node of the Ray cluster has offered the teacher resource {self.resource!r} "
                f"(cluster.teacher_resources) for {waited_s:.0f} s: every teacher node is gone, so no "
                f"pseudo label can be computed. Add teacher nodes (or let the autoscaler add them) and run the "
                f"same command again: it resumes from the last checkpoint. The wait is cluster.teacher_wait_s.")

    def lost(self) -> str | None:
        """The failure's message if no teacher node is alive right now (whatever the wait), else None."""
        if self.alive() > 0:
            return None
        since = self._missing_since
        return self.message(0.0 if since is None else time.monotonic() - since)


def _fit(trainer, watch: TeacherNodeWatch | None, poll_s: float = 1.0):
    """``trainer.fit()``; with a watch, fit runs in a thread and a lost teacher tier raises here."""
    if watch is None:
        return trainer.fit()
    done: dict = {}

    def target():
        try:
            done["result"] = trainer.fit()
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            done["error"] = err

    thread = threading.Thread(target=target, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=poll_s)
        if thread.is_alive():
            message = watch.check()
            if message is not None:
                log.error("%s", message)
                raise TeacherNodesLost(message)
    if "error" in done:
        # the teacher pool may give up (its replicas cannot restart) and the workers fail before the wait is
        # over: with no teacher node left, that is the same failure, and the same message says so
        message = watch.lost()
        if message is not None:
            log.error("%s", message)
            raise TeacherNodesLost(message) from done["error"]
        raise done["error"]
    return done.get("result")


def _plain_init(cls: type) -> bool:
    """True if ``cls(message)`` builds an instance (so the worker's error type can be kept)."""
    try:
        cls("x")
        return True
    except Exception:  # noqa: BLE001
        return False


def user_error_behind(err: BaseException | None) -> UserError | None:
    """The worker's own ``UserError`` (a diverged model, a refused resume, a bad manifest) behind Ray's
    wrappers: Ray Train raises ``TrainingFailedError`` from a ``RayTaskError`` whose ``cause`` is the
    original exception. None when the failure is something else (a bug keeps its traceback)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        inner = getattr(err, "cause", None)
        if isinstance(inner, BaseException):  # RayTaskError: look at what the worker raised
            err = inner
            continue
        if isinstance(err, UserError):
            return err
        err = err.__cause__ or err.__context__
    return None


def _check_driver_on_head() -> None:
    import ray

    me = ray.get_runtime_context().get_node_id()
    head = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and HEAD_RESOURCE in n.get("Resources", {})]
    if head and me not in head:
        log.warning("this driver runs on a worker node (%s), not on the head: Ray Train's controller follows "
                    "the driver, so losing this node loses the run. Submit with `ray job submit` (cluster/submit.sh).",
                    me)


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
        _check_driver_on_head()
        cfg = prepare_data(cfg)
        pool = _teacher_service(cfg)
        watch = None
        if pool is not None and cfg.cluster.teacher_resources:
            watch = TeacherNodeWatch(cfg.cluster.teacher_resources, cfg.cluster.teacher_wait_s)
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
        try:
            _fit(trainer, watch)
        except Exception as err:
            user = None if isinstance(err, UserError) else user_error_behind(err)
            if user is None:
                raise
            # one line, exit 2, as in a single process: the worker's message, not Ray's wrapped traceback
            raise type(user)(str(user)) if _plain_init(type(user)) else UserError(str(user)) from err
        summary_file = run_dir / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
        if pool is not None:
            summary["teacher"] = {k: v for k, v in pool.stats().items() if k in ("faces", "retries", "restarts")}
        return summary
    finally:
        if pool is not None:
            try:
                pool.shutdown()
            except Exception as err:  # noqa: BLE001 - teardown must go on (the service may be gone already)
                log.warning("teacher service teardown: %s", err)
        if started:
            ray.shutdown()
