"""Generated perspective views with exact planar depth, for training our own perspective teacher.

This is the miniature of the paper's "1.5M labeled perspective images": pinhole views of the generated
rooms of ``sharding.synthetic``, each from its own scene, with exact planar depth along the optical axis.

Sampling (one view per scene, everything drawn from ``np.random.default_rng([seed, split, index])``):

* scene: ``make_scene(base + index, style)`` with windows on (sky pixels are invalid). ``base`` is
  ``TRAIN_SEED_BASE`` (1_000_000) for ``train`` and ``VAL_SEED_BASE`` (1_900_000) for ``val``, so the
  scenes are disjoint from each other and from the panorama seeds of the reproduction (< 1_000_000).
  Styles cycle apartment, house, office with the index, so every split is balanced.
* camera rotation (``panorama.rotation_matrix`` convention): yaw uniform in [-180, 180); pitch uniform in
  [-60, 60] for 80% of the views and in +-[60, 90] for the rest (the teacher also sees the up and down
  cube faces of rotated cubes: ceilings and floors); roll within +-10 deg for half of the views and
  +-45 deg for the other half (cube faces of a rotated cube are rolled).
* horizontal field of view uniform in [60, 100] deg.
* a view with under 30% valid pixels (mostly sky through a window) is redrawn (new angles, same scene).
* ``variety="broad"`` (``--variety broad``): half of the scenes (drawn per view) come from
  ``sharding.synthetic_scenes.broad_style`` instead of the cycled named style: room sizes from 2.5 m rooms to
  16 m halls, ceilings 2.3-4 m, 0-24 pieces of any furniture kind, pillars, windows, lights of random count,
  colour and power, and palettes mixed across styles with random hue shifts. ``"styles"`` (the default, and
  what v1 and the first v2 were trained on) keeps the three named styles only.

The cache (default ``~/.cache/pano-distill/perspective``, or ``$PANO_DISTILL_CACHE/perspective``) holds
chunks of ``CHUNK`` views as ``.npz``: ``rgb`` uint8 (n, S, S, 3), ``depth`` float16 (n, S, S) planar
metres with 0 = invalid (sky), and the view parameters. A chunk is a pure function of
(version, split, size, seed, chunk index), so a longer run reuses the chunks of a shorter one.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from panorama import rotation_matrix
from panorama.depth_math import normalize_disparity
from sharding.synthetic import STYLES, make_scene, render_perspective
from sharding.synthetic_scenes import broad_style

CACHE_VERSION = 1  # bump when rendering or view sampling changes: the cache is keyed by it
CHUNK = 250
TRAIN_SEED_BASE = 1_000_000
VAL_SEED_BASE = 1_900_000
SPLITS = {"train": (0, TRAIN_SEED_BASE), "val": (1, VAL_SEED_BASE)}
MAX_TRAIN_VIEWS = VAL_SEED_BASE - TRAIN_SEED_BASE
MIN_VALID_FRACTION = 0.3
FOV_RANGE = (60.0, 100.0)
PITCH_MAX = 60.0
VARIETIES = ("styles", "broad")
BROAD_FRACTION = 0.5  # with variety="broad": the share of scenes drawn from broad_style
# ImageNet statistics, as Depth Anything's processor: the saved processor config and training agree.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


def default_cache_dir() -> Path:
    root = os.environ.get("PANO_DISTILL_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "pano-distill"
    return base / "perspective"


@dataclass(frozen=True)
class ViewSpec:
    split: str
    index: int
    scene_seed: int
    style: str
    yaw: float
    pitch: float
    roll: float
    fov: float


def _draw_angles(rng: np.random.Generator) -> tuple[float, float, float, float]:
    yaw = rng.uniform(-180.0, 180.0)
    if rng.random() < 0.8:
        pitch = rng.uniform(-PITCH_MAX, PITCH_MAX)
    else:
        pitch = float(rng.choice([-1.0, 1.0])) * rng.uniform(PITCH_MAX, 90.0)
    roll = rng.uniform(-10.0, 10.0) if rng.random() < 0.5 else rng.uniform(-45.0, 45.0)
    fov = rng.uniform(*FOV_RANGE)
    return float(yaw), float(pitch), float(roll), float(fov)


def render_view(split: str, index: int, size: int, seed: int = 0, max_tries: int = 8, variety: str = "styles"):
    """Render view ``index`` of ``split`` -> (rgb uint8 (S, S, 3), planar depth float32 (S, S), ViewSpec).

    Depth is 0 where invalid (sky). Deterministic in (split, index, size, seed, variety).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    if variety not in VARIETIES:
        raise ValueError(f"variety must be one of {VARIETIES}, got {variety!r}")
    split_id, base = SPLITS[split]
    if not 0 <= index < MAX_TRAIN_VIEWS:
        raise ValueError(f"view index must be in [0, {MAX_TRAIN_VIEWS}), got {index}")
    rng = np.random.default_rng([int(seed), split_id, int(index)])
    style = STYLES[index % len(STYLES)]
    if variety == "broad":  # its own stream, so the angles below stay those of the "styles" view
        vrng = np.random.default_rng([int(seed), split_id, int(index), 1])
        if vrng.random() < BROAD_FRACTION:
            style = broad_style(vrng)
    scene = make_scene(base + index, style, windows=True)
    style = scene.style
    for _ in range(max_tries):
        yaw, pitch, roll, fov = _draw_angles(rng)
        rgb, depth, valid = render_perspective(scene, rotation_matrix(yaw, pitch, roll, dtype=torch.float64),
                                               size, fov)
        if valid.mean() >= MIN_VALID_FRACTION:
            break
    depth = np.where(valid, depth, 0.0).astype(np.float32)
    return rgb, depth, ViewSpec(split, int(index), base + index, style, yaw, pitch, roll, fov)


def _chunk_path(cache_dir: Path, split: str, size: int, seed: int, chunk: int, variety: str = "styles") -> Path:
    version = f"v{CACHE_VERSION}" + ("" if variety == "styles" else f"-{variety}")
    return Path(cache_dir) / version / f"{split}-s{size}-seed{seed}" / f"chunk{chunk:05d}.npz"


def _render_chunk(args) -> str:
    cache_dir, split, size, seed, chunk, variety = args
    path = _chunk_path(cache_dir, split, size, seed, chunk, variety)
    if path.exists():
        return str(path)
    torch.set_num_threads(1)
    rgbs, depths, specs = [], [], []
    for i in range(chunk * CHUNK, (chunk + 1) * CHUNK):
        rgb, depth, spec = render_view(split, i, size, seed, variety=variety)
        rgbs.append(rgb)
        depths.append(depth.astype(np.float16))
        specs.append(asdict(spec))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, rgb=np.stack(rgbs), depth=np.stack(depths), specs=np.array(json.dumps(specs)))
    os.replace(tmp, path)
    return str(path)


def _render_direct(split: str, n: int, size: int, seed: int, progress: bool, variety: str = "styles"):
    from tqdm.auto import tqdm

    rgbs, depths = [], []
    for i in tqdm(range(n), desc=f"render {split}", disable=not progress, leave=False):
        rgb, depth, _ = render_view(split, i, size, seed, variety=variety)
        rgbs.append(rgb)
        depths.append(depth.astype(np.float16))
    return np.stack(rgbs), np.stack(depths)


def load_views(split: str, n: int, size: int, seed: int = 0, cache_dir: str | Path | None = None,
               workers: int = 1, progress: bool = True, variety: str = "styles") -> "PerspectiveViews":
    """The first ``n`` views of ``split``, from the cache (rendering missing chunks) or, with
    ``cache_dir=""``, rendered directly without a cache (tests, tiny runs). ``variety``: see the module
    docstring (validation views are compared across teachers, so callers keep them at ``"styles"``)."""
    from tqdm.auto import tqdm

    if n <= 0:
        raise ValueError(f"need at least one view, got n={n}")
    if cache_dir == "" or cache_dir is False:
        rgb, depth = _render_direct(split, n, size, seed, progress, variety)
        return PerspectiveViews(torch.from_numpy(rgb), torch.from_numpy(depth))
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    n_chunks = -(-n // CHUNK)
    jobs = [(str(cache_dir), split, int(size), int(seed), k, variety) for k in range(n_chunks)]
    todo = [j for j in jobs if not _chunk_path(Path(j[0]), *j[1:]).exists()]
    if todo:
        bar = tqdm(total=len(todo) * CHUNK, desc=f"render {split} views ({size}px) -> {cache_dir}",
                   disable=not progress, unit="view")
        if workers > 1 and len(todo) > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for _ in pool.map(_render_chunk, todo):
                    bar.update(CHUNK)
        else:
            for j in todo:
                _render_chunk(j)
                bar.update(CHUNK)
        bar.close()
    rgbs, depths = [], []
    for j in jobs:
        with np.load(_chunk_path(Path(j[0]), *j[1:])) as z:
            rgbs.append(z["rgb"])
            depths.append(z["depth"])
    rgb, depth = np.concatenate(rgbs)[:n], np.concatenate(depths)[:n]
    return PerspectiveViews(torch.from_numpy(rgb), torch.from_numpy(depth))


# ------------------------------------------------------------------------------------------ batches

def depth_to_target(depth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Planar depth (B, S, S), 0 = invalid -> (disparity normalised per view to [0, 1] over valid pixels
    with NaN elsewhere, valid bool)."""
    depth = depth.float()
    valid = torch.isfinite(depth) & (depth > 0)
    disp = torch.where(valid, 1.0 / depth.clamp_min(1e-6), torch.zeros_like(depth))
    target = normalize_disparity(disp, valid)
    return torch.where(valid, target, torch.full_like(target, float("nan"))), valid


def normalize_image(rgb01: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> the model's ``pixel_values`` (ImageNet mean/std)."""
    mean = torch.tensor(IMAGE_MEAN, dtype=rgb01.dtype, device=rgb01.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD, dtype=rgb01.dtype, device=rgb01.device).view(1, 3, 1, 1)
    return (rgb01 - mean) / std


def photometric_augment(rgb: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random per-image photometric changes of (B, 3, H, W) RGB in [0, 1], so that the teacher cannot
    lean on a style's palette: channel permutation (p = 0.5), grayscale (p = 0.1), saturation [0.3, 1.6],
    per-channel gain [0.8, 1.2], brightness [0.6, 1.4], contrast [0.6, 1.4], gamma [0.7, 1.4], Gaussian
    noise with sigma in [0, 0.03]."""
    b = rgb.shape[0]

    def u(lo, hi, *shape):
        return torch.rand(b, *shape, generator=generator) * (hi - lo) + lo

    out = rgb.clone()
    perm = torch.stack([torch.randperm(3, generator=generator) for _ in range(b)])
    swap = torch.rand(b, generator=generator) < 0.5
    out[swap] = torch.stack([out[i, perm[i]] for i in range(b)])[swap]
    gray = out.mean(dim=1, keepdim=True)
    sat = u(0.3, 1.6, 1, 1, 1)
    sat = torch.where(torch.rand(b, 1, 1, 1, generator=generator) < 0.1, torch.zeros_like(sat), sat)
    out = gray + (out - gray) * sat
    out = out * u(0.8, 1.2, 3, 1, 1) * u(0.6, 1.4, 1, 1, 1)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * u(0.6, 1.4, 1, 1, 1) + mean
    out = out.clamp(0.0, 1.0) ** u(0.7, 1.4, 1, 1, 1)
    out = out + torch.randn(out.shape, generator=generator) * u(0.0, 0.03, 1, 1, 1)
    return out.clamp(0.0, 1.0)


class PerspectiveViews:
    """Views held in memory: ``rgb`` uint8 (N, S, S, 3) and ``depth`` float16 (N, S, S), 0 = invalid."""

    def __init__(self, rgb: torch.Tensor, depth: torch.Tensor):
        if rgb.ndim != 4 or rgb.shape[-1] != 3 or depth.shape != rgb.shape[:3]:
            raise ValueError(f"expected rgb (N, S, S, 3) and depth (N, S, S), got {tuple(rgb.shape)}, "
                             f"{tuple(depth.shape)}")
        self.rgb, self.depth = rgb, depth

    def __len__(self) -> int:
        return self.rgb.shape[0]

    @property
    def size(self) -> int:
        return int(self.rgb.shape[1])

    def batch(self, index, augment: bool = False, generator: torch.Generator | None = None,
              downscale: int = 1, resample: float = 0.0) -> dict:
        """{"pixel_values" (B, 3, S, S) normalised, "rgb" (B, 3, S, S) in [0, 1], "depth" (B, S, S) float32
        planar metres (0 invalid), "target" (B, S, S) normalised disparity (NaN invalid), "valid"}.

        ``downscale`` k > 1 gives S / k views (cheap low-resolution training steps): RGB is box-filtered;
        disparity is averaged over the valid pixels of each k x k block, and a block is valid only if all
        of its pixels are (no blending across the sky boundary).

        ``resample`` p (with ``augment``): each view's RGB, with probability p, is box-filtered to half size
        and resized back with bicubic interpolation, as the teacher server resizes a cube face rendered at
        half the teacher's input size (the reproduction's 64-px faces into a 128-px teacher); depth and
        target stay sharp, so the teacher learns to answer blurred faces with sharp disparity."""
        index = torch.as_tensor(index, dtype=torch.long)
        rgb = self.rgb[index].permute(0, 3, 1, 2).float() / 255.0
        depth = self.depth[index].float()
        if downscale > 1:
            rgb = torch.nn.functional.avg_pool2d(rgb, downscale)
            ok = (depth > 0).float()[:, None]
            disp = torch.where(ok > 0, 1.0 / depth.clamp_min(1e-6)[:, None], torch.zeros_like(ok))
            frac = torch.nn.functional.avg_pool2d(ok, downscale)
            disp = torch.nn.functional.avg_pool2d(disp, downscale) / frac.clamp_min(1e-6)
            depth = torch.where(frac > 0.999, 1.0 / disp.clamp_min(1e-6), torch.zeros_like(disp))[:, 0]
        if augment:
            flip = torch.rand(len(index), generator=generator) < 0.5
            rgb = torch.where(flip.view(-1, 1, 1, 1), rgb.flip(-1), rgb)
            depth = torch.where(flip.view(-1, 1, 1), depth.flip(-1), depth)
            if resample > 0:
                soft = torch.rand(len(index), generator=generator) < resample
                low = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(rgb, 2), size=rgb.shape[-2:],
                                                      mode="bicubic", align_corners=False).clamp(0.0, 1.0)
                rgb = torch.where(soft.view(-1, 1, 1, 1), low, rgb)
            rgb = photometric_augment(rgb, generator)
        target, valid = depth_to_target(depth)
        return {"pixel_values": normalize_image(rgb), "rgb": rgb, "depth": depth, "target": target,
                "valid": valid}
