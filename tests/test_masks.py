"""Offline masks: the run over shards (tiny random models), resume, bad samples, imports, Ray Data."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from sharding import cli
from sharding import masks as M
from sharding.mask_store import MaskStore
from sharding.grounding_dino import Box, load_grounding_dino
from sharding.sam import load_sam, resolve_sam_checkpoint
from sharding.segmenters import TINY_RANDOM, MaskerConfig, MaskResult

TINY = MaskerConfig(detector=TINY_RANDOM, sam=TINY_RANDOM, device="cpu")


# ------------------------------------------------------------------------------------ helpers
def _encode(arr: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def panos() -> list[np.ndarray]:
    from conftest import sample_panoramas

    return sample_panoramas(8)


def _sample(key: str, rgb: np.ndarray, mask: np.ndarray | None = None, fmt: str = "jpg") -> dict:
    s = {"__key__": key, f"rgb.{fmt}": _encode(rgb, "JPEG" if fmt == "jpg" else "PNG"),
         "meta.json": json.dumps({"key": key, "height": rgb.shape[0], "width": rgb.shape[1]}).encode()}
    if mask is not None:
        s["mask.png"] = _encode(np.where(mask, 255, 0).astype(np.uint8), "PNG")
    return s


def _write_shard(path: Path, samples: list[dict]) -> str:
    import webdataset as wds

    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)
    return str(path)


class FakeMasker:
    """Stands in for the models: everything valid except the top ``rows`` rows (the "sky")."""

    def __init__(self, rows: int = 8):
        self.rows, self.calls = rows, 0

    def __call__(self, rgb):
        self.calls += 1
        valid = np.ones(rgb.shape[:2], bool)
        valid[: self.rows] = False
        return MaskResult(valid, [Box(0, 0, rgb.shape[1], self.rows, 0.9, "sky")])


# ------------------------------------------------------------------------------------ models
def test_missing_weights_say_where_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("PANO_SAM_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        resolve_sam_checkpoint("sam_vit_b_01ec64.pth")
    msg = str(err.value)
    assert "dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth" in msg and str(tmp_path) in msg
    bad = tmp_path / "sam_vit_b_01ec64.pth"
    bad.write_bytes(b"not a checkpoint")
    assert resolve_sam_checkpoint("sam_vit_b_01ec64.pth") == bad  # found through PANO_SAM_DIR
    with pytest.raises(ValueError, match="sam_vit_b_01ec64.pth"):
        load_sam("sam_vit_b_01ec64.pth")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="grounding-dino-nowhere.*--local-dir"):
        load_grounding_dino(str(tmp_path / "grounding-dino-nowhere"))
    # a run whose models cannot be built stops at once with the reason (not one failure per panorama)
    url = _write_shard(tmp_path / "w-000000.tar", [_sample(f"w{i}", np.zeros((64, 128, 3), np.uint8)) for i in range(3)])
    cfg = MaskerConfig(detector=TINY_RANDOM, sam=str(tmp_path / "sam_vit_b_missing.pth"))
    with pytest.raises(M.ModelLoadError, match="sam_vit_b_missing.pth"):
        M.run_masks([url], tmp_path / "w.lmdb", cfg, progress=False)
    assert len(MaskStore(tmp_path / "w.lmdb")) == 0
    assert cli.run(M.main, ["--shards", url, "--store", str(tmp_path / "w.lmdb"), "--sam",
                            str(tmp_path / "nope_vit_b.pth"), "--detector", TINY_RANDOM, "--no-progress"]) == 2


# ------------------------------------------------------------------------------------ the run
def test_resume_after_an_interrupted_run(tmp_path, panos):
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_shard(shards / "all-000000.tar", [_sample(f"p{i}", panos[i]) for i in range(3)])
    _write_shard(shards / "all-000001.tar", [_sample(f"p{i}", panos[i], fmt="png") for i in range(3, 5)])
    store = str(tmp_path / "masks.lmdb")
    common = ["--shards", str(shards), "--store", store, "--tiny-random", "--no-progress", "--device", "cpu"]

    assert M.main(common + ["--limit", "2", "--summary-json", str(tmp_path / "s1.json")]) == 0
    s1 = json.loads((tmp_path / "s1.json").read_text())
    assert (s1["processed"], s1["skipped_stored"], s1["stopped_at_limit"]) == (2, 0, True)
    assert sorted(MaskStore(store).keys()) == ["p0", "p1"]

    assert M.main(common + ["--summary-json", str(tmp_path / "s2.json")]) == 0
    s2 = json.loads((tmp_path / "s2.json").read_text())
    assert (s2["processed"], s2["skipped_stored"], s2["failed"]) == (3, 2, [])

    s3 = M.run_masks([str(shards)], store, TINY, progress=False)
    assert (s3.processed, s3.skipped_stored) == (0, 5)
    ms = MaskStore(store, readonly=True)
    assert sorted(ms.keys()) == [f"p{i}" for i in range(5)]
    assert all(ms.get(f"p{i}").shape == (64, 128) and ms.source(f"p{i}") == "model" for i in range(5))
    meta = ms.metadata
    assert meta["detector"] == TINY_RANDOM and meta["box_threshold"] == 0.3 and meta["text_threshold"] == 0.25
    assert meta["prompts"] == ["sky", "watermark"] and meta["min_valid"] == 0.2


def test_corrupt_samples_and_truncated_shards_are_named_not_fatal(tmp_path, panos):
    good = [_sample(f"ok{i}", panos[i]) for i in range(3)]
    bad_jpeg = {"__key__": "bad_jpeg", "rgb.jpg": b"\xff\xd8 garbage", "meta.json": b"{}"}
    no_rgb = {"__key__": "no_rgb", "meta.json": b"{}"}
    bad_mask = _sample("bad_mask", panos[3])
    bad_mask["mask.png"] = b"not a png"
    a = _write_shard(tmp_path / "a-000000.tar", [good[0], bad_jpeg, no_rgb, bad_mask, good[1]])
    b = _write_shard(tmp_path / "a-000001.tar", [good[2]] + [_sample(f"late{i}", panos[4 + i]) for i in range(3)])
    with tarfile.open(b) as tf:  # cut inside the image data of late1
        cut = next(ti for ti in tf if ti.name == "late1.rgb.jpg").offset_data + 100
    data = Path(b).read_bytes()
    Path(b).write_bytes(data[:cut])
    c = tmp_path / "a-000002.tar"
    c.write_bytes(b"this is not a tar file at all" * 40)
    fake = FakeMasker(rows=8)
    summary = M.run_masks([a, b, str(c)], tmp_path / "m.lmdb", TINY, masker=fake, progress=False)
    failed = dict(summary.failed)
    assert failed["bad_jpeg"].startswith("unreadable_image: bad_jpeg.rgb.jpg")
    assert failed["no_rgb"].startswith("incomplete_sample") and "no rgb" in failed["no_rgb"]
    assert failed["bad_mask"].startswith("unreadable_mask: bad_mask.mask.png")
    assert "truncated_shard" in failed[b] and "late1" in failed[b]
    assert "truncated_shard" in failed[str(c)]
    store = MaskStore(tmp_path / "m.lmdb")
    assert sorted(store.keys()) == ["late0", "ok0", "ok1", "ok2"]
    assert summary.processed == 4 and len(summary.failed) == 5
    assert summary.failed_by_reason() == {"unreadable_image": 1, "incomplete_sample": 1, "unreadable_mask": 1,
                                          "truncated_shard": 2}

    # a shard cut between two samples ends "cleanly": its manifest count tells
    d = tmp_path / "cut"
    d.mkdir()
    e = _write_shard(d / "all-000000.tar", [_sample(f"c{i}", panos[i]) for i in range(3)])
    with tarfile.open(e) as tf:
        cut = next(ti for ti in tf if ti.name.startswith("c2.")).offset
    Path(e).write_bytes(Path(e).read_bytes()[:cut])
    from sharding.manifest import sha256_file

    (d / "manifest.json").write_text(json.dumps({"splits": {"all": {"count": 3, "shards": [
        {"path": "all-000000.tar", "count": 3, "sha256": sha256_file(e)}]}}}))
    s2 = M.run_masks([str(d)], tmp_path / "m.lmdb", TINY, masker=fake, progress=False)
    assert s2.processed == 2 and "2 of 3 samples" in dict(s2.failed)[e]
    assert store.valid_fraction("ok0") == pytest.approx(1 - 8 / 64)
    text = summary.format(store)
    assert "bad_jpeg" in text and "failed" in text and "processed" in text


def test_shard_masks_rejection_and_metadata(tmp_path, panos):
    shard_mask = np.ones((64, 128), bool)
    shard_mask[:, :16] = False
    url = _write_shard(tmp_path / "x-000000.tar", [
        _sample("with_mask", panos[0], mask=shard_mask), _sample("plain", panos[1], fmt="png")])
    fake = FakeMasker(rows=8)

    s = M.run_masks([url], tmp_path / "prefer.lmdb", TINY, masker=fake, progress=False)
    store = MaskStore(tmp_path / "prefer.lmdb")
    np.testing.assert_array_equal(store.get("with_mask"), shard_mask)  # taken as is, models not run
    assert store.source("with_mask") == "imported" and store.source("plain") == "model"
    assert fake.calls == 1 and s.by_source == {"imported": 1, "model": 1}

    M.run_masks([url], tmp_path / "combine.lmdb", TINY, masker=fake, shard_mask="combine", progress=False)
    store = MaskStore(tmp_path / "combine.lmdb")
    expect = shard_mask.copy()
    expect[:8] = False
    np.testing.assert_array_equal(store.get("with_mask"), expect)
    assert store.source("with_mask") == "combined"
    assert store.valid_fraction("with_mask") == pytest.approx(expect.mean())

    # under 20 % valid: recorded as rejected (and still stored)
    s = M.run_masks([url], tmp_path / "rej.lmdb", TINY, masker=FakeMasker(rows=56), shard_mask="ignore",
                    progress=False)
    store = MaskStore(tmp_path / "rej.lmdb")
    assert s.rejected == 2 and store.rejected() == ["plain", "with_mask"] and len(store) == 2

    # other settings into the same store: the differing fields are listed, nothing is written
    other = MaskerConfig(detector=TINY_RANDOM, sam=TINY_RANDOM, box_threshold=0.35)
    with pytest.raises(ValueError, match=r"box_threshold: store has 0\.3, expected 0\.35") as err:
        M.run_masks([url], tmp_path / "rej.lmdb", other, masker=fake, shard_mask="ignore", progress=False)
    assert "text_threshold" not in str(err.value) and isinstance(err.value, cli.UserError)
    rc = cli.run(M.main, ["--shards", url, "--store", str(tmp_path / "rej.lmdb"), "--tiny-random", "--shard-mask",
                          "ignore", "--box-threshold", "0.35", "--no-progress"])
    assert rc == 2
    s = M.run_masks([url], tmp_path / "rej.lmdb", other, masker=fake, shard_mask="ignore", allow_mismatch=True,
                    progress=False)
    assert (s.processed, s.skipped_stored) == (0, 2)
    assert MaskStore(tmp_path / "rej.lmdb").metadata["mixed_settings"] is True


def test_overwrite_builds_beside_and_swaps(tmp_path, panos):
    url = _write_shard(tmp_path / "o-000000.tar", [_sample(f"o{i}", panos[i], fmt="png") for i in range(3)])
    path = tmp_path / "o.lmdb"
    M.run_masks([url], path, TINY, masker=FakeMasker(rows=56), shard_mask="ignore", progress=False)
    reader = MaskStore(path, readonly=True)  # a reader of the old store keeps a consistent view
    assert reader.rejected() == ["o0", "o1", "o2"]
    other = MaskerConfig(detector=TINY_RANDOM, sam=TINY_RANDOM, box_threshold=0.35)
    # stopped at --limit: the old store stays in place, the new one waits beside it
    s = M.run_masks([url], path, other, masker=FakeMasker(rows=8), shard_mask="ignore", overwrite=True, limit=2,
                    progress=False)
    assert s.stopped_at_limit and MaskStore(path).metadata["box_threshold"] == 0.3
    beside = Path(f"{path}.overwrite-new")
    assert sorted(MaskStore(beside).keys()) == ["o0", "o1"]
    # run again: resumes the new store, then swaps it in
    s = M.run_masks([url], path, other, masker=FakeMasker(rows=8), shard_mask="ignore", overwrite=True,
                    progress=False)
    assert (s.processed, s.skipped_stored) == (1, 2) and not beside.exists()
    new = MaskStore(path, readonly=True)
    assert new.metadata["box_threshold"] == 0.35 and "mixed_settings" not in new.metadata
    assert new.rejected() == [] and new.valid_fraction("o2") == pytest.approx(1 - 8 / 64)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("o.lmdb")) == ["o.lmdb"]


def test_import_cli_on_the_real_sample_masks(tmp_path, samples_dir):
    from PIL import Image

    store = str(tmp_path / "m.lmdb")
    args = ["--store", store, "--import-masks", str(samples_dir / "outdoor"), "--key-prefix", "folder-",
            "--no-progress", "--summary-json", str(tmp_path / "s.json")]
    assert M.main(args) == 0
    s = json.loads((tmp_path / "s.json").read_text())
    ms = MaskStore(store, readonly=True)
    pngs = sorted((samples_dir / "outdoor").glob("*_valid.png"))
    assert s["processed"] == len(pngs) == len(ms) and s["rejected"] == 0
    for png in pngs:
        key = "folder-" + png.stem[: -len("_valid")]
        ref = np.asarray(Image.open(png))[..., 0] == 255
        assert ms.valid_fraction(key) == pytest.approx(ref.mean(), abs=1e-12)
        assert ms.source(key) == "imported"
    assert M.main(args) == 0
    assert json.loads((tmp_path / "s.json").read_text())["skipped_stored"] == len(pngs)


def test_ray_data_run_matches_local_counts_bad_samples_and_resumes(tmp_path, panos):
    """--ray (Ray Data: reader tasks, an actor pool of segmenters, the driver as the one writer)."""
    from sharding.ray_connect import connect

    bad = {"__key__": "bad_jpeg", "rgb.jpg": b"\xff\xd8 garbage", "meta.json": b"{}"}
    a = _write_shard(tmp_path / "r-000000.tar", [_sample("r0", panos[0]), bad, _sample("r1", panos[1])])
    b = _write_shard(tmp_path / "r-000001.tar", [_sample(f"r{i}", panos[i]) for i in (2, 3, 4)])
    c = tmp_path / "r-000002.tar"
    c.write_bytes(b"this is not a tar file at all" * 40)
    shards = [a, b, str(c)]
    MaskStore(tmp_path / "ray.lmdb").put("r4", np.ones((64, 128), bool))  # already stored: skipped
    import ray

    started = connect(None, num_cpus=3, object_store_memory=300_000_000)  # shared by the runs below
    try:
        s1 = M.run_masks(shards, tmp_path / "ray.lmdb", TINY, use_ray=True, replicas=2, limit=2, progress=False)
        assert s1.stopped_at_limit
        assert s1.processed + sum(not why.startswith("truncated_shard") for _, why in s1.failed) == 2
        s2 = M.run_masks(shards, tmp_path / "ray.lmdb", TINY, use_ray=True, replicas=2, progress=False)
    finally:
        if started:
            ray.shutdown()
    failed = dict(s1.failed + s2.failed)
    assert failed["bad_jpeg"].startswith("unreadable_image: bad_jpeg.rgb.jpg")
    assert failed[str(c)].startswith("truncated_shard")
    assert s1.processed + s2.processed == 4 and s2.skipped_stored == 1 + s1.processed
    assert s2.failed_by_reason()["truncated_shard"] == 1
    local = M.run_masks(shards, tmp_path / "local.lmdb", TINY, progress=False)
    assert local.processed == 5 and local.failed_by_reason() == {"unreadable_image": 1, "truncated_shard": 1}
    r, lo = MaskStore(tmp_path / "ray.lmdb"), MaskStore(tmp_path / "local.lmdb")
    assert sorted(r.keys()) == sorted(lo.keys()) == [f"r{i}" for i in range(5)]
    for i in range(4):  # same seeded tiny models in the actors: (nearly) the same masks
        ma, mb = r.get(f"r{i}"), lo.get(f"r{i}")
        assert ma.shape == mb.shape == (64, 128) and (ma == mb).mean() > 0.99
    assert r.metadata == lo.metadata
