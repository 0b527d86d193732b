"""student.train end to end on the tiny config: run folder, evaluation, exact resume."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sharding import cli
from student import checkpoint as ckpt
from student.config import load_config
from student.loop import DivergedError
from student.metrics import METRIC_NAMES
from student.train import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
FAST = ["run.progress=false", "data.num_workers=1"]


def _weights(run: Path) -> dict:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return torch.load(run / "checkpoints" / latest / "model.pt", weights_only=True)


def test_tiny_run_writes_the_run_folder(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["--config", TINY, f"run.out_dir={run}", "optim.steps=6", "run.log_every=3", "run.ckpt_every=3", *FAST]) == 0
    printed = capsys.readouterr().out  # the final table: the reference protocol first, the paper text's beside it
    assert printed.index("[lstsq]") < printed.index("[median]")
    for name in ("config.yaml", "metrics.jsonl", "eval.json", "train.log", "loss_curve.png", "preview.png"):
        assert (run / name).is_file(), name
    report = json.loads((run / "eval.json").read_text())
    assert report["protocol"] == "lstsq" and report["images"] == 8
    assert list(report["metrics_by_protocol"]) == ["lstsq", "median"]
    assert report["metrics_by_protocol"]["lstsq"] == report["metrics"]
    assert set(report["metrics"]) == set(METRIC_NAMES)
    assert all(v == v and abs(v) < 1e6 for v in report["metrics"].values())  # finite
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [3, 6]
    assert {"loss", "loss_labeled", "loss_pseudo"} <= set(lines[-1]["losses"])
    assert lines[-1]["labeled_per_s"] == pytest.approx(lines[-1]["unlabeled_per_s"])  # half and half
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_0000003", "step_0000006"]


def test_rerun_resumes_exactly(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["--config", TINY, f"run.out_dir={straight}", "optim.steps=10", "run.ckpt_every=5", *FAST]) == 0
    assert main(["--config", TINY, f"run.out_dir={resumed}", "optim.steps=6", "run.ckpt_every=3", *FAST]) == 0
    # the same command with more steps continues from step 6: weights, Adam moments, RNG and data position
    assert main(["--config", TINY, f"run.out_dir={resumed}", "optim.steps=10", "run.ckpt_every=5", *FAST]) == 0
    assert "resuming from" in (resumed / "train.log").read_text()
    a, b = _weights(straight), _weights(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    steps = [json.loads(x)["step"] for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 10


def test_finished_run_is_not_retrained(tmp_path):
    run = tmp_path / "run"
    assert main(["--config", TINY, f"run.out_dir={run}", "optim.steps=2", *FAST]) == 0
    before = _weights(run)
    assert main(["--config", TINY, f"run.out_dir={run}", "optim.steps=2", *FAST]) == 0
    after = _weights(run)
    assert all(torch.equal(before[k], after[k]) for k in before)


def _one_line_error(capsys, *names: str) -> str:
    text = capsys.readouterr().err.strip()
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and text.endswith(errors[0]) and "Traceback" not in text, text  # log lines may precede
    err = errors[0]
    for name in names:
        assert name in err, (name, err)
    return err


@pytest.mark.parametrize("args, names", [
    (["optim.stepz=3"], ["optim.stepz"]),
    (["data.batch_size=3"], ["data.batch_size"]),
    (["optim.lr=inf"], ["optim.lr", "finite"]),
    (["optim.steps=0"], ["optim.steps"]),
    (["model.name=bogus"], ["model.name", "bogus"]),
    (["teacher.mode=psychic"], ["teacher.mode", "inprocess"]),
])
def test_bad_configuration_is_one_named_line_and_exit_2(args, names, capsys, tmp_path):
    run = tmp_path / "run"
    assert cli.run(main, ["--config", TINY, f"run.out_dir={run}", *args]) == 2
    _one_line_error(capsys, *names)
    assert not run.exists()  # refused before anything is written


def test_user_errors_about_files(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim:\n  steps: [3\n")
    assert cli.run(main, ["--config", str(broken)]) == 2
    _one_line_error(capsys, str(broken), "not valid YAML")
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert cli.run(main, ["--config", TINY, f"run.out_dir={afile}"]) == 2
    _one_line_error(capsys, "run.out_dir", str(afile), "is a file")
    bad_manifest = tmp_path / "shards" / "manifest.json"
    bad_manifest.parent.mkdir()
    bad_manifest.write_text("{not json")
    assert cli.run(main, ["--config", TINY, f"run.out_dir={tmp_path / 'r'}", "data.source=shards",
                          f"data.labeled=[{bad_manifest}]", "teacher.mode=none", *FAST]) == 2
    _one_line_error(capsys, str(bad_manifest))
    assert cli.run(main, ["--config", TINY, f"run.out_dir={tmp_path / 'r2'}", "teacher.mode=cached",
                          f"teacher.store={tmp_path / 'no-such-store'}", *FAST]) == 2
    _one_line_error(capsys, "no-such-store")
    # --debug: the same error with its traceback
    assert cli.run(main, ["--config", str(broken), "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_help_lists_every_key_and_print_config_resolves(capsys):
    from student.config import iter_fields

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for key, _, _, _ in iter_fields():
        assert f"  {key} (" in out, key
    assert main(["--config", TINY, "optim.steps=7", "--print-config"]) == 0
    printed = __import__("yaml").safe_load(capsys.readouterr().out)
    assert printed["optim"]["steps"] == 7 and printed["model"]["name"] == "unifuse_tiny"


def test_entry_point_error_is_one_line_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "student.train", "--config", TINY, "model.name=bogus",
                           f"run.out_dir={tmp_path / 'r'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "model.name" in proc.stderr, proc.stderr


def test_a_second_run_on_one_folder_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    hold = subprocess.Popen([sys.executable, "-c", "import sys, time; from student.checkpoint import lock_run_dir; "
                             "l = lock_run_dir(sys.argv[1]); print('held', flush=True); time.sleep(60)", str(run)],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert hold.stdout.readline().strip() == "held"
        assert cli.run(main, ["--config", TINY, f"run.out_dir={run}", "optim.steps=2", *FAST]) == 2
        _one_line_error(capsys, f"pid {hold.pid}", str(run))
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # the refused run wrote nothing
    finally:
        hold.kill()
        hold.wait()


def test_divergence_fails_the_run_and_keeps_the_last_finite_checkpoint(tmp_path, capsys):
    from student.session import run_training_process

    run = tmp_path / "run"
    assert main(["--config", TINY, f"run.out_dir={run}", "optim.steps=2", *FAST]) == 0
    # optim.lr=inf is refused by the configuration; a model can still diverge with a finite one, and the
    # loop must catch it. Both ways: the loop with an infinite rate, and the command with a huge one.
    cfg = load_config(TINY, [f"run.out_dir={run}", "optim.steps=5", "run.ckpt_every=1", *FAST])
    cfg.optim.lr = float("inf")
    with pytest.raises(DivergedError, match="not finite.*step_0000002, stays latest"):
        run_training_process(cfg)
    assert cli.run(main, ["--config", TINY, f"run.out_dir={run}", "optim.steps=5", "run.ckpt_every=1",
                          "optim.lr=1e30", *FAST]) == 2
    _one_line_error(capsys, "diverged", "step_0000002")
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    state, _ = ckpt.load_model_state(run)  # finite: it loads
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert not (run / "eval.json").read_text().count("NaN")


def test_resume_skips_a_damaged_checkpoint(tmp_path):
    run = tmp_path / "run"
    assert main(["--config", TINY, f"run.out_dir={run}", "optim.steps=4", "run.ckpt_every=2", *FAST]) == 0
    trainer = run / "checkpoints" / "step_0000004" / "trainer.pt"
    data = bytearray(trainer.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 4096] = bytes(b ^ 0xFF for b in data[mid:mid + 4096])  # 4 KB flipped inside trainer.pt
    trainer.write_bytes(bytes(data))
    assert main(["--config", TINY, f"run.out_dir={run}", "optim.steps=5", "run.ckpt_every=5", *FAST]) == 0
    log_text = (run / "train.log").read_text()
    assert f"checkpoint file {trainer} is damaged" in log_text
    assert "resuming from" in log_text and "step_0000002 at step 2" in log_text
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000005"


def test_a_different_worker_count_or_model_is_refused_unless_allowed(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["--config", TINY, f"run.out_dir={run}", "optim.steps=2", *FAST]) == 0
    ckpt = run / "checkpoints" / "step_0000002"
    meta = json.loads((ckpt / "loop.json").read_text())
    (ckpt / "loop.json").write_text(json.dumps(dict(meta, world_size=2, engine="deepspeed")))  # as a 2-worker run
    assert cli.run(main, ["--config", TINY, f"run.out_dir={run}", "optim.steps=4", *FAST]) == 2
    err = capsys.readouterr().err
    assert "2 worker(s) on a deepspeed engine" in err and "cluster.allow_resize=true" in err
    # allowed: weights and step carry over, and training continues to step 4
    assert main(["--config", TINY, f"run.out_dir={run}", "optim.steps=4", "cluster.allow_resize=true", *FAST]) == 0
    assert json.loads((run / "checkpoints" / "step_0000004" / "loop.json").read_text())["step"] == 4
    assert cli.run(main, ["--config", TINY, f"run.out_dir={run}", "optim.steps=6", "model.name=rectnet_tiny", *FAST]) == 2
    assert "holds a checkpoint of model" in capsys.readouterr().err


def test_a_store_header_mismatch_is_one_named_line(tmp_path, capsys):
    from teacher_server.store import PseudoLabelStore, make_header

    store = tmp_path / "pseudo.lmdb"
    PseudoLabelStore(store, header=make_header(model="tiny-random", face_size=16, input_size=56, seed=0,
                                               rotations=1, max_deg=45.0)).close()
    assert cli.run(main, ["--config", TINY, f"run.out_dir={tmp_path / 'r'}", "teacher.mode=cached",
                          f"teacher.store={store}", *FAST]) == 2  # the run's faces are 32 px
    _one_line_error(capsys, str(store), "face_size")


def test_pipe_addresses_need_data_allow_pipe(tmp_path, capsys):
    args = ["--config", TINY, f"run.out_dir={tmp_path / 'r'}", "data.source=shards", "teacher.mode=none",
            f"data.labeled=['pipe:cat {tmp_path}/x.tar']", *FAST]
    assert cli.run(main, args) == 2
    _one_line_error(capsys, "pipe:", "data.allow_pipe")


def test_two_identical_runs_on_one_folder_one_is_refused(tmp_path):
    """The reported case: two `python -m student.train` on one out_dir. One trains, the other exits 2 naming
    the first's pid, and metrics.jsonl holds each step once."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "student.train", "--config", TINY, f"run.out_dir={run}", "optim.steps=2",
           "run.log_every=1", *FAST]
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lock = run / ".lock"
        for _ in range(600):  # until the first holds the folder
            if lock.is_file() and lock.read_text().strip() == str(first.pid):
                break
            assert first.poll() is None, first.communicate()
            __import__("time").sleep(0.1)
        second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2 and f"pid {first.pid}" in second.stderr, second.stderr
        assert first.wait(timeout=600) == 0, first.communicate()
    finally:
        first.kill()
        first.communicate()
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
