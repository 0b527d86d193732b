"""Depth-map discriminator for adversarial domain adaptation (Lee et al. 2020).

"The shape of the student's encoder, plus a fully connected layer for binary classification, on depth
maps": a ResNet of the student's encoder architecture taking a 1-channel map (B, 1, H, W), global
average pooling, one linear layer -> one logit per map (B, 1). Which domain is "real" (label 1) is the
training loop's choice; use ``BCEWithLogitsLoss``.

Circular padding in longitude (the maps are panoramas); any size works (global pooling). ImageNet
weights can initialise it (``pretrained``: conv1's RGB filters summed to one channel), although the
paper's discriminator starts from scratch (the default).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .resnet import build_resnet


@dataclass(frozen=True)
class DiscriminatorConfig:
    encoder: str = "resnet18"  # resnet18 | resnet34 | resnet_small | resnet_tiny; match the student's encoder
    in_channels: int = 1  # depth or disparity
    pretrained: str | None = None
    circular: bool = True


class DepthDiscriminator(nn.Module):
    """(B, in_channels, H, W) depth/disparity -> (B, 1) logits."""

    def __init__(self, cfg: DiscriminatorConfig = DiscriminatorConfig()):
        super().__init__()
        self.cfg = cfg
        self.in_channels = cfg.in_channels
        self.encoder = build_resnet(cfg.encoder, pretrained=cfg.pretrained, in_channels=cfg.in_channels,
                                    circular=cfg.circular)
        self.fc = nn.Linear(self.encoder.channels[-1], 1)

    def forward(self, depth: torch.Tensor) -> torch.Tensor:
        if depth.ndim != 4 or depth.shape[1] != self.in_channels:
            raise ValueError(f"DepthDiscriminator expects (B, {self.in_channels}, H, W), got {tuple(depth.shape)}")
        features = self.encoder(depth)[-1]
        return self.fc(features.mean(dim=(-2, -1)))
