"""Sky and watermark segmentation of equirectangular panoramas: GroundingDINO boxes, SAM segments inside them.

Pipeline (Grounded-SAM, as Depth Anywhere uses it to mask sky and watermarks):

1. **Detection** (:mod:`sharding.grounding_dino`): GroundingDINO on the whole equirectangular image
   (512 x 1024), prompts "sky" and "watermark", box threshold 0.3, text threshold 0.25, at most 20 boxes.
2. **Segmentation** (:mod:`sharding.sam`): SAM (``segment-anything`` checkpoint or transformers
   ``SamModel``) with each box as prompt; a segment is clipped to its box.
3. **Union.** The union of all segments is the invalid region; the valid mask is its complement.

``"tiny-random"`` for either model builds a tiny randomly initialised one offline (:mod:`sharding.testing`):
meaningless masks, for tests, demos and CI plumbing only. This module keeps the configuration
(:class:`MaskerConfig`, whose :meth:`~MaskerConfig.metadata` goes into the mask store) and the masker that
chains the steps; it re-exports the names of the modules above that callers import from here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sharding.grounding_dino import (  # noqa: F401 - re-exported
    DEFAULT_BOX_THRESHOLD,
    DEFAULT_DETECT_HEIGHT,
    DEFAULT_DETECTOR,
    DEFAULT_MAX_BOXES,
    DEFAULT_PROMPTS,
    DEFAULT_TEXT_THRESHOLD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Box,
    GroundingDinoDetector,
    load_grounding_dino,
    load_tokenizer,
    to_uint8_rgb,
)
from sharding.sam import (  # noqa: F401 - re-exported
    DEFAULT_SAM_CHECKPOINT,
    SAM_CHECKPOINT_URL,
    SAM_CHECKPOINT_URLS,
    SamBoxSegmenter,
    _load_hf_sam,
    _looks_like_hf_sam,
    load_sam,
    resolve_sam_checkpoint,
    sam_modules,
    sam_type_from_name,
)
from sharding.testing import build_tiny_grounding_dino, build_tiny_hf_sam, build_tiny_sam, tiny_vocab  # noqa: F401

log = logging.getLogger(__name__)

TINY_RANDOM = "tiny-random"
TINY_DETECT_HEIGHT = 128


@dataclass
class MaskerConfig:
    """Everything that decides a mask; :meth:`metadata` goes into the mask store."""

    detector: str = DEFAULT_DETECTOR
    sam: str = DEFAULT_SAM_CHECKPOINT
    sam_type: str | None = None
    tokenizer: str | None = None
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    box_threshold: float = DEFAULT_BOX_THRESHOLD
    text_threshold: float = DEFAULT_TEXT_THRESHOLD
    detect_height: int | None = None  # None: 512, or 128 for the tiny-random detector
    max_boxes: int = DEFAULT_MAX_BOXES
    device: str = "auto"
    seed: int = 0  # for tiny-random models
    extra: dict = field(default_factory=dict)

    @property
    def tiny(self) -> bool:
        return TINY_RANDOM in (self.detector, self.sam)

    def resolved_detect_height(self) -> int:
        if self.detect_height:
            return int(self.detect_height)
        return TINY_DETECT_HEIGHT if self.detector == TINY_RANDOM else DEFAULT_DETECT_HEIGHT

    def resolved_device(self) -> str:
        from sharding.device import resolve_device

        return str(resolve_device(self.device))

    def metadata(self) -> dict:
        sam = self.sam
        if sam != TINY_RANDOM and not _looks_like_hf_sam(sam):
            sam = Path(sam).name
        meta = {
            "detector": self.detector,
            "sam": sam,
            "sam_type": self.sam_type or (sam_type_from_name(sam) if sam != TINY_RANDOM else None),
            "prompts": list(self.prompts),
            "box_threshold": self.box_threshold,
            "text_threshold": self.text_threshold,
            "detect_height": self.resolved_detect_height(),
            "max_boxes": self.max_boxes,
            "equirect": "whole equirect image",
        }
        if self.tiny:
            meta["seed"] = self.seed
        meta.update(self.extra)
        return meta


@dataclass
class MaskResult:
    valid: np.ndarray  # bool (H, W), True = valid
    boxes: list[Box]

    @property
    def valid_fraction(self) -> float:
        return float(self.valid.mean())


class SkyWatermarkMasker:
    """GroundingDINO + SAM: ``masker(rgb) -> MaskResult`` with the valid mask at the image's resolution."""

    def __init__(self, detector: GroundingDinoDetector, segmenter: SamBoxSegmenter) -> None:
        self.detector = detector
        self.segmenter = segmenter

    @classmethod
    def from_config(cls, cfg: MaskerConfig) -> "SkyWatermarkMasker":
        device = cfg.resolved_device()
        if cfg.tiny:
            log.warning(
                "tiny-random models (detector=%s, sam=%s): RANDOM WEIGHTS, the masks are meaningless; "
                "this only exercises the plumbing (tests, demos, CI)", cfg.detector, cfg.sam,
            )
        # SAM first: a missing local checkpoint is found at once, before a Hub download is attempted
        if cfg.sam == TINY_RANDOM:
            sam = build_tiny_sam(cfg.seed)
        elif _looks_like_hf_sam(cfg.sam):
            sam = _load_hf_sam(cfg.sam)
        else:
            sam = load_sam(cfg.sam, cfg.sam_type)
        if cfg.detector == TINY_RANDOM:
            model, tok = build_tiny_grounding_dino(cfg.seed, vocab_file=cfg.tokenizer)
        else:
            model, tok = load_grounding_dino(cfg.detector, cfg.tokenizer)
        detector = GroundingDinoDetector(
            model, tok, cfg.prompts, cfg.box_threshold, cfg.text_threshold,
            cfg.resolved_detect_height(), cfg.max_boxes, device,
        )
        return cls(detector, SamBoxSegmenter(sam, device))

    def __call__(self, rgb: Any) -> MaskResult:
        rgb = to_uint8_rgb(rgb)
        boxes = self.detector.detect(rgb)
        invalid = self.segmenter.segment(rgb, boxes)
        return MaskResult(~invalid, boxes)
