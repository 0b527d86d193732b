"""Frozen perspective depth teachers: any Hugging Face depth-estimation model, tiny random ones, toys.

``load_teacher(model, device, dtype, input_size)`` returns a :class:`FrozenTeacher`: an ``nn.Module`` whose
``forward(faces)`` takes cube faces ``(N, 3, F, F)`` RGB in [0, 1] and returns ``(N, 1, F, F)`` relative
*planar* disparity normalised per face to [0, 1] (``docs/CONTRACTS.md``). Inside, in torch on the device:

1. the faces are resized (bicubic) to ``input_size`` (518 by default; it must be a multiple of the
   model's patch: 14 for Depth Anything, 16 for DPT, GLPN's total stride 32; ``"auto"`` takes the model's
   own from ``pano_distill.json`` or its processor config) and normalised with the model's mean/std (its
   ``preprocessor_config.json`` when there is one, else ImageNet's, which every Depth Anything uses);
2. the model runs under ``torch.inference_mode()`` in eval mode with ``requires_grad_(False)``, in bf16
   on CUDA by default (``dtype="auto"``), fp32 on the CPU;
3. its relative disparity is resized (bilinear) back to ``F`` and normalised per face to [0, 1]; a face
   whose raw answer is non-finite or constant (max - min <= ``eps_rel`` * max |x|) comes back all-NaN and
   is counted in ``FrozenTeacher.invalid_faces`` so that it is never trained on.

Model names (``load_teacher``'s first argument):

* a Hugging Face hub id or an alias from :data:`TEACHER_MODELS` (``v2-small`` ...), loaded with
  ``transformers.AutoModelForDepthEstimation`` (the weights are cached by ``huggingface_hub``; offline
  set ``HF_HUB_OFFLINE=1`` and point ``HF_HOME`` at a cache that has them, or pass a local folder);
* a local folder written by ``save_pretrained`` (the main path for our own trained teachers);
* a local state dict ``.pt`` / ``.pth`` / ``.safetensors`` of a ``DepthAnythingForDepthEstimation``,
  with its ``config.json`` next to it or an ``architecture=`` (a config.json path, a folder, or one of
  the random names below);
* ``tiny-random``: a tiny Depth Anything (Dinov2 hidden 48, 4 layers) with seeded random weights, built
  offline, identical in every process for the same seed (tests, CI);
* ``random:small`` / ``random:base`` / ``random:large``: the real DA-V2 S/B/L architectures with seeded
  random weights (GPU speed benchmarks, no download);
* ``toy:<kind>[:sleep=S]``: weight-free stand-ins for the pool's tests and benchmarks (:class:`ToyFaceModel`).

The random and toy models are built by :mod:`teacher_server.testing`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from sharding.cli import UserError
from sharding.device import resolve_device

from .model_files import _config_for_state_dict, _load_state_dict_file, _processor_hints, input_multiple
from .testing import ToyFaceModel, build_random_model

log = logging.getLogger(__name__)

DEFAULT_TEACHER = "depth-anything/Depth-Anything-V2-Small-hf"

# Teachers that the paper and this project use. The paper (Depth Anywhere) distils Depth Anything V1
# Large. Licences differ: V1 S/B/L and V2-Small are Apache-2.0, V2-Base/Large are CC-BY-NC-4.0.
TEACHER_MODELS: dict[str, dict[str, Any]] = {
    "v2-small": {"id": "depth-anything/Depth-Anything-V2-Small-hf", "params_m": 24.8, "tflop_per_pano": 0.69,
                 "licence": "Apache-2.0", "note": "default"},
    "v2-base": {"id": "depth-anything/Depth-Anything-V2-Base-hf", "params_m": 97.5, "tflop_per_pano": 2.28,
                "licence": "CC-BY-NC-4.0"},
    "v2-large": {"id": "depth-anything/Depth-Anything-V2-Large-hf", "params_m": 335.3, "tflop_per_pano": 7.83,
                 "licence": "CC-BY-NC-4.0"},
    "v1-small": {"id": "LiheYoung/depth-anything-small-hf", "params_m": 24.8, "tflop_per_pano": 0.69,
                 "licence": "Apache-2.0"},
    "v1-base": {"id": "LiheYoung/depth-anything-base-hf", "params_m": 97.5, "tflop_per_pano": 2.28,
                "licence": "Apache-2.0"},
    "v1-large": {"id": "LiheYoung/depth-anything-large-hf", "params_m": 335.3, "tflop_per_pano": 7.83,
                 "licence": "Apache-2.0", "note": "the paper's teacher"},
}

# FLOPs of one panorama (six 518 x 518 faces) for the DA S/B/L sizes, in TFLOP (for MFU).
TFLOP_PER_PANORAMA = {"small": 0.69, "base": 2.28, "large": 7.83}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")

class TeacherSettingError(UserError, ValueError):
    """A teacher setting that cannot work with this model (input size, dtype): one line, exit 2."""


class TeacherUnavailableError(OSError):
    """The teacher's weights could not be found or downloaded."""


# --------------------------------------------------------------------------------------- frozen teacher


def normalize_per_face(raw: torch.Tensor, eps_rel: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 1, F, F) raw disparity -> (per-face min-max normalised to [0, 1], (N,) bool valid).

    A face is invalid when any value is non-finite or its range is at most ``eps_rel`` times its largest
    magnitude (a constant answer); invalid faces come back all-NaN.
    """
    x = raw.float()
    flat = x.flatten(1)
    finite = torch.isfinite(flat).all(1)
    safe = torch.where(torch.isfinite(flat), flat, torch.zeros_like(flat))
    lo, hi = safe.amin(1), safe.amax(1)
    rng = hi - lo
    scale = torch.maximum(hi.abs(), lo.abs())
    valid = finite & (rng > eps_rel * scale) & (rng > 0)
    denom = torch.where(valid, rng, torch.ones_like(rng))
    out = (x - lo.view(-1, 1, 1, 1)) / denom.view(-1, 1, 1, 1)
    out = torch.where(valid.view(-1, 1, 1, 1), out.clamp(0.0, 1.0), torch.full_like(out, float("nan")))
    return out, valid


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto`` -> bf16 on CUDA, fp32 elsewhere; also ``bf16``/``fp16``/``fp32`` and torch dtypes."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = (dtype or "auto").lower()
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}
    if name not in table:
        raise ValueError(f"unknown teacher dtype {dtype!r}; use auto, bf16, fp16 or fp32")
    return table[name]


class FrozenTeacher(nn.Module):
    """A frozen face model: ``forward(faces (N, C, F, F)) -> (N, 1, F, F)`` per-face normalised disparity.

    ``model`` is a Hugging Face depth-estimation model (``preprocess=True``: resize to ``input_size``,
    normalise with ``mean``/``std``, call ``model(pixel_values=...)``) or any face model (``preprocess=False``:
    called on the faces as given; it may return a tensor ``(N, 1, h, w)`` / ``(N, h, w)`` or an object with
    ``.predicted_depth``). Either way the answer is resized back to ``F`` and normalised per face, and
    invalid faces (non-finite or constant) come back all-NaN and are counted in ``invalid_faces``.
    """

    def __init__(self, model: nn.Module, *, name: str = "custom", input_size: int | None = 518,
                 preprocess: bool = True, patch_size: int = 14, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 device: str | torch.device | None = "cpu", dtype: str | torch.dtype | None = "auto",
                 eps_rel: float = 1e-4, max_batch_faces: int | None = None):
        super().__init__()
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        if self.device.type == "cpu" and self.dtype == torch.float16:
            raise TeacherSettingError("fp16 teachers need a GPU; use teacher.dtype=fp32 or bf16 on the CPU")
        self.name, self.preprocess, self.patch_size = name, bool(preprocess), int(patch_size)
        self.eps_rel = float(eps_rel)
        self.max_batch_faces = int(max_batch_faces) if max_batch_faces else None
        if self.preprocess:
            if input_size is None or int(input_size) <= 0 or int(input_size) % self.patch_size:
                lo = max(self.patch_size, (int(input_size or 0) // self.patch_size) * self.patch_size)
                raise TeacherSettingError(f"teacher input_size must be a positive multiple of the model's patch size "
                                 f"{self.patch_size} (e.g. {lo} or {lo + self.patch_size}; 518 for Depth "
                                 f"Anything; our own teachers name theirs in pano_distill.json), got {input_size}")
        # (patch_size: the ViT patch, or for GLPN-like models the total stride; see input_multiple)
        self.input_size = int(input_size) if input_size else None
        self.model = model.to(self.device)
        if self.preprocess:
            self.model = self.model.to(self.dtype)
        else:  # a face model given as is: fed float32 faces, its dtype left alone
            self.dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        self.model.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1).to(self.device),
                             persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1).to(self.device),
                             persistent=False)
        self.faces_total = 0
        self.invalid_faces = 0
        self.compute_seconds = 0.0
        self.eval()

    def train(self, mode: bool = True) -> "FrozenTeacher":  # frozen: always eval
        return super().train(False)

    def _check(self, faces: torch.Tensor) -> None:
        if faces.ndim != 4 or faces.shape[-1] != faces.shape[-2]:
            raise ValueError(f"teacher faces must be (N, C, F, F), got shape {tuple(faces.shape)}")
        if self.preprocess and faces.shape[1] != 3:
            raise ValueError(f"teacher faces must be RGB (N, 3, F, F), got {faces.shape[1]} channels")

    def raw(self, faces: torch.Tensor) -> torch.Tensor:
        """The model's raw relative disparity, resized back to the faces' size: (N, 1, F, F) float32."""
        self._check(faces)
        f = faces.shape[-1]
        x = faces.to(self.device, torch.float32, non_blocking=True)
        with torch.inference_mode():
            if self.preprocess:
                s = self.input_size
                if s != f:
                    x = F.interpolate(x, size=(s, s), mode="bicubic", align_corners=False, antialias=s < f)
                x = ((x.clamp(0.0, 1.0) - self.mean) / self.std).to(self.dtype)
                out = self.model(pixel_values=x)
            else:
                out = self.model(x)
            out = getattr(out, "predicted_depth", out)
            if isinstance(out, (tuple, list)):
                out = out[0]
            if out.ndim == 3:
                out = out.unsqueeze(1)
            if out.ndim != 4 or out.shape[0] != faces.shape[0] or out.shape[1] != 1:
                raise ValueError(f"the teacher model must answer (N, 1, h, w) or (N, h, w) disparity for "
                                 f"{faces.shape[0]} faces, got shape {tuple(out.shape)}")
            out = out.float()
            if out.shape[-2:] != (f, f):
                out = F.interpolate(out, size=(f, f), mode="bilinear", align_corners=False,
                                    antialias=out.shape[-1] > f)
        return out

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        n = faces.shape[0]
        step = self.max_batch_faces or max(n, 1)
        outs = []
        for i in range(0, n, step):
            normed, valid = normalize_per_face(self.raw(faces[i:i + step]), self.eps_rel)
            self.invalid_faces += int((~valid).sum())
            outs.append(normed)
        out = torch.cat(outs) if outs else faces.new_zeros((0, 1) + tuple(faces.shape[-2:]), dtype=torch.float32)
        if out.device.type == "cuda":
            torch.cuda.synchronize(out.device)
        self.faces_total += n
        self.compute_seconds += time.perf_counter() - t0
        return out

    def describe(self) -> dict:
        return {"model": self.name, "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "input_size": self.input_size, "preprocess": self.preprocess}


# --------------------------------------------------------------------------------------- loading


def resolve_model_name(name: str) -> str:
    """Aliases (``v2-small`` ...) -> hub ids; local paths -> absolute paths; everything else as given."""
    name = str(name).strip()
    if name in TEACHER_MODELS:
        return TEACHER_MODELS[name]["id"]
    if _looks_like_path(name) and Path(name).expanduser().exists():
        return str(Path(name).expanduser().resolve())
    return name


def _looks_like_path(name: str) -> bool:
    """Local paths: absolute or explicitly relative, a state-dict file name, two or more slashes (hub ids
    are ``org/name``), or anything that exists on disk."""
    return (name.startswith(("/", "./", "../", "~", ".\\")) or name.endswith(STATE_DICT_SUFFIXES)
            or name.count("/") > 1 or Path(name).expanduser().exists())


def _unreachable(name: str, cause: BaseException | str) -> TeacherUnavailableError:
    if _looks_like_path(name):
        hint = (f"Check the path: a teacher folder holds config.json and model.safetensors (as written by "
                f"save_pretrained or `hf download <id> --local-dir DIR`); a state dict file needs its config.json "
                f"next to it. Example: `teacher.model=/path/to/Depth-Anything-V2-Small-hf`.")
    else:
        hint = (f"Point the teacher at a local copy instead, e.g. `teacher.model=/path/to/Depth-Anything-V2-Small-hf` "
                f"(a folder with config.json and model.safetensors, made on a machine with network by "
                f"`hf download {name} --local-dir DIR` (formerly `huggingface-cli download`) or by save_pretrained), "
                f"or fill a Hugging Face cache there (`hf download {name}`), copy it here and set HF_HOME to it "
                f"with HF_HUB_OFFLINE=1.")
    return TeacherUnavailableError(
        f"could not load the teacher {name!r}: {cause}\n{hint} For tests and CI use `teacher.model=tiny-random`. "
        f"(Known teacher ids: {', '.join(v['id'] for v in TEACHER_MODELS.values())}.)")


def load_model(name: str, *, seed: int = 0, architecture: str | None = None, local_files_only: bool = False,
               ) -> tuple[nn.Module, dict]:
    """Build or load the bare model for ``name`` -> (model, info) with info keys ``preprocess``, ``mean``,
    ``std``, ``patch_size`` (the input's required multiple), ``name`` and, when the model says so,
    ``input_size`` (its preferred input side). Raises :class:`TeacherUnavailableError` naming what failed."""
    name = str(name).strip()
    info: dict[str, Any] = {"preprocess": True, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "patch_size": 14,
                            "name": name}
    if name.startswith("toy:"):
        info["preprocess"] = False
        return ToyFaceModel.from_spec(name), info
    if name == "tiny-random" or name.startswith("random:"):
        return build_random_model(name, seed), info
    resolved = resolve_model_name(name)
    info["name"] = resolved
    path = Path(resolved).expanduser()
    if path.is_file() and path.name.endswith(STATE_DICT_SUFFIXES):
        from transformers import AutoModelForDepthEstimation

        cfg = _config_for_state_dict(path, architecture)
        model = AutoModelForDepthEstimation.from_config(cfg)
        sd = _load_state_dict_file(path)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(f"the state dict {path} does not fit the architecture: {len(missing)} missing keys "
                             f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        info["patch_size"] = input_multiple(cfg)
        info.update(_processor_hints(str(path.parent), True))
    else:
        if _looks_like_path(name) and not path.exists():
            raise _unreachable(name, f"the local path {path} does not exist")
        from transformers import AutoModelForDepthEstimation

        try:
            model = AutoModelForDepthEstimation.from_pretrained(resolved, local_files_only=local_files_only)
        except (OSError, ValueError) as exc:
            raise _unreachable(name, exc) from exc
        info["patch_size"] = input_multiple(model.config)
        info.update(_processor_hints(resolved, local_files_only or path.is_dir()))
    return model.eval(), info


def load_teacher(model_id_or_path: str | nn.Module = DEFAULT_TEACHER, device: str | torch.device | None = "auto",
                 dtype: str | torch.dtype | None = "auto", input_size: int | str | None = 518, *, seed: int = 0,
                 architecture: str | None = None, local_files_only: bool = False,
                 max_batch_faces: int | None = None, eps_rel: float = 1e-4) -> FrozenTeacher:
    """The frozen teacher for a hub id, alias, local folder / state dict, random name, ``toy:`` spec, or an
    ``nn.Module`` face model (used as is, without preprocessing). See the module docstring.

    ``input_size``: the side faces are resized to (a multiple of the model's patch); ``"auto"``/None: the
    model's own (``pano_distill.json`` or the processor config's size), else 518. An explicit size that
    differs from the model's own is used, with a warning."""
    if isinstance(model_id_or_path, nn.Module):
        return FrozenTeacher(model_id_or_path, name=type(model_id_or_path).__name__, preprocess=False,
                             input_size=None, device=device, dtype=dtype, eps_rel=eps_rel,
                             max_batch_faces=max_batch_faces)
    model, info = load_model(model_id_or_path, seed=seed, architecture=architecture,
                             local_files_only=local_files_only)
    own = info.get("input_size")
    if input_size is None or str(input_size) == "auto":
        input_size = own or 518
    elif own and int(input_size) != own:
        log.warning("teacher %s prefers %d px input; using %s px as configured", info["name"], own, input_size)
    return FrozenTeacher(model, name=info["name"], input_size=int(input_size) if info["preprocess"] else None,
                         preprocess=info["preprocess"], patch_size=info["patch_size"], mean=info["mean"],
                         std=info["std"], device=device, dtype=dtype, eps_rel=eps_rel,
                         max_batch_faces=max_batch_faces)


def teacher_factory(model: str | Callable[[], nn.Module], **kwargs) -> Callable[[], FrozenTeacher]:
    """A picklable zero-argument builder of the teacher (what each Ray replica calls in its own process)."""
    return _TeacherFactory(model, kwargs)


class _TeacherFactory:
    def __init__(self, model, kwargs):
        self.model, self.kwargs = model, kwargs

    def __call__(self) -> FrozenTeacher:
        model = self.model() if callable(self.model) and not isinstance(self.model, (str, nn.Module)) else self.model
        return load_teacher(model, **self.kwargs)
