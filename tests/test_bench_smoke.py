"""Smoke test of bench/gpu.py: its tiny CPU mode runs every section and writes sane JSON.

The figures are plumbing only (toy models on a shared CPU); the test checks that every section ran and
that throughputs and MFUs are positive and finite, so that the real GPU run does not fail on a typo.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_gpu_bench_tiny_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--tiny", "--device", "cpu",
                           "--out", str(out), "--repeats", "2", "--warmup", "1", "--threads", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res) >= {"meta", "teacher", "student", "full_step", "projection", "elapsed_s"}
    meta = res["meta"]
    assert meta["tiny"] is True and meta["device"] == "cpu" and _positive(meta["peak_tflops"])
    assert meta["torch"] and meta["date"]

    teacher = res["teacher"]["rows"]
    assert {r["attn"] for r in teacher} == {"sdpa", "eager"}
    for r in teacher:
        assert "error" not in r and "skipped" not in r, r
        for k in ("faces_per_s", "panoramas_per_s", "ms", "mfu", "mfu_counted", "tflops", "flops_per_item_counted"):
            assert _positive(r[k]), (k, r)
        assert r["mfu_basis"] == "counted" and r["mfu_anchor"] is None  # tiny models have no anchor
    assert res["teacher"]["goal"]

    student = res["student"]["rows"]
    assert {(r["model"], r["format"]) for r in student} == {
        (m, f) for m in ("unifuse_tiny", "bifusepp_tiny") for f in ("nchw", "channels_last")}
    for r in student:
        assert "error" not in r and "skipped" not in r, r
        for k in ("panoramas_per_s", "ms", "mfu", "mfu_counted", "tflops", "flops_per_item_counted"):
            assert _positive(r[k]), (k, r)

    fs = res["full_step"]
    assert "error" not in fs and "skipped" not in fs, fs
    for k in ("panoramas_per_s", "teacher_faces_per_s", "ms", "mfu", "mfu_counted", "flops_per_step"):
        assert _positive(fs["full"][k]), (k, fs["full"])
    assert set(fs["parts"]) == {"teacher", "student", "projections"}
    for name, p in fs["parts"].items():
        assert _positive(p["ms"]), (name, p)
    assert _positive(fs["parts"]["teacher"]["mfu"]) and _positive(fs["parts"]["student"]["mfu"])
    assert math.isclose(fs["sum_of_parts_ms"], sum(p["ms"] for p in fs["parts"].values()), rel_tol=1e-9)
    assert _positive(fs["ratio_full_over_parts"]) and isinstance(fs["goal"]["met"], bool)

    kernels = {r["kernel"]: r for r in res["projection"]["rows"]}
    assert set(kernels) == {"equirect_to_cube", "cube_to_equirect", "equirect_to_planar_faces",
                            "equirect_to_planar_faces fwd+bwd"}
    for r in kernels.values():
        assert _positive(r["panoramas_per_s"]) and _positive(r["gbs"]) and "mfu" in r, r

    # the printed table names every section
    for word in ("teacher", "student training step", "full distillation step", "projections", "TINY MODE"):
        assert word in proc.stdout


def test_gpu_bench_names_a_bad_flag_in_one_line():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--tiny", "--sections", "teacher,nope"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --sections: unknown ['nope']; choose from teacher,student,full_step,projection"]
