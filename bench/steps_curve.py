"""Does a row stop improving with a longer schedule? Student AbsRel against the number of steps, across
reproduce reports that differ only in ``--steps``.

    python bench/steps_curve.py bench/results/reproduce.json bench/results/steps3000/reproduce.json \
        bench/results/steps6000/reproduce.json bench/results/steps12000/reproduce.json \
        --out bench/results/steps_curve

The reports must come from ``bench/reproduce.py`` on the same panoramas and sizes: their scales must be
equal except for ``steps`` and the seeds run (a mismatch is refused). For every student row that two or more reports have,
at each length: the mean AbsRel (lstsq) over seeds on zero-shot B and in-domain U, and the change from the
previous length, **paired** over the seeds both lengths have (same seed: same initial weights and batch
order), as a relative change of that pair's mean, and that change per doubling of the schedule (lengths
need not be doublings: 1000 -> 3000 is 1.58 of them). The plateau verdict, a decision written down: a row has
reached a plateau on the tests when its last lengthening improved zero-shot B by less than ``PLATEAU``
(2%) per doubling, about the relative seed spread of the labeled-only student at 6000-12000 steps (sd
0.003-0.004 on 0.18-0.19): a doubling that buys less than one seed's spread is not worth its compute. Beside
it, each report's own training-curve
check (the labeled loss over the last 20% of steps against the 20% before). Reports may use different
teachers (each length lists its teacher's fitted-per-face AbsRel on B): for the pseudo-label rows a length
change may then be a teacher change too. Outputs: ``--out`` + ``.json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from _reproduce_report import FITTED_ROW, SPLITS, scales_differ

FREE = ("steps", "seeds", "decisive_seeds", "ckpt_every")  # may differ: the seeds run are a selection, and
# checkpoints change nothing trained (tests/test_reproduce_smoke.py: the same weights with and without them)
PLATEAU = 0.02  # a lengthening that improves B by less than this per doubling: the row has plateaued (docstring)


def _student_rows(rep: dict) -> list[str]:
    """The rows of trained students; teacher and baseline rows are scored once, under a "-" seed."""
    return [row for row, per_seed in rep["per_seed"].items() if "-" not in per_seed]


def curve(reports: list[dict]) -> dict:
    """{row: [{steps, seeds, B, U, dB, dU, teacher_fitted_B, loss_change}, ...] by increasing steps}."""
    if scales_differ(reports, FREE):
        raise SystemExit("the reports differ in more than their steps (sets or sizes): not comparable")
    reports = sorted(reports, key=lambda rep: rep["meta"]["scale"]["steps"])
    if len({rep["meta"]["scale"]["steps"] for rep in reports}) < len(reports):
        raise SystemExit("two reports have the same number of steps")
    out: dict[str, list[dict]] = {}
    rows = [row for row in dict.fromkeys(r for rep in reports for r in _student_rows(rep))
            if sum(row in rep["per_seed"] for rep in reports) >= 2]
    for row in rows:
        points, prev = [], None
        for rep in reports:
            seeds = rep["per_seed"].get(row)
            if not seeds:
                continue
            ar = {s: {split: v[split]["lstsq"]["abs_rel"] for split in SPLITS} for s, v in seeds.items()}
            fitted = rep.get("table", {}).get(FITTED_ROW, {}).get("B/lstsq/abs_rel", {}).get("mean")
            point = {"steps": rep["meta"]["scale"]["steps"], "seeds": ar, "teacher_fitted_B": fitted}
            for split in SPLITS:
                point[split] = statistics.fmean(v[split] for v in ar.values())
                point[f"d{split}"] = _paired_change(prev["seeds"], ar, split, point["steps"] / prev["steps"]) \
                    if prev else None
            plat = rep["meta"].get("plateau", {}).get(row, {})
            changes = [v["relative_change"] for v in plat.values() if v]
            point["loss_change"] = [min(changes), max(changes)] if changes else None
            points.append(point)
            prev = point
        out[row] = points
    return out


def _paired_change(before: dict, after: dict, split: str, ratio: float) -> dict | None:
    """Relative change of the mean AbsRel over the seeds both lengths have, with those seeds' range, and the
    same change per doubling of the schedule (``ratio``: the new length over the old)."""
    common = sorted(set(before) & set(after))
    if not common:
        return None
    b = statistics.fmean(before[s][split] for s in common)
    per_seed = [(after[s][split] - before[s][split]) / before[s][split] for s in common]
    relative = statistics.fmean(after[s][split] for s in common) / b - 1.0
    return {"n": len(common), "relative": relative, "per_doubling": (1.0 + relative) ** (1.0 / math.log2(ratio)) - 1.0,
            "per_seed": [min(per_seed), max(per_seed)]}


def verdicts(result: dict) -> dict[str, str]:
    """Per row: has it reached a plateau on zero-shot B by its last lengthening (``PLATEAU``, docstring)?"""
    out = {}
    for row, points in result.items():
        last = next((p for p in reversed(points) if p["dB"]), None)
        if last is None:
            continue
        d = last["dB"]["per_doubling"]
        reached = d > -PLATEAU
        out[row] = (f"{row}: {'plateau reached' if reached else 'no plateau'} by {last['steps']} steps "
                    f"(zero-shot B {d:+.2%} per doubling over the last lengthening, n={last['dB']['n']} seed(s); "
                    f"plateau: better than {-PLATEAU:.0%} per doubling)")
    return out


def markdown(result: dict) -> str:
    lines = ["| row | steps | seeds | B AbsRel lstsq | vs previous length (paired) | U AbsRel lstsq | "
             "vs previous length (paired) | teacher, fitted per face, B | labeled loss, last 20% vs the 20% before |",
             "|---|---|---|---|---|---|---|---|---|"]

    def change(d):
        if not d:
            return "–"
        lo, hi = d["per_seed"]
        return f"{d['relative']:+.1%}, {d['per_doubling']:+.1%}/doubling (seeds {lo:+.1%} to {hi:+.1%}, n={d['n']})"

    for row, points in result.items():
        for p in points:
            loss = p["loss_change"]
            loss_s = f"{loss[0]:+.1%} to {loss[1]:+.1%}" if loss else "–"
            fitted = f"{p['teacher_fitted_B']:.4f}" if p["teacher_fitted_B"] is not None else "–"
            lines.append(f"| {row} | {p['steps']} | {len(p['seeds'])} | {p['B']:.4f} | {change(p['dB'])} | "
                         f"{p['U']:.4f} | {change(p['dU'])} | {fitted} | {loss_s} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    for ax, split, title in zip(axes, SPLITS, ("zero-shot B (offices)", "in-domain U")):
        for i, (row, points) in enumerate(result.items()):
            color = f"C{i}"
            steps = [p["steps"] for p in points]
            ax.plot(steps, [p[split] for p in points], "-o", color=color, label=row, lw=1.2)
            for p in points:
                vals = [v[split] for v in p["seeds"].values()]
                ax.scatter([p["steps"]] * len(vals), vals, s=9, color=color, alpha=0.4)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({p["steps"] for pts in result.values() for p in pts}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("training steps (cosine schedule)")
        ax.set_ylabel("AbsRel (lstsq)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reports", nargs="+", help="reproduce.json files of the same design, different --steps")
    ap.add_argument("--out", required=True, help="output path without suffix (.json, .md, .png are written)")
    args = ap.parse_args(argv)
    if len(args.reports) < 2:
        raise SystemExit("give at least two reports")
    result = curve([json.loads(Path(p).read_text()) for p in args.reports])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    verdict = verdicts(result)
    out.with_suffix(".json").write_text(json.dumps({"reports": args.reports, "rows": result, "plateau": verdict},
                                                   indent=2) + "\n")
    header = ("AbsRel (lstsq, mean over seeds) against the schedule's length; changes are paired over the seeds "
              "both lengths have. Reports: " + ", ".join(f"`{p}`" for p in args.reports) + ".")
    md = header + "\n\n" + markdown(result) + "\n\n" + "\n".join(f"- {v}" for v in verdict.values()) + "\n"
    out.with_suffix(".md").write_text(md)
    plot(result, out.with_suffix(".png"))
    print(md)
    print(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
