"""DeepSpeed data-parallel engine with the same methods as ``student.engine.LocalEngine``.

Choices, and why:

* fp32 master weights with ``torch.autocast(bf16)`` in the step on GPU (the same AMP as one process),
  rather than DeepSpeed's bf16 mode that casts the weights: one step code path, and fp32 gradients in the
  all-reduce. CPU workers use fp32 and the gloo backend.
* ``torch_adam``: no fused/CPU-Adam extension to compile; ZeRO stages 0-2 are configurable.
* ``gradient_clipping`` is always set (DeepSpeed 0.19 defaults it to 1.0 silently).
* A non-finite loss must be skipped by *every* rank or by none: a rank that skips backward while its
  peers all-reduce would hang them. ``all_finite`` agrees on it with one all-reduce.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch
from torch import nn

from student.config import OptimConfig


def deepspeed_config(optim: OptimConfig, zero_stage: int, micro_batch: int, *, lr: float | None = None,
                     weight_decay: float | None = None) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "Adam", "params": {
            "lr": optim.lr if lr is None else lr, "betas": list(optim.betas),
            "weight_decay": optim.weight_decay if weight_decay is None else weight_decay, "torch_adam": True}},
        "gradient_clipping": optim.grad_clip if optim.grad_clip > 0 else 0.0,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


STALE_BUILD_LOCK_S = 900.0  # the extension builds in about 40 s; a lock this old belongs to a killed build


def clear_stale_build_locks(root: Path, max_age_s: float = STALE_BUILD_LOCK_S) -> list[Path]:
    """Remove torch's extension-build lock files older than ``max_age_s`` under ``root`` (named in a warning).

    torch (``FileBaton``) waits without end while another process's build holds ``<ext>/lock``; a build that
    was killed (a timed-out job, a lost node) never removes it, and every later run would hang silently."""
    import logging
    import time

    removed = []
    for lock in sorted(Path(root).glob("*/lock")) if Path(root).is_dir() else []:
        try:
            age = time.time() - lock.stat().st_mtime
            if age > max_age_s:
                lock.unlink()
                removed.append(lock)
                logging.getLogger(__name__).warning(
                    f"removed a stale extension-build lock {lock} ({age / 60:.0f} min old: its build was killed)")
        except FileNotFoundError:  # another process finished or removed it meanwhile
            continue
    return removed


def init_distributed(device: torch.device) -> None:
    """Join (or reuse) the process group: Ray Train has usually created it already."""
    import deepspeed

    # DeepSpeed JIT-builds its CPU communication extension on first use. One build folder per Python
    # environment: two checkouts sharing one folder rebuilt it back and forth (its build file names the
    # environment's paths), and a build killed meanwhile left torch's lock file, on which every later build
    # waits forever.
    env_key = hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
    os.environ.setdefault("TORCH_EXTENSIONS_DIR",
                          str(Path("~/.cache/pano-distill/torch_extensions").expanduser() / env_key))
    clear_stale_build_locks(Path(os.environ["TORCH_EXTENSIONS_DIR"]))
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)


class DeepSpeedEngine:
    kind = "deepspeed"

    def __init__(self, module: nn.Module, optim: OptimConfig, device: torch.device, *, zero_stage: int = 0,
                 micro_batch: int = 1, lr: float | None = None, weight_decay: float | None = None):
        import deepspeed
        import torch.distributed as dist

        init_distributed(device)
        self.device = device
        self.optim_config, self.zero_stage, self.micro_batch = optim, zero_stage, micro_batch
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        module = module.to(device)
        params = [p for p in module.parameters() if p.requires_grad]
        self.base_lr = optim.lr if lr is None else lr
        config = deepspeed_config(optim, zero_stage, micro_batch, lr=lr, weight_decay=weight_decay)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=module, model_parameters=params, config=config)
        self.module = self.engine  # forward through the engine; it is an nn.Module
        from student.engine import amp_dtype

        self.amp = amp_dtype(optim.amp, device)

    def companion(self, module: nn.Module, *, lr: float | None = None,
                  weight_decay: float | None = None) -> "DeepSpeedEngine":
        """A second data-parallel engine (same ZeRO stage and micro batch) for a network trained beside the
        student, e.g. a recipe's discriminator; see ``student.engine.LocalEngine.companion``."""
        return DeepSpeedEngine(module, self.optim_config, self.device, zero_stage=self.zero_stage,
                               micro_batch=self.micro_batch, lr=lr, weight_decay=weight_decay)

    def all_finite(self, loss: torch.Tensor) -> bool:
        import torch.distributed as dist

        flag = torch.tensor([1.0 if bool(torch.isfinite(loss)) else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() > 0.5)

    def set_lr_factor(self, factor: float) -> None:
        """As LocalEngine's; DeepSpeed's optimizer (or its ZeRO wrapper) exposes the same param_groups."""
        for g in self.optimizer.param_groups:
            g["lr"] = self.base_lr * factor

    def backward_and_step(self, loss: torch.Tensor) -> torch.Tensor:
        self.engine.backward(loss)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return torch.as_tensor(0.0 if norm is None else float(norm))

    def skip(self) -> None:
        self.engine.zero_grad()

    def model_state(self) -> dict:
        return self.engine.module.state_dict()

    def save(self, folder: Path, name: str, client_state: dict) -> None:
        """DeepSpeed's own checkpoint, written by every rank into ``folder/name``."""
        self.engine.save_checkpoint(str(folder), tag=name, client_state=client_state)

    def load(self, folder: Path, name: str, *, optimizer_states: bool = True) -> dict:
        path, client = self.engine.load_checkpoint(str(folder), tag=name, load_optimizer_states=optimizer_states,
                                                   load_lr_scheduler_states=optimizer_states)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint {name!r} in {folder}")
        return client or {}
