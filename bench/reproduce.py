"""Depth Anywhere in miniature: does distilling a perspective teacher through rotated cube faces help?

    python bench/reproduce.py --stage data         # render the sets, cache pseudo labels (~15 min, 2 cores)
    python bench/reproduce.py --stage decisive     # labeled only vs the full recipe, 5 seeds each
    python bench/reproduce.py --stage ablation     # + pseudo labels without rotation / without masks, 3 seeds
    python bench/reproduce.py --stage oracle       # oracle teacher dose-response, 3 noise levels x 3 seeds
    python bench/reproduce.py --stage report       # teacher and baseline rows, tables (from what has run)
    python bench/reproduce.py --toy                # CI smoke size: every stage in a couple of minutes

Each stage is one command of under 90 min on 2 CPU cores. A stage skips the runs already done, so it can be
rerun after an interruption, and a student run checkpoints every ``ckpt_every`` steps and resumes from there
(exactly: the same batches, the same weights). ``--stop-after MIN`` ends a stage after MIN minutes, stopping
the run in progress, with exit status 3: run the same command again to go on. A schedule longer than one
command's budget (``--steps 24000``) is thus trained in several commands. Every student run is claimed with a
lock (``claim_run``), so two stage commands
started side by side on one working folder share its runs out, one core each, e.g. ``--stage decisive`` and
``--stage ablation`` at once, then ``--stage oracle`` twice. Students train with one torch thread. Generated
scenes stand in for datasets we cannot download here:

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

Students train with a cosine schedule (1000 steps; ``--steps N`` for longer, in its own ``--work`` folder
since run folders are named by row and seed only). The report's plateau check says how much the labeled
loss still fell over the last 20% of the steps; the schedule is not stretched until it stops (it does not
stop here: the students memorise their labeled panoramas; ``bench/steps_curve.py`` finds the plateau on the
tests across schedule lengths, reached by labeled only between 12000 and 24000 steps). Rows: the
decisive pair (labeled only; + pseudo labels, rotation, masks) over 5 seeds, the ablations over 3; the
oracle teacher (``teacher.mode=oracle``, exact per-face disparity, a random affine map per face and
multiplicative noise at 0, 0.2, 0.4) with the full recipe, next to labeled only of the same seeds (the
dose-response: how good must a teacher be?). Every
student row gives its paired per-seed difference to labeled only with a 95% t-interval. Teacher rows: the
teacher's six unrotated faces merged to 360 (Table 3's Depth Anything row) and each face fitted to the ground
truth (what the teacher knows). Baseline rows, scored the same way: a content-free constant-depth prediction,
and the per-face fit applied to a constant-distance prediction (what the fit alone achieves). Metrics: the
reference code's ``lstsq`` protocol first, ``median`` beside it. Results: ``bench/results/reproduce.json``
and ``reproduce.md`` (``reproduce_toy.*`` for ``--toy``), reported as measured.

The cached pseudo labels and the students trained on them record the SHA-256 of the teacher's weights
(``teacher_fingerprint``), and a working folder refuses another teacher's: a retrained teacher gets its own
``--work`` folder (labeled-only and oracle runs do not depend on it and can be linked in), and
``bench/compare_teachers.py`` pairs the two teachers' students seed for seed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import _evidence as ev  # noqa: E402  (bench/, first on sys.path when run as a script)
from _child import child_env  # noqa: E402
from _reproduce_report import BASE_ROW, FITTED_ROW, markdown, plateau, plot_curves, summarise  # noqa: E402,F401

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
    # 3 levels: an oracle run costs about twice a labeled one here (the exact disparity of every rotated cube
    # face is rendered from the ground truth each step: ~530 s against ~250 s), so 4 levels x 3 seeds would
    # take ~110 min of one core; --oracle-noise sets others (0 0.1 0.2 0.4 in two processes fits 90 min)
    oracle_noise: list[float] = field(default_factory=lambda: [0.0, 0.2, 0.4])
    teacher_minutes: float = 20.0
    teacher_views: int = 6000
    model: str = "unifuse_tiny"
    # a few MB each (two kept): what an interrupted or --stop-after run resumes from, at most this many steps back
    ckpt_every: int = 500


TOY = Scale(height=32, face=16, labeled=4, unlabeled=6, test_b=3, test_u=3, steps=3, warmup=0, batch=4, rotations=2,
            decisive_seeds=[0, 1], seeds=[0], oracle_noise=[0.0, 0.4], teacher_minutes=0.1, teacher_views=24,
            ckpt_every=2)


def log(msg: str) -> None:
    print(f"[reproduce {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Stopped(Exception):
    """The stage reached its ``--stop-after`` time; what it was training resumes when the command runs again."""


def run(cmd: list[str], log_file: Path, deadline: float | None = None) -> bool:
    """A child process (one torch thread) whose output is appended to a log file, named in the error if it
    fails. Returns False if ``deadline`` (a ``time.time()``) came first: the child was then stopped (SIGTERM,
    SIGKILL a minute later), losing at most the steps since its last checkpoint."""
    with log_file.open("a") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=child_env())
        try:
            proc.wait(timeout=None if deadline is None else max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            return False
        finally:  # the deadline, or this process interrupted: never leave a child training alone
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    if proc.returncode != 0:
        tail = log_file.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}); log {log_file}:\n{tail}")
    return True


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
    fp = teacher_fingerprint(teacher)
    for name, (k, deg) in {"rotated": (s.rotations, 45.0), "unrotated": (1, 0.0)}.items():
        path = work / f"pseudo_{name}.lmdb"
        stores[name] = str(path)
        done = work / f"pseudo_{name}.json"
        if done.is_file():
            made_by = json.loads(done.read_text()).get("teacher_sha256")
            if made_by != fp:
                raise SystemExit(f"{path} holds the pseudo labels of another teacher ({made_by or 'not recorded'}; "
                                 f"{teacher} is {fp}): give this teacher its own working folder (--work)")
            continue
        log(f"teacher: caching pseudo labels ({name}, {k} cube(s) per panorama)")
        summary = precompute(data["unlabeled"], str(path), rotations=k, model=str(teacher), face_size=s.face,
                             input_size=teacher_input_size(teacher), seed=0, max_deg=deg, replicas=0,
                             height=s.height, device="cpu")
        done.write_text(json.dumps({**summary, "teacher": str(teacher), "teacher_sha256": fp}, indent=2, default=str))
    return stores


def teacher_fingerprint(teacher: Path) -> str:
    """The first 16 hex digits of the SHA-256 of the teacher's weight files: what its pseudo labels and the
    students trained on them are keyed by (the folder's path stays the same when the weights are retrained;
    ``cached_fixed_rows`` keys the teacher rows by the same digest)."""
    return weights_digest(teacher).hexdigest()[:16]


def weights_digest(teacher: Path):
    """A running SHA-256 over the teacher's weight files, in name order (one digest across files, so that
    ``cached_fixed_rows`` can add its own key parts to it)."""
    import hashlib

    key = hashlib.sha256()
    files = sorted(teacher.glob("*.safetensors")) + sorted(teacher.glob("*.bin"))
    if not files:
        raise SystemExit(f"error: teacher folder {teacher} has no weight files (*.safetensors, *.bin)")
    for f in files:
        key.update(f.read_bytes())
    return key


def uses_teacher(opts: dict) -> bool:
    """Whether a row's students learn from the teacher's pseudo labels (not labeled only, not the oracle)."""
    return bool(opts.get("pseudo")) and opts.get("oracle_noise") is None


def check_teacher(run_dir: Path, opts: dict, fp: str) -> None:
    """Refuse to reuse or report a pseudo-label run of another teacher (``teacher.json`` in its folder, written
    when it was trained): run folders are named by row and seed only, like ``check_schedule``'s."""
    if not uses_teacher(opts) or not (run_dir / "eval.json").is_file():
        return
    f = run_dir / "teacher.json"
    made_by = json.loads(f.read_text()).get("teacher_sha256") if f.is_file() else None
    if made_by != fp:
        raise SystemExit(f"{run_dir} was trained on the pseudo labels of another teacher ({made_by or 'not recorded'}, "
                         f"not {fp}): give this teacher its own working folder (--work)")


# --------------------------------------------------------------------------------------- students

def run_name(row: str, seed: int) -> str:
    name = row.replace(" ", "_").replace(",", "").replace("+", "plus").replace("=", "")
    return f"{name}-seed{seed}"


def student_run(work: Path, row: str, opts: dict, seed: int, data: dict, stores: dict, teacher: Path,
                s: Scale, deadline: float | None = None) -> dict:
    """Train (unless done) and score one student; returns {"B": {...}, "U": {...}} with both protocols.
    Raises ``Stopped`` if ``deadline`` comes first (the run keeps its checkpoints and resumes next time)."""
    import torch

    from student.evaluate import student_predictor
    from student.inference import load_student

    out = work / "runs" / run_name(row, seed)
    scores = out / "scores.json"
    check_schedule(out, s)
    fp = teacher_fingerprint(teacher)
    check_teacher(out, opts, fp)
    if scores.is_file():
        return json.loads(scores.read_text())
    claim = claim_run(work / "runs" / f"{run_name(row, seed)}.claim")
    if claim is None:  # another reproduce process is training it: a stage can run in two processes at once
        log(f"student: {row}, seed {seed}: being trained by another process, skipped here")
        return {}
    if scores.is_file():  # finished between the check above and the claim
        claim.release()
        return json.loads(scores.read_text())
    lst = lambda xs: "[" + ",".join(xs) + "]"  # noqa: E731
    args = [f"run.out_dir={out}", f"run.seed={seed}", "run.progress=false", f"run.ckpt_every={s.ckpt_every}",
            "run.keep_checkpoints=2", "run.log_every=50",
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
    t0 = time.time()
    if not (out / "eval.json").is_file():  # trained and evaluated already: only the in-domain scoring is missing
        step = saved_step(out)
        if out.exists() and step is None:  # interrupted before its first checkpoint: start again from scratch
            shutil.rmtree(out)
        log(f"student: {row}, seed {seed}" + (f", resuming from its step-{step} checkpoint" if step else ""))
        if deadline is not None and time.time() >= deadline:
            claim.release()
            raise Stopped(f"{row}, seed {seed}: not started")
        finished = run([sys.executable, "-m", "student.train", *args], work / "runs" / f"{run_name(row, seed)}.log",
                       deadline)
        add_segment(out, time.time() - t0, finished)
        if not finished:
            claim.release()
            raise Stopped(f"{row}, seed {seed}: stopped, saved at step {saved_step(out) or 0} of {s.steps}")
        if uses_teacher(opts):
            (out / "teacher.json").write_text(json.dumps({"teacher": str(teacher), "teacher_sha256": fp}) + "\n")
    model, _, _ = load_student(out, torch.device("cpu"))
    b = json.loads((out / "eval.json").read_text())
    segments = read_segments(out)
    result = {"B": {**b["metrics_by_protocol"], "images": b["images"]},
              "U": ev.score(student_predictor(model), data["test_u"], s.height),
              "wall_s": round(sum(x["wall_s"] for x in segments) or time.time() - t0, 1),
              "commands": max(1, len(segments))}
    scores.write_text(json.dumps(result, indent=2) + "\n")
    claim.release()
    return result


def saved_step(run_dir: Path) -> int | None:
    """The step of the run's newest checkpoint, or None if it has none."""
    from student.checkpoint import latest_checkpoint

    folder = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    return int(folder.name.split("_")[-1]) if folder is not None else None


def add_segment(run_dir: Path, wall_s: float, finished: bool) -> None:
    """Record one command's share of a run's training (``segments.json``: its wall time, whether it finished)."""
    if run_dir.is_dir():
        segments = read_segments(run_dir) + [{"wall_s": round(wall_s, 1), "finished": finished,
                                              "saved_step": saved_step(run_dir)}]
        (run_dir / "segments.json").write_text(json.dumps(segments, indent=1) + "\n")


def read_segments(run_dir: Path) -> list[dict]:
    f = run_dir / "segments.json"
    return json.loads(f.read_text()) if f.is_file() else []


def check_schedule(run_dir: Path, s: Scale) -> None:
    """Refuse to reuse a run folder trained for another number of steps: run folders are named by row and seed
    only, so ``--steps 3000`` on a folder of 1000-step runs would otherwise report the old runs as new."""
    from student.config import load_config

    cfg = run_dir / "config.yaml"
    if not cfg.is_file():
        return
    steps = load_config(cfg).optim.steps
    if steps != s.steps:
        raise SystemExit(f"{run_dir} was trained for {steps} steps, not {s.steps}: give this schedule its own "
                         f"working folder (--work)")


def claim_run(path: Path):
    """The run's ``student.checkpoint.Lock`` (``release()`` or the process ending frees it), or None if another
    process holds it. Two ``--stage`` commands on one working folder thus share the runs out between them (one
    per core) instead of training the same run twice."""
    from sharding.cli import UserError
    from student.checkpoint import Lock

    try:
        return Lock(path, f"student run {path.stem}")
    except UserError:
        return None


def oracle_rows(s: Scale) -> dict[str, dict]:
    return {f"oracle teacher (per-face affine, noise {n:g}), rotation, masks": dict(oracle_noise=n)
            for n in s.oracle_noise}


def stage_rows(stage: str, s: Scale, only: list[str] | None = None) -> list[tuple[str, dict, list[int]]]:
    """(row, options, seeds) of one stage; ``only``: keep the rows whose name contains one of these texts."""
    if stage == "decisive":
        rows = [(r, o, s.decisive_seeds) for r, o in DECISIVE.items()]
    elif stage == "ablation":
        rows = [(r, o, s.seeds) for r, o in ABLATION.items()]
    elif stage == "oracle":  # labeled only of the same seeds is the decisive stage's (reused when done)
        rows = [(BASE_ROW, DECISIVE[BASE_ROW], s.seeds)] + [(r, o, s.seeds) for r, o in oracle_rows(s).items()]
    else:
        rows = []
    return [r for r in rows if not only or any(t in r[0] for t in only)]


def all_rows(s: Scale) -> dict[str, dict]:
    return {**DECISIVE, **ABLATION, **oracle_rows(s)}


def collect_students(work: Path, s: Scale, teacher: Path) -> dict[str, dict[int, dict]]:
    """Scores of every student run that has finished, by row and seed."""
    out: dict[str, dict[int, dict]] = {}
    fp = teacher_fingerprint(teacher)
    for row, opts in all_rows(s).items():
        for seed in sorted(set(s.decisive_seeds) | set(s.seeds)):
            f = work / "runs" / run_name(row, seed) / "scores.json"
            if f.is_file():
                check_schedule(f.parent, s)
                check_teacher(f.parent, opts, fp)
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
        FITTED_ROW: lambda m: ev.face_fitted_scores(
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


def training_curves(work: Path, s: Scale) -> dict[str, dict[int, dict]]:
    """Per row and seed: the plateau check of every finished student run (its ``metrics.jsonl``)."""
    from _child import read_records

    out: dict[str, dict[int, dict]] = {}
    for row in all_rows(s):
        for seed in sorted(set(s.decisive_seeds) | set(s.seeds)):
            run_dir = work / "runs" / run_name(row, seed)
            if (run_dir / "scores.json").is_file():
                check = plateau(read_records(run_dir))
                if check:
                    out.setdefault(row, {})[seed] = check
    return out


def cached_fixed_rows(work: Path, teacher: Path, data: dict, s: Scale) -> dict[str, dict]:
    """``fixed_rows``, computed once per (teacher weights, test sets, sizes): a report rerun while students
    still train costs seconds, and a changed teacher is never scored from a stale cache."""
    key = weights_digest(teacher)
    key.update(json.dumps([data["test_b"], data["test_u"], s.height, s.face]).encode())
    path = work / f"fixed_rows-{key.hexdigest()[:16]}.json"
    if path.is_file():
        return json.loads(path.read_text())
    rows = fixed_rows(teacher, data, s)
    path.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def _interrupted(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", choices=(*STAGES, "all"), default="all", help="the part to run (default: all)")
    ap.add_argument("--toy", action="store_true", help="CI smoke size (minutes)")
    ap.add_argument("--teacher", default="", help=f"teacher folder (default: {V2_TEACHER.relative_to(ROOT)})")
    ap.add_argument("--train-teacher", action="store_true", help="train a teacher here instead")
    ap.add_argument("--work", default="", help="working folder (data, stores, runs); default under ~/.cache")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="where reproduce.json/.md go")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--oracle-noise", type=float, nargs="+", default=None,
                    help="noise levels of the oracle dose-response (default 0 0.2 0.4)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="run only these seeds (every row; e.g. a one-seed probe of a longer schedule)")
    ap.add_argument("--rows", nargs="+", default=None, metavar="TEXT",
                    help="train only the rows whose name contains one of these (e.g. 'labeled only')")
    ap.add_argument("--stop-after", type=float, default=None, metavar="MIN",
                    help="end the stage after MIN minutes (exit status 3); the run in progress resumes from its "
                         "last checkpoint when the same command runs again")
    ap.add_argument("--fresh", action="store_true", help="delete the working folder first")
    args = ap.parse_args(argv)
    # a SIGTERM (kill, a scheduler's time limit) unwinds like Ctrl-C, so that ``run`` stops the training child
    # instead of leaving it orphaned (it would keep training, holding a core and its run folder)
    signal.signal(signal.SIGTERM, _interrupted)
    s = TOY if args.toy else Scale()
    if args.steps:
        s.steps = args.steps
    if args.oracle_noise:
        s.oracle_noise = list(args.oracle_noise)
    if args.seeds:
        s.decisive_seeds = s.seeds = list(args.seeds)
    work = Path(args.work or Path("~/.cache/pano-distill/reproduce2").expanduser() / ("toy" if args.toy else "full"))
    if args.fresh and work.exists():
        shutil.rmtree(work)
    (work / "runs").mkdir(parents=True, exist_ok=True)
    stages = STAGES if args.stage == "all" else (args.stage,)
    t0 = time.time()
    teacher = get_teacher(work, s, args)
    data = build_data(work, s)
    pseudo = any(o.get("pseudo") for st in stages for _, o, _ in stage_rows(st, s, args.rows))
    stores = precompute_stores(work, data, teacher, s) if pseudo or "data" in stages else {}
    deadline = t0 + 60 * args.stop_after if args.stop_after else None
    try:
        for stage in stages:
            for row, opts, seeds in stage_rows(stage, s, args.rows):
                for seed in seeds:
                    student_run(work, row, opts, seed, data, stores, teacher, s, deadline)
    except Stopped as why:
        log(f"stopped after --stop-after {args.stop_after:g} min ({why}): run the same command again to go on")
        return 3
    except KeyboardInterrupt as why:  # Ctrl-C or SIGTERM: the child was stopped by ``run``, its checkpoints kept
        log(f"interrupted ({why or 'Ctrl-C'}): student runs resume from their last checkpoint when the same "
            "command runs again")
        return 130
    if "report" not in stages:
        log(f"stage {args.stage} done in {(time.time() - t0) / 60:.1f} min")
        return 0
    results = {**cached_fixed_rows(work, teacher, data, s), **collect_students(work, s, teacher)}
    table = summarise(results)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "scale": asdict(s), "teacher": str(teacher),
            "teacher_sha256": teacher_fingerprint(teacher), "mix": list(MIX),
            "sets": {f"{n}/{st}": [r.start, r.stop - 1] for (n, st), r in seed_ranges(s).items()},
            "report_s": round(time.time() - t0, 1), "cores": os.cpu_count(), "load_avg_end": os.getloadavg(),
            "work": str(work), "student_wall_s": {row: {str(k): v.get("wall_s") for k, v in r.items()}
                                                  for row, r in results.items()}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "reproduce_toy" if args.toy else "reproduce"
    curves = training_curves(work, s)
    meta["plateau"] = {row: {str(k): v for k, v in r.items()} for row, r in curves.items()}
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "table": table, "per_seed": results}, indent=2,
                                                 default=str) + "\n")
    plot_curves({row: [work / "runs" / run_name(row, seed) for seed in s.decisive_seeds] for row in DECISIVE},
                f"decisive pair, {len(s.decisive_seeds)} seeds, {s.schedule} schedule", out / f"{name}_loss.png")
    md = markdown(table, meta)
    (out / f"{name}.md").write_text(md + "\n")
    print(md)
    log(f"done in {meta['report_s'] / 60:.1f} min: {out / (name + '.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
