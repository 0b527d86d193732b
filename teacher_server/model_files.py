"""Files beside a teacher's weights: processor hints, input multiples, state dicts and their architecture.

Used by :func:`teacher_server.models.load_model`:

* :func:`_processor_hints`: mean/std and input size from ``preprocessor_config.json`` and from our own
  ``pano_distill.json`` (written by ``student.perspective_teacher.train``), where they exist;
* :func:`input_multiple`: what the input side must be a multiple of (patch or total stride);
* :func:`_load_state_dict_file` / :func:`_config_for_state_dict`: a bare ``.pt`` / ``.safetensors`` state
  dict (``weights_only=True``) and the architecture it needs.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from .testing import da_config, tiny_config

log = logging.getLogger("teacher_server.models")


def _find_file(folder_or_id: str, filename: str, local_files_only: bool) -> Path | None:
    """A small side file of a model folder or hub repo (processor config, pano_distill.json), if available."""
    p = Path(folder_or_id)
    if p.is_dir():
        cand = p / filename
        return cand if cand.is_file() else None
    try:
        from transformers.utils import cached_file

        found = cached_file(folder_or_id, filename, local_files_only=local_files_only,
                            _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
        return Path(found) if found else None
    except Exception as exc:  # noqa: BLE001 - side files are optional
        log.debug("no %s for %s: %s", filename, folder_or_id, exc)
        return None


def _read_json(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError) as exc:
        log.warning("could not read %s: %s", path, exc)
        return {}


def _processor_hints(folder_or_id: str, local_files_only: bool) -> dict:
    """mean/std and input size from ``preprocessor_config.json`` and our ``pano_distill.json`` (written by
    ``student.perspective_teacher.train``), where they exist. Without them: ImageNet mean/std."""
    hints: dict[str, Any] = {}
    proc = _read_json(_find_file(folder_or_id, "preprocessor_config.json", local_files_only))
    if proc:
        mean, std = proc.get("image_mean"), proc.get("image_std")
        if proc.get("do_normalize") is False:
            hints["mean"], hints["std"] = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        elif mean and std and len(mean) == 3 and len(std) == 3:
            hints["mean"], hints["std"] = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        size = proc.get("size")
        if isinstance(size, dict) and size.get("height") and size.get("height") == size.get("width"):
            hints["input_size"] = int(size["height"])
    ours = _read_json(_find_file(folder_or_id, "pano_distill.json", True)) if Path(folder_or_id).is_dir() else {}
    if ours.get("input_size"):
        hints["input_size"] = int(ours["input_size"])
    return hints


def input_multiple(config) -> int:
    """What the input side must be a multiple of: the ViT patch (Depth Anything 14, DPT 16), GLPN's total
    stride (32), else 1."""
    if getattr(config, "model_type", "") == "glpn":
        strides = getattr(config, "strides", None) or [4, 2, 2, 2]
        return int(math.prod(strides))
    ps = getattr(config, "patch_size", None)
    if ps is None:
        ps = getattr(getattr(config, "backbone_config", None), "patch_size", None)
    if isinstance(ps, (list, tuple)):
        ps = ps[0] if ps else None
    return int(ps) if ps else 1


def _load_state_dict_file(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module", "teacher"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"{path} holds no state dict (got {type(sd).__name__})")
    for prefix in ("module.", "model.", "teacher."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _config_for_state_dict(path: Path, architecture: str | None):
    from transformers import AutoConfig

    if architecture is None:
        cand = path.parent / "config.json"
        if cand.is_file():
            return AutoConfig.from_pretrained(str(path.parent), local_files_only=True)
        raise ValueError(f"the state dict {path} needs its architecture: put the config.json written by "
                         f"save_pretrained next to it, or pass architecture=<config.json | folder | tiny-random | "
                         f"random:small|base|large>")
    if architecture == "tiny-random":
        return tiny_config()
    if architecture.startswith("random:"):
        return da_config(architecture.split(":", 1)[1])
    arch = Path(architecture).expanduser()
    if arch.is_file():
        return AutoConfig.for_model(**json.loads(arch.read_text()))
    if arch.is_dir():
        return AutoConfig.from_pretrained(str(arch), local_files_only=True)
    raise ValueError(f"architecture {architecture!r} is neither tiny-random, random:<size>, a config.json nor a folder")
