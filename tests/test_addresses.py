"""``sharding.addresses``: shard addresses cannot run shell commands unless the caller allows ``pipe:``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from webdataset import TarWriter

from sharding.addresses import AddressError, check_address, scheme
from sharding.cli import UserError
from sharding.format import encode_png, encode_sample
from sharding.manifest import resolve_shards
from sharding.shard_reader import iter_shard
from sharding.stream import make_loader, mixed_batches, panoramas, read_samples


def _shard(path: Path, n: int = 2) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with TarWriter(str(path), encoder=False) as tw:
        for j in range(n):
            rgb = np.random.default_rng(j).integers(0, 256, (4, 8, 3), dtype=np.uint8)
            tw.write(encode_sample(f"k{j}", encode_png(rgb), meta={"source": "t", "split": "train", "path": "x"}))
    return path


def test_pipe_addresses_are_refused_and_run_nothing(tmp_path):
    marker = tmp_path / "x"
    url = f"pipe:touch {marker}"
    shard = _shard(tmp_path / "d" / "train-000000.tar")
    calls = [
        lambda: resolve_shards([url]),
        lambda: list(iter_shard(url)),
        lambda: list(read_samples([url])),
        lambda: panoramas([url], height=4),
        lambda: make_loader([url], batch_size=1, num_workers=0, height=4, resampled=True, epoch_length=1),
        lambda: mixed_batches([str(shard)], [url], batch_size=2, height=4),
        lambda: resolve_shards([f"pipe:touch {tmp_path}/{{a,b}}"]),  # refused before brace expansion
    ]
    for call in calls:
        with pytest.raises(UserError) as e:
            call()
        assert url in str(e.value) or "pipe:touch" in str(e.value)
        assert "allow_pipe" in str(e.value)
    assert not marker.exists() and not (tmp_path / "a").exists()


def test_allow_pipe_lets_a_pipe_through(tmp_path):
    marker = tmp_path / "x"
    skips = []
    assert list(iter_shard(f"pipe:touch {marker}", on_skip=lambda *a: skips.append(a), allow_pipe=True)) == []
    assert marker.exists()  # the command ran (and produced no tar: reported, not raised)
    assert [s[0] for s in skips] == ["truncated_shard"]
    shard = _shard(tmp_path / "d" / "train-000000.tar", n=3)
    got = [s["key"] for s in read_samples([f"pipe:cat {shard}"], allow_pipe=True)]
    assert got == ["k0", "k1", "k2"]
    assert [s.url for s in resolve_shards([f"pipe:cat {shard}"], allow_pipe=True)] == [f"pipe:cat {shard}"]


def test_address_forms(tmp_path, monkeypatch):
    assert scheme("data/train-000000.tar") == "local" and scheme("a:b.tar") == "local"
    assert scheme("file:///d/x.tar") == "file" and scheme("https://h/x.tar") == "https"
    assert scheme("gs://bucket/x.tar") == "gs" and scheme("pipe:cat x") == "pipe"
    assert check_address("https://example.org/train-000000.tar") == "https://example.org/train-000000.tar"
    for bad in ("-", "foo://x/y.tar", "javascript://x"):
        with pytest.raises(AddressError, match="not accepted|unsupported scheme"):
            check_address(bad)
    # a file:// address reads the local file
    shard = _shard(tmp_path / "d" / "train-000000.tar")
    assert [s["key"] for s in read_samples([f"file://{shard}"])] == ["k0", "k1"]
    # webdataset's GOPEN_REWRITE rules do not apply: local files are opened directly, never via a rewritten URL
    marker = tmp_path / "rewritten"
    monkeypatch.setenv("GOPEN_REWRITE", f"{tmp_path}=pipe:touch {marker};cat {tmp_path}")
    assert [s["key"] for s in read_samples([str(shard)])] == ["k0", "k1"]
    assert not marker.exists()
