"""Training losses. Pure torch; every function works on any leading shape and any device.

The distillation losses (``affine_invariant_loss``, ``normalize_disparity`` and their helpers) live in
``panorama.depth_math``, shared with the teacher tools, and are re-exported here; this module adds the
losses of Lee et al. 2020. Masks are boolean (or 0/1) tensors broadcastable to the prediction; a pixel
counts only where the mask is true and the target is finite.
"""

from __future__ import annotations

import torch

from panorama.depth_math import (_valid, affine_invariant_loss, masked_median, normalize_affine,
                                 normalize_disparity)

__all__ = ["affine_invariant_loss", "masked_median", "normalize_affine", "normalize_disparity", "depth_l2_loss",
           "gt_edges", "smoothness_loss", "normal_loss", "generator_adversarial_loss", "discriminator_loss"]


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
