"""Does a stronger teacher make a better student? Paired per-seed differences between two reproduce reports,
and the slope of student against teacher over several.

    python bench/compare_teachers.py --weaker bench/results/teacher_stage3/reproduce.json \
        --stronger bench/results/reproduce.json --out bench/results/teacher_stage4_vs_stage3
    python bench/compare_teachers.py --ladder bench/results/teacher_stage2/reproduce.json \
        bench/results/teacher_stage3/reproduce.json bench/results/reproduce.json --out bench/results/teacher_ladder

Both reports must come from ``bench/reproduce.py`` on the same panoramas and schedule (the scale is compared
and a mismatch refused), differing only in the teacher. For every student row that learns from the teacher's
pseudo labels, the stronger teacher's students are paired seed for seed with the weaker teacher's (same
seed: same initial weights and batch order) and the difference of AbsRel (lstsq) on zero-shot B and
in-domain U is given with its 95% t-interval (``_evidence.paired_difference``). Negative = the stronger
teacher's student is better. The teachers' own fitted rows are printed beside, so that "stronger" is a
measured statement too.

``--ladder`` takes two or more such reports (any order; they are sorted by the teacher's fitted AbsRel on B,
weakest first) and gives, for every learner row that all of them have, the students' mean AbsRel under
each teacher and, per seed, the least-squares slope of the student's AbsRel against the teacher's fitted
AbsRel (same test set), with its 95% t-interval over seeds. A positive slope means the student gains as
the teacher does: slope 0.5 = the student's AbsRel falls 0.005 per 0.01 of the teacher's. Each slope uses
one seed's students only (same initial weights and batch order under every teacher), so the seed spread
of the students does not enter it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import _evidence as ev
from _reproduce_report import FITTED_ROW as FITTED
from _reproduce_report import SPLITS, scales_differ
from _reproduce_report import fitted_abs_rel as _fitted
from _reproduce_report import seed_abs_rel as _abs_rel
from reproduce import Scale, all_rows, uses_teacher


def _same_scale(reports: list[dict]) -> None:
    if scales_differ(reports):
        raise SystemExit("the reports were made at different scales (sets, steps or sizes): not comparable")


def _learners() -> set[str]:
    """The student rows that learn from the teacher (reproduce's own rule)."""
    return {row for row, opts in all_rows(Scale()).items() if uses_teacher(opts)}


def compare(weaker: dict, stronger: dict) -> dict:
    """{"teachers": fitted rows of both, "rows": {row: {split: paired difference}}}; pure."""
    _same_scale([weaker, stronger])
    teachers = {name: _fitted(rep) for name, rep in (("weaker", weaker), ("stronger", stronger))
                if FITTED in rep["table"]}
    learners = _learners()
    rows = {row: {split: ev.paired_difference(_abs_rel(per_seed, split), _abs_rel(weaker["per_seed"][row], split))
                  for split in SPLITS}
            for row, per_seed in stronger["per_seed"].items() if row in learners and row in weaker["per_seed"]}
    return {"teachers": teachers, "rows": rows}


def _slope(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def ladder(reports: dict[str, dict]) -> dict:
    """{"teachers": [(name, fitted B, fitted U)] weakest first, "rows": {row: {split: {"means", "slope"}}}};
    pure. ``slope`` is ``_evidence.paired_difference`` of the per-seed slopes against 0 (mean, ci95, n)."""
    if len(reports) < 2:
        raise SystemExit("a ladder needs the reports of at least two teachers")
    _same_scale(list(reports.values()))
    missing = [name for name, rep in reports.items() if FITTED not in rep["table"]]
    if missing:
        raise SystemExit(f"no fitted-teacher row ({FITTED!r}) in {', '.join(missing)}")
    fitted = {name: _fitted(rep) for name, rep in reports.items()}
    order = sorted(reports, key=lambda name: -fitted[name]["B"])
    if len({fitted[name]["B"] for name in order}) < 2:
        raise SystemExit("every teacher has the same fitted AbsRel: no slope to measure")
    rows = {}
    for row in sorted(_learners() & set.intersection(*(set(rep["per_seed"]) for rep in reports.values()))):
        seeds = sorted(set.intersection(*(set(reports[n]["per_seed"][row]) for n in order)), key=str)
        if not seeds:  # no seed trained under every teacher: nothing to pair
            continue
        rows[row] = {}
        for split in SPLITS:
            per = {n: _abs_rel({k: reports[n]["per_seed"][row][k] for k in seeds}, split) for n in order}
            xs = [fitted[n][split] for n in order]
            slopes = {k: _slope(xs, [per[n][k] for n in order]) for k in seeds}
            rows[row][split] = {"means": [sum(per[n].values()) / len(seeds) for n in order], "seeds": seeds,
                                "slope": ev.paired_difference(slopes, {k: 0.0 for k in seeds})}
    return {"teachers": [(n, fitted[n]["B"], fitted[n]["U"]) for n in order], "rows": rows}


def ladder_markdown(result: dict) -> str:
    t = result["teachers"]
    lines = ["Teachers, weakest first (fitted per face, lstsq AbsRel B / U): "
             + "; ".join(f"`{n}` {b:.4f} / {u:.4f}" for n, b, u in t) + ".", "",
             "| row | seeds | B: students' AbsRel, teacher by teacher | slope B [95%] | U: students' AbsRel | "
             "slope U [95%] |", "|---|---|---|---|---|---|"]
    for row, d in result["rows"].items():
        cells = []
        for split in SPLITS:
            sl = d[split]["slope"]
            cells += [" → ".join(f"{m:.4f}" for m in d[split]["means"]),
                      "–" if not sl else f"{sl['mean']:+.2f} [{sl['ci95'][0]:+.2f}, {sl['ci95'][1]:+.2f}]"]
        lines.append(f"| {row} | {len(d['B']['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(result: dict, weaker: str, stronger: str) -> str:
    t = result["teachers"]
    lines = [f"Weaker teacher: `{weaker}`; stronger: `{stronger}`. Teacher fitted per face (lstsq AbsRel): "
             + "; ".join(f"{name} B {v['B']:.4f}, U {v['U']:.4f}" for name, v in t.items()) + ".", "",
             "| row | seeds | Δ B AbsRel (stronger − weaker) | Δ U AbsRel (stronger − weaker) |", "|---|---|---|---|"]
    for row, d in result["rows"].items():
        cells = ["–" if not d[s] else f"{d[s]['mean']:+.4f} [{d[s]['ci95'][0]:+.4f}, {d[s]['ci95'][1]:+.4f}]"
                 for s in SPLITS]
        n = (d["B"] or {}).get("n", "<2")
        lines.append(f"| {row} | {n} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weaker", help="reproduce.json of the weaker teacher")
    ap.add_argument("--stronger", help="reproduce.json of the stronger teacher")
    ap.add_argument("--ladder", nargs="+", metavar="REPORT", help="instead: reproduce.json of two or more teachers")
    ap.add_argument("--out", required=True, help="output path without suffix (.json and .md are written)")
    args = ap.parse_args(argv)
    if args.ladder and (args.weaker or args.stronger):
        ap.error("--ladder replaces --weaker/--stronger")
    if not args.ladder and not (args.weaker and args.stronger):
        ap.error("give --weaker and --stronger, or --ladder")
    read = lambda p: json.loads(Path(p).read_text())  # noqa: E731
    if args.ladder:
        result = ladder({p: read(p) for p in args.ladder})
        md = ladder_markdown(result)
    else:
        result = {"weaker": args.weaker, "stronger": args.stronger, **compare(read(args.weaker), read(args.stronger))}
        md = markdown(result, args.weaker, args.stronger)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
