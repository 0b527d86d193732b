"""Radial vs planar depth on an analytic scene: the camera at the centre of a cube room of half-size d."""

import torch

from panorama import (FACE_ROTATIONS, depth_to_disparity, depth_to_points, disparity_to_depth,
                      equirect_directions, equirect_to_planar_faces, face_directions, planar_faces_to_equirect,
                      random_rotations)

D = 2.5


def cube_room_radial(h, w):
    rays = equirect_directions(h, w, dtype=torch.float64)
    return (D / rays.abs().amax(-1)).float()[None, None]


def test_unrotated_planar_face_depth_is_the_wall_distance():
    depth = cube_room_radial(256, 512)
    faces = equirect_to_planar_faces(depth, 64, quantity="depth")[0, :, 0]  # (6, F, F)
    inner = faces[:, 3:-3, 3:-3]  # the cube room's edges fall on the face borders
    assert (inner - D).abs().max() < 5e-3 * D
    # without the radial->planar conversion the corners would be sqrt(3) too far
    from panorama import equirect_to_cube
    raw = equirect_to_cube(depth, 64)[0, :, 0]
    assert raw[:, 3, 3].mean() > 1.6 * D


def test_rotated_planar_depth_matches_analytic_scene():
    depth = cube_room_radial(256, 512)
    rots = random_rotations(2, generator=torch.Generator().manual_seed(5))
    faces = equirect_to_planar_faces(depth.repeat(2, 1, 1, 1), 48, rotation=rots, quantity="depth")[:, :, 0]
    rays = face_directions(48, dtype=torch.float64)  # (6, F, F, 3), (a, b, 1) in each face's frame
    for i in range(2):
        world = rays @ rots[i].double().T
        radial = D * world.norm(dim=-1) / world.abs().amax(-1)
        planar = radial / rays.norm(dim=-1)
        rel = (faces[i].double() - planar).abs() / planar
        assert rel.median() < 1e-3
    # disparity goes the other way round
    disp = equirect_to_planar_faces(depth_to_disparity(depth), 48, rotation=rots[:1], quantity="disparity")
    dep = equirect_to_planar_faces(depth, 48, rotation=rots[:1], quantity="depth")
    assert ((disp * dep)[..., 4:-4, 4:-4] - 1).abs().median() < 1e-3


def test_planar_faces_back_to_radial_equirect():
    depth = cube_room_radial(128, 256)
    rot = random_rotations(1, generator=torch.Generator().manual_seed(9))
    faces = equirect_to_planar_faces(depth, 64, rotation=rot, quantity="depth")
    back = planar_faces_to_equirect(faces, 128, 256, rotation=rot, quantity="depth")
    assert ((back - depth).abs() / depth).median() < 2e-3


def test_face_rotations_are_the_cube_faces():
    rays = face_directions(3)
    for k in range(6):
        assert torch.allclose(rays[k, 1, 1], FACE_ROTATIONS[k] @ torch.tensor([0.0, 0.0, 1.0]))


def test_points_lie_on_the_room():
    pts = depth_to_points(cube_room_radial(32, 64))
    assert pts.shape == (1, 32 * 64, 3)
    assert torch.allclose(pts.abs().amax(-1), torch.full((1, 32 * 64), D), atol=1e-4)


def test_disparity_helpers_mark_invalid_as_zero():
    depth = torch.tensor([[2.0, 0.0, -1.0, float("nan"), float("inf")]])
    disp = depth_to_disparity(depth)
    assert disp.tolist() == [[0.5, 0.0, 0.0, 0.0, 0.0]]
    assert disparity_to_depth(torch.tensor([0.5, 0.0, 0.01]), max_depth=10).tolist() == [2.0, 0.0, 10.0]
