"""Generated indoor scenes with exact depth, ray-cast on the CPU with numpy.

A scene (``sharding.synthetic_scenes``: ``make_scene``, ``Scene``, ``STYLES``; re-exported here) is an
axis-aligned room with furniture (boxes and vertical cylinders), procedural textures, point lights and
optional windows onto a sky. Rendering casts one ray per pixel against every surface at
once (room planes, slab tests for boxes, a quadratic for cylinders) and keeps the nearest positive hit.

Conventions (``docs/DESIGN.md`` and ``panorama``):

* World frame: x right, y up, z forward. The room is ``[0, W] x [0, H] x [0, D]`` (floor ``y = 0``); the
  camera is level, at ``scene.camera``, at least ``CAMERA_CLEARANCE`` metres from every surface and
  outside every object.
* Panoramas use ``panorama.equirect_directions`` (unit rays, row 0 at the top, column 0 at longitude
  -180 deg, the centre looking along +z); their depth is **radial**: the distance from the camera centre.
* Perspective views take a camera-to-world rotation ``M`` and cast the pinhole rays ``(a, b, 1)`` of
  ``panorama.pinhole_directions`` as ``M @ (a, b, 1)`` without normalising, so the ray parameter at the hit
  is the **planar** depth along the optical axis ``M @ (0, 0, 1)``. The cube face ``k`` of a cube rotated
  by ``R`` is the view ``M = R @ FACE_ROTATIONS[k]``.
* Colour is a function of the hit point only (texture coordinates are world coordinates on the surface,
  Lambertian shading from point lights with a soft falloff, a corner-darkening term from the distance to
  the room's planes), so a panorama and a perspective view of one scene agree pixel for pixel up to
  sampling. No shadows, no specular terms, no noise.
* Sky (seen through window openings) has depth 0 and ``valid=False``. The optional nadir watermark of a
  panorama (a dark disc with a ring and the letters "PD", latitude < -70 deg) keeps the true floor depth
  but is ``valid=False``; perspective views never draw it.
* Deterministic: ``make_scene(seed, style)`` draws from ``np.random.default_rng([seed, style index])`` and
  rendering is pure numpy in float64, so equal arguments give bit-identical arrays.

Styles (``STYLES``) stand in for the datasets of the paper, with different distributions so that zero-shot
transfer can be measured: ``apartment`` (Matterport3D-like: medium rooms, warm palettes, wood floors, warm
lamps), ``house`` (Structured3D-like: the same geometry, cool and more saturated palettes, tiled floors,
daylight-coloured lights, more windows) and ``office`` (Stanford2D3D-like: large, higher rooms, grey and
blue palettes, carpet, ceiling tiles with fluorescent panels, many desks and boxes, pillars).
"""

from __future__ import annotations

import numpy as np
import torch

from panorama import equirect_directions, pinhole_directions

from .synthetic_scenes import (  # noqa: F401 - the scene API is re-exported here
    CAMERA_CLEARANCE, LOGO_ROWS, STYLE_PARAMS, STYLES, UV_AXES, WATERMARK_LAT_DEG, Decal, Material, Scene, Style,
    make_scene)

# ----------------------------------------------------------------------------------------------- ray casting

def _cast(scene: Scene, o: np.ndarray, d: np.ndarray):
    """Nearest hit of rays ``o + t d`` (d: (3, N)) -> t (N,) and surface id (N,): 0..5 room, then boxes,
    then cylinders."""
    n = d.shape[1]
    nb = len(scene.box_lo)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv = 1.0 / d
        tr = np.where(d > 0, (scene.size - o)[:, None], -o[:, None]) * inv
        tr[d == 0] = np.inf
        axis = tr.argmin(0)
        t = np.take_along_axis(tr, axis[None], 0)[0]
        sid = 2 * axis + (np.take_along_axis(d, axis[None], 0)[0] > 0)
        for b in range(nb):
            t1 = (scene.box_lo[b] - o)[:, None] * inv
            t2 = (scene.box_hi[b] - o)[:, None] * inv
            near, far = np.minimum(t1, t2), np.maximum(t1, t2)
            tn = np.maximum(np.maximum(near[0], near[1]), near[2])
            tf = np.minimum(np.minimum(far[0], far[1]), far[2])
            hit = (tn <= tf) & (tn > 0) & (tn < t)
            t = np.where(hit, tn, t)
            sid[hit] = 6 + b
        if len(scene.cylinders):
            a2 = d[0] ** 2 + d[2] ** 2
        for c, (cx, cz, r, y0, y1) in enumerate(scene.cylinders):
            ex, ez = o[0] - cx, o[2] - cz
            bq = ex * d[0] + ez * d[2]
            disc = bq * bq - a2 * (ex * ex + ez * ez - r * r)
            ts = (-bq - np.sqrt(np.maximum(disc, 0.0))) / a2
            ys = o[1] + ts * d[1]
            ts = np.where((disc >= 0) & (ts > 0) & (ys >= y0) & (ys <= y1), ts, np.inf)
            if o[1] > y1 or o[1] < y0:  # the cap facing the camera
                yc = y1 if o[1] > y1 else y0
                tc = (yc - o[1]) / d[1]
                inside = (ex + tc * d[0]) ** 2 + (ez + tc * d[2]) ** 2 <= r * r
                ts = np.where(inside & (tc > 0), np.minimum(ts, tc), ts)
            hit = ts < t
            t = np.where(hit, ts, t)
            sid[hit] = 6 + nb + c
    return t, sid


def _hash(i, j, seed):
    """Integer lattice (i, j) -> uniform [0, 1), a fixed integer hash (wrapping int64 arithmetic)."""
    h = (i.astype(np.int64) * 73856093) ^ (j.astype(np.int64) * 19349663) ^ np.int64((seed % 65521) * 83492791)
    h = (h ^ (h >> 13)) * np.int64(1274126177)
    h = h ^ (h >> 16)
    return (h & 0xFFFF).astype(np.float64) / 65535.0


def _noise(x, y, seed):
    """Smooth value noise in [0, 1] (one octave) at lattice spacing 1."""
    ix, iy = np.floor(x), np.floor(y)
    fx, fy = x - ix, y - iy
    fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    a, b = _hash(ix, iy, seed), _hash(ix + 1, iy, seed)
    c, e = _hash(ix, iy + 1, seed), _hash(ix + 1, iy + 1, seed)
    return (a + (b - a) * fx) * (1 - fy) + (c + (e - c) * fx) * fy


def _fbm(x, y, seed):
    return 0.6 * _noise(x, y, seed) + 0.3 * _noise(2.1 * x, 2.1 * y, seed + 1) + 0.1 * _noise(4.3 * x, 4.3 * y, seed + 2)


def _albedo(m: Material, u, v):
    """Texture of material ``m`` at surface coordinates (u, v) in metres -> (N, 3)."""
    s = m.scale
    if m.pattern == "stripes":
        k = np.floor(u / s) % 2 * 0.8 + 0.2 * _noise(u * 3, v * 3, m.seed)
    elif m.pattern == "hstripes":
        k = (np.mod(v, s) < 0.03).astype(np.float64)  # shelf boards
    elif m.pattern == "checker":
        k = (np.floor(u / s) + np.floor(v / s)) % 2
    elif m.pattern == "noise":
        k = _fbm(u / s, v / s, m.seed)
    elif m.pattern == "planks":
        length = 8 * s
        row = np.floor(v / s)
        seg = np.floor(u / length + _hash(row, row, m.seed))
        grain = _noise(u * 2.0, v * 40.0, m.seed + 3)
        seam = (np.mod(v, s) < 0.006) | (np.mod(u / length + _hash(row, row, m.seed), 1.0) * length < 0.006)
        k = np.where(seam, 1.0, 0.55 * _hash(row, seg, m.seed + 5) + 0.3 * grain)
    elif m.pattern == "tiles":
        i, j = np.floor(u / s), np.floor(v / s)
        grout = (np.mod(u, s) < 0.01) | (np.mod(v, s) < 0.01)
        k = np.where(grout, 1.0, 0.25 * _hash(i, j, m.seed))
    else:  # plain, with a faint low-frequency variation
        k = 0.25 * _noise(u / s, v / s, m.seed)
    c1, c2 = np.asarray(m.color), np.asarray(m.color2)
    return c1 + (c2 - c1) * k[:, None]


def _sky(dirs: np.ndarray, scene: Scene) -> np.ndarray:
    """Sky and distant ground seen through windows, a function of the unit direction (N, 3)."""
    e = dirs[:, 1]
    up = np.clip(e, 0, 1)[:, None]
    sky = (1 - up) * np.array([0.85, 0.9, 0.96]) + up * np.array([0.3, 0.5, 0.85])
    px, pz = dirs[:, 0] / (np.abs(e) + 0.12), dirs[:, 2] / (np.abs(e) + 0.12)
    cloud = np.clip((_fbm(px * 1.5, pz * 1.5, scene.seed + 11) - (1 - scene.cloud_cover)) * 3, 0, 1)[:, None]
    sky = sky * (1 - cloud) + cloud * np.array([0.97, 0.97, 0.97])
    ground = np.array([0.45, 0.5, 0.4]) * (0.8 + 0.2 * _noise(px * 4, pz * 4, scene.seed + 12))[:, None]
    return np.where((e < 0)[:, None], ground, sky)


def _shade(scene: Scene, o, d, t, sid):
    """Colour (N, 3) in [0, 1] and sky mask (N,) for the hits of ``_cast``."""
    n = len(t)
    dn = (d / np.linalg.norm(d, axis=0)).T
    p = o[None] + t[:, None] * d.T
    nb = len(scene.box_lo)
    normal = np.zeros((n, 3))
    uv = np.zeros((n, 2))
    mat = np.zeros(n, dtype=np.int64)
    rows = np.arange(n)
    room = sid < 6
    ax = sid[room] // 2
    normal[room, ax] = np.where(sid[room] % 2 == 0, 1.0, -1.0)  # room normals point inwards
    mat[room] = np.asarray(scene.room_materials)[sid[room]]
    isbox = (sid >= 6) & (sid < 6 + nb)
    if isbox.any():
        bi = sid[isbox] - 6
        pb = p[isbox]
        dist = np.concatenate([np.abs(pb - scene.box_lo[bi]), np.abs(pb - scene.box_hi[bi])], axis=1)
        face = dist.argmin(1)
        normal[np.flatnonzero(isbox), face % 3] = np.where(face < 3, -1.0, 1.0)
        mat[isbox] = scene.box_mat[bi]
    ax_all = np.abs(normal).argmax(1)
    uvax = np.array(UV_AXES)[ax_all]
    uv[:, 0], uv[:, 1] = p[rows, uvax[:, 0]], p[rows, uvax[:, 1]]
    iscyl = sid >= 6 + nb
    if iscyl.any():
        ci = sid[iscyl] - 6 - nb
        cx, cz, r, y0, y1 = scene.cylinders[ci].T
        pc = p[iscyl]
        rx, rz = pc[:, 0] - cx, pc[:, 2] - cz
        rr = np.hypot(rx, rz)
        side = np.abs(rr - r) < np.minimum(np.abs(pc[:, 1] - y0), np.abs(pc[:, 1] - y1))
        nc = np.where(side[:, None], np.stack([rx, 0 * rx, rz], 1) / np.maximum(rr, 1e-9)[:, None],
                      np.stack([0 * rx, np.sign(pc[:, 1] - (y0 + y1) / 2), 0 * rx], 1))
        normal[iscyl] = nc
        uv[iscyl] = np.where(side[:, None], np.stack([np.arctan2(rz, rx) * r, pc[:, 1]], 1), pc[:, [0, 2]])
        mat[iscyl] = scene.cyl_mat[ci]

    albedo = np.zeros((n, 3))
    for m in np.unique(mat):
        sel = mat == m
        albedo[sel] = _albedo(scene.materials[m], uv[sel, 0], uv[sel, 1])
    emissive = np.zeros(n, dtype=bool)
    for dc in scene.decals:
        sel = np.flatnonzero(sid == dc.surface)
        du, dv = (uv[sel, 0] - dc.center[0]) / dc.half[0], (uv[sel, 1] - dc.center[1]) / dc.half[1]
        inside = (du * du + dv * dv <= 1) if dc.shape == "disc" else (np.abs(du) <= 1) & (np.abs(dv) <= 1)
        sel = sel[inside]
        albedo[sel] = dc.color
        emissive[sel] = dc.emissive
    sky = np.zeros(n, dtype=bool)
    for (ws, uc, vc, hu, hv) in scene.windows:
        sel = np.flatnonzero(sid == ws)
        du, dv = np.abs(uv[sel, 0] - uc), np.abs(uv[sel, 1] - vc)
        frame = (du <= hu + 0.06) & (dv <= hv + 0.06)
        opening = (du < hu) & (dv < hv) & (du > 0.025) & (dv > 0.025)
        albedo[sel[frame]] = scene.frame_rgb
        sky[sel[opening]] = True

    # Lambertian point lights with a soft falloff, ambient, and darkening near the room's edges.
    light = np.full((n, 3), scene.ambient)
    for lp, lc in zip(scene.lights, scene.light_rgb):
        vec = lp[None] - p
        dist = np.linalg.norm(vec, axis=1)
        ndotl = np.maximum((normal * vec).sum(1) / np.maximum(dist, 1e-9), 0.0)
        light += (ndotl / (1 + (dist / scene.light_range) ** 2))[:, None] * lc[None]
    planes = np.concatenate([p, scene.size[None] - p], axis=1)[:, [0, 3, 1, 4, 2, 5]]
    planes[room, sid[room]] = np.inf
    light *= (1 - 0.35 * np.exp(-planes.min(1) / 0.25))[:, None]
    rgb = 1 - np.exp(-1.7 * albedo * light)
    rgb[emissive] = albedo[emissive]
    rgb[sky] = _sky(dn[sky], scene)
    return rgb, sky


def _watermark(dirs: np.ndarray):
    """Nadir logo of a panorama for unit rays (N, 3) -> (mask (N,), colour (N, 3))."""
    radius = np.tan(np.radians(90 + WATERMARK_LAT_DEG))
    down = np.maximum(-dirs[:, 1], 1e-9)
    px, pz = dirs[:, 0] / down / radius, dirs[:, 2] / down / radius
    rho = np.hypot(px, pz)
    mask = (dirs[:, 1] < 0) & (rho < 1.0)
    rgb = np.tile(np.array([0.08, 0.09, 0.12]), (len(dirs), 1))
    rgb[(rho > 0.74) & (rho < 0.9)] = (0.95, 0.95, 0.95)
    bitmap = np.array([[c == "1" for c in row] for row in LOGO_ROWS])
    col = np.floor((px + 0.55) / 1.1 * bitmap.shape[1]).astype(np.int64)
    row = np.floor((pz + 0.25) / 0.5 * bitmap.shape[0]).astype(np.int64)
    ok = (col >= 0) & (col < bitmap.shape[1]) & (row >= 0) & (row < bitmap.shape[0])
    letters = np.zeros(len(dirs), dtype=bool)
    letters[ok] = bitmap[bitmap.shape[0] - 1 - row[ok], col[ok]]
    rgb[letters] = (0.95, 0.75, 0.2)
    return mask, rgb


def _to_uint8(rgb):
    return np.round(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)


# ----------------------------------------------------------------------------------------------- API

def render_panorama(scene: Scene, height: int = 256, width: int | None = None, *, watermark: bool = False):
    """Equirect render -> (rgb uint8 (H, W, 3), radial depth float32 (H, W) metres, valid bool (H, W)).

    Depth is 0 on sky pixels; the watermark (if asked for) keeps the floor depth but is ``valid=False``.
    """
    height = int(height)
    width = 2 * height if width is None else int(width)
    if height < 2:
        raise ValueError(f"height must be >= 2, got {height}")
    if width != 2 * height:
        raise ValueError(f"equirect width must be 2 * height, got height={height}, width={width}")
    dirs = equirect_directions(height, width, dtype=torch.float64).numpy().reshape(-1, 3)
    o = np.asarray(scene.camera, dtype=np.float64)
    d = np.ascontiguousarray(dirs.T)
    t, sid = _cast(scene, o, d)
    rgb, sky = _shade(scene, o, d, t, sid)
    valid = ~sky
    if watermark:
        mask, logo = _watermark(dirs)
        rgb[mask] = logo[mask]
        valid &= ~mask
    depth = np.where(sky, 0.0, t).astype(np.float32)
    return _to_uint8(rgb).reshape(height, width, 3), depth.reshape(height, width), valid.reshape(height, width)


def render_perspective(scene: Scene, rotation, size: int, fov_deg: float = 90.0):
    """Pinhole render of a ``size`` x ``size`` view with camera-to-world ``rotation`` (3, 3) ->
    (rgb uint8 (S, S, 3), planar depth float32 (S, S) along the optical axis, valid bool (S, S))."""
    size = int(size)
    if size < 2:
        raise ValueError(f"size must be >= 2, got {size}")
    if not 0.0 < float(fov_deg) < 180.0:
        raise ValueError(f"fov_deg must be in (0, 180), got {fov_deg}")
    if isinstance(rotation, torch.Tensor):
        rotation = rotation.detach().cpu().to(torch.float64).numpy()
    m = np.asarray(rotation, dtype=np.float64)
    if m.shape != (3, 3):
        raise ValueError(f"rotation must be (3, 3), got shape {m.shape}")
    rays = pinhole_directions(size, size, float(fov_deg), dtype=torch.float64).numpy().reshape(-1, 3)
    d = np.ascontiguousarray(m @ rays.T)  # (3, N), unnormalised: t is planar depth
    o = np.asarray(scene.camera, dtype=np.float64)
    t, sid = _cast(scene, o, d)
    rgb, sky = _shade(scene, o, d, t, sid)
    depth = np.where(sky, 0.0, t).astype(np.float32)
    return _to_uint8(rgb).reshape(size, size, 3), depth.reshape(size, size), (~sky).reshape(size, size)


def generate_panorama(seed: int, style: str = "apartment", height: int = 256, *, windows: bool = True,
                      watermark: bool = False) -> dict:
    """``make_scene`` + ``render_panorama`` -> {"rgb", "depth", "valid", "meta"} (meta is JSON-serialisable)."""
    scene = make_scene(seed, style, windows=windows)
    rgb, depth, valid = render_panorama(scene, height, watermark=watermark)
    meta = {
        "seed": int(seed), "style": style, "height": int(height), "width": 2 * int(height),
        "depth_kind": "radial", "depth_unit": "m",
        "room_size": [float(x) for x in scene.size],  # W (x), H (y), D (z)
        "camera": [float(x) for x in scene.camera],
        "n_objects": len(scene.furniture), "furniture": list(scene.furniture),
        "n_boxes": int(len(scene.box_lo)), "n_cylinders": int(len(scene.cylinders)),
        "n_windows": len(scene.windows), "n_lights": int(len(scene.lights)),
        "windows": bool(windows), "watermark": bool(watermark),
        "valid_fraction": float(valid.mean()), "sky_fraction": float(((depth == 0) & ~valid).mean()),
    }
    return {"rgb": rgb, "depth": depth, "valid": valid, "meta": meta}
