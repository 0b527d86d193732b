"""The one device resolver: ``auto`` means CUDA when there is a GPU, else the CPU; an explicit CUDA
device on a machine without one is a user error named as such, not a crash deep inside torch."""

from __future__ import annotations

import torch

from .cli import UserError


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"device {str(name)!r} is not a torch device name (use auto, cpu, cuda or cuda:N)") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {str(name)!r} requested but CUDA is not available here; use device=cpu")
    return dev
