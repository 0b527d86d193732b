import math

import pytest
import torch

from student.metrics import METRIC_NAMES, depth_metrics, per_image_metrics


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
    assert depth_metrics(pred, gt)["abs_rel"] == pytest.approx((1 + 0 + 5 / 3) / 3)
    pred2 = torch.tensor([[1.0, 1.0, 4.0]])  # median 1 -> scaled by 2 -> same as above
    assert depth_metrics(pred2, gt)["abs_rel"] == pytest.approx((1 + 0 + 5 / 3) / 3)


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
    empty = depth_metrics(pred, torch.zeros_like(gt))
    assert all(math.isnan(v) for v in empty.values())
