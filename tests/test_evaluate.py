"""student.evaluate: the reference protocol first, the other one beside it, and the Stanford2D3D crop."""

import json

import pytest

from sharding.build import build
from sharding.cli import UserError
from student import evaluate


@pytest.fixture(scope="module")
def office_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("office")
    build("generated", None, out, count=3, style="office", height=32, seed=500, progress=False)
    return out / "manifest.json"


def test_cli_prints_lstsq_first_and_writes_both_protocols(office_shards, tmp_path, capsys):
    out = tmp_path / "eval"
    assert evaluate.main(["--model", "teacher-cube", "--teacher", "tiny-random", "--input-size", "56",
                          "--height", "32", "--shards", str(office_shards), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.index("[lstsq]") < printed.index("[median]")
    rep = json.loads((out / "eval.json").read_text())
    assert rep["protocol"] == "lstsq" and rep["other_protocol"] == "median" and rep["images"] == 3
    assert list(rep["metrics_by_protocol"]) == ["lstsq", "median"]
    assert rep["metrics"] == rep["metrics_by_protocol"]["lstsq"]
    assert rep["metrics_by_protocol"]["lstsq"] != rep["metrics_by_protocol"]["median"]
    md = (out / "eval.md").read_text()
    assert md.index("[lstsq]") < md.index("[median]")


def test_crop_argument():
    assert evaluate.parse_crop("stanford2d3d", 512) == 68 and evaluate.parse_crop("stanford2d3d", 256) == 34
    assert evaluate.parse_crop("5", 64) == 5
    with pytest.raises(UserError, match="--crop"):
        evaluate.parse_crop("top", 64)
    with pytest.raises(UserError, match="--crop"):
        evaluate.parse_crop("40", 64)


def test_student_without_checkpoint_is_a_user_error(office_shards):
    with pytest.raises(UserError, match="--checkpoint"):
        evaluate.main(["--shards", str(office_shards)])
