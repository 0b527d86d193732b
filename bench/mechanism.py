"""Does cube rotation remove cube-face artefacts? An oracle teacher with random per-face affine maps.

    python bench/mechanism.py                 # full: 2 seeds x augmentation off/on x rotation off/on (~25 min)
    python bench/mechanism.py --quick         # 1 seed, augmentation off, 250 steps (~2 min)
    python bench/mechanism.py --seeds 0 1 2 --steps 1500 --augment off --out /tmp/mech.json
    python bench/mechanism.py --seeds 0 --augment on --rotation on --model unifuse --encoder resnet_small \
        --scenes 512 --steps 8000 --out bench/results/mechanism_small_s0.json   # goal A (~40 min)

Every run is the real command line, ``python -m student.train --config configs/tiny.yaml`` plus overrides
(printed, and kept in the JSON): generated "apartment" scenes (unlabeled 128, held-out val 24, rendered at
128x256 and trained at 64x128), a tiny UniFuse student, **no labels** (``distill.labeled_weight=0``), and the
oracle teacher (``teacher.mode=oracle``): the exact planar disparity of each face of the (rotated) cube,
times a random scale in [0.5, 2] plus a random shift per face (``teacher.oracle_affine=true``), with 5%
multiplicative noise per pixel (``teacher.oracle_noise``). The runs of one seed differ only in
``distill.rotation`` (and in ``distill.augment`` between the two groups), so initial weights, data order and
augmentations are the same. Each run gets one torch thread (``OMP_NUM_THREADS=1``): on 2 shared cores two
threads made every step 8-9x slower here.

Everything is then scored in this process on the held-out scenes, with the same predictions for every
metric:

* **AbsRel, delta1**: ``student.evaluate.evaluate_predictor`` (the reference code's ``lstsq`` protocol,
  0 < gt <= 10 m; AbsRel under ``median`` beside it), the same code that writes each run's eval.json (whose
  AbsRel is kept in the JSON as a cross-check).
* **baseline: constant depth**: a content-free constant prediction scored the same way; **goal A**: the
  oracle-taught student reaches AbsRel <= 0.05 (lstsq) on the held-out scenes (the table's last line).
* **seam ratio** (the artefact): on the equirect map ``d`` (disparity divided by its median over valid
  pixels), label every pixel with the face of the *unrotated* cube that its ray hits (``ray_face_coords``;
  the cube the no-rotation student was trained on). A *border pair* (p, q) is two neighbouring pixels (q the
  right neighbour of p, wrapping in longitude, or its lower neighbour) on different faces; its two
  *flanking pairs* are the same pair shifted by ``--flank-offset`` (2) pixels back and forward along the
  same direction, (p - 2s, q - 2s) and (p + 2s, q + 2s) with s the step from p to q, each kept when both of
  its pixels lie on one face. Seam ratio = mean |d(q) - d(p)| over border pairs / mean |Delta d| over
  flanking pairs, pooled over all images, pairs with an invalid pixel dropped. A map without a
  discontinuity at the face borders gives ~1 (the flanking pairs sit at nearly the same place and point the
  same way, so latitude, pair direction and scene layout cancel); a step at the borders gives > 1. The
  offset is 2, not 1, because the students' stride-2 layers leave a checkerboard in their output (every
  other column boundary jumps more), and the side borders fall on fixed column parities (columns W/8,
  3W/8, ...): with an offset of 1 the flanks have the other parity and the ratio measures the checkerboard
  (we saw 2.1 on a student without any visible seam).
  Reported for all 12 borders and split into *side* borders (between two of F, R, B, L) and *cap* borders
  (a side face against U or D).
* **error seam ratio**: the same on ``e = d_pred - d_gt`` (both median-normalised): the part of the jump
  that the ground truth does not have. ~1 for an error that is smooth across borders.
* **interior ratio**: the first idea we tried, mean border jump / mean jump over *all* same-face pairs; it
  also depends on where the borders lie (their latitudes), hence the ground-truth row.
* **face scale spread**: per image, r_k = median(d_gt / d_pred) over the valid pixels of unrotated face k;
  the standard deviation of log r_k over the six faces, averaged over images. 0 when the faces agree in
  scale; per-face scale (or shift) inconsistency raises it, but so does any error.

The same metrics are given for the ground truth (seam ratios only; its own "natural level"), for a
positive control (the exact disparity times a random scale in [0.8, 1.25] per unrotated face: the kind of
per-face inconsistency that a per-face affine-invariant loss on a fixed cube would not penalise) and for
the untrained student of each seed. Outputs: ``--out`` (JSON), the same path with ``.md`` (table), and next to
it ``mechanism.png`` (one held-out scene: RGB, ground truth and the students' disparity with the unrotated
cube's face borders overlaid, and their jump maps) and ``mechanism_loss.png`` (the loss curves).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import _child  # noqa: E402  (bench/, first on sys.path when run as a script)
import _evidence  # noqa: E402
from _child import log, machine, mean_sd  # noqa: E402
from _seams import (SeamAccumulator, draw_figure, face_scale_spread, median_normalised,  # noqa: E402
                    score_ground_truth, seam_pairs)

BASE_CONFIG = "configs/tiny.yaml"


# ------------------------------------------------------------------------------------------ the runs

def common_overrides(args) -> list[str]:
    h = args.height
    return [
        "run.progress=false", f"run.log_every={args.log_every}", "run.ckpt_every=0",
        f"data.height={h}", f"data.batch_size={args.batch}", "data.num_workers=1", "data.shuffle=32",
        f"data.generated.labeled={args.scenes}", f"data.generated.unlabeled={args.scenes}",
        f"data.generated.val={args.val}", "data.generated.labeled_style=apartment",
        "data.generated.unlabeled_style=apartment", "data.generated.val_style=apartment",
        "data.generated.watermark=false", f"data.generated.height={2 * h}", "data.generated.samples_per_shard=8",
        f"model.name={args.model}", f"model.encoder={args.encoder}",
        "teacher.mode=oracle", "teacher.oracle_affine=true", f"teacher.oracle_noise={args.noise}",
        "distill.labeled_weight=0", f"distill.face_size={h // 2}",
        f"optim.lr={args.lr}", f"optim.steps={args.steps}",
    ]


def run_overrides(args, out_dir: Path, seed: int, augment: bool, rotation: bool) -> list[str]:
    return common_overrides(args) + [f"run.out_dir={out_dir}", f"run.seed={seed}",
                                     f"distill.augment={str(augment).lower()}",
                                     f"distill.rotation={str(rotation).lower()}"]


def train(name: str, overrides: list[str], run_dir: Path) -> dict:
    """One training run as a child process, its progress echoed from metrics.jsonl."""
    run = _child.train(name, BASE_CONFIG, overrides, run_dir,
                       lambda r: f"step {r['step']:5d}  loss {r['losses'].get('loss', math.nan):.4f}  "
                                 f"{r['step_time']:.3f} s/step")
    recs = run.records
    log(f"train {name}: final loss {recs[-1]['losses']['loss']:.4f}")
    return {"command": run.command, "wall_s": run.wall_s,
            "loss_curve": [[r["step"], r["losses"]["loss"]] for r in recs],
            "median_step_s": statistics.median([r["step_time"] for r in recs]) if recs else None,
            "eval_json_abs_rel": run.eval.get("metrics", {}).get("abs_rel")}


def score(predict, samples: list[dict], pairs: dict, device: torch.device, keep_first: bool = True) -> dict:
    """AbsRel etc. by evaluate_predictor, plus seam metrics on the same predictions."""
    from student.evaluate import evaluate_predictor

    preds: list[torch.Tensor] = []

    def capture(rgb):
        out = predict(rgb)
        preds.append(out.float().cpu())
        return out

    report = evaluate_predictor(capture, samples, device=device, protocol="lstsq", max_depth=10.0,
                                batch_size=4)
    median = report["metrics_by_protocol"]["median"]
    disp = torch.cat(preds)[:, 0]
    seam, err = SeamAccumulator(), SeamAccumulator()
    spreads = []
    for s, dp in zip(samples, disp):
        gt = s["depth"][0]
        ok = s["valid"][0].bool() & (gt > 0) & (gt <= 10.0) & torch.isfinite(gt)
        d_gt = torch.where(ok, 1.0 / gt.clamp_min(1e-6), torch.zeros_like(gt))
        dn_pred, dn_gt = median_normalised(dp, ok), median_normalised(d_gt, ok)
        seam.add(dn_pred, ok, pairs)
        err.add(dn_pred - dn_gt, ok, pairs)
        spreads.append(face_scale_spread(dp, d_gt, ok, pairs["face"]))
    out = {"abs_rel": report["metrics"]["abs_rel"], "delta1": report["metrics"]["delta1"],
           "abs_rel_median": median["abs_rel"], "delta1_median": median["delta1"],
           "images": report["images"], **seam.result(),
           "error_seam_ratio": err.result()["seam_ratio"], "error_seam_ratio_side": err.result()["seam_ratio_side"],
           "error_seam_ratio_cap": err.result()["seam_ratio_cap"],
           "face_scale_spread": statistics.fmean([s for s in spreads if not math.isnan(s)])}
    if keep_first:
        out["_first"] = disp[0]
    return out


def draw_loss(path: Path, runs: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8), constrained_layout=True)
    for name, r in runs.items():
        curve = r["loss_curve"]
        style = "-" if "rot-on" in name else "--"
        ax.plot([c[0] for c in curve], [c[1] for c in curve], style, label=name, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("pseudo-label loss (per-face affine-invariant L1)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- main

COLUMNS = (("abs_rel", "AbsRel", 4), ("abs_rel_median", "AbsRel median", 4), ("delta1", "δ1", 3),
           ("seam_ratio", "seam ratio", 2),
           ("seam_ratio_side", "side", 2), ("seam_ratio_cap", "cap", 2), ("error_seam_ratio", "error seam", 2),
           ("interior_ratio", "border/interior", 2), ("face_scale_spread", "face scale spread", 3))


def fmt(mean: float, sd: float | None, digits: int) -> str:
    if mean is None or math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd else "")


def table(rows: dict[str, dict]) -> str:
    head = "| model | n | " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for name, row in rows.items():
        cells = [fmt(*row.get(k, (math.nan, None)), d) for k, _, d in COLUMNS]
        lines.append(f"| {name} | {row['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


GOAL_A = 0.05


def goal_a(rows: dict[str, dict]) -> str:
    """Goal A: a student taught by the oracle teacher alone reaches AbsRel <= 0.05 (lstsq) on held-out scenes."""
    trained = {g: r["abs_rel"][0] for g, r in rows.items() if g.startswith("augmentation")}
    if not trained:
        return "Goal A (oracle-teacher student AbsRel <= 0.05, lstsq, held-out scenes): no trained row."
    best = min(trained, key=trained.get)
    met = trained[best] <= GOAL_A
    return (f"Goal A (oracle-teacher student AbsRel <= {GOAL_A}, lstsq, held-out scenes): best row '{best}' "
            f"{trained[best]:.4f} (mean over seeds): {'met' if met else 'not met'}.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 seed, augmentation off, 250 steps")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 (quick: 0)")
    p.add_argument("--augment", choices=("off", "on", "both"), default=None, help="default both (quick: off)")
    p.add_argument("--steps", type=int, default=None, help="default 1000 (quick: 250)")
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--batch", type=int, default=8, help="data.batch_size: half of it unlabeled, trained on")
    p.add_argument("--scenes", type=int, default=128)
    p.add_argument("--val", type=int, default=24)
    p.add_argument("--model", default="unifuse_tiny")
    p.add_argument("--encoder", default="", help="model.encoder; empty: the model's default (e.g. resnet_small)")
    p.add_argument("--rotation", choices=("off", "on", "both"), default="both",
                   help="which distill.rotation rows to train (goal A needs only 'on')")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--noise", type=float, default=0.05)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--flank-offset", type=int, default=2, help="pixels between a border pair and its flanking pairs")
    p.add_argument("--figure-index", type=int, default=0, help="held-out scene drawn in mechanism.png")
    p.add_argument("--work", default="", help="folder of the run folders (default: a temporary one, removed)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "mechanism.json"))
    args = p.parse_args(argv)
    args.seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1])
    args.augment = args.augment or ("off" if args.quick else "both")
    args.steps = args.steps or (250 if args.quick else 1000)
    switch = {"off": [False], "on": [True], "both": [False, True]}  # an --augment/--rotation choice -> its values
    augments, rotations = switch[args.augment], switch[args.rotation]

    torch.set_num_threads(1)
    t_start = time.perf_counter()
    started = _dt.datetime.now(_dt.timezone.utc)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="pd-mechanism-"))
    work.mkdir(parents=True, exist_ok=True)
    info = machine()
    log(f"machine: {info['cpu']}, {info['cores']} cores, load average {info['load_average']}, torch {info['torch']}")
    log(f"seeds {args.seeds}, augmentation {args.augment}, rotation {args.rotation}, {args.steps} steps, "
        f"{args.model}{' (' + args.encoder + ')' if args.encoder else ''} at "
        f"{args.height}x{2 * args.height}; run folders in {work}")

    from sharding.stream import read_samples
    from student.config import load_config
    from student.data import _split, prepare_data
    from student.evaluate import student_predictor
    from student.inference import build_student, load_student

    # render the scenes once, outside the timed runs, and read the held-out set
    cfg = prepare_data(load_config(ROOT / BASE_CONFIG, common_overrides(args)))
    val_urls = cfg.data.val
    samples = list(read_samples(val_urls, height=args.height, split=_split(val_urls, "", ("val", "test")),
                                labeled=True))
    log(f"held-out set: {len(samples)} panoramas from {val_urls[0]}")
    pairs = seam_pairs(args.height, 2 * args.height, args.flank_offset)
    device = torch.device("cpu")

    runs: dict[str, dict] = {}
    scores: dict[str, dict] = {}
    firsts: dict[str, torch.Tensor] = {}
    gt, control = score_ground_truth(samples, pairs)
    log(f"ground truth: seam ratio {gt['seam_ratio']:.3f} (side {gt['seam_ratio_side']:.3f}, cap "
        f"{gt['seam_ratio_cap']:.3f}), border/interior {gt['interior_ratio']:.3f}; control (exact disparity "
        f"x random scale per face): seam ratio {control['seam_ratio']:.3f}")
    const = score(_evidence.constant_predictor, samples, pairs, device, keep_first=False)
    scores["baseline: constant depth"] = const
    log(f"baseline, constant depth: AbsRel {const['abs_rel']:.4f} (median protocol {const['abs_rel_median']:.4f})")
    for seed in args.seeds:
        torch.manual_seed(seed)  # the initial weights of the runs of this seed (session.py does the same)
        untrained = build_student(cfg.model)
        s = score(student_predictor(untrained), samples, pairs, device)
        firsts[f"untrained s{seed}"] = s.pop("_first")
        scores[f"untrained s{seed}"] = s
        log(f"untrained s{seed}: AbsRel {s['abs_rel']:.4f}, seam ratio {s['seam_ratio']:.3f}")
        for augment in augments:
            for rotation in rotations:
                name = f"aug-{'on' if augment else 'off'} rot-{'on' if rotation else 'off'} s{seed}"
                run_dir = work / name.replace(" ", "_")
                runs[name] = train(name, run_overrides(args, run_dir, seed, augment, rotation), run_dir)
                model, _, _ = load_student(run_dir, device)
                s = score(student_predictor(model), samples, pairs, device)
                firsts[name] = s.pop("_first")
                scores[name] = s
                log(f"{name}: AbsRel {s['abs_rel']:.4f} (eval.json {runs[name]['eval_json_abs_rel']:.4f}), "
                    f"delta1 {s['delta1']:.3f}, seam ratio {s['seam_ratio']:.3f} (side {s['seam_ratio_side']:.3f}, "
                    f"cap {s['seam_ratio_cap']:.3f}), error seam {s['error_seam_ratio']:.3f}, face spread "
                    f"{s['face_scale_spread']:.3f}")

    # aggregate over seeds
    groups: dict[str, list[str]] = {"ground truth": [], "control: ground truth x per-face scale": [],
                                    "baseline: constant depth": ["baseline: constant depth"],
                                    "untrained": [k for k in scores if k.startswith("untrained")]}
    for augment in augments:
        for rotation in rotations:
            g = f"augmentation {'on' if augment else 'off'}, rotation {'on' if rotation else 'off'}"
            prefix = f"aug-{'on' if augment else 'off'} rot-{'on' if rotation else 'off'}"
            groups[g] = [k for k in scores if k.startswith(prefix)]
    rows: dict[str, dict] = {}
    for g, names in groups.items():
        if g == "ground truth":
            rows[g] = {"n": len(samples), **{k: (gt[k], None) for k in ("seam_ratio", "seam_ratio_side",
                                                                        "seam_ratio_cap", "interior_ratio")}}
            continue
        if g.startswith("control"):
            rows[g] = {"n": len(samples), **{k: (control[k], None) for k in (
                "seam_ratio", "seam_ratio_side", "seam_ratio_cap", "interior_ratio", "error_seam_ratio",
                "face_scale_spread")}}
            continue
        rows[g] = {"n": len(names), **{k: mean_sd([scores[n][k] for n in names]) for k, _, _ in COLUMNS}}
    md = table(rows) + "\n\n" + goal_a(rows)

    fig_dir = out.parent
    idx = min(args.figure_index, len(samples) - 1)
    seed0 = args.seeds[0]
    aug0 = "off" if False in augments else "on"
    panels = []
    shown = [("untrained", None), ("no rotation", f"aug-{aug0} rot-off s{seed0}"),
             ("rotation", f"aug-{aug0} rot-on s{seed0}")]
    shown = [(title, key) for title, key in shown if key is None or key in scores]  # the rows trained
    for title, key in shown:
        if idx == 0:
            panels.append((title, firsts[key or f"untrained s{seed0}"]))
    if idx != 0:  # recompute the chosen scene's predictions from the saved runs
        for title, key in shown:
            if key is None:
                torch.manual_seed(seed0)
                m = build_student(cfg.model).eval()
            else:
                m, _, _ = load_student(work / key.replace(" ", "_"), device)
            with torch.inference_mode():
                panels.append((title, m(samples[idx]["rgb"][None])[0, 0].float()))
    png = fig_dir / f"{out.stem}.png"  # named after --out, so a variant never overwrites the default's
    draw_figure(png, samples[idx], panels, pairs["face"])
    loss_png = fig_dir / f"{out.stem}_loss.png"
    draw_loss(loss_png, runs)

    wall = time.perf_counter() - t_start
    result = {
        "benchmark": "bench/mechanism.py", "started_utc": started.isoformat(timespec="seconds"),
        "command": shlex.join(["python", "bench/mechanism.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": info, "load_average_end": list(os.getloadavg()), "wall_s": wall,
        "settings": {k: (v if not isinstance(v, Path) else str(v)) for k, v in vars(args).items()},
        "base_config": BASE_CONFIG, "common_overrides": common_overrides(args), "held_out": val_urls,
        "held_out_images": len(samples), "ground_truth": gt, "control_per_face_scale": control, "runs": runs,
        "scores": scores,
        "table": {g: {k: (list(v) if isinstance(v, tuple) else v) for k, v in r.items()} for g, r in rows.items()},
        "figures": [str(png), str(loss_png)],
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    header = (f"Oracle teacher with per-face affine (+{args.noise:.0%} noise), no labels, {args.model}"
              f"{' (' + args.encoder + ')' if args.encoder else ''} at "
              f"{args.height}x{2 * args.height}, {args.steps} steps, seeds {args.seeds}; {len(samples)} held-out "
              "scenes. AbsRel and δ1 under the reference protocol (lstsq), AbsRel median beside it. "
              f"Mean ± sd over seeds. Seam ratios: border jump / flanking jump {args.flank_offset} px away "
              "(1 = no seam).")
    out.with_suffix(".md").write_text(header + "\n\n" + md + "\n")
    print("\n" + header + "\n\n" + md)
    print(f"\nwall time {wall / 60:.1f} min; load average at the end {os.getloadavg()}")
    print(f"wrote {out}, {out.with_suffix('.md')}, {png}, {loss_png}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
