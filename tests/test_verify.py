"""``sharding.verify``: shard sha256 checked on first open (cached), damaged shards skipped and named; the CLI."""

from __future__ import annotations

import logging
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from webdataset import TarWriter

from sharding import cli, verify
from sharding.format import encode_jpeg, encode_sample
from sharding.manifest import sha256_file, write_manifest
from sharding.stream import make_loader, read_samples

H = 8


def _jpeg_dataset(out: Path, n_shards: int = 4, per_shard: int = 3) -> tuple[Path, dict[str, list[str]]]:
    """Shards of JPEG panoramas plus a manifest with their real sha256."""
    out.mkdir(parents=True)
    shards, keys = [], {}
    for i in range(n_shards):
        name = f"train-{i:06d}.tar"
        keys[name] = []
        with TarWriter(str(out / name), encoder=False) as tw:
            for j in range(per_shard):
                k = f"s{i}_{j}"
                rgb = np.random.default_rng(10 * i + j).integers(0, 256, (H, 2 * H, 3), dtype=np.uint8)
                tw.write(encode_sample(k, encode_jpeg(rgb), meta={"source": "test", "split": "train", "path": k}))
                keys[name].append(k)
        shards.append({"path": name, "count": per_shard, "sha256": sha256_file(out / name)})
    write_manifest(out, {"tool": "test", "splits": {"train": {"count": n_shards * per_shard, "shards": shards}}})
    return out, keys


def _flip_byte_in_jpeg(shard: Path) -> None:
    """Flip one byte in the middle of the first JPEG member's data (the tar itself stays well-formed)."""
    with tarfile.open(shard) as tf:
        ti = next(t for t in tf.getmembers() if t.name.endswith(".rgb.jpg"))
    with open(shard, "r+b") as f:
        pos = ti.offset_data + ti.size // 2
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0x01]))


@pytest.fixture(autouse=True)
def _fresh_cache():
    verify.clear_cache()
    yield
    verify.clear_cache()


def test_flipped_byte_in_a_jpeg_skips_counts_and_names_the_shard(tmp_path, caplog, capsys):
    d, keys = _jpeg_dataset(tmp_path / "ds")
    bad = d / "train-000001.tar"
    _flip_byte_in_jpeg(bad)
    good = sorted(k for name, ks in keys.items() if name != bad.name for k in ks)

    loader = make_loader(d, batch_size=1, num_workers=2, height=H, shuffle=0, drop_last=False)
    got = sorted(k for b in loader for k in b["key"])
    assert got == good  # the whole shard is skipped, even though its other samples would decode
    assert loader.skipped() == {"corrupt_shard": 1}

    counts = {}
    with caplog.at_level(logging.WARNING, logger="sharding.stream"):  # (worker logs are not captured here)
        assert sorted(s["key"] for s in read_samples(d, skipped=counts)) == good
    assert counts == {"corrupt_shard": 1}
    assert f"{bad} (corrupt_shard)" in caplog.text and "differs from the manifest" in caplog.text
    # without verification the shard is read: the damage is noticed only if it breaks decoding the image
    assert {"s1_1", "s1_2"} <= {s["key"] for s in read_samples(d, verify=False)}

    capsys.readouterr()
    assert cli.run(verify.main, ["--manifest", str(d / "manifest.json")]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"bad shard {bad}: sha256 ")
    os.remove(d / "train-000003.tar")
    assert cli.run(verify.main, ["--manifest", str(d)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"bad shard {bad}: " + out[0].split(": ", 1)[1], f"bad shard {d / 'train-000003.tar'}: missing"]


def test_verify_cli_all_good_and_invalid_manifest(tmp_path, capsys):
    d, _ = _jpeg_dataset(tmp_path / "ds", n_shards=2)
    assert cli.run(verify.main, ["--manifest", str(d)]) == 0
    assert "ok: 2 shard(s)" in capsys.readouterr().out
    assert cli.run(verify.main, ["--manifest", str(d), "--split", "val"]) == 2
    assert "no split 'val'" in capsys.readouterr().err
    (d / "manifest.json").write_text("{not json")
    assert cli.run(verify.main, ["--manifest", str(d)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "manifest.json" in err and "not valid JSON" in err


def test_hash_is_computed_once_per_file_state_across_epochs_and_workers(tmp_path, monkeypatch):
    d, _ = _jpeg_dataset(tmp_path / "ds")
    log_path = tmp_path / "hashed.log"
    real = verify.sha256_file

    def logged(path, *a, **kw):  # appends to a file: counts calls in forked DataLoader workers too
        with open(log_path, "a") as f:
            f.write(f"{os.path.basename(path)}\n")
        return real(path, *a, **kw)

    monkeypatch.setattr(verify, "sha256_file", logged)

    def hashed() -> list[str]:
        return sorted(log_path.read_text().split()) if log_path.exists() else []

    loader = make_loader(d, batch_size=1, num_workers=2, height=H, shuffle=0)
    assert len(list(loader)) == 12
    assert hashed() == [f"train-{i:06d}.tar" for i in range(4)]  # each shard once, in a worker
    assert len(list(loader)) == 12  # epoch 1: fresh workers, forked with the results the first ones sent
    assert len(list(read_samples(d))) == 12  # and the main process knows them too
    assert hashed() == [f"train-{i:06d}.tar" for i in range(4)]
    # a changed file (new mtime) is hashed again; its content is unchanged, so it still passes
    p = d / "train-000002.tar"
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert len(list(read_samples(d))) == 12
    assert hashed().count("train-000002.tar") == 2 and len(hashed()) == 5
