"""student.train end to end on the tiny config: run folder, evaluation, exact resume."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from student.metrics import METRIC_NAMES
from student.train import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
FAST = ["run.progress=false", "data.num_workers=1"]


def _weights(run: Path) -> dict:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return torch.load(run / "checkpoints" / latest / "model.pt", weights_only=True)


def test_tiny_run_writes_the_run_folder(tmp_path):
    run = tmp_path / "run"
    assert main(["--config", TINY, f"run.out_dir={run}", "optim.steps=6", "run.log_every=3", "run.ckpt_every=3", *FAST]) == 0
    for name in ("config.yaml", "metrics.jsonl", "eval.json", "train.log", "loss_curve.png", "preview.png"):
        assert (run / name).is_file(), name
    report = json.loads((run / "eval.json").read_text())
    assert report["protocol"] == "median" and report["images"] == 8
    assert set(report["metrics"]) == set(METRIC_NAMES)
    assert all(v == v and abs(v) < 1e6 for v in report["metrics"].values())  # finite
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [3, 6]
    assert {"loss", "loss_labeled", "loss_pseudo"} <= set(lines[-1]["losses"])
    assert lines[-1]["labeled_per_s"] == pytest.approx(lines[-1]["unlabeled_per_s"])  # half and half
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_0000003", "step_0000006"]


def test_rerun_resumes_exactly(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["--config", TINY, f"run.out_dir={straight}", "optim.steps=10", "run.ckpt_every=5", *FAST]) == 0
    assert main(["--config", TINY, f"run.out_dir={resumed}", "optim.steps=6", "run.ckpt_every=3", *FAST]) == 0
    # the same command with more steps continues from step 6: weights, Adam moments, RNG and data position
    assert main(["--config", TINY, f"run.out_dir={resumed}", "optim.steps=10", "run.ckpt_every=5", *FAST]) == 0
    assert "resuming from" in (resumed / "train.log").read_text()
    a, b = _weights(straight), _weights(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    steps = [json.loads(x)["step"] for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 10


def test_finished_run_is_not_retrained(tmp_path):
    run = tmp_path / "run"
    assert main(["--config", TINY, f"run.out_dir={run}", "optim.steps=2", *FAST]) == 0
    before = _weights(run)
    assert main(["--config", TINY, f"run.out_dir={run}", "optim.steps=2", *FAST]) == 0
    after = _weights(run)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bad_configuration_is_named(capsys):
    assert main(["--config", TINY, "optim.stepz=3"]) == 2
    assert "optim.stepz" in capsys.readouterr().err
    assert main(["--config", TINY, "data.batch_size=3"]) == 2


def test_a_different_worker_count_or_model_is_refused_unless_allowed(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["--config", TINY, f"run.out_dir={run}", "optim.steps=2", *FAST]) == 0
    ckpt = run / "checkpoints" / "step_0000002"
    meta = json.loads((ckpt / "loop.json").read_text())
    (ckpt / "loop.json").write_text(json.dumps(dict(meta, world_size=2, engine="deepspeed")))  # as a 2-worker run
    assert main(["--config", TINY, f"run.out_dir={run}", "optim.steps=4", *FAST]) == 2
    err = capsys.readouterr().err
    assert "2 worker(s) on a deepspeed engine" in err and "cluster.allow_resize=true" in err
    # allowed: weights and step carry over, and training continues to step 4
    assert main(["--config", TINY, f"run.out_dir={run}", "optim.steps=4", "cluster.allow_resize=true", *FAST]) == 0
    assert json.loads((run / "checkpoints" / "step_0000004" / "loop.json").read_text())["step"] == 4
    assert main(["--config", TINY, f"run.out_dir={run}", "optim.steps=6", "model.name=rectnet_tiny", *FAST]) == 2
    assert "holds a checkpoint of model" in capsys.readouterr().err
