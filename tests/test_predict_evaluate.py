"""student.predict on the real sample panoramas, and the student.evaluate CLI."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from student import evaluate, predict
from student.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    assert train_main(["--config", str(ROOT / "configs" / "tiny.yaml"), f"run.out_dir={run}", "optim.steps=2",
                       "run.progress=false", "data.num_workers=1"]) == 0
    return run


def test_predict_writes_depth_colour_and_a_readable_ply(tiny_run, samples_dir, tmp_path):
    indoor = sorted((samples_dir / "indoor").glob("*.jpg"))[0]
    outdoor = samples_dir / "outdoor" / "b0.png"
    out = tmp_path / "pred"
    assert predict.main(["--checkpoint", str(tiny_run), str(indoor), str(outdoor), "--out", str(out),
                         "--ply-stride", "4"]) == 0
    for img in (indoor, outdoor):
        rgb = cv2.imread(str(img))
        depth_png = cv2.imread(str(out / f"{img.stem}_depth.png"), cv2.IMREAD_UNCHANGED)
        assert depth_png.dtype == np.uint16 and depth_png.shape == rgb.shape[:2]
        depth = np.load(out / f"{img.stem}_depth.npy")
        assert depth.shape == rgb.shape[:2] and np.isfinite(depth).all() and (depth > 0).all()
        assert np.median(depth) == pytest.approx(2.0, rel=0.02)  # the documented relative scale
        assert np.abs(depth_png / 1000.0 - depth).max() < 1e-3 + 1e-6
        color = cv2.imread(str(out / f"{img.stem}_depth_color.png"))
        assert color.shape == rgb.shape
        pts, cols = predict.read_ply(out / f"{img.stem}.ply")
        assert len(pts) == (rgb.shape[0] // 4) * (rgb.shape[1] // 4) and np.isfinite(pts).all()
        assert np.linalg.norm(pts, axis=1).max() < depth.max() * 1.01  # radial distances come from the depth
        # colours are the image's own: compare with an area-downsampled RGB
        small = cv2.resize(cv2.cvtColor(rgb, cv2.COLOR_BGR2RGB), (rgb.shape[1] // 4, rgb.shape[0] // 4),
                           interpolation=cv2.INTER_AREA)
        assert np.array_equal(cols, small.reshape(-1, 3))
        meta = json.loads((out / f"{img.stem}.json").read_text())
        assert meta["median_depth_m"] == 2.0


def test_predict_skips_a_bad_image_with_its_name(tiny_run, tmp_path, capsys):
    bad = tmp_path / "wide.png"
    cv2.imwrite(str(bad), np.zeros((10, 30, 3), np.uint8))  # 3:1
    assert predict.main(["--checkpoint", str(tiny_run), str(bad), "--out", str(tmp_path / "o")]) == 1
    assert "wide.png" in capsys.readouterr().out


def test_evaluate_cli_protocols_and_teacher_cube(tiny_run, tmp_path):
    import yaml

    cfg = yaml.safe_load((tiny_run / "config.yaml").read_text())
    from student.config import from_dict
    from student.data import prepare_data

    val = prepare_data(from_dict(cfg)).data.val
    reports = {}
    for protocol in ("median", "lstsq"):
        out = tmp_path / protocol
        assert evaluate.main(["--checkpoint", str(tiny_run), "--shards", *val, "--protocol", protocol,
                              "--out", str(out)]) == 0
        reports[protocol] = json.loads((out / "eval.json").read_text())
        assert reports[protocol]["protocol"] == protocol and reports[protocol]["images"] == 8
        assert "abs_rel" in (out / "eval.md").read_text()
    assert reports["median"]["metrics"] != reports["lstsq"]["metrics"]
    out = tmp_path / "cube"
    assert evaluate.main(["--model", "teacher-cube", "--teacher", "tiny-random", "--input-size", "56", "--height", "64",
                          "--shards", *val, "--out", str(out)]) == 0
    rep = json.loads((out / "eval.json").read_text())
    assert rep["model"].startswith("teacher-cube") and rep["images"] == 8


@pytest.fixture
def nan_checkpoint(tiny_run, tmp_path):
    """A copy of the tiny run's checkpoint whose weights hold one NaN, as a diverged run would save."""
    import shutil

    import torch

    from student.checkpoint import latest_checkpoint

    folder = tmp_path / "diverged"
    shutil.copytree(latest_checkpoint(tiny_run), folder)
    state = torch.load(folder / "model.pt", weights_only=True)
    name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[name].view(-1)[1] = float("nan")
    torch.save(state, folder / "model.pt")
    return folder, name


def test_predict_and_evaluate_refuse_a_nonfinite_checkpoint(nan_checkpoint, samples_dir, tmp_path, capsys):
    from sharding import cli

    folder, name = nan_checkpoint
    image = sorted((samples_dir / "indoor").glob("*.jpg"))[0]
    assert cli.run(predict.main, ["--checkpoint", str(folder), str(image), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert f"{folder / 'model.pt'}" in err and f"first: {name}" in err and "Traceback" not in err
    assert not (tmp_path / "p").exists()
    assert cli.run(evaluate.main, ["--checkpoint", str(folder), "--shards", str(image.parent),
                                   "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert f"{folder / 'model.pt'}" in err and f"first: {name}" in err


def test_predict_names_a_damaged_checkpoint_and_a_missing_input(tiny_run, tmp_path, capsys):
    import shutil

    from sharding import cli
    from student.checkpoint import latest_checkpoint

    folder = tmp_path / "damaged"
    shutil.copytree(latest_checkpoint(tiny_run), folder)
    data = bytearray((folder / "model.pt").read_bytes())
    mid = len(data) // 2
    data[mid:mid + 4096] = bytes(b ^ 0xFF for b in data[mid:mid + 4096])
    (folder / "model.pt").write_bytes(bytes(data))
    assert cli.run(predict.main, ["--checkpoint", str(folder), str(tmp_path), "--out", str(tmp_path / "p")]) == 2
    assert f"{folder / 'model.pt'} is damaged" in capsys.readouterr().err
    assert cli.run(predict.main, ["--checkpoint", str(tiny_run), str(tmp_path / "nope.jpg"),
                                  "--out", str(tmp_path / "p")]) == 2
    assert "nope.jpg does not exist" in capsys.readouterr().err
