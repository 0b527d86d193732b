"""BiFuse++ (Wang et al., TPAMI 2022): bi-projection fusion, equirect <-> cube in both directions.

Two ResNet encoders (ResNet-34 by default): one on the panorama, one on its six cube faces (``F = H/2``,
one batch of 6B). After each of layer1..layer4 a fusion module exchanges features both ways, and both
branches continue from the exchanged features, so the cube branch sees equirect context and vice versa.
A PixelShuffle U-Net decoder (as in the authors' release) works on each level's fused features and
predicts at /2; the logits are upsampled bilinearly x2. After layer4 only the decoder's fused features are
computed (the release also builds the two exchange convolutions there, whose outputs nothing uses).

Fusion module at one level, with E the equirect features and C = C2E(cube features):

    h_e = ReLU(BN(conv1x1([E, C])))        h_c = ReLU(BN(conv1x1([E, C])))     fused = ReLU(BN(conv1x1([E, C])))
    m_e, m_c = sigmoid(conv1x1([h_e, h_c]))                                       # learned per-pixel masks
    E' = E + m_e * h_e                      cube' = cube + E2C(m_c * h_c)

The masks are BiFuse's (CVPR 2020) learned balance between the two projections; BiFuse++'s release adds
the residuals unmasked (``masks=False`` reproduces that). Two further choices of ours: the residual sent
back to the cube branch is resampled alone (``cube + E2C(residual)``) rather than round-tripping the whole
cube feature through C2E and E2C, which would blur it at every level; and the equirect-domain
convolutions pad circularly in longitude (``circular``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from panorama import equirect_to_cube

from .common import (ConvBNReLU, ImageNetNorm, check_equirect_input, check_head, cube_to_equi_features,
                     equi_to_cube_features, to_disparity)
from .resnet import build_resnet_pair, get_arch


@dataclass(frozen=True)
class BiFuseConfig:
    encoder: str = "resnet34"  # resnet18 | resnet34 | resnet_small | resnet_tiny
    pretrained: str | None = None  # ImageNet weights for both encoders (see resnet.read_pretrained)
    masks: bool = True  # BiFuse's learned fusion masks; False: BiFuse++'s plain residual exchange
    circular: bool = True  # wrap-around padding in the equirect branch and the decoder
    head: str = "sigmoid"  # sigmoid | softplus (see common.to_disparity)
    min_disp: float = 1e-3
    max_disp: float = 1.0


def _conv1x1_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class BiProjectionFusion(nn.Module):
    """One level's exchange. ``last=True`` (after layer4) builds only the decoder path: nothing consumes
    the exchanged features there, and parameters without gradients would break DDP's reducer."""

    def __init__(self, channels: int, *, masks: bool = True, last: bool = False):
        super().__init__()
        self.to_decoder = _conv1x1_bn_relu(2 * channels, channels)
        self.to_equi = None if last else _conv1x1_bn_relu(2 * channels, channels)
        self.to_cube = None if last else _conv1x1_bn_relu(2 * channels, channels)
        self.mask = nn.Conv2d(2 * channels, 2, 1) if masks and not last else None

    def forward(self, equi: torch.Tensor, cube: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """equi (B, C, h, 2h), cube (6B, C, f, f) -> (new equi, new cube, fused features for the decoder)."""
        b = equi.shape[0]
        cat = torch.cat([equi, cube_to_equi_features(cube, b, *equi.shape[-2:])], 1)
        if self.to_equi is None:
            return equi, cube, self.to_decoder(cat)
        h_e, h_c = self.to_equi(cat), self.to_cube(cat)
        if self.mask is not None:
            m = torch.sigmoid(self.mask(torch.cat([h_e, h_c], 1)))
            h_e, h_c = h_e * m[:, :1], h_c * m[:, 1:]
        return equi + h_e, cube + equi_to_cube_features(h_c, cube.shape[-1]), self.to_decoder(cat)


class BiFusePP(nn.Module):
    """RGB (B, 3, H, 2H) in [0, 1], H divisible by 32 -> disparity (B, 1, H, 2H), positive."""

    def __init__(self, cfg: BiFuseConfig = BiFuseConfig()):
        super().__init__()
        check_head(cfg.head, cfg.min_disp, cfg.max_disp)
        self.cfg = cfg
        self.in_channels = 3
        ch = get_arch(cfg.encoder).channels[1:]  # layer1..layer4: (64, 128, 256, 512)
        self.norm = ImageNetNorm()
        self.equi_encoder, self.cube_encoder = build_resnet_pair(cfg.encoder, cfg.pretrained, circular=cfg.circular)
        self.fusions = nn.ModuleList(BiProjectionFusion(c, masks=cfg.masks, last=i == 3) for i, c in enumerate(ch))

        def up(cin: int, cout: int) -> nn.Sequential:  # 3x3 conv to 4*cout channels, PixelShuffle x2
            return nn.Sequential(ConvBNReLU(cin, 4 * cout, 3, circular=cfg.circular), nn.PixelShuffle(2))

        # The release's decoder: /32 -> /16 -> /8 -> /4 -> /2, concatenating the fused features of each level.
        self.ups = nn.ModuleList([up(ch[3], ch[2]), up(2 * ch[2], ch[1]), up(2 * ch[1], ch[0]),
                                  up(2 * ch[0], ch[0] // 2)])
        self.head = nn.Conv2d(ch[0] // 2, 1, 1)

    @property
    def encoder_arch(self) -> str:
        return self.cfg.encoder

    def forward_features(self, rgb: torch.Tensor) -> list[torch.Tensor]:
        """The fused equirect features of layer1..layer4 (/4 ... /32) that the decoder consumes."""
        check_equirect_input(rgb, 32, "BiFusePP")
        x = self.norm(rgb)
        b, _, h, _ = x.shape
        equi = self.equi_encoder.maxpool(self.equi_encoder.stem(x))
        cube = equirect_to_cube(x, h // 2).reshape(b * 6, 3, h // 2, h // 2)
        cube = self.cube_encoder.maxpool(self.cube_encoder.stem(cube))
        fused = []
        for fusion, equi_stage, cube_stage in zip(self.fusions, self.equi_encoder.stages, self.cube_encoder.stages):
            equi, cube, f = fusion(equi_stage(equi), cube_stage(cube))
            fused.append(f)
        return fused

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        f = self.forward_features(rgb)
        x = self.ups[0](f[3])
        for i, level in enumerate((2, 1, 0), start=1):
            x = self.ups[i](torch.cat([x, f[level]], 1))
        logits = F.interpolate(self.head(x), size=rgb.shape[-2:], mode="bilinear", align_corners=False)
        return to_disparity(logits, self.cfg.head, self.cfg.min_disp, self.cfg.max_disp)
