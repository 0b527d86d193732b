"""Dataset layouts -> candidate samples for ``sharding.build``.

``list_source(name, input, split)`` walks one layout and returns a ``Listing``: the candidates (key,
split, original relative path and a picklable ``load()`` that reads, checks and converts one panorama) plus
what was rejected while listing. Loading raises ``sharding.format.SampleError`` for a bad input, so that the
builder can skip it, count it and name it. Depth is converted to uint16 millimetres here, once.

Accepted layouts (paths relative to ``--input``):

``matterport3d`` -- the 360-degree release used by UniFuse/BiFuse (panoramas stitched from the Matterport3D
skyboxes). RGB and depth are PNG/JPEG, depth uint16 in units of 1/4000 m (0 = invalid). Splits come from
list files, looked for in ``<input>/`` and ``<input>/splits/`` as ``matterport3d_{train,val,test}.txt``
(UniFuse's names) or ``mp3d_{train,val,test}.txt``, or given with ``--split-list SPLIT=FILE``. A line is
either

* two paths relative to ``<input>``, RGB then depth, as in UniFuse's own lists
  (``17DRP5sb8fy/pano_skybox_color/<pano>.jpg 17DRP5sb8fy/pano_depth/<pano>.png``), or
* ``<scene_id> <pano_id>``: RGB ``<scene>/<pano>_rgb.png`` (or ``.jpg``, or UniFuse's
  ``<scene>/pano_skybox_color/<pano>.jpg``), depth ``<scene>/<pano>_depth.png`` (or
  ``<scene>/pano_depth/<pano>.png``).

Empty lines and ``#`` comments are ignored. Keys: ``mp3d-<scene>-<pano>``.

``stanford2d3d`` -- the 2D-3D-S release: ``area_*/pano/rgb/<name>_rgb.png`` and
``area_*/pano/depth/<name>_depth.png``, depth uint16 in 1/512 m with 65535 = invalid. Splits: the standard
fold 1 (train: areas 1, 2, 3, 4, 6; test: areas 5a and 5b; no val) unless ``--split-list SPLIT=FILE`` lists
are given (lines: ``<rgb path> <depth path>`` relative to ``<input>``, as in UniFuse's lists, or just the
RGB path, whose depth is found by the rule above). Keys: ``s2d3d-<area>-<name>``.

``structured3d`` -- ``scene_<id>/2D_rendering/<room>/panorama/full/rgb_rawlight.png`` and ``depth.png``
(uint16 millimetres, 0 = invalid), under ``<input>`` or ``<input>/Structured3D``. Splits by scene id as in
Structured3D: 0-2999 train, 3000-3249 val, 3250-3499 test. Keys: ``s3d-scene_<id>-<room>``.

``folder`` -- any directory tree of 2:1 JPEG/PNG panoramas, unlabeled. An image ``X.png``/``X.jpg`` with a
sibling ``X_valid.png`` gets that file as its validity mask (255 = valid) and the mask is not a panorama of
its own. Everything goes to the split named by ``--split`` (``train`` for ``all``). Keys:
``folder-<relative path without extension, '/' -> '-'>``.

``generated`` -- ``sharding.synthetic.generate_panorama`` scenes ``seed .. seed + count - 1`` of one style,
labeled (radial depth in metres converted to mm) with the validity mask (sky, watermark). Split as for
``folder``. Keys: ``gen-<style>-<seed>`` (``-nowin`` / ``-wm`` appended without windows / with watermark).
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from .format import SampleError, decode_mask, encode_jpeg, encode_png, make_key, metres_to_mm, scaled_to_mm

SOURCES = ("generated", "folder", "matterport3d", "stanford2d3d", "structured3d")
SPLITS = ("train", "val", "test")
IMAGE_EXTS = (".jpg", ".jpeg", ".png")

MP3D_METRES_PER_UNIT = 1.0 / 4000.0
S2D3D_METRES_PER_UNIT = 1.0 / 512.0
S2D3D_INVALID = 65535
S3D_METRES_PER_UNIT = 1.0 / 1000.0
S2D3D_FOLD1 = {"train": ("1", "2", "3", "4", "6"), "test": ("5a", "5b", "5")}
S3D_SPLITS = (("train", 0, 3000), ("val", 3000, 3250), ("test", 3250, 3500))


@dataclass(frozen=True)
class Candidate:
    """One panorama to convert. ``load()`` returns ``{"rgb": bytes, "depth_mm": uint16 (H, W) | None,
    "mask": bool (H, W) | None, "meta": dict, "clipped": int}`` or raises ``SampleError``."""

    key: str
    split: str
    path: str
    load: Callable[[], dict]


@dataclass
class Listing:
    candidates: list[Candidate] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (path, reason, detail)
    splits: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------ loaders

def _read_bytes(path: Path, missing_reason: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise SampleError(missing_reason, f"{path} does not exist") from None
    except OSError as exc:
        raise SampleError(missing_reason, f"{path}: {exc}") from None


def _read_uint16(path: Path) -> np.ndarray:
    data = _read_bytes(path, "missing_depth")
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise SampleError("unreadable_depth", f"{path} is not a decodable image")
    if arr.ndim == 3 and arr.shape[2] >= 3 and np.array_equal(arr[..., 0], arr[..., 1]) \
            and np.array_equal(arr[..., 0], arr[..., 2]):
        arr = arr[..., 0]  # grey saved as 3 identical channels
    if arr.ndim != 2 or arr.dtype != np.uint16:
        raise SampleError("unreadable_depth", f"{path}: expected a single-channel uint16 PNG, got {arr.dtype} "
                                              f"{arr.shape}")
    return arr


def _read_mask(path: Path) -> np.ndarray:
    return decode_mask(_read_bytes(path, "unreadable_mask"), str(path))


def load_labeled_pair(rgb_path: str, depth_path: str, metres_per_unit: float, invalid_value: int | None,
                      meta: dict) -> dict:
    rgb = _read_bytes(Path(rgb_path), "missing_rgb")
    raw = _read_uint16(Path(depth_path))
    depth_mm, clipped = scaled_to_mm(raw, metres_per_unit, invalid_value)
    return {"rgb": rgb, "depth_mm": depth_mm, "mask": None, "meta": meta, "clipped": clipped}


def load_folder_image(path: str, mask_path: str | None, meta: dict) -> dict:
    rgb = _read_bytes(Path(path), "missing_rgb")
    mask = _read_mask(Path(mask_path)) if mask_path else None
    return {"rgb": rgb, "depth_mm": None, "mask": mask, "meta": meta, "clipped": 0}


def load_generated(seed: int, style: str, height: int, windows: bool, watermark: bool, rgb_format: str,
                   meta: dict) -> dict:
    from . import synthetic  # imported late: the generator is optional for every other source

    out = synthetic.generate_panorama(seed, style, height, windows=windows, watermark=watermark)
    depth_mm, clipped = metres_to_mm(out["depth"])
    rgb = encode_jpeg(out["rgb"]) if rgb_format == "jpg" else encode_png(out["rgb"])
    meta = dict(meta, generator=out.get("meta", {}))
    return {"rgb": rgb, "depth_mm": depth_mm, "mask": np.asarray(out["valid"], dtype=bool), "meta": meta,
            "clipped": clipped}


# ----------------------------------------------------------------------------------- listings

def _meta(source: str, split: str, path: str, **extra) -> dict:
    """Sample metadata; labeled layouts add ``depth_kind`` ("radial": distance from the camera centre)."""
    return {"source": source, "split": split, "path": path, **extra}


def _splits_wanted(split: str, available: tuple[str, ...], source: str) -> tuple[str, ...]:
    if split == "all":
        return available
    if split not in available:
        hint = "; give a list with --split-list SPLIT=FILE" if source.startswith("stanford2d3d") else ""
        raise ValueError(f"{source} has no {split!r} split (available: {', '.join(available) or 'none'}){hint}")
    return (split,)


def _single_split(split: str) -> str:
    return "train" if split == "all" else split


def list_folder(root: Path, split: str) -> Listing:
    out = Listing(splits=(_single_split(split),))
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    by_stem = {p.with_suffix(""): p for p in files}
    masks = set()
    for p in files:
        stem = p.with_suffix("")
        if stem.name.endswith("_valid") and p.suffix.lower() == ".png":
            base = stem.with_name(stem.name[: -len("_valid")])
            if base in by_stem and by_stem[base] != p:
                masks.add(p)
    for p in files:
        if p in masks:
            continue
        rel = p.relative_to(root)
        mask = p.with_name(p.stem + "_valid.png")
        mask_path = str(mask) if mask in masks else None
        key = make_key("folder", *rel.with_suffix("").parts)
        s = _single_split(split)
        meta = _meta("folder", s, rel.as_posix(), mask_path=mask.relative_to(root).as_posix() if mask_path else None)
        out.candidates.append(Candidate(key, s, rel.as_posix(),
                                        functools.partial(load_folder_image, str(p), mask_path, meta)))
    return out


def list_generated(count: int, style: str, height: int, seed: int, windows: bool, watermark: bool,
                   split: str, rgb_format: str = "png") -> Listing:
    if count is None or count < 1:
        raise ValueError("--source generated needs --count N (N >= 1)")
    if height < 2:
        raise ValueError(f"--height must be >= 2, got {height}")
    try:
        from .synthetic import STYLES
    except ImportError as exc:
        raise ValueError(f"the generated source needs sharding.synthetic: {exc}") from None
    if style not in STYLES:
        raise ValueError(f"unknown --style {style!r}; choose from {', '.join(STYLES)}")
    s = _single_split(split)
    out = Listing(splits=(s,))
    suffix = ("-nowin" if not windows else "") + ("-wm" if watermark else "")
    for i in range(count):
        sd = seed + i
        key = f"gen-{style}-{sd}{suffix}"
        path = f"generated/{style}/{sd}"
        meta = _meta("generated", s, path, seed=sd, style=style, depth_kind="radial")
        out.candidates.append(Candidate(key, s, path, functools.partial(
            load_generated, sd, style, height, windows, watermark, rgb_format, meta)))
    return out


def _read_list(path: Path) -> list[tuple[int, list[str]]]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            rows.append((n, line.split()))
    return rows


def _first_existing(root: Path, rels: list[str]) -> str:
    for r in rels:
        if (root / r).exists():
            return r
    return rels[0]


def _looks_like_path(tok: str) -> bool:
    return "/" in tok or tok.lower().endswith(IMAGE_EXTS)


def _strip_suffixes(name: str, suffixes: tuple[str, ...]) -> str:
    for s in suffixes:
        if name.endswith(s):
            return name[: -len(s)]
    return name


def find_mp3d_lists(root: Path) -> dict[str, Path]:
    found = {}
    for s in SPLITS:
        for d in (root, root / "splits"):
            for name in (f"matterport3d_{s}.txt", f"mp3d_{s}.txt"):
                if s not in found and (d / name).is_file():
                    found[s] = d / name
    return found


def list_matterport3d(root: Path, split: str, split_lists: dict[str, Path] | None) -> Listing:
    lists = dict(split_lists or {}) or find_mp3d_lists(root)
    if not lists:
        raise ValueError(
            f"matterport3d: no split lists found; looked for matterport3d_{{train,val,test}}.txt and "
            f"mp3d_{{train,val,test}}.txt in {root} and {root / 'splits'}. Copy UniFuse's lists there or pass "
            f"--split-list train=FILE (lines: '<rgb path> <depth path>' or '<scene_id> <pano_id>')")
    available = tuple(s for s in (*SPLITS, *sorted(lists)) if s in lists)
    available = tuple(dict.fromkeys(available))
    out = Listing(splits=_splits_wanted(split, available, "matterport3d"))
    for s in out.splits:
        for n, toks in _read_list(lists[s]):
            where = f"{lists[s].name}:{n}"
            if len(toks) != 2:
                out.skipped.append((where, "bad_list_line", f"expected 2 fields, got {len(toks)}"))
                continue
            if _looks_like_path(toks[0]):
                rgb_rel, depth_rel = toks
                scene = Path(rgb_rel).parts[0]
                pano = _strip_suffixes(Path(rgb_rel).stem, ("_rgb", "_color", "_i"))
            else:
                scene, pano = toks
                rgb_rel = _first_existing(root, [f"{scene}/{pano}_rgb.png", f"{scene}/{pano}_rgb.jpg",
                                                 f"{scene}/pano_skybox_color/{pano}.jpg",
                                                 f"{scene}/pano_skybox_color/{pano}.png"])
                depth_rel = _first_existing(root, [f"{scene}/{pano}_depth.png", f"{scene}/pano_depth/{pano}.png"])
            key = make_key("mp3d", scene, pano)
            meta = _meta("matterport3d", s, rgb_rel, depth_path=depth_rel, scene=scene, depth_kind="radial",
                         depth_source_unit="1/4000 m")
            out.candidates.append(Candidate(key, s, rgb_rel, functools.partial(
                load_labeled_pair, str(root / rgb_rel), str(root / depth_rel), MP3D_METRES_PER_UNIT, None,
                meta)))
    return out


def _s2d3d_depth_rel(rgb_rel: str) -> str:
    p = Path(rgb_rel)
    name = _strip_suffixes(p.stem, ("_rgb",)) + "_depth.png"
    if p.parent.name == "rgb":
        return (p.parent.parent / "depth" / name).as_posix()
    return (p.parent / name).as_posix()


def list_stanford2d3d(root: Path, split: str, split_lists: dict[str, Path] | None) -> Listing:
    def add(s: str, rgb_rel: str, depth_rel: str):
        area = Path(rgb_rel).parts[0]
        name = _strip_suffixes(Path(rgb_rel).stem, ("_rgb",))
        meta = _meta("stanford2d3d", s, rgb_rel, depth_path=depth_rel, area=area, depth_kind="radial",
                     depth_source_unit="1/512 m, 65535 invalid")
        out.candidates.append(Candidate(make_key("s2d3d", area, name), s, rgb_rel, functools.partial(
            load_labeled_pair, str(root / rgb_rel), str(root / depth_rel), S2D3D_METRES_PER_UNIT,
            S2D3D_INVALID, meta)))

    if split_lists:
        out = Listing(splits=_splits_wanted(split, tuple(split_lists), "stanford2d3d"))
        for s in out.splits:
            for n, toks in _read_list(split_lists[s]):
                if len(toks) not in (1, 2):
                    out.skipped.append((f"{split_lists[s].name}:{n}", "bad_list_line",
                                        f"expected 1 or 2 fields, got {len(toks)}"))
                    continue
                add(s, toks[0], toks[1] if len(toks) == 2 else _s2d3d_depth_rel(toks[0]))
        return out
    out = Listing(splits=_splits_wanted(split, ("train", "test"), "stanford2d3d (fold 1)"))
    rgbs = sorted(root.glob("area_*/pano/rgb/*_rgb.png"))
    if not rgbs:
        raise ValueError(f"stanford2d3d: no panoramas found as {root}/area_*/pano/rgb/*_rgb.png")
    for p in rgbs:
        rel = p.relative_to(root).as_posix()
        area_id = p.relative_to(root).parts[0][len("area_"):]
        s = next((k for k, areas in S2D3D_FOLD1.items() if area_id in areas), None)
        if s is None:
            out.skipped.append((rel, "unknown_split", f"area {area_id!r} is in no split of fold 1"))
            continue
        if s in out.splits:
            add(s, rel, _s2d3d_depth_rel(rel))
    return out


def list_structured3d(root: Path, split: str) -> Listing:
    if not any(root.glob("scene_*")) and (root / "Structured3D").is_dir():
        root = root / "Structured3D"
    out = Listing(splits=_splits_wanted(split, tuple(s for s, _, _ in S3D_SPLITS), "structured3d"))
    fulls = sorted(root.glob("scene_*/2D_rendering/*/panorama/full"))
    if not fulls:
        raise ValueError(f"structured3d: no panoramas found as {root}/scene_*/2D_rendering/*/panorama/full/")
    for full in fulls:
        rel_dir = full.relative_to(root)
        scene, room = rel_dir.parts[0], rel_dir.parts[2]
        m = re.fullmatch(r"scene_(\d+)", scene)
        sid = int(m.group(1)) if m else -1
        s = next((name for name, lo, hi in S3D_SPLITS if lo <= sid < hi), None)
        rgb_rel = (rel_dir / "rgb_rawlight.png").as_posix()
        if s is None:
            out.skipped.append((rgb_rel, "unknown_split", f"scene id {sid} is outside 0-3499"))
            continue
        if s not in out.splits:
            continue
        meta = _meta("structured3d", s, rgb_rel, depth_path=(rel_dir / "depth.png").as_posix(), scene=scene,
                     room=room, depth_kind="radial", depth_source_unit="mm")
        out.candidates.append(Candidate(make_key("s3d", scene, room), s, rgb_rel, functools.partial(
            load_labeled_pair, str(full / "rgb_rawlight.png"), str(full / "depth.png"), S3D_METRES_PER_UNIT,
            None, meta)))
    return out


def list_source(source: str, input: str | os.PathLike | None, split: str = "all", *,
                split_lists: dict[str, str] | None = None, count: int | None = None,
                style: str = "apartment", height: int = 256, seed: int = 0, windows: bool = True,
                watermark: bool = False, rgb_format: str = "png") -> Listing:
    """The candidates of one layout (see the module docstring). Raises ``ValueError`` with a message for
    the user when the layout cannot be used at all (missing input, no split lists, unknown split)."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; choose from {', '.join(SOURCES)}")
    if source == "generated":
        return list_generated(count, style, height, seed, windows, watermark, split, rgb_format)
    if input is None:
        raise ValueError(f"--source {source} needs --input PATH")
    root = Path(input).expanduser().resolve()
    if not root.is_dir():
        raise ValueError(f"--input {root} is not a directory")
    lists = {k: Path(v).expanduser().resolve() for k, v in (split_lists or {}).items()}
    for k, v in lists.items():
        if not v.is_file():
            raise ValueError(f"--split-list {k}={v}: no such file")
    if source == "folder":
        return list_folder(root, split)
    if source == "matterport3d":
        return list_matterport3d(root, split, lists)
    if source == "stanford2d3d":
        return list_stanford2d3d(root, split, lists)
    return list_structured3d(root, split)
