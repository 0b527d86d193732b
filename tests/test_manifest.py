"""``sharding.manifest``: an invalid manifest is a ``UserError`` naming the file and what is wrong."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from webdataset import TarWriter

from sharding import cli
from sharding.format import encode_png, encode_sample
from sharding.manifest import ManifestError, load_manifest, resolve_shards, sha256_file, write_manifest
from sharding.stream import make_loader, read_samples


@pytest.fixture
def dataset(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    shards = []
    for i in range(2):
        name = f"train-{i:06d}.tar"
        with TarWriter(str(d / name), encoder=False) as tw:
            for j in range(2):
                rgb = np.random.default_rng(j).integers(0, 256, (4, 8, 3), dtype=np.uint8)
                tw.write(encode_sample(f"k{i}_{j}", encode_png(rgb), meta={"source": "t", "split": "train",
                                                                              "path": "x"}))
        shards.append({"path": name, "count": 2, "sha256": sha256_file(d / name)})
    good = {"tool": "test", "splits": {"train": {"count": 4, "shards": shards}}}
    write_manifest(d, good)
    return d, good


def _broken(good: dict, edit) -> dict:
    m = copy.deepcopy(good)
    edit(m)
    return m


def _shard0(m):
    return m["splits"]["train"]["shards"][0]


CASES = [
    ("empty splits", lambda m: m.update(splits={}), "'splits' must be a non-empty object"),
    ("no splits", lambda m: m.pop("splits"), "no 'splits'"),
    ("split without shards", lambda m: m["splits"]["train"].update(shards=[]), "split 'train' lists no shards"),
    ("string count", lambda m: _shard0(m).update(count="2"), "count '2' is not an integer"),
    ("float count", lambda m: _shard0(m).update(count=2.5), "count 2.5 is not an integer"),
    ("split count", lambda m: m["splits"]["train"].update(count=None), "count None is not an integer"),
    ("counts disagree", lambda m: m["splits"]["train"].update(count=5), "count 5 but its shards hold 4"),
    ("missing sha256", lambda m: _shard0(m).pop("sha256"), "shard 0 has no 'sha256'"),
    ("missing path", lambda m: _shard0(m).pop("path"), "shard 0 has no 'path'"),
    ("missing count", lambda m: m["splits"]["train"].pop("count"), "split 'train' has no 'count'"),
    ("zeroed sha256", lambda m: _shard0(m).update(sha256="0" * 64), "is not a sha256 hex digest"),
    ("short sha256", lambda m: _shard0(m).update(sha256="abc"), "is not a sha256 hex digest"),
    ("empty sha256", lambda m: _shard0(m).update(sha256=""), "is not a sha256 hex digest"),
    ("absolute path", lambda m: _shard0(m).update(path="/etc/passwd"), "must be a file name relative"),
    ("path outside", lambda m: _shard0(m).update(path="../x.tar"), "must be a file name relative"),
]


@pytest.mark.parametrize("name,edit,message", CASES, ids=[c[0] for c in CASES])
def test_invalid_manifest_is_a_user_error_naming_file_and_problem(dataset, name, edit, message, capsys):
    d, good = dataset
    (d / "manifest.json").write_text(json.dumps(_broken(good, edit)))
    for call in (lambda: load_manifest(d), lambda: resolve_shards(d / "manifest.json"),
                 lambda: list(read_samples(d)), lambda: make_loader(d, batch_size=1, num_workers=0, height=4),
                 lambda: resolve_shards(str(d / "train-000000.tar"))):  # the manifest beside a named tar too
        with pytest.raises(cli.UserError) as e:
            call()
        assert isinstance(e.value, ManifestError)
        assert str(d / "manifest.json") in str(e.value) and message in str(e.value)

    def main(argv):
        load_manifest(d)

    assert cli.run(main, []) == 2  # one line, no traceback
    err = capsys.readouterr().err
    assert err.startswith("error: invalid manifest") and len(err.strip().splitlines()) == 1


def test_unreadable_and_missing_manifests(dataset, tmp_path):
    d, good = dataset
    (d / "manifest.json").write_text('{"splits": ')
    with pytest.raises(ManifestError, match=r"ds/manifest.json: not valid JSON"):
        load_manifest(d / "manifest.json")
    (d / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ManifestError, match="expected a JSON object, got list"):
        load_manifest(d)
    with pytest.raises(ManifestError, match=r"no manifest at .*nowhere/manifest.json"):
        load_manifest(tmp_path / "nowhere" / "manifest.json")
    write_manifest(d, good)
    assert [s.count for s in resolve_shards(d)] == [2, 2]
    assert [s.sha256 for s in resolve_shards(str(d / "*.tar"))] == [x["sha256"] for x in
                                                                    good["splits"]["train"]["shards"]]
    with pytest.raises(ManifestError, match="has no split 'val'"):
        resolve_shards(d, "val")
