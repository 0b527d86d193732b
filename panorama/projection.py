"""Equirectangular <-> cube-face resampling, batched, differentiable, CPU and GPU.

Conventions (``DESIGN.md``, and py360convert's, which the tests use as the reference):

* Equirect images are ``(B, C, H, W)`` with ``W == 2H``. Pixel ``(i, j)`` has its centre at longitude
  ``u = ((j + 0.5) / W - 0.5) * 2pi`` and latitude ``v = (0.5 - (i + 0.5) / H) * pi``: column 0 is at
  -180 deg, row 0 at the top. Its ray is ``(cos v sin u, sin v, cos v cos u)`` (x right, y up, z forward).
* Cube faces are ``(B, 6, C, F, F)`` in the order F, R, B, L, U, D. Face ``k`` is a 90 deg pinhole view
  whose camera-to-world rotation is ``FACE_ROTATIONS[k]``; its pixel ``(r, c)`` looks along
  ``FACE_ROTATIONS[k] @ (a_c, b_r, 1)`` with ``a = linspace(-1, 1, F)`` and ``b = -a``: pixel centres span
  the tangent plane from edge to edge (``align_corners=True``), as py360convert's ``e2c`` does.
* A ``rotation`` R (``(3, 3)`` or ``(B, 3, 3)``, see ``panorama.rotation``) rotates the cube: face rays
  become ``R @ d``. ``cube_to_equirect`` with the same R undoes it.

Sampling wraps like py360convert: across the +-180 deg seam, and across a pole to the opposite meridian.
Most samples go through ``grid_sample`` on the unpadded image (padding a 1024x512 batch costs more than
the sampling itself on a CPU); the few whose bilinear footprint crosses the seam or a pole are recomputed
exactly by a small gather.

Speed (``bench/projection.py``, ``bench/README.md``): without rotation the sampling grid is cached and a call
is one ``grid_sample``, whose time on a CPU is its gathers plus the page faults of a fresh output (a
38 MB output for 8 x 6 x 3 x 256^2). With rotations the coordinates are computed on contiguous planes
(two small matmuls, hypot, one atan2), never on strided x/y/z views, which PyTorch does not vectorise.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

FACE_NAMES = ("F", "R", "B", "L", "U", "D")

# Camera-to-world rotation of each cube face: F, R (yaw 90), B (yaw 180), L (yaw -90), U (pitch 90), D.
FACE_ROTATIONS = torch.tensor(
    [
        [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
        [[0, 0, 1], [0, 1, 0], [-1, 0, 0]],
        [[-1, 0, 0], [0, 1, 0], [0, 0, -1]],
        [[0, 0, -1], [0, 1, 0], [1, 0, 0]],
        [[1, 0, 0], [0, 0, 1], [0, -1, 0]],
        [[1, 0, 0], [0, 0, -1], [0, 1, 0]],
    ],
    dtype=torch.float32,
)

_MODES = ("bilinear", "nearest")


def cached_grid(fn):
    """``functools.lru_cache`` for the constant grids of a size and device, built outside inference mode.

    A tensor made under ``torch.inference_mode()`` (an evaluation, a preview) can never join autograd again;
    cached, it would break every later training step that meets the same size. Building the grid with
    inference mode switched off makes it an ordinary constant that both modes can use."""
    @functools.lru_cache(maxsize=16)
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.inference_mode(False):
            return fn(*args, **kwargs)

    return wrapper


def _check_mode(mode: str) -> None:
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")


def pinhole_directions(height: int, width: int, fov_deg: float = 90.0, *, device=None,
                       dtype=torch.float32) -> torch.Tensor:
    """(H, W, 3) rays ``(a, b, 1)`` of a pinhole camera looking along +z, pixel centres edge to edge.

    ``fov_deg`` is the horizontal field of view; pixels are square, so the vertical extent follows.
    """
    half_w = math.tan(math.radians(fov_deg) / 2.0)
    half_h = half_w * (height - 1) / max(width - 1, 1)
    a = torch.linspace(-half_w, half_w, width, device=device, dtype=torch.float64)
    b = torch.linspace(half_h, -half_h, height, device=device, dtype=torch.float64)
    bb, aa = torch.meshgrid(b, a, indexing="ij")
    return torch.stack([aa, bb, torch.ones_like(aa)], dim=-1).to(dtype)


@cached_grid
def _face_directions_cached(face_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    rays = pinhole_directions(face_size, face_size, 90.0, dtype=torch.float64)
    dirs = torch.einsum("kij,hwj->khwi", FACE_ROTATIONS.to(torch.float64), rays)
    return dirs.to(device=device, dtype=dtype)


def face_directions(face_size: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """(6, F, F, 3) unnormalised rays of the unrotated cube (points on the cube of half-size 1)."""
    if face_size < 2:
        raise ValueError(f"face_size must be >= 2, got {face_size}")
    return _face_directions_cached(int(face_size), torch.device(device or "cpu"), dtype)


@cached_grid
def _equirect_directions_cached(height: int, width: int, device: torch.device, dtype: torch.dtype):
    j = torch.arange(width, dtype=torch.float64)
    i = torch.arange(height, dtype=torch.float64)
    u = ((j + 0.5) / width - 0.5) * 2.0 * math.pi
    v = (0.5 - (i + 0.5) / height) * math.pi
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    dirs = torch.stack([torch.cos(vv) * torch.sin(uu), torch.sin(vv), torch.cos(vv) * torch.cos(uu)], dim=-1)
    return dirs.to(device=device, dtype=dtype)


def equirect_directions(height: int, width: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """(H, W, 3) unit rays through the equirect pixel centres."""
    return _equirect_directions_cached(int(height), int(width), torch.device(device or "cpu"), dtype)


def _as_rotation_batch(rotation: torch.Tensor | None, batch: int, device, dtype=torch.float32):
    if rotation is None:
        return None
    rotation = torch.as_tensor(rotation)
    if rotation.shape == (3, 3):
        rotation = rotation.unsqueeze(0)
    if rotation.ndim != 3 or rotation.shape[1:] != (3, 3) or rotation.shape[0] not in (1, batch):
        raise ValueError(f"rotation must be (3, 3) or ({batch}, 3, 3), got {tuple(rotation.shape)}")
    return rotation.to(device=device, dtype=dtype)


def _check_equirect(equi: torch.Tensor, name: str = "equi") -> None:
    if equi.ndim != 4:
        raise ValueError(f"{name} must be (B, C, H, W), got shape {tuple(equi.shape)}")
    h, w = equi.shape[-2:]
    if w != 2 * h:
        raise ValueError(f"{name} must be an equirectangular 2:1 image (W == 2H), got H={h}, W={w}")


@cached_grid
def _face_ray_planes(face_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(3, 6*F*F) unrotated face rays, one contiguous plane per component."""
    rays = face_directions(face_size, dtype=torch.float64).reshape(-1, 3).t()
    return rays.to(device=device, dtype=dtype).contiguous()


def _cube_sampling_grid(rot: torch.Tensor, face_size: int) -> torch.Tensor:
    """(Bg, 3, 3) rotations -> (Bg, 2, 6*F*F) grid_sample coordinates of the rotated cube's pixels.

    The work is laid out as contiguous (Bg, N) planes: one matmul gives (x, y) and one gives (z, z), whose
    second plane is overwritten by hypot(x, z); then a single in-place atan2 yields (longitude u, latitude
    v). Elementwise maths on the x/y/z columns of (Bg, N, 3) rays (strided views) ran ~5x slower (144 vs
    27 ms for 8 x 6 x 256^2 rays on one thread), because atan2 and hypot are only vectorised on contiguous
    data. The rotation is a constant here (no gradient).
    """
    rot = rot.detach()
    planes = _face_ray_planes(face_size, rot.device, rot.dtype)
    b, n = rot.shape[0], planes.shape[1]
    num = (rot[:, :2].reshape(-1, 3) @ planes).view(b, 2, n)  # x, y
    den = (rot[:, 2:].expand(-1, 2, -1).reshape(-1, 3) @ planes).view(b, 2, n)  # z, z
    torch.hypot(num[:, 0], den[:, 0], out=den[:, 1])  # z, hypot(x, z)
    uv = torch.atan2(num, den, out=num)
    # grid_sample's normalised coordinates (align_corners=False) are then simply gx = u / pi and
    # gy = -2 v / pi: they unnormalise to px = (u / 2pi + 0.5) W - 0.5 and py = (0.5 - v / pi) H - 0.5.
    uv[:, 0].mul_(1.0 / math.pi)
    uv[:, 1].mul_(-2.0 / math.pi)
    return uv


def _boundary(grid: torch.Tensor, height: int, width: int):
    """(Bg, 2, N) grid -> indices (g, n) of the samples whose footprint leaves the image (px outside
    [0, W-1] or py outside [0, H-1]): they need the seam/pole wrap. For ``nearest`` this is a small
    superset (a sample that rounds back inside is recomputed exactly, to the same value)."""
    outside = grid[:, 0].abs() > 1.0 - 1.0 / width
    outside |= grid[:, 1].abs() > 1.0 - 1.0 / height
    return outside.nonzero(as_tuple=True)


def _wrapped_flat_index(yi: torch.Tensor, xi: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Integer pixel (y, x), possibly one row/column outside, -> flat index with seam and pole wrap.

    Row -1 is row 0 seen across the north pole (longitude + 180 deg), row H is row H-1 across the south
    pole, exactly as py360convert pads its images.
    """
    xi = torch.remainder(xi, width)
    over = (yi < 0) | (yi > height - 1)
    xi = torch.where(over, torch.remainder(xi + width // 2, width), xi)
    yi = torch.where(yi < 0, -1 - yi, yi)
    yi = torch.where(yi > height - 1, 2 * height - 1 - yi, yi)
    return yi * width + xi


def _exact_samples(img_flat: torch.Tensor, bidx: torch.Tensor, px: torch.Tensor, py: torch.Tensor,
                   height: int, width: int, mode: str) -> torch.Tensor:
    """(K,) samples of (B, C, H*W) at pixel coordinates (px, py) with wrap, -> (K, C)."""
    bidx = bidx.unsqueeze(1)
    cidx = torch.arange(img_flat.shape[1], device=img_flat.device).unsqueeze(0)
    if mode == "nearest":
        flat = _wrapped_flat_index(torch.round(py).long(), torch.round(px).long(), height, width)
        return img_flat[bidx, cidx, flat.unsqueeze(1)]
    x0f, y0f = torch.floor(px), torch.floor(py)
    ax, ay = (px - x0f).unsqueeze(-1), (py - y0f).unsqueeze(-1)
    x0, y0 = x0f.long(), y0f.long()
    out = 0.0
    for dy, wy in ((0, 1.0 - ay), (1, ay)):
        for dx, wx in ((0, 1.0 - ax), (1, ax)):
            flat = _wrapped_flat_index(y0 + dy, x0 + dx, height, width)
            out = out + img_flat[bidx, cidx, flat.unsqueeze(1)] * (wy * wx).to(img_flat.dtype)
    return out


def _sample_equirect(img: torch.Tensor, grid: torch.Tensor, mode: str,
                     boundary: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Sample (B, C, H, W) at a (Bg, 2, N) grid (Bg is 1 or B) -> (B, C, N).

    ``grid_sample`` reads the grid's x and y planes as two contiguous vectors, so the (Bg, 2, N) layout
    needs no interleaving copy; a shared grid is expanded (stride 0), which measured faster than folding
    the batch into channels (``grid_sample`` parallelises over the batch only).
    """
    b, c, h, w = img.shape
    work = img if img.dtype in (torch.float32, torch.float64) else img.float()
    g = grid.to(work.dtype).transpose(1, 2).unsqueeze(1).expand(b, -1, -1, -1)  # (B, 1, N, 2) view
    out = F.grid_sample(work, g, mode=mode, padding_mode="border", align_corners=False)[:, :, 0]
    if boundary is None:
        boundary = _boundary(grid, h, w)
    gidx, nidx = boundary
    if nidx.numel():
        if grid.shape[0] == b:
            bidx = gidx
        else:  # one shared grid: every image has the same boundary samples
            bidx = torch.arange(b, device=img.device).repeat_interleave(nidx.numel())
            gidx, nidx = torch.zeros_like(nidx).repeat(b), nidx.repeat(b)
        sel = grid[gidx, :, nidx].to(torch.float64)  # (K, 2), unnormalised like grid_sample does
        px = (sel[:, 0] + 1.0) * (w / 2.0) - 0.5
        py = (sel[:, 1] + 1.0) * (h / 2.0) - 0.5
        vals = _exact_samples(work.reshape(b, c, h * w), bidx, px, py, h, w, mode)
        out.index_put_((bidx.unsqueeze(1), torch.arange(c, device=img.device).unsqueeze(0),
                        nidx.unsqueeze(1)), vals)
    return out.to(img.dtype)


@cached_grid
def _identity_cube_grid_and_boundary(face_size: int, height: int, width: int, device: torch.device):
    eye = torch.eye(3, dtype=torch.float64, device=device).unsqueeze(0)
    grid = _cube_sampling_grid(eye, face_size).float()  # computed in float64, then rounded once
    return grid, _boundary(grid, height, width)


def equirect_to_cube(equi: torch.Tensor, face_size: int, rotation: torch.Tensor | None = None,
                     mode: str = "bilinear") -> torch.Tensor:
    """(B, C, H, 2H) -> (B, 6, C, F, F) cube faces F, R, B, L, U, D, optionally of a rotated cube.

    With ``rotation=None`` face k equals ``py360convert.e2c(img, F, cube_format="list")[k]``; with
    ``rotation_matrix(yaw, pitch, roll)`` the front face equals ``py360convert.e2p(img, 90, yaw, pitch,
    (F, F), in_rot_deg=roll)``. The result may be a permuted view; call ``.contiguous()`` if needed.
    """
    _check_equirect(equi)
    _check_mode(mode)
    b, c, h, w = equi.shape
    f = int(face_size)
    rot = _as_rotation_batch(rotation, b, equi.device)
    if rot is None:
        grid, boundary = _identity_cube_grid_and_boundary(f, h, w, equi.device)
    else:
        grid, boundary = _cube_sampling_grid(rot, f), None
    out = _sample_equirect(equi, grid, mode, boundary)
    return out.reshape(b, c, 6, f, f).transpose(1, 2)


def cube_to_equirect(faces: torch.Tensor, height: int, width: int, rotation: torch.Tensor | None = None,
                     mode: str = "bilinear") -> torch.Tensor:
    """(B, 6, C, F, F) -> (B, C, H, W): the inverse of ``equirect_to_cube`` with the same rotation.

    Each equirect ray is taken into the cube's frame (``R^T d``), assigned to the face it hits, and
    sampled inside that face only (coordinates are clamped to the face's pixel centres, which reach its
    edges), so no value bleeds from one face into the next. Note: py360convert's ``c2e`` places face
    pixels half a pixel off its own ``e2c``; we keep ``e2c``'s convention in both directions.
    """
    if faces.ndim != 5 or faces.shape[1] != 6 or faces.shape[-1] != faces.shape[-2]:
        raise ValueError(f"faces must be (B, 6, C, F, F), got shape {tuple(faces.shape)}")
    if width != 2 * height:
        raise ValueError(f"equirect output must be 2:1, got height={height}, width={width}")
    _check_mode(mode)
    b, _, c, f, _ = faces.shape
    rot = _as_rotation_batch(rotation, b, faces.device)
    if rot is None:
        grid = _identity_equirect_grid(f, height, width, faces.device)
    else:
        grid = _equirect_sampling_grid(rot, f, height, width, faces.device)
    tall = faces.transpose(1, 2).reshape(b, c, 6 * f, f)  # a view when faces came from equirect_to_cube
    work = tall if tall.dtype in (torch.float32, torch.float64) else tall.float()
    g = grid.to(work.dtype).transpose(1, 2).unsqueeze(1).expand(b, -1, -1, -1)  # (B, 1, HW, 2) view
    out = F.grid_sample(work, g, mode=mode, padding_mode="border", align_corners=True)
    return out.reshape(b, c, height, width).to(faces.dtype)


@cached_grid
def _equirect_ray_planes(height: int, width: int, device: torch.device) -> torch.Tensor:
    """(3, H*W) equirect pixel rays (float32), one contiguous plane per component."""
    return equirect_directions(height, width, device=device).reshape(-1, 3).t().contiguous()


def _equirect_sampling_grid(rot: torch.Tensor | None, face_size: int, height: int, width: int,
                            device) -> torch.Tensor:
    """(Bg, 3, 3) rotations (or None) -> (Bg, 2, H*W) grid_sample coordinates (align_corners=True) into
    the (C, 6F, F) column of faces, for every equirect pixel. Computed on contiguous (Bg, HW) planes,
    like ``_cube_sampling_grid``, because elementwise ops on strided x/y/z views are not vectorised."""
    planes = _equirect_ray_planes(height, width, torch.device(device))
    if rot is None:
        x, y, z = planes.unsqueeze(1)  # (1, HW) each
    else:
        rt = rot.detach().transpose(1, 2)  # the rotation is a constant here (no gradient)
        x, y, z = (rt[:, i] @ planes for i in range(3))  # R^T d, one (B, HW) plane at a time
    face, a, b = _face_coords(x, y, z)
    last = face_size - 1
    gx = a.add_(1.0).mul_(0.5).clamp_(0.0, 1.0).mul_(last).mul_(2.0 / last).sub_(1.0)
    row = b.neg_().add_(1.0).mul_(0.5).clamp_(0.0, 1.0).mul_(last)
    gy = face.mul_(face_size).add_(row).mul_(2.0 / (6 * face_size - 1)).sub_(1.0)
    return torch.stack([gx, gy], dim=1)


@cached_grid
def _identity_equirect_grid(face_size: int, height: int, width: int, device: torch.device) -> torch.Tensor:
    return _equirect_sampling_grid(None, face_size, height, width, device)


def _face_coords(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor):
    """Ray components in the cube's frame -> (face index as x's dtype, a, b); see ``ray_face_coords``.

    The hit face is that of the dominant component (ties go to the lower axis, as ``argmax`` does). Its
    local ray ``FACE_ROTATIONS[k]^T d`` is a signed permutation of d, F (x, y, z), R (-z, y, x),
    B (-x, y, -z), L (z, y, -x), U (x, -z, y), D (x, z, -y), so (a, b) = (lx / lz, ly / lz) reduce to the
    quotients below (equal bit for bit: IEEE division is symmetric in sign). Written out, this avoids a
    (..., 3, 3) gather of face rotations and a batched matmul per ray.
    """
    ax, ay, az = x.abs(), y.abs(), z.abs()
    on_x = (ax >= ay) & (ax >= az)
    on_y = (ay >= az) & ~on_x
    comp = torch.where(on_x, x, torch.where(on_y, y, z))  # the dominant component, signed
    neg = (comp < 0).to(x.dtype)
    # x: +R(1) -L(3); y: +U(4) -D(5); z: +F(0) -B(2)
    face = torch.where(on_x, 1.0 + 2.0 * neg, torch.where(on_y, 4.0 + neg, 2.0 * neg))
    a = torch.where(on_x, -z, x) / torch.where(on_y, ay, comp)
    b = torch.where(on_y, -z, y) / torch.where(on_y, y, comp.abs())
    return face, a, b


def ray_face_coords(dirs: torch.Tensor):
    """Rays (..., 3) in the cube's frame -> (face index, a, b): the face hit and the tangent-plane point."""
    face, a, b = _face_coords(*dirs.unbind(-1))
    return face.long(), a, b
