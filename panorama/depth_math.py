"""Depth math shared by the teacher tools, the student and the benches: one copy of each.

Pure torch, any device. Two parts:

**Relative-depth targets and the affine-invariant loss.** A "map" is the last two dimensions of a
tensor: one panorama (B, 1, H, W), or one cube face (B, 6, 1, F, F). Masks are boolean (or 0/1) tensors
broadcastable to the prediction; a pixel counts only where the mask is true and the target is finite.
``normalize_disparity`` (per-map min-max to [0, 1]) is the space teachers answer in;
``affine_invariant_loss`` is Depth Anywhere's eq. 4-7 (MiDaS eq. 5-7).

**Depth metrics and alignment protocols** (``align`` / ``protocol``, ``PROTOCOLS``; the first is the
default everywhere):

* ``"lstsq"`` - the reference code's protocol (github.com/albert100121/Depth-Anywhere, ``utils/metric.py``,
  ``Affine_Inv_Evaluator.compute_affine_inv_eval_metrics`` with ``compute_scale_and_shift`` and
  ``compute_depth_metrics(median_align=True)``), per image, in this order:

  1. least-squares scale and shift of the predicted *disparity* to the ground-truth disparity ``1 / gt``
     over the valid pixels (``compute_scale_and_shift``: the 2 x 2 normal equations);
  2. back to depth, ``1 / disparity`` where the disparity is non-zero (0 stays 0), clipped to
     [0, max_depth] (negative disparity, i.e. beyond infinity, becomes 0);
  3. median scaling over the valid pixels, ``pred *= median(gt) / median(pred)``;
  4. prediction *and* ground truth clamped to [0.1, max_depth]; then the metrics.

  Two deliberate departures, both where the reference would return NaN: when the normal equations are
  singular (a constant prediction: ``det <= 0``) the reference sets scale = shift = 0 and divides by a zero
  median; here the minimum-norm least-squares solution is used (the prediction becomes the mean ground-truth
  disparity), so a content-free prediction scores exactly like a constant-depth one. And when the median
  after step 2 is 0 (most of the fitted disparity negative) the median scaling is skipped.
  The reference evaluates with batch size 1 (``batch_size_val=1``), so per image is its behaviour too.
* ``"median"`` - the paper's text (Depth Anywhere, appendix A.1): predicted depth is scaled by
  ``median(gt) / median(pred)`` over valid pixels; no clamping.
* ``"none"`` - no alignment, for metric models.

Valid pixels: finite ground truth with ``0 < gt <= max_depth``, inside the optional ``valid`` mask and
outside ``crop`` rows at the top and bottom (Stanford2D3D's black bands: the reference crops 68 rows at
512 rows, ``REFERENCE_CROP``; ``stanford2d3d_crop(height)`` scales it). Metrics are computed per image and
averaged over images. Outside the lstsq protocol non-positive predicted depth is clamped to 1e-3 m
rather than dropped, so a model cannot improve its score by predicting nonsense at hard pixels.
``rmse_log`` uses the natural log of depth (the reference's ``log10(x + 1)`` variant is not reported);
every other metric is the reference's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

_EPS = 1e-6

METRIC_NAMES = ("abs_rel", "sq_rel", "rmse", "rmse_log", "delta1", "delta2", "delta3")
PROTOCOLS = ("lstsq", "median", "none")
DEFAULT_PROTOCOL = PROTOCOLS[0]
REFERENCE_CROP = (68, 512)  # rows cropped at top and bottom, at this evaluation height (Stanford2D3D)
MIN_DEPTH = 0.1
_MIN_PRED = 1e-3


def stanford2d3d_crop(height: int) -> int:
    """The reference code's Stanford2D3D crop (68 rows at 512) scaled to an evaluation ``height``."""
    rows, at = REFERENCE_CROP
    return int(round(rows * height / at))


def other_protocol(protocol: str) -> str:
    """The protocol reported beside ``protocol`` (lstsq <-> median; ``none`` -> lstsq)."""
    return "median" if protocol == "lstsq" else "lstsq"


# ----------------------------------------------------------------------------- targets and the loss

def _flat_maps(x: torch.Tensor) -> torch.Tensor:
    if x.ndim < 2:
        raise ValueError(f"expected maps with at least 2 dims (..., H, W), got shape {tuple(x.shape)}")
    return x.reshape(-1, x.shape[-2] * x.shape[-1])


def _valid(target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    valid = torch.isfinite(target)
    if mask is not None:
        valid = valid & mask.bool().expand_as(target)
    return valid


def masked_median(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-row median over valid entries of (M, P) -> (M,); rows with none give 0.

    For an even count it is the lower of the two middle values (``torch.nanmedian``'s rule). The
    gradient flows to the selected element, as with ``torch.median``.
    """
    med = torch.nanmedian(torch.where(valid, x, torch.full_like(x, float("nan"))), dim=-1).values
    return torch.nan_to_num(med, nan=0.0)


def normalize_affine(x: torch.Tensor, valid: torch.Tensor):
    """Median/MAD normalisation of (M, P) rows over valid entries (Depth Anywhere eq. 5-6).

    ``t = median(x)``, ``s = mean |x - t|``; returns ``(x - t) / s`` and ``s``. A row whose MAD is below
    1e-6 is degenerate (constant or empty) and is returned as zeros.
    """
    vf = valid.to(x.dtype)
    count = vf.sum(dim=-1)
    t = masked_median(x, valid)
    centred = (x - t.unsqueeze(-1)) * vf
    s = centred.abs().sum(dim=-1) / count.clamp_min(1.0)
    ok = s > _EPS
    safe_s = torch.where(ok, s, torch.ones_like(s))
    return centred / safe_s.unsqueeze(-1) * ok.unsqueeze(-1).to(x.dtype), s


def affine_invariant_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
                          reduction: str = "mean") -> torch.Tensor:
    """Scale-and-shift-invariant L1 between disparity maps (Depth Anywhere eq. 4-7, MiDaS eq. 5-7).

    Per map, prediction and target are each centred by their median and divided by their mean absolute
    deviation over valid pixels; the loss of a map is the mean absolute difference over its valid pixels.
    ``reduction="mean"`` averages over the maps that carry information; ``"none"`` returns (M,) per map.

    Maps with no valid pixel, or whose *target* is constant (a teacher face with no relative depth),
    contribute 0 and are left out of the mean; if none is left the loss is a graph-connected 0, never
    NaN. A constant *prediction* against an informative target is a real error: it costs 1 (the mean of
    the normalised target's absolute values) and gets no gradient through its zero MAD.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    valid = _flat_maps(_valid(target, mask)) & _flat_maps(torch.isfinite(pred))
    p, t = _flat_maps(pred), _flat_maps(torch.nan_to_num(target))
    p = torch.where(valid, p, torch.zeros_like(p))
    p_n, _ = normalize_affine(p, valid)
    t_n, t_s = normalize_affine(t.to(p.dtype), valid)
    count = valid.sum(dim=-1)
    informative = (count > 0) & (t_s > _EPS)
    per_map = ((p_n - t_n).abs() * valid).sum(dim=-1) / count.clamp_min(1).to(p.dtype)
    per_map = per_map * informative
    if reduction == "none":
        return per_map
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    n = informative.sum()
    return per_map.sum() / n.clamp_min(1).to(p.dtype)


def normalize_disparity(disp: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Min-max normalise each map (..., H, W) to [0, 1] over valid pixels; invalid pixels become 0.

    The target space of teachers and pseudo labels: disparity normalised per map (``docs/DESIGN.md``).
    A constant map becomes 0.
    """
    ok = torch.isfinite(disp) if valid is None else (torch.isfinite(disp) & valid.bool().expand_as(disp))
    flat, okf = _flat_maps(disp), _flat_maps(ok)
    big = torch.finfo(flat.dtype).max
    lo = torch.where(okf, flat, torch.full_like(flat, big)).amin(dim=-1, keepdim=True)
    hi = torch.where(okf, flat, torch.full_like(flat, -big)).amax(dim=-1, keepdim=True)
    span = hi - lo
    good = span > _EPS
    out = (flat - lo) / torch.where(good, span, torch.ones_like(span))
    out = torch.where(okf & good, out.clamp(0.0, 1.0), torch.zeros_like(out))
    return out.reshape(disp.shape)


# ------------------------------------------------------------------------------------------ metrics

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


def fit_scale_shift(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale s and shift t minimising sum (s * pred + t - target)^2 over 1-D vectors.

    The reference's normal equations; when they are singular (constant ``pred``: ``det <= 0``) the
    minimum-norm solution s = 0, t = mean(target) instead of the reference's s = t = 0."""
    pred, target = pred.double(), target.double()
    n = torch.tensor(float(pred.numel()), dtype=pred.dtype)
    a00, a01 = (pred * pred).sum(), pred.sum()
    b0, b1 = (pred * target).sum(), target.sum()
    det = a00 * n - a01 * a01
    if not bool(det > 1e-12 * a00 * n):
        return torch.zeros((), dtype=pred.dtype), target.mean()
    return (n * b0 - a01 * b1) / det, (-a01 * b0 + a00 * b1) / det


def align_prediction(pred: torch.Tensor, gt: torch.Tensor, align: str = DEFAULT_PROTOCOL,
                     max_depth: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Align 1-D predicted depths to ground truth under a protocol (module docstring).

    Returns (aligned prediction, ground truth as the metrics see it: clamped under lstsq)."""
    if align not in PROTOCOLS:
        raise ValueError(f"align must be one of {PROTOCOLS}, got {align!r}")
    if align == "lstsq":
        disp = 1.0 / pred.clamp_min(_MIN_PRED)
        s, t = fit_scale_shift(disp, 1.0 / gt)
        disp = disp * s + t
        depth = torch.where(disp != 0, 1.0 / torch.where(disp != 0, disp, torch.ones_like(disp)),
                            torch.zeros_like(disp)).clamp(0.0, max_depth)
        med = depth.median()
        if med > 0:
            depth = depth * (gt.median() / med)
        return depth.clamp(MIN_DEPTH, max_depth), gt.clamp(MIN_DEPTH, max_depth)
    pred = pred.clamp_min(_MIN_PRED)
    if align == "median":
        pred = pred * (gt.median() / pred.median())
    return pred, gt


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


def per_image_metrics(pred_depth, gt_depth, valid=None, max_depth: float = 10.0, align: str = DEFAULT_PROTOCOL,
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
        out.append(_image_metrics(*align_prediction(p_valid, g[m], align, max_depth)))
    return out


def depth_metrics(pred_depth, gt_depth, valid=None, max_depth: float = 10.0, align: str = DEFAULT_PROTOCOL,
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
