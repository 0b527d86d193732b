"""Seam metrics of bench/mechanism.py: do cube-face borders show in a 360 disparity map?

The definitions (seam ratio, error seam ratio, interior ratio, face scale spread) are given in
``bench/mechanism.py``'s docstring; this module computes them and draws the figure.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import torch

FACE_SIDE, FACE_CAP = 0, 1


def face_labels(height: int, width: int) -> torch.Tensor:
    from panorama import equirect_directions, ray_face_coords

    face, _, _ = ray_face_coords(equirect_directions(height, width, dtype=torch.float64))
    return face  # (H, W) in F, R, B, L, U, D order


def seam_pairs(height: int, width: int, offset: int = 2) -> dict[str, torch.Tensor]:
    """Flat pixel indices of border pairs, their flanking pairs (the border pair shifted by ``offset`` pixels
    to either side along its direction) and all same-face pairs (see the module docstring)."""
    face = face_labels(height, width)
    ii, jj = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")

    def flat(i, j):
        return i * width + (j % width)

    bp, bq, btype, fa, fb, ftype, ia, ib = [], [], [], [], [], [], [], []
    for di, dj in ((0, 1), (1, 0)):
        rows = height - di  # vertical pairs stop at the last row; horizontal ones wrap in longitude
        i, j = ii[:rows], jj[:rows]
        p, q = flat(i, j), flat(i + di, j + dj)
        fp, fq = face.flatten()[p], face.flatten()[q]
        same = fp == fq
        ia.append(p[same])
        ib.append(q[same])
        border = ~same
        kind = torch.where((fp < 4) & (fq < 4), FACE_SIDE, FACE_CAP)
        bp.append(p[border])
        bq.append(q[border])
        btype.append(kind[border])
        # flanking pairs: the border pair shifted by -offset and +offset steps, kept if it lies on one face
        k = offset
        for (a_i, a_j, b_i, b_j) in ((i - k * di, j - k * dj, i + di - k * di, j + dj - k * dj),
                                     (i + k * di, j + k * dj, i + di + k * di, j + dj + k * dj)):
            inside = border & (a_i >= 0) & (b_i < height) & (a_i < height) & (b_i >= 0)
            a, b = flat(a_i.clamp(0, height - 1), a_j), flat(b_i.clamp(0, height - 1), b_j)
            inside = inside & (face.flatten()[a] == face.flatten()[b])
            fa.append(a[inside])
            fb.append(b[inside])
            ftype.append(kind[inside])
    cat = torch.cat
    return {"border_p": cat(bp), "border_q": cat(bq), "border_type": cat(btype), "flank_a": cat(fa),
            "flank_b": cat(fb), "flank_type": cat(ftype), "inner_a": cat(ia), "inner_b": cat(ib), "face": face}


class SeamAccumulator:
    """Sums of |jump| and counts per pair class, pooled over images."""

    KEYS = ("border", "border_side", "border_cap", "flank", "flank_side", "flank_cap", "inner")

    def __init__(self):
        self.sums = {k: 0.0 for k in self.KEYS}
        self.counts = {k: 0 for k in self.KEYS}

    def add(self, d: torch.Tensor, ok: torch.Tensor, pairs: dict) -> None:
        """``d`` (H, W) map, ``ok`` (H, W) validity."""
        d, ok = d.flatten().double(), ok.flatten()

        def acc(key, a, b, sel=None):
            if sel is not None:
                a, b = a[sel], b[sel]
            keep = ok[a] & ok[b]
            self.sums[key] += float((d[a] - d[b]).abs()[keep].sum())
            self.counts[key] += int(keep.sum())

        p, q, t = pairs["border_p"], pairs["border_q"], pairs["border_type"]
        acc("border", p, q)
        acc("border_side", p, q, t == FACE_SIDE)
        acc("border_cap", p, q, t == FACE_CAP)
        a, b, t = pairs["flank_a"], pairs["flank_b"], pairs["flank_type"]
        acc("flank", a, b)
        acc("flank_side", a, b, t == FACE_SIDE)
        acc("flank_cap", a, b, t == FACE_CAP)
        acc("inner", pairs["inner_a"], pairs["inner_b"])

    def mean(self, key: str) -> float:
        return self.sums[key] / self.counts[key] if self.counts[key] else math.nan

    def result(self) -> dict[str, float]:
        m = self.mean

        def ratio(a: str, b: str) -> float:
            return m(a) / m(b) if m(b) > 0 else math.nan  # nan for a map without jumps (the exact truth)

        return {"seam_ratio": ratio("border", "flank"), "seam_ratio_side": ratio("border_side", "flank_side"),
                "seam_ratio_cap": ratio("border_cap", "flank_cap"), "interior_ratio": ratio("border", "inner"),
                "border_jump": m("border"), "flank_jump": m("flank"), "pairs_border": self.counts["border"],
                "pairs_flank": self.counts["flank"]}


def median_normalised(disp: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    med = disp[ok].median() if bool(ok.any()) else torch.tensor(1.0)
    return disp / med.clamp_min(1e-12)


def face_scale_spread(d_pred: torch.Tensor, d_gt: torch.Tensor, ok: torch.Tensor, face: torch.Tensor) -> float:
    logs = []
    for k in range(6):
        m = ok & (face == k) & (d_pred > 0)
        if int(m.sum()) >= 20:
            logs.append(float(torch.log(d_gt[m] / d_pred[m]).median()))
    return statistics.pstdev(logs) if len(logs) >= 2 else math.nan


def score_ground_truth(samples: list[dict], pairs: dict, seed: int = 0) -> tuple[dict, dict]:
    """Seam metrics of the exact disparity, and of a positive control: the exact disparity times a random
    scale in [0.8, 1.25] per unrotated face (what an unconstrained per-face solution could look like)."""
    seam, control, control_err = SeamAccumulator(), SeamAccumulator(), SeamAccumulator()
    gen = torch.Generator().manual_seed(seed)
    spreads = []
    for s in samples:
        gt = s["depth"][0]
        ok = s["valid"][0].bool() & (gt > 0) & (gt <= 10.0) & torch.isfinite(gt)
        d_gt = torch.where(ok, 1.0 / gt.clamp_min(1e-6), torch.zeros_like(gt))
        dn = median_normalised(d_gt, ok)
        seam.add(dn, ok, pairs)
        scale = torch.exp(torch.empty(6).uniform_(math.log(0.8), math.log(1.25), generator=gen))[pairs["face"]]
        d_c = d_gt * scale
        control.add(median_normalised(d_c, ok), ok, pairs)
        control_err.add(median_normalised(d_c, ok) - dn, ok, pairs)
        spreads.append(face_scale_spread(d_c, d_gt, ok, pairs["face"]))
    c = control.result()
    c["error_seam_ratio"] = control_err.result()["seam_ratio"]
    c["face_scale_spread"] = statistics.fmean(spreads)
    return seam.result(), c


# ------------------------------------------------------------------------------------------ pictures

def jump_map(d: torch.Tensor) -> torch.Tensor:
    dx = (torch.roll(d, -1, -1) - d).abs()
    dy = torch.cat([(d[1:] - d[:-1]).abs(), torch.zeros_like(d[:1])], 0)
    return torch.maximum(dx, dy)


def draw_figure(path: Path, sample: dict, panels: list[tuple[str, torch.Tensor]], face: torch.Tensor) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    gt = sample["depth"][0]
    ok = sample["valid"][0].bool() & (gt > 0) & (gt <= 10.0)
    d_gt = median_normalised(torch.where(ok, 1.0 / gt.clamp_min(1e-6), torch.zeros_like(gt)), ok)
    maps = [("ground truth", d_gt)] + [(t, median_normalised(d, ok)) for t, d in panels]
    below = torch.cat([face[1:] != face[:-1], torch.zeros_like(face[:1], dtype=torch.bool)], 0)
    border = (face != torch.roll(face, -1, -1)) | below
    overlay = np.ma.masked_where(~border.numpy(), np.ones(face.shape))
    vmin, vmax = np.percentile(d_gt[ok].numpy(), [2, 98])
    n = len(maps) + 1
    fig, axes = plt.subplots(2, n, figsize=(3.2 * n, 4.4), constrained_layout=True)
    axes[0, 0].imshow(sample["rgb"].permute(1, 2, 0).numpy())
    axes[0, 0].set_title("RGB (held-out scene)", fontsize=9)
    axes[1, 0].imshow(overlay, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    axes[1, 0].set_title("unrotated cube face borders", fontsize=9)
    jmax = float(np.percentile(jump_map(d_gt).numpy(), 99)) * 1.5
    for c, (title, d) in enumerate(maps, start=1):
        axes[0, c].imshow(d.numpy(), cmap="magma", vmin=vmin, vmax=vmax, interpolation="nearest")
        axes[0, c].imshow(overlay, cmap="cool", alpha=0.35, interpolation="nearest")
        axes[0, c].set_title(f"{title}: disparity / median", fontsize=9)
        axes[1, c].imshow(jump_map(d).numpy(), cmap="viridis", vmin=0, vmax=jmax, interpolation="nearest")
        axes[1, c].set_title(f"{title}: |jump| to right/lower neighbour", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.savefig(path, dpi=110)
    plt.close(fig)
