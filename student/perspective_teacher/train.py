"""Train a small perspective depth teacher of our own on generated perspective views.

    python -m student.perspective_teacher.train --out DIR [--minutes M] [--views N] [--size S]
        [--arch dpt_hybrid|glpn|depth_anything|dpt] [--seed S] [--clock wall|process] [--init DIR]

We cannot download Depth Anything, so the distillation is demonstrated with a teacher trained here: a
small Hugging Face depth-estimation network, from scratch, on thousands of generated perspective views
with exact depth (``student.perspective_teacher.data``; the paper's "1.5M labeled perspective images" in
miniature). It learns relative disparity with the affine-invariant loss of ``panorama.depth_math`` against
``normalize_disparity(1 / planar_depth)`` over valid (non-sky) pixels, with photometric augmentation.

The output folder is an ordinary Hugging Face folder (``save_pretrained`` of the model and of a
``DPTImageProcessor``-type processor with the ImageNet mean/std the network was trained with), so the
teacher server loads it like any other teacher with ``AutoModelForDepthEstimation.from_pretrained`` and
reads ``outputs.predicted_depth`` (B, h, w) as relative disparity (larger = closer). Next to it:
``pano_distill.json`` (input size, architecture, the exact command, validation metrics and baselines),
``README.md``, ``loss_curve.png`` and ``metrics.jsonl``.

Architecture (``--arch``, default ``dpt_hybrid``). Measured at equal compute (5 min of one core's CPU time
for the training loop, ``--clock process``, 2000 training views, 200 held-out views, 128 px; 126 px for
the patch-14 ViT), AbsRel / delta1 after lstsq alignment (measured with the protocol's earlier variant, which
clamped disparity before the median step; random init ~0.26 / 0.55, the mean training
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
delta1 under the reference code's lstsq protocol (``panorama.depth_math``, ``align="lstsq"``),
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
from student.perspective_teacher.data import (IMAGE_MEAN, IMAGE_STD, TRAIN_SEED_BASE, VARIETIES, PerspectiveViews,
                                               load_views)
from student.perspective_teacher.models import (ARCHS, arch_multiple, build_model, build_processor,  # noqa: F401
                                                count_params, ensure_output_spread)
from student.perspective_teacher.report import _fmt, plot_curve, write_readme

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
BROAD_NOTE = (", half of the scenes from broad_style: rooms 2.5-16 m, ceilings 2.3-4 m, 0-24 pieces of "
              "furniture, random lights and palettes")


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
               low_res: float = 0.0, resample: float = 0.0, log=None, progress: bool = True) -> dict:
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
        b = train.batch(idx, augment=augment, generator=gen, downscale=2 if frac < low_res else 1,
                          resample=resample)
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
    p.add_argument("--resample", type=float, default=0.0,
                   help="probability that a training view's RGB is halved and resized back (bicubic): the "
                        "blur of a cube face rendered at half the teacher's input size, as the reproduction's "
                        "64-px faces are for a 128-px teacher")
    p.add_argument("--variety", choices=VARIETIES, default="styles",
                   help="training scenes: styles = the three named styles; broad = half of them from "
                        "sharding.synthetic_scenes.broad_style (room size, clutter, lights, palettes); "
                        "validation views stay 'styles' so that teachers compare")
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

    train = load_views("train", args.views, args.size, args.seed, args.cache, args.workers, progress,
                       variety=args.variety)
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
                      resample=args.resample, log=log_record, progress=progress)
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
                       f"office{BROAD_NOTE if args.variety == 'broad' else ''}, scenes {TRAIN_SEED_BASE}+, one "
                       "view per scene, yaw any, pitch mostly within "
                       f"+-60 deg and 20% towards +-90, roll up to 45 deg, FOV 60-100 deg, windows on with sky "
                       f"invalid), rendered at {args.size} px"),
        "command": command,
        "init": (f"{args.init} ({init_meta.get('val_abs_rel', float('nan')):.4f} val AbsRel)" if args.init else None),
        "val_abs_rel": val_m["abs_rel"],
        "val_delta1": val_m["delta1"],
        "val_protocol": "lstsq (panorama.depth_math: the reference code's scale and shift on disparity, then "
                        "median, clamp to [0.1, 10]; 0 < depth <= 10 m)",
        "val_views": len(val),
        "val": val_m,
        "baselines": base,
        "train": {"steps": hist["steps"], "views": len(train), "batch_size": args.batch_size, "lr": args.lr,
                  "seed": args.seed, "augment": not args.no_augment, "low_res": args.low_res,
                  "resample": args.resample, "threads": args.threads,
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
