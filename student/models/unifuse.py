"""UniFuse (Jiang et al., RA-L 2021): unidirectional cube -> equirect fusion, with the CEE fusion module.

Two ResNet encoders of the same shape: one on the panorama, one on its six cube faces (``F = H/2``, run as
one batch of 6B). At each of the five feature levels the cube features are resampled to the equirect
grid (``cube_to_equirect``) and fused into the equirect features; a U-Net decoder works on the fused
features only (the cube branch has no decoder: "unidirectional"). Layout and channel widths follow the
authors' release: decoder widths are half the encoder's ([32, 32, 64, 128, 256] for ResNet-18/34), each
decoder level is ``upconv`` (3x3) at the coarse size -> nearest x2 -> concat skip -> ``deconv`` (3x3).

CEE fusion ("Cubemap-to-Equirectangular feature Enhancement"), per level, with E the equirect features and
C the resampled cube features:

    r = BN(conv3x3(ReLU(BN(conv1x1([E, C])))))      # residual that cube features receive from both
    out = conv1x1(SE([E, C + r]))                    # SE: squeeze-excitation re-weighting of channels

The difference from the paper's code: the equirect-domain convolutions (encoder, fusion, decoder) pad
circularly in longitude (``circular=True``, see ``common``); set it False for the paper's zero padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from panorama import equirect_to_cube

from .common import (ConvBNReLU, ImageNetNorm, check_equirect_input, check_head, conv_cls,
                     cube_to_equi_features, to_disparity, upsample_to)
from .resnet import build_resnet_pair, get_arch

FUSIONS = ("cee", "cat")


@dataclass(frozen=True)
class UniFuseConfig:
    encoder: str = "resnet18"  # resnet18 | resnet34 | resnet_small | resnet_tiny
    pretrained: str | None = None  # ImageNet weights for both encoders (see resnet.read_pretrained)
    fusion: str = "cee"  # cee: the paper's module; cat: concat + 1x1 conv (the paper's baseline)
    se: bool = True  # squeeze-excitation inside CEE
    circular: bool = True  # wrap-around padding in the equirect branch and the decoder
    head: str = "sigmoid"  # sigmoid | softplus (see common.to_disparity)
    min_disp: float = 1e-3
    max_disp: float = 1.0


class SELayer(nn.Module):
    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.fc = nn.Sequential(nn.Linear(channels, hidden, bias=False), nn.ReLU(inplace=True),
                                nn.Linear(hidden, channels, bias=False), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fc(x.mean(dim=(-2, -1)))
        return x * w[:, :, None, None].to(x.dtype)


class CEEFusion(nn.Module):
    def __init__(self, channels: int, *, se: bool = True, circular: bool = True):
        super().__init__()
        self.res_conv1 = nn.Conv2d(2 * channels, channels, 1, bias=False)
        self.res_bn1 = nn.BatchNorm2d(channels)
        self.res_conv2 = conv_cls(circular)(channels, channels, 3, padding=1, bias=False)
        self.res_bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.se = SELayer(2 * channels) if se else nn.Identity()
        self.conv = nn.Conv2d(2 * channels, channels, 1, bias=False)

    def forward(self, equi: torch.Tensor, c2e: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.res_bn1(self.res_conv1(torch.cat([equi, c2e], 1))))
        x = c2e + self.res_bn2(self.res_conv2(x))
        return self.conv(self.se(torch.cat([equi, x], 1)))


class CatFusion(nn.Module):
    def __init__(self, channels: int, **_):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(2 * channels, channels, 1, bias=False), nn.BatchNorm2d(channels),
                                  nn.ReLU(inplace=True))

    def forward(self, equi: torch.Tensor, c2e: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([equi, c2e], 1))


class UniFuse(nn.Module):
    """RGB (B, 3, H, 2H) in [0, 1], H divisible by 32 -> disparity (B, 1, H, 2H), positive."""

    def __init__(self, cfg: UniFuseConfig = UniFuseConfig()):
        super().__init__()
        if cfg.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {cfg.fusion!r}")
        check_head(cfg.head, cfg.min_disp, cfg.max_disp)
        self.cfg = cfg
        self.in_channels = 3
        enc = get_arch(cfg.encoder).channels  # (64, 64, 128, 256, 512) for ResNet-18/34
        dec = tuple(max(c // 2, 8) for c in enc)  # (32, 32, 64, 128, 256)
        self.norm = ImageNetNorm()
        self.equi_encoder, self.cube_encoder = build_resnet_pair(cfg.encoder, cfg.pretrained, circular=cfg.circular)
        fusion = CEEFusion if cfg.fusion == "cee" else CatFusion
        self.fusions = nn.ModuleList(fusion(c, se=cfg.se, circular=cfg.circular) for c in enc)
        block = lambda cin, cout: ConvBNReLU(cin, cout, 3, circular=cfg.circular)  # noqa: E731
        # The paper's decoder, coarse to fine: upconv (3x3 at the coarse size) -> nearest x2 -> concat the
        # fused skip -> deconv (3x3). upconvs[j] / deconvs[j] serve skip level 3 - j (/16, /8, /4, /2).
        self.upconvs = nn.ModuleList([block(enc[4], dec[4]), block(dec[4], dec[3]), block(dec[3], dec[2]),
                                      block(dec[2], dec[1]), block(dec[1], dec[0])])
        self.deconvs = nn.ModuleList([block(dec[4] + enc[3], dec[4]), block(dec[3] + enc[2], dec[3]),
                                      block(dec[2] + enc[1], dec[2]), block(dec[1] + enc[0], dec[1])])
        self.final = block(dec[0], dec[0])  # at full resolution
        self.head = conv_cls(cfg.circular)(dec[0], 1, 3, padding=1)

    @property
    def encoder_arch(self) -> str:
        return self.cfg.encoder

    def forward_features(self, rgb: torch.Tensor) -> list[torch.Tensor]:
        """The five fused equirect features (/2 ... /32) that the decoder consumes."""
        check_equirect_input(rgb, 32, "UniFuse")
        x = self.norm(rgb)
        b, _, h, _ = x.shape
        equi = self.equi_encoder(x)
        faces = equirect_to_cube(x, h // 2).reshape(b * 6, 3, h // 2, h // 2)
        cube = self.cube_encoder(faces)
        return [fuse(e, cube_to_equi_features(c, b, *e.shape[-2:])) for fuse, e, c in zip(self.fusions, equi, cube)]

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        f = self.forward_features(rgb)
        x = f[4]
        for j, level in enumerate((3, 2, 1, 0)):
            x = upsample_to(self.upconvs[j](x), f[level])
            x = self.deconvs[j](torch.cat([x, f[level]], 1))
        x = self.final(upsample_to(self.upconvs[4](x), rgb))
        return to_disparity(self.head(x), self.cfg.head, self.cfg.min_disp, self.cfg.max_disp)
