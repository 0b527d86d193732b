"""Depth Anywhere in miniature: does distilling a perspective teacher through rotated cube faces help?

    python bench/reproduce.py --stage data         # render the sets, cache pseudo labels (~15 min, 2 cores)
    python bench/reproduce.py --stage decisive     # labeled only vs the full recipe, 5 seeds each
    python bench/reproduce.py --stage ablation     # + pseudo labels without rotation / without masks, 3 seeds
    python bench/reproduce.py --stage oracle       # oracle teacher dose-response, 4 noise levels x 3 seeds
    python bench/reproduce.py --stage report       # teacher and baseline rows, tables (from what has run)
    python bench/reproduce.py --toy                # CI smoke size: every stage in a couple of minutes

Each stage is one command of under 90 min on 2 CPU cores (estimated from 0.3 s per student step at this
size; a stage skips the runs already done, so a stage can be rerun after an interruption). Generated scenes
stand in for datasets we cannot download here:

* **perspective teacher**: by default the committed ``pano-distill-perspective-v2`` (trained on generated
  perspective views of every style, ``python -m student.perspective_teacher.train``); ``--train-teacher``
  trains one here instead (the toy profile always does);
* **labeled 360 data**: ~100 "apartment" panoramas (style A, the paper's Matterport3D);
* **unlabeled 360 data**: >= 3x as many, an equal mixture of every style (apartment, house, office:
  office-like rooms included), with windows onto sky and a watermark at the nadir; their masks come from the
  generator (standing in for GroundingDINO + SAM);
* **tests**: zero-shot style B, >= 300 "office" panoramas (the paper's Stanford2D3D), and an in-domain test
  "U" on held-out panoramas of the unlabeled mixture. Seeds of every set are disjoint (``SETS``,
  ``check_disjoint``).

Students train with a cosine schedule to a plateau. Rows: the decisive pair (labeled only; + pseudo labels,
rotation, masks) over 5 seeds, the ablations over 3; the oracle teacher (``teacher.mode=oracle``, exact
per-face disparity, a random affine map per face and multiplicative noise at 0, 0.1, 0.2, 0.4) with the full
recipe, next to labeled only of the same seeds (the dose-response: how good must a teacher be?). Every
student row gives its paired per-seed difference to labeled only with a 95% t-interval. Teacher rows: the
teacher's six unrotated faces merged to 360 (Table 3's Depth Anything row) and each face fitted to the ground
truth (what the teacher knows). Baseline rows, scored the same way: a content-free constant-depth prediction,
and the per-face fit applied to a constant-distance prediction (what the fit alone achieves). Metrics: the
reference code's ``lstsq`` protocol first, ``median`` beside it. Results: ``bench/results/reproduce.json``
and ``reproduce.md`` (``reproduce_toy.*`` for ``--toy``), reported as measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import _evidence as ev  # noqa: E402  (bench/, first on sys.path when run as a script)
from _child import child_env  # noqa: E402

V2_TEACHER = ROOT / "teacher_server" / "weights" / "pano-distill-perspective-v2"
MIX = ("apartment", "house", "office")
# name -> (styles, first seed): every set starts at its own seed, and set sizes stay below the gaps, so no
# panorama of one set is a panorama of another (scenes are drawn from (seed, style)).
SETS = {"labeled": (("apartment",), 1_000), "unlabeled": (MIX, 10_000), "test_b": (("office",), 20_000),
        "test_u": (MIX, 30_000)}
SEED_GAP = 10_000
DECISIVE = {"student, labeled only": dict(pseudo=False),
            "+ pseudo labels, rotation, masks": dict(pseudo=True, rotation=True, masks=True)}
ABLATION = {"+ pseudo labels, no rotation": dict(pseudo=True, rotation=False, masks=False),
            "+ pseudo labels, rotation": dict(pseudo=True, rotation=True, masks=False)}
BASE_ROW = "student, labeled only"
STAGES = ("data", "decisive", "ablation", "oracle", "report")


@dataclass
class Scale:
    height: int = 128
    face: int = 64
    labeled: int = 102
    unlabeled: int = 330  # split equally over MIX
    test_b: int = 300
    test_u: int = 99  # split equally over MIX
    steps: int = 1000
    warmup: int = 50
    batch: int = 8  # 4 labeled + 4 unlabeled
    lr: float = 2e-3
    schedule: str = "cosine"
    rotations: int = 4
    decisive_seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    oracle_noise: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.4])
    teacher_minutes: float = 20.0
    teacher_views: int = 6000
    model: str = "unifuse_tiny"


TOY = Scale(height=32, face=16, labeled=4, unlabeled=6, test_b=3, test_u=3, steps=3, warmup=0, batch=4, rotations=2,
            decisive_seeds=[0, 1], seeds=[0], oracle_noise=[0.0, 0.4], teacher_minutes=0.1, teacher_views=24)


def log(msg: str) -> None:
    print(f"[reproduce {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: list[str], log_file: Path) -> None:
    """A child process (one torch thread) whose output goes to a log file, named in the error if it fails."""
    with log_file.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=child_env())
    if proc.returncode != 0:
        tail = log_file.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}); log {log_file}:\n{tail}")


# ------------------------------------------------------------------------------------------- data

def set_counts(s: Scale) -> dict[str, dict[str, int]]:
    """Panoramas per (set, style)."""
    counts = {"labeled": s.labeled, "unlabeled": s.unlabeled, "test_b": s.test_b, "test_u": s.test_u}
    out = {}
    for name, (styles, _) in SETS.items():
        n = counts[name]
        out[name] = {st: n // len(styles) + (i < n % len(styles)) for i, st in enumerate(styles)}
    return out


def seed_ranges(s: Scale) -> dict[tuple[str, str], range]:
    counts = set_counts(s)
    return {(name, st): range(SETS[name][1], SETS[name][1] + n) for name in SETS for st, n in counts[name].items()}


def check_disjoint(s: Scale) -> None:
    """Raise if two sets share a (style, seed) scene, or a set outgrows its seed range."""
    seen: dict[tuple[str, int], str] = {}
    for (name, style), seeds in seed_ranges(s).items():
        if len(seeds) > SEED_GAP:
            raise ValueError(f"set {name} ({style}) has {len(seeds)} panoramas, more than the seed gap {SEED_GAP}")
        for seed in seeds:
            if (style, seed) in seen:
                raise ValueError(f"scene ({style}, {seed}) is in both {seen[(style, seed)]} and {name}")
            seen[(style, seed)] = name


def build_data(work: Path, s: Scale) -> dict[str, list[str]]:
    from sharding.build import build

    check_disjoint(s)
    out: dict[str, list[str]] = {}
    for (name, style), seeds in seed_ranges(s).items():
        folder = work / "data" / f"{name}-{style}"
        if not (folder / "manifest.json").is_file():
            log(f"data: rendering {len(seeds)} {style} panoramas for {name} (seeds {seeds.start}..{seeds.stop - 1})")
            build("generated", None, folder, count=len(seeds), style=style, height=s.height, seed=seeds.start,
                  windows=True, watermark=name == "unlabeled", samples_per_shard=max(2, len(seeds) // 16),
                  overwrite=True, progress=False)
        out.setdefault(name, []).append(str(folder / "manifest.json"))
    return out


def get_teacher(work: Path, s: Scale, args) -> Path:
    if not (args.train_teacher or args.toy):
        teacher = Path(args.teacher).resolve() if args.teacher else V2_TEACHER
        if not (teacher / "config.json").is_file():
            raise SystemExit(f"error: teacher folder {teacher} has no config.json (use --teacher or --train-teacher)")
        return teacher
    out = work / "teacher"
    if not (out / "config.json").is_file():
        log(f"teacher: training for up to {s.teacher_minutes} min on {s.teacher_views} generated perspective views")
        run([sys.executable, "-m", "student.perspective_teacher.train", "--out", str(out), "--minutes",
             str(s.teacher_minutes), "--views", str(s.teacher_views), "--quiet"], work / "teacher.log")
    return out


def teacher_input_size(teacher: Path, default: int = 128) -> int:
    info = teacher / "pano_distill.json"
    return int(json.loads(info.read_text()).get("input_size", default)) if info.is_file() else default


def precompute_stores(work: Path, data: dict, teacher: Path, s: Scale) -> dict[str, str]:
    from teacher_server.precompute import precompute

    stores = {}
    for name, (k, deg) in {"rotated": (s.rotations, 45.0), "unrotated": (1, 0.0)}.items():
        path = work / f"pseudo_{name}.lmdb"
        stores[name] = str(path)
        if (work / f"pseudo_{name}.json").is_file():
            continue
        log(f"teacher: caching pseudo labels ({name}, {k} cube(s) per panorama)")
        summary = precompute(data["unlabeled"], str(path), rotations=k, model=str(teacher), face_size=s.face,
                             input_size=teacher_input_size(teacher), seed=0, max_deg=deg, replicas=0,
                             height=s.height, device="cpu")
        (work / f"pseudo_{name}.json").write_text(json.dumps(summary, indent=2, default=str))
    return stores


# --------------------------------------------------------------------------------------- students

def run_name(row: str, seed: int) -> str:
    name = row.replace(" ", "_").replace(",", "").replace("+", "plus").replace("=", "")
    return f"{name}-seed{seed}"


def student_run(work: Path, row: str, opts: dict, seed: int, data: dict, stores: dict, teacher: Path,
                s: Scale) -> dict:
    """Train (unless done) and score one student; returns {"B": {...}, "U": {...}} with both protocols."""
    import torch

    from student.evaluate import student_predictor
    from student.inference import load_student

    out = work / "runs" / run_name(row, seed)
    scores = out / "scores.json"
    if scores.is_file():
        return json.loads(scores.read_text())
    lst = lambda xs: "[" + ",".join(xs) + "]"  # noqa: E731
    args = [f"run.out_dir={out}", f"run.seed={seed}", "run.progress=false", "run.ckpt_every=0", "run.log_every=50",
            "data.source=shards", f"data.labeled={lst(data['labeled'])}", f"data.unlabeled={lst(data['unlabeled'])}",
            f"data.val={lst(data['test_b'])}", f"data.height={s.height}", f"data.batch_size={s.batch}",
            "data.num_workers=1", f"model.name={s.model}", "model.encoder=", f"optim.steps={s.steps}",
            f"optim.lr={s.lr}", f"optim.schedule={s.schedule}", f"optim.warmup_steps={s.warmup}",
            f"distill.face_size={s.face}", f"teacher.model={teacher}", f"teacher.input_size={teacher_input_size(teacher)}",
            "teacher.offline_fallback=false", "eval.protocol=lstsq"]
    if opts.get("oracle_noise") is not None:
        args += ["teacher.mode=oracle", "teacher.oracle_affine=true", f"teacher.oracle_noise={opts['oracle_noise']}",
                 "distill.rotation=true", "distill.use_masks=true"]
    elif opts["pseudo"]:
        args += ["teacher.mode=cached", f"teacher.store={stores['rotated' if opts['rotation'] else 'unrotated']}",
                 f"distill.rotation={str(opts['rotation']).lower()}", f"distill.use_masks={str(opts['masks']).lower()}"]
    else:
        args += ["teacher.mode=none", "distill.pseudo_weight=0"]
    log(f"student: {row}, seed {seed}")
    t0 = time.time()
    run([sys.executable, "-m", "student.train", *args], work / "runs" / f"{run_name(row, seed)}.log")
    model, _, _ = load_student(out, torch.device("cpu"))
    b = json.loads((out / "eval.json").read_text())
    result = {"B": {**b["metrics_by_protocol"], "images": b["images"]},
              "U": ev.score(student_predictor(model), data["test_u"], s.height), "wall_s": round(time.time() - t0, 1)}
    scores.write_text(json.dumps(result, indent=2) + "\n")
    return result


def oracle_rows(s: Scale) -> dict[str, dict]:
    return {f"oracle teacher (per-face affine, noise {n:g}), rotation, masks": dict(oracle_noise=n)
            for n in s.oracle_noise}


def stage_rows(stage: str, s: Scale) -> list[tuple[str, dict, list[int]]]:
    if stage == "decisive":
        return [(r, o, s.decisive_seeds) for r, o in DECISIVE.items()]
    if stage == "ablation":
        return [(r, o, s.seeds) for r, o in ABLATION.items()]
    if stage == "oracle":  # labeled only of the same seeds is the decisive stage's (reused when done)
        return [(BASE_ROW, DECISIVE[BASE_ROW], s.seeds)] + [(r, o, s.seeds) for r, o in oracle_rows(s).items()]
    return []


def all_rows(s: Scale) -> dict[str, dict]:
    return {**DECISIVE, **ABLATION, **oracle_rows(s)}


def collect_students(work: Path, s: Scale) -> dict[str, dict[int, dict]]:
    """Scores of every student run that has finished, by row and seed."""
    out: dict[str, dict[int, dict]] = {}
    for row in all_rows(s):
        for seed in sorted(set(s.decisive_seeds) | set(s.seeds)):
            f = work / "runs" / run_name(row, seed) / "scores.json"
            if f.is_file():
                out.setdefault(row, {})[seed] = json.loads(f.read_text())
    return out


# ----------------------------------------------------------------------------------------- report

def fixed_rows(teacher: Path, data: dict, s: Scale) -> dict[str, dict]:
    """Rows without seeds: the teacher's and the content-free baselines, on both tests."""
    from student.evaluate import teacher_cube_predictor
    from teacher_server.inprocess import InProcessTeacher

    backend = InProcessTeacher(str(teacher), device="cpu", input_size=teacher_input_size(teacher))
    tests = {"B": data["test_b"], "U": data["test_u"]}
    rows = {
        "teacher on cube faces, merged": lambda m: ev.score(teacher_cube_predictor(backend, s.face), m, s.height),
        "teacher on cube faces, each face fitted to GT": lambda m: ev.face_fitted_scores(
            ev.teacher_face_answers(backend), m, s.height, s.face),
        "baseline: constant distance, each face fitted to GT": lambda m: ev.face_fitted_scores(
            ev.constant_distance_answers(s.face), m, s.height, s.face),
        "baseline: constant depth": lambda m: ev.score(ev.constant_predictor, m, s.height),
    }
    out = {}
    for name, fn in rows.items():
        log(f"scoring: {name}")
        out[name] = {"-": {split: fn(m) for split, m in tests.items()}}
    return out


def summarise(results: dict[str, dict]) -> dict:
    """Per row: mean and sd over seeds of each split/protocol/metric, and the paired difference to labeled
    only (zero-shot B and in-domain U AbsRel, lstsq)."""
    import statistics

    table = {}
    base = results.get(BASE_ROW, {})
    for row, per_seed in results.items():
        t = {"n": len(per_seed), "seeds": list(per_seed)}
        for split in ("B", "U"):
            for proto in ("lstsq", "median"):
                for metric in ("abs_rel", "delta1"):
                    vals = [r[split][proto][metric] for r in per_seed.values()]
                    t[f"{split}/{proto}/{metric}"] = {
                        "mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                        "values": vals}
            if row != BASE_ROW and "-" not in per_seed and base:
                t[f"{split}/paired_vs_labeled_only"] = ev.paired_difference(
                    {k: v[split]["lstsq"]["abs_rel"] for k, v in per_seed.items()},
                    {k: v[split]["lstsq"]["abs_rel"] for k, v in base.items()})
        table[row] = t
    return table


def markdown(table: dict, meta: dict) -> str:
    sc = meta["scale"]

    def cell(x):
        return f"{x['mean']:.4f} ± {x['std']:.4f}" if x["std"] else f"{x['mean']:.4f}"

    def diff(d):
        return "–" if not d else f"{d['mean']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]"

    lines = [f"Zero-shot on style B (\"office\", {sc['test_b']} panoramas) and in-domain U (held-out panoramas of "
             f"the unlabeled mixture, {sc['test_u']}); {sc['labeled']} labeled apartments, {sc['unlabeled']} "
             f"unlabeled ({', '.join(MIX)}); {sc['steps']} steps, {sc['schedule']} schedule. AbsRel under the "
             "reference protocol (lstsq) and, beside it, median; mean ± sd over seeds; Δ = paired per-seed "
             "difference to labeled only (lstsq AbsRel) with its 95% t-interval.", "",
             "| row | seeds | B AbsRel lstsq | B AbsRel median | B δ1 lstsq | U AbsRel lstsq | U AbsRel median "
             "| Δ B vs labeled only | Δ U vs labeled only |", "|---|---|---|---|---|---|---|---|---|"]
    for row, t in table.items():
        n = "–" if t["seeds"] == ["-"] else str(t["n"])
        lines.append(f"| {row} | {n} | {cell(t['B/lstsq/abs_rel'])} | {cell(t['B/median/abs_rel'])} | "
                     f"{cell(t['B/lstsq/delta1'])} | {cell(t['U/lstsq/abs_rel'])} | {cell(t['U/median/abs_rel'])} | "
                     f"{diff(t.get('B/paired_vs_labeled_only'))} | {diff(t.get('U/paired_vs_labeled_only'))} |")
    fit, const = (table.get("teacher on cube faces, each face fitted to GT"),
                  table.get("baseline: constant distance, each face fitted to GT"))
    if fit and const:
        f, c = fit["B/lstsq/abs_rel"]["mean"], const["B/lstsq/abs_rel"]["mean"]
        lines += ["", f"Teacher, each face fitted, zero-shot B: AbsRel {f:.4f} = {f / c:.2f} x the fitted "
                      f"constant-distance baseline ({c:.4f}; goal <= 0.6 x)."]
        if BASE_ROW in table:
            lab = table[BASE_ROW]["B/lstsq/abs_rel"]["mean"]
            lines.append(f"Labeled-only student, zero-shot B: AbsRel {lab:.4f} (goal: the fitted teacher below it: "
                         f"{'yes' if f < lab else 'no'}).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", choices=(*STAGES, "all"), default="all", help="the part to run (default: all)")
    ap.add_argument("--toy", action="store_true", help="CI smoke size (minutes)")
    ap.add_argument("--teacher", default="", help=f"teacher folder (default: {V2_TEACHER.relative_to(ROOT)})")
    ap.add_argument("--train-teacher", action="store_true", help="train a teacher here instead")
    ap.add_argument("--work", default="", help="working folder (data, stores, runs); default under ~/.cache")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="where reproduce.json/.md go")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--fresh", action="store_true", help="delete the working folder first")
    args = ap.parse_args(argv)
    s = TOY if args.toy else Scale()
    if args.steps:
        s.steps = args.steps
    work = Path(args.work or Path("~/.cache/pano-distill/reproduce2").expanduser() / ("toy" if args.toy else "full"))
    if args.fresh and work.exists():
        shutil.rmtree(work)
    (work / "runs").mkdir(parents=True, exist_ok=True)
    stages = STAGES if args.stage == "all" else (args.stage,)
    t0 = time.time()
    teacher = get_teacher(work, s, args)
    data = build_data(work, s)
    student_stages = [st for st in stages if stage_rows(st, s)]
    stores = precompute_stores(work, data, teacher, s) if student_stages or "data" in stages else {}
    for stage in stages:
        for row, opts, seeds in stage_rows(stage, s):
            for seed in seeds:
                student_run(work, row, opts, seed, data, stores, teacher, s)
    if "report" not in stages:
        log(f"stage {args.stage} done in {(time.time() - t0) / 60:.1f} min")
        return 0
    results = {**fixed_rows(teacher, data, s), **collect_students(work, s)}
    table = summarise(results)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "scale": asdict(s), "teacher": str(teacher),
            "sets": {f"{n}/{st}": [r.start, r.stop - 1] for (n, st), r in seed_ranges(s).items()},
            "report_s": round(time.time() - t0, 1), "cores": os.cpu_count(), "load_avg_end": os.getloadavg(),
            "work": str(work), "student_wall_s": {row: {str(k): v.get("wall_s") for k, v in r.items()}
                                                  for row, r in results.items()}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "reproduce_toy" if args.toy else "reproduce"
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "table": table, "per_seed": results}, indent=2,
                                                 default=str) + "\n")
    md = markdown(table, meta)
    (out / f"{name}.md").write_text(md + "\n")
    print(md)
    log(f"done in {meta['report_s'] / 60:.1f} min: {out / (name + '.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
