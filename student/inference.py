"""Building and loading students outside the training loop (evaluation, prediction, benchmarks).

``load_student`` is the one loading path of ``student.evaluate`` and ``student.predict``: it goes through
``checkpoint.load_model_state``, which checks every zip member's CRC and refuses non-finite weights by file
and tensor name (a ``UserError``), so a damaged or diverged checkpoint is never evaluated as a model.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from sharding.cli import UserError
from student.checkpoint import load_model_state
from student.config import ConfigError, ModelConfig, TrainConfig, from_dict


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
        raise UserError(f"{cfg_file} is missing: a checkpoint needs the config.yaml written beside it")
    try:
        cfg = from_dict(yaml.safe_load(cfg_file.read_text()) or {})
    except (ConfigError, yaml.YAMLError) as err:
        raise UserError(f"{cfg_file}: {' '.join(str(err).split())}") from err
    cfg.model.pretrained = ""  # the checkpoint holds every weight; do not fetch ImageNet weights again
    model = build_student(cfg.model)
    model.load_state_dict(state)
    return model.to(device).eval(), cfg, f


def train_flops_per_panorama(cfg: TrainConfig) -> float:
    """FLOPs of one panorama through one training step (3x forward), at the run's resolution, for MFU."""
    from student.flops import train_step_flops

    return float(train_step_flops(build_student(cfg.model), cfg.data.height, 2 * cfg.data.height))
