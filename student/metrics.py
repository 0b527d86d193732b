"""Depth metrics and the alignment protocols of ``DESIGN.md``.

Protocols (``align``):

* ``"median"`` - the paper's (Depth Anywhere, appendix A.1): predicted depth is scaled by
  ``median(gt) / median(pred)`` over valid pixels.
* ``"lstsq"`` - the reference code's: least-squares scale and shift of the predicted *disparity* to the
  ground-truth disparity, back to depth clamped to [0.1, 10] m, then median scaling, clamped again.
* ``"none"`` - no alignment, for metric models.

Valid pixels: finite ground truth with ``0 < gt <= max_depth``, inside the optional ``valid`` mask and
outside ``crop`` rows at the top and bottom (Stanford2D3D's black bands). Metrics are computed per image
and averaged over images. Non-positive predicted depth is clamped to 1e-3 m rather than dropped, so a
model cannot improve its score by predicting nonsense at hard pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

METRIC_NAMES = ("abs_rel", "sq_rel", "rmse", "rmse_log", "delta1", "delta2", "delta3")
PROTOCOLS = ("median", "lstsq", "none")
_MIN_PRED = 1e-3
_CLAMP = (0.1, 10.0)


def _as_batch(x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim == 2:
        return x[None]
    if x.ndim == 4:
        if x.shape[1] != 1:
            raise ValueError(f"depth maps must have one channel, got shape {tuple(x.shape)}")
        return x[:, 0]
    if x.ndim == 3:
        return x
    raise ValueError(f"depth must be (H, W), (B, H, W) or (B, 1, H, W), got shape {tuple(x.shape)}")


def valid_mask(gt: torch.Tensor, valid: torch.Tensor | None = None, max_depth: float = 10.0,
               crop: int = 0) -> torch.Tensor:
    """(B, H, W) bool: pixels that enter a metric."""
    ok = torch.isfinite(gt) & (gt > 0) & (gt <= max_depth)
    if valid is not None:
        ok = ok & _as_batch(valid).bool()
    if crop:
        if 2 * crop >= gt.shape[-2]:
            raise ValueError(f"crop={crop} removes every row of a {gt.shape[-2]}-row image")
        ok[..., :crop, :] = False
        ok[..., gt.shape[-2] - crop:, :] = False
    return ok


def _lstsq_disparity(pred_disp: torch.Tensor, gt_disp: torch.Tensor) -> torch.Tensor:
    """Scale and shift minimising sum (s * pred + t - gt)^2, applied to ``pred_disp``."""
    a = torch.stack([pred_disp, torch.ones_like(pred_disp)], dim=-1)
    sol = torch.linalg.lstsq(a, gt_disp.unsqueeze(-1)).solution.squeeze(-1)
    return pred_disp * sol[0] + sol[1]


def align_prediction(pred: torch.Tensor, gt: torch.Tensor, align: str) -> torch.Tensor:
    """Align a 1-D vector of predicted depths to ground truth under a protocol (see module docstring)."""
    if align not in PROTOCOLS:
        raise ValueError(f"align must be one of {PROTOCOLS}, got {align!r}")
    pred = pred.clamp_min(_MIN_PRED)
    if align == "none":
        return pred
    if align == "lstsq":
        disp = _lstsq_disparity(1.0 / pred, 1.0 / gt)
        pred = 1.0 / disp.clamp(1.0 / _CLAMP[1], 1.0 / _CLAMP[0])
    pred = pred * (gt.median() / pred.median())
    return pred.clamp(*_CLAMP) if align == "lstsq" else pred


def _image_metrics(pred: torch.Tensor, gt: torch.Tensor) -> dict[str, float]:
    ratio = torch.maximum(pred / gt, gt / pred)
    diff = pred - gt
    return {
        "abs_rel": (diff.abs() / gt).mean().item(),
        "sq_rel": (diff.pow(2) / gt).mean().item(),
        "rmse": diff.pow(2).mean().sqrt().item(),
        "rmse_log": (pred.log() - gt.log()).pow(2).mean().sqrt().item(),
        "delta1": (ratio < 1.25).double().mean().item(),
        "delta2": (ratio < 1.25 ** 2).double().mean().item(),
        "delta3": (ratio < 1.25 ** 3).double().mean().item(),
    }


def per_image_metrics(pred_depth, gt_depth, valid=None, max_depth: float = 10.0, align: str = "median",
                      crop: int = 0) -> list[dict[str, float] | None]:
    """Metrics of each image in a batch; ``None`` for an image without a valid pixel."""
    pred, gt = _as_batch(pred_depth).double(), _as_batch(gt_depth).double()
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and ground truth {tuple(gt.shape)} differ in shape")
    ok = valid_mask(gt, valid, max_depth, crop)
    out = []
    for p, g, m in zip(pred, gt, ok):
        if not bool(m.any()):
            out.append(None)
            continue
        p_valid = torch.nan_to_num(p[m], nan=_MIN_PRED, posinf=1e6)
        out.append(_image_metrics(align_prediction(p_valid, g[m], align), g[m]))
    return out


def depth_metrics(pred_depth, gt_depth, valid=None, max_depth: float = 10.0, align: str = "median",
                  crop: int = 0) -> dict[str, float]:
    """The seven standard metrics, averaged over the images of the batch that have valid pixels.

    Returns floats ``abs_rel, sq_rel, rmse, rmse_log, delta1, delta2, delta3`` (NaN if no image has a
    valid pixel). See the module docstring for ``align`` and the valid-pixel rule.
    """
    acc = MetricAccumulator()
    acc.update(per_image_metrics(pred_depth, gt_depth, valid, max_depth, align, crop))
    return acc.result()


@dataclass
class MetricAccumulator:
    """Averages per-image metrics over a dataset, counting images without valid pixels."""

    sums: dict[str, float] = field(default_factory=lambda: {k: 0.0 for k in METRIC_NAMES})
    images: int = 0
    empty: int = 0

    def update(self, per_image: list[dict[str, float] | None]) -> None:
        for m in per_image:
            if m is None:
                self.empty += 1
                continue
            self.images += 1
            for k in METRIC_NAMES:
                self.sums[k] += m[k]

    def result(self) -> dict[str, float]:
        if not self.images:
            return {k: float("nan") for k in METRIC_NAMES}
        return {k: self.sums[k] / self.images for k in METRIC_NAMES}
