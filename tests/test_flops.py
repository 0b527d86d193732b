"""FLOP and parameter counting (student.flops)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from student.flops import forward_flops, main, param_count, train_step_flops
from student.models import build_model


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("cin, cout, k, stride, pad, h, w", [(3, 8, 3, 1, 1, 16, 32), (4, 6, 5, 2, 0, 21, 40)])
def test_conv_flops_match_the_formula(cin, cout, k, stride, pad, h, w):
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=pad)
    hout, wout = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    assert forward_flops(conv, h, w) == 2 * cin * cout * k * k * hout * wout
    assert forward_flops(conv, h, w, batch=3) == 3 * forward_flops(conv, h, w)
    assert train_step_flops(conv, h, w) == 3 * forward_flops(conv, h, w)


def test_width_defaults_to_twice_the_height_and_mode_is_restored():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).train()
    assert forward_flops(net, 8) == 2 * 3 * 4 * 8 * 16
    assert net.training  # counted in eval mode, then restored


def test_param_count():
    lin = nn.Linear(10, 5)
    assert param_count(lin) == 55
    shared = nn.Sequential(lin, lin)  # the same weights twice count once
    assert param_count(shared) == 55
    lin.bias.requires_grad_(False)
    assert param_count(lin, trainable_only=True) == 50


@pytest.mark.parametrize("name, encoder, anchor_m", [("unifuse", "resnet18", 30.8), ("bifusepp", "resnet34", 52.5)])
def test_paper_sized_parameter_counts(name, encoder, anchor_m):
    n = param_count(build_model(name, encoder=encoder))
    assert abs(n / 1e6 - anchor_m) <= 0.25 * anchor_m, n


def test_unifuse_r18_flops_scale_with_pixels_and_match_the_anchor():
    """Full 512x1024 counting is slow on a CPU; convolution FLOPs scale with pixels, so 16x the count at
    128x256 must be the 512x1024 count. The paper's ~125 GFLOPs (read as 2 x MACs) is then within 25%."""
    torch.manual_seed(0)
    model = build_model("unifuse", encoder="resnet18")
    small, mid = forward_flops(model, 64), forward_flops(model, 128)
    assert mid / small == pytest.approx(4.0, rel=0.01)
    extrapolated = 16 * mid
    assert abs(extrapolated / 1e9 - 125) <= 0.25 * 125, extrapolated / 1e9
    assert abs(extrapolated / 2e9 - 125) > 0.25 * 125  # as MACs it would not match: the anchor is FLOPs


def test_cli_prints_params_and_gflops(capsys):
    assert main(["--model", "rectnet_tiny", "--height", "64"]) == 0
    out = capsys.readouterr().out
    assert "params" in out and "GFLOPs" in out and "rectnet_tiny" in out
