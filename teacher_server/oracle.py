"""The oracle label source: exact per-face planar disparity of generated scenes.

For measuring the distillation mechanism without a trained teacher, and for tests; never a default.
It answers the same ``request(batch, rotations, face_size)`` as the real sources, but reads
``batch["depth"]`` (exact radial depth of generated scenes) instead of running a model on the RGB.

Options mimic what a relative-depth teacher does to the truth:
* ``affine``: a random scale in [0.5, 2] and shift in [0, 0.5] x max per face. Note that the affine-
  invariant loss removes any per-face affine map, so this changes the numbers handed over, not what the
  student can learn from one cube; what rotation adds is that face borders move from sample to sample.
* ``noise``: multiplicative Gaussian noise per pixel (relative standard deviation).
Without ``affine`` the answer is normalised per face to [0, 1], like a real teacher's. Pixels without
valid depth (sky, watermark) are NaN; faces without any valid pixel are marked invalid.
"""

from __future__ import annotations

import torch

from panorama import depth_to_disparity, equirect_to_cube, equirect_to_planar_faces
from panorama.depth_math import normalize_disparity
from teacher_server.labels import PseudoLabels


class _Done:
    def __init__(self, value: PseudoLabels):
        self._value = value

    def result(self, timeout: float | None = None) -> PseudoLabels:
        return self._value


class OracleLabels:
    def __init__(self, affine: bool = True, noise: float = 0.0, seed: int = 0):
        self.affine, self.noise = affine, float(noise)
        self._gen = torch.Generator().manual_seed(seed)
        self._faces = 0

    def request(self, batch: dict, rotations: torch.Tensor | None, face_size: int) -> _Done:
        depth = batch.get("depth")
        if depth is None:
            keys = ", ".join(batch.get("key", [])[:3])
            raise ValueError(f"the oracle teacher needs exact depth in the unlabeled batch (samples {keys}); "
                             "use generated shards, which carry depth, or another teacher.mode")
        valid = batch["valid"].bool() & (depth > 0)
        b = depth.shape[0]
        if rotations is None:
            rotations = torch.eye(3).expand(b, 3, 3)
        rotations = rotations.to(depth.device, torch.float32)
        disp = depth_to_disparity(depth.float(), valid)
        faces = equirect_to_planar_faces(disp, face_size, rotation=rotations, quantity="disparity")
        face_ok = equirect_to_cube(valid.float(), face_size, rotation=rotations) >= 0.999
        if self.noise > 0:
            eps = torch.randn(faces.shape, generator=self._gen).to(faces)
            faces = faces * (1.0 + self.noise * eps).clamp_min(0.0)
        if self.affine:
            scale = torch.empty(b, 6, 1, 1, 1).uniform_(0.5, 2.0, generator=self._gen).to(faces)
            shift = torch.empty(b, 6, 1, 1, 1).uniform_(0.0, 0.5, generator=self._gen).to(faces)
            peak = torch.where(face_ok, faces, torch.zeros_like(faces)).amax(dim=(-1, -2), keepdim=True)
            faces = faces * scale + shift * peak
        else:
            faces = normalize_disparity(faces, face_ok)
        faces = torch.where(face_ok, faces, torch.full_like(faces, float("nan")))
        self._faces += b * 6
        face_valid = face_ok.flatten(2).any(-1)
        return _Done(PseudoLabels(rotations=rotations, disparity=faces, face_valid=face_valid))

    def stats(self) -> dict[str, float]:
        return {"faces": float(self._faces)}

    def close(self) -> None:
        pass
