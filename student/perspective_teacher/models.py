"""The small from-scratch Hugging Face depth networks our perspective teacher can be (``--arch``).

See ``student.perspective_teacher.train`` for the measured comparison of the architectures.
"""

from __future__ import annotations

import torch

from student.perspective_teacher.data import IMAGE_MEAN, IMAGE_STD

ARCHS = ("dpt_hybrid", "glpn", "depth_anything", "dpt")

# ------------------------------------------------------------------------------------------- models

def arch_multiple(arch: str) -> int:
    """Input sides must be a multiple of this (total stride of GLPN, patch size of the ViTs)."""
    return {"dpt_hybrid": 16, "glpn": 32, "depth_anything": 14, "dpt": 16}[arch]


def _output_conv(model):
    head = model.head
    if hasattr(head, "conv3"):  # Depth Anything
        return head.conv3
    return head.head[-2] if isinstance(head.head[-1], torch.nn.ReLU) else head.head[-1]  # DPT / GLPN


def _relu_head_bias(model, value: float = 1.0) -> None:
    """Start the output layer of a ReLU-terminated head (DPT, Depth Anything) at a positive bias, so that the
    output is positive everywhere at initialisation instead of starting within 1e-5 of zero, half of it
    clipped by the ReLU."""
    torch.nn.init.constant_(_output_conv(model).bias, value)


@torch.no_grad()
def ensure_output_spread(model, pixel_values: torch.Tensor, min_spread: float = 1e-5,
                         target: float = 1e-3) -> float:
    """Scale the output convolution of a freshly initialised model whose predictions barely vary.

    The affine-invariant loss treats a map whose mean absolute deviation is below 1e-6 as constant and gives
    it no gradient. With Hugging Face's init (std 0.02 everywhere) a from-scratch ViT DPT predicts maps that
    vary by ~1e-7, so it never leaves that state (it stayed at loss 1.0 in our runs), and Depth Anything
    starts at ~2e-6. When the deviation on ``pixel_values`` is below ``min_spread`` the output weights are
    scaled so that it becomes ``target``. Returns the factor (1.0: unchanged; DPT-Hybrid and GLPN start
    near 1e-4 and are left alone)."""
    was_training = model.training
    model.eval()
    y = model(pixel_values=pixel_values).predicted_depth.flatten(1)
    spread = float((y - y.median(dim=1, keepdim=True).values).abs().mean())
    model.train(was_training)
    if spread >= min_spread:
        return 1.0
    factor = target / max(spread, 1e-12)
    _output_conv(model).weight.mul_(factor)
    return factor


def build_model(arch: str, size: int, width: str = "small"):
    """A from-scratch Hugging Face depth model of about 1M parameters (``width="tiny"``: tests)."""
    from transformers import (BitConfig, DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config,
                              DPTConfig, DPTForDepthEstimation, GLPNConfig, GLPNForDepthEstimation)

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    m = arch_multiple(arch)
    if size % m:
        raise ValueError(f"--size {size} must be a multiple of {m} for arch {arch}")
    tiny = width == "tiny"
    if arch == "dpt_hybrid":
        # DPT-Hybrid (Ranftl et al. 2021): a BiT ResNet (weight-standardised convolutions, GroupNorm) to
        # stride 16, a ViT on its 1/16 feature map, and DPT's fusion decoder fed by the ResNet's stride-4 and
        # stride-8 features plus two ViT layers. The convolutional path learns fast from scratch.
        hs = [8, 16, 32] if tiny else [24, 48, 96]
        hid, layers, heads = (32, 2, 2) if tiny else (96, 4, 3)
        bit = BitConfig(layer_type="bottleneck", embedding_size=8 if tiny else 16, hidden_sizes=hs,
                        depths=[1, 1, 1], num_groups=4 if tiny else 8, out_features=["stage1", "stage2", "stage3"],
                        global_padding="same", embedding_dynamic_padding=True)
        cfg = DPTConfig(is_hybrid=True, backbone_config=bit, backbone_featmap_shape=[1, hs[-1], size // 16, size // 16],
                        hidden_size=hid, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=4 * hid, image_size=size, patch_size=16,
                        backbone_out_indices=[0, 1, layers // 2 - 1, layers - 1],
                        neck_hidden_sizes=[hs[0], hs[1], hid, hid], reassemble_factors=[1, 1, 1, 0.5],
                        fusion_hidden_size=16 if tiny else 32, use_auxiliary_head=False, readout_type="project")
        model = DPTForDepthEstimation(cfg)
        _relu_head_bias(model)
        return model
    if arch == "glpn":
        # SegFormer (MiT) encoder, strides 4-8-16-32, efficient attention with spatial reduction; GLPN's
        # light decoder up to full resolution. max_depth=1: the head's sigmoid gives disparity in (0, 1).
        # (The full-resolution decoder and head dominate the cost; a 16-channel decoder with a wider encoder
        # was cheaper per step but learned worse.)
        cfg = GLPNConfig(hidden_sizes=[8, 16, 32, 64] if tiny else [16, 32, 80, 128],
                         depths=[1, 1, 1, 1] if tiny else [2, 2, 2, 2],
                         num_attention_heads=[1, 1, 1, 2] if tiny else [1, 1, 2, 4],
                         sr_ratios=[8, 4, 2, 1], mlp_ratios=[4, 4, 4, 4], patch_sizes=[7, 3, 3, 3],
                         strides=[4, 2, 2, 2], decoder_hidden_size=8 if tiny else 32, max_depth=1,
                         drop_path_rate=0.0)
        return GLPNForDepthEstimation(cfg)
    if arch == "depth_anything":
        hid, layers, heads = (32, 4, 2) if tiny else (96, 4, 3)
        backbone = Dinov2Config(hidden_size=hid, num_hidden_layers=layers, num_attention_heads=heads,
                                intermediate_size=4 * hid, patch_size=14, image_size=size,
                                out_indices=[1, 2, 3, 4], reshape_hidden_states=False,
                                apply_layernorm=True)
        cfg = DepthAnythingConfig(backbone_config=backbone, patch_size=14, reassemble_hidden_size=hid,
                                  neck_hidden_sizes=[8, 16, 32, 32] if tiny else [24, 48, 96, 96],
                                  fusion_hidden_size=16 if tiny else 48, head_hidden_size=8 if tiny else 24,
                                  depth_estimation_type="relative", max_depth=1)
        model = DepthAnythingForDepthEstimation(cfg)
        _relu_head_bias(model)
        return model
    hid, layers, heads = (32, 4, 2) if tiny else (96, 4, 3)
    cfg = DPTConfig(hidden_size=hid, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=4 * hid,
                    image_size=size, patch_size=16, backbone_out_indices=[0, 1, 2, 3],
                    neck_hidden_sizes=[8, 16, 32, 32] if tiny else [24, 48, 96, 96],
                    fusion_hidden_size=16 if tiny else 48, use_auxiliary_head=False)
    model = DPTForDepthEstimation(cfg)
    _relu_head_bias(model)
    return model


def build_processor(size: int, multiple: int):
    """The image processor saved with the model: resize to ``size`` x ``size``, /255, ImageNet mean/std."""
    from transformers import DPTImageProcessorPil

    return DPTImageProcessorPil(do_resize=True, size={"height": size, "width": size}, keep_aspect_ratio=False,
                                ensure_multiple_of=multiple, do_rescale=True, rescale_factor=1 / 255,
                                do_normalize=True, image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD),
                                do_pad=False)


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
