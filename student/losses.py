"""Training losses. Pure torch; every function works on any leading shape and any device.

A "map" is the last two dimensions of a tensor: one panorama (B, 1, H, W), or one cube face
(B, 6, 1, F, F). Masks are boolean (or 0/1) tensors broadcastable to the prediction; a pixel counts only
where the mask is true and the target is finite.
"""

from __future__ import annotations

import torch

_EPS = 1e-6


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

    This is the target space of ``DESIGN.md``: disparity normalised per map. A constant map becomes 0.
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


# -- Lee et al. 2020: synthetic-to-real adaptation (the second recipe) ----------------------------------

def depth_l2_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Masked L2 depth loss: ``L_depth = 1/|M| sum_{p in M} (D_pred(p) - D_gt(p))^2`` over valid pixels M."""
    valid = _valid(target, mask) & torch.isfinite(pred)
    diff = torch.where(valid, pred - torch.nan_to_num(target), torch.zeros_like(pred))
    return diff.pow(2).sum() / valid.sum().clamp_min(1)


def gt_edges(depth: torch.Tensor, valid: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """Pixels at depth discontinuities of the ground truth (relative jump > ``threshold`` to a neighbour,
    horizontally wrapping), dilated by one pixel; invalid pixels count as edges."""
    d = torch.where(valid.bool(), depth, torch.zeros_like(depth))
    rel_x = (torch.roll(d, -1, -1) - d).abs() / d.clamp_min(1e-6)
    rel_y = torch.cat([(d[..., 1:, :] - d[..., :-1, :]).abs(), torch.zeros_like(d[..., :1, :])], -2) / d.clamp_min(1e-6)
    edge = (rel_x > threshold) | (rel_y > threshold) | ~valid.bool()
    edge = edge.float()
    edge = torch.nn.functional.max_pool2d(torch.cat([edge[..., -1:], edge, edge[..., :1]], -1), 3, 1, (1, 0)) > 0
    return edge


def smoothness_loss(pred: torch.Tensor, gt_depth: torch.Tensor, valid: torch.Tensor,
                    threshold: float = 0.1) -> torch.Tensor:
    """Edge-masked smoothness: ``L_smooth = 1/|S| sum_{p in S} |dx D_pred(p)| + |dy D_pred(p)|``, with the
    predicted depth divided by its mean (so the term is scale-free) and S the valid pixels that are not
    on an edge of the ground truth (``gt_edges``): depth may jump where the true depth jumps."""
    keep = ~gt_edges(gt_depth, valid, threshold)
    mean = (pred * keep).flatten(1).sum(1) / keep.flatten(1).sum(1).clamp_min(1)
    p = pred / mean.clamp_min(1e-6).view(-1, *([1] * (pred.ndim - 1)))
    dx = (torch.roll(p, -1, -1) - p).abs()
    dy = torch.cat([(p[..., 1:, :] - p[..., :-1, :]).abs(), torch.zeros_like(p[..., :1, :])], -2)
    return ((dx + dy) * keep).sum() / keep.sum().clamp_min(1)


def normal_loss(pred_depth: torch.Tensor, gt_depth: torch.Tensor, pred_valid: torch.Tensor | None,
                gt_valid: torch.Tensor) -> torch.Tensor:
    """Surface-normal loss: ``L_normal = 1/|N| sum_{p in N} (1 - n_pred(p) . n_gt(p))``, normals from
    spherical back-projection of each equirect depth map (``panorama.depth_to_normals``), N the pixels
    where both normals are valid (both masks). Scale-free: depth maps that differ by a global factor have
    the same normals and a loss of 0."""
    from panorama import depth_to_normals

    n_pred, ok_pred = depth_to_normals(pred_depth, pred_valid)
    n_gt, ok_gt = depth_to_normals(gt_depth, gt_valid)
    ok = ok_pred & ok_gt
    cos = (n_pred * n_gt).sum(dim=1, keepdim=True)
    return ((1.0 - cos) * ok).sum() / ok.sum().clamp_min(1)


def generator_adversarial_loss(logits_real: torch.Tensor) -> torch.Tensor:
    """The generator's adversarial loss on predictions for *real* panoramas, non-saturating form:
    ``L_adv = -E[log D(G(x_real))]``, D the probability that a depth map comes from the synthetic
    domain. Minimising it maximises the paper's ``E[log D(G(x_real))]``: real predictions are pushed to
    look synthetic. (The saturating ``E[log(1 - D(G(x_real)))]`` gives vanishing gradients early on.)"""
    return torch.nn.functional.binary_cross_entropy_with_logits(logits_real, torch.ones_like(logits_real))


def discriminator_loss(logits_synthetic: torch.Tensor, logits_real: torch.Tensor) -> torch.Tensor:
    """The discriminator's loss: ``L_D = -E[log D(G(x_syn))] - E[log(1 - D(G(x_real)))]``, synthetic
    predictions labelled 1, real ones 0 (both detached from the generator)."""
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    return bce(logits_synthetic, torch.ones_like(logits_synthetic)) + bce(logits_real, torch.zeros_like(logits_real))
