"""``python -m student.predict --checkpoint RUN INPUT... --out DIR``: depth for panoramas.

For each input image (files or folders of 2:1 JPEG/PNG) it writes, in ``DIR``:

* ``NAME_depth.png`` - 16-bit PNG in millimetres, ``NAME_depth.npy`` - float32 metres;
* ``NAME_depth_color.png`` - the depth colourised (near = bright), for people;
* ``NAME.ply`` - a point cloud coloured by the RGB (binary little-endian PLY, x right, y up, z forward).

The student predicts relative disparity (it was trained affine-invariantly), so the absolute scale of
depth is unknown: depth is ``1 / disparity`` rescaled so that its median is ``--median-depth`` metres
(2 m by default, typical of indoor rooms). ``NAME.json`` records this, so nobody mistakes it for metric
depth.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from panorama import depth_to_points
from sharding import cli
from sharding.cli import UserError
from student.evaluate import disparity_to_eval_depth

log = logging.getLogger("pano_distill.predict")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def list_inputs(paths: list[str]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES and not q.stem.endswith("_valid"))
        elif p.is_file():
            out.append(p)
        else:
            raise UserError(f"input {p} does not exist")
    return out


def read_panorama(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"{path}: not a readable image")
    h, w = img.shape[:2]
    if abs(w - 2 * h) > 1:
        raise ValueError(f"{path}: a panorama must be 2:1 equirectangular, got {w}x{h}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def write_ply(path: Path, points: np.ndarray, colors: np.ndarray) -> None:
    """Binary little-endian PLY with float32 x, y, z and uint8 r, g, b."""
    n = len(points)
    header = ("ply\nformat binary_little_endian 1.0\n"
              f"element vertex {n}\nproperty float x\nproperty float y\nproperty float z\n"
              "property uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n")
    rec = np.empty(n, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("r", "u1"), ("g", "u1"), ("b", "u1")])
    rec["x"], rec["y"], rec["z"] = points[:, 0], points[:, 1], points[:, 2]
    rec["r"], rec["g"], rec["b"] = colors[:, 0], colors[:, 1], colors[:, 2]
    with path.open("wb") as f:
        f.write(header.encode("ascii"))
        f.write(rec.tobytes())


def read_ply(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads back what ``write_ply`` writes (used by tests and for a quick look)."""
    data = path.read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode("ascii").splitlines()
    n = int(next(line.split()[-1] for line in header if line.startswith("element vertex")))
    rec = np.frombuffer(data[end:], dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("r", "u1"), ("g", "u1"), ("b", "u1")], count=n)
    return np.stack([rec["x"], rec["y"], rec["z"]], 1), np.stack([rec["r"], rec["g"], rec["b"]], 1)


def colorize(depth: np.ndarray) -> np.ndarray:
    """Depth -> RGB uint8 with near bright, via inverse depth and a perceptual colour map."""
    import matplotlib

    inv = 1.0 / np.maximum(depth, 1e-6)
    lo, hi = np.percentile(inv, [2, 98])
    norm = np.clip((inv - lo) / max(hi - lo, 1e-9), 0, 1)
    return (matplotlib.colormaps["magma"](norm)[..., :3] * 255).astype(np.uint8)


@torch.inference_mode()
def predict_depth(model: torch.nn.Module, rgb: np.ndarray, height: int, device: torch.device,
                  median_depth: float) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> relative depth float32 (H, W) at the input resolution."""
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float().div(255).to(device)
    small = F.interpolate(x, size=(height, 2 * height), mode="area")
    disp = model(small).float()
    disp = F.interpolate(disp, size=rgb.shape[:2], mode="bilinear", align_corners=False)
    depth = disparity_to_eval_depth(disp)[0, 0]
    return (depth * (median_depth / depth.median())).cpu().numpy().astype(np.float32)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m student.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder or model.pt")
    p.add_argument("inputs", nargs="+", help="panorama images or folders of them")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--height", type=int, default=0, help="inference resolution (default: the run's data.height)")
    p.add_argument("--median-depth", type=float, default=2.0, help="metres; sets the unknown global scale")
    p.add_argument("--ply-stride", type=int, default=2, help="keep every n-th pixel in each direction in the PLY")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    cli.add_common_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """The command; ``cli.run(main)`` turns a ``UserError`` (bad checkpoint, input, device) into exit code 2."""
    from sharding.device import resolve_device
    from student.inference import load_student

    args = _parser().parse_args(argv)
    cli.setup_logging(args.log_level)
    device = resolve_device(args.device)
    model, cfg, ckpt_file = load_student(args.checkpoint, device)  # CRC-checked; non-finite weights refused
    height = args.height or cfg.data.height
    if height <= 0 or height % 16:
        raise UserError(f"--height must be a positive multiple of 16, got {height}")
    inputs = list_inputs(args.inputs)
    if not inputs:
        raise UserError(f"no .jpg/.png panoramas found in {' '.join(args.inputs)}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    done, failed = 0, []
    for path in inputs:
        try:
            rgb = read_panorama(path)
        except ValueError as err:
            log.error("skipped: %s", err)
            failed.append(str(err))
            continue
        depth = predict_depth(model, rgb, height, device, args.median_depth)
        stem = path.stem
        np.save(out / f"{stem}_depth.npy", depth)
        mm = np.clip(np.round(depth * 1000.0), 0, 65535).astype(np.uint16)
        cv2.imwrite(str(out / f"{stem}_depth.png"), mm)
        cv2.imwrite(str(out / f"{stem}_depth_color.png"), cv2.cvtColor(colorize(depth), cv2.COLOR_RGB2BGR))
        # the PLY uses an area-downsampled grid: its pixel centres are again equirect pixel centres
        s = max(1, args.ply_stride)
        small = (rgb.shape[0] // s, rgb.shape[1] // s)
        d_t = F.interpolate(torch.from_numpy(depth)[None, None], size=small, mode="area")[0]
        rgb_t = cv2.resize(rgb, (small[1], small[0]), interpolation=cv2.INTER_AREA)
        pts = depth_to_points(d_t)[0].numpy()
        write_ply(out / f"{stem}.ply", pts, rgb_t.reshape(-1, 3))
        (out / f"{stem}.json").write_text(json.dumps({
            "input": str(path), "checkpoint": str(ckpt_file), "model": cfg.model.label,
            "inference_height": height, "depth": "relative: 1/disparity scaled to the median below",
            "median_depth_m": args.median_depth, "ply_points": int(len(pts)), "frame": "x right, y up, z forward"},
            indent=2) + "\n")
        done += 1
        log.info("%s -> %s_{depth.png,depth.npy,depth_color.png}, %s.ply", path.name, stem, stem)
    print(f"predicted {done} panoramas into {out}" + (f"; {len(failed)} skipped:\n  " + "\n  ".join(failed) if failed else ""))
    return 0 if done else 1


if __name__ == "__main__":
    raise SystemExit(cli.run(main))

