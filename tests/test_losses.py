import torch

from student.losses import affine_invariant_loss, normalize_disparity


def test_affine_invariant_loss_ignores_scale_and_shift_per_map():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(4, 1, 16, 32, generator=g)
    pred = target * torch.tensor([2.0, 0.5, 7.0, 1.0]).view(4, 1, 1, 1) + torch.tensor([1.0, -3, 0, 5]).view(4, 1, 1, 1)
    assert affine_invariant_loss(pred, target).item() < 1e-6
    assert affine_invariant_loss(torch.rand(4, 1, 16, 32, generator=g), target).item() > 0.3


def test_affine_invariant_loss_value_by_hand():
    # one map of 4 valid pixels: target [0, 1, 2, 3] -> median 1 (lower), MAD (1+0+1+2)/4 = 1
    # pred [0, 0, 0, 4] -> median 0, MAD (0+0+0+4)/4 = 1 -> normalised [0, 0, 0, 4]
    # target normalised [-1, 0, 1, 2]; |diff| = [1, 0, 1, 2] -> mean 1.0
    target = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    pred = torch.tensor([[0.0, 0.0], [0.0, 4.0]])
    assert affine_invariant_loss(pred, target).item() == 1.0


def test_mask_excludes_pixels_and_empty_or_constant_maps_give_zero():
    target = torch.rand(2, 1, 8, 8)
    pred = target.clone()
    pred[0, 0, 0, 0] = 100.0  # an outlier ...
    mask = torch.ones_like(target, dtype=torch.bool)
    mask[0, 0, 0, 0] = False  # ... that the mask removes
    assert affine_invariant_loss(pred, target, mask).item() < 1e-6
    empty = torch.zeros_like(mask)
    loss = affine_invariant_loss(pred.requires_grad_(True), target, empty)
    assert loss.item() == 0.0
    loss.backward()  # graph-connected, no NaN
    assert torch.isfinite(pred.grad).all()
    const = torch.full((1, 1, 8, 8), 0.3)
    assert affine_invariant_loss(torch.rand(1, 1, 8, 8), const).item() == 0.0
    assert affine_invariant_loss(const.clone(), const).item() == 0.0


def test_loss_is_per_face_for_cube_batches_and_has_gradients():
    target = torch.rand(2, 6, 1, 8, 8)
    pred = (target * torch.arange(1, 13).float().view(2, 6, 1, 1, 1)).requires_grad_(True)
    assert affine_invariant_loss(pred, target).item() < 1e-5  # a different scale per face is forgiven
    per = affine_invariant_loss(torch.rand(2, 6, 1, 8, 8), target, reduction="none")
    assert per.shape == (12,)
    noisy = (pred + torch.randn_like(pred)).detach().requires_grad_(True)
    affine_invariant_loss(noisy, target).backward()
    assert noisy.grad.abs().sum() > 0 and torch.isfinite(noisy.grad).all()


def test_nan_targets_are_ignored():
    target = torch.rand(1, 1, 8, 8)
    target[0, 0, :2] = float("nan")
    assert torch.isfinite(affine_invariant_loss(target.nan_to_num() * 3, target))


def test_normalize_disparity():
    d = torch.tensor([[[1.0, 3.0], [5.0, 100.0]]])
    valid = torch.tensor([[[True, True], [True, False]]])
    out = normalize_disparity(d, valid)
    assert out.tolist() == [[[0.0, 0.5], [1.0, 0.0]]]
    assert normalize_disparity(torch.full((1, 4, 4), 2.0)).abs().sum() == 0
