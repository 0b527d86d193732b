"""``sharding.collate``: numpy samples -> the contract's tensors (sample and batch)."""

from __future__ import annotations

import numpy as np
import torch

from sharding.collate import collate, to_tensors


def _np_sample(key: str, seed: int, depth: bool, bgr: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (4, 8, 3), dtype=np.uint8)
    valid = rng.random((4, 8)) > 0.3
    d = rng.uniform(0.5, 5.0, (4, 8)).astype(np.float32) if depth else None
    return {"key": key, ("bgr" if bgr else "rgb"): img, "depth": d, "valid": valid, "meta": {"k": key}}


def test_to_tensors_converts_bgr_and_rgb_identically():
    s = _np_sample("a", 0, depth=True)
    t = to_tensors(s)
    want = torch.from_numpy(s["bgr"][..., ::-1].copy()).permute(2, 0, 1).float() / 255
    assert t["rgb"].dtype == torch.float32 and t["rgb"].shape == (3, 4, 8)
    torch.testing.assert_close(t["rgb"], want)
    rgb = dict(s, rgb=s["bgr"][..., ::-1].copy())
    del rgb["bgr"]
    torch.testing.assert_close(to_tensors(rgb)["rgb"], want)
    assert t["valid"].shape == (1, 4, 8) and t["depth"].shape == (1, 4, 8) and t["key"] == "a"
    assert "depth" not in to_tensors(_np_sample("b", 1, depth=False))


def test_collate_stacks_and_flags_labeled_samples():
    samples = [_np_sample("a", 0, True), _np_sample("b", 1, False), _np_sample("c", 2, True)]
    b = collate(samples)
    assert b["key"] == ["a", "b", "c"] and b["meta"] == [{"k": "a"}, {"k": "b"}, {"k": "c"}]
    assert b["rgb"].shape == (3, 3, 4, 8) and b["valid"].dtype == torch.bool and b["valid"].shape == (3, 1, 4, 8)
    assert b["labeled"].tolist() == [True, False, True]
    assert (b["depth"][1] == 0).all() and torch.equal(b["depth"][2, 0], torch.from_numpy(samples[2]["depth"]))
    for i, s in enumerate(samples):
        torch.testing.assert_close(b["rgb"][i], to_tensors(s)["rgb"])
        assert torch.equal(b["valid"][i, 0], torch.from_numpy(s["valid"]))
    assert "depth" not in collate([_np_sample("x", 3, False)]) and "labeled" not in collate([_np_sample("x", 3, False)])
