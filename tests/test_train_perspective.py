"""Our own perspective teacher: toy training run, learning signal, and the committed checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from student.perspective_teacher.data import (MAX_TRAIN_VIEWS, TRAIN_SEED_BASE, VAL_SEED_BASE,
                                                  load_views, photometric_augment, render_view)
from student.perspective_teacher.train import (ARCHS, arch_multiple, build_model, ensure_output_spread,
                                                   evaluate_disparity, predict, train_loop, train_teacher)

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS_DIR = ROOT / "teacher_server" / "weights"
COMMITTED = [WEIGHTS_DIR / "pano-distill-perspective-v1", WEIGHTS_DIR / "pano-distill-perspective-v2"]


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: on a shared 2-core machine it is several times faster than two for these small models
    (and ``main`` sets it anyway); the previous setting is restored for the other tests."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def test_views_are_deterministic_disjoint_and_valid():
    rgb, depth, spec = render_view("train", 5, 32, seed=3)
    rgb2, depth2, _ = render_view("train", 5, 32, seed=3)
    assert np.array_equal(rgb, rgb2) and np.array_equal(depth, depth2)
    assert spec.scene_seed == TRAIN_SEED_BASE + 5 and 60 <= spec.fov <= 100 and abs(spec.pitch) <= 90
    assert render_view("val", 5, 32)[2].scene_seed == VAL_SEED_BASE + 5
    assert TRAIN_SEED_BASE + MAX_TRAIN_VIEWS <= VAL_SEED_BASE  # train scenes never reach the val scenes
    assert rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8
    assert (depth > 0).mean() >= 0.3 and np.isfinite(depth).all()


def test_broad_variety_changes_half_of_the_scenes_and_keeps_the_angles():
    changed = 0
    for i in range(12):
        rgb, depth, spec = render_view("train", i, 24, variety="broad")
        rgb_s, depth_s, spec_s = render_view("train", i, 24)
        assert np.array_equal(rgb, render_view("train", i, 24, variety="broad")[0])  # deterministic
        assert (spec.yaw, spec.pitch, spec.roll, spec.fov) == (spec_s.yaw, spec_s.pitch, spec_s.roll, spec_s.fov) \
            or (depth_s > 0).mean() < 0.3 or (depth > 0).mean() < 0.3  # redrawn angles only for a sky view
        changed += not np.array_equal(depth, depth_s)
        assert (depth > 0).mean() >= 0.3
    assert 2 <= changed <= 10  # about half (BROAD_FRACTION) drawn from broad_style
    with pytest.raises(ValueError, match="variety"):
        render_view("train", 0, 24, variety="wide")


def test_batch_targets_and_augmentation():
    views = load_views("train", 6, 32, cache_dir="", progress=False)
    b = views.batch(range(6), augment=True, generator=torch.Generator().manual_seed(0))
    assert b["pixel_values"].shape == (6, 3, 32, 32) and b["target"].shape == (6, 32, 32)
    t = b["target"][b["valid"]]
    assert torch.isfinite(t).all() and t.min() >= 0 and t.max() <= 1
    assert torch.isnan(b["target"][~b["valid"]]).all()
    # larger disparity = closer: the target is ordered opposite to depth
    d = b["depth"][0][b["valid"][0]]
    tt = b["target"][0][b["valid"][0]]
    assert tt[d.argmin()] == tt.max() and tt[d.argmax()] == tt.min()
    aug = photometric_augment(torch.rand(4, 3, 8, 8), torch.Generator().manual_seed(1))
    assert aug.min() >= 0 and aug.max() <= 1


def test_resample_blurs_rgb_like_a_half_size_face_and_keeps_the_target_sharp(monkeypatch):
    import student.perspective_teacher.data as data

    # photometric augmentation off, so that the RGB can be compared with the expected blur
    monkeypatch.setattr(data, "photometric_augment", lambda x, g=None: x)
    views = load_views("train", 8, 32, cache_dir="", progress=False)
    plain = views.batch(range(8))
    rgb = plain["rgb"]
    blurred = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(rgb, 2), size=(32, 32), mode="bicubic",
                                              align_corners=False).clamp(0, 1)

    def run(p):
        return views.batch(range(8), augment=True, generator=torch.Generator().manual_seed(2), resample=p)

    always, never = run(1.0), run(0.0)
    unflip = lambda b: torch.where((b["depth"] == plain["depth"]).all(-1).all(-1).view(-1, 1, 1, 1),  # noqa: E731
                                   b["rgb"], b["rgb"].flip(-1))
    assert torch.allclose(unflip(always), blurred, atol=1e-6)  # every view halved and resized back
    assert torch.allclose(unflip(never), rgb)  # p = 0 leaves the RGB alone
    assert not torch.allclose(blurred, rgb, atol=1e-3)
    for b in (always, never):  # depth and target are the sharp ones (up to the shared horizontal flip)
        same = (b["depth"] == plain["depth"]).all(-1).all(-1)
        assert torch.equal(torch.where(same.view(-1, 1, 1), b["depth"], b["depth"].flip(-1)), plain["depth"])


def test_toy_run_saves_a_folder_that_loads_like_any_teacher(tmp_path, offline):
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    out = tmp_path / "teacher"
    info = train_teacher(["--out", str(out), "--views", "12", "--val-views", "4", "--size", "64", "--width", "tiny",
                 "--steps", "3", "--batch-size", "4", "--cache", "", "--quiet", "--resample", "0.5"])
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "pano_distill.json",
                 "README.md", "loss_curve.png", "metrics.jsonl"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "pano_distill.json").read_text())
    assert meta["input_size"] == 64 and meta["command"].startswith("python -m student.perspective_teacher.train")
    assert np.isfinite(meta["val_abs_rel"]) and set(meta) == set(info)
    assert set(meta["baselines"]) == {"random_init", "constant", "mean_train_disparity"}
    assert meta["train"]["resample"] == 0.5 and "50% of the views the RGB was halved" in (out / "README.md").read_text()
    model = AutoModelForDepthEstimation.from_pretrained(out)
    proc = AutoImageProcessor.from_pretrained(out)
    assert list(proc.image_mean) == pytest.approx(meta["image_mean"])
    x = proc(images=[np.zeros((50, 70, 3), np.uint8)] * 2, return_tensors="pt")["pixel_values"]
    assert x.shape == (2, 3, 64, 64)
    with torch.no_grad():
        y = model(pixel_values=torch.randn(2, 3, 64, 64)).predicted_depth
    assert y.shape == (2, 64, 64) and torch.isfinite(y).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_builds_small_models_with_disparity_output(arch):
    size = 4 * arch_multiple(arch)
    model = build_model(arch, size, "tiny")
    assert sum(p.numel() for p in model.parameters()) < 250_000
    x = torch.randn(2, 3, size, size)
    ensure_output_spread(model, x)
    with torch.no_grad():
        y = model(pixel_values=x).predicted_depth
    assert y.shape == (2, size, size) and torch.isfinite(y).all() and (y > 0).any()
    # the affine-invariant loss only trains maps that vary by more than 1e-6
    assert (y.flatten(1) - y.flatten(1).median(dim=1, keepdim=True).values).abs().mean() > 1e-5
    small = build_model(arch, 8 * arch_multiple(arch), "small")
    assert sum(p.numel() for p in small.parameters()) < 1_300_000  # <= ~5 MB of fp32 safetensors
    with pytest.raises(ValueError, match="multiple"):
        build_model(arch, 4 * arch_multiple(arch) + 2)


def test_loss_decreases_on_a_fixed_small_set():
    torch.manual_seed(0)
    views = load_views("train", 8, 64, cache_dir="", progress=False)
    model = build_model("dpt_hybrid", 64, "tiny")
    before = evaluate_disparity(predict(model, views), views)["loss"]
    hist = train_loop(model, views, None, seconds=1e9, max_steps=40, batch_size=8, lr=3e-3, warmup=5,
                      augment=False, progress=False)
    after = evaluate_disparity(predict(model, views), views)["loss"]
    assert hist["steps"] == 40 and all(np.isfinite(hist["loss"]))
    assert after < 0.9 * before, (before, after)


@pytest.mark.parametrize("WEIGHTS", COMMITTED, ids=lambda p: p.name)
def test_committed_checkpoint_beats_trivial_baselines(offline, WEIGHTS):
    if not (WEIGHTS / "pano_distill.json").is_file():
        pytest.skip(f"committed teacher checkpoint {WEIGHTS.name} not present")
    from transformers import AutoConfig, AutoModelForDepthEstimation

    meta = json.loads((WEIGHTS / "pano_distill.json").read_text())
    size = int(meta["input_size"])
    model = AutoModelForDepthEstimation.from_pretrained(WEIGHTS).eval()
    total = sum(p.stat().st_size for p in WEIGHTS.iterdir())
    assert total <= 5_000_000, f"committed teacher folder is {total} bytes"
    # held-out scenes, viewpoints other than those of the recorded validation (seed 7)
    views = load_views("val", 12, size, seed=7, cache_dir="", progress=False)
    pred = predict(model, views)
    assert pred.shape == (12, size, size) and torch.isfinite(pred).all()
    ours = evaluate_disparity(pred, views)
    torch.manual_seed(0)
    random_init = AutoModelForDepthEstimation.from_config(AutoConfig.from_pretrained(WEIGHTS))
    rnd = evaluate_disparity(predict(random_init, views), views)
    const = evaluate_disparity(torch.full_like(pred, 0.5), views)
    assert ours["abs_rel"] < 0.7 * min(rnd["abs_rel"], const["abs_rel"]), (ours, rnd, const)
    assert ours["delta1"] > max(rnd["delta1"], const["delta1"])
    assert ours["loss"] < 0.7 * min(rnd["loss"], const["loss"])
