"""Blocks shared by the student networks: input normalisation, equirect-aware padding, the disparity head,
and the feature-level cube <-> equirect resampling used by the two-branch models.

Equirect padding. An equirect image is periodic in longitude, so a zero-padded convolution invents an
edge at the +-180 deg seam that the scene does not have; the prediction then shows a visible seam.
``EquiConv2d`` / ``EquiConvTranspose2d`` / ``EquiMaxPool2d`` pad *circularly* along the width and keep zero
(or -inf) padding along the height (across a pole the right neighbour is the opposite meridian, flipped;
we do not model that: poles are low-texture and zero padding is the common choice). They are drop-in
subclasses of the torch layers, so state-dict keys (``weight``, ``bias``) and ImageNet weights are
unchanged. A padded copy per layer costs a few percent of a forward pass. Used in: the equirect ResNet
branch of UniFuse and BiFuse++, their equirect decoders and fusion convolutions, all of RectNet, and the
discriminator. Not used in the cube branch (a face is not periodic; cube padding, which would borrow the
neighbouring faces, is not implemented: zero padding there, as in UniFuse).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from panorama import cube_to_equirect, equirect_to_cube

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

HEADS = ("sigmoid", "softplus")


class ImageNetNorm(nn.Module):
    """RGB in [0, 1] -> ImageNet-normalised. Buffers are not persistent: checkpoints hold only weights."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        return (rgb - self.mean.to(rgb.dtype)) / self.std.to(rgb.dtype)


def circular_pad_w(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Pad the last (width) axis by ``pad`` columns on each side, wrapping around."""
    if pad <= 0:
        return x
    w = x.shape[-1]
    if pad <= w:
        return F.pad(x, (pad, pad, 0, 0), mode="circular")
    # Wider than the map (tiny feature maps with large dilation): wrap more than once.
    idx = torch.arange(-pad, w + pad, device=x.device) % w
    return x.index_select(-1, idx)


class EquiConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose ``padding`` wraps around horizontally and is zero vertically."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ph, pw = self.padding
        x = circular_pad_w(x, pw)
        if ph:
            x = F.pad(x, (0, 0, ph, ph))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class EquiConvTranspose2d(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` that also gathers the wrapped-around columns at the seam.

    A transposed convolution's ``padding`` crops its full output. Output column o receives input columns
    i with ``o = s*i - p + kk``; padding the input with q wrapped columns per side shifts the full output by
    ``s*q``, so cropping ``p + s*q`` gives the same size with the seam contributions included. q is the
    smallest number that covers the kernel's reach on both sides.
    """

    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        (_, kw), (_, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        dw, opw = self.dilation[1], self.output_padding[1]
        left = -(-(dw * (kw - 1) - pw) // sw)  # ceil: columns left of 0 reached by output column 0
        right = (sw - 1 + opw + pw) // sw  # columns right of W-1 reached by the last output column
        q = max(0, left, right)
        x = circular_pad_w(x, q)
        return F.conv_transpose2d(x, self.weight, self.bias, self.stride, (ph, pw + sw * q),
                                  self.output_padding, self.groups, self.dilation)


class EquiMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` with circular padding along the width (and -inf along the height)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ph, pw = (self.padding, self.padding) if isinstance(self.padding, int) else self.padding
        x = circular_pad_w(x, pw)
        if ph:
            x = F.pad(x, (0, 0, ph, ph), value=float("-inf"))
        return F.max_pool2d(x, self.kernel_size, self.stride, 0, self.dilation, self.ceil_mode)


def conv_cls(circular: bool) -> type[nn.Conv2d]:
    return EquiConv2d if circular else nn.Conv2d


class ConvBNReLU(nn.Sequential):
    """conv (no bias: the BN shift replaces it) -> BN -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, *, circular: bool = True, stride: int = 1):
        super().__init__(
            conv_cls(circular)(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


def to_disparity(logits: torch.Tensor, head: str, min_disp: float, max_disp: float) -> torch.Tensor:
    """Raw head output -> positive, finite disparity (float32, also under autocast).

    ``sigmoid`` (default): ``min + (max - min) * sigmoid(x)``, in [min_disp, max_disp]. The labeled targets
    are disparities normalised to [0, 1], so with max_disp=1 the head covers exactly their range, and
    ``1 / disparity`` is at most ``1 / min_disp`` (1000 by default): finite even in fp16 (max 65504),
    which matters because evaluation converts disparity to depth. The losses are affine-invariant, so the
    network never needs to push the sigmoid into saturation. This is also the head of UniFuse and
    BiFuse++ (they scale a sigmoid to a depth range). ``softplus``: ``min + softplus(x)``, unbounded above,
    for losses that are not scale-free.
    """
    x = logits.float()
    if head == "sigmoid":
        return min_disp + (max_disp - min_disp) * torch.sigmoid(x)
    if head == "softplus":
        return min_disp + F.softplus(x)
    raise ValueError(f"head must be one of {HEADS}, got {head!r}")


def check_head(head: str, min_disp: float, max_disp: float) -> None:
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if not (0.0 < min_disp < max_disp):
        raise ValueError(f"need 0 < min_disp < max_disp, got min_disp={min_disp}, max_disp={max_disp}")


def check_equirect_input(x: torch.Tensor, multiple: int, name: str) -> None:
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"{name} expects RGB (B, 3, H, 2H), got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if w != 2 * h or h % multiple:
        raise ValueError(f"{name} expects a 2:1 panorama with H divisible by {multiple}, got H={h}, W={w}")


def cube_to_equi_features(cube: torch.Tensor, batch: int, height: int, width: int) -> torch.Tensor:
    """Cube-branch features (6B, C, f, f), sample-major, -> equirect (B, C, height, width).

    A 1x1 face (the /32 level of a 64-pixel face) is constant; it is repeated to 2x2 because the
    resampler needs at least two pixels per face edge, which gives exactly the same result.
    """
    n, c, f, _ = cube.shape
    if f < 2:
        cube = cube.expand(n, c, 2, 2)
        f = 2
    return cube_to_equirect(cube.reshape(batch, 6, c, f, f), height, width)


def equi_to_cube_features(equi: torch.Tensor, face: int) -> torch.Tensor:
    """Equirect features (B, C, h, 2h) -> cube faces (6B, C, face, face), sample-major."""
    b, c = equi.shape[:2]
    if face < 2:  # sample at 2x2 and average: the 1x1 face's value is its mean
        return equirect_to_cube(equi, 2).reshape(b * 6, c, 2, 2).mean(dim=(-2, -1), keepdim=True)
    return equirect_to_cube(equi, face).reshape(b * 6, c, face, face)


def upsample_to(x: torch.Tensor, like: torch.Tensor, mode: str = "nearest") -> torch.Tensor:
    """Resize ``x`` to ``like``'s spatial size (x2 in the decoders; by size, so odd sizes stay aligned)."""
    if x.shape[-2:] == like.shape[-2:]:
        return x
    if mode == "nearest":
        return F.interpolate(x, size=like.shape[-2:], mode="nearest")
    return F.interpolate(x, size=like.shape[-2:], mode=mode, align_corners=False)
