"""Building and loading students outside the training loop (evaluation, prediction, benchmarks)."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from student.checkpoint import load_model_state
from student.config import ModelConfig, TrainConfig, from_dict


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available; use device=cpu")
    return dev


def build_student(model: ModelConfig) -> torch.nn.Module:
    """The student network of a run configuration (random or ImageNet-initialised encoder)."""
    from student.models import build_model

    kwargs = dict(model.options)
    kwargs.setdefault("encoder", model.encoder)
    if model.pretrained:
        kwargs["pretrained"] = model.pretrained
    return build_model(model.name, **kwargs)


def load_student(checkpoint: str | Path, device: torch.device) -> tuple[torch.nn.Module, TrainConfig, Path]:
    """A trained student from a run folder, checkpoint folder or model.pt (config.yaml beside it)."""
    state, f = load_model_state(checkpoint)
    cfg_file = f.parent / "config.yaml"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} is missing: a checkpoint needs the config.yaml written beside it")
    cfg = from_dict(yaml.safe_load(cfg_file.read_text()))
    cfg.model.pretrained = ""  # the checkpoint holds every weight; do not fetch ImageNet weights again
    model = build_student(cfg.model)
    model.load_state_dict(state)
    return model.to(device).eval(), cfg, f


def train_flops_per_panorama(cfg: TrainConfig) -> float:
    """FLOPs of one panorama through one training step (3x forward), at the run's resolution, for MFU."""
    from student.flops import train_step_flops

    return float(train_step_flops(build_student(cfg.model), cfg.data.height, 2 * cfg.data.height))
