"""The training loop, shared by the single-process mode and every cluster worker.

It knows four collaborators and nothing of how they are made:

* an **engine** (``student.engine.LocalEngine`` or ``cluster.deepspeed_engine.DeepSpeedEngine``):
  ``module``, ``all_finite(tensor)`` (agreed by every rank), ``backward_and_step(loss)`` (returns the
  gradient norm), ``skip()``, ``save(folder, name, state)``;
* a **batch stream** (``student.data.BatchStream``): mixed half/half batches, with ``position()`` for
  checkpoints and ``skipped()`` counts of bad samples;
* a **label source** (``teacher_server``): ``request(unlabeled, rotations, face_size)``, asked
  ``teacher.lookahead`` batches ahead so that the step rarely waits for the teacher;
* a **recipe** (``student.recipes``): the losses of one batch, and any extra update (a discriminator).

Every batch gets its rotations and augmentation from a generator seeded by (seed, rank, step), so a
resumed run draws exactly what the uninterrupted run would have drawn.

Divergence is a failure, never a quiet success: the losses drop non-finite predictions, so a model full of
NaN can report a loss of 0. The loop checks the loss and the gradient norm of every step (a step with
either non-finite is skipped and counted), every parameter and buffer every ``run.check_every`` steps, and
parameters, buffers and a prediction on the last batch before every checkpoint and every evaluation. A
non-finite model stops the run with ``DivergedError`` (one line, exit 2) before anything is written, so the
last finite checkpoint stays ``latest``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from panorama import random_rotations
from sharding.cli import UserError
from student import checkpoint as ckpt
from student.config import TrainConfig, dump_yaml
from student.schedule import lr_factor

log = logging.getLogger("pano_distill.train")


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}/{rank}/{step}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


@dataclass
class LoopState:
    step: int = 0  # optimizer steps done (skipped non-finite steps included: their batch is consumed)
    nonfinite_total: int = 0
    nonfinite_in_row: int = 0
    data: dict = field(default_factory=dict)  # the stream position after the last consumed batch


class DivergedError(UserError):
    """The model's weights or predictions are no longer finite: the run stops, nothing more is written."""


class NonFiniteLossError(DivergedError):
    """Too many non-finite losses or gradients in a row."""


class _Window:
    """Sums over one logging window."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.t0 = time.perf_counter()
        self.steps = 0
        self.labeled = self.unlabeled = 0
        self.wait_data = self.wait_teacher = self.step_time = 0.0
        self.losses: dict[str, float] = {}
        self.teacher_faces0: float | None = None

    def add_losses(self, parts: dict) -> None:
        for k, v in parts.items():
            self.losses[k] = self.losses.get(k, 0.0) + float(v)


class Trainer:
    def __init__(self, cfg: TrainConfig, engine, stream, labels, recipe, monitor, run_dir: str | Path, *,
                 rank: int = 0, world_size: int = 1, state: LoopState | None = None,
                 evaluate: Callable | None = None, flops_per_panorama: float = 0.0,
                 peak_flops: float = 0.0, on_checkpoint: Callable | None = None):
        self.cfg, self.engine, self.stream, self.labels, self.recipe = cfg, engine, stream, labels, recipe
        self.monitor, self.run_dir, self.rank, self.world_size = monitor, Path(run_dir), rank, world_size
        self.state = state or LoopState()
        self.evaluate = evaluate
        self.flops_per_panorama, self.peak_flops = flops_per_panorama, peak_flops
        self.on_checkpoint = on_checkpoint
        self.device = engine.device
        self.face_size = cfg.face_size
        self.pending: deque = deque()
        self.window = _Window()
        self.history: list[dict] = []
        self._batches = iter(stream)
        self._fetched = self.state.step  # the step index of the next batch fetched
        self._probe: torch.Tensor | None = None  # a few panoramas of the last batch, to probe predictions

    # -- data and teacher ------------------------------------------------------------------------------
    def _to_device(self, half: dict | None) -> dict | None:
        if half is None:
            return None
        return {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in half.items()}

    def _fetch(self) -> None:
        """Pull one batch, draw its rotations, and ask the teacher for it (non-blocking)."""
        t0 = time.perf_counter()
        batch = next(self._batches)
        self.window.wait_data += time.perf_counter() - t0
        step = self._fetched
        self._fetched += 1
        batch = {"labeled": self._to_device(batch.get("labeled")), "unlabeled": self._to_device(batch.get("unlabeled")),
                 "position": batch.get("position")}
        gen = step_generator(self.cfg.run.seed, self.rank, step)
        handle = None
        unl = batch["unlabeled"]
        if self.labels is not None and unl is not None and len(unl["key"]):
            n = len(unl["key"])
            limits = self.cfg.distill.max_deg if self.cfg.distill.rotation else 0.0
            rots = random_rotations(n, limits, generator=gen).to(self.device)
            t0 = time.perf_counter()
            handle = self.labels.request(unl, rots, self.face_size)  # an in-process teacher computes here
            self.window.wait_teacher += time.perf_counter() - t0
        self.pending.append((step, batch, handle, gen))

    def _next(self):
        while len(self.pending) < 1 + max(0, self.cfg.teacher.lookahead):
            self._fetch()
        step, batch, handle, gen = self.pending.popleft()
        labels = None
        if handle is not None:
            t0 = time.perf_counter()
            labels = handle.result()
            self.window.wait_teacher += time.perf_counter() - t0
        return step, batch, labels, gen

    # -- one step ------------------------------------------------------------------------------------
    def _train_one(self) -> None:
        t0 = time.perf_counter()
        step, batch, labels, gen = self._next()
        assert step == self.state.step, (step, self.state.step)
        self.engine.module.train()
        out = self.recipe.losses(self.engine.module, batch, labels, gen, step)
        self._keep_probe(batch)
        finite = self.engine.all_finite(out.total)  # the one host sync per step: the guard needs it
        what = "loss"
        if finite:
            self.engine.set_lr_factor(lr_factor(step, self.cfg.optim))
            norm = self.engine.backward_and_step(out.total)
            finite = bool(torch.isfinite(norm))  # LocalEngine skipped the update itself when not finite
            what = "gradient norm"
        if finite:
            self.window.add_losses(self.recipe.after_step(out, batch, step))
            self.window.add_losses(out.parts)
            self.state.nonfinite_in_row = 0
        else:
            if what == "loss":
                self.engine.skip()
            self.state.nonfinite_total += 1
            self.state.nonfinite_in_row += 1
            self.monitor.nonfinite.labels(str(self.rank)).inc()
            keys = [k for half in ("labeled", "unlabeled") if batch.get(half) for k in batch[half]["key"]]
            log.warning("step %d: non-finite %s (losses %s); step skipped (%d in a row, %d total); samples %s", step,
                        what, {k: float(v) for k, v in out.parts.items()}, self.state.nonfinite_in_row,
                        self.state.nonfinite_total, keys[:8])
            if self.state.nonfinite_in_row >= self.cfg.optim.max_nonfinite:
                raise NonFiniteLossError(
                    f"{self.state.nonfinite_in_row} non-finite losses or gradients in a row at step {step}; stopping. "
                    f"{self._kept()} Check the data (NaN depth, empty masks) or lower optim.lr; raise "
                    "optim.max_nonfinite to tolerate more")
        self.state.step += 1
        if batch.get("position") is not None:
            self.state.data = batch["position"]
        dt = time.perf_counter() - t0
        w = self.window
        w.steps += 1
        w.step_time += dt
        n_lab = len(batch["labeled"]["key"]) if batch["labeled"] else 0
        n_unl = len(batch["unlabeled"]["key"]) if batch["unlabeled"] else 0
        w.labeled += n_lab
        w.unlabeled += n_unl
        self.monitor.count(n_lab, n_unl, dt)

    # -- divergence ------------------------------------------------------------------------------------
    def _keep_probe(self, batch: dict) -> None:
        for half in ("labeled", "unlabeled"):
            if batch.get(half) and len(batch[half]["key"]):
                self._probe = batch[half]["rgb"][:2].detach()
                return

    def _kept(self) -> str:
        folder = ckpt.latest_checkpoint(self.run_dir)
        return (f"The last finite checkpoint, {folder}, stays latest." if folder is not None
                else "No checkpoint was written.")

    def _bare_module(self):
        return self.engine.module.module if hasattr(self.engine.module, "module") else self.engine.module

    def check_finite(self, when: str, predictions: bool = True, collective: bool = True) -> None:
        """Raise ``DivergedError`` unless every parameter and buffer (and, with ``predictions``, the model's
        prediction on the last batch) is finite. ``collective``: every rank calls it and all agree (through
        the engine's all-reduce), so no rank is left waiting at a barrier."""
        bad = ckpt.first_nonfinite(dict(self._bare_module().named_parameters()))
        bad = bad or ckpt.first_nonfinite(dict(self._bare_module().named_buffers()))
        if bad is None and predictions and self._probe is not None:
            module = self._bare_module()
            was_training = module.training
            module.eval()
            with torch.no_grad():
                pred = module(self._probe.to(next(module.parameters()).dtype))
            module.train(was_training)
            bad = None if bool(torch.isfinite(pred).all()) else "its prediction on the last batch"
        flag = torch.zeros((), device=self.device) if bad is None else torch.full((), math.nan, device=self.device)
        if not (self.engine.all_finite(flag) if collective else bad is None):
            raise DivergedError(f"the model diverged: at step {self.state.step} ({when}), "
                                f"{bad or 'another worker'} is not finite; stopping. {self._kept()} "
                                "Lower optim.lr (or check the data) and run again.")

    # -- logging, checkpoints, evaluation -------------------------------------------------------------
    def _teacher_stats(self) -> dict:
        return dict(self.labels.stats()) if self.labels is not None else {}

    def _log(self) -> dict:
        w = self.window
        elapsed = max(time.perf_counter() - w.t0, 1e-9)
        teacher = self._teacher_stats()
        faces = float(teacher.get("faces", 0.0))
        faces0 = w.teacher_faces0 if w.teacher_faces0 is not None else faces
        panos = w.labeled + w.unlabeled
        record = {
            "step": self.state.step,
            "losses": {k: v / max(w.steps, 1) for k, v in w.losses.items()},
            "labeled_per_s": w.labeled / elapsed,
            "unlabeled_per_s": w.unlabeled / elapsed,
            "panoramas_per_s": panos / elapsed,
            "step_time": w.step_time / max(w.steps, 1),
            "lr": self.engine.base_lr * lr_factor(max(self.state.step - 1, 0), self.cfg.optim),
            "wait_data_fraction": w.wait_data / max(w.step_time, 1e-9),
            "wait_teacher_fraction": w.wait_teacher / max(w.step_time, 1e-9),
            "teacher_faces_per_s": (faces - faces0) / elapsed,
            "mfu": (self.flops_per_panorama * panos / elapsed / self.peak_flops) if self.peak_flops else 0.0,
            "skipped": dict(self.stream.skipped()),
            "nonfinite_total": self.state.nonfinite_total,
            "teacher": teacher,
        }
        self.monitor.log(record)
        self.history.append(record)
        w.reset()
        w.teacher_faces0 = faces
        return record

    def save(self) -> Path:
        """A checkpoint of this step (every rank writes its part; rank 0 writes model.pt and config)."""
        self.check_finite("before saving a checkpoint")
        step = self.state.step
        tmp = ckpt.begin(self.run_dir, step) if self.rank == 0 else None
        folder = self._shared_tmp(step, tmp)
        # per-rank state in a file of its own: DeepSpeed keeps client_state from data-parallel rank 0 only,
        # but every rank has its own data position and RNG
        torch.save({"loop": asdict(self.state), "rng": ckpt.rng_state()}, folder / f"rank{self.rank}.pt")
        self.engine.save(folder, "trainer", {"world_size": self.world_size})
        self.recipe.save(folder)
        if self.rank == 0:
            torch.save(self.engine.model_state(), folder / "model.pt")
            (folder / "config.yaml").write_text(dump_yaml(self.cfg))
            # read by resume() before anything is loaded: can this checkpoint continue exactly?
            (folder / "loop.json").write_text(json.dumps({"step": step, "world_size": self.world_size,
                                                          "engine": self.engine.kind, "data": self.state.data}) + "\n")
        final = self._commit(step, folder)
        if self.on_checkpoint is not None:
            self.on_checkpoint(final, step)
        return final

    def _shared_tmp(self, step: int, tmp: Path | None) -> Path:
        """All ranks write into the same temporary folder (the run folder is on shared storage)."""
        if self.world_size == 1:
            return tmp  # type: ignore[return-value]
        import torch.distributed as dist

        holder = [str(tmp) if tmp else None]
        dist.broadcast_object_list(holder, src=0)
        return Path(holder[0])

    def _commit(self, step: int, folder: Path) -> Path:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()
        final = ckpt.step_dir(self.run_dir, step)
        if self.rank == 0:
            final = ckpt.commit(self.run_dir, folder, step, self.cfg.run.keep_checkpoints)
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()
        return final

    def _maybe_evaluate(self, final: bool) -> dict | None:
        if self.evaluate is None or self.rank != 0:
            return None
        every = self.cfg.eval.every
        if not final and not (every and self.state.step % every == 0):
            return None
        self.check_finite("before evaluating", collective=False)  # rank 0 alone evaluates
        self.engine.module.eval()
        result = self.evaluate(self.engine.module)
        # TensorBoard's depth preview at each evaluation (a no-op unless run.tensorboard=true)
        self.monitor.preview(self.state.step, self.engine.module, getattr(self.evaluate, "samples", None), self.device)
        self.engine.module.train()
        if not final:
            self.monitor.log({"step": self.state.step, "eval": result.get("metrics", {})})
        return result

    # -- the run ---------------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg = self.cfg
        total = cfg.optim.steps
        start = self.state.step
        if start >= total:
            log.info("run already complete at step %d (optim.steps=%d)", start, total)
        bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=not (cfg.run.progress and self.rank == 0),
                   dynamic_ncols=True)
        last_ckpt = start
        try:
            while self.state.step < total:
                self._train_one()
                bar.update(1)
                s = self.state.step
                if s % cfg.run.check_every == 0:
                    self.check_finite("periodic check", predictions=False)
                if s % cfg.run.log_every == 0 or s == total:
                    rec = self._log()
                    bar.set_postfix(loss=f"{rec['losses'].get('loss', math.nan):.4f}",
                                    pano_s=f"{rec['panoramas_per_s']:.2f}")
                if cfg.run.ckpt_every and s % cfg.run.ckpt_every == 0 and s < total:
                    self.save()
                    last_ckpt = s
                self._maybe_evaluate(final=False)
        finally:
            bar.close()
        if self.state.step != last_ckpt or not ckpt.latest_checkpoint(self.run_dir):
            self.save()
        result = self._maybe_evaluate(final=True)
        summary = {"step": self.state.step, "nonfinite_total": self.state.nonfinite_total,
                   "skipped": dict(self.stream.skipped()), "last": self.history[-1] if self.history else {}}
        if result is not None:
            summary["eval"] = result
            (self.run_dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
        if self.rank == 0:
            self._pictures()
        return summary

    def _pictures(self) -> None:
        """loss_curve.png and preview.png in the run folder; a failure here never fails the run."""
        from student import report

        try:
            report.loss_curve(self.run_dir)
            samples = getattr(self.evaluate, "samples", None)
            if samples is not None:
                model = self.engine.module.module if hasattr(self.engine.module, "module") else self.engine.module
                report.depth_preview(self.run_dir, model, samples(), self.device)
        except Exception as err:  # noqa: BLE001 - pictures are a courtesy
            log.warning("could not draw the run's pictures: %s", err)
