"""The mask models: GroundingDINO detector, both SAM backends, the tiny test models, the masker chain."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from sharding.grounding_dino import Box, GroundingDinoDetector
from sharding.sam import SamBoxSegmenter, sam_modules
from sharding.segmenters import TINY_RANDOM, MaskerConfig, SkyWatermarkMasker
from sharding.testing import build_tiny_grounding_dino, build_tiny_hf_sam, build_tiny_sam

TINY = MaskerConfig(detector=TINY_RANDOM, sam=TINY_RANDOM, device="cpu")


@pytest.fixture(scope="module")
def panos() -> list[np.ndarray]:
    from conftest import sample_panoramas

    return sample_panoramas(2)


def test_segmenters_keeps_the_names_callers_import():
    import sharding.segmenters as S

    for name in ("Box", "GroundingDinoDetector", "SamBoxSegmenter", "build_tiny_grounding_dino", "build_tiny_sam",
                 "build_tiny_hf_sam", "load_grounding_dino", "load_sam", "resolve_sam_checkpoint", "sam_modules",
                 "DEFAULT_DETECTOR", "DEFAULT_SAM_CHECKPOINT", "DEFAULT_PROMPTS", "DEFAULT_BOX_THRESHOLD",
                 "DEFAULT_TEXT_THRESHOLD", "DEFAULT_MAX_BOXES", "MaskResult"):
        assert hasattr(S, name), name


def test_sam_model_code_imports_without_the_package_init():
    modeling, build_sam = sam_modules()
    assert "segment_anything" not in sys.modules  # the package __init__ (torchvision) never ran
    assert "torchvision" not in sys.modules
    assert modeling.Sam.__module__.endswith(".modeling.sam") and hasattr(build_sam, "build_sam_vit_b")
    sam = build_tiny_sam(seed=0)
    assert isinstance(sam, modeling.Sam) and sam.image_encoder.img_size == 128
    again = build_tiny_sam(seed=0)
    for a, b in zip(sam.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)  # seeded: replicas build identical models


def test_detector_thresholds_and_prompt_assignment():
    model, tok = build_tiny_grounding_dino(seed=0)
    det = GroundingDinoDetector(model, tok, ("sky", "watermark"), box_threshold=0.3, text_threshold=0.25)
    ids = det.input_ids[0].tolist()
    assert tok.convert_ids_to_tokens(ids) == ["[CLS]", "sky", ".", "watermark", ".", "[SEP]"]
    assert ids[0] == 101 and ids[2] == 1012 and ids[-1] == 102  # GroundingDINO's hard-coded BERT ids
    (a0, a1), (b0, b1) = det.spans
    probs = torch.zeros(5, 32)
    probs[0, a0] = 0.9  # sky
    probs[1, b0] = 0.5  # watermark
    probs[2, 2] = 0.8  # only the "." token: passes the box threshold, no prompt passes the text threshold
    probs[3, a0] = 0.29  # below the box threshold
    probs[4, [a0, b0]] = torch.tensor([0.31, 0.2])  # box passes; sky is its best prompt
    boxes = torch.tensor([[0.5, 0.1, 1.0, 0.2], [0.5, 0.95, 0.2, 0.1], [0.5, 0.5, 0.2, 0.2],
                          [0.5, 0.5, 0.2, 0.2], [0.25, 0.5, 0.1, 0.2]])
    got = det.select(probs, boxes, (100, 200))
    assert [(b.label, round(b.score, 2)) for b in got] == [("sky", 0.9), ("watermark", 0.5), ("sky", 0.31)]
    assert got[0].as_list() == pytest.approx([0, 0, 200, 20])
    assert got[1].as_list() == pytest.approx([80, 90, 120, 100])
    det.max_boxes = 1
    assert len(det.select(probs, boxes, (100, 200))) == 1


def test_tokenizer_from_a_local_vocab_file(tmp_path, panos):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "sky", "water", "##mark", "logo"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    model, tok = build_tiny_grounding_dino(seed=1, vocab_file=tmp_path / "vocab.txt")
    det = GroundingDinoDetector(model, tok, ("sky", "watermark"), detect_height=64)
    assert det.input_ids[0].tolist() == [2, 6, 5, 7, 8, 5, 3]
    assert det.spans == [(1, 2), (3, 5)]
    boxes = det.detect(panos[0])
    assert all(0 <= b.x0 < b.x1 <= 128 and 0 <= b.y0 < b.y1 <= 64 for b in boxes)
    assert all(b.label in ("sky", "watermark") and b.score > 0.3 for b in boxes)
    with pytest.raises(ValueError, match="'zebra'"):
        GroundingDinoDetector(model, tok, ("zebra",))


def test_tiny_pipeline_end_to_end_on_a_real_panorama(samples_dir):
    from conftest import sample_panoramas

    rgb = sample_panoramas(1, 128)[0]  # outdoor b0.png: samples_dir makes sure the real samples are there
    masker = SkyWatermarkMasker.from_config(TINY)
    res = masker(rgb)
    assert res.valid.dtype == bool and res.valid.shape == (128, 256)
    assert 0.0 <= res.valid_fraction <= 1.0
    for b in res.boxes:  # whatever random weights find, the invalid region stays inside the boxes
        assert 0 <= b.x0 < b.x1 <= 256 and 0 <= b.y0 < b.y1 <= 128
    inside = np.zeros_like(res.valid)
    for b in res.boxes:
        inside[int(b.y0): int(np.ceil(b.y1)), int(b.x0): int(np.ceil(b.x1))] = True
    assert not (~res.valid & ~inside).any()
    # CHW float input (as sharding.stream yields it) gives the same mask
    chw = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    np.testing.assert_array_equal(SkyWatermarkMasker.from_config(TINY)(chw).valid, res.valid)


def test_known_box_gives_an_invalid_region_inside_it(panos, monkeypatch):
    rgb = panos[1]  # 64 x 128
    masker = SkyWatermarkMasker.from_config(TINY)
    box = Box(40, 10, 100, 30, 0.9, "sky")
    monkeypatch.setattr(masker.detector, "detect", lambda img: [box])
    res = masker(rgb)
    invalid = ~res.valid
    assert not invalid[:10].any() and not invalid[30:].any()
    assert not invalid[:, :40].any() and not invalid[:, 100:].any()
    assert res.valid_fraction == pytest.approx(1 - invalid.sum() / invalid.size)

    # a SAM that segments everything: the invalid region is exactly the box; two boxes: their union
    backend = masker.segmenter.backend
    monkeypatch.setattr(backend, "low_res_logits", lambda emb, boxes: torch.ones(len(boxes), 1, 32, 32))
    res = masker(rgb)
    expect = np.zeros((64, 128), bool)
    expect[10:30, 40:100] = True
    np.testing.assert_array_equal(~res.valid, expect)
    assert res.valid_fraction == pytest.approx(1 - 20 * 60 / (64 * 128))
    wm = Box(90, 50, 128, 64, 0.5, "watermark")
    monkeypatch.setattr(masker.detector, "detect", lambda img: [box, wm])
    expect[50:64, 90:128] = True
    res = masker(rgb)
    np.testing.assert_array_equal(~res.valid, expect)
    assert res.valid_fraction == pytest.approx(1 - (20 * 60 + 14 * 38) / (64 * 128))
    # no box: everything valid
    monkeypatch.setattr(masker.detector, "detect", lambda img: [])
    assert masker(rgb).valid.all()


def test_transformers_sam_backend_stays_inside_its_box(panos):
    seg = SamBoxSegmenter(build_tiny_hf_sam(seed=0))
    x, (h, w), (sx, sy) = seg.preprocess(panos[0])
    assert x.shape == (1, 3, 128, 128) and (h, w) == (64, 128) and sx == sy == 1.0
    union = seg.segment(panos[0], [Box(20, 5, 70, 40, 1.0, "sky")])
    assert union.shape == (64, 128)
    assert not union[:5].any() and not union[40:].any() and not union[:, :20].any() and not union[:, 70:].any()
