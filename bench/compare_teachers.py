"""Does a stronger teacher make a better student? Paired per-seed differences between two reproduce reports.

    python bench/compare_teachers.py --weaker bench/results/teacher_stage2/reproduce.json \
        --stronger bench/results/reproduce.json --out bench/results/teacher_stage3_vs_stage2

Both reports must come from ``bench/reproduce.py`` on the same panoramas and schedule (the scale is compared
and a mismatch refused), differing only in the teacher. For every student row that learns from the teacher's
pseudo labels, the stronger teacher's students are paired seed for seed with the weaker teacher's (same
seed: same initial weights and batch order) and the difference of AbsRel (lstsq) on zero-shot B and
in-domain U is given with its 95% t-interval (``_evidence.paired_difference``). Negative = the stronger
teacher's student is better. The teachers' own fitted rows are printed beside, so that "stronger" is a
measured statement too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import _evidence as ev
from _reproduce_report import FITTED_ROW as FITTED
from reproduce import Scale, all_rows, uses_teacher


def compare(weaker: dict, stronger: dict) -> dict:
    """{"teachers": fitted rows of both, "rows": {row: {split: paired difference}}}; pure."""
    if weaker["meta"]["scale"] != stronger["meta"]["scale"]:
        raise SystemExit("the two reports were made at different scales (sets, steps or sizes): not comparable")
    teachers = {name: {split: rep["table"][FITTED][f"{split}/lstsq/abs_rel"]["mean"] for split in ("B", "U")}
                for name, rep in (("weaker", weaker), ("stronger", stronger)) if FITTED in rep["table"]}
    rows = {}
    learners = {row for row, opts in all_rows(Scale()).items() if uses_teacher(opts)}
    for row, per_seed in stronger["per_seed"].items():
        if row not in learners or row not in weaker["per_seed"]:
            continue
        rows[row] = {split: ev.paired_difference({k: v[split]["lstsq"]["abs_rel"] for k, v in per_seed.items()},
                                                 {k: v[split]["lstsq"]["abs_rel"]
                                                  for k, v in weaker["per_seed"][row].items()})
                     for split in ("B", "U")}
    return {"teachers": teachers, "rows": rows}


def markdown(result: dict, weaker: str, stronger: str) -> str:
    t = result["teachers"]
    lines = [f"Weaker teacher: `{weaker}`; stronger: `{stronger}`. Teacher fitted per face (lstsq AbsRel): "
             + "; ".join(f"{name} B {v['B']:.4f}, U {v['U']:.4f}" for name, v in t.items()) + ".", "",
             "| row | seeds | Δ B AbsRel (stronger − weaker) | Δ U AbsRel (stronger − weaker) |", "|---|---|---|---|"]
    for row, d in result["rows"].items():
        cells = ["–" if not d[s] else f"{d[s]['mean']:+.4f} [{d[s]['ci95'][0]:+.4f}, {d[s]['ci95'][1]:+.4f}]"
                 for s in ("B", "U")]
        n = (d["B"] or {}).get("n", "<2")
        lines.append(f"| {row} | {n} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weaker", required=True, help="reproduce.json of the weaker teacher")
    ap.add_argument("--stronger", required=True, help="reproduce.json of the stronger teacher")
    ap.add_argument("--out", required=True, help="output path without suffix (.json and .md are written)")
    args = ap.parse_args(argv)
    weaker, stronger = (json.loads(Path(p).read_text()) for p in (args.weaker, args.stronger))
    result = compare(weaker, stronger)
    md = markdown(result, args.weaker, args.stronger)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"weaker": args.weaker, "stronger": args.stronger, **result},
                                                   indent=2) + "\n")
    out.with_suffix(".md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
