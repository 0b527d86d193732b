"""The distillation step of Depth Anywhere: one loss over a half-labeled, half-unlabeled batch.

Labeled half: student disparity vs the ground truth's disparity normalised to [0, 1], affine-invariant,
masked by validity. Unlabeled half: every sample has one rotation R (drawn by the caller); the teacher
answered the six faces of the R-rotated cube of the *unaugmented* RGB; the student's prediction on the
augmented RGB is mapped back to the original frame, projected onto the same rotated cube, converted from
radial to planar disparity, and compared face by face, masked by the sky/watermark mask rotated with R
and by the teacher's own face validity. Total = weighted mean of the two halves (the mean by default).

This module is pure computation shared by the single-process loop and the cluster workers: no optimizer,
no I/O, no distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from panorama import depth_to_disparity, equirect_to_cube, equirect_to_planar_faces
from student.augment import Augmentation, draw_augmentation
from student.losses import affine_invariant_loss, normalize_disparity

# A face pixel enters the pseudo loss only if every equirect pixel its bilinear sample touched is valid.
_MASK_KEEP = 0.999


@dataclass
class StepOutput:
    total: torch.Tensor
    parts: dict[str, torch.Tensor]  # detached; converted to floats only when logged
    pred_labeled: torch.Tensor | None = None
    pred_unlabeled: torch.Tensor | None = None


def labeled_target(depth: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground-truth depth (B, 1, H, W) -> (disparity normalised per map to [0, 1], valid mask)."""
    ok = valid.bool() & (depth > 0) & torch.isfinite(depth)
    return normalize_disparity(depth_to_disparity(depth, ok), ok), ok


def rotated_face_mask(valid: torch.Tensor, face_size: int, rotations: torch.Tensor | None) -> torch.Tensor:
    """Equirect validity (B, 1, H, W) -> (B, 6, 1, F, F) bool on the faces of the rotated cube."""
    faces = equirect_to_cube(valid.float(), face_size, rotation=rotations, mode="bilinear")
    return faces >= _MASK_KEEP


def pseudo_loss(pred_unlabeled: torch.Tensor, labels, valid: torch.Tensor | None, face_size: int,
                use_masks: bool = True) -> torch.Tensor:
    """Per-face affine-invariant loss between student and teacher on the same rotated cube."""
    faces = equirect_to_planar_faces(pred_unlabeled.float(), face_size, rotation=labels.rotations,
                                     quantity="disparity")
    mask = labels.face_valid.to(faces.device)[:, :, None, None, None].expand_as(faces)
    if use_masks and valid is not None:
        mask = mask & rotated_face_mask(valid, face_size, labels.rotations)
    return affine_invariant_loss(faces, labels.disparity.to(faces), mask)


def predict(model: nn.Module, rgb: torch.Tensor, aug: Augmentation, amp_dtype: torch.dtype | None) -> torch.Tensor:
    """Student disparity on the augmented RGB, returned in the original frame, as float32."""
    x = aug.apply(rgb)
    with torch.autocast(device_type=rgb.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        out = model(x)
    return aug.undo(out.float())


def distill_step(model: nn.Module, batch: dict, labels, *, face_size: int, generator: torch.Generator,
                 labeled_weight: float = 1.0, pseudo_weight: float = 1.0, use_masks: bool = True,
                 augment: bool = True, color_jitter: float = 0.2,
                 amp_dtype: torch.dtype | None = None) -> StepOutput:
    """Losses of one batch. ``labels`` is the teacher's ``PseudoLabels`` for ``batch["unlabeled"]``.

    Both halves go through the student in one forward pass (one batch-norm statistic, one kernel launch
    per layer). A half whose weight is 0 is not computed at all.
    """
    lab, unl = batch.get("labeled"), batch.get("unlabeled")
    use_lab = labeled_weight > 0 and lab is not None and len(lab["key"]) > 0
    use_unl = pseudo_weight > 0 and unl is not None and labels is not None and len(unl["key"]) > 0
    if not (use_lab or use_unl):
        raise ValueError("distill_step needs a labeled half (labeled_weight > 0) or pseudo labels (pseudo_weight > 0)")
    rgbs = ([lab["rgb"]] if use_lab else []) + ([unl["rgb"]] if use_unl else [])
    rgb = torch.cat(rgbs)
    aug = draw_augmentation(rgb.shape[0], rgb.shape[-1], generator, enabled=augment, color_jitter=color_jitter)
    pred = predict(model, rgb, aug, amp_dtype)
    n_lab = lab["rgb"].shape[0] if use_lab else 0
    pred_lab, pred_unl = pred[:n_lab], pred[n_lab:]

    parts: dict[str, torch.Tensor] = {}
    total = pred.new_zeros(())
    weight = 0.0
    if use_lab:
        target, ok = labeled_target(lab["depth"], lab["valid"])
        loss_l = affine_invariant_loss(pred_lab, target, ok)
        parts["loss_labeled"] = loss_l.detach()
        total = total + labeled_weight * loss_l
        weight += labeled_weight
    if use_unl:
        loss_u = pseudo_loss(pred_unl, labels, unl.get("valid"), face_size, use_masks)
        parts["loss_pseudo"] = loss_u.detach()
        total = total + pseudo_weight * loss_u
        weight += pseudo_weight
    total = total / weight
    parts["loss"] = total.detach()
    return StepOutput(total, parts, pred_lab if use_lab else None, pred_unl if use_unl else None)
