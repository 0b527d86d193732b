"""equirect_to_cube / cube_to_equirect against py360convert, and their inverse relation."""

import numpy as np
import py360convert
import pytest
import torch

from conftest import smooth_panorama
from panorama import (cube_to_equirect, equirect_to_cube, random_rotations, rotation_matrix)


def _t(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img).permute(2, 0, 1)[None].contiguous()


@pytest.mark.parametrize("face", [31, 32, 48, 65])
def test_unrotated_faces_match_py360convert_e2c(face):
    img = smooth_panorama(128, 256, seed=face)
    ref = np.stack(py360convert.e2c(img, face, cube_format="list"))  # (6, F, F, C)
    ours = equirect_to_cube(_t(img), face)[0].permute(0, 2, 3, 1).numpy()
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).mean() < 2e-3


@pytest.mark.parametrize("face", [33, 40])
@pytest.mark.parametrize("angles", [(0, 0, 0), (30, 20, 10), (-170, -60, 45), (90, 85, -20), (180, 0, -30)])
def test_rotated_front_face_matches_py360convert_e2p(face, angles):
    img = smooth_panorama(128, 256, seed=1)
    yaw, pitch, roll = angles
    ref = py360convert.e2p(img, 90, yaw, pitch, (face, face), in_rot_deg=roll)
    ours = equirect_to_cube(_t(img), face, rotation=rotation_matrix(*angles))[0, 0].permute(1, 2, 0).numpy()
    assert np.abs(ours - ref).mean() < 2e-3


def test_seams_and_poles_wrap_exactly_like_py360convert(monkeypatch):
    """On white noise any wrap mistake shows; py360convert's scipy path samples without cv2's rounding."""
    import py360convert.utils as utils

    monkeypatch.setattr(utils, "cv2", None)
    img = np.random.default_rng(0).random((64, 128, 3)).astype(np.float32)
    for face in (16, 17):
        ref = np.stack(py360convert.e2c(img, face, cube_format="list"))
        ours = equirect_to_cube(_t(img), face)[0].permute(0, 2, 3, 1).numpy()
        assert np.abs(ours - ref).max() < 1e-4
    for angles in [(180, 0, 0), (0, 90, 0), (37, -80, 12)]:  # back-face seam, north pole, near south pole
        ref = py360convert.e2p(img, 90, angles[0], angles[1], (24, 24), in_rot_deg=angles[2])
        ours = equirect_to_cube(_t(img), 24, rotation=rotation_matrix(*angles))[0, 0].permute(1, 2, 0).numpy()
        assert np.abs(ours - ref).max() < 1e-4


def test_batched_rotations_equal_one_at_a_time():
    x = _t(smooth_panorama(64, 128)).repeat(3, 1, 1, 1)
    x[1] = x[1].flip(-1)
    rots = random_rotations(3, generator=torch.Generator().manual_seed(0))
    batched = equirect_to_cube(x, 20, rotation=rots)
    for i in range(3):
        single = equirect_to_cube(x[i:i + 1], 20, rotation=rots[i])
        assert torch.allclose(batched[i], single[0], atol=1e-6)


def test_rotation_round_trip_error_well_below_signal():
    x = _t(smooth_panorama(128, 256, seed=4)).repeat(2, 1, 1, 1)
    rots = random_rotations(2, generator=torch.Generator().manual_seed(1))
    back = cube_to_equirect(equirect_to_cube(x, 64, rotation=rots), 128, 256, rotation=rots)
    err = (back - x).abs().mean().item()
    assert err < 0.01 * x.std().item()
    # and a wrong inverse rotation does not round-trip: the test can fail
    wrong = cube_to_equirect(equirect_to_cube(x, 64, rotation=rots), 128, 256, rotation=rots.flip(0))
    assert (wrong - x).abs().mean().item() > 10 * err


def test_cube_to_equirect_matches_py360convert_c2e_up_to_its_half_pixel_offset():
    """py360convert's c2e samples faces half a pixel off its own e2c; on smooth data they still agree."""
    img = smooth_panorama(128, 256, seed=2)
    faces = np.stack(py360convert.e2c(img, 64, cube_format="list"))
    ref = py360convert.c2e(list(faces), 128, 256, cube_format="list")
    ours = cube_to_equirect(torch.from_numpy(faces).permute(0, 3, 1, 2)[None], 128, 256)[0].permute(1, 2, 0)
    assert np.abs(ours.numpy() - ref).mean() < 5e-3


def test_gradients_flow_from_face_loss_to_equirect():
    x = _t(smooth_panorama(32, 64)).requires_grad_(True)
    rots = random_rotations(1, generator=torch.Generator().manual_seed(2))
    faces = equirect_to_cube(x, 12, rotation=rots)
    faces[:, 2].sum().backward()  # a loss on the back face only
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0
    back_half = x.grad[..., :, :16].abs().sum() + x.grad[..., :, 48:].abs().sum()
    assert back_half > 10 * x.grad[..., :, 24:40].abs().sum()  # the front meridian gets (almost) none


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_accepted(dtype):
    x = _t(smooth_panorama(64, 128))
    full = equirect_to_cube(x, 24, rotation=rotation_matrix(10, 20, 30))
    half = equirect_to_cube(x.to(dtype), 24, rotation=rotation_matrix(10, 20, 30))
    assert half.dtype == dtype
    assert (half.float() - full).abs().mean() < 1e-2
    back = cube_to_equirect(half, 64, 128)
    assert back.dtype == dtype and back.shape == (1, 3, 64, 128)


def test_nearest_mode_keeps_labels():
    labels = torch.randint(0, 5, (1, 1, 32, 64)).float()
    faces = equirect_to_cube(labels, 16, mode="nearest")
    assert set(faces.unique().tolist()) <= set(range(5))


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="2:1"):
        equirect_to_cube(torch.zeros(1, 3, 32, 48), 8)
    with pytest.raises(ValueError, match="rotation"):
        equirect_to_cube(torch.zeros(2, 3, 32, 64), 8, rotation=torch.eye(3).expand(3, 3, 3))
    with pytest.raises(ValueError, match="mode"):
        equirect_to_cube(torch.zeros(1, 3, 32, 64), 8, mode="bicubic")
    with pytest.raises(ValueError, match="faces"):
        cube_to_equirect(torch.zeros(1, 5, 3, 8, 8), 32, 64)


def test_ray_face_coords_equal_the_face_rotation_matmul_bit_for_bit():
    """The written-out face selection equals FACE_ROTATIONS[k]^T d, including ties between axes."""
    from panorama import FACE_ROTATIONS, ray_face_coords

    dirs = torch.cat([torch.randn(5000, 3, generator=torch.Generator().manual_seed(0)),
                      torch.tensor([[1.0, 1, 1], [1, -1, 0], [-1, 1, -1], [2, -2, 1], [-2, 1, 2], [1, -3, 3],
                                    [0, 0, -1], [0, -1, 0], [-1, 0, 0]])])
    face, a, b = ray_face_coords(dirs)
    axis = dirs.abs().argmax(-1)  # first maximum wins ties
    comp = dirs.gather(-1, axis[:, None])[:, 0]
    expected = torch.where(comp >= 0, torch.tensor([1, 4, 0])[axis], torch.tensor([3, 5, 2])[axis])
    local = (dirs[:, None] @ FACE_ROTATIONS[expected])[:, 0]
    assert torch.equal(face, expected)
    assert torch.equal(a, local[:, 0] / local[:, 2]) and torch.equal(b, local[:, 1] / local[:, 2])


def _yaw_pitch_roll(r: np.ndarray) -> tuple[float, float, float]:
    """Inverse of ``rotation_matrix`` (R = Ry(yaw) Rx(-pitch) Rz(-roll)), in degrees."""
    pitch = np.arcsin(np.clip(r[1, 2], -1.0, 1.0))
    yaw = np.arctan2(r[0, 2], r[2, 2])
    rest = (rotation_matrix(0, np.degrees(pitch), 0, dtype=torch.float64).numpy().T
            @ rotation_matrix(np.degrees(yaw), 0, 0, dtype=torch.float64).numpy().T @ r)  # Rz(-roll)
    return float(np.degrees(yaw)), float(np.degrees(pitch)), float(-np.degrees(np.arctan2(rest[1, 0], rest[0, 0])))


def test_every_face_of_a_rotated_cube_matches_py360convert_e2p_exactly(monkeypatch):
    """All six faces, not only the front one, on noise and on py360convert's exact scipy path."""
    import py360convert.utils as utils
    from panorama import FACE_ROTATIONS

    monkeypatch.setattr(utils, "cv2", None)
    img = np.random.default_rng(3).random((64, 128, 3)).astype(np.float32)
    rots = torch.stack([rotation_matrix(170, -70, 25), rotation_matrix(-30, 80, -100)])  # seam, both poles
    cube = equirect_to_cube(_t(img).repeat(2, 1, 1, 1), 24, rotation=rots)
    for i in range(2):
        for k in range(6):
            m = rots[i].double().numpy() @ FACE_ROTATIONS[k].double().numpy()
            angles = _yaw_pitch_roll(m)
            assert np.abs(rotation_matrix(*angles, dtype=torch.float64).numpy() - m).max() < 1e-6
            ref = py360convert.e2p(img, 90, angles[0], angles[1], (24, 24), in_rot_deg=angles[2])
            assert np.abs(cube[i, k].permute(1, 2, 0).numpy() - ref).max() < 1e-4, (i, k)


def test_layout_of_the_input_does_not_change_the_result():
    x = _t(np.random.default_rng(4).random((32, 64, 3)).astype(np.float32)).repeat(2, 1, 1, 1)
    rots = random_rotations(2, 180, generator=torch.Generator().manual_seed(5))
    for rot in (None, rots):
        ref = equirect_to_cube(x, 17, rotation=rot)
        other = equirect_to_cube(x.contiguous(memory_format=torch.channels_last), 17, rotation=rot)
        assert torch.allclose(other, ref, atol=1e-6)
    # a rotation that requires grad is treated as a constant; the image still gets its gradient
    xg = x.clone().requires_grad_(True)
    equirect_to_cube(xg, 9, rotation=rots.clone().requires_grad_(True)).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


def test_a_grid_first_built_under_inference_mode_still_serves_training():
    # an evaluation or preview under inference_mode must not poison the cached grids of later training steps
    from panorama.projection import cube_to_equirect, equirect_to_cube

    size, h = 7, 11  # sizes no other test uses, so this test builds the grids first
    with torch.inference_mode():
        equirect_to_cube(torch.rand(1, 1, h, 2 * h), size)
        cube_to_equirect(torch.rand(1, 6, 1, size, size), h, 2 * h)
    x = torch.rand(1, 1, h, 2 * h, requires_grad=True)
    y = cube_to_equirect(equirect_to_cube(x, size), h, 2 * h)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
