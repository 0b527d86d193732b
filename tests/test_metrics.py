import math

import pytest
import torch

from student.metrics import (DEFAULT_PROTOCOL, METRIC_NAMES, PROTOCOLS, depth_metrics, fit_scale_shift,
                             per_image_metrics, stanford2d3d_crop)


def test_metrics_by_hand_without_alignment():
    gt = torch.tensor([[1.0, 2.0], [4.0, 5.0]])
    pred = torch.tensor([[1.0, 3.0], [2.0, 5.0]])
    m = depth_metrics(pred, gt, align="none")
    # |p-g|/g: 0, .5, .5, 0 -> .25 ; (p-g)^2/g: 0, .5, 1, 0 -> .375 ; rmse sqrt((0+1+4+0)/4)
    assert m["abs_rel"] == pytest.approx(0.25)
    assert m["sq_rel"] == pytest.approx(0.375)
    assert m["rmse"] == pytest.approx(math.sqrt(5 / 4))
    assert m["rmse_log"] == pytest.approx(math.sqrt((math.log(1.5) ** 2 + math.log(0.5) ** 2) / 4))
    # ratios 1, 1.5, 2, 1 -> delta1 .5 ; delta2 (1.5625) .75 ; delta3 (1.953) .75
    assert (m["delta1"], m["delta2"], m["delta3"]) == pytest.approx((0.5, 0.75, 0.75))
    assert set(m) == set(METRIC_NAMES) and all(isinstance(v, float) for v in m.values())


def test_median_alignment_removes_scale():
    gt = torch.rand(2, 1, 16, 32) * 5 + 0.5
    m = depth_metrics(gt * 3.0, gt, align="median")
    assert m["abs_rel"] < 1e-6 and m["delta1"] == 1.0
    assert depth_metrics(gt * 3.0, gt, align="none")["abs_rel"] == pytest.approx(2.0, rel=1e-6)


def test_median_alignment_by_hand():
    gt = torch.tensor([[1.0, 2.0, 3.0]])
    pred = torch.tensor([[2.0, 2.0, 8.0]])  # median 2 vs gt median 2 -> unchanged
    assert depth_metrics(pred, gt, align="median")["abs_rel"] == pytest.approx((1 + 0 + 5 / 3) / 3)
    pred2 = torch.tensor([[1.0, 1.0, 4.0]])  # median 1 -> scaled by 2 -> same as above
    assert depth_metrics(pred2, gt, align="median")["abs_rel"] == pytest.approx((1 + 0 + 5 / 3) / 3)


def test_lstsq_protocol_recovers_affine_disparity_and_clamps():
    gt = torch.linspace(0.5, 9.0, 64).reshape(1, 8, 8)
    pred_disp = 0.3 / gt + 0.05  # affine in disparity
    m = depth_metrics(1.0 / pred_disp, gt, align="lstsq")
    assert m["abs_rel"] < 1e-6
    assert depth_metrics(1.0 / pred_disp, gt, align="median")["abs_rel"] > 0.05  # median alone cannot


def test_valid_pixels_max_depth_mask_and_crop():
    gt = torch.tensor([[[1.0, 20.0], [0.0, 2.0]]])
    pred = torch.tensor([[[2.0, 1.0], [5.0, 2.0]]])
    m = depth_metrics(pred, gt, align="none")  # only 1.0 and 2.0 count
    assert m["abs_rel"] == pytest.approx(0.5)
    mask = torch.tensor([[[False, True], [True, True]]])
    assert depth_metrics(pred, gt, valid=mask, align="none")["abs_rel"] == 0.0
    gt4 = torch.ones(1, 4, 2)
    pred4 = torch.ones(1, 4, 2)
    pred4[0, 0] = 9.0  # wrong only in the top band
    assert depth_metrics(pred4, gt4, align="none", crop=1)["abs_rel"] == 0.0
    with pytest.raises(ValueError, match="crop"):
        depth_metrics(pred4, gt4, crop=2)


def test_per_image_average_and_empty_images():
    gt = torch.ones(2, 1, 2, 2)
    pred = torch.ones(2, 1, 2, 2)
    pred[1] = 2.0
    per = per_image_metrics(pred, gt, align="none")
    assert per[0]["abs_rel"] == 0 and per[1]["abs_rel"] == 1.0
    assert depth_metrics(pred, gt, align="none")["abs_rel"] == 0.5
    empty = depth_metrics(pred, torch.zeros_like(gt), align="median")
    assert all(math.isnan(v) for v in empty.values())


def test_lstsq_is_the_default_protocol():
    assert DEFAULT_PROTOCOL == "lstsq" == PROTOCOLS[0] and "median" in PROTOCOLS
    gt = torch.rand(2, 1, 16, 32) * 8 + 0.5
    pred_disp = 2.5 / gt + 0.7  # an exact affine map of the ground-truth disparity
    assert depth_metrics(1.0 / pred_disp, gt)["abs_rel"] < 1e-4  # default protocol, no align= given
    assert depth_metrics(1.0 / pred_disp, gt, align="median")["abs_rel"] > 1e-2


def test_lstsq_steps_in_the_reference_order_by_hand():
    # 1. fit on disparity: pred disparity [1, 2, 3] vs gt disparity [1, 0.5, 0.25] -> s = -0.375, t = 1.333..
    gt = torch.tensor([[1.0, 2.0, 4.0]])
    s, t = fit_scale_shift(torch.tensor([1.0, 2.0, 3.0]), 1.0 / gt[0])
    assert (float(s), float(t)) == pytest.approx((-0.375, 4 / 3))
    fitted = torch.tensor([1.0, 2.0, 3.0]) * s + t  # [0.9583, 0.5833, 0.2083]
    # 2. inverse to depth, 3. median scaling (median of gt 2, of the depths 1/0.5833), 4. clamp to [0.1, 10]
    depth = 1.0 / fitted
    depth = (depth * (2.0 / depth.median())).clamp(0.1, 10.0)
    expected = ((depth - gt[0]).abs() / gt[0]).mean().item()
    got = depth_metrics(1.0 / torch.tensor([[1.0, 2.0, 3.0]]), gt)["abs_rel"]
    assert got == pytest.approx(expected, rel=1e-6)


def test_lstsq_clamps_prediction_and_ground_truth():
    gt = torch.tensor([[0.05, 2.0, 4.0, 8.0]])  # 0.05 m is valid (0 < gt) but counts as 0.1, like the reference
    m = depth_metrics(gt.clone(), gt)
    assert m["abs_rel"] < 1e-9 and m["delta1"] == 1.0
    # negative fitted disparity (beyond infinity) becomes depth 0, clamped to 0.1: finite metrics
    pred = 1.0 / torch.tensor([[5.0, 1.0, 0.9, 0.01]])
    assert all(math.isfinite(v) for v in depth_metrics(pred, gt).values())


def test_constant_prediction_scores_like_a_constant_depth_baseline():
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(3, 1, 8, 16, generator=g) * 6 + 0.5
    for align in ("lstsq", "median"):
        const_pred = depth_metrics(torch.full_like(gt, 3.7), gt, align=align)  # content-free network output
        baseline = torch.stack([torch.full_like(x, float(x.median())) for x in gt])  # median(gt) everywhere
        base = depth_metrics(baseline, gt, align="none")
        assert const_pred == pytest.approx(base, rel=1e-6), align
        assert const_pred["abs_rel"] > 0.2


def test_stanford2d3d_crop_scales_the_reference_value():
    assert stanford2d3d_crop(512) == 68 and stanford2d3d_crop(256) == 34 and stanford2d3d_crop(128) == 17
