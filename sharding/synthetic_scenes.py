"""Generated indoor scenes: their description (``Scene``) and how one is drawn from a seed and a style.

A scene is an axis-aligned room ``[0, W] x [0, H] x [0, D]`` (floor ``y = 0``; x right, y up, z forward)
with furniture (boxes and vertical cylinders), procedural materials, point lights, decals and optional
windows onto a sky; the camera is level, at least ``CAMERA_CLEARANCE`` metres from every surface and outside
every object. ``make_scene(seed, style)`` draws from ``np.random.default_rng([seed, style index])``, so
equal arguments give equal scenes. ``sharding.synthetic`` renders them.

Styles (``STYLES``) stand in for the datasets of the paper, with different distributions so that zero-shot
transfer can be measured: ``apartment`` (Matterport3D-like: medium rooms, warm palettes, wood floors, warm
lamps), ``house`` (Structured3D-like: the same geometry, cool and more saturated palettes, tiled floors,
daylight-coloured lights, more windows) and ``office`` (Stanford2D3D-like: large, higher rooms, grey and
blue palettes, carpet, ceiling tiles with fluorescent panels, many desks and boxes, pillars).
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, field, replace

import numpy as np

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
UV_AXES = ((2, 1), (0, 2), (0, 1))
LOGO_ROWS = ("11110 11100", "10001 10010", "11110 10001", "10000 10010", "10000 11100")  # "PD", 5 x 11


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


def broad_style(rng: np.random.Generator) -> Style:
    """A random ``Style`` between and beyond the named ones, for training a teacher on a broad mixture: room
    size from small rooms to halls, ceiling and camera heights, clutter (0-24 pieces of any kind, pillars),
    windows, lights (count, colour, power, ambient), and each palette and pattern table taken from a random
    named style, its hue shifted at random a third of the time. Its ``name`` is the named style it started
    from (so scenes drawn from it keep a valid ``style``)."""
    base = _STYLE_LIST[int(rng.integers(len(_STYLE_LIST)))]
    pick = lambda: _STYLE_LIST[int(rng.integers(len(_STYLE_LIST)))]  # noqa: E731

    def span(lo, hi, min_width):
        a = rng.uniform(lo, hi - min_width)
        return (float(a), float(rng.uniform(a + min_width, hi)))

    def hsv(table):
        (h0, h1), sv, vv = table
        if rng.random() < 1 / 3:
            shift = rng.uniform(0.0, 1.0)
            h0, h1 = h0 + shift, h1 + shift
        return ((h0, h1), sv, vv)

    kinds = tuple((k, float(rng.uniform(0.2, 3.0))) for k in _KINDS)
    n_f = int(rng.integers(0, 16))
    light = np.clip(np.array(pick().light_rgb) + rng.normal(0.0, 0.05, 3), 0.6, 1.1)
    power = float(rng.uniform(0.6, 1.6))
    return replace(
        base, room_w=span(2.5, 16.0, 1.0), room_d=span(2.5, 16.0, 1.0), room_h=span(2.3, 4.0, 0.2),
        cam_h=span(1.0, 1.8, 0.1), n_furniture=(n_f, n_f + int(rng.integers(0, 9))), furniture=kinds,
        n_pillars=(0, int(rng.integers(0, 5))), n_windows=(0, int(rng.integers(0, 5))),
        n_lights=(1, int(rng.integers(1, 6))), light_rgb=tuple(float(c) for c in light),
        light_power=(0.5 * power, power), light_range=float(rng.uniform(2.0, 4.0)), ambient=span(0.15, 0.6, 0.05),
        wall_hsv=hsv(pick().wall_hsv), floor_hsv=hsv(pick().floor_hsv), ceiling_hsv=hsv(pick().ceiling_hsv),
        object_hsv=hsv(pick().object_hsv), wall_patterns=pick().wall_patterns, floor_patterns=pick().floor_patterns,
        ceiling_patterns=pick().ceiling_patterns, object_patterns=pick().object_patterns,
        lamp_shape=pick().lamp_shape, n_paintings=(0, int(rng.integers(0, 4))))


def make_scene(seed: int, style: str | Style = "apartment", *, windows: bool = True) -> Scene:
    """Draw a room of ``style`` for ``seed``: geometry, materials, lights, camera, windows (if ``windows``).

    ``style`` is a name of ``STYLES`` or a ``Style`` (``broad_style``); a ``Style`` draws from the random
    stream of the named style it carries, so equal (seed, Style) arguments give equal scenes."""
    st = style if isinstance(style, Style) else _get_style(style)
    style = st.name
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
