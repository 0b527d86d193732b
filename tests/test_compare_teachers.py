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


def test_ladder_slope_is_the_students_gain_per_unit_of_teacher():
    # student AbsRel = 0.07 + 0.8 x teacher's fitted AbsRel + a per-seed offset: every seed's slope is 0.8
    offsets = {"0": 0.0, "1": 0.01, "2": -0.005}
    reports = {name: report({k: 0.07 + 0.8 * fit + o for k, o in offsets.items()}, fit)
               for name, fit in (("mid", 0.09), ("strong", 0.08), ("weak", 0.11))}
    out = ct.ladder(reports)
    assert [name for name, _, _ in out["teachers"]] == ["weak", "mid", "strong"]
    d = out["rows"]["+ pseudo labels, rotation, masks"]["B"]
    assert d["slope"]["n"] == 3 and d["slope"]["mean"] == pytest.approx(0.8)
    assert d["means"] == pytest.approx([0.07 + 0.8 * f + 0.005 / 3 for f in (0.11, 0.09, 0.08)])
    assert "student, labeled only" not in out["rows"]
    assert "| + pseudo labels, rotation, masks | 3 | 0.1597 → 0.1437 → 0.1357 | +0.80 [" in ct.ladder_markdown(out)


def test_ladder_slope_interval_spans_zero_when_seeds_disagree():
    reports = {"weak": report({"0": 0.15, "1": 0.14, "2": 0.16}, 0.10),
               "strong": report({"0": 0.13, "1": 0.16, "2": 0.15}, 0.08)}
    s = ct.ladder(reports)["rows"]["+ pseudo labels, rotation, masks"]["B"]["slope"]
    assert s["diffs"] == pytest.approx([1.0, -1.0, 0.5]) and s["ci95"][0] < 0 < s["ci95"][1]


def test_ladder_refuses_what_it_cannot_compare():
    with pytest.raises(SystemExit, match="at least two"):
        ct.ladder({"a": report({"0": 0.1}, 0.1)})
    with pytest.raises(SystemExit, match="different scales"):
        ct.ladder({"a": report({"0": 0.1}, 0.1), "b": report({"0": 0.1}, 0.09, scale={"steps": 3000})})
    with pytest.raises(SystemExit, match="same fitted"):
        ct.ladder({"a": report({"0": 0.1}, 0.1), "b": report({"0": 0.1}, 0.1)})
    # a row whose seeds no two teachers share is left out, not divided by zero
    assert ct.ladder({"a": report({"0": 0.1}, 0.1), "b": report({"1": 0.1}, 0.09)})["rows"] == {}
