"""precompute --ray: the Ray Data pipeline stores what the in-process path stores, resumes, counts bad samples."""

from __future__ import annotations


import pytest
import torch

from sharding import cli
from teacher_server.precompute import main, precompute
from teacher_server.store import PseudoLabelStore, StoreMismatchError
from teacher_server.testing import write_panorama_shards

KW = dict(rotations=2, model="tiny-random", face_size=16, input_size=28, seed=3, max_deg=30.0)


def _entries(path):
    store = PseudoLabelStore(path, readonly=True)
    out = {k: store.get(k) for k in store.keys()}
    store.close()
    return out


def test_ray_data_precompute_matches_the_in_process_path_and_resumes(ray_local, tmp_path):
    keys, shards = write_panorama_shards(tmp_path / "shards", n=7, per_shard=3, height=32, bad_every=4)
    assert len(keys) == 6  # gen-003 has no image
    ref = precompute(shards, str(tmp_path / "ref.lmdb"), replicas=0, **KW)
    assert ref["skipped_bad"] == {"incomplete_sample": 1}

    store = str(tmp_path / "ray.lmdb")
    first = precompute(shards, store, replicas=1, ray=True, limit=2, **KW)
    assert first["computed"] == 2 and first["panoramas"] == 2
    second = precompute(shards, store, replicas=2, ray=True, **KW)
    assert (second["computed"], second["skipped_existing"]) == (len(keys) - 2, 2)
    assert second["skipped_bad"] == ref["skipped_bad"]
    assert second["teacher_seconds_this_run"] > 0 and second["teacher_seconds"] > first["teacher_seconds"]
    assert second["invalid_faces"] == 0

    want, got = _entries(str(tmp_path / "ref.lmdb")), _entries(store)
    assert sorted(got) == sorted(want) == sorted(keys)
    for key in keys:
        assert torch.equal(got[key][0], want[key][0])  # rotations: a function of (seed, key)
        assert (got[key][1] - want[key][1]).abs().max() < 2e-3  # the same teacher's answers (fp16)

    # a finished store: nothing left to compute, through the command line too
    assert main(["--shards", *shards, "--store", store, "--rotations", "2", "--model", "tiny-random",
                 "--face-size", "16", "--input-size", "28", "--seed", "3", "--max-deg", "30", "--ray",
                 "--replicas", "1"]) == 0
    assert len(_entries(store)) == len(keys)
    with pytest.raises(StoreMismatchError, match="seed"):
        precompute(shards, store, replicas=1, ray=True, **dict(KW, seed=4))


def test_command_line_refuses_bad_input_with_one_line(tmp_path, capsys):
    _, shards = write_panorama_shards(tmp_path / "shards", n=2, per_shard=2, height=32)
    base = ["--store", str(tmp_path / "s.lmdb"), "--model", "tiny-random"]
    assert cli.run(main, ["--shards", *shards, *base, "--ray", "--replicas", "0"]) == 2
    assert "error: --replicas must be >= 1 with --ray, got 0" in capsys.readouterr().err
    assert cli.run(main, ["--shards", str(tmp_path / "nothing-*.tar"), *base]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --shards:") and "nothing-*.tar" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s.lmdb").exists()  # refused before anything was created
