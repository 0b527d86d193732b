"""Tiny and random test models of teacher_server.testing (offline, no weights)."""

from __future__ import annotations

import pytest
import torch

from teacher_server.testing import ToyFaceModel, build_random_model, da_config, tiny_config


def test_random_architectures_have_the_real_sizes():
    from transformers import DepthAnythingForDepthEstimation

    for size, millions in (("small", 24.8), ("base", 97.5), ("large", 335.3)):  # DA-V2 S/B/L
        with torch.device("meta"):
            model = DepthAnythingForDepthEstimation(da_config(size))
        assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - millions) < 0.1
    with pytest.raises(ValueError, match="unknown Depth Anything size 'huge'"):
        da_config("huge")


def test_tiny_random_weights_depend_only_on_the_seed():
    assert tiny_config().backbone_config.hidden_size == 48
    torch.manual_seed(123)  # the global RNG must not matter
    a = build_random_model("tiny-random", seed=0)
    torch.manual_seed(456)
    b = build_random_model("tiny-random", seed=0)
    c = build_random_model("tiny-random", seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    x = torch.rand(2, 3, 28, 28)
    with torch.no_grad():
        out = a(pixel_values=x).predicted_depth
    assert out.shape[0] == 2 and torch.isfinite(out).all() and out.std() > 0
    with pytest.raises(ValueError, match="not a random model name"):
        build_random_model("tiny")


def test_toy_specs_and_kinds():
    faces = torch.rand(3, 3, 8, 8)
    luma = ToyFaceModel.from_spec("toy:luma")
    assert torch.allclose(luma(faces), 0.1 + faces.mean(1, keepdim=True))
    assert torch.isnan(ToyFaceModel.from_spec("toy:nan")(faces)).all()
    assert ToyFaceModel.from_spec("toy:luma:sleep=0.25").sleep == 0.25
    with pytest.raises(ValueError, match="unknown toy teacher 'fog'"):
        ToyFaceModel.from_spec("toy:fog")
    with pytest.raises(ValueError, match="unknown toy teacher option 'speed'"):
        ToyFaceModel.from_spec("toy:luma:speed=2")
