"""bench/steps_curve.py: student AbsRel against the schedule's length, paired over seeds."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import steps_curve as sc  # noqa: E402


def report(steps: int, labeled: dict, height: int = 128) -> dict:
    def scores(b):
        return {"B": {"lstsq": {"abs_rel": b}}, "U": {"lstsq": {"abs_rel": b / 2}}}

    return {"table": {sc.FITTED_ROW: {"B/lstsq/abs_rel": {"mean": 0.08}}},
            "meta": {"scale": {"steps": steps, "height": height},
                     "plateau": {"student, labeled only": {"0": {"relative_change": -0.1}, "1": None}}},
            "per_seed": {"teacher on cube faces, merged": {"-": scores(0.3)},
                         "student, labeled only": {k: scores(v) for k, v in labeled.items()}}}


def test_changes_are_paired_over_common_seeds_and_sorted_by_steps():
    long = report(2000, {"0": 0.18, "1": 0.20})
    short = report(1000, {"0": 0.20, "1": 0.20, "2": 0.40})  # seed 2 exists only here: left out of the pair
    out = sc.curve([long, short])
    assert list(out) == ["student, labeled only"]  # teacher rows are not students
    first, second = out["student, labeled only"]
    assert (first["steps"], second["steps"]) == (1000, 2000) and first["dB"] is None
    assert first["B"] == pytest.approx(0.8 / 3)  # the mean over all of that length's seeds
    d = second["dB"]
    assert d["n"] == 2 and d["relative"] == pytest.approx(0.38 / 0.40 - 1) and d["per_seed"] == pytest.approx([-0.1, 0.0])
    assert second["dU"]["relative"] == pytest.approx(d["relative"]) and second["loss_change"] == [-0.1, -0.1]
    assert d["per_doubling"] == pytest.approx(d["relative"])  # 1000 -> 2000 is one doubling
    assert "| student, labeled only | 2000 | 2 | 0.1900 | -5.0%, -5.0%/doubling (seeds -10.0% to +0.0%, n=2)" \
        in sc.markdown(out)
    assert "| 0.0800 | -10.0% to -10.0% |" in sc.markdown(out)  # the teacher's fitted B, the loss check


def test_reports_that_differ_in_more_than_steps_are_refused():
    with pytest.raises(SystemExit, match="more than their steps"):
        sc.curve([report(1000, {"0": 0.2}), report(2000, {"0": 0.2}, height=64)])
    with pytest.raises(SystemExit, match="same number of steps"):
        sc.curve([report(1000, {"0": 0.2}), report(1000, {"0": 0.2})])


def test_main_writes_the_table_and_the_figure(tmp_path):
    paths = []
    for steps, b in ((1000, 0.2), (3000, 0.19)):
        p = tmp_path / f"r{steps}.json"
        p.write_text(json.dumps(report(steps, {"0": b})))
        paths.append(str(p))
    assert sc.main([*paths, "--out", str(tmp_path / "curve")]) == 0
    assert (tmp_path / "curve.png").stat().st_size > 0 and "| 3000 | 1 | 0.1900 |" in (tmp_path / "curve.md").read_text()


def test_the_plateau_verdict_is_per_doubling_of_the_last_lengthening():
    # 1000 -> 4000 is two doublings: -3.96% overall is -2.0% per doubling, just not a plateau
    steep = sc.curve([report(1000, {"0": 0.2}), report(4000, {"0": 0.2 * 0.98 ** 2 * 0.9999})])
    assert steep["student, labeled only"][1]["dB"]["per_doubling"] == pytest.approx(-0.02, abs=1e-4)
    assert "no plateau by 4000 steps" in sc.verdicts(steep)["student, labeled only"]
    # a big early gain does not hide a flat last doubling
    flat = sc.curve([report(1000, {"0": 0.3}), report(2000, {"0": 0.2}), report(4000, {"0": 0.199})])
    assert "plateau reached by 4000 steps (zero-shot B -0.50% per doubling" in sc.verdicts(flat)["student, labeled only"]
