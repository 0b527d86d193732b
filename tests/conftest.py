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


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray for one test module, through the project's one connect (loopback only, no auth token),
    shut down after the module if this fixture started it."""
    from sharding.ray_connect import connect

    started = connect(num_cpus=4, object_store_memory=300 * 2**20, log_to_driver=False)
    import ray

    yield ray
    if started:
        ray.shutdown()


def sample_panoramas(n: int, h: int = 64) -> list[np.ndarray]:
    """``n`` real panoramas (outdoor, then indoor) as uint8 (h, 2h, 3); smooth synthetic ones when the samples
    are missing."""
    from PIL import Image

    files = sorted((SAMPLES / "outdoor").glob("b?.png")) + sorted((SAMPLES / "indoor").glob("*.jpg"))
    if files:
        out = []
        for f in files[:n]:
            with Image.open(f) as im:
                out.append(np.array(im.convert("RGB").resize((2 * h, h), Image.BILINEAR)))
        return out
    return [(smooth_panorama(h, 2 * h, seed=i) * 255).astype(np.uint8) for i in range(n)]


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of many tiny operators, which gain nothing from a second intra-op thread but slow down
    many-fold when the CPU is shared and OpenMP threads wait for each other; restored afterwards. Use with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
