"""The second recipe: adversarial domain adaptation from synthetic to real panoramas (Lee et al. 2020).

The labeled half of each batch is synthetic (exact depth), the unlabeled half real (no depth). The
student is trained on synthetic panoramas with ``beta_depth * L_depth + beta_smooth * L_smooth +
beta_normal * L_normal`` (``student.losses``). After ``adversarial.pretrain_steps`` depth-only steps, a
discriminator on predicted depth maps learns to tell synthetic predictions from real ones, and the
student gets ``alpha * L_adv``, which pushes its predictions on real panoramas to look like those on
synthetic ones. With a teacher (``teacher.mode`` other than ``none`` and ``distill.pseudo_weight > 0``)
the rotated-cube pseudo-label loss on the real half is added too: the two recipes combine.

Decisions, written down:
* The student outputs disparity; this recipe's losses take depth = 1 / disparity, so the model's head
  must span metric disparities (``model.options: {max_disp: 4.0, min_disp: 0.05}``, i.e. 0.25-20 m, in
  ``configs/domain_adaptation.yaml``).
* The discriminator sees ``log(depth / median(depth))`` of each map (invalid pixels 0): the shape of the
  scene, not its absolute scale, which median alignment discards at evaluation anyway.
* The paper's gamma = 1e-4 is applied as the discriminator's L2 weight decay (our reading: the sources we
  could check give its value but not its term).
* Adam at ``optim.lr`` (1e-4) for the student, ``adversarial.disc_lr`` for the discriminator.
"""

from __future__ import annotations

from pathlib import Path

import torch

from panorama import disparity_to_depth
from student.augment import draw_augmentation
from student.config import TrainConfig
from student.losses import (depth_l2_loss, discriminator_loss, generator_adversarial_loss, normal_loss,
                            smoothness_loss)
from student.step import StepOutput, predict, pseudo_loss


def discriminator_input(depth: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Scale-free view of depth maps for the discriminator: log(depth / median), 0 where invalid."""
    ok = torch.isfinite(depth) & (depth > 0)
    if valid is not None:
        ok = ok & valid.bool()
    flat = torch.where(ok, depth, torch.full_like(depth, float("nan"))).flatten(1)
    med = torch.nan_to_num(flat.nanmedian(dim=1).values, nan=1.0).clamp_min(1e-6).view(-1, 1, 1, 1)
    return torch.where(ok, torch.log(depth.clamp_min(1e-6) / med), torch.zeros_like(depth))


class AdaptationRecipe:
    def __init__(self, cfg: TrainConfig, engine, device: torch.device):
        from student.models import build_discriminator

        self.cfg, self.a, self.amp = cfg, cfg.adversarial, engine.amp
        # The discriminator is trained the way the student is (one process, or data-parallel on every
        # rank): the engine makes its companion, so this recipe never names an engine class.
        self.disc = engine.companion(build_discriminator(encoder=self.a.disc_encoder), lr=self.a.disc_lr,
                                     weight_decay=self.a.disc_weight_decay)

    def adversarial(self, step: int) -> bool:
        return step >= self.a.pretrain_steps

    def losses(self, model, batch: dict, labels, generator: torch.Generator, step: int) -> StepOutput:
        a, d = self.a, self.cfg.distill
        syn, real = batch["labeled"], batch["unlabeled"]
        rgb = torch.cat([syn["rgb"], real["rgb"]])
        aug = draw_augmentation(rgb.shape[0], rgb.shape[-1], generator, enabled=d.augment, color_jitter=d.color_jitter)
        disp = predict(model, rgb, aug, self.amp)
        n = syn["rgb"].shape[0]
        depth = disparity_to_depth(disp)  # the head keeps disparity positive, so depth is finite
        depth_syn, depth_real = depth[:n], depth[n:]
        gt, ok = syn["depth"], syn["valid"].bool() & (syn["depth"] > 0)
        l_depth = depth_l2_loss(depth_syn, gt, ok)
        l_smooth = smoothness_loss(depth_syn, gt, ok)
        l_normal = normal_loss(depth_syn, gt, None, ok)
        total = a.depth_weight * l_depth + a.smooth_weight * l_smooth + a.normal_weight * l_normal
        parts = {"loss_depth": l_depth.detach(), "loss_smooth": l_smooth.detach(), "loss_normal": l_normal.detach()}
        if labels is not None and d.pseudo_weight > 0:
            l_pseudo = pseudo_loss(disp[n:], labels, real.get("valid"), self.cfg.face_size, d.use_masks)
            total = total + d.pseudo_weight * l_pseudo
            parts["loss_pseudo"] = l_pseudo.detach()
        if self.adversarial(step):
            d_net = self.disc.module
            d_net.requires_grad_(False)  # the generator's step must not leave gradients in D
            logits_real = d_net(discriminator_input(depth_real, real.get("valid")))
            d_net.requires_grad_(True)
            l_adv = generator_adversarial_loss(logits_real)
            total = total + a.adv_weight * l_adv
            parts["loss_adv"] = l_adv.detach()
        parts["loss"] = total.detach()
        return StepOutput(total, parts, depth_syn, depth_real)

    def after_step(self, out: StepOutput, batch: dict, step: int) -> dict:
        """The discriminator's update (adversarial phase only), on the step's detached predictions."""
        if not self.adversarial(step):
            return {}
        syn = discriminator_input(out.pred_labeled.detach(), batch["labeled"]["valid"])
        real = discriminator_input(out.pred_unlabeled.detach(), batch["unlabeled"].get("valid"))
        logits = self.disc.module(torch.cat([syn, real]))
        ls, lr = logits[: syn.shape[0]], logits[syn.shape[0]:]
        loss = discriminator_loss(ls, lr)
        self.disc.backward_and_step(loss)
        return {"loss_disc": loss.detach(), "disc_acc_synthetic": (ls > 0).float().mean(),
                "disc_acc_real": (lr < 0).float().mean()}

    def save(self, folder: Path) -> None:
        self.disc.save(folder, "discriminator", {})

    def load(self, folder: Path) -> None:
        self.disc.load(folder, "discriminator")
