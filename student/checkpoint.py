"""Checkpoints of a run directory: ``<run>/checkpoints/step_0000100/`` plus a ``latest`` pointer.

A checkpoint folder holds ``model.pt`` (the student's state dict, enough for evaluate/predict),
``config.yaml`` (the resolved run configuration) and the engine's training state (optimizer, step, RNG,
data position: ``trainer.pt`` for one process, DeepSpeed's own files in cluster mode). Folders are
written under a temporary name and renamed when complete, and ``latest`` is replaced atomically, so a
run killed while saving resumes from the previous complete checkpoint. Everything loads with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

_STEP_DIR = re.compile(r"^step_(\d{7,})$")


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: str | Path, step: int) -> Path:
    return checkpoint_root(run_dir) / f"step_{step:07d}"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    root = checkpoint_root(run_dir)
    pointer = root / "latest"
    if pointer.is_file():
        cand = root / pointer.read_text().strip()
        if cand.is_dir():
            return cand
    steps = sorted((int(m.group(1)), p) for p in root.glob("step_*") if (m := _STEP_DIR.match(p.name)) and p.is_dir())
    return steps[-1][1] if steps else None


def begin(run_dir: str | Path, step: int) -> Path:
    """A fresh temporary folder to write checkpoint ``step`` into; ``commit`` publishes it."""
    tmp = checkpoint_root(run_dir) / f".tmp_step_{step:07d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(run_dir: str | Path, tmp: Path, step: int, keep: int) -> Path:
    final = step_dir(run_dir, step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = checkpoint_root(run_dir) / "latest"
    tmp_pointer = pointer.with_suffix(".tmp")
    tmp_pointer.write_text(final.name + "\n")
    os.replace(tmp_pointer, pointer)
    _prune(run_dir, keep)
    return final


def _prune(run_dir: str | Path, keep: int) -> None:
    if keep <= 0:
        return
    root = checkpoint_root(run_dir)
    steps = sorted((int(m.group(1)), p) for p in root.glob("step_*") if (m := _STEP_DIR.match(p.name)))
    for _, p in steps[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def rng_state() -> dict:
    """Python, NumPy and torch RNG states as plain types and tensors (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resolve_model_file(path: str | Path) -> Path:
    """A run folder, a checkpoint folder, or a ``model.pt`` file -> the ``model.pt`` to load."""
    p = Path(path)
    if p.is_file():
        return p
    if (p / "model.pt").is_file():
        return p / "model.pt"
    latest = latest_checkpoint(p)
    if latest is not None and (latest / "model.pt").is_file():
        return latest / "model.pt"
    raise FileNotFoundError(f"no checkpoint found at {p}: expected a run folder with checkpoints/, "
                            "a checkpoints/step_* folder, or a model.pt file")


def load_model_state(path: str | Path, map_location="cpu") -> tuple[dict, Path]:
    f = resolve_model_file(path)
    state = torch.load(f, map_location=map_location, weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{f} does not hold a state dict")
    return state, f
