"""Tiny and random teacher models for tests, CI and speed benchmarks: built offline, no weights.

* :func:`tiny_config`: a tiny Depth Anything (Dinov2 hidden 48, 4 layers, small neck), the model behind
  the teacher name ``tiny-random``;
* :func:`da_config`: the real DA-V2 ``small`` / ``base`` / ``large`` architectures (``random:<size>``);
* :func:`build_random_model`: either of them with seeded random weights, identical in every process for the
  same seed (so Ray replicas and the in-process teacher answer alike);
* :class:`ToyFaceModel`: weight-free stand-ins (``toy:<kind>[:sleep=S]``) for the pool's tests and benchmarks.

:func:`teacher_server.models.load_teacher` resolves these names; tests may also build them directly.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

# Depth Anything V2 architectures as in the official repository (``model_configs`` of vits/vitb/vitl) and
# the ``-hf`` checkpoints' config.json files. ``out_indices`` count Dinov2 stages from 1.
_DA_SIZES = {
    "small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, out_indices=[3, 6, 9, 12],
                  neck_hidden_sizes=[48, 96, 192, 384], fusion_hidden_size=64),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, out_indices=[3, 6, 9, 12],
                 neck_hidden_sizes=[96, 192, 384, 768], fusion_hidden_size=128),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, out_indices=[5, 12, 18, 24],
                  neck_hidden_sizes=[256, 512, 1024, 1024], fusion_hidden_size=256),
}


def da_config(size: str):
    """A ``DepthAnythingConfig`` of the real DA-V2 ``small`` / ``base`` / ``large`` architecture."""
    from transformers import DepthAnythingConfig

    if size not in _DA_SIZES:
        raise ValueError(f"unknown Depth Anything size {size!r}; choose one of {sorted(_DA_SIZES)}")
    s = _DA_SIZES[size]
    backbone = dict(model_type="dinov2", hidden_size=s["hidden_size"], num_hidden_layers=s["num_hidden_layers"],
                    num_attention_heads=s["num_attention_heads"], intermediate_size=4 * s["hidden_size"],
                    image_size=518, patch_size=14, out_indices=s["out_indices"], reshape_hidden_states=False)
    return DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=s["hidden_size"],
                               neck_hidden_sizes=s["neck_hidden_sizes"], fusion_hidden_size=s["fusion_hidden_size"],
                               head_hidden_size=32)


def tiny_config():
    """A tiny ``DepthAnythingConfig`` of the same architecture (Dinov2 hidden 48, 4 layers, small neck)."""
    from transformers import DepthAnythingConfig

    backbone = dict(model_type="dinov2", hidden_size=48, num_hidden_layers=4, num_attention_heads=3,
                    intermediate_size=96, image_size=518, patch_size=14, out_indices=[1, 2, 3, 4],
                    reshape_hidden_states=False)
    return DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=48,
                               neck_hidden_sizes=[16, 24, 32, 48], fusion_hidden_size=16, head_hidden_size=8)


def _seeded_init_(model: nn.Module, seed: int) -> nn.Module:
    """Re-draw every linear/conv weight from one seeded generator (fan-in scaled, so that a random model's
    output has an O(1) range that depends on its input) and bias the last layer positive. The weights then
    depend only on the seed and the architecture, not on transformers' init order or the global RNG."""
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                w = mod.weight
                fan_in = w.shape[0] * w[0, 0].numel() if isinstance(mod, nn.ConvTranspose2d) else w[0].numel()
                w.copy_(torch.randn(w.shape, generator=gen, dtype=torch.float32) / math.sqrt(fan_in))
                if mod.bias is not None:
                    mod.bias.zero_()
            elif isinstance(mod, nn.LayerNorm):
                if mod.weight is not None:
                    mod.weight.fill_(1.0)
                    mod.bias.zero_()
        for name, p in model.named_parameters():
            if name.endswith(("cls_token", "position_embeddings", "mask_token", "lambda1")):
                p.copy_(0.02 * torch.randn(p.shape, generator=gen) if not name.endswith("lambda1")
                        else torch.ones_like(p))
        head = getattr(model, "head", None)
        if head is not None and getattr(head, "conv3", None) is not None and head.conv3.bias is not None:
            head.conv3.bias.fill_(1.0)
    return model


def build_random_model(name: str, seed: int = 0) -> nn.Module:
    """``tiny-random`` or ``random:small|base|large`` -> a ``DepthAnythingForDepthEstimation`` with seeded
    random weights, built offline."""
    from transformers import DepthAnythingForDepthEstimation

    if name == "tiny-random":
        cfg = tiny_config()
    elif name.startswith("random:"):
        cfg = da_config(name.split(":", 1)[1])
    else:
        raise ValueError(f"not a random model name: {name!r} (tiny-random, random:small, random:base, random:large)")
    model = DepthAnythingForDepthEstimation(cfg)
    return _seeded_init_(model, seed).eval()


# --------------------------------------------------------------------------------------- toy models


class ToyFaceModel(nn.Module):
    """Weight-free stand-ins for a teacher, for tests and the pool benchmark (spec ``toy:<kind>[:sleep=S]``).

    Kinds, all answering raw disparity ``(N, 1, F, F)`` for faces ``(N, C, F, F)``:

    * ``luma``: 0.1 + the faces' mean over channels 0..2 (deterministic, input-dependent);
    * ``depth-channel``: channel ``C-1`` holds *radial* disparity sampled on the face (a panorama's 1/depth
      projected like the RGB); the answer is the exact *planar* disparity, what an ideal perspective
      teacher would see: ``radial_disparity * sqrt(1 + a^2 + b^2)``;
    * ``nan``: all NaN; ``constant``: all ones (both come back invalid).

    ``sleep`` adds that many seconds per call (a slow teacher, for backpressure tests).
    """

    KINDS = ("luma", "depth-channel", "nan", "constant")

    def __init__(self, kind: str = "luma", sleep: float = 0.0):
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"unknown toy teacher {kind!r}; choose one of {self.KINDS}")
        self.kind, self.sleep = kind, float(sleep)

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        if self.sleep > 0:
            time.sleep(self.sleep)
        n, c, h, w = faces.shape
        x = faces.float()
        if self.kind == "luma":
            return 0.1 + x[:, : min(c, 3)].mean(1, keepdim=True)
        if self.kind == "depth-channel":
            from panorama import radial_to_planar_disparity

            return radial_to_planar_disparity(x[:, -1:])
        if self.kind == "nan":
            return torch.full((n, 1, h, w), float("nan"), device=faces.device)
        return torch.ones((n, 1, h, w), device=faces.device)

    @classmethod
    def from_spec(cls, spec: str) -> "ToyFaceModel":
        parts = spec.split(":")
        if parts[0] != "toy" or len(parts) < 2:
            raise ValueError(f"toy teacher spec must look like toy:<kind>[:sleep=S], got {spec!r}")
        opts = {}
        for p in parts[2:]:
            k, _, v = p.partition("=")
            if k != "sleep":
                raise ValueError(f"unknown toy teacher option {k!r} in {spec!r}")
            opts["sleep"] = float(v)
        return cls(parts[1], **opts)


# --------------------------------------------------------------------------------------- test shards


def write_panorama_shards(folder, n: int = 5, per_shard: int = 3, height: int = 32, *, bad_every: int = 0,
                          style: str = "apartment") -> tuple[list[str], list[str]]:
    """Unlabeled WebDataset shards of ``n`` generated panoramas (``height`` x 2 ``height``), written as
    ``sharding.build`` writes them -> (keys of the good samples, shard paths). With ``bad_every=k`` every
    k-th sample (1-based) is written without its image (read as ``incomplete_sample`` and skipped) and its
    key is not returned. For tests and benchmarks of precompute."""
    from pathlib import Path

    from webdataset import TarWriter

    from sharding.format import encode_png, encode_sample
    from sharding.synthetic import generate_panorama

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    keys, paths = [], []
    for s in range(0, n, per_shard):
        path = folder / f"unlabeled-{s // per_shard:06d}.tar"
        writer = TarWriter(str(path), encoder=False)
        for i in range(s, min(n, s + per_shard)):
            key = f"gen-{i:03d}"
            meta = {"source": "test", "split": "unlabeled", "path": key}
            if bad_every and (i + 1) % bad_every == 0:
                writer.write({"__key__": key, "meta.json": b"{}"})  # no image: incomplete_sample
                continue
            rgb = generate_panorama(i, style, height)["rgb"]
            writer.write(encode_sample(key, encode_png(rgb), meta=meta))
            keys.append(key)
        writer.close()
        paths.append(str(path))
    return keys, paths
