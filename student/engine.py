"""The optimizer side of one process: backward, clip, step, save, load.

The training loop talks to an engine, never to an optimizer, so that the same loop runs in one process
(``LocalEngine``, here) and on DeepSpeed data-parallel workers (``cluster.deepspeed_engine``), which
implement the same methods.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from student import checkpoint as ckpt
from student.config import OptimConfig


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """``auto``: bf16 autocast on GPU, none on CPU (fp32: CPU bf16 autocast is slower, not faster)."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp in ("auto", "bf16"):
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    raise ValueError(f"optim.amp must be auto, bf16, fp16 or off; got {amp!r}")


class LocalEngine:
    """Adam on one device, with gradient clipping and (for fp16 only) loss scaling."""

    kind = "local"

    def __init__(self, module: nn.Module, optim: OptimConfig, device: torch.device, *, lr: float | None = None,
                 weight_decay: float | None = None):
        self.module = module.to(device)
        self.device = device
        self.optim_config = optim
        params = [p for p in self.module.parameters() if p.requires_grad]
        self.base_lr = optim.lr if lr is None else lr
        self.optimizer = torch.optim.Adam(params, lr=self.base_lr, betas=tuple(optim.betas),
                                          weight_decay=optim.weight_decay if weight_decay is None else weight_decay)
        self.grad_clip = optim.grad_clip
        self.amp = amp_dtype(optim.amp, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp == torch.float16)
        self.rank, self.world_size = 0, 1

    def companion(self, module: nn.Module, *, lr: float | None = None,
                  weight_decay: float | None = None) -> "LocalEngine":
        """An engine of the same kind for a second network trained beside this one (a recipe's
        discriminator): recipes ask their engine for it instead of naming an engine class."""
        return LocalEngine(module, self.optim_config, self.device, lr=lr, weight_decay=weight_decay)

    def all_finite(self, loss: torch.Tensor) -> bool:
        return bool(torch.isfinite(loss))

    def set_lr_factor(self, factor: float) -> None:
        """The next steps use ``factor`` x the base learning rate (student.schedule)."""
        for g in self.optimizer.param_groups:
            g["lr"] = self.base_lr * factor

    def backward_and_step(self, loss: torch.Tensor) -> torch.Tensor:
        """One optimizer step; returns the gradient norm before clipping.

        A non-finite gradient norm skips the update (as GradScaler does for fp16), so one bad batch cannot
        write NaN into every weight; the caller sees the norm and counts the step as non-finite. The check
        is one host sync per step."""
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip if self.grad_clip > 0 else float("inf"))
        if self.scaler.is_enabled() or bool(torch.isfinite(norm)):
            self.scaler.step(self.optimizer)  # the fp16 scaler skips non-finite steps itself
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    def skip(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def model_state(self) -> dict:
        return self.module.state_dict()

    def save(self, folder: Path, name: str, client_state: dict) -> None:
        torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scaler": self.scaler.state_dict(), "client": client_state}, folder / f"{name}.pt")

    def load(self, folder: Path, name: str, *, optimizer_states: bool = True) -> dict:
        state = ckpt.load(folder / f"{name}.pt", map_location=self.device)  # CRC-checked
        self.module.load_state_dict(state["model"])
        if optimizer_states:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
        return state["client"]
