"""One sample of a shard: key rules, depth units, encoding (build side) and decoding (reader side).

The shard format is fixed in ``docs/CONTRACTS.md``. A sample is the tar members sharing a key ``K``:

* ``K.rgb.jpg`` / ``K.rgb.png`` -- the original image bytes, as given (decoded to RGB when read);
* ``K.depth.png`` -- labeled samples only: single-channel uint16 PNG, **millimetres**, 0 = invalid;
* ``K.mask.png`` -- optional: single-channel uint8 PNG, 255 = valid pixel, 0 = invalid;
* ``K.meta.json`` -- ``{"key", "source", "split", "path", "height", "width", "labeled", "depth_unit": "mm", ...}``.

Keys match ``[A-Za-z0-9_-]+`` (WebDataset splits the extension at the first dot of a member name). They are
derived from the source and the original relative path (``make_key``), so they are stable across rebuilds
and usable as mask-store and pseudo-label-cache keys.

Depth is converted to millimetres exactly once, at build time (``metres_to_mm``, ``scaled_to_mm``). Depth
beyond ``MAX_DEPTH_MM`` (65.534 m) cannot be stored: it becomes invalid (0) and is counted.

Every problem with one sample raises ``SampleError(reason, detail)``; ``reason`` is one of the short,
stable strings in ``REASONS`` that manifests and readers count by.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import warnings

import cv2
import numpy as np
from PIL import Image

KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
MAX_DEPTH_MM = 65534  # 65.534 m; 65535 is never written so that "uint16 max" can never mean a distance
RGB_EXTS = ("jpg", "png")

REASONS = {
    "unreadable_image": "the RGB image could not be decoded (corrupt, truncated or not an image)",
    "not_2to1": "the image is not an equirectangular panorama (width != 2 * height)",
    "missing_rgb": "the RGB file named by the dataset layout does not exist",
    "missing_depth": "a labeled layout has no depth file for this panorama (or the sample has no depth)",
    "unreadable_depth": "the depth file could not be decoded or has an unexpected type",
    "depth_size_mismatch": "the depth map does not have the size of the RGB image",
    "nan_depth": "the float depth map contains NaN",
    "negative_depth": "the float depth map contains negative values",
    "unreadable_mask": "the validity mask could not be decoded",
    "mask_size_mismatch": "the validity mask does not have the size of the RGB image",
    "duplicate_key": "two inputs map to the same sample key; the later one is skipped",
    "unknown_split": "the layout's split rule does not place this panorama in any split",
    "bad_list_line": "a split-list line could not be parsed",
    "incomplete_sample": "a shard sample lacks its rgb or meta.json member",
    "truncated_shard": "a shard ended early or is corrupt; the samples after the damage are lost",
    "corrupt_shard": "a shard's bytes differ from the sha256 in manifest.json; the whole shard is skipped",
    "rejected_by_mask_store": "the mask store rejected this panorama (too few valid pixels)",
    "corrupt_mask_entry": "the panorama's entry in the mask store failed its checksum; the panorama is skipped",
}


@contextlib.contextmanager
def cv2_fork_guard():
    """Run a ``fork()`` (DataLoader workers, a process pool) with OpenCV single-threaded in the parent.

    OpenCV's worker-thread pool does not survive ``fork()``: a child that calls a parallel OpenCV function
    (resize, cvtColor, ...) after the parent has used the pool can deadlock. Inside this block the parent's
    pool is shut down (``cv2.setNumThreads(1)``); the previous setting is restored afterwards."""
    prev = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(prev)


class SampleError(Exception):
    """A problem with one sample. ``reason`` is a key of ``REASONS``; ``detail`` says what exactly."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# ------------------------------------------------------------------------------------------- keys

_PART_RE = re.compile(r"[^A-Za-z0-9_]+")


def make_key(prefix: str, *parts: str) -> str:
    """``prefix-part1-part2...`` with every character outside ``[A-Za-z0-9_]`` of a part replaced by ``_``.

    When a replacement happened (or a part contained ``-``, the separator) the mapping could collide, so
    an 8-hex-digit hash of the original parts is appended; keys stay deterministic and unique.
    """
    if not prefix or not KEY_RE.match(prefix):
        raise ValueError(f"key prefix must match {KEY_RE.pattern}, got {prefix!r}")
    clean = [_PART_RE.sub("_", p) for p in parts]
    key = "-".join([prefix, *clean])
    if any(c != p for c, p in zip(clean, parts)) or any(not p for p in parts):
        key += "-" + hashlib.sha1("/".join(parts).encode("utf-8")).hexdigest()[:8]
    return key


def check_key(key: str) -> str:
    if not isinstance(key, str) or not KEY_RE.match(key):
        raise ValueError(f"sample key {key!r} does not match {KEY_RE.pattern}")
    return key


# ---------------------------------------------------------------------------------- depth units

def metres_to_mm(depth_m: np.ndarray) -> tuple[np.ndarray, int]:
    """Float depth in metres (0 = invalid) -> (uint16 millimetres, number of pixels made invalid because
    they exceed ``MAX_DEPTH_MM``). Raises ``SampleError`` for NaN or negative values."""
    d = np.asarray(depth_m, dtype=np.float64)
    if d.ndim != 2:
        raise SampleError("unreadable_depth", f"depth must be (H, W), got shape {d.shape}")
    if np.isnan(d).any():
        raise SampleError("nan_depth", f"{int(np.isnan(d).sum())} NaN pixels")
    if (d < 0).any():
        raise SampleError("negative_depth", f"{int((d < 0).sum())} negative pixels, min {d.min():.4g} m")
    mm = np.rint(d * 1000.0)  # +inf stays inf and is clipped below
    return _clip_mm(mm)


def scaled_to_mm(raw: np.ndarray, metres_per_unit: float, invalid_value: int | None = None
                 ) -> tuple[np.ndarray, int]:
    """Integer depth in ``metres_per_unit`` (0 = invalid; ``invalid_value`` also invalid) -> (uint16 mm,
    pixels made invalid because they exceed ``MAX_DEPTH_MM``). Matterport3D: 1/4000 m, Stanford2D3D: 1/512 m
    with 65535 invalid, Structured3D: 1/1000 m."""
    r = np.asarray(raw)
    if r.ndim != 2 or not np.issubdtype(r.dtype, np.integer):
        raise SampleError("unreadable_depth", f"expected a single-channel integer depth map, got {r.dtype} "
                                              f"{r.shape}")
    mm = np.rint(r.astype(np.float64) * (metres_per_unit * 1000.0))
    if invalid_value is not None:
        mm[r == invalid_value] = 0.0
    return _clip_mm(mm)


def _clip_mm(mm: np.ndarray) -> tuple[np.ndarray, int]:
    over = mm > MAX_DEPTH_MM
    n = int(over.sum())
    mm = np.where(over, 0.0, mm)
    return mm.astype(np.uint16), n


def mm_to_metres(mm: np.ndarray) -> np.ndarray:
    return np.asarray(mm, dtype=np.float32) * np.float32(0.001)


# ---------------------------------------------------------------------------- PNG/JPEG bytes

def encode_png(arr: np.ndarray, compression: int = 3) -> bytes:
    """uint8 or uint16, (H, W) or (H, W, 3) RGB -> PNG bytes."""
    a = np.asarray(arr)
    if a.ndim == 3:
        a = cv2.cvtColor(a, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", a, [cv2.IMWRITE_PNG_COMPRESSION, int(compression)])
    if not ok:
        raise ValueError(f"PNG encoding failed for {a.dtype} {a.shape}")
    return buf.tobytes()


def encode_jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(np.asarray(rgb), cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


def image_ext(data: bytes) -> str:
    """'jpg' or 'png' from the magic bytes; SampleError otherwise."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    raise SampleError("unreadable_image", "neither JPEG nor PNG data")


def image_size(data: bytes) -> tuple[int, int]:
    """(H, W) from the image header, without decoding the pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            return im.height, im.width
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ... for bad data
        raise SampleError("unreadable_image", f"{type(exc).__name__}: {exc}") from None


_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def decode_bgr(data: bytes, target: tuple[int, int] | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """JPEG/PNG bytes -> (uint8 (h, w, 3) **BGR**, original (H, W)), pixels as stored (EXIF orientation is
    ignored). OpenCV returns nothing for truncated or undecodable data: ``SampleError('unreadable_image')``.
    With ``target=(h, w)`` a JPEG is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain when that still
    covers the target (much faster); the caller resizes to the exact target."""
    h0, w0 = image_size(data)
    flags = cv2.IMREAD_COLOR
    if target is not None and data[:3] == b"\xff\xd8\xff":
        for f in (8, 4, 2):
            if h0 // f >= target[0] and w0 // f >= target[1]:
                flags = _REDUCED[f]
                break
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), flags | cv2.IMREAD_IGNORE_ORIENTATION)
    if arr is None:
        raise SampleError("unreadable_image", f"OpenCV could not decode the {w0}x{h0} image (corrupt or truncated)")
    return arr, (h0, w0)


def decode_rgb(data: bytes, target: tuple[int, int] | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """Like ``decode_bgr`` but RGB."""
    arr, size = decode_bgr(data, target)
    return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB), size


def decode_depth_png(data: bytes) -> np.ndarray:
    """uint16 single-channel PNG bytes -> uint16 (H, W)."""
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise SampleError("unreadable_depth", "not a decodable PNG")
    if arr.dtype != np.uint16 or arr.ndim != 2:
        raise SampleError("unreadable_depth", f"expected uint16 (H, W), got {arr.dtype} {arr.shape}")
    return arr


def decode_mask(data: bytes, name: str | None = None) -> np.ndarray:
    """Validity-mask image bytes -> bool (H, W): the one mask-PNG decoder of the project.

    Accepts grey, grey+alpha, RGB or RGBA PNG (or JPEG), 8 or 16 bit: colour is converted to grey
    (ITU-R 601 weights), alpha is ignored, 16-bit values are scaled to 8 bit; grey >= 128 is valid (so 255 =
    valid, 0 = invalid). Raises ``SampleError("unreadable_mask")`` naming ``name`` (a file or sample key)
    when the bytes are not a decodable image."""
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE) if len(data) else None
    if arr is None or arr.ndim != 2 or arr.size == 0:
        raise SampleError("unreadable_mask", f"{name + ': ' if name else ''}not a decodable image")
    return arr >= 128


decode_mask_png = decode_mask  # the earlier name


def check_panorama_size(h: int, w: int) -> None:
    if w != 2 * h:
        raise SampleError("not_2to1", f"{w}x{h} is not 2:1")


# --------------------------------------------------------------------------------- build side

def encode_sample(key: str, rgb: bytes, *, meta: dict, depth_mm: np.ndarray | None = None,
                  mask: np.ndarray | None = None) -> dict:
    """Validated parts -> the dict that ``webdataset.TarWriter(encoder=False)`` writes.

    ``rgb`` are the original image bytes (checked: decodable, 2:1); ``depth_mm`` uint16 (H, W) of the
    same size; ``mask`` bool (H, W) of the same size (True = valid).
    """
    check_key(key)
    ext = image_ext(rgb)
    _, (h, w) = decode_rgb(rgb)
    check_panorama_size(h, w)
    sample = {"__key__": key, f"rgb.{ext}": rgb}
    if depth_mm is not None:
        if depth_mm.dtype != np.uint16:
            raise ValueError(f"depth_mm must be uint16, got {depth_mm.dtype}")
        if depth_mm.shape != (h, w):
            raise SampleError("depth_size_mismatch", f"depth {depth_mm.shape[1]}x{depth_mm.shape[0]} vs "
                                                     f"image {w}x{h}")
        sample["depth.png"] = encode_png(depth_mm)
    if mask is not None:
        if mask.shape != (h, w):
            raise SampleError("mask_size_mismatch", f"mask {mask.shape[1]}x{mask.shape[0]} vs image {w}x{h}")
        sample["mask.png"] = encode_png(np.where(mask, 255, 0).astype(np.uint8), compression=6)
    full_meta = dict(meta)
    full_meta.update(key=key, height=h, width=w, labeled=depth_mm is not None, depth_unit="mm",
                     has_mask=mask is not None)
    sample["meta.json"] = json.dumps(full_meta, sort_keys=True).encode("utf-8")
    return sample


# -------------------------------------------------------------------------------- reader side

def rgb_member(raw: dict) -> str | None:
    for ext in RGB_EXTS + ("jpeg",):
        if f"rgb.{ext}" in raw:
            return f"rgb.{ext}"
    return None


def check_raw(raw: dict, labeled: bool | None) -> str | None:
    """Cheap structural check of a raw tar sample (no decoding): the skip reason, or None if it may pass."""
    if rgb_member(raw) is None or "meta.json" not in raw:
        return "incomplete_sample"
    if labeled is True and "depth.png" not in raw:
        return "missing_depth"
    return None


AREA_MIN_SHRINK = 1.25  # below this factor area averaging is close to bilinear, and 5x slower in OpenCV


def resize_rgb(arr: np.ndarray, h: int, w: int) -> np.ndarray:
    """Area interpolation when shrinking by >= 1.25x (anti-aliased), bilinear otherwise."""
    if arr.shape[:2] == (h, w):
        return arr
    shrink = max(arr.shape[0] / h, arr.shape[1] / w)
    return cv2.resize(arr, (w, h), interpolation=cv2.INTER_AREA if shrink >= AREA_MIN_SHRINK else cv2.INTER_LINEAR)


def resize_nearest(arr: np.ndarray, h: int, w: int) -> np.ndarray:
    """Nearest-neighbour resize (depth, masks): never averages values across an edge."""
    if arr.shape[:2] == (h, w):
        return arr
    src = arr.view(np.uint8) if arr.dtype == np.bool_ else arr
    out = cv2.resize(src, (w, h), interpolation=cv2.INTER_NEAREST)
    return out.view(np.bool_) if arr.dtype == np.bool_ else out


def decode_sample(raw: dict, *, height: int | None, labeled: bool | None = None, bgr: bool = False) -> dict:
    """A raw tar sample (``{"__key__", "rgb.jpg", "depth.png", ...}`` bytes) -> numpy parts at the training
    resolution: ``{"key", "rgb": uint8 (H, 2H, 3), "depth": float32 metres (H, 2H) or None, "valid": bool
    (H, 2H), "meta"}``. ``labeled``: None = as stored, True = depth required, False = depth ignored.
    ``height=None`` keeps the stored resolution. RGB is resized with area interpolation when shrinking by
    1.25x or more, bilinear otherwise; depth and mask with nearest neighbour. ``bgr=True`` returns the
    image as ``"bgr"`` (OpenCV's channel order) instead of ``"rgb"``, saving a conversion."""
    key = raw.get("__key__", "?")
    reason = check_raw(raw, labeled)
    if reason is not None:
        raise SampleError(reason, f"members present: {sorted(k for k in raw if not k.startswith('__'))}")
    try:
        meta = json.loads(raw["meta.json"])
    except Exception as exc:
        raise SampleError("incomplete_sample", f"meta.json is not JSON: {exc}") from None
    if meta.get("has_mask") and "mask.png" not in raw:
        raise SampleError("incomplete_sample", "meta.json announces a mask but mask.png is missing")
    if meta.get("labeled") and labeled is not False and "depth.png" not in raw:
        raise SampleError("incomplete_sample", "meta.json announces depth but depth.png is missing")
    data = raw[rgb_member(raw)]
    h0, w0 = image_size(data)
    check_panorama_size(h0, w0)
    th, tw = (h0, w0) if height is None else (int(height), 2 * int(height))
    image, _ = decode_bgr(data, (th, tw))
    image = resize_rgb(image, th, tw)
    depth = None
    if labeled is not False and "depth.png" in raw:
        mm = decode_depth_png(raw["depth.png"])
        if mm.shape != (h0, w0):
            raise SampleError("depth_size_mismatch", f"depth {mm.shape[1]}x{mm.shape[0]} vs image {w0}x{h0}")
        depth = mm_to_metres(resize_nearest(mm, th, tw))
    valid = np.ones((th, tw), dtype=bool)
    if "mask.png" in raw:
        m = decode_mask(raw["mask.png"], f"{key}.mask.png")
        if m.shape != (h0, w0):
            raise SampleError("mask_size_mismatch", f"mask {m.shape[1]}x{m.shape[0]} vs image {w0}x{h0}")
        valid &= resize_nearest(m, th, tw)
    if depth is not None:
        valid &= depth > 0
    if bgr:
        return {"key": key, "bgr": image, "depth": depth, "valid": valid, "meta": meta}
    return {"key": key, "rgb": cv2.cvtColor(image, cv2.COLOR_BGR2RGB), "depth": depth, "valid": valid, "meta": meta}
