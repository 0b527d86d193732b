"""What a training process tells people: metrics.jsonl, Prometheus, and the MFU estimate.

Prometheus metrics carry the ``panodistill_`` prefix and a ``worker`` label (the rank). Each trainer
process serves its own registry on ``run.metrics_host`` (127.0.0.1 by default); in cluster mode worker r
listens on ``cluster.metrics_port + r``. Rates (panoramas/s, faces/s) are exported both as counters (for
``rate()``) and as gauges over the last logging window (for people reading one scrape).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Dense bf16 tensor-core peaks (TFLOP/s) for the MFU estimate; the CPU figure is nominal (2 cores x
# 2.5 GHz x 32 fp32 FLOP/cycle with AVX2 FMA) and only makes CPU runs comparable with each other.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.2, "A10G": 70.0,
               "V100": 125.0, "T4": 65.0}
CPU_NOMINAL_TFLOPS = 0.16


def peak_tflops(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_TFLOPS.items():
            if key.lower() in name.lower():
                return value, name
        return 100.0, f"{name} (unknown: nominal 100 TFLOP/s)"
    return CPU_NOMINAL_TFLOPS, "cpu (nominal)"


class Monitor:
    def __init__(self, run_dir: str | Path | None, *, rank: int = 0, port: int = -1, host: str = "127.0.0.1",
                 write_jsonl: bool = True):
        self.rank = rank
        self.jsonl = Path(run_dir) / "metrics.jsonl" if (run_dir and write_jsonl) else None
        self.registry = CollectorRegistry()
        self.port = None
        w = ["worker"]
        r = self.registry
        self.panos = Counter("panodistill_panoramas", "Panoramas trained on", w + ["kind"], registry=r)
        self.pano_rate = Gauge("panodistill_panoramas_per_second", "Panoramas/s over the last window",
                               w + ["kind"], registry=r)
        self.step_seconds = Histogram("panodistill_step_seconds", "Wall time of one training step", w,
                                      buckets=(0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100), registry=r)
        self.wait_fraction = Gauge("panodistill_wait_fraction", "Fraction of step time spent waiting",
                                   w + ["on"], registry=r)
        self.loss = Gauge("panodistill_loss", "Loss parts, last window mean", w + ["part"], registry=r)
        self.skipped = Gauge("panodistill_skipped_samples", "Samples skipped by the data plane, by reason",
                             w + ["reason"], registry=r)
        self.nonfinite = Counter("panodistill_nonfinite_steps", "Steps skipped for a non-finite loss", w,
                                 registry=r)
        self.teacher = Gauge("panodistill_teacher", "Teacher client statistics (faces, retries, queue ...)",
                             w + ["stat"], registry=r)
        self.teacher_rate = Gauge("panodistill_teacher_faces_per_second", "Teacher faces/s, last window", w,
                                  registry=r)
        self.mfu = Gauge("panodistill_mfu", "Model FLOP utilisation of the student step", w, registry=r)
        self.step = Gauge("panodistill_step", "Optimizer steps done", w, registry=r)
        self.disc_acc = Gauge("panodistill_discriminator_accuracy", "Adversarial recipe: discriminator accuracy "
                              "on each domain, last window", w + ["domain"], registry=r)
        self.extra = Gauge("panodistill_metric", "Other scalar training metrics", w + ["name"], registry=r)
        if port >= 0:
            server, _ = start_http_server(port, addr=host, registry=self.registry)
            self.port = server.server_port
            self._server = server

    def log(self, record: dict) -> None:
        """One logging window: a JSON line and the gauges."""
        w = str(self.rank)
        self.step.labels(w).set(record["step"])
        for k, v in record.get("losses", {}).items():
            if k.startswith("disc_acc_"):
                self.disc_acc.labels(w, k[len("disc_acc_"):]).set(v)
            else:
                self.loss.labels(w, k).set(v)
        for kind in ("labeled", "unlabeled"):
            self.pano_rate.labels(w, kind).set(record.get(f"{kind}_per_s", 0.0))
        for on in ("data", "teacher"):
            self.wait_fraction.labels(w, on).set(record.get(f"wait_{on}_fraction", 0.0))
        for reason, n in record.get("skipped", {}).items():
            self.skipped.labels(w, reason).set(n)
        for k, v in record.get("teacher", {}).items():
            if isinstance(v, (int, float)):
                self.teacher.labels(w, k).set(v)
        self.teacher_rate.labels(w).set(record.get("teacher_faces_per_s", 0.0))
        self.mfu.labels(w).set(record.get("mfu", 0.0))
        for k, v in record.get("extra", {}).items():
            self.extra.labels(w, k).set(v)
        if self.jsonl is not None:
            with self.jsonl.open("a") as f:
                f.write(json.dumps({"time": time.time(), **record}) + "\n")

    def count(self, labeled: int, unlabeled: int, step_seconds: float) -> None:
        w = str(self.rank)
        self.panos.labels(w, "labeled").inc(labeled)
        self.panos.labels(w, "unlabeled").inc(unlabeled)
        self.step_seconds.labels(w).observe(step_seconds)

    def truncate_after(self, step: int) -> None:
        """On resume: forget lines logged after the checkpoint; those steps are trained again."""
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
        server = getattr(self, "_server", None)
        if server is not None:
            server.shutdown()
            server.server_close()
