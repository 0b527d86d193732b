"""Cluster mode for real: a Ray head on 127.0.0.1, `ray job submit`, a killed worker, Prometheus.

Every socket is on the loopback interface (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, --node-ip-address
127.0.0.1); the tests stop what they start.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = str(ROOT / "configs" / "tiny.yaml")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1",
               RAY_USAGE_STATS_ENABLED="0")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS", None)
    return env


def _scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            return r.read().decode()
    except OSError:
        return None


def _counter(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _steps(run: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' not in x]


@pytest.fixture(scope="module")
def ray_head():
    tmp = Path(f"/tmp/pd-ray-{os.getpid()}")  # short: Ray's socket paths must stay under 107 characters
    gcs, dash = _free_port(), _free_port()
    env = _env()
    subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
                    "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", "4",
                    "--disable-usage-stats", "--temp-dir", str(tmp), "--include-dashboard", "true"],
                   check=True, env=env, capture_output=True, timeout=120)
    try:
        yield {"address": f"http://127.0.0.1:{dash}", "gcs": f"127.0.0.1:{gcs}", "env": env}
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(tmp, ignore_errors=True)


def test_ray_job_submit_trains_checkpoints_evaluates_and_exports_metrics(ray_head, tmp_path):
    run = tmp_path / "job-run"
    mport = _free_port()
    sub_id = f"pd-test-{os.getpid()}"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", ray_head["address"], "--submission-id", sub_id,
           "--no-wait", "--working-dir", str(ROOT), "--runtime-env", str(ROOT / "cluster" / "runtime_env.yaml"), "--",
           "python", "-m", "student.train", "--config", "configs/tiny.yaml", "cluster.num_workers=2",
           f"run.out_dir={run}", "optim.steps=40", "run.ckpt_every=20", "run.log_every=10",
           f"cluster.metrics_port={mport}", "data.num_workers=1", "run.progress=false"]
    subprocess.run(cmd, check=True, env=ray_head["env"], capture_output=True, timeout=180)
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(ray_head["address"])
    seen: list[float] = []
    deadline = time.time() + 480
    status = None
    while time.time() < deadline:
        status = client.get_job_status(sub_id)
        text = _scrape(mport)
        if text:
            seen.append(_counter(text, "panodistill_panoramas_total", worker="0", kind="labeled"))
            assert "panodistill_wait_seconds_total" in text and "panodistill_mfu_ratio" in text
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(0.5)
    logs = client.get_job_logs(sub_id)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert (run / "eval.json").is_file() and json.loads((run / "eval.json").read_text())["images"] == 8
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest == "step_0000040" and (run / "checkpoints" / latest / "trainer").is_dir()  # DeepSpeed's files
    assert json.loads((run / "checkpoints" / latest / "loop.json").read_text())["world_size"] == 2
    grown = [s for s in seen if s > 0]
    assert len(grown) >= 2 and max(grown) > min(grown), f"the labeled-panorama counter did not grow: {seen}"


def test_killed_worker_is_restarted_and_resumes_with_continuous_steps(tmp_path):
    run = tmp_path / "kill-run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "student.train", "--config", TINY, "cluster.num_workers=2", f"run.out_dir={run}",
         "optim.steps=40", "run.ckpt_every=10", "run.log_every=5", "cluster.max_failures=2",
         f"cluster.metrics_port={_free_port()}", "data.num_workers=1", "run.progress=false"],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 300
        while not (run / "checkpoints" / "step_0000010").is_dir():
            assert proc.poll() is None, "".join(out)[-3000:]
            assert time.time() < deadline, "no checkpoint at step 10 in time"
            time.sleep(0.2)
        pid = int((run / "workers" / "rank1.pid").read_text())
        os.kill(pid, signal.SIGKILL)  # a training worker dies mid-run
        assert proc.wait(timeout=480) == 0, "".join(out)[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    log = "".join(out)
    assert re.search(r"resuming from .*step_00000[1-3]0", log), log[-3000:]
    assert int((run / "workers" / "rank1.pid").read_text()) != pid  # a new worker process
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000040"
    assert _steps(run) == list(range(5, 45, 5))  # continuous: no gap, no step logged twice


def test_killed_teacher_replica_loses_no_batch(tmp_path):
    """teacher.mode=ray: two replicas shared by two workers; one replica's process dies mid-run."""
    import psutil

    run = tmp_path / "teacher-kill"
    proc = subprocess.Popen(
        [sys.executable, "-m", "student.train", "--config", TINY, "cluster.num_workers=2", "teacher.mode=ray",
         "teacher.replicas=2", f"run.out_dir={run}", "optim.steps=30", "run.ckpt_every=10", "run.log_every=5",
         f"cluster.metrics_port={_free_port()}", "data.num_workers=1", "run.progress=false"],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 300
        while not (run / "metrics.jsonl").is_file():  # training (and so teacher traffic) has started
            assert proc.poll() is None, "".join(out)[-3000:]
            assert time.time() < deadline
            time.sleep(0.2)
        replicas = [p for p in psutil.process_iter(["cmdline"]) if "TeacherReplica" in " ".join(p.info["cmdline"] or [])]
        assert replicas, "no teacher replica process found"
        replicas[0].kill()
        assert proc.wait(timeout=480) == 0, "".join(out)[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 30
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["teacher"]
    assert last["backend_restarts"] >= 1 and last["backend_requests_failed"] == 0
    assert last["backend_requests_completed"] == last["backend_requests"]  # every request answered once
    assert 30 <= last["requests"] <= 31  # rank 0 asked once per step (plus one prefetched by lookahead)


@pytest.mark.skipif(shutil.which("prometheus") is None,
                    reason="Debian's prometheus server is not installed (.ci/run installs it when it can)")
def test_prometheus_scrapes_the_trainer_with_the_shipped_config(tmp_path):
    trainer_port = 8080  # a target of cluster/prometheus.yml
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", trainer_port)) == 0:
            pytest.skip("port 8080 is taken on this machine")
    prom_port = _free_port()
    prom = subprocess.Popen(["prometheus", f"--config.file={ROOT / 'cluster' / 'prometheus.yml'}",
                             f"--web.listen-address=127.0.0.1:{prom_port}", f"--storage.tsdb.path={tmp_path / 'tsdb'}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # a long run, stopped as soon as Prometheus has read our series back through its own HTTP API
    trainer = subprocess.Popen([sys.executable, "-m", "student.train", "--config", TINY, f"run.out_dir={tmp_path / 'run'}",
                                "optim.steps=100000", "run.log_every=2", f"run.metrics_port={trainer_port}",
                                "run.progress=false", "data.num_workers=1"],
                               env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    url = f"http://127.0.0.1:{prom_port}/api/v1/query?query=panodistill_panoramas_total"
    found: list[dict] = []
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not found:
            assert trainer.poll() is None, "the trainer stopped early"
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    found = [x for x in json.loads(r.read())["data"]["result"] if float(x["value"][1]) > 0]
            except OSError:
                pass
            time.sleep(1)
    finally:
        trainer.kill()
        trainer.wait(timeout=60)
        prom.terminate()
        prom.wait(timeout=30)
    assert found, "Prometheus returned no panodistill_ series"
    assert {r["metric"]["job"] for r in found} == {"panodistill-trainer"}
    assert {r["metric"]["kind"] for r in found} == {"labeled", "unlabeled"}


def test_student_train_finds_the_ray_launcher_through_its_entry_point():
    # student must not import cluster (tests/test_layers.py): it looks the launcher up by entry point
    from importlib.metadata import distributions

    from cluster.launch import run_cluster

    found = [ep for d in distributions() for ep in d.entry_points
             if ep.group == "pano_distill.launchers" and ep.name == "ray"]
    assert found, "pyproject's pano_distill.launchers entry point is not installed (pip install -e .)"
    assert found[0].load() is run_cluster


def test_teacher_node_watch_waits_for_a_teacher_node_then_fails_clearly():
    from cluster.launch import TeacherNodeWatch

    nodes = [{"Alive": True, "Resources": {"teacher_node": 2.0, "CPU": 2.0}}, {"Alive": True, "Resources": {"CPU": 1.0}}]
    watch = TeacherNodeWatch("teacher_node", 30, nodes=lambda: nodes)
    assert watch.check(now=0.0) is None and watch.alive() == 1
    nodes[0]["Alive"] = False  # the only teacher node dies
    assert watch.check(now=100.0) is None and watch.check(now=129.0) is None  # within the wait
    nodes[0]["Alive"] = True  # ... and comes back: the clock restarts
    assert watch.check(now=131.0) is None
    nodes[0]["Alive"] = False
    assert watch.check(now=200.0) is None and watch.check(now=229.0) is None
    message = watch.check(now=230.5)
    assert message is not None and "'teacher_node'" in message and "30 s" in message
    assert watch.lost() is not None  # no teacher node: a failed run is reported as this loss
    nodes.append({"Alive": True, "Resources": {"teacher_node": 1.0}})
    assert watch.lost() is None and watch.check(now=231.0) is None


def test_teacher_wait_is_a_config_field():
    from student.config import ConfigError, TrainConfig, load_config

    assert TrainConfig().cluster.teacher_wait_s == 300.0
    assert load_config(None, ["cluster.teacher_wait_s=12.5"]).cluster.teacher_wait_s == 12.5
    with pytest.raises(ConfigError, match="cluster.teacher_wait_s must be a number"):
        load_config(None, ["cluster.teacher_wait_s=soon"])
    with pytest.raises(ConfigError, match="cluster.teacher_wait_s must be >= 0"):
        load_config(None, ["cluster.teacher_wait_s=-1"])


def test_a_workers_user_error_is_found_behind_rays_wrappers():
    # a worker's DivergedError reaches the driver as TrainingFailedError <- RayTaskError(cause=...): the
    # driver must still report it as the one-line user error it is, not as Ray's traceback
    from ray.exceptions import RayTaskError
    from ray.train.base_trainer import TrainingFailedError

    from cluster.launch import user_error_behind
    from sharding.cli import UserError
    from student.loop import DivergedError

    original = DivergedError("step 7: parameter encoder.conv1.weight is not finite; latest stays step 5")
    wrapped = RayTaskError("train_fn", "Traceback ...", original).as_instanceof_cause()
    try:
        try:
            raise wrapped
        except RayTaskError as inner:
            raise TrainingFailedError("Training failed") from inner
    except TrainingFailedError as err:
        found = user_error_behind(err)
    assert found is original and isinstance(found, UserError)
    assert user_error_behind(TrainingFailedError("bug")) is None
    assert user_error_behind(RuntimeError("x")) is None
