"""Decoded numpy samples -> the tensors of the sample and batch contract.

Sample contract (``docs/CONTRACTS.md``): ``{"key", "rgb": float32 (3, H, 2H) in [0, 1], "depth": float32
(1, H, 2H) metres (labeled only), "valid": bool (1, H, 2H), "meta": dict}``. A batch stacks them (``key``
and ``meta`` become lists) and adds ``labeled``: bool (B,) when any sample has depth; samples without depth
get zeros there (all invalid for depth purposes).

Inside a DataLoader worker the batch tensors are allocated in shared memory, as torch's default collate
does, so that handing a batch to the main process copies nothing.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import get_worker_info


def _empty(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor; inside a DataLoader worker its storage is allocated in shared memory (as
    torch's default_collate does), so that sending the batch to the main process copies nothing."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    base = torch.empty(0, dtype=dtype)
    storage = base._typed_storage()._new_shared(math.prod(shape), device=base.device)
    return base.new(storage).resize_(*shape)


def _fill_rgb(out: torch.Tensor, s: dict) -> None:
    """The sample's uint8 (H, W, 3) image (``"bgr"`` or ``"rgb"``) -> float32 RGB (3, H, W) in [0, 1],
    written into ``out`` (strided copies + a scale)."""
    if "bgr" in s:
        src = torch.from_numpy(s["bgr"])
        for c in range(3):
            out[c].copy_(src[..., 2 - c])
    else:
        out.copy_(torch.from_numpy(s["rgb"]).permute(2, 0, 1))
    out.mul_(1.0 / 255.0)


def to_tensors(s: dict) -> dict:
    """Numpy sample from ``decode_sample`` -> the contract's tensors."""
    h, w = s["valid"].shape
    rgb = _empty((3, h, w), torch.float32)
    _fill_rgb(rgb, s)
    out = {"key": s["key"], "rgb": rgb, "valid": torch.from_numpy(s["valid"])[None], "meta": s["meta"]}
    if s["depth"] is not None:
        out["depth"] = torch.from_numpy(s["depth"])[None]
    return out


def collate(samples: list[dict]) -> dict:
    """Numpy samples -> a batch: ``key``/``meta`` lists, stacked tensors; ``depth`` and ``labeled`` (B,) when
    any sample has depth (zeros, all invalid, for those without)."""
    n = len(samples)
    h, w = samples[0]["valid"].shape
    rgb, valid = _empty((n, 3, h, w), torch.float32), _empty((n, 1, h, w), torch.bool)
    valid_np = valid.numpy()
    for i, s in enumerate(samples):
        _fill_rgb(rgb[i], s)
        valid_np[i, 0] = s["valid"]
    out = {"key": [s["key"] for s in samples], "rgb": rgb, "valid": valid, "meta": [s["meta"] for s in samples]}
    has = [s["depth"] is not None for s in samples]
    if any(has):
        depth = _empty((n, 1, h, w), torch.float32)
        d = depth.numpy()
        for i, s in enumerate(samples):
            d[i, 0] = s["depth"] if s["depth"] is not None else 0.0
        out["depth"] = depth
        out["labeled"] = torch.tensor(has)
    return out
