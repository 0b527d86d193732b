"""student.schedule: the learning-rate factor as a pure function of the step, and the loop applying it."""

import json
import math
from pathlib import Path

import pytest

from student.config import OptimConfig
from student.schedule import lr_factor
from student.train import main

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
FAST = ["run.progress=false", "data.num_workers=1"]


def test_constant_is_one_after_a_linear_warmup():
    cfg = OptimConfig(steps=100, warmup_steps=4)
    assert [lr_factor(s, cfg) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(99, OptimConfig(steps=100)) == 1.0


def test_cosine_starts_at_one_ends_at_the_floor_and_never_rises():
    cfg = OptimConfig(steps=50, schedule="cosine", min_lr_ratio=0.1)
    f = [lr_factor(s, cfg) for s in range(50)]
    assert f[0] == pytest.approx(1.0) and f[-1] == pytest.approx(0.1)
    assert f[25] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 25 / 49)))
    assert all(a >= b for a, b in zip(f, f[1:]))
    assert lr_factor(80, cfg) == pytest.approx(0.1)  # past the end (a run extended on resume): stays at the floor


def test_cosine_after_warmup():
    cfg = OptimConfig(steps=12, schedule="cosine", warmup_steps=2, min_lr_ratio=0.0)
    assert lr_factor(0, cfg) == pytest.approx(0.5)
    assert lr_factor(2, cfg) == pytest.approx(1.0)
    assert lr_factor(11, cfg) == pytest.approx(0.0, abs=1e-12)


def test_bad_schedule_is_named(capsys):
    from sharding import cli

    assert cli.run(main, ["--config", TINY, "optim.schedule=linear"]) == 2
    assert "optim.schedule" in capsys.readouterr().err


def test_the_loop_applies_and_logs_the_schedule(tmp_path):
    run = tmp_path / "run"
    assert main(["--config", TINY, f"run.out_dir={run}", "optim.steps=4", "run.log_every=1", "optim.lr=1e-3",
                 "optim.schedule=cosine", "optim.min_lr_ratio=0.2", *FAST]) == 0
    lrs = [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines()
           if '"losses"' in line]
    assert lrs == pytest.approx([1e-3, 1e-3 * (0.2 + 0.8 * 0.75), 1e-3 * (0.2 + 0.8 * 0.25), 2e-4])
