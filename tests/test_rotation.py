import math

import pytest
import torch

from panorama import random_rotations, rotation_matrix


def test_rotation_matrix_is_orthonormal_and_turns_the_expected_way():
    r = rotation_matrix(30, -20, 10)
    assert torch.allclose(r @ r.T, torch.eye(3), atol=1e-6)
    assert torch.det(r).item() == pytest.approx(1.0, abs=1e-6)
    fwd = torch.tensor([0.0, 0.0, 1.0])
    # positive yaw looks right (+x), positive pitch looks up (+y)
    assert (rotation_matrix(90, 0, 0) @ fwd).tolist() == pytest.approx([1, 0, 0], abs=1e-6)
    assert (rotation_matrix(0, 90, 0) @ fwd).tolist() == pytest.approx([0, 1, 0], abs=1e-6)
    # roll does not move the optical axis
    assert (rotation_matrix(0, 0, 77) @ fwd).tolist() == pytest.approx([0, 0, 1], abs=1e-6)


def test_random_rotations_respect_limits_and_seed():
    g = torch.Generator().manual_seed(3)
    r1 = random_rotations(64, (45, 45, 45), generator=g)
    r2 = random_rotations(64, (45, 45, 45), generator=torch.Generator().manual_seed(3))
    assert r1.shape == (64, 3, 3)
    assert torch.equal(r1, r2)
    eye = torch.eye(3).expand(64, 3, 3)
    assert torch.allclose(r1 @ r1.transpose(1, 2), eye, atol=1e-5)
    # the optical axis stays within the yaw/pitch box (45 deg each): its angle from +z is at most ~60 deg
    fwd = r1[:, :, 2]
    angle = torch.rad2deg(torch.acos(fwd[:, 2].clamp(-1, 1)))
    assert angle.max() <= math.degrees(math.acos(math.cos(math.radians(45)) ** 2)) + 1e-3
    assert angle.max() > 20  # and they really vary
    assert torch.allclose(random_rotations(5, 0), torch.eye(3).expand(5, 3, 3))


def test_random_rotations_rejects_bad_limits():
    with pytest.raises(ValueError):
        random_rotations(2, (10, 20))
    with pytest.raises(ValueError):
        random_rotations(2, -5)
