"""SAM segments inside detector boxes (step 2 of :mod:`sharding.segmenters`), with two backends.

SAM gets each box as a prompt (single-mask output). Preprocessing is our own (no torchvision): resize the
longest side to the encoder's input size (1024) with antialiased bilinear interpolation, normalise with
SAM's pixel mean/std, pad bottom/right to a square. The low-resolution logits are upsampled, the padding
cropped, upsampled again to the panorama's native size and thresholded at 0. **A segment is clipped to its
box**: the detector says where the object is, SAM only refines the outline inside it.

Backends: ``segment-anything`` model code with a checkpoint from a local path (default
``sam_vit_b_01ec64.pth``, download: :data:`SAM_CHECKPOINT_URL`), looked up as given, then in
``$PANO_SAM_DIR``, ``./checkpoints`` and ``~/.cache/pano-distill``; the model type (vit_b/vit_l/vit_h) is
read from the file name unless given. Or a transformers ``SamModel`` id or directory (e.g.
``facebook/sam-vit-base``).

Importing SAM without torchvision: ``import segment_anything`` runs the package ``__init__``, which imports
``SamPredictor`` and so torchvision (an undeclared dependency). :func:`sam_modules` instead locates the
installed package with ``importlib.util.find_spec`` (which does not execute it), registers an empty
stand-in parent package under a private name (``_pano_segment_anything``) whose ``__path__`` is the real
package directory, and imports ``.modeling`` and ``.build_sam`` through it. Their relative imports resolve
inside the stand-in, the real ``__init__`` never runs, and ``sys.modules["segment_anything"]`` is left
untouched.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
import types
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from sharding.grounding_dino import IMAGENET_MEAN, IMAGENET_STD, Box, _resize_chw, to_uint8_rgb

log = logging.getLogger(__name__)

DEFAULT_SAM_CHECKPOINT = "sam_vit_b_01ec64.pth"
SAM_CHECKPOINT_URL = "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"
SAM_CHECKPOINT_URLS = {
    "vit_b": SAM_CHECKPOINT_URL,
    "vit_l": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
    "vit_h": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
}

_SAM_ALIAS = "_pano_segment_anything"


def sam_modules() -> tuple[types.ModuleType, types.ModuleType]:
    """``(segment_anything.modeling, segment_anything.build_sam)`` without running the package ``__init__``."""
    if _SAM_ALIAS + ".modeling" in sys.modules:
        return sys.modules[_SAM_ALIAS + ".modeling"], sys.modules[_SAM_ALIAS + ".build_sam"]
    spec = importlib.util.find_spec("segment_anything")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the segment-anything package is not installed (pip install segment-anything==1.0)")
    parent = types.ModuleType(_SAM_ALIAS)
    parent.__path__ = list(spec.submodule_search_locations)
    parent.__package__ = _SAM_ALIAS
    parent.__file__ = None
    sys.modules[_SAM_ALIAS] = parent
    try:
        modeling = importlib.import_module(_SAM_ALIAS + ".modeling")
        build_sam = importlib.import_module(_SAM_ALIAS + ".build_sam")
    except Exception:
        for name in [n for n in sys.modules if n == _SAM_ALIAS or n.startswith(_SAM_ALIAS + ".")]:
            del sys.modules[name]
        raise
    return modeling, build_sam


def _sam_search_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("PANO_SAM_DIR"):
        dirs.append(Path(os.environ["PANO_SAM_DIR"]))
    dirs += [Path.cwd() / "checkpoints", Path.home() / ".cache" / "pano-distill"]
    return dirs


def resolve_sam_checkpoint(spec: str | os.PathLike | None = None) -> Path:
    """The local SAM checkpoint file for ``spec`` (a path or a bare file name; default
    ``sam_vit_b_01ec64.pth``). Raises ``FileNotFoundError`` naming every place it looked and the URL."""
    spec = str(spec or DEFAULT_SAM_CHECKPOINT)
    p = Path(spec).expanduser()
    tried = [p]
    if p.is_file():
        return p
    if not p.is_absolute() and len(p.parts) == 1:
        for d in _sam_search_dirs():
            tried.append(d / p.name)
            if tried[-1].is_file():
                return tried[-1]
    kind = sam_type_from_name(p.name)
    url = SAM_CHECKPOINT_URLS.get(kind or "vit_b", SAM_CHECKPOINT_URL)
    raise FileNotFoundError(
        f"SAM checkpoint {spec!r} not found; looked at: {', '.join(str(t) for t in tried)}. "
        f"Weights are not downloaded automatically: fetch {url} (e.g. `wget -P ~/.cache/pano-distill {url}`) "
        "and pass --sam PATH, or set PANO_SAM_DIR to the folder holding it."
    )


def sam_type_from_name(name: str) -> str | None:
    for kind in ("vit_b", "vit_l", "vit_h"):
        if kind in name:
            return kind
    return None


def load_sam(spec: str | os.PathLike | None = None, model_type: str | None = None) -> torch.nn.Module:
    """A ``segment_anything`` SAM from a local checkpoint (see :func:`resolve_sam_checkpoint`)."""
    path = resolve_sam_checkpoint(spec)
    kind = model_type or sam_type_from_name(path.name)
    if kind not in ("vit_b", "vit_l", "vit_h"):
        raise ValueError(
            f"cannot tell the SAM model type of {path} from its name; pass sam_type= (--sam-type) vit_b, vit_l or vit_h"
        )
    _, build_sam = sam_modules()
    builder = {"vit_b": build_sam.build_sam_vit_b, "vit_l": build_sam.build_sam_vit_l, "vit_h": build_sam.build_sam}[kind]
    sam = builder(checkpoint=None)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        sam.load_state_dict(state)
    except Exception as exc:
        raise ValueError(f"cannot load SAM {kind} weights from {path}: {exc}") from exc
    log.info("SAM %s loaded from %s", kind, path)
    return sam.eval()


def _load_hf_sam(spec: str) -> torch.nn.Module:
    from transformers import SamModel

    try:
        model = SamModel.from_pretrained(spec)
    except Exception as exc:
        raise OSError(
            f"cannot load the transformers SamModel {spec!r} ({type(exc).__name__}: {exc}). Offline, download "
            f"it elsewhere (`hf download {spec} --local-dir DIR`) and pass --sam DIR, or use the "
            f"segment-anything checkpoint {SAM_CHECKPOINT_URL}."
        ) from exc
    return model.eval()


def _looks_like_hf_sam(spec: str) -> bool:
    p = Path(spec).expanduser()
    if p.is_dir():
        return (p / "config.json").is_file()
    return not p.suffix and "/" in spec and not p.exists()



class _SegmentAnythingBackend:
    """Box prompts through ``segment_anything``'s Sam modules."""

    def __init__(self, sam: torch.nn.Module) -> None:
        self.sam = sam
        self.img_size = int(sam.image_encoder.img_size)
        self.pixel_mean = sam.pixel_mean.detach().cpu().view(3, 1, 1).float()
        self.pixel_std = sam.pixel_std.detach().cpu().view(3, 1, 1).float()

    def to(self, device: torch.device) -> "_SegmentAnythingBackend":
        self.sam.to(device)
        return self

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.sam.image_encoder(x)

    def low_res_logits(self, embedding: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        sparse, dense = self.sam.prompt_encoder(points=None, boxes=boxes, masks=None)
        logits, _ = self.sam.mask_decoder(
            image_embeddings=embedding,
            image_pe=self.sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        return logits  # (N, 1, h, w)


class _HFSamBackend:
    """Box prompts through transformers' ``SamModel``."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        vc = model.config.vision_config
        self.img_size = int(vc.image_size if isinstance(vc.image_size, int) else vc.image_size[0])
        self.pixel_mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255.0
        self.pixel_std = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255.0

    def to(self, device: torch.device) -> "_HFSamBackend":
        self.model.to(device)
        return self

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_embeddings(x)

    def low_res_logits(self, embedding: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        out = self.model(image_embeddings=embedding, input_boxes=boxes[None], multimask_output=False)
        return out.pred_masks[0]  # (N, 1, h, w)


class SamBoxSegmenter:
    """SAM segments for boxes on one image, clipped to their boxes (see module docstring)."""

    def __init__(self, sam: torch.nn.Module, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        if hasattr(sam, "image_encoder") and hasattr(sam, "mask_decoder"):
            self.backend: Any = _SegmentAnythingBackend(sam)
        elif hasattr(sam, "get_image_embeddings"):
            self.backend = _HFSamBackend(sam)
        else:
            raise TypeError(f"unsupported SAM model type {type(sam).__name__}")
        self.backend.to(self.device)
        self.img_size = self.backend.img_size

    def preprocess(self, rgb: np.ndarray) -> tuple[torch.Tensor, tuple[int, int], tuple[float, float]]:
        """Resize the longest side to the encoder size, normalise, pad: ``(1, 3, S, S)``, the resized
        ``(h, w)`` and the ``(sx, sy)`` scale from panorama to model pixels."""
        H, W = rgb.shape[:2]
        s = self.img_size / max(H, W)
        h, w = max(1, int(H * s + 0.5)), max(1, int(W * s + 0.5))
        x = torch.from_numpy(rgb).permute(2, 0, 1).float()
        x = _resize_chw(x, (h, w))
        x = (x - self.backend.pixel_mean) / self.backend.pixel_std
        x = F.pad(x, (0, self.img_size - w, 0, self.img_size - h))
        return x[None], (h, w), (w / W, h / H)

    @torch.no_grad()
    def segment(self, rgb: np.ndarray, boxes: Sequence[Box] | np.ndarray) -> np.ndarray:
        """Union of the box-clipped SAM segments, bool (H, W), True = inside some segment."""
        rgb = to_uint8_rgb(rgb)
        H, W = rgb.shape[:2]
        union = np.zeros((H, W), bool)
        arr = np.array([b.as_list() if isinstance(b, Box) else list(b) for b in boxes], np.float32).reshape(-1, 4)
        if len(arr) == 0:
            return union
        x, (h, w), (sx, sy) = self.preprocess(rgb)
        embedding = self.backend.embed(x.to(self.device))
        scaled = torch.from_numpy(arr * np.array([sx, sy, sx, sy], np.float32)).to(self.device)
        for i in range(len(arr)):
            logits = self.backend.low_res_logits(embedding, scaled[i : i + 1]).float()
            up = F.interpolate(logits, (self.img_size, self.img_size), mode="bilinear", align_corners=False)
            up = up[..., :h, :w]
            up = F.interpolate(up, (H, W), mode="bilinear", align_corners=False)
            seg = (up[0, 0] > 0.0).cpu().numpy()
            x0, y0, x1, y1 = arr[i]
            c0, r0 = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
            c1, r1 = min(W, int(np.ceil(x1))), min(H, int(np.ceil(y1)))
            union[r0:r1, c0:c1] |= seg[r0:r1, c0:c1]
        return union
