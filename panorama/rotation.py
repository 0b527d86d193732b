"""Rotations of the viewing sphere.

Frame (shared with py360convert and the rest of the project): x points right, y up, z forward (the
centre column of an equirect image). A rotation ``R`` maps a ray given in a rotated camera's own frame
to the world frame: ``d_world = R @ d_camera``. So the front face of ``equirect_to_cube(img, F, R)``
looks along ``R @ [0, 0, 1]``.

``rotation_matrix(yaw, pitch, roll)`` is chosen so that this front face equals
``py360convert.e2p(img, 90, u_deg=yaw, v_deg=pitch, out_hw=(F, F), in_rot_deg=roll)``. Working through
py360convert's ``xyzpers`` (row vectors times ``Rx(pitch) @ Ry(-yaw) @ R_axis(roll)``) gives, in column
form, ``R = Ry(yaw) @ Rx(-pitch) @ Rz(-roll)`` with the usual right-handed axis rotations: positive yaw
turns right, positive pitch looks up, positive roll turns the image clockwise.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def _axis_rotations(angles_rad: torch.Tensor, axis: int) -> torch.Tensor:
    """(N,) angles -> (N, 3, 3) right-handed rotations about one coordinate axis."""
    c, s = torch.cos(angles_rad), torch.sin(angles_rad)
    one, zero = torch.ones_like(c), torch.zeros_like(c)
    if axis == 0:  # x
        rows = [one, zero, zero, zero, c, -s, zero, s, c]
    elif axis == 1:  # y
        rows = [c, zero, s, zero, one, zero, -s, zero, c]
    else:  # z
        rows = [c, -s, zero, s, c, zero, zero, zero, one]
    return torch.stack(rows, dim=-1).reshape(-1, 3, 3)


def euler_to_matrix(angles_deg: torch.Tensor) -> torch.Tensor:
    """(N, 3) (yaw, pitch, roll) in degrees -> (N, 3, 3); see the module docstring for the convention."""
    if angles_deg.ndim != 2 or angles_deg.shape[-1] != 3:
        raise ValueError(f"angles must be (N, 3) yaw/pitch/roll in degrees, got {tuple(angles_deg.shape)}")
    rad = angles_deg.to(torch.float64) * (math.pi / 180.0)
    r = _axis_rotations(rad[:, 0], 1) @ _axis_rotations(-rad[:, 1], 0) @ _axis_rotations(-rad[:, 2], 2)
    return r.to(angles_deg.dtype if angles_deg.is_floating_point() else torch.float32)


def rotation_matrix(yaw_deg: float, pitch_deg: float, roll_deg: float, *, dtype=torch.float32,
                    device=None) -> torch.Tensor:
    """A (3, 3) rotation; its front face matches ``py360convert.e2p(img, 90, yaw, pitch, in_rot_deg=roll)``."""
    angles = torch.tensor([[float(yaw_deg), float(pitch_deg), float(roll_deg)]], dtype=torch.float64, device=device)
    return euler_to_matrix(angles)[0].to(dtype)


def random_rotations(n: int, max_deg: float | Sequence[float] = (45.0, 45.0, 45.0), generator=None, *,
                     dtype=torch.float32, device=None) -> torch.Tensor:
    """(n, 3, 3) rotations, each Euler angle uniform in [-max, +max] degrees.

    ``max_deg`` is one number for all three angles or a (yaw, pitch, roll) triple; zeros give identities
    (the "no rotation" ablation). Draws happen on the CPU with ``generator`` so that a seed gives the same
    rotations on every device.
    """
    limits = torch.as_tensor(max_deg, dtype=torch.float64).flatten()
    if limits.numel() == 1:
        limits = limits.repeat(3)
    if limits.numel() != 3 or bool((limits < 0).any()):
        raise ValueError(f"max_deg must be one non-negative number or three, got {max_deg!r}")
    u = torch.rand(n, 3, generator=generator, dtype=torch.float64)
    angles = (u * 2.0 - 1.0) * limits
    return euler_to_matrix(angles).to(dtype=dtype, device=device)
