"""Does cube rotation remove cube-face artefacts? An oracle teacher with random per-face affine maps.

    python bench/mechanism.py                 # full: 2 seeds x augmentation off/on x rotation off/on (~25 min)
    python bench/mechanism.py --quick         # 1 seed, augmentation off, 250 steps (~2 min)
    python bench/mechanism.py --seeds 0 1 2 --steps 1500 --augment off --out /tmp/mech.json

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

* **AbsRel, delta1**: ``student.evaluate.evaluate_predictor`` (median alignment, 0 < gt <= 10 m), the same
  code that writes each run's eval.json (whose AbsRel is kept in the JSON as a cross-check).
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
* **interior ratio**: the brief's first idea, mean border jump / mean jump over *all* same-face pairs; it
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
import platform
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
from _child import log  # noqa: E402

BASE_CONFIG = "configs/tiny.yaml"
FACE_SIDE, FACE_CAP = 0, 1




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
        f"model.name={args.model}", "model.encoder=",
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


# --------------------------------------------------------------------------------------- the metrics

def face_labels(height: int, width: int) -> torch.Tensor:
    from panorama import equirect_directions, ray_face_coords

    face, _, _ = ray_face_coords(equirect_directions(height, width, dtype=torch.float64))
    return face  # (H, W) in F, R, B, L, U, D order


def seam_pairs(height: int, width: int, offset: int = 2) -> dict[str, torch.Tensor]:
    """Flat pixel indices of border pairs, their flanking pairs (the border pair shifted by ``offset`` pixels
    to either side along its direction) and all same-face pairs (see the module docstring)."""
    face = face_labels(height, width)
    ii, jj = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")

    def flat(i, j):
        return i * width + (j % width)

    bp, bq, btype, fa, fb, ftype, ia, ib = [], [], [], [], [], [], [], []
    for di, dj in ((0, 1), (1, 0)):
        rows = height - di  # vertical pairs stop at the last row; horizontal ones wrap in longitude
        i, j = ii[:rows], jj[:rows]
        p, q = flat(i, j), flat(i + di, j + dj)
        fp, fq = face.flatten()[p], face.flatten()[q]
        same = fp == fq
        ia.append(p[same])
        ib.append(q[same])
        border = ~same
        kind = torch.where((fp < 4) & (fq < 4), FACE_SIDE, FACE_CAP)
        bp.append(p[border])
        bq.append(q[border])
        btype.append(kind[border])
        # flanking pairs: the border pair shifted by -offset and +offset steps, kept if it lies on one face
        k = offset
        for (a_i, a_j, b_i, b_j) in ((i - k * di, j - k * dj, i + di - k * di, j + dj - k * dj),
                                     (i + k * di, j + k * dj, i + di + k * di, j + dj + k * dj)):
            inside = border & (a_i >= 0) & (b_i < height) & (a_i < height) & (b_i >= 0)
            a, b = flat(a_i.clamp(0, height - 1), a_j), flat(b_i.clamp(0, height - 1), b_j)
            inside = inside & (face.flatten()[a] == face.flatten()[b])
            fa.append(a[inside])
            fb.append(b[inside])
            ftype.append(kind[inside])
    cat = torch.cat
    return {"border_p": cat(bp), "border_q": cat(bq), "border_type": cat(btype), "flank_a": cat(fa),
            "flank_b": cat(fb), "flank_type": cat(ftype), "inner_a": cat(ia), "inner_b": cat(ib), "face": face}


class SeamAccumulator:
    """Sums of |jump| and counts per pair class, pooled over images."""

    KEYS = ("border", "border_side", "border_cap", "flank", "flank_side", "flank_cap", "inner")

    def __init__(self):
        self.sums = {k: 0.0 for k in self.KEYS}
        self.counts = {k: 0 for k in self.KEYS}

    def add(self, d: torch.Tensor, ok: torch.Tensor, pairs: dict) -> None:
        """``d`` (H, W) map, ``ok`` (H, W) validity."""
        d, ok = d.flatten().double(), ok.flatten()

        def acc(key, a, b, sel=None):
            if sel is not None:
                a, b = a[sel], b[sel]
            keep = ok[a] & ok[b]
            self.sums[key] += float((d[a] - d[b]).abs()[keep].sum())
            self.counts[key] += int(keep.sum())

        p, q, t = pairs["border_p"], pairs["border_q"], pairs["border_type"]
        acc("border", p, q)
        acc("border_side", p, q, t == FACE_SIDE)
        acc("border_cap", p, q, t == FACE_CAP)
        a, b, t = pairs["flank_a"], pairs["flank_b"], pairs["flank_type"]
        acc("flank", a, b)
        acc("flank_side", a, b, t == FACE_SIDE)
        acc("flank_cap", a, b, t == FACE_CAP)
        acc("inner", pairs["inner_a"], pairs["inner_b"])

    def mean(self, key: str) -> float:
        return self.sums[key] / self.counts[key] if self.counts[key] else math.nan

    def result(self) -> dict[str, float]:
        m = self.mean

        def ratio(a: str, b: str) -> float:
            return m(a) / m(b) if m(b) > 0 else math.nan  # nan for a map without jumps (the exact truth)

        return {"seam_ratio": ratio("border", "flank"), "seam_ratio_side": ratio("border_side", "flank_side"),
                "seam_ratio_cap": ratio("border_cap", "flank_cap"), "interior_ratio": ratio("border", "inner"),
                "border_jump": m("border"), "flank_jump": m("flank"), "pairs_border": self.counts["border"],
                "pairs_flank": self.counts["flank"]}


def median_normalised(disp: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    med = disp[ok].median() if bool(ok.any()) else torch.tensor(1.0)
    return disp / med.clamp_min(1e-12)


def face_scale_spread(d_pred: torch.Tensor, d_gt: torch.Tensor, ok: torch.Tensor, face: torch.Tensor) -> float:
    logs = []
    for k in range(6):
        m = ok & (face == k) & (d_pred > 0)
        if int(m.sum()) >= 20:
            logs.append(float(torch.log(d_gt[m] / d_pred[m]).median()))
    return statistics.pstdev(logs) if len(logs) >= 2 else math.nan


def score(predict, samples: list[dict], pairs: dict, device: torch.device, keep_first: bool = True) -> dict:
    """AbsRel etc. by evaluate_predictor, plus seam metrics on the same predictions."""
    from student.evaluate import evaluate_predictor

    preds: list[torch.Tensor] = []

    def capture(rgb):
        out = predict(rgb)
        preds.append(out.float().cpu())
        return out

    report = evaluate_predictor(capture, samples, device=device, protocol="median", max_depth=10.0,
                                batch_size=4)
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
           "images": report["images"], **seam.result(),
           "error_seam_ratio": err.result()["seam_ratio"], "error_seam_ratio_side": err.result()["seam_ratio_side"],
           "error_seam_ratio_cap": err.result()["seam_ratio_cap"],
           "face_scale_spread": statistics.fmean([s for s in spreads if not math.isnan(s)])}
    if keep_first:
        out["_first"] = disp[0]
    return out


def score_ground_truth(samples: list[dict], pairs: dict, seed: int = 0) -> tuple[dict, dict]:
    """Seam metrics of the exact disparity, and of a positive control: the exact disparity times a random
    scale in [0.8, 1.25] per unrotated face (what an unconstrained per-face solution could look like)."""
    seam, control, control_err = SeamAccumulator(), SeamAccumulator(), SeamAccumulator()
    gen = torch.Generator().manual_seed(seed)
    spreads = []
    for s in samples:
        gt = s["depth"][0]
        ok = s["valid"][0].bool() & (gt > 0) & (gt <= 10.0) & torch.isfinite(gt)
        d_gt = torch.where(ok, 1.0 / gt.clamp_min(1e-6), torch.zeros_like(gt))
        dn = median_normalised(d_gt, ok)
        seam.add(dn, ok, pairs)
        scale = torch.exp(torch.empty(6).uniform_(math.log(0.8), math.log(1.25), generator=gen))[pairs["face"]]
        d_c = d_gt * scale
        control.add(median_normalised(d_c, ok), ok, pairs)
        control_err.add(median_normalised(d_c, ok) - dn, ok, pairs)
        spreads.append(face_scale_spread(d_c, d_gt, ok, pairs["face"]))
    c = control.result()
    c["error_seam_ratio"] = control_err.result()["seam_ratio"]
    c["face_scale_spread"] = statistics.fmean(spreads)
    return seam.result(), c


# ------------------------------------------------------------------------------------------ pictures

def jump_map(d: torch.Tensor) -> torch.Tensor:
    dx = (torch.roll(d, -1, -1) - d).abs()
    dy = torch.cat([(d[1:] - d[:-1]).abs(), torch.zeros_like(d[:1])], 0)
    return torch.maximum(dx, dy)


def draw_figure(path: Path, sample: dict, panels: list[tuple[str, torch.Tensor]], face: torch.Tensor) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    gt = sample["depth"][0]
    ok = sample["valid"][0].bool() & (gt > 0) & (gt <= 10.0)
    d_gt = median_normalised(torch.where(ok, 1.0 / gt.clamp_min(1e-6), torch.zeros_like(gt)), ok)
    maps = [("ground truth", d_gt)] + [(t, median_normalised(d, ok)) for t, d in panels]
    below = torch.cat([face[1:] != face[:-1], torch.zeros_like(face[:1], dtype=torch.bool)], 0)
    border = (face != torch.roll(face, -1, -1)) | below
    overlay = np.ma.masked_where(~border.numpy(), np.ones(face.shape))
    vmin, vmax = np.percentile(d_gt[ok].numpy(), [2, 98])
    n = len(maps) + 1
    fig, axes = plt.subplots(2, n, figsize=(3.2 * n, 4.4), constrained_layout=True)
    axes[0, 0].imshow(sample["rgb"].permute(1, 2, 0).numpy())
    axes[0, 0].set_title("RGB (held-out scene)", fontsize=9)
    axes[1, 0].imshow(overlay, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    axes[1, 0].set_title("unrotated cube face borders", fontsize=9)
    jmax = float(np.percentile(jump_map(d_gt).numpy(), 99)) * 1.5
    for c, (title, d) in enumerate(maps, start=1):
        axes[0, c].imshow(d.numpy(), cmap="magma", vmin=vmin, vmax=vmax, interpolation="nearest")
        axes[0, c].imshow(overlay, cmap="cool", alpha=0.35, interpolation="nearest")
        axes[0, c].set_title(f"{title}: disparity / median", fontsize=9)
        axes[1, c].imshow(jump_map(d).numpy(), cmap="viridis", vmin=0, vmax=jmax, interpolation="nearest")
        axes[1, c].set_title(f"{title}: |jump| to right/lower neighbour", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.savefig(path, dpi=110)
    plt.close(fig)


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

def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average": list(os.getloadavg()),
            "torch": torch.__version__, "python": platform.python_version()}


def mean_sd(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


COLUMNS = (("abs_rel", "AbsRel", 4), ("delta1", "δ1", 3), ("seam_ratio", "seam ratio", 2),
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
    augments = {"off": [False], "on": [True], "both": [False, True]}[args.augment]

    torch.set_num_threads(1)
    t_start = time.perf_counter()
    started = _dt.datetime.now(_dt.timezone.utc)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="pd-mechanism-"))
    work.mkdir(parents=True, exist_ok=True)
    info = machine()
    log(f"machine: {info['cpu']}, {info['cores']} cores, load average {info['load_average']}, torch {info['torch']}")
    log(f"seeds {args.seeds}, augmentation {args.augment}, {args.steps} steps, {args.model} at "
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
    for seed in args.seeds:
        torch.manual_seed(seed)  # the initial weights of the runs of this seed (session.py does the same)
        untrained = build_student(cfg.model)
        s = score(student_predictor(untrained), samples, pairs, device)
        firsts[f"untrained s{seed}"] = s.pop("_first")
        scores[f"untrained s{seed}"] = s
        log(f"untrained s{seed}: AbsRel {s['abs_rel']:.4f}, seam ratio {s['seam_ratio']:.3f}")
        for augment in augments:
            for rotation in (False, True):
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
                                    "untrained": [k for k in scores if k.startswith("untrained")]}
    for augment in augments:
        for rotation in (False, True):
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
    md = table(rows)

    fig_dir = out.parent
    idx = min(args.figure_index, len(samples) - 1)
    seed0 = args.seeds[0]
    aug0 = "off" if False in augments else "on"
    panels = []
    for title, key in (("untrained", f"untrained s{seed0}"), ("no rotation", f"aug-{aug0} rot-off s{seed0}"),
                       ("rotation", f"aug-{aug0} rot-on s{seed0}")):
        if idx == 0:
            panels.append((title, firsts[key]))
    if idx != 0:  # recompute the chosen scene's predictions from the saved runs
        for title, key in (("untrained", None), ("no rotation", f"aug-{aug0} rot-off s{seed0}"),
                           ("rotation", f"aug-{aug0} rot-on s{seed0}")):
            if key is None:
                torch.manual_seed(seed0)
                m = build_student(cfg.model).eval()
            else:
                m, _, _ = load_student(work / key.replace(" ", "_"), device)
            with torch.inference_mode():
                panels.append((title, m(samples[idx]["rgb"][None])[0, 0].float()))
    png = fig_dir / "mechanism.png"
    draw_figure(png, samples[idx], panels, pairs["face"])
    loss_png = fig_dir / "mechanism_loss.png"
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
    header = (f"Oracle teacher with per-face affine (+{args.noise:.0%} noise), no labels, {args.model} at "
              f"{args.height}x{2 * args.height}, {args.steps} steps, seeds {args.seeds}; {len(samples)} held-out "
              f"scenes. Mean ± sd over seeds. Seam ratios: border jump / flanking jump {args.flank_offset} px away "
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
