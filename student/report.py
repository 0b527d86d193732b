"""Pictures of a run, for people: the loss curve and a few validation panoramas with their depth."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("pano_distill.report")


def loss_curve(run_dir: Path) -> Path | None:
    """``loss_curve.png`` from ``metrics.jsonl``: every loss part against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    lines = [x for x in lines if "losses" in x]
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for part in sorted({k for x in lines for k in x["losses"] if not k.startswith("disc_acc")}):
        pts = [(x["step"], x["losses"][part]) for x in lines if part in x["losses"]]
        ax.plot(*zip(*pts), label=part, lw=2 if part == "loss" else 1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (window mean)")
    ax.grid(alpha=0.3)
    ax.legend()
    out = run_dir / "loss_curve.png"
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


@torch.inference_mode()
def depth_preview(run_dir: Path, model: torch.nn.Module, samples, device: torch.device, n: int = 3) -> Path | None:
    """``preview.png``: RGB, ground-truth disparity and predicted disparity (each normalised) of n panoramas."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from student.losses import normalize_disparity
    from panorama import depth_to_disparity

    rows = []
    for s in samples:
        rows.append(s)
        if len(rows) == n:
            break
    if not rows:
        return None
    model.eval()
    fig, axes = plt.subplots(len(rows), 3, figsize=(12, 2.2 * len(rows)), squeeze=False)
    for i, s in enumerate(rows):
        pred = model(s["rgb"][None].to(device)).float().cpu()
        gt = normalize_disparity(depth_to_disparity(s["depth"][None], s["valid"][None]), s["valid"][None])
        pd = normalize_disparity(pred)
        for ax, img, title in zip(axes[i], (s["rgb"].permute(1, 2, 0).numpy(), gt[0, 0].numpy(), pd[0, 0].numpy()),
                                  ("RGB", "ground truth disparity", "predicted disparity")):
            ax.imshow(np.clip(img, 0, 1), cmap=None if img.ndim == 3 else "magma")
            ax.set_title(f"{title} ({s['key']})" if title == "RGB" else title, fontsize=8)
            ax.axis("off")
    out = run_dir / "preview.png"
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
