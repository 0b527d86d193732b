"""Student-side augmentation: yaw roll, horizontal flip, colour jitter.

Only the student's input is augmented, never the teacher's. The geometric parts are exact pixel
permutations of the equirect image (a roll by whole columns is a yaw rotation; a flip mirrors x), so
instead of transforming every target we undo them on the prediction: the student sees an augmented
panorama, and its prediction is mapped back to the original frame before any loss. One code path then
serves labeled targets, teacher faces and masks alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Augmentation:
    shifts: torch.Tensor  # (B,) columns rolled (yaw)
    flips: torch.Tensor  # (B,) bool
    gains: torch.Tensor  # (B, 3, 1, 1) per-channel brightness/colour gains
    offsets: torch.Tensor  # (B, 1, 1, 1)

    def apply(self, rgb: torch.Tensor) -> torch.Tensor:
        out = rgb * self.gains.to(rgb) + self.offsets.to(rgb)
        out = _roll_flip(out, self.shifts, self.flips)
        return out.clamp(0.0, 1.0)

    def undo(self, pred: torch.Tensor) -> torch.Tensor:
        """Map a prediction of the augmented image back to the original panorama's frame."""
        return _unroll_unflip(pred, self.shifts, self.flips)


def _source_columns(shifts: torch.Tensor, flips: torch.Tensor, width: int, device) -> torch.Tensor:
    """(B, W): augmented column j shows original column src[j] (roll by shift, then mirror)."""
    cols = torch.arange(width, device=device)
    src = torch.remainder(cols.unsqueeze(0) - shifts.to(device).unsqueeze(1), width)
    return torch.where(flips.to(device).unsqueeze(1), src.flip(-1), src)


def _roll_flip(x: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    src = _source_columns(shifts, flips, x.shape[-1], x.device)
    return torch.gather(x, -1, src[:, None, None, :].expand_as(x))


def _unroll_unflip(x: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    src = _source_columns(shifts, flips, x.shape[-1], x.device)
    inverse = torch.argsort(src, dim=-1)  # a permutation: original column src[j] is augmented column j
    return torch.gather(x, -1, inverse[:, None, None, :].expand_as(x))


def draw_augmentation(batch: int, width: int, generator: torch.Generator, *, enabled: bool = True,
                      color_jitter: float = 0.2) -> Augmentation:
    """Random yaw roll (any column), flip (p=0.5) and colour jitter (gains in 1 +- color_jitter)."""
    if not enabled:
        return Augmentation(torch.zeros(batch, dtype=torch.long), torch.zeros(batch, dtype=torch.bool),
                            torch.ones(batch, 3, 1, 1), torch.zeros(batch, 1, 1, 1))
    shifts = torch.randint(0, width, (batch,), generator=generator)
    flips = torch.rand(batch, generator=generator) < 0.5
    brightness = 1.0 + (torch.rand(batch, 1, 1, 1, generator=generator) * 2 - 1) * color_jitter
    colour = 1.0 + (torch.rand(batch, 3, 1, 1, generator=generator) * 2 - 1) * color_jitter * 0.5
    offsets = (torch.rand(batch, 1, 1, 1, generator=generator) * 2 - 1) * color_jitter * 0.25
    return Augmentation(shifts, flips, brightness * colour, offsets)
