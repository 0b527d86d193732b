"""What a training process tells people: metrics.jsonl, Prometheus, TensorBoard and the MFU estimate.

``metrics.jsonl`` (rank 0) is the source of truth: one JSON object per logging window and per evaluation.
Prometheus and the optional TensorBoard writer (:mod:`student.tensorboard`, ``run.tensorboard=true``) show
the same numbers where people look.

Prometheus: each trainer process serves its own registry on ``run.metrics_host`` (127.0.0.1 by default);
in cluster mode worker r listens on ``cluster.metrics_port + r``. One metric per quantity, prefix
``panodistill_``, a ``worker`` label (the rank) on every series; counters end in ``_total``, units are in
the names, latencies are histograms, and every other label takes a small fixed set of values. Rates are
not exported: ``rate()`` of a counter gives them (``TRAINER_METRICS`` lists the series).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("pano_distill.monitor")

# Dense bf16 tensor-core peaks (TFLOP/s) for the MFU estimate; the CPU figure is nominal (2 cores x
# 2.5 GHz x 32 fp32 FLOP/cycle with AVX2 FMA) and only makes CPU runs comparable with each other.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.2, "A10G": 70.0,
               "V100": 125.0, "T4": 65.0}
CPU_NOMINAL_TFLOPS = 0.16

STEP_BUCKETS = (0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100)

# Evaluation metrics (student.metrics.METRIC_NAMES) -> gauge name suffix, with the unit where there is one:
# depth is in metres, so RMSE and SqRel (mean of squared error over depth) are in metres.
EVAL_GAUGES = {"abs_rel": "abs_rel", "sq_rel": "sq_rel_meters", "rmse": "rmse_meters", "rmse_log": "rmse_log",
               "delta1": "delta1_ratio", "delta2": "delta2_ratio", "delta3": "delta3_ratio"}

# The label source's stats() -> trainer-side teacher series. Cumulative numbers become counters (the
# increase since the last window is added), levels become gauges.
TEACHER_COUNTERS = {"faces": "faces", "requests": "requests", "requests_failed": "failed_requests",
                    "invalid_faces": "invalid_faces", "retries": "retries", "restarts": "restarts",
                    "replica_failures": "replica_failures", "submit_wait_seconds": "submit_wait_seconds"}
TEACHER_GAUGES = {"queue_depth": "queued_requests", "inflight_jobs": "inflight_requests",
                  "replicas_alive": "replicas_alive"}


def peak_tflops(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_TFLOPS.items():
            if key.lower() in name.lower():
                return value, name
        return 100.0, f"{name} (unknown: nominal 100 TFLOP/s)"
    return CPU_NOMINAL_TFLOPS, "cpu (nominal)"


def teacher_value(stats: dict, name: str) -> float | None:
    """``name`` in a label source's ``stats()``, whatever the source: the plain key, the pool's
    ``backend_<name>`` (OnlineLabels), or the sum of the ``online_`` and ``cached_`` halves (HybridLabels)."""
    for key in (name, "backend_" + name):
        v = stats.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    halves = [{k[len(p):]: v for k, v in stats.items() if k.startswith(p)} for p in ("online_", "cached_")]
    halves = [h for h in (teacher_value(half, name) for half in halves if half) if h is not None]
    return sum(halves) if halves else None


class Monitor:
    """The trainer's metrics. ``log(record)`` once per logging window or evaluation, ``count(...)`` once
    per step; ``nonfinite`` is the counter of steps skipped for a non-finite loss (``labels(rank).inc()``).
    ``tensorboard``: a folder for the TensorBoard writer (None: off)."""

    def __init__(self, run_dir: str | Path | None, *, rank: int = 0, port: int = -1, host: str = "127.0.0.1",
                 write_jsonl: bool = True, tensorboard: str | Path | None = None):
        self.rank = rank
        self.worker = str(rank)
        self.jsonl = Path(run_dir) / "metrics.jsonl" if (run_dir and write_jsonl) else None
        self.registry = r = CollectorRegistry()
        self.port = None
        w = ["worker"]
        self.step = Gauge("panodistill_step", "Optimizer steps done (the step of the last logging window)", w,
                          registry=r)
        self.panos = Counter("panodistill_panoramas", "Panoramas trained on, by kind (labeled, unlabeled)",
                             w + ["kind"], registry=r)
        self.step_seconds = Histogram("panodistill_step_seconds", "Wall time of one training step, waits included",
                                      w, buckets=STEP_BUCKETS, registry=r)
        self.wait_seconds = Counter("panodistill_wait_seconds", "Step time spent waiting, by what was waited on "
                                    "(data, teacher); divide its rate by that of panodistill_step_seconds_sum",
                                    w + ["on"], registry=r)
        self.loss = Gauge("panodistill_loss", "Loss parts (loss is the total), mean over the last logging window",
                          w + ["part"], registry=r)
        self.learning_rate = Gauge("panodistill_learning_rate", "Learning rate of the last step", w, registry=r)
        self.disc_acc = Gauge("panodistill_discriminator_accuracy_ratio", "Adversarial recipe: discriminator "
                              "accuracy on each domain, mean over the last logging window", w + ["domain"], registry=r)
        self.skipped = Counter("panodistill_skipped_samples", "Samples skipped by the data plane, by reason "
                               "(sharding.format.REASONS)", w + ["reason"], registry=r)
        self.nonfinite = Counter("panodistill_nonfinite_steps", "Steps skipped for a non-finite loss", w, registry=r)
        self.mfu = Gauge("panodistill_mfu_ratio", "Model FLOP utilisation of the student step over the last "
                         "logging window (counted FLOPs / peak of the device)", w, registry=r)
        self.eval = {k: Gauge(f"panodistill_eval_{g}", f"Last periodic evaluation on data.val: {k}", w, registry=r)
                     for k, g in EVAL_GAUGES.items()}
        self.teacher_counters = {
            k: Counter(f"panodistill_teacher_client_{n}", f"Teacher, as seen by this trainer: {k.replace('_', ' ')}",
                       w, registry=r) for k, n in TEACHER_COUNTERS.items()}
        self.teacher_gauges = {
            k: Gauge(f"panodistill_teacher_client_{n}", f"Teacher, as seen by this trainer: {k.replace('_', ' ')}",
                     w, registry=r) for k, n in TEACHER_GAUGES.items()}
        self._last: dict[str, float] = {}  # cumulative inputs already added to counters
        self._step_seconds_window = 0.0  # step time counted since the last logging window
        self.tensorboard = None
        if tensorboard is not None:
            from student.tensorboard import TensorBoardWriter

            self.tensorboard = TensorBoardWriter(tensorboard)
        if port >= 0:
            server, _ = start_http_server(port, addr=host, registry=self.registry)
            self.port = server.server_port
            self._server = server

    def _add_cumulative(self, key: str, counter, value: float) -> None:
        """Add the increase of a cumulative number; a number that went down restarted from 0."""
        last = self._last.get(key, 0.0)
        counter.inc(value - last if value >= last else value)
        self._last[key] = value

    def log(self, record: dict) -> None:
        """One logging window (or one evaluation): a JSON line, the Prometheus series, TensorBoard."""
        w = self.worker
        self.step.labels(w).set(record["step"])
        for k, v in record.get("losses", {}).items():
            if k.startswith("disc_acc_"):
                self.disc_acc.labels(w, k[len("disc_acc_"):]).set(v)
            else:
                self.loss.labels(w, k).set(v)
        if "lr" in record:
            self.learning_rate.labels(w).set(record["lr"])
        if "mfu" in record:
            self.mfu.labels(w).set(record["mfu"])
        # the loop reports waits as fractions of the window's step time, which count() has summed
        for on in ("data", "teacher"):
            if f"wait_{on}_fraction" in record:
                self.wait_seconds.labels(w, on).inc(record[f"wait_{on}_fraction"] * self._step_seconds_window)
        if "losses" in record:
            self._step_seconds_window = 0.0
        for reason, n in record.get("skipped", {}).items():
            self._add_cumulative("skipped:" + reason, self.skipped.labels(w, reason), float(n))
        stats = record.get("teacher") or {}
        for k, counter in self.teacher_counters.items():
            v = teacher_value(stats, k)
            if v is not None:
                self._add_cumulative("teacher:" + k, counter.labels(w), v)
        for k, gauge in self.teacher_gauges.items():
            v = teacher_value(stats, k)
            if v is not None:
                gauge.labels(w).set(v)
        for k, v in (record.get("eval") or {}).items():
            if k in self.eval and isinstance(v, (int, float)):
                self.eval[k].labels(w).set(v)
        if self.jsonl is not None:
            with self.jsonl.open("a") as f:
                f.write(json.dumps({"time": time.time(), **record}) + "\n")
        if self.tensorboard is not None:
            self.tensorboard.log(record)

    def count(self, labeled: int, unlabeled: int, step_seconds: float) -> None:
        w = self.worker
        self.panos.labels(w, "labeled").inc(labeled)
        self.panos.labels(w, "unlabeled").inc(unlabeled)
        self.step_seconds.labels(w).observe(step_seconds)
        self._step_seconds_window += step_seconds

    def preview(self, step: int, model: torch.nn.Module, samples: Callable | None, device: torch.device) -> None:
        """At an evaluation: a depth preview image for TensorBoard (nothing when it is off). ``samples()``
        yields validation samples (``val_evaluator(...).samples``)."""
        if self.tensorboard is None or samples is None:
            return
        try:
            self.tensorboard.depth_preview(step, model, samples(), device)
        except Exception as err:  # noqa: BLE001 - a picture never stops training
            log.warning("tensorboard: could not draw the depth preview at step %d: %s", step, err)

    def truncate_after(self, step: int) -> None:
        """On resume: forget lines logged after the checkpoint; those steps are trained again."""
        if self.tensorboard is not None:
            self.tensorboard.purge_after(step)
        if self.jsonl is None or not self.jsonl.exists():
            return
        keep = []
        for line in self.jsonl.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
        self.jsonl.write_text("".join(s + "\n" for s in keep))

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        server = getattr(self, "_server", None)
        if server is not None:
            server.shutdown()
            server.server_close()


# name -> (type, labels besides worker): the trainer's series, for documentation and tests
TRAINER_METRICS = {
    "panodistill_step": ("gauge", ()),
    "panodistill_panoramas_total": ("counter", ("kind",)),
    "panodistill_step_seconds": ("histogram", ()),
    "panodistill_wait_seconds_total": ("counter", ("on",)),
    "panodistill_loss": ("gauge", ("part",)),
    "panodistill_learning_rate": ("gauge", ()),
    "panodistill_discriminator_accuracy_ratio": ("gauge", ("domain",)),
    "panodistill_skipped_samples_total": ("counter", ("reason",)),
    "panodistill_nonfinite_steps_total": ("counter", ()),
    "panodistill_mfu_ratio": ("gauge", ()),
    **{f"panodistill_eval_{g}": ("gauge", ()) for g in EVAL_GAUGES.values()},
    **{f"panodistill_teacher_client_{n}_total": ("counter", ()) for n in TEACHER_COUNTERS.values()},
    **{f"panodistill_teacher_client_{n}": ("gauge", ()) for n in TEACHER_GAUGES.values()},
}
