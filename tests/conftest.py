"""Shared fixtures. Tests run on the CPU with tiny models; ``SAMPLES`` are the real panoramas in ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = Path(os.environ.get("PANO_SAMPLES", ROOT.parent / "shared" / "samples"))

torch.set_num_threads(min(2, torch.get_num_threads()))


def smooth_panorama(h: int, w: int, c: int = 3, seed: int = 0) -> np.ndarray:
    """A smooth, seam-continuous test image (H, W, C) float32 in [0, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    u = (xx + 0.5) / w * 2 * np.pi
    v = (yy + 0.5) / h * np.pi
    img = np.zeros((h, w, c), np.float32)
    for k in range(c):
        a = rng.uniform(0.5, 1.0, 4)
        img[..., k] = 0.5 + 0.2 * a[0] * np.sin(u + 3 * a[1]) * np.sin(v) + 0.2 * a[2] * np.cos(2 * v + a[3])
    return img


@pytest.fixture
def samples_dir() -> Path:
    if not SAMPLES.is_dir():
        pytest.skip(f"real sample panoramas not found at {SAMPLES} (set PANO_SAMPLES)")
    return SAMPLES
