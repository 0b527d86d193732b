"""Radial panorama depth vs planar per-face depth, disparity helpers, and point clouds.

A panorama stores *radial* depth: the distance from the camera centre along the pixel's ray. A
perspective teacher predicts *planar* depth: the distance along its optical axis. For a face pixel whose
ray is ``(a, b, 1)`` in the face camera's frame, ``planar = radial / sqrt(1 + a^2 + b^2)``. The factor
depends only on the pixel's place in the face, never on the cube's rotation, so one (F, F) map serves
all six faces of every rotated cube. Disparities scale the other way round.

Why it matters: the affine-invariant loss forgives one scale and shift per face, not a per-pixel factor
that grows to sqrt(3) in the corners. Comparing radial student disparity with planar teacher disparity
would teach the student a cube-shaped distortion.
"""

from __future__ import annotations


import torch

from .projection import cached_grid, cube_to_equirect, equirect_directions, equirect_to_cube, pinhole_directions

_QUANTITIES = ("depth", "disparity")


@cached_grid
def _ray_scale_cached(face_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return pinhole_directions(face_size, face_size, 90.0, dtype=torch.float64).norm(dim=-1).to(device, dtype)


def face_ray_scale(face_size: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """(F, F) map of ``sqrt(1 + a^2 + b^2)``: radial depth / planar depth at each face pixel."""
    return _ray_scale_cached(int(face_size), torch.device(device or "cpu"), dtype)


def _scale_like(faces: torch.Tensor) -> torch.Tensor:
    if faces.shape[-1] != faces.shape[-2]:
        raise ValueError(f"cube faces must be square in their last two dims, got {tuple(faces.shape)}")
    return face_ray_scale(faces.shape[-1], device=faces.device, dtype=faces.dtype)


def radial_to_planar(face_depth: torch.Tensor) -> torch.Tensor:
    """Radial depth sampled on cube faces (..., F, F) -> planar depth along each face's axis."""
    return face_depth / _scale_like(face_depth)


def planar_to_radial(face_depth: torch.Tensor) -> torch.Tensor:
    """Planar per-face depth (..., F, F) -> radial depth."""
    return face_depth * _scale_like(face_depth)


def radial_to_planar_disparity(face_disp: torch.Tensor) -> torch.Tensor:
    """1/radial on cube faces (..., F, F) -> 1/planar, comparable to a perspective teacher's output."""
    return face_disp * _scale_like(face_disp)


def planar_to_radial_disparity(face_disp: torch.Tensor) -> torch.Tensor:
    """1/planar per face (..., F, F) -> 1/radial."""
    return face_disp / _scale_like(face_disp)


def _check_quantity(quantity: str) -> None:
    if quantity not in _QUANTITIES:
        raise ValueError(f"quantity must be one of {_QUANTITIES}, got {quantity!r}")


def equirect_to_planar_faces(equi: torch.Tensor, face_size: int, rotation=None, quantity: str = "disparity",
                             mode: str = "bilinear") -> torch.Tensor:
    """Radial equirect depth or disparity (B, C, H, W) -> planar per-face values (B, 6, C, F, F).

    This is how a student's panorama prediction becomes comparable with a perspective teacher's answer
    on the faces of the same rotated cube.
    """
    _check_quantity(quantity)
    faces = equirect_to_cube(equi, face_size, rotation=rotation, mode=mode)
    return radial_to_planar(faces) if quantity == "depth" else radial_to_planar_disparity(faces)


def planar_faces_to_equirect(faces: torch.Tensor, height: int, width: int, rotation=None,
                             quantity: str = "disparity", mode: str = "bilinear") -> torch.Tensor:
    """Planar per-face depth or disparity (B, 6, C, F, F) -> radial equirect (B, C, H, W)."""
    _check_quantity(quantity)
    radial = planar_to_radial(faces) if quantity == "depth" else planar_to_radial_disparity(faces)
    return cube_to_equirect(radial, height, width, rotation=rotation, mode=mode)


def depth_to_disparity(depth: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """1/depth where depth is positive and finite (and ``valid``), 0 elsewhere."""
    ok = torch.isfinite(depth) & (depth > 0)
    if valid is not None:
        ok = ok & valid.bool()
    return torch.where(ok, 1.0 / torch.where(ok, depth, torch.ones_like(depth)), torch.zeros_like(depth))


def disparity_to_depth(disp: torch.Tensor, max_depth: float | None = None) -> torch.Tensor:
    """1/disparity for positive disparity; 0 (invalid) elsewhere; optionally capped at ``max_depth``."""
    ok = torch.isfinite(disp) & (disp > 0)
    depth = torch.where(ok, 1.0 / torch.where(ok, disp, torch.ones_like(disp)), torch.zeros_like(disp))
    if max_depth is not None:
        depth = torch.where(ok, depth.clamp(max=max_depth), depth)
    return depth


def depth_to_points(depth: torch.Tensor) -> torch.Tensor:
    """Radial equirect depth (B, 1, H, W) or (B, H, W) -> (B, H*W, 3) points, x right, y up, z forward."""
    if depth.ndim == 4:
        if depth.shape[1] != 1:
            raise ValueError(f"depth must have one channel, got shape {tuple(depth.shape)}")
        depth = depth[:, 0]
    if depth.ndim != 3:
        raise ValueError(f"depth must be (B, 1, H, W) or (B, H, W), got shape {tuple(depth.shape)}")
    b, h, w = depth.shape
    rays = equirect_directions(h, w, device=depth.device, dtype=depth.dtype)
    return (rays.unsqueeze(0) * depth.unsqueeze(-1)).reshape(b, h * w, 3)


def depth_to_normals(depth: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Radial equirect depth (B, 1, H, W) -> unit surface normals (B, 3, H, W) and their validity.

    Spherical back-projection: each pixel becomes the point ``depth * ray`` (x right, y up, z forward);
    central differences along the row (wrapping at the +-180 deg seam) and the column (one-sided at the
    poles) give two tangents whose cross product is the normal, turned to face the camera. A normal is
    valid where the pixel and the four neighbours it used are valid and the tangents are not degenerate.
    Normals do not change when the depth is scaled, so comparing them is scale-free.
    """
    if depth.ndim != 4 or depth.shape[1] != 1:
        raise ValueError(f"depth must be (B, 1, H, W), got shape {tuple(depth.shape)}")
    b, _, h, w = depth.shape
    ok = torch.isfinite(depth) & (depth > 0)
    if valid is not None:
        ok = ok & valid.bool()
    rays = equirect_directions(h, w, device=depth.device, dtype=depth.dtype).permute(2, 0, 1)
    pts = torch.where(ok, depth, torch.zeros_like(depth)) * rays  # (B, 3, H, W)
    du = torch.roll(pts, -1, dims=-1) - torch.roll(pts, 1, dims=-1)
    up = torch.cat([pts[..., :1, :], pts[..., :-1, :]], dim=-2)
    down = torch.cat([pts[..., 1:, :], pts[..., -1:, :]], dim=-2)
    dv = down - up
    n = torch.cross(dv, du, dim=1)
    norm = n.norm(dim=1, keepdim=True)
    n = n / norm.clamp_min(1e-12)
    n = torch.where((n * pts).sum(dim=1, keepdim=True) > 0, -n, n)  # face the camera
    okf = ok.float()
    neighbours = (torch.roll(okf, -1, -1) * torch.roll(okf, 1, -1)
                  * torch.cat([okf[..., :1, :], okf[..., :-1, :]], -2) * torch.cat([okf[..., 1:, :], okf[..., -1:, :]], -2))
    good = ok & (neighbours > 0) & (norm > 1e-12 * depth.abs().amax().clamp_min(1.0) ** 2)
    return n, good
