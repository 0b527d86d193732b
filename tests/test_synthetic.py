"""Tests of the generated scenes (sharding.synthetic): determinism, masks, geometry, styles, colour."""

import json
import math

import numpy as np
import pytest
import torch

from panorama import (FACE_ROTATIONS, equirect_directions, equirect_to_cube, equirect_to_planar_faces,
                      random_rotations, rotation_matrix)
from sharding.synthetic import (CAMERA_CLEARANCE, STYLE_PARAMS, STYLES, WATERMARK_LAT_DEG, Style,
                                generate_panorama, make_scene, render_panorama, render_perspective)
from sharding.synthetic_scenes import broad_style


def _latitudes(h):
    return 90.0 - (np.arange(h) + 0.5) / h * 180.0


def test_styles_exposed():
    assert {"apartment", "house", "office"} <= set(STYLES)
    for name in STYLES:
        assert isinstance(STYLE_PARAMS[name], Style) and STYLE_PARAMS[name].name == name
        with pytest.raises(Exception):
            STYLE_PARAMS[name].room_w = (1.0, 2.0)  # frozen


def test_determinism():
    a = generate_panorama(5, "house", 32, watermark=True)
    b = generate_panorama(5, "house", 32, watermark=True)
    for key in ("rgb", "depth", "valid"):
        assert a[key].tobytes() == b[key].tobytes()
    assert a["meta"] == b["meta"]
    c = generate_panorama(6, "house", 32, watermark=True)
    d = generate_panorama(5, "apartment", 32, watermark=True)
    assert not np.array_equal(a["depth"], c["depth"]) and not np.array_equal(a["rgb"], c["rgb"])
    assert not np.array_equal(a["depth"], d["depth"])


def test_shapes_dtypes_and_valid_depth():
    scene = make_scene(1, "apartment")
    rgb, depth, valid = render_panorama(scene, 64)
    assert rgb.shape == (64, 128, 3) and rgb.dtype == np.uint8
    assert depth.shape == (64, 128) and depth.dtype == np.float32
    assert valid.shape == (64, 128) and valid.dtype == bool
    assert np.array_equal(depth > 0, valid)
    assert np.isfinite(depth).all()
    prgb, pdepth, pvalid = render_perspective(scene, torch.eye(3), 17, fov_deg=70.0)
    assert prgb.shape == (17, 17, 3) and prgb.dtype == np.uint8
    assert pdepth.shape == (17, 17) and pdepth.dtype == np.float32 and pvalid.dtype == bool
    assert np.array_equal(pdepth > 0, pvalid)
    # Watermarked: valid pixels keep depth > 0, and the extra invalid pixels keep their floor depth.
    _, wdepth, wvalid = render_panorama(scene, 64, watermark=True)
    assert np.array_equal(wdepth, depth)
    assert (wdepth[wvalid] > 0).all()
    assert ((wdepth > 0) & ~wvalid).any()


@pytest.mark.parametrize("style", STYLES)
def test_camera_clearance(style):
    for seed in range(4):
        scene = make_scene(seed, style, windows=False)
        cam, size = scene.camera, scene.size
        assert (cam >= CAMERA_CLEARANCE).all() and (size - cam >= CAMERA_CLEARANCE).all()
        # Every surface is at least the clearance away: the nearest hit over a dense sphere of rays.
        _, depth, valid = render_panorama(scene, 64)
        assert valid.all() and depth.min() >= CAMERA_CLEARANCE
        outside = (cam < scene.box_lo - CAMERA_CLEARANCE) | (cam > scene.box_hi + CAMERA_CLEARANCE)
        assert outside.any(axis=1).all()
        for cx, cz, r, _, _ in scene.cylinders:
            assert math.hypot(cam[0] - cx, cam[2] - cz) >= r + CAMERA_CLEARANCE


def test_windows_show_invalid_sky():
    n_sky = 0
    for seed in range(4):
        scene = make_scene(seed, "house", windows=True)
        assert len(scene.windows) >= 1
        rgb, depth, valid = render_panorama(scene, 64)
        sky = ~valid
        assert (depth[sky] == 0).all() and (depth[valid] > 0).all()
        n_sky += int(sky.sum())
        # Sky is seen only where a ray meets a wall: never straight up or down.
        lat = _latitudes(64)
        assert not sky[np.abs(lat) > 60].any()
        _, d2, v2 = render_panorama(make_scene(seed, "house", windows=False), 64)
        assert v2.all() and (d2 > 0).all()
    assert n_sky > 50


def test_watermark_masks_the_nadir_only():
    scene = make_scene(2, "apartment", windows=False)
    rgb, depth, valid = render_panorama(scene, 128)
    wrgb, wdepth, wvalid = render_panorama(scene, 128, watermark=True)
    lat = _latitudes(128)[:, None].repeat(256, axis=1)
    masked = valid & ~wvalid
    assert masked.any()
    assert (lat[masked] < WATERMARK_LAT_DEG + 1.0).all()  # only near the nadir ...
    assert masked[lat < WATERMARK_LAT_DEG - 3.0].all()  # ... and all of it
    assert np.array_equal(wdepth, depth)  # depth stays the true floor depth
    assert np.array_equal(wrgb[~masked], rgb[~masked])
    assert not np.array_equal(wrgb[masked], rgb[masked])
    logo = wrgb[masked].astype(int)
    assert (logo.max(axis=1) < 50).mean() > 0.3  # a dark disc ...
    assert (logo.min(axis=1) > 230).any() and ((logo[:, 0] > 200) & (logo[:, 2] < 90)).any()  # ring, letters


def _discontinuities(depth, rel=0.08, grow=2):
    """Pixels next to a jump in depth (relative step > ``rel``), dilated by ``grow`` pixels."""
    jump = np.zeros(depth.shape, dtype=bool)
    dy = np.abs(np.diff(depth, axis=0)) / np.minimum(depth[1:], depth[:-1])
    dx = np.abs(np.diff(depth, axis=1)) / np.minimum(depth[:, 1:], depth[:, :-1])
    jump[1:] |= dy > rel
    jump[:-1] |= dy > rel
    jump[:, 1:] |= dx > rel
    jump[:, :-1] |= dx > rel
    t = torch.from_numpy(jump.astype(np.float32))[None, None]
    return torch.nn.functional.max_pool2d(t, 2 * grow + 1, stride=1, padding=grow)[0, 0].numpy() > 0


@pytest.mark.parametrize("style", ["apartment", "office"])
def test_panorama_depth_matches_perspective_planar_depth(style):
    scene = make_scene(3, style, windows=False)
    _, depth, valid = render_panorama(scene, 256)
    assert valid.all()
    eq = torch.from_numpy(depth)[None, None]
    rotations = random_rotations(3, generator=torch.Generator().manual_seed(0))
    f = 64
    for rot in rotations:
        planar = equirect_to_planar_faces(eq, f, rotation=rot, quantity="depth")[0, :, 0].numpy()
        radial = equirect_to_cube(eq, f, rotation=rot)[0, :, 0].numpy()
        for k in range(6):
            _, pdepth, pvalid = render_perspective(scene, rot @ FACE_ROTATIONS[k], f)
            assert pvalid.all()
            keep = ~_discontinuities(pdepth)
            keep[:2], keep[-2:], keep[:, :2], keep[:, -2:] = False, False, False, False
            assert keep.mean() > 0.3
            err = np.abs(planar[k] - pdepth) / pdepth
            assert np.median(err[keep]) <= 0.01, (k, np.median(err[keep]))
            # Control: radial depth taken as planar is off by sqrt(1 + a^2 + b^2) away from the centre.
            assert np.median((np.abs(radial[k] - pdepth) / pdepth)[keep]) > 0.05


def test_perspective_colour_matches_panorama():
    h = 64
    scene = make_scene(4, "house")
    rgb, depth, valid = render_panorama(scene, h)
    dirs = equirect_directions(h, 2 * h, dtype=torch.float64).numpy()
    # The front face's centre looks at +z; the panorama's central pixel is half a pixel off it, so aim the
    # perspective camera exactly at that pixel's ray, then at a few more pixels.
    rng = np.random.default_rng(0)
    pixels = [(h // 2, h)] + [(int(rng.integers(0, h)), int(rng.integers(0, 2 * h))) for _ in range(40)]
    mismatches = 0
    for i, j in pixels:
        x, y, z = dirs[i, j]
        rot = rotation_matrix(math.degrees(math.atan2(x, z)), math.degrees(math.asin(y)), 0.0, dtype=torch.float64)
        prgb, pdepth, pvalid = render_perspective(scene, rot, 3, fov_deg=1.0)
        same = (np.abs(prgb[1, 1].astype(int) - rgb[i, j]).max() <= 1 and pvalid[1, 1] == valid[i, j]
                and abs(float(pdepth[1, 1]) - float(depth[i, j])) <= 1e-4 * max(float(depth[i, j]), 1.0))
        mismatches += not same
        if (i, j) == pixels[0]:
            assert same
    assert mismatches <= 1
    # And with a plain front view (odd size: a pixel exactly at the optical axis), the image centre is
    # between the panorama's four central pixels in colour.
    frgb, fdepth, _ = render_perspective(scene, torch.eye(3), 33)
    block = rgb[h // 2 - 1:h // 2 + 1, h - 1:h + 1].reshape(-1, 3).astype(int)
    assert (frgb[16, 16] >= block.min(0) - 2).all() and (frgb[16, 16] <= block.max(0) + 2).all()


def test_styles_differ_in_distribution():
    stats = {}
    for style in ("apartment", "house", "office"):
        area, mean_depth, warm = [], [], []
        for seed in range(10):
            out = generate_panorama(seed, style, 32)
            w, _, d = out["meta"]["room_size"]
            area.append(w * d)
            mean_depth.append(out["depth"][out["valid"]].mean())
            rgb = out["rgb"].astype(np.float64) / 255.0
            warm.append((rgb[..., 0] - rgb[..., 2])[out["valid"]].mean())
        stats[style] = np.mean(area), np.mean(mean_depth), np.mean(warm)
    assert stats["office"][0] > 2.0 * stats["apartment"][0]
    assert stats["office"][1] > 1.2 * stats["apartment"][1]
    assert 0.5 < stats["house"][0] / stats["apartment"][0] < 2.0  # similar geometry ...
    assert stats["apartment"][2] > stats["house"][2] + 0.08  # ... different colours (warm vs cool)


def test_meta_is_json_and_describes_the_scene():
    out = generate_panorama(0, "office", 16, watermark=True)
    meta = json.loads(json.dumps(out["meta"]))
    assert meta["seed"] == 0 and meta["style"] == "office" and meta["watermark"] is True
    assert len(meta["room_size"]) == 3 and meta["n_objects"] >= 1 and meta["depth_kind"] == "radial"
    assert (meta["height"], meta["width"]) == out["depth"].shape


def test_bad_arguments():
    scene = make_scene(0)
    with pytest.raises(ValueError, match="style"):
        make_scene(0, "castle")
    with pytest.raises(ValueError, match="style"):
        generate_panorama(0, "castle", 16)
    with pytest.raises(ValueError, match="width"):
        render_panorama(scene, 16, 30)
    with pytest.raises(ValueError, match="size"):
        render_perspective(scene, np.eye(3), 1)
    with pytest.raises(ValueError, match="rotation"):
        render_perspective(scene, np.eye(4), 8)
    with pytest.raises(ValueError, match="fov"):
        render_perspective(scene, np.eye(3), 8, fov_deg=180.0)


def test_broad_styles_are_deterministic_reach_beyond_the_named_ones_and_render():
    a, b = broad_style(np.random.default_rng(3)), broad_style(np.random.default_rng(3))
    assert a == b and a.name in STYLES
    styles = [broad_style(np.random.default_rng(i)) for i in range(60)]
    named = STYLE_PARAMS.values()
    # room sizes and clutter outside every named style's range: small halls, empty rooms, crowded rooms
    assert min(s.room_w[0] for s in styles) < min(n.room_w[0] for n in named)
    assert max(s.room_h[1] for s in styles) > max(n.room_h[1] for n in named)
    assert min(s.n_furniture[1] for s in styles) < min(n.n_furniture[0] for n in named)
    assert max(s.n_furniture[1] for s in styles) > max(n.n_furniture[1] for n in named)
    assert len({s.lamp_shape for s in styles}) == 2 and len({s.light_rgb for s in styles}) == 60
    for i, st in enumerate(styles[:6]):  # a scene drawn from one keeps the camera clear of every surface
        scene = make_scene(i, st, windows=True)
        assert scene.style == st.name
        cam, size = scene.camera, scene.size
        assert (cam >= CAMERA_CLEARANCE).all() and (size - cam >= CAMERA_CLEARANCE).all()
        _, depth, valid = render_panorama(scene, 32)
        assert valid.mean() > 0.5 and depth[valid].min() >= CAMERA_CLEARANCE
        again = make_scene(i, st, windows=True)
        assert np.array_equal(again.box_lo, scene.box_lo) and np.array_equal(again.lights, scene.lights)
