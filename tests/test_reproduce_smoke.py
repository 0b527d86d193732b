"""bench/reproduce.py at toy size: teacher training, sharding, cached pseudo labels, five rows, evaluation."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_reproduce_runs_end_to_end_at_toy_size(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "reproduce.py"), "--toy", "--work", str(tmp_path / "work"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "reproduce_toy.json").read_text())
    rows = list(result["table"])
    assert rows == ["teacher on cube faces, merged", "teacher on cube faces, each face fitted to GT", "student, labeled only", "+ pseudo labels, no rotation",
                    "+ pseudo labels, rotation", "+ pseudo labels, rotation, masks"]
    for row in rows:
        for split in ("A", "B"):
            for metric in ("abs_rel", "delta1", "delta2", "delta3"):
                assert math.isfinite(result["table"][row][split][metric]["mean"])
    # the pipeline really ran its parts: a trained teacher folder and two pseudo-label stores with a report
    assert (tmp_path / "work" / "teacher" / "config.json").is_file()
    for name in ("rotated", "unrotated"):
        assert json.loads((tmp_path / "work" / f"pseudo_{name}.json").read_text())["panoramas"] > 0
    assert "| + pseudo labels, rotation, masks |" in (tmp_path / "out" / "reproduce_toy.md").read_text()
