"""Rows that every evidence table shares: scoring under both protocols, content-free baselines, per-face
fits of a teacher (and of a constant-distance prediction), and paired per-seed differences.

Every score here goes through ``student.evaluate.evaluate_predictor`` / ``panorama.depth_math`` with the
primary protocol (``lstsq``, the reference code's, by default) and the other one beside it, so a baseline
row and a model row are always scored the same way.
"""

from __future__ import annotations

import math
import statistics
from typing import Callable

import torch

MAX_DEPTH = 10.0
# Two-sided 95% quantiles of Student's t for df = 1..30 (beyond: the normal 1.96 is within 2%).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t975(df: int) -> float:
    if df < 1:
        raise ValueError(f"a t-interval needs at least 2 values (df >= 1), got df={df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def paired_difference(new: dict, base: dict) -> dict | None:
    """Per-seed differences ``new[seed] - base[seed]`` over the seeds both have: mean, sd, n and the 95%
    t-interval of the mean difference (``None`` with fewer than two common seeds)."""
    seeds = sorted(set(new) & set(base), key=str)
    if len(seeds) < 2:
        return None
    diffs = [new[s] - base[s] for s in seeds]
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    half = t975(len(diffs) - 1) * sd / math.sqrt(len(diffs))
    return {"seeds": seeds, "diffs": diffs, "mean": mean, "sd": sd, "n": len(diffs), "ci95": [mean - half, mean + half]}


def read_labeled(manifests: list[str], height: int):
    from sharding.stream import read_samples

    return read_samples(list(manifests), height=height, labeled=True)


def score(predict: Callable, manifests: list[str], height: int, protocol: str = "lstsq") -> dict:
    """{protocol: metrics, other protocol: metrics, "images": n} of an RGB -> disparity predictor."""
    from student.evaluate import evaluate_predictor

    rep = evaluate_predictor(predict, read_labeled(manifests, height), device=torch.device("cpu"), protocol=protocol)
    return {**rep["metrics_by_protocol"], "images": rep["images"]}


def constant_predictor(rgb: torch.Tensor) -> torch.Tensor:
    """A content-free prediction: the same disparity everywhere (scored, it is a constant depth)."""
    b, _, h, w = rgb.shape
    return torch.ones(b, 1, h, w, dtype=torch.float32, device=rgb.device)


def constant_distance_faces(face: int) -> torch.Tensor:
    """(6, face * face) planar disparity of a sphere of constant distance seen on the six cube faces: the
    content-free answer a per-face fit starts from (not constant on a face: planar depth is r cos(angle))."""
    from panorama import equirect_to_planar_faces

    ones = torch.ones(1, 1, 2 * face, 4 * face)
    return equirect_to_planar_faces(ones, face, quantity="disparity").reshape(6, -1)


def face_fitted_scores(face_answers: Callable[[torch.Tensor], torch.Tensor], manifests: list[str], height: int,
                       face: int, protocol: str = "lstsq") -> dict:
    """Per-face answers fitted to the ground truth, merged to 360, scored under both protocols.

    ``face_answers(faces (6, 3, F, F) RGB) -> (6, F * F)`` relative planar disparity. Each face's answer is
    fitted to the ground truth's planar disparity on that face (least-squares scale and shift over its
    valid pixels), then the six faces are merged back to the sphere, with disparity floored at 1 / 10 m. A perspective teacher answers each face
    in its own affine frame; this per-face fit removes those frames and measures what the answers know (an
    upper bound, not a deployable predictor). Applied to ``constant_distance_faces`` it is the matching
    content-free baseline: what the fit alone achieves.
    """
    from panorama import (depth_to_disparity, disparity_to_depth, equirect_to_cube, equirect_to_planar_faces,
                          planar_faces_to_equirect)
    from student.metrics import MetricAccumulator, fit_scale_shift, other_protocol, per_image_metrics

    f, other = face, other_protocol(protocol)
    accs = {protocol: MetricAccumulator(), other: MetricAccumulator()}
    for sample in read_labeled(manifests, height):
        rgb, depth, valid = sample["rgb"][None], sample["depth"][None], sample["valid"][None].bool()
        h, w = depth.shape[-2:]
        faces = equirect_to_cube(rgb, f).reshape(6, 3, f, f).contiguous()
        t = torch.nan_to_num(face_answers(faces).float().reshape(6, -1))
        ok_eq = valid & (depth > 0)
        g = equirect_to_planar_faces(depth_to_disparity(depth, ok_eq), f).reshape(6, -1)
        ok = equirect_to_cube(ok_eq.float(), f).reshape(6, -1) > 0.999  # no bilinear mix with invalid pixels
        fitted = torch.zeros_like(t)
        for i in range(6):
            if ok[i].sum() < 16:
                continue
            s_, t_ = fit_scale_shift(t[i][ok[i]], g[i][ok[i]])
            fitted[i] = float(s_) * t[i] + float(t_)
        disp = planar_faces_to_equirect(fitted.reshape(1, 6, 1, f, f), h, w, quantity="disparity")
        # a fitted face can reach zero or negative disparity at its far side: floor it at 1 / max depth (10 m),
        # so that both protocols see a bounded depth (the median one has no clamp of its own)
        pred = disparity_to_depth(disp.clamp_min(1.0 / MAX_DEPTH))
        for p, acc in accs.items():
            acc.update(per_image_metrics(pred, depth, valid, MAX_DEPTH, p, 0))
    return {p: acc.result() for p, acc in accs.items()} | {"images": accs[protocol].images}


def teacher_face_answers(backend) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda faces: backend.pseudo_label(faces)


def constant_distance_answers(face: int) -> Callable[[torch.Tensor], torch.Tensor]:
    const = constant_distance_faces(face)
    return lambda faces: const
