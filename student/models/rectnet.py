"""RectNet (Zioulis et al., ECCV 2018, "OmniDepth"): a single-branch equirect network.

Its ideas: (1) the first two blocks run four parallel convolutions with *rectangular* kernels (3x9, 5x11,
5x7, 7x7, then 3x9, 3x7, 3x5, 5x5) whose outputs are concatenated: an equirect image is stretched
horizontally (by 1/cos(latitude)), so wider-than-tall filters see a more isotropic patch of the sphere;
(2) only two stride-2 stages, then dilated convolutions (2, 4, then 8, 16) grow the receptive field
without losing resolution; (3) a two-step decoder predicts at /2 and then at full resolution, the coarse
prediction concatenated into the fine step. Layout and widths follow the authors' PyTorch release
(input 8/16 x4, encoder 128-256-512, decoder 256-128; ~11M parameters at width_mult=1). Designed for
512x256 input; works at any 2:1 size with H divisible by 4 (the dilated convolutions wrap around a
narrow map's width).

Our changes: BatchNorm after every convolution (the release has conv + ELU only; BN makes training from
scratch with the shared recipe's learning rates stable), circular padding in longitude for every
convolution including the transposed ones (``circular``), the disparity head of ``common.to_disparity``,
and only the final prediction is returned (the /2 prediction still feeds the last step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .common import (EquiConvTranspose2d, ImageNetNorm, check_equirect_input, check_head, conv_cls,
                     to_disparity)


@dataclass(frozen=True)
class RectNetConfig:
    width_mult: float = 1.0  # scales every width; rectnet_tiny uses 0.125
    circular: bool = True  # wrap-around padding in longitude
    head: str = "sigmoid"  # sigmoid | softplus (see common.to_disparity)
    min_disp: float = 1e-3
    max_disp: float = 1.0


class ConvBNELU(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel, *, circular: bool, stride: int = 1, dilation: int = 1):
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        pad = (dilation * (kh - 1) // 2, dilation * (kw - 1) // 2)
        super().__init__(conv_cls(circular)(cin, cout, (kh, kw), stride=stride, padding=pad, dilation=dilation,
                                            bias=False),
                         nn.BatchNorm2d(cout), nn.ELU(inplace=True))


class UpBNELU(nn.Sequential):
    def __init__(self, cin: int, cout: int, *, circular: bool):
        conv = EquiConvTranspose2d if circular else nn.ConvTranspose2d
        super().__init__(conv(cin, cout, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ELU(inplace=True))


class RectNet(nn.Module):
    """RGB (B, 3, H, 2H) in [0, 1], H divisible by 4 -> disparity (B, 1, H, 2H), positive."""

    INPUT0 = ((3, 9), (5, 11), (5, 7), (7, 7))
    INPUT1 = ((3, 9), (3, 7), (3, 5), (5, 5))

    def __init__(self, cfg: RectNetConfig = RectNetConfig()):
        super().__init__()
        check_head(cfg.head, cfg.min_disp, cfg.max_disp)
        if cfg.width_mult <= 0:
            raise ValueError(f"width_mult must be > 0, got {cfg.width_mult}")
        self.cfg = cfg
        self.in_channels = 3
        w = lambda c: max(4, int(round(c * cfg.width_mult)))  # noqa: E731
        blk = lambda cin, cout, k, **kw: ConvBNELU(cin, cout, k, circular=cfg.circular, **kw)  # noqa: E731
        self.norm = ImageNetNorm()
        self.input0 = nn.ModuleList(blk(3, w(8), k) for k in self.INPUT0)
        self.input1 = nn.ModuleList(blk(4 * w(8), w(16), k) for k in self.INPUT1)
        c1, c2, c3 = w(128), w(256), w(512)
        self.encoder0 = nn.Sequential(blk(4 * w(16), c1, 3, stride=2), blk(c1, c1, 3), blk(c1, c1, 3))
        self.encoder1_0 = blk(c1, c2, 3, stride=2)
        self.encoder1_1 = blk(c2, c2, 3, dilation=2)
        self.encoder1_2 = blk(c2, c2, 3, dilation=4)
        self.encoder1_3 = blk(2 * c2, c2, 1)  # merges the two dilation rates
        self.encoder2_0 = blk(c2, c3, 3, dilation=8)
        self.encoder2_1 = blk(c3, c3, 3, dilation=16)
        self.encoder2_2 = blk(2 * c3, c3, 1)
        self.decoder0 = nn.Sequential(UpBNELU(c3, c2, circular=cfg.circular), blk(c2, c2, 5))
        self.predict0 = conv_cls(cfg.circular)(c2, 1, 3, padding=1)
        self.decoder1 = nn.Sequential(UpBNELU(c2 + 1, c1, circular=cfg.circular), blk(c1, c1, 5))
        self.predict1 = conv_cls(cfg.circular)(c1, 1, 3, padding=1)

    def forward_features(self, rgb: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features at /2 and /4 (the latter after the dilated stages)."""
        check_equirect_input(rgb, 4, "RectNet")
        x = self.norm(rgb)
        x = torch.cat([m(x) for m in self.input0], 1)
        x = torch.cat([m(x) for m in self.input1], 1)
        e0 = self.encoder0(x)
        x = self.encoder1_0(e0)
        a = self.encoder1_1(x)
        x = self.encoder1_3(torch.cat([a, self.encoder1_2(a)], 1))
        a = self.encoder2_0(x)
        return [e0, self.encoder2_2(torch.cat([a, self.encoder2_1(a)], 1))]

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        x = self.decoder0(self.forward_features(rgb)[-1])
        x = self.decoder1(torch.cat([x, self.predict0(x)], 1))
        return to_disparity(self.predict1(x), self.cfg.head, self.cfg.min_disp, self.cfg.max_disp)
