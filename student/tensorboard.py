"""Optional TensorBoard curves of a run (``run.tensorboard=true``): ``<run folder>/tensorboard/``.

The writer mirrors what :class:`student.monitor.Monitor` logs to ``metrics.jsonl`` (which stays the
source of truth) and adds a depth preview image at each evaluation. Tags:

* ``loss/<part>`` (``loss`` is the total), ``discriminator/accuracy_<domain>`` (adversarial recipe);
* ``train/learning_rate``, ``train/step_seconds``, ``train/mfu``, ``train/nonfinite_total``,
  ``wait/data_fraction``, ``wait/teacher_fraction``, ``data/skipped_<reason>``;
* ``throughput/panoramas_per_s``, ``throughput/labeled_per_s``, ``throughput/unlabeled_per_s``,
  ``throughput/teacher_faces_per_s``;
* ``eval/<metric>`` (abs_rel, rmse, delta1, ...) and the image ``eval/depth_preview`` (rows: RGB,
  ground-truth disparity, predicted disparity, each normalised).

It uses ``tensorboardX``, which the ``ray[train]`` dependency already installs (``torch.utils.tensorboard``
would need the whole ``tensorboard`` package). :func:`read_events` reads the event files back without
TensorBoard (the tests use it; so can a script).
"""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("pano_distill.tensorboard")

THROUGHPUT = ("panoramas_per_s", "labeled_per_s", "unlabeled_per_s", "teacher_faces_per_s")


class TensorBoardWriter:
    """Event files in ``logdir``, opened on the first write (so that a resume can purge first)."""

    def __init__(self, logdir: str | Path, flush_secs: int = 30):
        self.logdir = Path(logdir)
        self.flush_secs = flush_secs
        self._writer = None
        self._purge_step: int | None = None

    def purge_after(self, step: int) -> None:
        """On resume from ``step``: TensorBoard hides the earlier files' events after it (retrained steps)."""
        self._purge_step = int(step) + 1

    def _w(self):
        if self._writer is None:
            from tensorboardX import SummaryWriter

            self.logdir.mkdir(parents=True, exist_ok=True)
            # the file name has the time in whole seconds: pid and purge step keep two sessions' files apart
            suffix = f".{os.getpid()}.{self._purge_step or 0}"
            self._writer = SummaryWriter(str(self.logdir), purge_step=self._purge_step, flush_secs=self.flush_secs,
                                         filename_suffix=suffix)
        return self._writer

    def log(self, record: dict) -> None:
        """One ``metrics.jsonl`` record: a training window or an evaluation."""
        w, step = self._w(), int(record["step"])
        for k, v in record.get("losses", {}).items():
            if k.startswith("disc_acc_"):
                w.add_scalar(f"discriminator/accuracy_{k[len('disc_acc_'):]}", v, step)
            else:
                w.add_scalar(f"loss/{k}", v, step)
        for k in THROUGHPUT:
            if k in record:
                w.add_scalar(f"throughput/{k}", record[k], step)
        for k, tag in (("lr", "train/learning_rate"), ("step_time", "train/step_seconds"), ("mfu", "train/mfu"),
                       ("nonfinite_total", "train/nonfinite_total"), ("wait_data_fraction", "wait/data_fraction"),
                       ("wait_teacher_fraction", "wait/teacher_fraction")):
            if k in record:
                w.add_scalar(tag, record[k], step)
        for reason, n in record.get("skipped", {}).items():
            w.add_scalar(f"data/skipped_{reason}", n, step)
        for k, v in (record.get("eval") or {}).items():
            if isinstance(v, (int, float)):
                w.add_scalar(f"eval/{k}", v, step)

    @torch.inference_mode()
    def depth_preview(self, step: int, model: torch.nn.Module, samples, device: torch.device, n: int = 3) -> None:
        """``eval/depth_preview``: n validation panoramas with their true and predicted disparity."""
        image = preview_image(model, samples, device, n)
        if image is not None:
            self._w().add_image("eval/depth_preview", image, int(step), dataformats="HWC")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _colour(x: torch.Tensor) -> np.ndarray:
    from matplotlib import colormaps

    return colormaps["magma"](np.clip(x.numpy(), 0.0, 1.0))[..., :3].astype(np.float32)


@torch.inference_mode()
def preview_image(model: torch.nn.Module, samples, device: torch.device, n: int = 3) -> np.ndarray | None:
    """(H, W, 3) uint8: one row per panorama, RGB | ground-truth disparity | predicted disparity."""
    from panorama import depth_to_disparity
    from student.losses import normalize_disparity

    model = model.module if hasattr(model, "module") else model  # DeepSpeed's wrapper
    was_training = model.training
    model.eval()
    rows = []
    try:
        for s in samples:
            pred = model(s["rgb"][None].to(device)).float().cpu()
            gt = normalize_disparity(depth_to_disparity(s["depth"][None], s["valid"][None]), s["valid"][None])
            rgb = np.clip(s["rgb"].permute(1, 2, 0).float().numpy(), 0.0, 1.0)
            rows.append(np.concatenate([rgb, _colour(gt[0, 0]), _colour(normalize_disparity(pred)[0, 0])], axis=1))
            if len(rows) == n:
                break
    finally:
        model.train(was_training)
    if not rows:
        return None
    return (np.concatenate(rows, axis=0) * 255).round().astype(np.uint8)


def read_events(logdir: str | Path) -> dict[str, list[tuple[int, object]]]:
    """Every event file under ``logdir``: ``tag -> [(step, value)]`` (a float for scalars, the encoded
    image bytes for images), in file order, with TensorBoard's purge on resume (a session START at step s
    drops what earlier files logged at s or later). Reads the TFRecord framing; skips a truncated tail."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, object]]] = {}
    for path in sorted(Path(logdir).glob("**/events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            body = data[pos + 12:pos + 12 + length]  # after the length and its CRC
            pos += 12 + length + 4  # the body and its CRC
            if len(body) < length:
                break
            event = event_pb2.Event()
            event.ParseFromString(body)
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                out = {tag: [(s, v) for s, v in seq if s < event.step] for tag, seq in out.items()}
            for v in event.summary.value:
                value = v.image.encoded_image_string if v.HasField("image") else v.simple_value
                out.setdefault(v.tag, []).append((int(event.step), value))
    return out
