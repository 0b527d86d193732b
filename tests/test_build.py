"""``python -m sharding.build``: layouts, units, splits, bad inputs, manifest, overwrite (CPU, tiny trees)."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from sharding import build as build_mod
from sharding import cli
from sharding.build import BuildError, build, main, make_parser
from sharding.format import MAX_DEPTH_MM, SampleError, make_key, metres_to_mm, scaled_to_mm
from sharding.manifest import sha256_file
from sharding.stream import make_loader, read_samples

H, W = 8, 16


def _rgb(seed: int, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR) if arr.ndim == 3 else arr
    assert cv2.imwrite(str(path), a)


def _depth_u16(value: int, h: int = H, w: int = W) -> np.ndarray:
    d = np.full((h, w), value, np.uint16)
    d[0, 0] = 0  # invalid pixel
    return d


def _by_key(out: Path, split: str) -> dict[str, dict]:
    return {s["key"]: s for s in read_samples(out / "manifest.json", split=split)}


# ------------------------------------------------------------------------------------- units

def test_depth_conversions_and_keys():
    mm, n = metres_to_mm(np.array([[0.0, 1.2344, 65.534, 70.0, np.inf]], np.float32))
    assert mm.dtype == np.uint16 and mm.tolist() == [[0, 1234, 65534, 0, 0]] and n == 2
    with pytest.raises(SampleError) as e:
        metres_to_mm(np.array([[1.0, np.nan]]))
    assert e.value.reason == "nan_depth"
    with pytest.raises(SampleError) as e:
        metres_to_mm(np.array([[1.0, -0.5]]))
    assert e.value.reason == "negative_depth"
    # Stanford2D3D: 1/512 m, 65535 invalid; 40000 units = 78.1 m is beyond uint16 mm -> invalid, counted
    mm, n = scaled_to_mm(np.array([[512, 65535, 40000, 0]], np.uint16), 1 / 512, 65535)
    assert mm.tolist() == [[1000, 0, 0, 0]] and n == 1
    mm, n = scaled_to_mm(np.array([[4000, 6000]], np.uint16), 1 / 4000)
    assert mm.tolist() == [[1000, 1500]] and n == 0
    assert make_key("mp3d", "17DRP5sb8fy", "abc123") == "mp3d-17DRP5sb8fy-abc123"
    k1, k2 = make_key("folder", "a-b", "c"), make_key("folder", "a", "b-c")
    assert k1 != k2 and "." not in k1 and k1.startswith("folder-a_b-c-")
    assert make_key("folder", "x.y z") == make_key("folder", "x.y z")  # stable


# ------------------------------------------------------------------------------------ layouts

def test_matterport3d_units_and_split_lists(tmp_path):
    root = tmp_path / "mp3d"
    panos = {"train": [("sceneA", "p0", 4000), ("sceneA", "p1", 6000)], "val": [("sceneB", "p2", 8000)],
             "test": [("sceneC", "p3", 2000)]}
    for split, rows in panos.items():
        lines = []
        for i, (scene, pano, val) in enumerate(rows):
            if split == "test":  # UniFuse's own list format: two paths, skybox-stitched folders
                _write_png(root / scene / "pano_skybox_color" / f"{pano}.png", _rgb(i))
                _write_png(root / scene / "pano_depth" / f"{pano}.png", _depth_u16(val))
                lines.append(f"{scene}/pano_skybox_color/{pano}.png {scene}/pano_depth/{pano}.png")
            else:
                _write_png(root / scene / f"{pano}_rgb.png", _rgb(i))
                _write_png(root / scene / f"{pano}_depth.png", _depth_u16(val))
                lines.append(f"{scene} {pano}")
        (root / f"mp3d_{split}.txt").write_text("# scene pano\n" + "\n".join(lines) + "\n")
    (root / "mp3d_train.txt").write_text((root / "mp3d_train.txt").read_text() + "sceneA missing\nbad line x\n")
    out = tmp_path / "out"
    m = build("matterport3d", root, out, progress=False)
    assert {s: v["count"] for s, v in m["splits"].items()} == {"train": 2, "val": 1, "test": 1}
    assert m["skipped"] == {"bad_list_line": 1, "missing_rgb": 1}
    assert any("missing" in d["path"] for d in m["skipped_samples"])
    for split, rows in panos.items():
        got = _by_key(out, split)
        for scene, pano, val in rows:
            s = got[f"mp3d-{scene}-{pano}"]
            assert s["meta"]["split"] == split and s["meta"]["source"] == "matterport3d"
            d = s["depth"][0]
            assert d[0, 0] == 0 and not s["valid"][0, 0, 0]
            torch.testing.assert_close(d[1:, 1:], torch.full_like(d[1:, 1:], val / 4000.0))
    # no lists -> a message that says where it looked and what to do
    (root / "mp3d_train.txt").unlink(), (root / "mp3d_val.txt").unlink(), (root / "mp3d_test.txt").unlink()
    with pytest.raises(ValueError, match="matterport3d_.*train.*--split-list"):
        build("matterport3d", root, tmp_path / "out2", progress=False)


def test_stanford2d3d_units_invalid_and_fold1(tmp_path):
    root = tmp_path / "s2d3d"
    areas = {"area_1": "train", "area_6": "train", "area_5a": "test", "area_5b": "test"}
    for i, area in enumerate(areas):
        name = f"camera_{i}_office_1_frame_equirectangular_domain"
        _write_png(root / area / "pano" / "rgb" / f"{name}_rgb.png", _rgb(i))
        d = _depth_u16(512 * (i + 1))
        d[1, 1], d[1, 2] = 65535, 40000  # invalid marker; 78 m is beyond 65.534 m -> invalid, counted
        _write_png(root / area / "pano" / "depth" / f"{name}_depth.png", d)
    _write_png(root / "area_2" / "pano" / "rgb" / "camera_x_rgb.png", _rgb(9))  # no depth file
    out = tmp_path / "out"
    m = build("stanford2d3d", root, out, progress=False)
    assert {s: v["count"] for s, v in m["splits"].items()} == {"train": 2, "test": 2}
    assert m["skipped"] == {"missing_depth": 1}
    assert m["skipped_samples"][0]["path"] == "area_2/pano/rgb/camera_x_rgb.png"
    assert m["depth_clipped"] == {"pixels": 4, "samples": 4, "max_mm": MAX_DEPTH_MM}
    for i, (area, split) in enumerate(areas.items()):
        s = _by_key(out, split)[f"s2d3d-{area}-camera_{i}_office_1_frame_equirectangular_domain"]
        d = s["depth"][0]
        assert d[0, 0] == 0 and d[1, 1] == 0 and d[1, 2] == 0
        assert not s["valid"][0, 1, 1] and not s["valid"][0, 1, 2] and s["valid"][0, 2, 2]
        assert d[2, 2].item() == pytest.approx(i + 1.0, abs=1e-6)
    with pytest.raises(ValueError, match="has no 'val' split.*--split-list"):
        build("stanford2d3d", root, tmp_path / "o3", split="val", progress=False)
    # explicit split lists (UniFuse format: rgb path, depth path)
    lst = tmp_path / "s2d3d_val.txt"
    lst.write_text("area_6/pano/rgb/camera_1_office_1_frame_equirectangular_domain_rgb.png "
                   "area_6/pano/depth/camera_1_office_1_frame_equirectangular_domain_depth.png\n")
    m = build("stanford2d3d", root, tmp_path / "o4", split_lists={"val": str(lst)}, progress=False)
    assert list(m["splits"]) == ["val"] and m["splits"]["val"]["count"] == 1


def test_structured3d_units_scene_splits_and_size_mismatch(tmp_path):
    root = tmp_path / "Structured3D"
    scenes = {"scene_00007": "train", "scene_03001": "val", "scene_03250": "test", "scene_03499": "test"}
    for i, scene in enumerate(scenes):
        full = root / scene / "2D_rendering" / f"{100 + i}" / "panorama" / "full"
        _write_png(full / "rgb_rawlight.png", _rgb(i))
        _write_png(full / "depth.png", _depth_u16(1234 + i))
    bad = root / "scene_00008" / "2D_rendering" / "5" / "panorama" / "full"
    _write_png(bad / "rgb_rawlight.png", _rgb(5))
    _write_png(bad / "depth.png", _depth_u16(1000, H * 2, W * 2))  # depth size mismatch
    out = tmp_path / "out"
    m = build("structured3d", tmp_path, out, samples_per_shard=1, progress=False)  # finds <input>/Structured3D
    assert {s: v["count"] for s, v in m["splits"].items()} == {"train": 1, "val": 1, "test": 2}
    assert m["skipped"] == {"depth_size_mismatch": 1}
    assert "scene_00008" in m["skipped_samples"][0]["path"]
    assert [s["path"] for s in m["splits"]["test"]["shards"]] == ["test-000000.tar", "test-000001.tar"]
    for i, (scene, split) in enumerate(scenes.items()):
        s = _by_key(out, split)[f"s3d-{scene}-{100 + i}"]
        assert s["depth"][0, 3, 3].item() == pytest.approx((1234 + i) / 1000.0, abs=1e-6)
    m = build("structured3d", tmp_path, tmp_path / "val_only", split="val", progress=False)
    assert list(m["splits"]) == ["val"]


def test_generated_source_depth_mask_and_reproducible_shards(tmp_path):
    synthetic = pytest.importorskip("sharding.synthetic")
    out = tmp_path / "gen"
    m = build("generated", None, out, count=3, style="house", height=16, seed=10, watermark=True,
              samples_per_shard=2, progress=False)
    assert m["splits"]["train"]["count"] == 3 and m["input"] is None
    for sh in m["splits"]["train"]["shards"]:
        assert sha256_file(out / sh["path"]) == sh["sha256"]
    got = _by_key(out, "train")
    assert sorted(got) == ["gen-house-10-wm", "gen-house-11-wm", "gen-house-12-wm"]
    ref = synthetic.generate_panorama(11, "house", 16, watermark=True)
    s = got["gen-house-11-wm"]
    d = torch.from_numpy(ref["depth"])
    torch.testing.assert_close(s["depth"][0], d, atol=6e-4, rtol=0)
    assert torch.equal(s["valid"][0], torch.from_numpy(ref["valid"]) & (d > 0))
    assert torch.equal((s["rgb"] * 255).round().to(torch.uint8).permute(1, 2, 0), torch.from_numpy(ref["rgb"]))
    # rebuilding gives byte-identical shards (stable order, fixed tar mtimes)
    m2 = build("generated", None, out, count=3, style="house", height=16, seed=10, watermark=True,
               samples_per_shard=2, overwrite=True, progress=False)
    assert [s["sha256"] for s in m2["splits"]["train"]["shards"]] == [s["sha256"] for s in
                                                                      m["splits"]["train"]["shards"]]


def test_real_samples_folder_build_then_stream_with_masks(samples_dir, tmp_path):
    out = tmp_path / "real"
    assert main(["--source", "folder", "--input", str(samples_dir), "--out", str(out),
                 "--samples-per-shard", "6", "--quiet"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["splits"]["train"]["count"] == 12 and m["skipped"] == {}  # the 6 *_valid.png are masks, not panoramas
    # original bytes are kept as given
    members = {}
    for sh in m["splits"]["train"]["shards"]:
        with tarfile.open(out / sh["path"]) as tf:
            members.update({ti.name: tf.extractfile(ti).read() for ti in tf})
    assert members["folder-indoor-pano_aaapkmsqwhxujq_rgb.rgb.jpg"] == \
        (samples_dir / "indoor" / "pano_aaapkmsqwhxujq_rgb.jpg").read_bytes()
    assert members["folder-outdoor-b0.rgb.png"] == (samples_dir / "outdoor" / "b0.png").read_bytes()
    assert "folder-outdoor-b0.mask.png" in members and "folder-indoor-pano_aaapkmsqwhxujq_rgb.mask.png" not in members
    loader = make_loader(out, batch_size=2, num_workers=2, height=64, shuffle=0)
    seen = {}
    for batch in loader:
        for i, k in enumerate(batch["key"]):
            seen[k] = batch["valid"][i, 0]
            assert batch["rgb"].shape[1:] == (3, 64, 128) and "depth" not in batch
    assert len(seen) == 12
    ref = cv2.imread(str(samples_dir / "outdoor" / "b0_valid.png"), cv2.IMREAD_GRAYSCALE) >= 128
    ref = cv2.resize(ref.astype(np.uint8), (128, 64), interpolation=cv2.INTER_NEAREST).astype(bool)
    assert torch.equal(seen["folder-outdoor-b0"], torch.from_numpy(ref)) and 0.05 < ref.mean() < 0.95
    assert seen["folder-indoor-pano_aaapkmsqwhxujq_rgb"].all()


# -------------------------------------------------------------------------------- bad inputs

def test_bad_inputs_are_skipped_counted_and_named(tmp_path, monkeypatch):
    root = tmp_path / "in"
    for i in range(4):
        _write_png(root / f"good{i}.png", _rgb(i))
    ok, jpg = cv2.imencode(".jpg", _rgb(7, 32, 64))
    (root / "corrupt.jpg").write_bytes(jpg.tobytes()[: len(jpg) // 2])  # truncated JPEG
    (root / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    _write_png(root / "wide.png", _rgb(8, 8, 24))  # 3:1
    _write_png(root / "sub" / "good4.jpg", _rgb(4))
    _write_png(root / "good0_valid.png", np.full((4, 4), 255, np.uint8))  # mask of the wrong size
    out = tmp_path / "out"
    m = build("folder", root, out, progress=False)
    assert m["splits"]["train"]["count"] == 4
    assert m["skipped"] == {"mask_size_mismatch": 1, "not_2to1": 1, "unreadable_image": 2}
    named = {d["path"]: d["reason"] for d in m["skipped_samples"]}
    assert named == {"corrupt.jpg": "unreadable_image", "garbage.png": "unreadable_image", "wide.png": "not_2to1",
                     "good0.png": "mask_size_mismatch"}
    assert sorted(_by_key(out, "train")) == ["folder-good1", "folder-good2", "folder-good3", "folder-sub-good4"]
    summary = build_mod.format_summary(m, out)
    assert "not_2to1: 1 (wide.png)" in summary and "train" in summary

    # NaN / negative depth from a float source (the generator, with one bad scene injected)
    synthetic = pytest.importorskip("sharding.synthetic")
    real = synthetic.generate_panorama

    def faulty(seed, style="apartment", height=256, **kw):
        out = real(seed, style, height, **kw)
        if seed == 1:
            out["depth"][2, 3] = np.nan
        if seed == 2:
            out["depth"][0, 0] = -1.0
        return out

    monkeypatch.setattr(synthetic, "generate_panorama", faulty)
    m = build("generated", None, tmp_path / "gen", count=4, height=8, progress=False)
    assert m["splits"]["train"]["count"] == 2
    assert m["skipped"] == {"nan_depth": 1, "negative_depth": 1}
    assert {d["path"] for d in m["skipped_samples"]} == {"generated/apartment/1", "generated/apartment/2"}


def test_overwrite_refusal_and_cli(tmp_path, capsys):
    root = tmp_path / "in"
    for i in range(5):
        _write_png(root / f"p{i}.png", _rgb(i))
    out = tmp_path / "out"
    assert main(["--source", "folder", "--input", str(root), "--out", str(out), "--samples-per-shard", "2",
                 "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "5 samples" in text and "3 shard(s)" in text
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train-000000.tar", "train-000001.tar",
                                                     "train-000002.tar"]
    assert cli.run(main, ["--source", "folder", "--input", str(root), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--overwrite" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(BuildError, match="refusing"):
        build("folder", root, out, progress=False)
    # an interrupted build (shards, no manifest) is refused as well
    (out / "manifest.json").unlink()
    with pytest.raises(BuildError, match="interrupted"):
        build("folder", root, out, progress=False)
    assert main(["--source", "folder", "--input", str(root), "--out", str(out), "--samples-per-shard", "10",
                 "--overwrite", "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train-000000.tar"]  # stale shards gone
    m = json.loads((out / "manifest.json").read_text())
    assert m["tool"] == "sharding.build" and m["version"] and m["source"] == "folder"
    assert m["input"] == str(root.resolve()) and m["splits"]["train"]["shards"][0]["count"] == 5
    digest = hashlib.sha256((out / "train-000000.tar").read_bytes()).hexdigest()
    assert m["splits"]["train"]["shards"][0]["sha256"] == digest
    help_text = make_parser().format_help()
    for needle in ("mp3d_{train,val,test}.txt", "matterport3d_{train,val,test}.txt", "area_*/pano/rgb",
                   "rgb_rawlight.png", "_valid.png", "1/4000 m", "--count"):
        assert needle in help_text
    assert cli.run(main, ["--source", "generated", "--out", str(tmp_path / "g"), "--quiet"]) == 2  # no --count
    assert "--count" in capsys.readouterr().err
    # a user's own file in --out survives an --overwrite; no temporary folder is left beside it
    (out / "NOTES.txt").write_text("mine")
    assert main(["--source", "folder", "--input", str(root), "--out", str(out), "--overwrite", "--quiet"]) == 0
    assert (out / "NOTES.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


def test_overwrite_with_all_bad_input_keeps_the_previous_build(tmp_path, capsys):
    root, bad = tmp_path / "in", tmp_path / "bad"
    for i in range(3):
        _write_png(root / f"p{i}.png", _rgb(i))
        (bad / f"broken{i}.png").parent.mkdir(parents=True, exist_ok=True)
        (bad / f"broken{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)  # undecodable
    out = tmp_path / "out"
    assert main(["--source", "folder", "--input", str(root), "--out", str(out), "--samples-per-shard", "2",
                 "--quiet"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["manifest.json", "train-000000.tar", "train-000001.tar"]
    capsys.readouterr()
    rc = cli.run(main, ["--source", "folder", "--input", str(bad), "--out", str(out), "--overwrite", "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "no sample was written" in err and "unreadable_image=3" in err and str(out) in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # old manifest and shards intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "in", "out"]  # temporary folder removed
    assert len(list(read_samples(out / "manifest.json"))) == 3

    # an error in the middle of writing (here: the sink fails on its second shard) leaves --out as it was
    real_write = build_mod._ShardSink.write

    def failing(self, sample):
        if len(self.shards) == 1:
            raise OSError("disk full")
        real_write(self, sample)

    build_mod._ShardSink.write = failing
    try:
        with pytest.raises(OSError, match="disk full"):
            build("folder", root, out, samples_per_shard=1, overwrite=True, progress=False)
    finally:
        build_mod._ShardSink.write = real_write
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "in", "out"]
