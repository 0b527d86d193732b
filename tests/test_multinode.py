"""A dead node costs no run: a multi-node Ray cluster on one machine, built the way Ray's own tests build one.

``ray.cluster_utils.Cluster`` starts one raylet per node, all on 127.0.0.1: a head (with the dashboard, so
that ``ray job submit`` works: the job's driver runs on the head, where Ray puts the job supervisor), three
nodes advertising ``student_node`` and two advertising ``teacher_node``. ``python -m student.train`` is
submitted as a Ray job with 2 DeepSpeed workers (``cluster.student_resources``) and 2 teacher replicas
(``cluster.teacher_resources``, ``teacher.mode=ray``), then nodes are removed under it:

* the node hosting rank 0, after the first checkpoint: the worker group restarts on the spare student
  node, resumes from the checkpoint, and every step is logged exactly once;
* then the teacher node hosting a replica: the replica is restarted on the other teacher node and no
  teacher request is lost or answered twice;
* in a second run, every teacher node: the run stops with a clear error after a bounded wait (the job
  sets ``cluster.teacher_wait_s``), instead of hanging.

``ray job submit`` works here on loopback, with two adjustments for several raylets on one machine: the
head's temp dir gets the ``ray_current_cluster`` file that ``ray start --head`` would write (the job's driver
finds its cluster through it), and the job carries no ``working_dir`` (the nodes share one session folder,
and each node's runtime-env agent deletes the unpacked package when its own last user goes); the code is
installed on every node, as ``cluster/runtime_env.yaml`` assumes of a real cluster.

Nodes are removed without a graceful shutdown (their processes are killed, as a crashed machine's would
be); the head's health check is shortened so that Ray declares them dead within seconds. The cluster is
small (1-2 CPUs and 100 MB of object store per node) and always shut down by the fixture.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MB = 1 << 20
TEACHER_WAIT_S = 15
STEPS, CKPT_EVERY = 60, 10

pytestmark = pytest.mark.slow  # about 3 minutes on 2 busy cores; CI runs `pytest -m slow tests/test_multinode.py`


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)  # gRPC listens on ::ffff:127.0.0.1
    return (mapped or addr).is_loopback


def _listeners(node) -> list[tuple[str, int, str]]:
    """(ip, port, process) of every listening socket of a node's Ray processes and their children."""
    import psutil

    out = []
    for infos in node.all_processes.values():
        for info in infos:
            try:
                root = psutil.Process(info.process.pid)
                for proc in [root] + root.children(recursive=True):
                    for conn in proc.net_connections(kind="inet"):
                        if conn.status == psutil.CONN_LISTEN:
                            out.append((conn.laddr.ip, conn.laddr.port, proc.name()))
            except psutil.Error:
                continue
    return out


def _wait(predicate, timeout: float, what: str, job=None, poll: float = 0.5):
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if job is not None:
            job.assert_running()
        assert time.time() < deadline, f"timed out after {timeout:.0f} s waiting for {what}" + (
            job.tail() if job is not None else "")
        time.sleep(poll)


@pytest.fixture(scope="module")
def cluster():
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every Ray port on 127.0.0.1 (docs/STACK.md)
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ.pop("RAY_ADDRESS", None)
    from ray.cluster_utils import Cluster

    common = dict(node_ip_address="127.0.0.1", object_store_memory=100 * MB)
    temp_dir = f"/tmp/pdmn{os.getpid()}"  # short: Ray's socket paths must stay under 107 characters
    c = Cluster(initialize_head=True, head_node_args=dict(
        common, num_cpus=1, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=_free_port(),
        dashboard_agent_listen_port=_free_port(),  # not the default 52365: another Ray may hold it
        temp_dir=temp_dir, _system_config={"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                                           "health_check_failure_threshold": 3}))
    try:
        # What `ray start --head --temp-dir` writes: a job's driver finds its cluster through this file of the
        # head's temp dir ("auto"); without it Ray falls back to any GCS process found on the machine.
        Path(temp_dir, "ray_current_cluster").write_text(c.address)
        students = [c.add_node(**common, num_cpus=1, resources={"student_node": 1}) for _ in range(3)]
        teachers = [c.add_node(**common, num_cpus=2, resources={"teacher_node": 2}) for _ in range(2)]
        yield {"cluster": c, "head": c.head_node, "students": students, "teachers": teachers,
               "dashboard": f"http://{c.webui_url}"}
    finally:
        c.shutdown()
        for _ in range(3):  # processes that are still exiting may write a last log line into it
            shutil.rmtree(temp_dir, ignore_errors=True)
            time.sleep(1)


class Job:
    """One ``ray job submit`` of ``python -m student.train`` and what the test reads back from it."""

    def __init__(self, dashboard: str, run: Path, *overrides: str):
        from ray.job_submission import JobSubmissionClient

        self.client, self.run = JobSubmissionClient(dashboard), run
        shipped = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
        # No working_dir: the nodes of this cluster share one machine and one session folder, and each node's
        # runtime-env agent deletes the unpacked package when *its* last user goes, under the feet of the
        # others (a driver lost teacher_server/models.py mid-import). The code is installed on every node,
        # as cluster/runtime_env.yaml assumes, so the job needs only the environment variables.
        runtime_env = {"env_vars": dict(shipped["env_vars"], HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")}
        args = ["--config", str(ROOT / "configs" / "tiny.yaml"), "cluster.num_workers=2", "cluster.student_resources=student_node",
                "teacher.mode=ray", "teacher.replicas=2", "cluster.teacher_resources=teacher_node",
                "teacher.cpus_per_replica=1", f"run.out_dir={run}", f"optim.steps={STEPS}",
                f"run.ckpt_every={CKPT_EVERY}", "run.log_every=1", "cluster.metrics_port=-1", "data.num_workers=1",
                "run.progress=false", "cluster.max_failures=3", f"cluster.teacher_wait_s={TEACHER_WAIT_S}", *overrides]
        # the job's python is this test's interpreter (the project's virtual environment)
        entrypoint = " ".join([sys.executable, "-m", "student.train", *args])
        entrypoint = f"cd {ROOT} && {entrypoint}"
        deadline = time.time() + 120
        while True:
            try:
                self.id = self.client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
                break
            except RuntimeError as err:  # the head's job agent registers some seconds after the node is up
                if "No available agent" not in str(err) or time.time() > deadline:
                    raise
                time.sleep(2)

    def status(self):
        return self.client.get_job_status(self.id)

    def tail(self, n: int = 4000) -> str:
        return "\n--- job log ---\n" + self.client.get_job_logs(self.id)[-n:]

    def assert_running(self) -> None:
        from ray.job_submission import JobStatus

        status = self.status()
        assert status in (JobStatus.PENDING, JobStatus.RUNNING), f"job ended early: {status}{self.tail()}"

    def wait_end(self, timeout: float):
        from ray.job_submission import JobStatus

        ended = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED)
        return _wait(lambda: self.status() if self.status() in ended else None, timeout, "the job's end")

    def rank_node(self, rank: int) -> str | None:
        f = self.run / "workers" / f"rank{rank}.node"
        return f.read_text().strip() if f.is_file() else None

    def steps(self) -> list[int]:
        f = self.run / "metrics.jsonl"
        if not f.is_file():
            return []
        return [json.loads(x)["step"] for x in f.read_text().splitlines() if x.strip() and '"eval"' not in x]

    def stop(self) -> None:
        try:
            self.client.stop_job(self.id)
        except Exception:  # noqa: BLE001 - already over
            pass


def _actors(dashboard: str, **filters) -> list:
    from ray.util.state import list_actors

    return list_actors(address=dashboard, filters=[(k, "=", v) for k, v in filters.items()], limit=10000,
                       raise_on_missing_output=False)


def _replica_nodes(dashboard: str, alive_only: bool = True) -> list[str]:
    actors = _actors(dashboard, class_name="TeacherReplica")
    return [a.node_id for a in actors if a.state == "ALIVE" or not alive_only]


def test_every_port_of_every_node_is_on_loopback(cluster):
    nodes = [cluster["head"], *cluster["students"], *cluster["teachers"]]
    found = [x for n in nodes for x in _listeners(n)]
    assert len(found) >= 2 * len(nodes)  # each raylet listens (and the head's GCS and dashboard)
    exposed = [x for x in found if not _loopback(x[0])]
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_lost_student_node_then_teacher_node_cost_no_run(cluster, tmp_path):
    dash = cluster["dashboard"]
    by_id = {n.node_id: n for n in [*cluster["students"], *cluster["teachers"]]}
    student_ids = {n.node_id for n in cluster["students"]}
    teacher_ids = {n.node_id for n in cluster["teachers"]}
    head_id = cluster["head"].node_id
    job = Job(dash, tmp_path / "run")
    try:
        # placement: each worker on a student node, each replica on a teacher node
        _wait(lambda: (job.run / "checkpoints" / f"step_{CKPT_EVERY:07d}").is_dir(), 420, "the first checkpoint",
              job)
        first = {r: job.rank_node(r) for r in (0, 1)}
        assert set(first.values()) <= student_ids and first[0] != first[1], first
        replicas = _replica_nodes(dash)
        assert len(replicas) == 2 and set(replicas) <= teacher_ids, replicas
        # the job's singletons (Ray's job supervisor and train controller, our teacher service, ...) on the head;
        # Ray Train's PreemptionWatcher may be anywhere: Ray creates it with max_restarts=-1 (restarted elsewhere)
        singletons = {(a.class_name.rsplit(".", 1)[-1], a.node_id) for a in _actors(dash, state="ALIVE")
                      if not a.class_name.endswith(("RayTrainWorker", "TeacherReplica", "PreemptionWatcher"))}
        assert {name for name, _ in singletons} >= {"TeacherService", "TrainController"}, singletons
        elsewhere = sorted(name for name, node in singletons if node != head_id)
        assert not elsewhere, f"singleton actors off the head node: {elsewhere}"

        # the node hosting rank 0 dies after the first checkpoint
        cluster["cluster"].remove_node(by_id[first[0]], allow_graceful=False)
        spare = student_ids - set(first.values())
        _wait(lambda: job.rank_node(0) not in (None, first[0])
              and (job.run / "checkpoints" / f"step_{2 * CKPT_EVERY:07d}").is_dir(),
              420, "rank 0 restarted elsewhere and a checkpoint after the resume", job)
        again = {r: job.rank_node(r) for r in (0, 1)}
        assert spare <= set(again.values()) <= student_ids - {first[0]}, (first, again)

        # then a teacher node hosting a replica dies: its replica comes back on the other teacher node
        lost = replicas[0]
        other = (teacher_ids - {lost}).pop()
        cluster["cluster"].remove_node(by_id[lost], allow_graceful=False)
        _wait(lambda: sorted(_replica_nodes(dash)) == [other, other], 240, "both replicas on the other teacher node",
              job)
        assert job.wait_end(420) == "SUCCEEDED", job.tail()
    finally:
        job.stop()
    log = job.client.get_job_logs(job.id)
    assert f"resuming from {job.run / 'checkpoints'}" in log, log[-4000:]
    assert job.steps() == list(range(1, STEPS + 1))  # every step logged once: no gap, no repeat
    last = [json.loads(x) for x in (job.run / "metrics.jsonl").read_text().splitlines() if '"eval"' not in x][-1]
    teacher = last["teacher"]  # the shared service's counters, as rank 0 saw them at the last step
    assert teacher["backend_restarts"] >= 1 and teacher["backend_requests_failed"] == 0, teacher
    assert teacher["backend_requests_completed"] == teacher["backend_requests"], teacher  # every request answered
    assert json.loads((job.run / "eval.json").read_text())["images"] == 8
    assert (job.run / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:07d}"


def test_losing_every_teacher_node_fails_clearly_after_a_bounded_wait(cluster, tmp_path):
    dash = cluster["dashboard"]
    c = cluster["cluster"]
    job = Job(dash, tmp_path / "run")
    try:
        _wait(lambda: len(job.steps()) >= 2, 420, "training to start", job)
        teachers = [n for n in cluster["teachers"] if n in c.worker_nodes]
        assert teachers, "no teacher node left to remove"
        for node in teachers:
            c.remove_node(node, allow_graceful=False)
        # bounded: the wait for a teacher node to come back, plus Ray's detection and the teardown
        status = job.wait_end(TEACHER_WAIT_S + 180)
    finally:
        job.stop()
    log = job.client.get_job_logs(job.id)
    assert status == "FAILED", log[-4000:]
    assert "TeacherNodesLost" in log or "error: no node of the Ray cluster" in log, log[-4000:]
    assert "every teacher node is gone" in log and "'teacher_node'" in log, log[-4000:]
