"""One training process, assembled: the same for ``student.train`` alone and for each cluster worker.

``run_training_process`` builds the model, engine, batch stream, label source, recipe and monitor, resumes
from the run folder's latest checkpoint, trains, evaluates and tears everything down, whatever happens.

Resuming (``resume``): the same run folder, the same model, the same number of workers and the same
engine kind (one process vs DeepSpeed) continue exactly: weights, optimizer, step, RNG and data position.
A different worker count or engine kind is refused with an explanation, unless
``cluster.allow_resize=true``: then the weights and the step carry over, the optimizer's moments restart
when they cannot be mapped (ZeRO partitions them by rank), and the data restarts at the beginning of the
saved epoch, because the shard split between workers changed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

import torch
import yaml

from student import checkpoint as ckpt
from student.config import TrainConfig, dump_yaml
from student.engine import LocalEngine, amp_dtype
from sharding.cli import UserError
from sharding.device import resolve_device
from student.inference import build_student, train_flops_per_panorama
from student.loop import LoopState, Trainer

log = logging.getLogger("pano_distill.train")


class ResumeRefused(UserError, ValueError):
    """The run folder holds a checkpoint this configuration cannot continue (the message says why)."""


def _read_loop_json(folder: Path) -> dict:
    f = folder / "loop.json"
    if not f.is_file():
        raise ckpt.CorruptCheckpoint(f"{f} is missing: {folder} is not a complete pano-distill checkpoint")
    return json.loads(f.read_text())


def _check_same_model(cfg: TrainConfig, folder: Path) -> None:
    saved = yaml.safe_load((folder / "config.yaml").read_text()) if (folder / "config.yaml").is_file() else None
    if not saved:
        return
    mine = {"name": cfg.model.name, "encoder": cfg.model.encoder, "options": cfg.model.options}
    theirs = {k: saved["model"].get(k) for k in ("name", "encoder", "options")}
    if mine != theirs:
        raise ResumeRefused(f"the run folder {folder.parents[1]} holds a checkpoint of model {theirs}, but this "
                         f"configuration trains {mine}. Use another run.out_dir, or the same model settings.")


def resume(engine, cfg: TrainConfig, world_size: int, rank: int = 0) -> tuple[LoopState, Path | None]:
    """Load the latest checkpoint of ``cfg.run.out_dir`` into ``engine``: (loop state, the checkpoint folder
    when the resume is exact, so that the recipe can restore its own state from it). A damaged checkpoint is
    logged by path and the newest intact ``step_*`` is used instead (``checkpoint.intact_checkpoint``)."""
    folder = ckpt.intact_checkpoint(cfg.run.out_dir)
    if folder is None:
        return LoopState(), None
    _check_same_model(cfg, folder)
    meta = _read_loop_json(folder)
    if meta["engine"] == engine.kind and meta["world_size"] == world_size:
        engine.load(folder, "trainer", optimizer_states=True)
        mine = ckpt.load(folder / f"rank{rank}.pt")
        ckpt.set_rng_state(mine["rng"])
        state = LoopState(**mine["loop"])
        log.info("resuming from %s at step %d (data position %s)", folder, state.step, state.data)
        return state, folder
    what = (f"{meta['world_size']} worker(s) on a {meta['engine']} engine, but this run has {world_size} "
            f"worker(s) on a {engine.kind} engine")
    if not cfg.cluster.allow_resize:
        raise ResumeRefused(
            f"the checkpoint {folder} was written with {what}. Data shards and optimizer partitions are split "
            "by worker, so the run cannot continue exactly. Re-run with the same cluster.num_workers, or set "
            "cluster.allow_resize=true to continue from its weights and step (optimizer moments restart; the "
            "data restarts at the beginning of the saved epoch).")
    state_dict, _ = ckpt.load_model_state(folder)
    target = engine.module.module if hasattr(engine.module, "module") else engine.module
    target.load_state_dict(state_dict)
    epoch = int(meta.get("data", {}).get("epoch", 0))
    log.warning("resizing: continuing %s from step %d with %s; optimizer moments restart; data restarts at "
                "epoch %d", folder, meta["step"], what, epoch)
    return LoopState(step=int(meta["step"]), data={"epoch": epoch, "batch_in_epoch": 0}), None


def prepare_run_dir(cfg: TrainConfig, rank: int) -> Path:
    run_dir = Path(cfg.run.out_dir).expanduser()
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    return run_dir


def run_training_process(cfg: TrainConfig, *, rank: int = 0, world_size: int = 1,
                         make_engine: Callable | None = None, device: torch.device | None = None,
                         teacher_service=None, on_checkpoint: Callable | None = None) -> dict:
    from student.data import build_train_stream, val_evaluator
    from student.labels import build_label_source
    from student.monitor import Monitor, peak_tflops
    from student.recipes import make_recipe

    device = device or resolve_device(cfg.run.device)
    run_dir = prepare_run_dir(cfg, rank)
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    model = build_student(cfg.model)
    engine = make_engine(model, cfg, device) if make_engine else LocalEngine(model, cfg.optim, device)
    state, resumed_from = resume(engine, cfg, world_size, rank)
    port = cfg.run.metrics_port if world_size == 1 else (cfg.cluster.metrics_port + rank if cfg.cluster.metrics_port >= 0 else -1)
    tensorboard = run_dir / "tensorboard" if rank == 0 and cfg.run.tensorboard else None
    monitor = Monitor(run_dir, rank=rank, port=port, host=cfg.run.metrics_host, write_jsonl=rank == 0,
                      tensorboard=tensorboard)
    if port >= 0:
        log.info("worker %d: Prometheus metrics on http://%s:%d/metrics", rank, cfg.run.metrics_host, monitor.port)
    if rank == 0:
        monitor.truncate_after(state.step)
    stream = labels = None
    try:
        stream = build_train_stream(cfg, rank, world_size, state.data)
        labels = build_label_source(cfg, device, teacher_service=teacher_service)
        recipe = make_recipe(cfg, engine, device)
        if resumed_from is not None:
            recipe.load(resumed_from)
        peak, peak_name = peak_tflops(device)
        flops = train_flops_per_panorama(cfg)
        log.info("worker %d/%d on %s: %s, %.1f GFLOP per panorama per training step, MFU against %s "
                 "(%.0f TFLOP/s)", rank, world_size, device, cfg.model.label, flops / 1e9,
                 peak_name, peak)
        trainer = Trainer(cfg, engine, stream, labels, recipe, monitor, run_dir, rank=rank, world_size=world_size,
                          state=state, evaluate=val_evaluator(cfg, device, amp_dtype(cfg.optim.amp, device)) if rank == 0 else None,
                          flops_per_panorama=flops, peak_flops=peak * 1e12, on_checkpoint=on_checkpoint)
        return trainer.fit()
    finally:
        for part in (labels, stream):
            close = getattr(part, "close", None)
            if close is not None:
                try:
                    close()
                except Exception as err:  # noqa: BLE001 - teardown must go on
                    log.warning("teardown: %s", err)
        monitor.close()
