"""Recipes: what one batch's losses are. The loop is the same for every recipe.

``DistillRecipe`` is Depth Anywhere (labeled half + rotated-cube pseudo labels). The adversarial
domain-adaptation recipe of Lee et al. (``student.adaptation``) implements the same three methods and
keeps its discriminator to itself.
"""

from __future__ import annotations

import torch

from student.config import TrainConfig
from student.step import StepOutput, distill_step


class DistillRecipe:
    def __init__(self, cfg: TrainConfig, amp_dtype: torch.dtype | None):
        self.cfg, self.amp_dtype = cfg, amp_dtype

    def losses(self, model, batch: dict, labels, generator: torch.Generator, step: int) -> StepOutput:
        d = self.cfg.distill
        return distill_step(model, batch, labels, face_size=self.cfg.face_size, generator=generator,
                            labeled_weight=d.labeled_weight, pseudo_weight=d.pseudo_weight, use_masks=d.use_masks,
                            augment=d.augment, color_jitter=d.color_jitter, amp_dtype=self.amp_dtype)

    def after_step(self, out: StepOutput, batch: dict, step: int) -> dict:
        return {}

    def save(self, folder) -> None:
        """Extra state of the recipe into a checkpoint folder (every rank calls it)."""

    def load(self, folder) -> None:
        """Restore what ``save`` wrote, on an exact resume."""


def make_recipe(cfg: TrainConfig, engine, device: torch.device):
    """The recipe of a run: distillation, or Lee et al.'s adversarial adaptation when enabled."""
    if cfg.adversarial.enabled:
        from student.adaptation import AdaptationRecipe

        return AdaptationRecipe(cfg, engine, device)
    return DistillRecipe(cfg, engine.amp)
