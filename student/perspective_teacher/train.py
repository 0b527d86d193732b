"""Train a small perspective depth teacher of our own on generated perspective views.

    python -m student.perspective_teacher.train --out DIR [--minutes M] [--views N] [--size S]
        [--arch dpt_hybrid|glpn|depth_anything|dpt] [--seed S] [--clock wall|process] [--init DIR]

We cannot download Depth Anything, so the distillation is demonstrated with a teacher trained here: a
small Hugging Face depth-estimation network, from scratch, on thousands of generated perspective views
with exact depth (``student.perspective_teacher.data``; the paper's "1.5M labeled perspective images" in
miniature). It learns relative disparity with the affine-invariant loss of ``student.losses`` against
``normalize_disparity(1 / planar_depth)`` over valid (non-sky) pixels, with photometric augmentation.

The output folder is an ordinary Hugging Face folder (``save_pretrained`` of the model and of a
``DPTImageProcessor``-type processor with the ImageNet mean/std the network was trained with), so the
teacher server loads it like any other teacher with ``AutoModelForDepthEstimation.from_pretrained`` and
reads ``outputs.predicted_depth`` (B, h, w) as relative disparity (larger = closer). Next to it:
``pano_distill.json`` (input size, architecture, the exact command, validation metrics and baselines),
``README.md``, ``loss_curve.png`` and ``metrics.jsonl``.

Architecture (``--arch``, default ``dpt_hybrid``). Measured at equal compute (5 min of one core's CPU time
for the training loop, ``--clock process``, 2000 training views, 200 held-out views, 128 px; 126 px for
the patch-14 ViT), AbsRel / delta1 after lstsq alignment (random init ~0.26 / 0.55, the mean training
disparity map 0.241 / 0.584):

=================  ======  ================  =============  ======
arch               params  steps in 5 min    AbsRel         delta1
=================  ======  ================  =============  ======
dpt_hybrid         0.86M   720               **0.148**      0.788
dpt (ViT)          1.20M   540               0.165          0.753
depth_anything     1.11M   335               0.178          0.730
glpn               0.93M   400               0.220          0.632
=================  ======  ================  =============  ======

DPT-Hybrid (a small BiT ResNet to stride 16, a 4-layer ViT on its 8 x 8 feature map, DPT's fusion decoder
fed by the ResNet's stride-4 and stride-8 features) learns fastest from scratch: its convolutional path
is cheap and well conditioned, and it takes the most steps per CPU second. The plain ViTs (DPT, Depth
Anything) only learn at all after ``ensure_output_spread`` (without it their initial predictions vary by
1e-7 to 2e-6, below the loss's 1e-6 degeneracy threshold, and DPT stayed at loss 1.0); GLPN's SegFormer
encoder learned slowest (a narrower decoder or 2x-downscaled warm-up steps made it worse, 0.229 and 0.242).
One torch thread is the default: on cores shared with other jobs it ran 3-5x faster than two.

``--minutes`` bounds the whole command (rendering or loading the views, training, final evaluation and
saving): training stops early enough to leave time for the rest. ``--steps`` bounds the number of
optimiser steps instead (tests). Validation: held-out generated views (disjoint scenes), AbsRel and
delta1 after least-squares scale-and-shift alignment of disparity (``student.metrics``, ``align="lstsq"``),
next to trivial baselines: the same network at random initialisation, a constant disparity, and the
per-pixel mean training disparity (a positional prior: floors below, ceilings above).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
import time
from pathlib import Path

import torch

from panorama.depth_math import affine_invariant_loss, depth_metrics
from sharding import cli
from student.perspective_teacher.data import (IMAGE_MEAN, IMAGE_STD, TRAIN_SEED_BASE, VAL_SEED_BASE,
                                             PerspectiveViews, load_views)

log = logging.getLogger(__name__)

ARCHS = ("dpt_hybrid", "glpn", "depth_anything", "dpt")
FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------------- models

def arch_multiple(arch: str) -> int:
    """Input sides must be a multiple of this (total stride of GLPN, patch size of the ViTs)."""
    return {"dpt_hybrid": 16, "glpn": 32, "depth_anything": 14, "dpt": 16}[arch]


def _output_conv(model):
    head = model.head
    if hasattr(head, "conv3"):  # Depth Anything
        return head.conv3
    return head.head[-2] if isinstance(head.head[-1], torch.nn.ReLU) else head.head[-1]  # DPT / GLPN


def _relu_head_bias(model, value: float = 1.0) -> None:
    """Start the output layer of a ReLU-terminated head (DPT, Depth Anything) at a positive bias, so that the
    output is positive everywhere at initialisation instead of starting within 1e-5 of zero, half of it
    clipped by the ReLU."""
    torch.nn.init.constant_(_output_conv(model).bias, value)


@torch.no_grad()
def ensure_output_spread(model, pixel_values: torch.Tensor, min_spread: float = 1e-5,
                         target: float = 1e-3) -> float:
    """Scale the output convolution of a freshly initialised model whose predictions barely vary.

    The affine-invariant loss treats a map whose mean absolute deviation is below 1e-6 as constant and gives
    it no gradient. With Hugging Face's init (std 0.02 everywhere) a from-scratch ViT DPT predicts maps that
    vary by ~1e-7, so it never leaves that state (it stayed at loss 1.0 in our runs), and Depth Anything
    starts at ~2e-6. When the deviation on ``pixel_values`` is below ``min_spread`` the output weights are
    scaled so that it becomes ``target``. Returns the factor (1.0: unchanged; DPT-Hybrid and GLPN start
    near 1e-4 and are left alone)."""
    was_training = model.training
    model.eval()
    y = model(pixel_values=pixel_values).predicted_depth.flatten(1)
    spread = float((y - y.median(dim=1, keepdim=True).values).abs().mean())
    model.train(was_training)
    if spread >= min_spread:
        return 1.0
    factor = target / max(spread, 1e-12)
    _output_conv(model).weight.mul_(factor)
    return factor


def build_model(arch: str, size: int, width: str = "small"):
    """A from-scratch Hugging Face depth model of about 1M parameters (``width="tiny"``: tests)."""
    from transformers import (BitConfig, DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config,
                              DPTConfig, DPTForDepthEstimation, GLPNConfig, GLPNForDepthEstimation)

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    m = arch_multiple(arch)
    if size % m:
        raise ValueError(f"--size {size} must be a multiple of {m} for arch {arch}")
    tiny = width == "tiny"
    if arch == "dpt_hybrid":
        # DPT-Hybrid (Ranftl et al. 2021): a BiT ResNet (weight-standardised convolutions, GroupNorm) to
        # stride 16, a ViT on its 1/16 feature map, and DPT's fusion decoder fed by the ResNet's stride-4 and
        # stride-8 features plus two ViT layers. The convolutional path learns fast from scratch.
        hs = [8, 16, 32] if tiny else [24, 48, 96]
        hid, layers, heads = (32, 2, 2) if tiny else (96, 4, 3)
        bit = BitConfig(layer_type="bottleneck", embedding_size=8 if tiny else 16, hidden_sizes=hs,
                        depths=[1, 1, 1], num_groups=4 if tiny else 8, out_features=["stage1", "stage2", "stage3"],
                        global_padding="same", embedding_dynamic_padding=True)
        cfg = DPTConfig(is_hybrid=True, backbone_config=bit, backbone_featmap_shape=[1, hs[-1], size // 16, size // 16],
                        hidden_size=hid, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=4 * hid, image_size=size, patch_size=16,
                        backbone_out_indices=[0, 1, layers // 2 - 1, layers - 1],
                        neck_hidden_sizes=[hs[0], hs[1], hid, hid], reassemble_factors=[1, 1, 1, 0.5],
                        fusion_hidden_size=16 if tiny else 32, use_auxiliary_head=False, readout_type="project")
        model = DPTForDepthEstimation(cfg)
        _relu_head_bias(model)
        return model
    if arch == "glpn":
        # SegFormer (MiT) encoder, strides 4-8-16-32, efficient attention with spatial reduction; GLPN's
        # light decoder up to full resolution. max_depth=1: the head's sigmoid gives disparity in (0, 1).
        # (The full-resolution decoder and head dominate the cost; a 16-channel decoder with a wider encoder
        # was cheaper per step but learned worse.)
        cfg = GLPNConfig(hidden_sizes=[8, 16, 32, 64] if tiny else [16, 32, 80, 128],
                         depths=[1, 1, 1, 1] if tiny else [2, 2, 2, 2],
                         num_attention_heads=[1, 1, 1, 2] if tiny else [1, 1, 2, 4],
                         sr_ratios=[8, 4, 2, 1], mlp_ratios=[4, 4, 4, 4], patch_sizes=[7, 3, 3, 3],
                         strides=[4, 2, 2, 2], decoder_hidden_size=8 if tiny else 32, max_depth=1,
                         drop_path_rate=0.0)
        return GLPNForDepthEstimation(cfg)
    if arch == "depth_anything":
        hid, layers, heads = (32, 4, 2) if tiny else (96, 4, 3)
        backbone = Dinov2Config(hidden_size=hid, num_hidden_layers=layers, num_attention_heads=heads,
                                intermediate_size=4 * hid, patch_size=14, image_size=size,
                                out_indices=[1, 2, 3, 4], reshape_hidden_states=False,
                                apply_layernorm=True)
        cfg = DepthAnythingConfig(backbone_config=backbone, patch_size=14, reassemble_hidden_size=hid,
                                  neck_hidden_sizes=[8, 16, 32, 32] if tiny else [24, 48, 96, 96],
                                  fusion_hidden_size=16 if tiny else 48, head_hidden_size=8 if tiny else 24,
                                  depth_estimation_type="relative", max_depth=1)
        model = DepthAnythingForDepthEstimation(cfg)
        _relu_head_bias(model)
        return model
    hid, layers, heads = (32, 4, 2) if tiny else (96, 4, 3)
    cfg = DPTConfig(hidden_size=hid, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=4 * hid,
                    image_size=size, patch_size=16, backbone_out_indices=[0, 1, 2, 3],
                    neck_hidden_sizes=[8, 16, 32, 32] if tiny else [24, 48, 96, 96],
                    fusion_hidden_size=16 if tiny else 48, use_auxiliary_head=False)
    model = DPTForDepthEstimation(cfg)
    _relu_head_bias(model)
    return model


def build_processor(size: int, multiple: int):
    """The image processor saved with the model: resize to ``size`` x ``size``, /255, ImageNet mean/std."""
    from transformers import DPTImageProcessorPil

    return DPTImageProcessorPil(do_resize=True, size={"height": size, "width": size}, keep_aspect_ratio=False,
                                ensure_multiple_of=multiple, do_rescale=True, rescale_factor=1 / 255,
                                do_normalize=True, image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD),
                                do_pad=False)


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def predict(model, views: PerspectiveViews, batch_size: int = 32) -> torch.Tensor:
    """Relative disparity (N, S, S) of all ``views`` (no augmentation), resized to the views' size."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(views), batch_size):
        b = views.batch(range(i, min(i + batch_size, len(views))))
        pred = model(pixel_values=b["pixel_values"]).predicted_depth
        if pred.shape[-2:] != b["target"].shape[-2:]:
            pred = torch.nn.functional.interpolate(pred[:, None], size=b["target"].shape[-2:], mode="bilinear",
                                                   align_corners=False)[:, 0]
        out.append(pred.float())
    model.train(was_training)
    return torch.cat(out)


def evaluate_disparity(pred_disp: torch.Tensor, views: PerspectiveViews) -> dict[str, float]:
    """Affine-invariant loss and the depth metrics (lstsq protocol) of predicted disparity for ``views``."""
    b = views.batch(range(len(views)))
    pred_disp = pred_disp.float()
    loss = affine_invariant_loss(pred_disp, b["target"], b["valid"]).item()
    pred_depth = 1.0 / pred_disp.clamp_min(1e-6)
    m = depth_metrics(pred_depth, b["depth"], valid=b["valid"], align="lstsq")
    return {"loss": loss, **m}


def mean_disparity_map(views: PerspectiveViews, limit: int = 2000) -> torch.Tensor:
    """Per-pixel mean of the normalised training disparity (the positional-prior baseline)."""
    b = views.batch(range(min(limit, len(views))))
    return torch.nanmean(b["target"], dim=0)


def baselines(model, train: PerspectiveViews, val: PerspectiveViews,
              start: str = "random_init") -> dict[str, dict[str, float]]:
    """The network before training (``start``: ``random_init``, or ``initial_weights`` with ``--init``), a
    constant disparity and the per-pixel mean training disparity, scored like the trained network."""
    n, s = len(val), val.size
    const = torch.full((n, s, s), 0.5)
    prior = mean_disparity_map(train).nan_to_num(0.5).expand(n, s, s)
    return {start: evaluate_disparity(predict(model, val), val),
            "constant": evaluate_disparity(const, val),
            "mean_train_disparity": evaluate_disparity(prior.clone(), val)}


# ----------------------------------------------------------------------------------------- training

def lr_at(step: int, frac: float, lr: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 5% over the budget fraction ``frac``."""
    w = min(1.0, (step + 1) / max(1, warmup))
    return lr * w * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac))))


def train_loop(model, train: PerspectiveViews, val_small: PerspectiveViews | None, *, seconds: float,
               max_steps: int | None = None, batch_size: int = 16, lr: float = 1e-3, warmup: int = 100,
               seed: int = 0, augment: bool = True, clock=time.monotonic, val_every_s: float = 60.0,
               low_res: float = 0.0, log=None, progress: bool = True) -> dict:
    """Adam on the affine-invariant loss until ``seconds`` of ``clock`` have passed or ``max_steps`` steps.

    The first ``low_res`` fraction of the budget trains on views downscaled 2x (four times cheaper steps;
    the networks here are fully convolutional or interpolate their position embeddings), the rest at the
    full size.

    Returns {"steps", "seconds", "loss" (per step), "val" ([(step, loss)])}; ``log(dict)`` gets one record
    every 10 steps and every validation.
    """
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses, vals = [], []
    t0 = clock()
    last_val = t0
    step = 0
    bar = tqdm(total=max_steps if max_steps else int(seconds), unit="step" if max_steps else "s",
               desc="train teacher", disable=not progress, dynamic_ncols=True)
    shown = 0

    def run_val():
        if val_small is None:
            return None
        vb = val_small.batch(range(len(val_small)))
        v = affine_invariant_loss(predict(model, val_small), vb["target"], vb["valid"]).item()
        vals.append((step, v))
        return v

    while True:
        elapsed = clock() - t0
        if (max_steps is not None and step >= max_steps) or (max_steps is None and elapsed >= seconds):
            break
        frac = step / max_steps if max_steps else elapsed / max(seconds, 1e-9)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, frac, lr, warmup)
        idx = torch.randint(0, len(train), (batch_size,), generator=gen)
        b = train.batch(idx, augment=augment, generator=gen, downscale=2 if frac < low_res else 1)
        pred = model(pixel_values=b["pixel_values"]).predicted_depth
        loss = affine_invariant_loss(pred, b["target"], b["valid"])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        rec = None
        if step % 10 == 0:
            rec = {"step": step, "time_s": round(clock() - t0, 2), "lr": opt.param_groups[0]["lr"],
                   "loss": sum(losses[-10:]) / len(losses[-10:])}
        if val_small is not None and clock() - last_val >= val_every_s:
            last_val = clock()
            rec = rec or {"step": step, "time_s": round(clock() - t0, 2), "lr": opt.param_groups[0]["lr"]}
            rec["val_loss"] = run_val()
        if rec is not None and log is not None:
            log(rec)
        now = step if max_steps else int(clock() - t0)
        if now > shown:
            bar.update(min(now, bar.total) - min(shown, bar.total))
            shown = now
        bar.set_postfix(step=step, loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}", refresh=False)
    bar.close()
    if val_small is not None:
        v = run_val()
        if log is not None:
            log({"step": step, "time_s": round(clock() - t0, 2), "val_loss": v})
    model.eval()
    return {"steps": step, "seconds": clock() - t0, "loss": losses, "val": vals}


def plot_curve(history: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss = history["loss"]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    if loss:
        ax.plot(range(1, len(loss) + 1), loss, color="tab:blue", alpha=0.2, lw=0.6)
        k = max(1, len(loss) // 50)
        sm = [sum(loss[max(0, i - k + 1):i + 1]) / len(loss[max(0, i - k + 1):i + 1]) for i in range(len(loss))]
        ax.plot(range(1, len(loss) + 1), sm, color="tab:blue", label=f"train (mean of {k} steps)")
    if history["val"]:
        s, v = zip(*history["val"])
        ax.plot(s, v, "o-", color="tab:orange", ms=3, label="held-out views")
    ax.set_xlabel("step")
    ax.set_ylabel("affine-invariant loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------------------------------- output

def _fmt(m: dict) -> str:
    return f"AbsRel {m['abs_rel']:.4f}  delta1 {m['delta1']:.4f}  RMSE {m['rmse']:.3f}  loss {m['loss']:.4f}"


ARCH_NOTES = {
    "dpt_hybrid": "DPT-Hybrid (`DPTForDepthEstimation`, `is_hybrid=True`): a small BiT ResNet encoder to stride 16, "
                  "a 4-layer ViT on its feature map, and DPT's fusion decoder",
    "glpn": "GLPN (`GLPNForDepthEstimation`): a SegFormer/MiT hierarchical encoder and GLPN's light decoder",
    "depth_anything": "Depth Anything (`DepthAnythingForDepthEstimation`): a small DINOv2 ViT (patch 14) and the "
                      "DPT head",
    "dpt": "DPT (`DPTForDepthEstimation`): a small ViT (patch 16) and DPT's fusion decoder",
}


def write_readme(out: Path, info: dict) -> None:
    v, b = info["val"], info["baselines"]
    rows = [f"| this model | {v['abs_rel']:.4f} | {v['delta1']:.4f} | {v['rmse']:.3f} | {v['loss']:.4f} |"]
    for name, m in b.items():
        rows.append(f"| baseline: {name.replace('_', ' ')} | {m['abs_rel']:.4f} | {m['delta1']:.4f} | "
                    f"{m['rmse']:.3f} | {m['loss']:.4f} |")
    t = info["train"]
    init_note = f" Initialised from `{info['init']}`." if info.get("init") else ""
    if t["clock"] == "process":
        budget = (f"the training loop ran for {t['train_s'] / 60:.1f} min of CPU time on {t['threads']} thread(s) "
                  f"(`--clock process`); the whole command took {t['wall_s'] / 60:.1f} min of wall time on a "
                  f"machine shared with other jobs")
    else:
        budget = (f"wall time {t['wall_s'] / 60:.1f} min for the whole command ({t['train_s'] / 60:.1f} min of "
                  f"training) on {t['threads']} CPU thread(s)")
    text = f"""# {out.name}: a small perspective depth teacher for generated scenes

A small depth network trained from scratch that predicts **relative disparity** (larger = closer) of a
perspective view: {ARCH_NOTES[info['arch']]}; {info['params']:,} parameters. It stands in for Depth Anything in
pano-distill's demonstrations, where the real foundation model cannot be downloaded. It was trained only
on generated rooms (`sharding.synthetic`), so it is meant for **generated scenes and demos, not real
photographs**.

Load it like any other teacher:

```python
from transformers import AutoModelForDepthEstimation
model = AutoModelForDepthEstimation.from_pretrained("{out.name if out.is_absolute() else out.as_posix()}")
disparity = model(pixel_values=x).predicted_depth  # (B, h, w), relative disparity
```

`x` is RGB in [0, 1], resized to {info['input_size']} x {info['input_size']} and normalised with the ImageNet
mean/std of `preprocessor_config.json`. Input size: {info['input_size']} px (`pano_distill.json`).

## Training

```
{info['command']}
```

{info['trained_on']}.{init_note} Adam (lr {t['lr']}, warm-up then cosine decay), batch {t['batch_size']}, the
affine-invariant loss (`student.losses.affine_invariant_loss`) against `normalize_disparity(1 / depth)`
over valid pixels, random horizontal flips and photometric augmentation (channel permutation, grayscale,
saturation, gains, brightness, contrast, gamma, noise). {t['steps']} steps; {budget}.

## Validation

{info['val_views']} held-out generated views (scenes {VAL_SEED_BASE}+, disjoint from training), depth
metrics after least-squares scale-and-shift alignment of disparity (`student.metrics`, `align="lstsq"`,
0 < depth <= 10 m, sky excluded):

| predictor | AbsRel | delta1 | RMSE (m) | affine-inv. loss |
| --- | --- | --- | --- | --- |
{chr(10).join(rows)}

`loss_curve.png` shows the training and held-out loss; `metrics.jsonl` the logged steps.
"""
    (out / "README.md").write_text(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m student.perspective_teacher.train",
                                description="Train a small perspective depth teacher on generated views.")
    p.add_argument("--out", required=True, help="output folder (Hugging Face save_pretrained layout)")
    p.add_argument("--minutes", type=float, default=25.0,
                   help="wall-clock budget of the whole command, rendering and evaluation included")
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps instead")
    p.add_argument("--views", type=int, default=8000, help="training views")
    p.add_argument("--val-views", type=int, default=200, help="held-out validation views")
    p.add_argument("--size", type=int, default=128, help="input size (multiple of the arch's stride/patch)")
    p.add_argument("--arch", choices=ARCHS, default="dpt_hybrid")
    p.add_argument("--width", choices=("small", "tiny"), default="small", help="tiny: tests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--low-res", type=float, default=0.0,
                   help="fraction of the training budget spent on views downscaled 2x (cheaper steps)")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--cache", default=None,
                   help="view cache folder (default ~/.cache/pano-distill/perspective); '' renders in memory")
    p.add_argument("--workers", type=int, default=2, help="processes that render missing views")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 is several times faster than 2 when the cores are shared)")
    p.add_argument("--clock", choices=("wall", "process"), default="wall",
                   help="wall: --minutes bounds the whole command; process: --minutes is the training "
                        "loop's CPU time divided by --threads (fair architecture comparisons on a shared "
                        "machine; rendering and evaluation come on top)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--init", default=None,
                   help="start from the weights of this teacher folder (same arch and size) instead of random "
                        "initialisation; its arch and input size win over --arch/--size")
    p.add_argument("--log-file", default=None, help="also write the log lines to this file")
    cli.add_common_arguments(p)
    p.add_argument("--save-half", action="store_true",
                   help="store the weights in fp16 (half the size; the teacher server computes in fp32 on CPU, "
                        "and its normalised answers move by < 1e-3)")
    return p.parse_args(argv)


def load_init(folder: str | Path):
    """The model of a teacher folder written by this tool, in float32, with its ``pano_distill.json``."""
    from transformers import AutoModelForDepthEstimation

    folder = Path(folder)
    meta_path = folder / "pano_distill.json"
    if not meta_path.is_file():
        raise cli.UserError(f"--init {folder}: no pano_distill.json (not a folder written by this tool)")
    meta = json.loads(meta_path.read_text())
    return AutoModelForDepthEstimation.from_pretrained(folder).float(), meta


def main(argv=None) -> int:
    train_teacher(argv)
    return 0


def train_teacher(argv=None) -> dict:
    """Run the command (``argv`` as on the command line); returns what ``pano_distill.json`` holds."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    cli.setup_logging(args.log_level, file=args.log_file)
    init_model, init_meta = None, None
    if args.init:
        init_model, init_meta = load_init(args.init)
        args.arch, args.size = init_meta["arch"], int(init_meta["input_size"])
    if args.low_res > 0 and args.arch in ("dpt", "dpt_hybrid"):
        raise cli.UserError(f"--low-res needs an input-size-agnostic model (glpn, depth_anything), not {args.arch}")
    t_start = time.monotonic()
    torch.set_num_threads(max(1, args.threads))
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.quiet
    command = "python -m student.perspective_teacher.train " + shlex.join(argv)

    model = init_model if args.init else build_model(args.arch, args.size, args.width)
    n_params = count_params(model)
    log.info(f"{args.arch} ({args.width}): {n_params:,} parameters, input {args.size} px")

    train = load_views("train", args.views, args.size, args.seed, args.cache, args.workers, progress)
    val = load_views("val", args.val_views, args.size, args.seed, args.cache, args.workers, progress)
    val_small = PerspectiveViews(val.rgb[:64], val.depth[:64])
    t_data = time.monotonic() - t_start
    factor = 1.0 if args.init else ensure_output_spread(model, train.batch(range(min(16, len(train))))["pixel_values"])
    if factor != 1.0:
        log.info(f"initial predictions nearly constant: output layer scaled by {factor:.3g}")

    t0 = time.monotonic()
    base = baselines(model, train, val, "initial_weights" if args.init else "random_init")
    t_eval = time.monotonic() - t0
    for name, m in base.items():
        log.info(f"baseline {name:>22}: {_fmt(m)}")

    metrics_path = out / "metrics.jsonl"
    metrics_file = metrics_path.open("w")

    def log_record(rec):
        metrics_file.write(json.dumps(rec) + "\n")
        metrics_file.flush()

    # leave time for the final evaluation (measured above) and for saving
    reserve = 1.5 * t_eval + 10.0
    seconds = max(0.0, args.minutes * 60.0 - (time.monotonic() - t_start) - reserve)
    clock = time.monotonic
    if args.clock == "process":  # the training loop alone gets --minutes of CPU time (comparisons)
        threads = max(1, args.threads)
        clock = lambda: time.process_time() / threads  # noqa: E731
        seconds = args.minutes * 60.0
    if args.steps is None and seconds <= 0:
        log.warning("no time left for training after loading the views")
    hist = train_loop(model, train, val_small, seconds=seconds, max_steps=args.steps, batch_size=args.batch_size,
                      lr=args.lr, warmup=args.warmup, seed=args.seed, augment=not args.no_augment, clock=clock,
                      val_every_s=max(5.0, seconds / 20) if args.steps is None else 1e9, low_res=args.low_res,
                      log=log_record, progress=progress)
    metrics_file.close()

    val_m = evaluate_disparity(predict(model, val), val)
    log.info(f"after {hist['steps']} steps          : {_fmt(val_m)}")

    model.save_pretrained(out)
    if args.save_half:  # the tensors only: config.json keeps float32, so loading computes in fp32
        from safetensors.torch import load_file, save_file

        weights = out / "model.safetensors"
        save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(weights).items()}, weights,
                  metadata={"format": "pt"})
    build_processor(args.size, arch_multiple(args.arch)).save_pretrained(out)
    plot_curve(hist, out / "loss_curve.png", f"{args.arch}, {n_params / 1e6:.2f}M params, {len(train)} views, "
                                              f"{args.size}px, {hist['steps']} steps")
    wall = time.monotonic() - t_start
    info = {
        "format_version": FORMAT_VERSION,
        "input_size": args.size,
        "arch": args.arch,
        "output": "relative disparity (larger = closer), outputs.predicted_depth (B, h, w)",
        "image_mean": list(IMAGE_MEAN), "image_std": list(IMAGE_STD),
        "params": n_params,
        "trained_on": (f"{len(train)} generated perspective views (sharding.synthetic, styles apartment/house/"
                       f"office, scenes {TRAIN_SEED_BASE}+, one view per scene, yaw any, pitch mostly within "
                       f"+-60 deg and 20% towards +-90, roll up to 45 deg, FOV 60-100 deg, windows on with sky "
                       f"invalid), rendered at {args.size} px"),
        "command": command,
        "init": (f"{args.init} ({init_meta.get('val_abs_rel', float('nan')):.4f} val AbsRel)" if args.init else None),
        "val_abs_rel": val_m["abs_rel"],
        "val_delta1": val_m["delta1"],
        "val_protocol": "lstsq (student.metrics: scale and shift on disparity, then median; 0 < depth <= 10 m)",
        "val_views": len(val),
        "val": val_m,
        "baselines": base,
        "train": {"steps": hist["steps"], "views": len(train), "batch_size": args.batch_size, "lr": args.lr,
                  "seed": args.seed, "augment": not args.no_augment, "low_res": args.low_res,
                  "threads": args.threads,
                  "clock": args.clock, "data_s": round(t_data, 1), "train_s": round(hist["seconds"], 1),
                  "wall_s": round(wall, 1), "final_train_loss": (sum(hist["loss"][-50:]) /
                                                                 max(1, len(hist["loss"][-50:])))},
    }
    (out / "pano_distill.json").write_text(json.dumps(info, indent=2) + "\n")
    write_readme(out, info)
    log.info(f"saved {out} ({wall / 60:.1f} min wall): val AbsRel {val_m['abs_rel']:.4f}, delta1 "
             f"{val_m['delta1']:.4f}; baselines " + ", ".join(f"{k} {m['abs_rel']:.4f}" for k, m in base.items()))
    return info


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
