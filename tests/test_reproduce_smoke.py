"""bench/reproduce.py at toy size: teacher training, sharding, cached pseudo labels, every stage and row,
the baselines, the oracle dose-response and the paired differences."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import _evidence as ev  # noqa: E402
import reproduce  # noqa: E402


def test_reproduce_runs_end_to_end_at_toy_size(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "reproduce.py"), "--toy", "--work", str(tmp_path / "work"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "reproduce_toy.json").read_text())
    table = result["table"]
    assert list(table)[:4] == ["teacher on cube faces, merged", "teacher on cube faces, each face fitted to GT",
                               "baseline: constant distance, each face fitted to GT", "baseline: constant depth"]
    oracle = [r for r in table if r.startswith("oracle teacher")]
    assert len(oracle) == 2 and "noise 0.4" in oracle[-1]
    assert {"student, labeled only", "+ pseudo labels, rotation, masks", "+ pseudo labels, no rotation",
            "+ pseudo labels, rotation"} <= set(table)
    for row, t in table.items():
        for split in ("B", "U"):
            for proto in ("lstsq", "median"):
                assert math.isfinite(t[f"{split}/{proto}/abs_rel"]["mean"]), (row, split, proto)
    assert table["student, labeled only"]["n"] == 2 and table["+ pseudo labels, rotation, masks"]["n"] == 2
    paired = table["+ pseudo labels, rotation, masks"]["B/paired_vs_labeled_only"]
    assert paired["n"] == 2 and paired["ci95"][0] <= paired["mean"] <= paired["ci95"][1]
    # the content-free baseline is a constant depth: lstsq and median give the same numbers for it
    const = table["baseline: constant depth"]
    assert const["B/lstsq/abs_rel"]["mean"] == pytest.approx(const["B/median/abs_rel"]["mean"], rel=0.05)
    # the pipeline really ran its parts: a trained teacher folder and two pseudo-label stores with a report
    assert (tmp_path / "work" / "teacher" / "config.json").is_file()
    for name in ("rotated", "unrotated"):
        assert json.loads((tmp_path / "work" / f"pseudo_{name}.json").read_text())["panoramas"] > 0
    # pseudo labels, their students and the report name the teacher's weights they came from
    fp = reproduce.teacher_fingerprint(tmp_path / "work" / "teacher")
    assert result["meta"]["teacher_sha256"] == fp
    run = tmp_path / "work" / "runs" / reproduce.run_name("+ pseudo labels, rotation, masks", 0)
    assert json.loads((run / "teacher.json").read_text())["teacher_sha256"] == fp
    md = (tmp_path / "out" / "reproduce_toy.md").read_text()
    assert "| baseline: constant depth |" in md and "fitted constant-distance baseline" in md
    assert "Headline: the full recipe changes zero-shot B AbsRel" in md and "Dose-response" in md
    assert (tmp_path / "out" / "reproduce_toy_loss.png").stat().st_size > 1000


def test_sets_are_disjoint_and_sized_like_the_brief():
    s = reproduce.Scale()
    reproduce.check_disjoint(s)
    counts = reproduce.set_counts(s)
    assert sum(counts["labeled"].values()) >= 100 and sum(counts["unlabeled"].values()) >= 3 * s.labeled
    assert set(counts["unlabeled"]) == {"apartment", "house", "office"} and sum(counts["test_b"].values()) >= 300
    assert len(s.decisive_seeds) >= 5 and len(s.seeds) >= 3 and s.schedule == "cosine"
    bad = reproduce.Scale(unlabeled=3 * (reproduce.SEED_GAP + 1))
    with pytest.raises(ValueError, match="seed gap"):
        reproduce.check_disjoint(bad)


def test_paired_difference_t_interval():
    d = ev.paired_difference({0: 1.0, 1: 2.0, 2: 3.0}, {0: 0.5, 1: 1.0, 2: 2.0})
    # diffs 0.5, 1.0, 1.0: mean 0.8333, sd 0.2887, t(2) = 4.303 -> half width 0.7172
    assert d["mean"] == pytest.approx(5 / 6) and d["ci95"][1] - d["mean"] == pytest.approx(0.7172, abs=1e-3)
    assert ev.paired_difference({0: 1.0}, {0: 2.0, 1: 3.0}) is None


def test_constant_distance_faces_are_not_constant_on_a_face():
    faces = ev.constant_distance_faces(16).reshape(6, 16, 16)
    assert (faces[:, 0, 0] > faces[:, 8, 8]).all()  # planar disparity 1 / (r cos angle) grows to the corners
    assert faces.min() >= 1.0 - 1e-5 and faces.max() <= 3 ** 0.5 + 1e-3


def test_a_claimed_run_is_skipped_by_a_second_process(tmp_path):
    """Two stage commands on one working folder share the runs out: a run another process holds is not
    trained twice, and a released claim (finished or crashed process) can be taken again."""
    path = tmp_path / "run.claim"
    other = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); "
                              f"import reproduce, time; fd = reproduce.claim_run(__import__('pathlib').Path("
                              f"{str(path)!r})); print(fd is not None, flush=True); time.sleep(30)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "True"
        assert reproduce.claim_run(path) is None
    finally:
        other.kill()
        other.wait()
    fd = reproduce.claim_run(path)  # the holder died: its lock went with it
    assert fd is not None
    fd.release()


def test_plateau_check_tells_a_falling_loss_from_a_flat_one():
    falling = [{"step": i, "losses": {"loss_labeled": 1.0 / (1 + i / 100)}} for i in range(10, 1001, 10)]
    flat = [{"step": i, "losses": {"loss_labeled": 0.3 + 0.01 * (i % 20 == 0)}} for i in range(10, 1001, 10)]
    assert reproduce.plateau(falling)["relative_change"] < -0.1
    assert abs(reproduce.plateau(flat)["relative_change"]) < 0.02
    assert reproduce.plateau(falling[:5]) is None


def test_rows_filter_keeps_only_the_named_rows():
    s = reproduce.Scale()
    rows = reproduce.stage_rows("decisive", s, ["labeled only"])
    assert [r for r, _, _ in rows] == [reproduce.BASE_ROW] and rows[0][2] == s.decisive_seeds
    oracle = reproduce.stage_rows("oracle", s, ["noise 0.2"])
    assert len(oracle) == 1 and oracle[0][1]["oracle_noise"] == 0.2
    assert len(reproduce.stage_rows("ablation", s)) == len(reproduce.ABLATION)
    assert reproduce.stage_rows("ablation", s, ["no such row"]) == []


def test_a_run_folder_of_another_schedule_is_refused(tmp_path):
    run_dir = tmp_path / "student_labeled_only-seed0"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("optim:\n  steps: 1000\n  lr: 0.002\n")
    reproduce.check_schedule(run_dir, reproduce.Scale(steps=1000))  # the same schedule: reused
    with pytest.raises(SystemExit, match="trained for 1000 steps, not 3000"):
        reproduce.check_schedule(run_dir, reproduce.Scale(steps=3000))
    reproduce.check_schedule(tmp_path / "not-trained-yet", reproduce.Scale(steps=3000))


def test_pseudo_labels_and_runs_of_another_teacher_are_refused(tmp_path):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "model.safetensors").write_bytes(b"weights one")
    fp = reproduce.teacher_fingerprint(teacher)
    assert len(fp) == 16
    full = reproduce.DECISIVE["+ pseudo labels, rotation, masks"]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "eval.json").write_text("{}")
    with pytest.raises(SystemExit, match="not recorded"):  # a trained pseudo-label run must say its teacher
        reproduce.check_teacher(run_dir, full, fp)
    (run_dir / "teacher.json").write_text(json.dumps({"teacher_sha256": fp}))
    reproduce.check_teacher(run_dir, full, fp)  # the same teacher: reused
    (teacher / "model.safetensors").write_bytes(b"weights two")  # the same folder, retrained
    fp2 = reproduce.teacher_fingerprint(teacher)
    assert fp2 != fp
    with pytest.raises(SystemExit, match=f"another teacher \\({fp}, not {fp2}\\)"):
        reproduce.check_teacher(run_dir, full, fp2)
    # rows that do not learn from the teacher are not tied to it
    reproduce.check_teacher(run_dir, reproduce.DECISIVE[reproduce.BASE_ROW], fp2)
    reproduce.check_teacher(run_dir, {"oracle_noise": 0.2, "pseudo": True}, fp2)
    # the cached pseudo-label stores: made by the first teacher, refused for the second
    work = tmp_path / "work"
    work.mkdir()
    for name in ("rotated", "unrotated"):
        (work / f"pseudo_{name}.json").write_text(json.dumps({"teacher_sha256": fp}))
    with pytest.raises(SystemExit, match="pseudo labels of another teacher"):
        reproduce.precompute_stores(work, {}, teacher, reproduce.TOY)
    (teacher / "model.safetensors").write_bytes(b"weights one")
    assert set(reproduce.precompute_stores(work, {}, teacher, reproduce.TOY)) == {"rotated", "unrotated"}
    with pytest.raises(SystemExit, match="no weight files"):
        reproduce.teacher_fingerprint(tmp_path)


def test_the_teacher_goal_verdict_is_not_rounded_into_a_pass():
    from _reproduce_report import markdown

    def row(b):
        v = {"mean": b, "std": 0.0, "values": [b]}
        return {"n": 1, "seeds": ["-"], **{f"{s}/{p}/{m}": v for s in "BU" for p in ("lstsq", "median")
                                            for m in ("abs_rel", "delta1")}}

    meta = {"scale": reproduce.asdict(reproduce.Scale()), "mix": list(reproduce.MIX)}
    for fitted, verdict in ((0.0829, "0.602 x the fitted constant-distance baseline (0.1378; goal <= 0.6 x: not met)"),
                            (0.0826, "0.599 x the fitted constant-distance baseline (0.1378; goal <= 0.6 x: met)")):
        md = markdown({"teacher on cube faces, each face fitted to GT": row(fitted),
                       "baseline: constant distance, each face fitted to GT": row(0.1378)}, meta)
        assert verdict in md


def test_run_stops_its_child_at_the_deadline(tmp_path):
    """--stop-after: the child training process is stopped when the stage's time is up, not left running."""
    import os
    import time

    log = tmp_path / "child.log"
    t0 = time.time()
    finished = reproduce.run([sys.executable, "-c", "import os, time; print(os.getpid(), flush=True); time.sleep(120)"],
                             log, deadline=time.time() + 2)
    assert finished is False and time.time() - t0 < 60
    pid = int(log.read_text().split()[0])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert reproduce.run([sys.executable, "-c", "print('second part')"], log, deadline=time.time() + 60) is True
    assert log.read_text().split()[1:] == ["second", "part"]  # appended: an interrupted run keeps its log


def test_a_stopped_run_resumes_from_its_checkpoint_to_the_same_student(tmp_path):
    """A labeled-only toy run, interrupted after its step-2 checkpoint, is resumed by the next command (not
    started again) and ends with exactly the weights of the run that was never interrupted."""
    import torch

    from student.checkpoint import checkpoint_root, load_model_state, step_dir

    s = reproduce.Scale(**{**reproduce.asdict(reproduce.TOY), "steps": 4, "ckpt_every": 2})
    work = tmp_path / "work"
    (work / "runs").mkdir(parents=True)
    data = reproduce.build_data(work, s)
    row, opts = reproduce.BASE_ROW, reproduce.DECISIVE[reproduce.BASE_ROW]
    teacher = reproduce.V2_TEACHER  # labeled only never calls it; the run records which one it is configured with
    whole = reproduce.student_run(work, row, opts, 0, data, {}, teacher, s)
    out = work / "runs" / reproduce.run_name(row, 0)
    final, _ = load_model_state(out)
    # what a command stopped after step 2 leaves behind: the step-2 checkpoint, no final one, no scores
    for f in ("scores.json", "eval.json", "segments.json"):
        (out / f).unlink(missing_ok=True)
    import shutil
    shutil.rmtree(step_dir(out, 4))
    (checkpoint_root(out) / "latest").write_text(step_dir(out, 2).name)
    assert reproduce.saved_step(out) == 2
    with pytest.raises(reproduce.Stopped, match="not started"):  # the time is already up: nothing trains
        reproduce.student_run(work, row, opts, 0, data, {}, teacher, s, deadline=0.0)
    assert reproduce.saved_step(out) == 2
    resumed = reproduce.student_run(work, row, opts, 0, data, {}, teacher, s)
    log = (work / "runs" / f"{reproduce.run_name(row, 0)}.log").read_text()
    assert "resuming from" in log and "at step 2" in log
    again, _ = load_model_state(out)
    assert set(again) == set(final)
    for k in final:
        assert torch.equal(again[k], final[k]), k
    assert resumed["B"]["lstsq"]["abs_rel"] == pytest.approx(whole["B"]["lstsq"]["abs_rel"], rel=1e-6)
    assert reproduce.read_segments(out)[-1]["finished"] is True
    # and writing checkpoints changes nothing trained: seed 1 with and without them ends with the same weights
    # (so reports of runs with and without checkpoints compare: steps_curve lets ckpt_every differ)
    reproduce.student_run(work, row, opts, 1, data, {}, teacher, s)
    seed1 = work / "runs" / reproduce.run_name(row, 1)
    with_ckpt, _ = load_model_state(seed1)
    shutil.rmtree(seed1)
    reproduce.student_run(work, row, opts, 1, data, {}, teacher, reproduce.Scale(**{**reproduce.asdict(s), "ckpt_every": 0}))
    assert reproduce.saved_step(seed1) == 4  # only the final checkpoint
    without, _ = load_model_state(seed1)
    assert all(torch.equal(with_ckpt[k], without[k]) for k in with_ckpt)


def _processes_mentioning(text: str) -> list[int]:
    """Pids of live processes whose command line contains ``text`` (Linux /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text in (d / "cmdline").read_bytes().decode(errors="replace") and \
                        "Z" not in (d / "stat").read_text().split(")")[-1].split()[0]:
                    out.append(int(d.name))
            except OSError:
                continue
    return out


@pytest.mark.skipif(not Path("/proc/self/cmdline").is_file(), reason="needs /proc")
def test_a_killed_stage_takes_its_training_child_with_it(tmp_path):
    """SIGTERM to a stage command (kill, a scheduler's limit) stops the student it was training too: an
    orphan would keep a core busy and write into a run folder that the next command resumes from."""
    import os
    import signal
    import time

    work = tmp_path / "work"
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "reproduce.py"), "--toy", "--stage", "decisive",
                             "--rows", "labeled only", "--seeds", "0", "--steps", "100000", "--work", str(work)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while not any(p != proc.pid for p in _processes_mentioning(str(work / "runs"))):
            assert proc.poll() is None and time.time() < deadline, "the stage never started its student"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        time.sleep(1)
        assert _processes_mentioning(str(work / "runs")) == []
        assert proc.returncode == 130 and "interrupted (signal 15)" in out and "Traceback" not in out, out[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in _processes_mentioning(str(work / "runs")):  # only what this test started (its tmp path)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
