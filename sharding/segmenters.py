"""Sky and watermark segmentation of equirectangular panoramas: GroundingDINO boxes, SAM segments inside them.

Pipeline (Grounded-SAM, as Depth Anywhere uses it to mask sky and watermarks):

1. **Detection.** GroundingDINO (transformers ``GroundingDinoForObjectDetection``) runs on the *whole
   equirectangular image*, resized to ``detect_height x 2*detect_height`` (default 512 x 1024), with the
   text ``"sky. watermark."``. Sky in a panorama is the band at the top of the equirect image and a
   watermark/logo is a patch (usually at the nadir, the bottom rows); both stay compact regions of the
   equirect image, so the whole-image view finds them without the seams and extra passes that six cube
   faces would bring. (A sky that spans the full width is one box; SAM then segments inside it.)
   A query becomes a box when its best token probability exceeds ``box_threshold`` (0.3); it is assigned
   to the prompt whose tokens score highest and kept only when that prompt's best token exceeds
   ``text_threshold`` (0.25) — GroundingDINO's two thresholds. At most ``max_boxes`` (20) boxes, best
   first, go on to SAM.
2. **Segmentation.** SAM gets each box as a prompt (single-mask output). Preprocessing is our own (no
   torchvision): resize the longest side to the encoder's input size (1024) with antialiased bilinear
   interpolation, normalise with SAM's pixel mean/std, pad bottom/right to a square. The low-resolution
   logits are upsampled, the padding cropped, upsampled again to the panorama's native size and
   thresholded at 0. **A segment is clipped to its box**: the detector says where the object is, SAM only
   refines the outline inside it.
3. **Union.** The union of all segments is the invalid region; the valid mask is its complement.

Models and weights
------------------
* GroundingDINO: a Hugging Face id or a local directory (``from_pretrained``); default
  ``IDEA-Research/grounding-dino-base`` (``IDEA-Research/grounding-dino-tiny`` is ~2x faster and a little
  less accurate). Only its tokenizer is loaded with it (``AutoTokenizer``): transformers 5's GroundingDINO
  image processor is torchvision-backed and this project never depends on torchvision, so images are
  preprocessed here (ImageNet mean/std, as the processor does). ``tokenizer=`` may point at a different
  local tokenizer directory or a BERT ``vocab.txt``.
* SAM: ``segment-anything`` model code with a checkpoint from a local path; default ``sam_vit_b_01ec64.pth``
  (download: :data:`SAM_CHECKPOINT_URL`), looked up as given, then in ``$PANO_SAM_DIR``, ``./checkpoints``
  and ``~/.cache/pano-distill``. The model type (vit_b/vit_l/vit_h) is read from the file name unless
  given. Alternatively a transformers ``SamModel`` id or directory (e.g. ``facebook/sam-vit-base``).
* ``"tiny-random"`` for either builds a tiny randomly initialised model offline (seeded): meaningless
  masks, for tests, demos and CI plumbing only.

Importing SAM without torchvision
---------------------------------
``import segment_anything`` runs the package ``__init__``, which imports ``SamPredictor`` and so
torchvision (an undeclared dependency). :func:`sam_modules` instead locates the installed package with
``importlib.util.find_spec`` (which does not execute it), registers an empty stand-in parent package
under a private name (``_pano_segment_anything``) whose ``__path__`` is the real package directory, and
imports ``.modeling`` and ``.build_sam`` through it. Their relative imports resolve inside the stand-in,
the real ``__init__`` never runs, and ``sys.modules["segment_anything"]`` is left untouched.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
import types
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

TINY_RANDOM = "tiny-random"
DEFAULT_DETECTOR = "IDEA-Research/grounding-dino-base"
DEFAULT_SAM_CHECKPOINT = "sam_vit_b_01ec64.pth"
SAM_CHECKPOINT_URL = "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"
SAM_CHECKPOINT_URLS = {
    "vit_b": SAM_CHECKPOINT_URL,
    "vit_l": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
    "vit_h": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
}
DEFAULT_PROMPTS = ("sky", "watermark")
DEFAULT_BOX_THRESHOLD = 0.3
DEFAULT_TEXT_THRESHOLD = 0.25
DEFAULT_DETECT_HEIGHT = 512
TINY_DETECT_HEIGHT = 128
DEFAULT_MAX_BOXES = 20

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# GroundingDINO's text self-attention masks are built from BERT's ids of [CLS], [SEP], "." and "?"
# (transformers hard-codes them); the tiny vocabulary puts these tokens at the same ids.
_BERT_SPECIAL_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, ".": 1012, "?": 1029}

_SAM_ALIAS = "_pano_segment_anything"


# ---------------------------------------------------------------------------------------------- SAM code
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


def build_tiny_sam(seed: int = 0, img_size: int = 128) -> torch.nn.Module:
    """A tiny, randomly initialised ``segment_anything`` SAM (ViT with 2 blocks of width 32), built offline."""
    modeling, _ = sam_modules()
    patch, dim = 16, 32
    emb = img_size // patch
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = modeling.Sam(
            image_encoder=modeling.ImageEncoderViT(
                depth=2, embed_dim=32, img_size=img_size, mlp_ratio=2.0,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=2, patch_size=patch,
                qkv_bias=True, use_rel_pos=True, global_attn_indexes=[1], window_size=4, out_chans=dim,
            ),
            prompt_encoder=modeling.PromptEncoder(
                embed_dim=dim, image_embedding_size=(emb, emb), input_image_size=(img_size, img_size),
                mask_in_chans=4,
            ),
            mask_decoder=modeling.MaskDecoder(
                num_multimask_outputs=3,
                transformer=modeling.TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=64, num_heads=2),
                transformer_dim=dim, iou_head_depth=2, iou_head_hidden_dim=32,
            ),
        )
    return sam.eval()


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


# ------------------------------------------------------------------------------------------ GroundingDINO
def tiny_vocab(words: Sequence[str] = DEFAULT_PROMPTS) -> dict[str, int]:
    """A small WordPiece vocabulary (single letters plus ``words``) whose special tokens sit at BERT's ids."""
    vocab = {f"[unused{i}]": i for i in range(1, 1030)}
    vocab.update(_BERT_SPECIAL_IDS)
    inv = {v: k for k, v in vocab.items()}
    vocab = {inv[i]: i for i in sorted(inv)}
    extra = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [f"##{chr(c)}" for c in range(ord("a"), ord("z") + 1)]
    extra += [",", "-", "'"] + [w.lower() for w in words]
    for tok in extra:
        vocab.setdefault(tok, len(vocab))
    return vocab


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


def build_tiny_grounding_dino(seed: int = 0, vocab_file: str | os.PathLike | None = None) -> tuple[Any, Any]:
    """A tiny randomly initialised GroundingDINO (Swin 16-wide, d_model 32, 2 decoder layers) and a
    tokenizer (the built-in :func:`tiny_vocab`, or a BERT ``vocab.txt``), built offline."""
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        SwinConfig,
    )

    tokenizer = _tokenizer_from_vocab_file(Path(vocab_file)) if vocab_file else BertTokenizer(vocab=tiny_vocab())
    vocab_size = max(len(tokenizer.get_vocab()), 1100)
    backbone = SwinConfig(
        embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4, out_indices=[2, 3, 4],
        image_size=224,
    )
    text = BertConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )
    cfg = GroundingDinoConfig(
        backbone_config=backbone, text_config=text, d_model=32, encoder_layers=1, decoder_layers=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2,
        num_queries=20, max_text_len=32, encoder_n_points=2, decoder_n_points=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GroundingDinoForObjectDetection(cfg)
    return model.eval(), tokenizer


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


# ---------------------------------------------------------------------------------------------- pieces
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


def build_tiny_hf_sam(seed: int = 0, img_size: int = 128) -> torch.nn.Module:
    """A tiny randomly initialised transformers ``SamModel``, built offline."""
    from transformers import SamConfig, SamMaskDecoderConfig, SamModel, SamPromptEncoderConfig, SamVisionConfig

    cfg = SamConfig(
        vision_config=SamVisionConfig(
            hidden_size=32, output_channels=32, num_hidden_layers=2, num_attention_heads=2, image_size=img_size,
            patch_size=16, window_size=4, global_attn_indexes=[1], mlp_dim=64, num_pos_feats=16,
        ),
        prompt_encoder_config=SamPromptEncoderConfig(hidden_size=32, image_size=img_size, patch_size=16, mask_input_channels=4),
        mask_decoder_config=SamMaskDecoderConfig(hidden_size=32, mlp_dim=64, num_hidden_layers=1, num_attention_heads=2, iou_head_hidden_dim=32),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SamModel(cfg)
    return model.eval()


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


# ---------------------------------------------------------------------------------------------- masker
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
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

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


def _looks_like_hf_sam(spec: str) -> bool:
    p = Path(spec).expanduser()
    if p.is_dir():
        return (p / "config.json").is_file()
    return not p.suffix and "/" in spec and not p.exists()


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
