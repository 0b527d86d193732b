"""GroundingDINO boxes for text prompts on the whole equirectangular panorama (step 1 of
:mod:`sharding.segmenters`).

GroundingDINO (transformers ``GroundingDinoForObjectDetection``) runs on the *whole equirectangular image*,
resized to ``detect_height x 2*detect_height`` (default 512 x 1024), with the text ``"sky. watermark."``.
Sky in a panorama is the band at the top of the equirect image and a watermark/logo is a patch (usually
at the nadir, the bottom rows); both stay compact regions of the equirect image, so the whole-image view
finds them without the seams and extra passes that six cube faces would bring. (A sky that spans the full
width is one box; SAM then segments inside it.) A query becomes a box when its best token probability
exceeds ``box_threshold`` (0.3); it is assigned to the prompt whose tokens score highest and kept only
when that prompt's best token exceeds ``text_threshold`` (0.25) - GroundingDINO's two thresholds. At most
``max_boxes`` (20) boxes, best first, go on to SAM.

Weights: a Hugging Face id or a local directory (``from_pretrained``); default
``IDEA-Research/grounding-dino-base`` (``IDEA-Research/grounding-dino-tiny`` is ~2x faster and a little
less accurate). Only its tokenizer is loaded with it (``AutoTokenizer``): transformers 5's GroundingDINO
image processor is torchvision-backed and this project never depends on torchvision, so images are
preprocessed here (ImageNet mean/std, as the processor does). ``tokenizer=`` may point at a different
local tokenizer directory or a BERT ``vocab.txt``. :class:`Box` and :func:`to_uint8_rgb` are shared with
:mod:`sharding.sam`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

DEFAULT_DETECTOR = "IDEA-Research/grounding-dino-base"
DEFAULT_PROMPTS = ("sky", "watermark")
DEFAULT_BOX_THRESHOLD = 0.3
DEFAULT_TEXT_THRESHOLD = 0.25
DEFAULT_DETECT_HEIGHT = 512
DEFAULT_MAX_BOXES = 20

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _tokenizer_from_vocab_file(path: Path) -> Any:
    from transformers import BertTokenizer

    lines = path.read_text(encoding="utf-8").splitlines()
    vocab = {tok.strip(): i for i, tok in enumerate(lines) if tok.strip()}
    if "[UNK]" not in vocab or "[CLS]" not in vocab or "[SEP]" not in vocab:
        raise ValueError(f"vocabulary {path} lacks [UNK], [CLS] or [SEP]")
    return BertTokenizer(vocab=vocab, do_lower_case=True)


def load_tokenizer(spec: str | os.PathLike) -> Any:
    """A tokenizer from a BERT ``vocab.txt`` file, a local directory or a Hugging Face id."""
    p = Path(spec).expanduser()
    if p.is_file():
        return _tokenizer_from_vocab_file(p)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(spec))
    except Exception as exc:
        raise OSError(
            f"cannot load the tokenizer {str(spec)!r}: it is not a local file/directory and could not be "
            f"fetched from the Hugging Face Hub ({type(exc).__name__}: {exc}). Offline, download it elsewhere "
            f"(`hf download {spec} --local-dir DIR`) and pass the directory or its vocab.txt."
        ) from exc


def load_grounding_dino(model_id: str, tokenizer: str | os.PathLike | None = None) -> tuple[Any, Any]:
    """GroundingDINO and its tokenizer from a Hugging Face id or a local directory."""
    from transformers import GroundingDinoForObjectDetection

    try:
        model = GroundingDinoForObjectDetection.from_pretrained(model_id)
    except Exception as exc:
        raise OSError(
            f"cannot load GroundingDINO {model_id!r}: it is not a local directory and could not be fetched from "
            f"the Hugging Face Hub ({type(exc).__name__}: {exc}). Offline, download it on a machine with network "
            f"(`hf download {model_id} --local-dir DIR`) and pass --detector DIR (or set HF_HOME to "
            "a cache that holds it); --detector tiny-random runs the plumbing with random weights."
        ) from exc
    tok = load_tokenizer(tokenizer if tokenizer is not None else model_id)
    log.info("GroundingDINO loaded from %s", model_id)
    return model.eval(), tok


@dataclass(frozen=True)
class Box:
    """A detected box in pixel coordinates of the panorama (x0, y0, x1, y1), its score and its prompt."""

    x0: float
    y0: float
    x1: float
    y1: float
    score: float
    label: str

    def as_list(self) -> list[float]:
        return [self.x0, self.y0, self.x1, self.y1]


def to_uint8_rgb(image: Any, name: str = "image") -> np.ndarray:
    """(H, W, 3) uint8 from uint8 HWC, float HWC in [0, 1], or float/uint8 CHW (numpy or torch)."""
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4) or min(arr.shape[:2]) < 2:
        raise ValueError(f"{name}: expected an RGB image (H, W, 3) or (3, H, W), got shape {arr.shape}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float32)
        if not np.isfinite(arr).all():
            raise ValueError(f"{name}: image has non-finite values")
        arr = np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
    arr = np.ascontiguousarray(arr)
    return arr if arr.flags.writeable else arr.copy()  # torch.from_numpy warns on read-only arrays


def _resize_chw(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]


class GroundingDinoDetector:
    """Boxes for text prompts from GroundingDINO, on the whole equirectangular image (see module docstring)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        prompts: Sequence[str] = DEFAULT_PROMPTS,
        box_threshold: float = DEFAULT_BOX_THRESHOLD,
        text_threshold: float = DEFAULT_TEXT_THRESHOLD,
        detect_height: int = DEFAULT_DETECT_HEIGHT,
        max_boxes: int = DEFAULT_MAX_BOXES,
        device: str | torch.device = "cpu",
    ) -> None:
        if not prompts:
            raise ValueError("at least one text prompt is needed")
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.prompts = tuple(p.strip().lower() for p in prompts)
        self.box_threshold = float(box_threshold)
        self.text_threshold = float(text_threshold)
        self.detect_height = int(detect_height)
        self.max_boxes = int(max_boxes)
        self.device = torch.device(device)
        self.input_ids, self.spans = self._encode_prompts()

    def _encode_prompts(self) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """``[CLS] p1 . p2 . [SEP]`` (what the processor makes of "p1. p2.") and each prompt's token span."""
        tok = self.tokenizer
        ids = [tok.cls_token_id]
        spans = []
        dot = tok.convert_tokens_to_ids(".")
        for p in self.prompts:
            pids = tok.convert_tokens_to_ids(tok.tokenize(p))
            if not pids or all(i == tok.unk_token_id for i in pids):
                raise ValueError(f"prompt {p!r} has no known tokens in the detector's vocabulary")
            spans.append((len(ids), len(ids) + len(pids)))
            ids += list(pids) + [dot]
        ids.append(tok.sep_token_id)
        max_len = getattr(self.model.config, "max_text_len", 256)
        if len(ids) > max_len:
            raise ValueError(f"prompts {self.prompts} need {len(ids)} tokens, more than the model's {max_len}")
        return torch.tensor([ids], dtype=torch.long), spans

    def preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        h = self.detect_height
        x = torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0)
        x = _resize_chw(x, (h, 2 * h))
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        return ((x - mean) / std)[None]

    @torch.no_grad()
    def detect(self, rgb: np.ndarray) -> list[Box]:
        """Boxes (panorama pixel coordinates) for the prompts, best first, at most ``max_boxes``."""
        rgb = to_uint8_rgb(rgb)
        H, W = rgb.shape[:2]
        pixel_values = self.preprocess(rgb).to(self.device)
        ids = self.input_ids.to(self.device)
        out = self.model(
            pixel_values=pixel_values,
            pixel_mask=torch.ones(pixel_values.shape[0], *pixel_values.shape[-2:], dtype=torch.long, device=self.device),
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            token_type_ids=torch.zeros_like(ids),
        )
        probs = out.logits[0].sigmoid().float().cpu()  # (Q, max_text_len); 0 past the text
        boxes = out.pred_boxes[0].float().cpu()  # (Q, 4) cx, cy, w, h in [0, 1]
        return self.select(probs, boxes, (H, W))

    def select(self, probs: torch.Tensor, boxes: torch.Tensor, size_hw: tuple[int, int]) -> list[Box]:
        """Apply both thresholds to per-query token probabilities (Q, T) and normalised cxcywh boxes."""
        H, W = size_hw
        scores = probs.max(dim=-1).values
        span_scores = torch.stack([probs[:, a:b].max(dim=-1).values for a, b in self.spans], dim=-1)
        best_val, best_idx = span_scores.max(dim=-1)
        keep = (scores > self.box_threshold) & (best_val > self.text_threshold)
        order = torch.argsort(scores, descending=True)
        result = []
        for q in order.tolist():
            if not keep[q]:
                continue
            cx, cy, bw, bh = boxes[q].tolist()
            x0, x1 = np.clip([(cx - bw / 2) * W, (cx + bw / 2) * W], 0, W)
            y0, y1 = np.clip([(cy - bh / 2) * H, (cy + bh / 2) * H], 0, H)
            if x1 - x0 < 1 or y1 - y0 < 1:
                continue
            result.append(Box(float(x0), float(y0), float(x1), float(y1), float(scores[q]), self.prompts[int(best_idx[q])]))
            if len(result) >= self.max_boxes:
                break
        return result
