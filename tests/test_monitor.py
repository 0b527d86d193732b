"""student.monitor: the trainer's Prometheus series by the book, checked by promtool on a live trainer;
and the optional TensorBoard writer of a tiny run, read back."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from promlint import check_by_the_book, free_port, promtool_check, scrape, value

from student.monitor import TRAINER_METRICS, Monitor, teacher_value

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def _window(step: int, skipped: dict, teacher: dict) -> dict:
    return {"step": step, "losses": {"loss": 0.5, "loss_pseudo": 0.25, "disc_acc_real": 0.75}, "lr": 1e-4,
            "labeled_per_s": 3.0, "unlabeled_per_s": 3.0, "panoramas_per_s": 6.0, "step_time": 0.5,
            "wait_data_fraction": 0.25, "wait_teacher_fraction": 0.5, "teacher_faces_per_s": 10.0, "mfu": 0.125,
            "skipped": skipped, "nonfinite_total": 0, "teacher": teacher}


def test_teacher_value_reads_every_label_source():
    assert teacher_value({"faces": 3, "backend_faces": 9}, "faces") == 3  # the source's own count first
    assert teacher_value({"backend_retries": 2.0}, "retries") == 2.0  # OnlineLabels over a pool
    hybrid = {"online_backend_retries": 1.0, "online_invalid_faces": 2.0, "cached_invalid_faces": 3.0}
    assert teacher_value(hybrid, "retries") == 1.0 and teacher_value(hybrid, "invalid_faces") == 5.0
    assert teacher_value({"faces": 1.0}, "restarts") is None and teacher_value({"flag": True}, "flag") is None


def test_monitor_series_are_typed_counted_and_bound_to_loopback(tmp_path):
    m = Monitor(tmp_path, rank=1, port=0)
    try:
        assert m._server.server_address[0] == "127.0.0.1"
        for _ in range(4):
            m.count(2, 2, 0.5)
        m.nonfinite.labels("1").inc()
        m.log(_window(4, {"nan_depth": 2}, {"faces": 10.0, "backend_retries": 1.0, "backend_queue_depth": 3.0}))
        m.count(2, 2, 1.0)
        # cumulative inputs; the teacher's count went down: a new source starts from 0
        m.log(_window(5, {"nan_depth": 5, "truncated_shard": 1}, {"faces": 4.0, "backend_retries": 1.0,
                                                                   "backend_queue_depth": 0.0}))
        m.log({"step": 5, "eval": {"abs_rel": 0.2, "rmse": 1.5, "delta1": 0.7, "protocol": "median"}})
        text = scrape(m.port)
    finally:
        m.close()
    fams = check_by_the_book(text, TRAINER_METRICS, "worker")
    assert value(fams, "panodistill_panoramas_total", kind="labeled") == 10
    assert value(fams, "panodistill_step_seconds") == 5  # one observation per step
    assert value(fams, "panodistill_wait_seconds_total", on="teacher") == pytest.approx(0.5 * 2.0 + 0.5 * 1.0)
    assert value(fams, "panodistill_skipped_samples_total", reason="nan_depth") == 5
    assert value(fams, "panodistill_skipped_samples_total", reason="truncated_shard") == 1
    assert value(fams, "panodistill_nonfinite_steps_total") == 1
    assert value(fams, "panodistill_teacher_client_faces_total") == 14
    assert value(fams, "panodistill_teacher_client_retries_total") == 1
    assert value(fams, "panodistill_teacher_client_queued_requests") == 0
    assert value(fams, "panodistill_loss", part="loss_pseudo") == 0.25
    assert value(fams, "panodistill_discriminator_accuracy_ratio", domain="real") == 0.75
    assert value(fams, "panodistill_learning_rate") == 1e-4 and value(fams, "panodistill_mfu_ratio") == 0.125
    assert value(fams, "panodistill_eval_rmse_meters") == 1.5 and value(fams, "panodistill_step") == 5
    # metrics.jsonl stays the record of everything, evaluation included
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [4, 5, 5] and lines[-1]["eval"]["protocol"] == "median"
    promtool_check(text)


def test_live_trainer_scrape_passes_promtool_and_tensorboard_gets_the_curves(tmp_path):
    """A tiny run with run.tensorboard=true and a Prometheus endpoint, scraped at each checkpoint."""
    from student.config import load_config
    from student.session import run_training_process
    from student.tensorboard import read_events

    port = free_port()
    run = tmp_path / "run"
    cfg = load_config(TINY, [f"run.out_dir={run}", "optim.steps=4", "run.log_every=2", "run.ckpt_every=2",
                             "eval.every=2", "eval.max_images=2", f"run.metrics_port={port}",
                             "run.progress=false", "data.num_workers=1", "run.tensorboard=true"])
    scrapes = []
    run_training_process(cfg, on_checkpoint=lambda folder, step: scrapes.append(scrape(port)))
    assert scrapes
    text = scrapes[-1]
    fams = check_by_the_book(text, TRAINER_METRICS, "worker")
    assert value(fams, "panodistill_panoramas_total", kind="unlabeled") > 0
    assert value(fams, "panodistill_teacher_client_faces_total") > 0  # the in-process tiny teacher
    promtool_check(text)

    events = read_events(run / "tensorboard")
    for tag in ("loss/loss", "loss/loss_pseudo", "train/learning_rate", "throughput/panoramas_per_s",
                "wait/teacher_fraction", "eval/abs_rel", "eval/delta1", "eval/depth_preview"):
        assert tag in events, (tag, sorted(events))
    assert [s for s, _ in events["loss/loss"]] == [2, 4]
    jsonl = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert events["loss/loss"][-1][1] == pytest.approx([x for x in jsonl if "losses" in x][-1]["losses"]["loss"])
    png = events["eval/depth_preview"][0][1]
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and [s for s, _ in events["eval/depth_preview"]][:2] == [2, 4]


def _dashboard_exprs() -> list[str]:
    board = json.loads((ROOT / "cluster" / "grafana_dashboard.json").read_text())
    return [t["expr"] for p in board["panels"] for t in p["targets"]]


def test_dashboard_names_only_series_we_export():
    from teacher_server.metrics import REPLICA_METRICS

    kinds = {**{k: v[0] for k, v in TRAINER_METRICS.items()}, **REPLICA_METRICS}
    for expr in _dashboard_exprs():
        for name in re.findall(r"panodistill_\w+", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            ok = name in kinds or (base in kinds and kinds[base] == "histogram")
            assert ok, f"the dashboard uses {name}, which no pano-distill process exports ({expr})"


@pytest.mark.skipif(shutil.which("prometheus") is None,
                    reason="Debian's prometheus server is not installed (.ci/run installs it when it can)")
def test_prometheus_evaluates_every_dashboard_query(tmp_path):
    """A real Prometheus scrapes a trainer's and a replica's registry and answers each panel's query."""
    from teacher_server.metrics import TeacherMetrics

    trainer = Monitor(None, port=0)
    replica = TeacherMetrics("0")
    rport, prom_port = free_port(), free_port()
    assert replica.serve(rport)
    for step in range(1, 4):
        trainer.count(2, 2, 0.5)
        trainer.log(_window(step, {"nan_depth": step}, {"faces": 8.0 * step, "queue_depth": 1.0}))
        replica.faces.inc(8)
        replica.latency.observe(0.05)
    (tmp_path / "prom.yml").write_text(
        "global: {scrape_interval: 1s}\nscrape_configs:\n"
        f"  - job_name: trainer\n    static_configs: [{{targets: ['127.0.0.1:{trainer.port}']}}]\n"
        f"  - job_name: teacher\n    static_configs: [{{targets: ['127.0.0.1:{rport}']}}]\n")
    prom = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prom.yml'}",
                             f"--web.listen-address=127.0.0.1:{prom_port}", f"--storage.tsdb.path={tmp_path / 'tsdb'}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def query(expr: str) -> dict:
        url = f"http://127.0.0.1:{prom_port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.loads(r.read())

    try:
        deadline, up = time.time() + 60, []
        while time.time() < deadline and len(up) < 2:
            try:
                up = [x for x in query("up == 1")["data"]["result"]]
            except OSError:
                pass
            time.sleep(0.5)
        assert len(up) == 2, "Prometheus did not scrape both endpoints"
        for expr in _dashboard_exprs():
            assert query(expr)["status"] == "success", expr
        loss = query('panodistill_loss{part="loss"}')["data"]["result"]
        assert [float(x["value"][1]) for x in loss] == [0.5]
    finally:
        prom.terminate()
        prom.wait(timeout=30)
        trainer.close()
        replica.close()
