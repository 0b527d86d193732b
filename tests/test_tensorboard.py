"""student.tensorboard: the optional TensorBoard writer (tests/test_monitor.py runs it inside a tiny run)."""

from __future__ import annotations

import torch

from student.monitor import Monitor
from student.tensorboard import TensorBoardWriter, preview_image, read_events


def _window(step: int, loss: float) -> dict:
    return {"step": step, "losses": {"loss": loss, "disc_acc_real": 0.5}, "lr": 1e-3, "panoramas_per_s": 2.0,
            "step_time": 0.25, "wait_data_fraction": 0.1, "skipped": {"nan_depth": 1}}


def test_a_resumed_run_replaces_the_steps_it_trains_again(tmp_path):
    logdir = tmp_path / "tensorboard"
    first = Monitor(tmp_path, tensorboard=logdir)
    for step in (2, 4, 6):
        first.log(_window(step, float(step)))
    first.close()
    # the run crashed after step 6; its last checkpoint is step 4: steps 5.. are trained again
    again = Monitor(tmp_path, tensorboard=logdir)
    again.truncate_after(4)
    again.log(_window(6, 60.0))
    again.log({"step": 6, "eval": {"abs_rel": 0.25, "protocol": "median"}})
    again.close()
    events = read_events(logdir)
    assert events["loss/loss"] == [(2, 2.0), (4, 4.0), (6, 60.0)]
    assert events["eval/abs_rel"] == [(6, 0.25)] and "eval/protocol" not in events
    assert {"discriminator/accuracy_real", "train/learning_rate", "train/step_seconds", "throughput/panoramas_per_s",
            "wait/data_fraction", "data/skipped_nan_depth"} <= set(events)
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 2
    # metrics.jsonl, the source of truth, agrees
    assert [x.split('"step": ')[1].split(",")[0] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == \
        ["2", "4", "6", "6"]


def test_preview_rows_show_rgb_truth_and_prediction():
    class Flat(torch.nn.Module):  # predicts the image's first channel as disparity
        def forward(self, x):
            return x[:, :1] + 0.1

    g = torch.Generator().manual_seed(0)
    samples = [{"key": str(i), "rgb": torch.rand(3, 8, 16, generator=g), "valid": torch.ones(1, 8, 16, dtype=torch.bool),
                "depth": 1.0 + torch.rand(1, 8, 16, generator=g)} for i in range(5)]
    model = Flat().train()
    img = preview_image(model, iter(samples), torch.device("cpu"), n=3)
    assert img.shape == (3 * 8, 3 * 16, 3) and img.dtype.name == "uint8"
    assert model.training  # the caller's mode is restored
    rgb = samples[1]["rgb"].permute(1, 2, 0).numpy()
    assert abs(img[8:16, :16].astype(float) / 255 - rgb).max() <= 0.5 / 255 + 1e-6  # row 2, RGB panel
    assert preview_image(model, iter([]), torch.device("cpu")) is None


def test_nothing_is_written_until_something_is_logged(tmp_path):
    w = TensorBoardWriter(tmp_path / "tb")
    w.purge_after(10)
    w.close()
    assert not (tmp_path / "tb").exists()  # a run that stops at once leaves no empty event file
