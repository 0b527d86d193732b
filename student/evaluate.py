"""Evaluation: ``python -m student.evaluate --checkpoint RUN --shards VAL [--protocol lstsq|median|none]``.

Any predictor that maps RGB panoramas (B, 3, H, W) to disparity (B, 1, H, W) is scored the same way:
disparity -> depth -> alignment under the protocol -> the seven metrics on pixels with 0 < gt <= max
depth (``student.metrics``, implemented in ``panorama.depth_math``). The primary protocol (default
``lstsq``, the Depth Anywhere reference code's) is reported first and, beside it, the other one
(``median``, the paper's text): ``eval.json`` holds both under ``metrics_by_protocol`` (``metrics`` is the
primary's) and the printed table has a row for each. ``--crop stanford2d3d`` crops the reference code's
68 rows at 512, scaled to the evaluation height. ``--model teacher-cube`` scores the perspective teacher on the six faces
of the unrotated cube merged back to the sphere: the paper's Table 3 "Depth Anything" row and Lee et
al.'s cube-map baseline. Each face's answer is normalised on its own, so the merged map has the seams
that distillation is meant to remove.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Callable, Iterable

import torch

from panorama import equirect_to_cube, planar_faces_to_equirect
from sharding import cli
from student.metrics import (DEFAULT_PROTOCOL, METRIC_NAMES, PROTOCOLS, MetricAccumulator, other_protocol,
                             per_image_metrics, stanford2d3d_crop)

log = logging.getLogger("pano_distill.evaluate")

# Depth is capped at this multiple of the panorama's nearest predicted depth: a relative prediction's
# zero disparity (its farthest point, after min-max normalisation) would otherwise be infinitely far.
_MAX_DEPTH_RANGE = 1000.0


def disparity_to_eval_depth(disp: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) relative disparity -> positive depth, capped per image (see ``_MAX_DEPTH_RANGE``)."""
    disp = torch.nan_to_num(disp.float(), nan=0.0, posinf=0.0, neginf=0.0)
    peak = disp.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return 1.0 / disp.clamp_min(1e-12).maximum(peak / _MAX_DEPTH_RANGE)


def _batches(samples: Iterable[dict], batch_size: int, max_images: int):
    buf: list[dict] = []
    n = 0
    for s in samples:
        if "depth" not in s:
            raise ValueError(f"sample {s.get('key')} has no depth: evaluation needs labeled shards")
        buf.append(s)
        n += 1
        if len(buf) == batch_size:
            yield buf
            buf = []
        if max_images and n >= max_images:
            break
    if buf:
        yield buf


@torch.inference_mode()
def evaluate_predictor(predict: Callable[[torch.Tensor], torch.Tensor], samples: Iterable[dict], *,
                       device: torch.device, protocol: str = DEFAULT_PROTOCOL, max_depth: float = 10.0,
                       crop: int = 0, max_images: int = 0, batch_size: int = 4, progress: bool = False) -> dict:
    """Score ``predict`` (RGB -> disparity) on labeled samples; returns the report written to eval.json.

    ``metrics`` holds the metrics under ``protocol``; ``metrics_by_protocol`` those under ``protocol`` and,
    second, under ``other_protocol`` (lstsq <-> median), from the same predictions."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    other = other_protocol(protocol)
    acc, acc_other = MetricAccumulator(), MetricAccumulator()
    from tqdm import tqdm

    for group in tqdm(_batches(samples, batch_size, max_images), desc="eval", unit="batch", disable=not progress):
        rgb = torch.stack([s["rgb"] for s in group]).to(device)
        gt = torch.stack([s["depth"] for s in group])
        valid = torch.stack([s["valid"] for s in group])
        disp = predict(rgb).float().cpu()
        if disp.shape[-2:] != gt.shape[-2:]:
            disp = torch.nn.functional.interpolate(disp, size=gt.shape[-2:], mode="bilinear", align_corners=False)
        depth = disparity_to_eval_depth(disp)
        acc.update(per_image_metrics(depth, gt, valid, max_depth, protocol, crop))
        acc_other.update(per_image_metrics(depth, gt, valid, max_depth, other, crop))
    return {"protocol": protocol, "other_protocol": other, "max_depth": max_depth, "crop": crop,
            "images": acc.images, "images_without_valid_pixels": acc.empty, "metrics": acc.result(),
            "metrics_by_protocol": {protocol: acc.result(), other: acc_other.result()}}


def student_predictor(model: torch.nn.Module, amp_dtype: torch.dtype | None = None):
    model.eval()

    def predict(rgb: torch.Tensor) -> torch.Tensor:
        with torch.autocast(rgb.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            return model(rgb).float()

    return predict


def teacher_cube_predictor(backend, face_size: int):
    """Perspective teacher on the 6 unrotated cube faces, each normalised alone, merged to the sphere."""

    def predict(rgb: torch.Tensor) -> torch.Tensor:
        b, _, h, w = rgb.shape
        faces = equirect_to_cube(rgb, face_size).reshape(b * 6, 3, face_size, face_size)
        disp = backend.pseudo_label(faces.contiguous()).to(rgb.device).reshape(b, 6, 1, face_size, face_size)
        disp = torch.nan_to_num(disp, nan=0.0)
        return planar_faces_to_equirect(disp, h, w, quantity="disparity")

    return predict


def format_table(rows: dict[str, dict[str, float]], title: str = "") -> str:
    """A markdown table: one row per named result, one column per metric."""
    head = "| " + " | ".join(["model", *METRIC_NAMES]) + " |"
    sep = "|" + "---|" * (len(METRIC_NAMES) + 1)
    lines = [title, "", head, sep] if title else [head, sep]
    for name, m in rows.items():
        lines.append("| " + " | ".join([name, *(f"{m[k]:.4f}" for k in METRIC_NAMES)]) + " |")
    return "\n".join(lines)


def protocol_rows(name: str, report: dict) -> dict[str, dict[str, float]]:
    """Table rows of one report: the primary protocol first, then the other one beside it."""
    by = report.get("metrics_by_protocol") or {report["protocol"]: report["metrics"]}
    return {f"{name} [{p}]": m for p, m in by.items()}


def parse_crop(value: str, height: int) -> int:
    """``--crop``: rows, or ``stanford2d3d`` for the reference code's crop scaled to ``height``."""
    if value in ("stanford2d3d", "s2d3d"):
        return stanford2d3d_crop(height)
    try:
        rows = int(value)
    except ValueError:
        raise cli.UserError(f"--crop {value!r}: expected a number of rows or 'stanford2d3d'") from None
    if rows < 0 or 2 * rows >= height:
        raise cli.UserError(f"--crop {rows}: must be >= 0 and leave rows of a {height}-row panorama")
    return rows


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m student.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="run folder, checkpoint folder or model.pt (the student to score)")
    p.add_argument("--shards", nargs="+", required=True, help="labeled shards: tar paths, globs or a manifest.json")
    p.add_argument("--split", default=None, help="split to read when --shards is a manifest.json")
    p.add_argument("--protocol", choices=PROTOCOLS, default=DEFAULT_PROTOCOL,
                   help="primary alignment protocol (the other of lstsq/median is reported beside it)")
    p.add_argument("--crop", default="0",
                   help="rows ignored at top and bottom, or 'stanford2d3d' (the reference code's 68 rows at 512, "
                        "scaled to the evaluation height: Stanford2D3D's black bands)")
    p.add_argument("--max-depth", type=float, default=10.0)
    p.add_argument("--max-images", type=int, default=0)
    p.add_argument("--height", type=int, default=0, help="evaluation resolution (default: the run's data.height)")
    p.add_argument("--model", choices=("student", "teacher-cube"), default="student")
    p.add_argument("--teacher", default="", help="teacher id/path for --model teacher-cube (default: the run's)")
    p.add_argument("--input-size", type=int, default=0, help="teacher input size (default: the run's)")
    p.add_argument("--face-size", type=int, default=0, help="cube face size for teacher-cube (default: height // 2)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="", help="folder for eval.json and eval.md (default: next to the checkpoint)")
    cli.add_common_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    from sharding.device import resolve_device
    from student.inference import load_student
    from student.config import TrainConfig

    args = _parser().parse_args(argv)
    cli.setup_logging(args.log_level)
    device = resolve_device(args.device)
    cfg = TrainConfig()
    model = None
    if args.checkpoint:
        model, cfg, ckpt_file = load_student(args.checkpoint, device)
    elif args.model == "student":
        raise cli.UserError("--checkpoint is required to evaluate a student (or use --model teacher-cube)")
    height = args.height or cfg.data.height
    crop = parse_crop(str(args.crop), height)
    from sharding.stream import read_samples

    samples = read_samples(args.shards, height=height, split=args.split) if args.split else read_samples(args.shards, height=height)
    if args.model == "teacher-cube":
        from student.labels import build_backend

        teacher_cfg = cfg.teacher
        if args.teacher:
            teacher_cfg.model = args.teacher
        if args.input_size:
            teacher_cfg.input_size = args.input_size
        backend, description = build_backend(teacher_cfg, device)
        predict = teacher_cube_predictor(backend, args.face_size or height // 2)
        name = f"teacher-cube ({description})"
    else:
        predict = student_predictor(model)
        name = f"student ({cfg.model.label})"
    report = evaluate_predictor(predict, samples, device=device, protocol=args.protocol, max_depth=args.max_depth,
                                crop=crop, max_images=args.max_images, progress=True)
    report["model"] = name
    report["shards"] = args.shards
    if args.checkpoint:
        report["checkpoint"] = str(ckpt_file)
    out = Path(args.out) if args.out else (Path(ckpt_file).parent if args.checkpoint else Path("."))
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(protocol_rows(name, report),
                         f"{report['images']} panoramas, {args.protocol} alignment (primary; "
                         f"{report['other_protocol']} beside it), 0 < gt <= {args.max_depth} m, crop {crop}")
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "eval.md").write_text(table + "\n")
    print(table)
    print(f"\nwrote {out / 'eval.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
