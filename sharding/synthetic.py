"""Generated indoor scenes with exact depth, ray-cast on the CPU with numpy.

A scene is an axis-aligned room with furniture (boxes and vertical cylinders), procedural textures,
point lights and optional windows onto a sky. Rendering casts one ray per pixel against every surface at
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

import colorsys
from dataclasses import dataclass, field

import numpy as np
import torch

from panorama import equirect_directions, pinhole_directions

CAMERA_CLEARANCE = 0.3  # metres; the camera keeps at least this distance from every surface
WATERMARK_LAT_DEG = -70.0  # the nadir logo covers latitudes below this


@dataclass(frozen=True)
class Style:
    """Distribution of rooms of one style. Ranges are (low, high), drawn uniformly; HSV triples are
    ((h0, h1), (s0, s1), (v0, v1)) with hue taken modulo 1; weight tables are ((name, weight), ...)."""

    name: str
    room_w: tuple[float, float]  # x extent (m)
    room_d: tuple[float, float]  # z extent (m)
    room_h: tuple[float, float]  # ceiling height (m)
    cam_h: tuple[float, float]  # camera height (m)
    n_furniture: tuple[int, int]
    furniture: tuple[tuple[str, float], ...]
    n_pillars: tuple[int, int]
    n_windows: tuple[int, int]
    n_lights: tuple[int, int]
    light_rgb: tuple[float, float, float]
    light_power: tuple[float, float]
    light_range: float  # falloff: power / (1 + (r / light_range)^2)
    ambient: tuple[float, float]
    wall_hsv: tuple
    floor_hsv: tuple
    ceiling_hsv: tuple
    object_hsv: tuple
    wall_patterns: tuple[tuple[str, float], ...]
    floor_patterns: tuple[tuple[str, float], ...]
    ceiling_patterns: tuple[tuple[str, float], ...]
    object_patterns: tuple[tuple[str, float], ...]
    lamp_shape: str  # emissive ceiling fixture over each light: "disc" or "panel"
    n_paintings: tuple[int, int]


_STYLE_LIST = (
    Style("apartment", (3.0, 6.0), (3.0, 7.0), (2.4, 2.8), (1.3, 1.7), (4, 8),
          (("table", 2), ("cabinet", 2), ("bed", 1), ("shelf", 1.5), ("sofa", 1.5), ("stool", 1),
           ("lamp", 1.5), ("box", 0.5)),
          (0, 0), (0, 2), (1, 2), (1.0, 0.86, 0.66), (0.6, 0.9), 2.5, (0.25, 0.35),
          ((0.06, 0.13), (0.12, 0.35), (0.65, 0.88)), ((0.05, 0.10), (0.40, 0.70), (0.35, 0.65)),
          ((0.08, 0.12), (0.02, 0.10), (0.85, 0.95)), ((0.00, 0.12), (0.25, 0.60), (0.25, 0.80)),
          (("plain", 3), ("stripes", 1), ("noise", 1)), (("planks", 4), ("noise", 1)),
          (("plain", 1),), (("plain", 2), ("planks", 2), ("noise", 1), ("stripes", 0.5)), "disc", (0, 2)),
    Style("house", (3.0, 6.0), (3.0, 7.0), (2.4, 3.0), (1.3, 1.7), (4, 8),
          (("table", 2), ("cabinet", 1.5), ("bed", 1), ("shelf", 1), ("sofa", 2), ("stool", 1.5),
           ("lamp", 1), ("box", 0.3)),
          (0, 1), (1, 4), (1, 3), (0.92, 0.97, 1.05), (0.6, 0.9), 3.0, (0.40, 0.55),
          ((0.35, 0.70), (0.08, 0.30), (0.70, 0.95)), ((0.00, 1.00), (0.00, 0.15), (0.45, 0.90)),
          ((0.55, 0.65), (0.00, 0.05), (0.90, 1.00)), ((0.45, 1.00), (0.30, 0.70), (0.30, 0.85)),
          (("plain", 2), ("stripes", 1), ("checker", 0.5)), (("tiles", 3), ("checker", 1), ("noise", 1)),
          (("plain", 1),), (("plain", 3), ("checker", 1), ("stripes", 1)), "disc", (1, 3)),
    Style("office", (6.0, 14.0), (6.0, 14.0), (2.7, 3.5), (1.2, 1.7), (8, 18),
          (("desk", 5), ("cabinet", 2), ("shelf", 1), ("box", 3), ("stool", 1), ("table", 1)),
          (0, 4), (0, 3), (2, 5), (0.92, 0.97, 1.0), (0.45, 0.7), 3.5, (0.25, 0.35),
          ((0.55, 0.65), (0.00, 0.10), (0.60, 0.85)), ((0.55, 0.70), (0.10, 0.30), (0.25, 0.45)),
          ((0.55, 0.65), (0.00, 0.04), (0.80, 0.92)), ((0.50, 0.65), (0.00, 0.25), (0.30, 0.80)),
          (("plain", 3), ("noise", 1)), (("noise", 4), ("tiles", 1)), (("tiles", 1),),
          (("plain", 3), ("noise", 1), ("hstripes", 0.5)), "panel", (0, 1)),
)
STYLES: tuple[str, ...] = tuple(s.name for s in _STYLE_LIST)
STYLE_PARAMS: dict[str, Style] = {s.name: s for s in _STYLE_LIST}

# Furniture: length along its long axis, depth, height (m); where it stands.
_KINDS = {
    "table": ((0.8, 1.8), (0.6, 1.0), (0.70, 0.78), "free"),
    "desk": ((1.2, 1.8), (0.6, 0.8), (0.72, 0.76), "either"),
    "cabinet": ((0.6, 1.6), (0.4, 0.6), (0.8, 2.0), "wall"),
    "shelf": ((0.8, 1.6), (0.28, 0.4), (1.6, 2.2), "wall"),
    "bed": ((1.4, 1.8), (1.9, 2.1), (0.45, 0.6), "wall"),
    "sofa": ((1.6, 2.4), (0.8, 0.95), (0.40, 0.48), "wall"),
    "box": ((0.3, 0.7), (0.3, 0.6), (0.25, 0.7), "either"),
    "stool": ((0.3, 0.45), (0.3, 0.45), (0.45, 0.75), "free"),
    "lamp": ((0.3, 0.45), (0.3, 0.45), (1.4, 1.8), "free"),
}
_PATTERN_SCALE = {"plain": (0.5, 0.9), "stripes": (0.05, 0.2), "hstripes": (0.25, 0.4), "checker": (0.3, 0.6),
                  "noise": (0.05, 0.4), "planks": (0.12, 0.22), "tiles": (0.3, 0.6)}
# Room surfaces 0..5: x=0, x=W, floor, ceiling, z=0, z=D (id = 2 * axis + (far side)); texture axes per normal.
_UV_AXES = ((2, 1), (0, 2), (0, 1))
_LOGO = ("11110 11100", "10001 10010", "11110 10001", "10000 10010", "10000 11100")  # "PD", 5 x 11


@dataclass
class Material:
    """Procedural texture: ``pattern`` mixes ``color`` and ``color2`` at spatial ``scale`` (m)."""

    pattern: str
    color: tuple[float, float, float]
    color2: tuple[float, float, float]
    scale: float
    seed: int


@dataclass
class Decal:
    """A rectangle or disc on a room surface (``surface`` 0..5), centred at (u, v) in its texture axes."""

    surface: int
    center: tuple[float, float]
    half: tuple[float, float]
    color: tuple[float, float, float]
    shape: str = "rect"  # "rect" or "disc"
    emissive: bool = False


@dataclass
class Scene:
    """Everything a render needs. Boxes are ``[lo, hi]``; cylinders are vertical, ``(cx, cz, r, y0, y1)``.

    Windows are openings ``(surface, uc, vc, hu, hv)`` in a wall, with a frame and a cross bar that stay solid.
    """

    seed: int
    style: str
    size: np.ndarray  # (3,) W, H, D
    camera: np.ndarray  # (3,)
    materials: list[Material]
    room_materials: list[int]  # (6,) material index of each room surface
    box_lo: np.ndarray  # (Nb, 3)
    box_hi: np.ndarray  # (Nb, 3)
    box_mat: np.ndarray  # (Nb,)
    cylinders: np.ndarray  # (Nc, 5)
    cyl_mat: np.ndarray  # (Nc,)
    lights: np.ndarray  # (L, 3)
    light_rgb: np.ndarray  # (L, 3) colour times power
    light_range: float
    ambient: float
    windows: list[tuple[int, float, float, float, float]] = field(default_factory=list)
    frame_rgb: tuple[float, float, float] = (0.9, 0.9, 0.88)
    decals: list[Decal] = field(default_factory=list)
    furniture: list[str] = field(default_factory=list)
    cloud_cover: float = 0.4


# ----------------------------------------------------------------------------------------------- sampling

def _get_style(style: str) -> Style:
    if style not in STYLE_PARAMS:
        raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")
    return STYLE_PARAMS[style]


def _pick(rng, table):
    names, weights = zip(*table)
    w = np.asarray(weights, dtype=np.float64)
    return names[int(rng.choice(len(names), p=w / w.sum()))]


def _hsv(rng, hsv):
    (h0, h1), (s0, s1), (v0, v1) = hsv
    return colorsys.hsv_to_rgb(rng.uniform(h0, h1) % 1.0, rng.uniform(s0, s1), rng.uniform(v0, v1))


def _material(rng, hsv, patterns) -> Material:
    pattern = _pick(rng, patterns)
    c1 = _hsv(rng, hsv)
    k = rng.uniform(0.55, 0.85) if rng.random() < 0.7 else rng.uniform(1.15, 1.4)
    c2 = tuple(float(min(1.0, c * k)) for c in c1)
    return Material(pattern, tuple(float(c) for c in c1), c2, float(rng.uniform(*_PATTERN_SCALE[pattern])),
                    int(rng.integers(0, 2**31 - 1)))


def _overlaps(rect, rects, gap=0.05):
    x0, x1, z0, z1 = rect
    return any(x0 < b[1] + gap and b[0] < x1 + gap and z0 < b[3] + gap and b[2] < z1 + gap for b in rects)


def _furniture_parts(kind, rect, hgt, along, back, mats):
    """Boxes ``(lo, hi, mat)`` and cylinders ``((cx, cz, r, y0, y1), mat)`` of one piece of furniture.

    ``along`` is the axis (0 or 2) of its long side; ``back`` is ``(axis, side)`` of the side at a wall.
    """
    x0, x1, z0, z1 = rect
    lo, hi = np.array([x0, 0.0, z0]), np.array([x1, hgt, z1])
    m0, m1 = mats
    boxes, cyls = [], []

    def box(l, h, m):
        boxes.append((np.asarray(l, float), np.asarray(h, float), m))

    def slab(axis, side, thick, y1, m):  # a board of thickness `thick` along one side of the rect
        l, h = lo.copy(), hi.copy()
        l[1], h[1] = 0.0, y1
        if side == 0:
            h[axis] = l[axis] + thick
        else:
            l[axis] = h[axis] - thick
        box(l, h, m)

    other = 2 if along == 0 else 0
    if kind == "table":
        box([x0, hgt - 0.04, z0], [x1, hgt, z1], m0)
        for cx in (x0 + 0.04, x1 - 0.09):
            for cz in (z0 + 0.04, z1 - 0.09):
                box([cx, 0.0, cz], [cx + 0.05, hgt - 0.04, cz + 0.05], m1)
    elif kind == "desk":
        box([x0, hgt - 0.03, z0], [x1, hgt, z1], m0)
        slab(along, 0, 0.04, hgt - 0.03, m1)
        slab(along, 1, 0.04, hgt - 0.03, m1)
    elif kind in ("bed", "sofa"):
        ax, side = back if back is not None else (other, 0)
        box(lo, hi, m0)
        slab(ax, side, 0.08 if kind == "bed" else 0.2, hgt + (0.5 if kind == "bed" else 0.4), m1)
        if kind == "sofa":
            slab(along, 0, 0.15, hgt + 0.18, m1)
            slab(along, 1, 0.15, hgt + 0.18, m1)
    elif kind == "box":
        box(lo, hi, m0)
        if (x1 - x0) > 0.4 and hgt < 0.5:
            box([x0 + 0.05, hgt, z0 + 0.05], [x1 - 0.1, hgt + 0.3, z1 - 0.08], m1)
    elif kind in ("stool", "lamp"):
        cx, cz, r = (x0 + x1) / 2, (z0 + z1) / 2, min(x1 - x0, z1 - z0) / 2
        if kind == "stool":
            cyls.append(((cx, cz, r, 0.0, hgt), m0))
        else:
            cyls += [((cx, cz, 0.6 * r, 0.0, 0.03), m1), ((cx, cz, 0.02, 0.03, hgt - 0.3), m1),
                     ((cx, cz, r, hgt - 0.3, hgt), m0)]
    else:  # cabinet, shelf, square pillar
        box(lo, hi, m0)
    return boxes, cyls


def make_scene(seed: int, style: str = "apartment", *, windows: bool = True) -> Scene:
    """Draw a room of ``style`` for ``seed``: geometry, materials, lights, camera, windows (if ``windows``)."""
    st = _get_style(style)
    rng = np.random.default_rng([int(seed), STYLES.index(style)])
    w, d, h = rng.uniform(*st.room_w), rng.uniform(*st.room_d), rng.uniform(*st.room_h)
    size = np.array([w, h, d])
    margin = 0.5
    cam = np.array([rng.uniform(margin, w - margin), rng.uniform(*st.cam_h), rng.uniform(margin, d - margin)])
    cam_rect = (cam[0], cam[0], cam[2], cam[2])

    materials = [_material(rng, st.wall_hsv, st.wall_patterns), _material(rng, st.floor_hsv, st.floor_patterns),
                 _material(rng, st.ceiling_hsv, st.ceiling_patterns)]
    walls = [0, 0, 1, 2, 0, 0]
    if rng.random() < 0.3:  # an accent wall
        materials.append(_material(rng, st.wall_hsv, st.wall_patterns))
        walls[int(rng.choice([0, 1, 4, 5]))] = len(materials) - 1

    def wall_span(sid):  # (length along the wall, axis along it)
        return (d, 2) if sid < 2 else (w, 0)

    # Windows first: furniture taller than a sill keeps out of the band in front of them.
    win_list, keep_out = [], []
    n_win = int(rng.integers(st.n_windows[0], st.n_windows[1] + 1)) if windows else 0
    for _ in range(n_win):
        sid = int(rng.choice([0, 1, 4, 5]))
        length, _ax = wall_span(sid)
        hu, sill = rng.uniform(0.4, min(1.2, length / 4)), rng.uniform(0.7, 1.0)
        top = rng.uniform(max(sill + 0.9, h - 0.7), h - 0.25)
        uc = rng.uniform(hu + 0.3, length - hu - 0.3)
        rect = _wall_rect(sid, size, uc - hu - 0.1, uc + hu + 0.1, 0.6)
        if _overlaps(rect, keep_out, 0.1):
            continue
        keep_out.append(rect)
        win_list.append((sid, float(uc), float((sill + top) / 2), float(hu), float((top - sill) / 2)))

    boxes, cyls, rects, names = [], [], [], []
    n_furn = int(rng.integers(st.n_furniture[0], st.n_furniture[1] + 1))
    n_pil = int(rng.integers(st.n_pillars[0], st.n_pillars[1] + 1))
    todo = [_pick(rng, st.furniture) for _ in range(n_furn)] + ["pillar"] * n_pil
    for kind in todo:
        mats = []
        for _ in range(2):
            materials.append(_material(rng, st.object_hsv, st.object_patterns))
            mats.append(len(materials) - 1)
        if kind == "shelf":
            materials[mats[0]].pattern, materials[mats[0]].scale = "hstripes", float(rng.uniform(0.25, 0.4))
        if kind == "pillar":
            side = rng.uniform(0.3, 0.6)
            along_len, depth_, hgt, where = side, side, h, "free"
        else:
            lr, dr, hr, where = _KINDS[kind]
            along_len, depth_, hgt = rng.uniform(*lr), rng.uniform(*dr), min(rng.uniform(*hr), h - 0.5)
        if where == "either":
            where = "wall" if rng.random() < 0.5 else "free"
        for _try in range(30):
            back = None
            if where == "wall":
                sid = int(rng.choice([0, 1, 4, 5]))
                length, along = wall_span(sid)
                if along_len > length - 0.2:
                    continue
                u0 = rng.uniform(0.05, length - along_len - 0.05)
                gap = rng.uniform(0.005, 0.05)
                rect = _wall_rect(sid, size, u0, u0 + along_len, depth_, gap)
                back = (2 - along, sid % 2)
            else:
                along = int(rng.choice([0, 2]))
                ex, ez = (along_len, depth_) if along == 0 else (depth_, along_len)
                if ex > w - 0.2 or ez > d - 0.2:
                    continue
                x0, z0 = rng.uniform(0.1, w - ex - 0.1), rng.uniform(0.1, d - ez - 0.1)
                rect = (x0, x0 + ex, z0, z0 + ez)
            if _overlaps(rect, rects) or _overlaps(rect, [cam_rect], CAMERA_CLEARANCE + 0.1):
                continue
            if where == "wall" and hgt > 0.65 and _overlaps(rect, keep_out, 0.0):
                continue
            pk = kind
            if kind == "pillar" and rng.random() < 0.5:
                pk = "stool"  # a round pillar: a floor-to-ceiling cylinder
            b, c = _furniture_parts(pk, rect, hgt, along, back, mats)
            boxes += b
            cyls += c
            rects.append(rect)
            names.append(kind)
            break

    n_l = int(rng.integers(st.n_lights[0], st.n_lights[1] + 1))
    lights = np.stack([np.array([rng.uniform(0.5, w - 0.5), h - rng.uniform(0.3, 0.5), rng.uniform(0.5, d - 0.5)])
                       for _ in range(n_l)])
    power = rng.uniform(*st.light_power, size=(n_l, 1))
    tint = np.clip(np.array(st.light_rgb) + rng.normal(0, 0.03, size=(n_l, 3)), 0.5, 1.2)
    decals = []
    for p in lights:
        half = (0.2, 0.2) if st.lamp_shape == "disc" else ((0.6, 0.15) if rng.random() < 0.5 else (0.15, 0.6))
        decals.append(Decal(3, (float(p[0]), float(p[2])), half, tuple(np.minimum(1.0, st.light_rgb)),
                            "disc" if st.lamp_shape == "disc" else "rect", True))
    for _ in range(int(rng.integers(st.n_paintings[0], st.n_paintings[1] + 1))):
        sid = int(rng.choice([0, 1, 4, 5]))
        length, _ax = wall_span(sid)
        if rng.random() < 0.4:  # a door
            hu = rng.uniform(0.4, 0.5)
            decals.append(Decal(sid, (float(rng.uniform(hu + 0.1, length - hu - 0.1)), 1.0), (hu, 1.0),
                                _hsv(rng, st.object_hsv)))
        else:
            hu, hv = rng.uniform(0.2, 0.6), rng.uniform(0.15, 0.4)
            decals.append(Decal(sid, (float(rng.uniform(hu + 0.1, length - hu - 0.1)), float(rng.uniform(1.4, 1.7))),
                                (hu, hv), colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.3, 0.8), rng.uniform(0.3, 0.9))))

    def arr(xs, n):
        return np.array(xs, dtype=np.float64).reshape(-1, n)

    return Scene(
        seed=int(seed), style=style, size=size, camera=cam, materials=materials, room_materials=walls,
        box_lo=arr([b[0] for b in boxes], 3), box_hi=arr([b[1] for b in boxes], 3),
        box_mat=np.array([b[2] for b in boxes], dtype=np.int64), cylinders=arr([c[0] for c in cyls], 5),
        cyl_mat=np.array([c[1] for c in cyls], dtype=np.int64), lights=lights, light_rgb=tint * power,
        light_range=st.light_range, ambient=float(rng.uniform(*st.ambient)), windows=win_list,
        frame_rgb=_hsv(rng, ((0.0, 1.0), (0.0, 0.1), (0.2, 0.95))), decals=decals, furniture=names,
        cloud_cover=float(rng.uniform(0.2, 0.7)))


def _wall_rect(sid, size, u0, u1, depth, gap=0.0):
    """Footprint (x0, x1, z0, z1) of something ``depth`` deep standing at wall ``sid``, spanning u0..u1."""
    w, _, d = size
    if sid < 2:
        x0 = gap if sid == 0 else w - gap - depth
        return (x0, x0 + depth, u0, u1)
    z0 = gap if sid == 4 else d - gap - depth
    return (u0, u1, z0, z0 + depth)


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
    uvax = np.array(_UV_AXES)[ax_all]
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
    bitmap = np.array([[c == "1" for c in row] for row in _LOGO])
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
