"""The second recipe (Lee et al. 2020) across a domain gap: which loss helps on the "real" style?

    python bench/domain_gap.py                # full: 4 rows x 2 seeds, 300 steps each (~15 min on 2 busy cores)
    python bench/domain_gap.py --quick        # 1 seed, 100 steps (~3 min)
    python bench/domain_gap.py --seeds 0 1 2 --steps 400 --teacher oracle --out /tmp/dg.json

Base: ``configs/domain_adaptation.yaml``: generated "apartment" panoramas as the labeled synthetic domain
(64 scenes), "house" panoramas (another palette, daylight-coloured lights, tiled floors, more windows onto
sky) as the unlabeled real domain (64 scenes), scored on 32 held-out house scenes. Every run is the real
command line, ``python -m student.train --config configs/domain_adaptation.yaml`` plus overrides (printed
and kept in the JSON). Common overrides: ``model.name=rectnet_tiny`` (RectNet at width 1/8; the config's
metric disparity head ``model.options: {min_disp: 0.05, max_disp: 4.0}`` is kept), ``data.height=64``
(scenes rendered at 128x256 as configured), ``data.generated.val=32``, ``optim.steps`` (300). Everything else
is the configuration's: Adam 1e-4, batches of 2 synthetic + 2 real, smoothness weight 0.2 in every row,
adversarial weight 1e-3, discriminator ResNet-18 with lr 1e-4 and weight decay 1e-4. The rows add one loss
each, cumulatively:

1. **depth**: L2 depth + smoothness (0.2); ``adversarial.normal_weight=0``,
   ``adversarial.pretrain_steps=STEPS`` (the adversarial phase never starts).
2. **+ normal**: the surface-normal loss (0.4) too; still ``pretrain_steps=STEPS``.
3. **+ adversarial**: ``adversarial.pretrain_steps=STEPS/2``: the second half trains against the discriminator.
4. **+ pseudo labels**: row 3 plus the rotated-cube pseudo-label loss on the real half
   (``distill.pseudo_weight=1``), from the project's own perspective teacher
   (``teacher.mode=inprocess teacher.model=`` ``student.labels.LOCAL_TEACHER``, the offline teacher; input size from
   its ``pano_distill.json``) when that folder exists, otherwise from the oracle teacher (``teacher.mode=oracle``:
   the exact disparity of the house scenes with a random affine map per face and 5% noise). The oracle is a
   perfect teacher, so that row is then an upper bound for pseudo labels, not a measurement of a real teacher;
   the JSON and the table say which teacher was used. ``--teacher local|oracle`` forces one. The runs read a
   copy of the teacher folder made when the row starts (its checksums are in the JSON): a teacher re-saved
   in place while a run has it memory-mapped kills that run (SIGBUS), which happened once here.

Rows run in this order, each for every seed; the pseudo-label row's teacher is chosen when that row starts
(``--wait-teacher MIN`` waits for the local teacher to be complete first; the wait is reported separately).
The runs of one seed share initial weights and data order. Each run gets one torch thread
(``OMP_NUM_THREADS=1``): on 2 shared cores two threads made steps several times slower. Every trained
student (and, for reference, the untrained student of each seed) is then scored in this process with
``student.evaluate.evaluate_predictor`` (the reference code's lstsq protocol, 0 < gt <= 10 m; house AbsRel under
median beside it; a content-free constant-depth baseline scored the same way) on the held-out **house** scenes
(the target domain, as in each run's eval.json, whose AbsRel is kept as a cross-check) and on 32 held-out
**apartment** scenes (the source domain, the same generation settings with ``val_style=apartment``).
Outputs: ``--out`` (JSON) and the same path with ``.md`` (table).
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
from _child import log, machine, mean_sd  # noqa: E402

BASE_CONFIG = "configs/domain_adaptation.yaml"
ROWS = ("depth", "+ normal", "+ adversarial", "+ pseudo labels")




def common_overrides(args) -> list[str]:
    return ["run.progress=false", f"run.log_every={args.log_every}", "run.ckpt_every=0",
            f"data.height={args.height}", "data.num_workers=1", f"data.generated.val={args.val}",
            f"model.name={args.model}", f"optim.steps={args.steps}", *args.set]


def local_teacher_ready() -> bool:
    from student.labels import LOCAL_TEACHER

    # train_perspective writes pano_distill.json after the weights: its presence means the folder is complete
    return (LOCAL_TEACHER / "config.json").is_file() and (LOCAL_TEACHER / "pano_distill.json").is_file()


def snapshot_teacher(src: Path, work: Path) -> tuple[Path, dict]:
    """Copy the teacher folder into the work folder and return the copy and its weights' checksums.

    The runs read the copy: Hugging Face memory-maps ``model.safetensors``, and a colleague re-saving the
    weights in place while a run had them mapped killed that run with SIGBUS (exit -7).
    """
    import hashlib

    dst = work / "teacher-snapshot" / src.name
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    sums = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(dst.iterdir())
            if f.suffix in (".safetensors", ".bin", ".json")}
    return dst, sums


def teacher_choice(mode: str, wait_min: float = 0.0, work: Path | None = None) -> tuple[str, list[str], str, dict]:
    """(name, overrides, sentence) of the pseudo-label row's teacher; waits up to ``wait_min`` minutes for
    the local teacher to appear (a colleague may be training it) before falling back to the oracle."""
    from student.labels import LOCAL_TEACHER, local_teacher_input_size

    deadline = time.monotonic() + 60 * wait_min
    if mode != "oracle" and not local_teacher_ready() and wait_min > 0:
        log(f"waiting up to {wait_min:.0f} min for {LOCAL_TEACHER.relative_to(ROOT)} to be complete")
        while not local_teacher_ready() and time.monotonic() < deadline:
            time.sleep(20)
    have_local = local_teacher_ready()
    if mode == "local" and not have_local:
        raise SystemExit(f"--teacher local: {LOCAL_TEACHER} has no config.json (the teacher is not trained yet)")
    if mode in ("auto", "local") and have_local:
        size = local_teacher_input_size()
        rel = LOCAL_TEACHER.relative_to(ROOT)
        model, info = str(rel), {}
        if work is not None:
            snap, sums = snapshot_teacher(LOCAL_TEACHER, work)
            model, info = str(snap), {"snapshot_of": str(rel), "sha256": sums}
        return ("local", ["teacher.mode=inprocess", f"teacher.model={model}", f"teacher.input_size={size}",
                          "teacher.offline_fallback=false"],
                f"the project's own perspective teacher ({rel}, input {size} px)", info)
    why = ("forced by --teacher oracle" if mode == "oracle"
           else f"{LOCAL_TEACHER.relative_to(ROOT)} does not exist or is incomplete")
    return ("oracle", ["teacher.mode=oracle", "teacher.oracle_affine=true", "teacher.oracle_noise=0.05"],
            f"the ORACLE teacher (exact house disparity, random affine per face, 5% noise; {why}): an upper "
            "bound for pseudo labels, not a real teacher", {})


def row_overrides(row: str, args, teacher: list[str]) -> list[str]:
    half = args.steps // 2
    if row == "depth":
        return ["adversarial.normal_weight=0", f"adversarial.pretrain_steps={args.steps}"]
    if row == "+ normal":
        return [f"adversarial.pretrain_steps={args.steps}"]
    if row == "+ adversarial":
        return [f"adversarial.pretrain_steps={half}"]
    if row == "+ pseudo labels":
        return [f"adversarial.pretrain_steps={half}", "distill.pseudo_weight=1", *teacher]
    raise ValueError(row)


def train(name: str, overrides: list[str], run_dir: Path) -> dict:
    def describe(r: dict) -> str:
        parts = " ".join(f"{k.removeprefix('loss_')} {v:.3f}" for k, v in r["losses"].items() if k.startswith("loss_"))
        return f"step {r['step']:4d}  {parts}  ({r['step_time']:.2f} s/step)"

    run = _child.train(name, BASE_CONFIG, overrides, run_dir, describe, env=_child.child_env(HF_HUB_OFFLINE="1"))
    recs = run.records
    teacher_line = next((ln for ln in run.stdout.read_text().splitlines() if "teacher" in ln and "INFO" in ln), "")
    return {"command": run.command, "wall_s": run.wall_s,
            "median_step_s": statistics.median([r["step_time"] for r in recs]) if recs else None,
            "last_losses": recs[-1]["losses"] if recs else {},
            "loss_curve": [[r["step"], r["losses"]] for r in recs],
            "eval_json_abs_rel": run.eval.get("metrics", {}).get("abs_rel"), "teacher_log": teacher_line}


def fmt(m: float, sd: float, digits: int = 4) -> str:
    if math.isnan(m):
        return "–"
    return f"{m:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 seed, 100 steps")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 (quick: 0)")
    p.add_argument("--steps", type=int, default=None,
                   help="default 300 (quick: 100); the adversarial phase is the second half")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS, metavar="ROW",
                   help=f"any of {', '.join(repr(r) for r in ROWS)}")
    p.add_argument("--teacher", choices=("auto", "local", "oracle"), default="auto")
    p.add_argument("--wait-teacher", type=float, default=0.0, metavar="MIN",
                   help="auto/local: wait up to MIN minutes for the local teacher when the pseudo-label row starts")
    p.add_argument("--model", default="rectnet_tiny")
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--val", type=int, default=32, help="held-out scenes per domain")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="further overrides for every run, e.g. adversarial.adv_weight=0.1 (after the common ones)")
    p.add_argument("--work", default="", help="folder of the run folders (default: a temporary one, removed)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "domain_gap.json"))
    args = p.parse_args(argv)
    args.seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1])
    args.steps = args.steps or (100 if args.quick else 300)

    torch.set_num_threads(1)
    t_start = time.perf_counter()
    started = _dt.datetime.now(_dt.timezone.utc)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="pd-domain-gap-"))
    work.mkdir(parents=True, exist_ok=True)
    info = machine()
    teacher_name, teacher_overrides, teacher_sentence = "none", [], "(no pseudo-label row)"
    log(f"machine: {info['cpu']}, {info['cores']} cores, load average {info['load_average']}, torch {info['torch']}")
    log(f"seeds {args.seeds}, {args.steps} steps, {args.model} at {args.height}x{2 * args.height}, rows "
        f"{args.rows} (each for every seed, in this order); run folders in {work}")

    from sharding.stream import read_samples
    from student.config import load_config
    from student.data import _split, prepare_data
    from student.evaluate import evaluate_predictor, student_predictor
    from student.inference import build_student, load_student

    # render both held-out sets once, outside the timed runs
    cfg = prepare_data(load_config(ROOT / BASE_CONFIG, common_overrides(args)))
    cfg_src = prepare_data(load_config(ROOT / BASE_CONFIG,
                                       common_overrides(args) + ["data.generated.val_style=apartment"]))
    sets = {}
    for domain, urls in (("house", cfg.data.val), ("apartment", cfg_src.data.val)):
        split = _split(urls, "", ("val", "test"))
        sets[domain] = list(read_samples(urls, height=args.height, split=split, labeled=True))
        log(f"held-out {domain}: {len(sets[domain])} panoramas from {urls[0]}")
    device = torch.device("cpu")

    def evaluate(model, predict=None) -> dict:
        res = {}
        for domain, samples in sets.items():
            rep = evaluate_predictor(predict or student_predictor(model), samples, device=device, protocol="lstsq",
                                     max_depth=10.0, batch_size=4)
            m = rep["metrics"]
            res[domain] = {"abs_rel": m["abs_rel"], "delta1": m["delta1"], "rmse": m["rmse"],
                           "abs_rel_median": rep["metrics_by_protocol"]["median"]["abs_rel"]}
        return res

    runs: dict[str, dict] = {}
    scores: dict[str, dict] = {}
    teacher_wait_s = 0.0
    teacher_info: dict = {}
    import _evidence

    scores["baseline: constant depth"] = evaluate(None, _evidence.constant_predictor)
    for seed in args.seeds:
        torch.manual_seed(seed)  # the initial weights of this seed's runs (session.py does the same)
        scores[f"untrained s{seed}"] = evaluate(build_student(cfg.model))
        log(f"untrained s{seed}: house AbsRel {scores[f'untrained s{seed}']['house']['abs_rel']:.4f}, apartment "
            f"{scores[f'untrained s{seed}']['apartment']['abs_rel']:.4f}")
    for row in args.rows:
        if row == "+ pseudo labels":  # chosen once, here, so that every seed gets the same teacher
            t_wait = time.perf_counter()
            teacher_name, teacher_overrides, teacher_sentence, teacher_info = teacher_choice(
                args.teacher, args.wait_teacher, work)
            teacher_wait_s = time.perf_counter() - t_wait
            log(f"pseudo labels from {teacher_sentence}")
        for seed in args.seeds:
            name = f"{row} s{seed}"
            run_dir = work / f"{ROWS.index(row) + 1}_s{seed}"
            overrides = common_overrides(args) + [f"run.out_dir={run_dir}", f"run.seed={seed}",
                                                  *row_overrides(row, args, teacher_overrides)]
            runs[name] = train(name, overrides, run_dir)
            model, _, _ = load_student(run_dir, device)
            scores[name] = evaluate(model)
            s = scores[name]
            last = runs[name]["last_losses"]
            disc = (f", discriminator accuracy synthetic {last['disc_acc_synthetic']:.2f} / real "
                    f"{last['disc_acc_real']:.2f}" if "disc_acc_real" in last else "")
            log(f"{name}: house AbsRel {s['house']['abs_rel']:.4f} (eval.json {runs[name]['eval_json_abs_rel']:.4f}), "
                f"delta1 {s['house']['delta1']:.3f}; apartment AbsRel {s['apartment']['abs_rel']:.4f}{disc}")

    groups = {"baseline: constant depth": ["baseline: constant depth"],
              "untrained": [f"untrained s{s}" for s in args.seeds]}
    for row in args.rows:
        groups[row] = [f"{row} s{s}" for s in args.seeds]
    table_rows = {}
    for g, names in groups.items():
        cols = {}
        for domain in ("house", "apartment"):
            for metric in ("abs_rel", "delta1", "abs_rel_median"):
                cols[f"{domain}_{metric}"] = mean_sd([scores[n][domain][metric] for n in names])
        cols["gap"] = mean_sd([scores[n]["house"]["abs_rel"] - scores[n]["apartment"]["abs_rel"] for n in names])
        cols["per_seed_house_abs_rel"] = [scores[n]["house"]["abs_rel"] for n in names]
        table_rows[g] = cols
    a = cfg.adversarial
    label = {"baseline: constant depth": "baseline: constant depth", "untrained": "untrained (reference)", "depth": f"depth (+ smoothness {a.smooth_weight:g})",
             "+ normal": f"+ normal ({a.normal_weight:g})",
             "+ adversarial": f"+ adversarial (α = {cfg.adversarial.adv_weight:g}, 2nd half)",
             "+ pseudo labels": "+ pseudo labels (" + ("oracle teacher: upper bound" if teacher_name == "oracle"
                                                       else "own teacher") + ")"}
    lines = ["| rows (cumulative) | house AbsRel ↓ | house AbsRel median | house δ1 ↑ | apartment AbsRel ↓ "
             "| apartment δ1 ↑ | gap (house − apartment AbsRel) | house AbsRel per seed |",
             "|---|---|---|---|---|---|---|---|"]
    for g, c in table_rows.items():
        lines.append(f"| {label[g]} | {fmt(*c['house_abs_rel'])} | {fmt(*c['house_abs_rel_median'])} | "
                     f"{fmt(*c['house_delta1'], 3)} | "
                     f"{fmt(*c['apartment_abs_rel'])} | {fmt(*c['apartment_delta1'], 3)} | {fmt(*c['gap'])} | "
                     + ", ".join(f"{v:.4f}" for v in c["per_seed_house_abs_rel"]) + " |")
    md = "\n".join(lines)
    wall = time.perf_counter() - t_start
    header = (f"{args.model} at {args.height}x{2 * args.height}, {args.steps} steps, seeds {args.seeds}; "
              f"synthetic = apartment (labeled), real = house (unlabeled); {len(sets['house'])} + "
              f"{len(sets['apartment'])} held-out scenes; lstsq alignment (the reference code's; house AbsRel under "
              f"median beside it); mean ± sd over seeds. "
              f"Pseudo labels: {teacher_sentence}.")
    result = {
        "benchmark": "bench/domain_gap.py", "started_utc": started.isoformat(timespec="seconds"),
        "command": shlex.join(["python", "bench/domain_gap.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": info, "load_average_end": list(os.getloadavg()), "wall_s": wall,
        "teacher_wait_s": teacher_wait_s, "settings": vars(args), "base_config": BASE_CONFIG,
        "common_overrides": common_overrides(args),
        "teacher": {"kind": teacher_name, "overrides": teacher_overrides, "description": teacher_sentence,
                    **teacher_info},
        "held_out": {"house": cfg.data.val, "apartment": cfg_src.data.val}, "runs": runs, "scores": scores,
        "table": {g: {k: (list(v) if isinstance(v, tuple) else v) for k, v in c.items()}
                  for g, c in table_rows.items()},
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(header + "\n\n" + md + "\n")
    print("\n" + header + "\n\n" + md)
    print(f"\nwall time {wall / 60:.1f} min (of which {teacher_wait_s / 60:.1f} min waiting for the teacher); load "
          f"average at the end {os.getloadavg()}")
    print(f"wrote {out} and {out.with_suffix('.md')}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
