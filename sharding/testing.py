"""Tiny, randomly initialised stand-ins for the mask models (GroundingDINO, both SAM backends), built
offline and seeded: replicas build identical models. Their masks are MEANINGLESS; they exist for tests,
demos, benchmarks of the plumbing and CI (``--tiny-random``)."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import torch

from sharding.grounding_dino import DEFAULT_PROMPTS, _tokenizer_from_vocab_file
from sharding.sam import sam_modules

# GroundingDINO's text self-attention masks are built from BERT's ids of [CLS], [SEP], "." and "?"
# (transformers hard-codes them); the tiny vocabulary puts these tokens at the same ids.
_BERT_SPECIAL_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, ".": 1012, "?": 1029}


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
