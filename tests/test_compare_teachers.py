"""bench/compare_teachers.py: paired per-seed differences between two teachers' students."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import compare_teachers as ct  # noqa: E402


def report(full: dict, fitted: float, scale=None) -> dict:
    def scores(b):
        return {split: {"lstsq": {"abs_rel": b + (0.0 if split == "B" else -0.05)}} for split in ("B", "U")}

    fit = {f"{s}/lstsq/abs_rel": {"mean": fitted} for s in ("B", "U")}
    return {"meta": {"scale": scale or {"steps": 1000}}, "table": {ct.FITTED: fit},
            "per_seed": {"student, labeled only": {"0": scores(0.22), "1": scores(0.23)},
                         "+ pseudo labels, rotation, masks": {k: scores(v) for k, v in full.items()}}}


def test_stronger_teacher_students_are_paired_seed_for_seed():
    weaker = report({"0": 0.15, "1": 0.16, "2": 0.14}, 0.09)
    stronger = report({"0": 0.14, "1": 0.15, "2": 0.12}, 0.08)
    out = ct.compare(weaker, stronger)
    d = out["rows"]["+ pseudo labels, rotation, masks"]["B"]
    assert d["n"] == 3 and d["mean"] == pytest.approx(-0.04 / 3) and d["ci95"][0] < d["mean"] < d["ci95"][1]
    assert "student, labeled only" not in out["rows"]  # it does not learn from the teacher
    assert out["teachers"] == {"weaker": {"B": 0.09, "U": 0.09}, "stronger": {"B": 0.08, "U": 0.08}}
    assert "| + pseudo labels, rotation, masks | 3 | -0.0133 [" in ct.markdown(out, "a", "b")


def test_reports_of_different_scales_are_refused():
    with pytest.raises(SystemExit, match="different scales"):
        ct.compare(report({"0": 0.1}, 0.1), report({"0": 0.1}, 0.1, scale={"steps": 3000}))
