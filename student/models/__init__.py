"""Student networks for 360-degree depth: a registry over UniFuse, BiFuse++ and RectNet, plus the
discriminator of the adversarial recipe.

Every student maps RGB (B, 3, H, 2H) in [0, 1] to disparity (B, 1, H, 2H), positive and finite, float32
(see ``common.to_disparity``); ImageNet normalisation happens inside. They are plain ``nn.Module``s
configured by one frozen dataclass each and know nothing of Ray or DeepSpeed.

    build_model("unifuse", encoder="resnet18", pretrained="resnet18-f37072fd.pth")
    build_model("bifusepp")                      # ResNet-34 by default
    build_model("unifuse_tiny")                  # = unifuse with encoder="resnet_tiny", for CI

Empty values (``None`` or ``""``) of ``encoder`` and ``pretrained`` mean "the model's default" (random
init for ``pretrained``), so a generic configuration can always pass both. A ``*_tiny`` name fixes its
encoder (or width), and RectNet has no ResNet encoder: a conflicting non-empty value is refused rather
than ignored. Any other keyword is a field of the model's config dataclass; unknown ones are refused.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from .bifuse import BiFuseConfig, BiFusePP
from .discriminator import DepthDiscriminator, DiscriminatorConfig
from .rectnet import RectNet, RectNetConfig
from .resnet import ENCODERS, ResNet, build_resnet, hf_to_torchvision, load_pretrained, read_pretrained
from .unifuse import UniFuse, UniFuseConfig

# name -> (model class, config class, preset fields)
_REGISTRY: dict[str, tuple[type[nn.Module], type, dict[str, Any]]] = {
    "unifuse": (UniFuse, UniFuseConfig, {}),
    "bifusepp": (BiFusePP, BiFuseConfig, {}),
    "rectnet": (RectNet, RectNetConfig, {}),
    "unifuse_tiny": (UniFuse, UniFuseConfig, {"encoder": "resnet_tiny"}),
    "bifusepp_tiny": (BiFusePP, BiFuseConfig, {"encoder": "resnet_tiny"}),
    "rectnet_tiny": (RectNet, RectNetConfig, {"width_mult": 0.125}),
}
MODEL_NAMES = tuple(_REGISTRY)

_EMPTY = (None, "")


def model_config(name: str, **cfg: Any):
    """The config dataclass that ``build_model(name, **cfg)`` would use."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of {MODEL_NAMES}")
    _, config_cls, preset = _REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(config_cls)}
    values = dict(preset)
    for key, value in cfg.items():
        if key in ("encoder", "pretrained") and value in _EMPTY:
            continue  # the model's default
        if key not in fields:
            what = ("RectNet has no ResNet encoder or ImageNet weights; leave it empty"
                    if key in ("encoder", "pretrained") else f"valid fields: {sorted(fields)}")
            raise ValueError(f"model {name!r}: unknown option {key}={value!r} ({what})")
        if key in preset and value != preset[key]:
            base = name.removesuffix("_tiny")
            raise ValueError(f"model {name!r} fixes {key}={preset[key]!r}, got {value!r}; use model {base!r} "
                             f"to choose {key}, or leave it empty")
        values[key] = value
    return config_cls(**values)


def build_model(name: str, **cfg: Any) -> nn.Module:
    """A student network by registry name; keywords are fields of its config dataclass."""
    config = model_config(name, **cfg)  # validates the name and the options
    return _REGISTRY[name][0](config)


def build_discriminator(**cfg: Any) -> DepthDiscriminator:
    """``DepthDiscriminator(DiscriminatorConfig(**cfg))``; empty ``encoder``/``pretrained`` mean defaults."""
    cfg = {k: v for k, v in cfg.items() if not (k in ("encoder", "pretrained") and v in _EMPTY)}
    return DepthDiscriminator(DiscriminatorConfig(**cfg))


def discriminator_for(student: nn.Module, **cfg: Any) -> DepthDiscriminator:
    """A discriminator with the student's encoder architecture (ResNet-18 for RectNet, which has none)."""
    cfg.setdefault("encoder", getattr(student, "encoder_arch", "resnet18"))
    return build_discriminator(**cfg)


__all__ = [
    "BiFuseConfig", "BiFusePP", "DepthDiscriminator", "DiscriminatorConfig", "ENCODERS", "MODEL_NAMES",
    "RectNet", "RectNetConfig", "ResNet", "UniFuse", "UniFuseConfig", "build_discriminator", "build_model",
    "build_resnet", "discriminator_for", "hf_to_torchvision", "load_pretrained", "model_config",
    "read_pretrained",
]
