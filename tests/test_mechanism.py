"""The mechanism on generated scenes: pseudo labels alone (the oracle teacher, no labels) teach depth."""

import json
import sys
from pathlib import Path

import pytest
import torch

from student.config import load_config
from student.data import val_evaluator
from student.inference import build_student
from student.train import main

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
# Unlabeled and held-out scenes of one style: this measures learning from rotated-cube pseudo labels, not
# transfer between styles (bench/reproduce.py does that).
SETUP = ["teacher.mode=oracle", "distill.labeled_weight=0", "data.batch_size=8", "optim.lr=2e-3",
         "data.generated.unlabeled=48", "data.generated.unlabeled_style=apartment", "data.generated.watermark=false",
         "run.progress=false", "data.num_workers=1", "run.ckpt_every=0"]


def test_oracle_pseudo_labels_alone_teach_relative_depth(tmp_path):
    run = tmp_path / "oracle"
    assert main(["--config", TINY, f"run.out_dir={run}", "optim.steps=200", "run.log_every=50", *SETUP]) == 0
    trained = json.loads((run / "eval.json").read_text())["metrics"]["abs_rel"]
    cfg = load_config(TINY, [f"run.out_dir={tmp_path / 'untrained'}", *SETUP])
    torch.manual_seed(cfg.run.seed)  # the same initial weights the run started from
    untrained = val_evaluator(cfg, torch.device("cpu"), None)(build_student(cfg.model))["metrics"]["abs_rel"]
    losses = [json.loads(x)["losses"]["loss_pseudo"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.7 * losses[0]
    assert trained < 0.6 * untrained, (trained, untrained)  # lstsq AbsRel (the default) on held-out scenes


def test_mechanism_table_has_the_constant_baseline_and_states_goal_a():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import _evidence
    import mechanism

    from student.evaluate import evaluate_predictor

    g = torch.Generator().manual_seed(0)
    samples = [{"rgb": torch.rand(3, 8, 16, generator=g), "depth": torch.rand(1, 8, 16, generator=g) * 5 + 0.5,
                "valid": torch.ones(1, 8, 16, dtype=torch.bool)} for _ in range(3)]
    rep = evaluate_predictor(_evidence.constant_predictor, samples, device=torch.device("cpu"))
    by = rep["metrics_by_protocol"]
    assert rep["protocol"] == "lstsq" and by["lstsq"]["abs_rel"] == pytest.approx(by["median"]["abs_rel"], rel=1e-6)
    rows = {"baseline: constant depth": {"n": 1, "abs_rel": (0.27, 0.0)},
            "augmentation off, rotation on": {"n": 2, "abs_rel": (0.048, 0.01)},
            "augmentation off, rotation off": {"n": 2, "abs_rel": (0.09, 0.01)}}
    assert "rotation on' 0.0480" in mechanism.goal_a(rows) and mechanism.goal_a(rows).endswith("met.")
    rows["augmentation off, rotation on"]["abs_rel"] = (0.07, 0.0)
    assert mechanism.goal_a(rows).endswith("not met.")
