"""Parameter and FLOP counts of the student networks.

``forward_flops`` runs one real forward pass of batch 1 under ``torch.utils.flop_counter.FlopCounterMode``,
which counts from the shapes of the matrix-product operators (convolutions, transposed convolutions,
linear layers, matmuls) with **FLOPs = 2 x multiply-accumulates**. Element-wise work (BatchNorm,
activations, pooling, interpolation and the cube <-> equirect ``grid_sample``) is not counted; it is a
few percent at most, and the usual paper counters (thop, fvcore) skip it too.

MACs vs FLOPs. Counters like thop report multiply-accumulates and papers often print them as "FLOPs".
The anchors quoted for these models (UniFuse-R18 ~125 G, BiFuse++-R34 ~174 G at 512x1024) agree with
our 2 x MAC counts for the same architectures (see docs/MODELS.md), i.e. they are real FLOPs, not MACs:
the ratio anchor / ours is ~1, not ~0.5.

``train_step_flops = 3 x forward``: the backward pass computes, for every matrix product, the gradient
with respect to its input and with respect to its weight, each costing about one forward product; hence
backward ~ 2 x forward and forward + backward ~ 3 x forward (the usual 6N-per-token rule of transformers
is the same factor). Layers that need no input gradient (the first convolution) make it a slight
overestimate.

CLI: ``python -m student.flops --model unifuse --encoder resnet18 --height 512`` prints parameters and
GFLOPs; ``--table`` prints the markdown table of docs/MODELS.md.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

TRAIN_STEP_FACTOR = 3  # forward + backward (~2 x forward)


def param_count(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared tensors counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def forward_flops(model: nn.Module, height: int, width: int | None = None, *, batch: int = 1) -> int:
    """FLOPs (2 x MACs) of one forward pass on a (batch, C, height, width) input; width defaults to 2H.

    ``C`` is ``model.in_channels`` (3 for the students, 1 for the discriminator). The model runs in eval
    mode (restored afterwards) without autograd, on the device and dtype of its parameters.
    """
    width = 2 * height if width is None else width
    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    x = torch.rand(batch, getattr(model, "in_channels", 3), height, width, device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def train_step_flops(model: nn.Module, height: int, width: int | None = None, *, batch: int = 1) -> int:
    """FLOPs of one training step (forward + backward) = 3 x ``forward_flops``."""
    return TRAIN_STEP_FACTOR * forward_flops(model, height, width, batch=batch)


# ------------------------------------------------------------------------------------------------ CLI

TABLE_ROWS = (("unifuse", "resnet18"), ("unifuse", "resnet34"), ("bifusepp", "resnet18"),
              ("bifusepp", "resnet34"), ("rectnet", ""), ("unifuse", "resnet_small"), ("unifuse_tiny", ""), ("bifusepp_tiny", ""),
              ("rectnet_tiny", ""))
ANCHORS = {("unifuse", "resnet18"): (30.8, 125.0), ("bifusepp", "resnet34"): (52.5, 174.0)}


def _build(name: str, encoder: str) -> nn.Module:
    from student.models import build_model

    return build_model(name, encoder=encoder)


def table(height: int = 512) -> str:
    lines = [f"| model | encoder | params (M) | forward GFLOPs @ {height}x{2 * height} | GMACs | "
             f"train-step GFLOPs (3x) | paper anchor (params M / GFLOPs) |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for name, encoder in TABLE_ROWS:
        torch.manual_seed(0)
        model = _build(name, encoder)
        fl = forward_flops(model, height)
        enc = encoder or getattr(model, "encoder_arch", "-")
        anchor = ANCHORS.get((name, encoder))
        anchor_s = f"{anchor[0]} / {anchor[1]}" if anchor else ""
        lines.append(f"| {name} | {enc} | {param_count(model) / 1e6:.2f} | {fl / 1e9:.1f} | {fl / 2e9:.1f} | "
                     f"{TRAIN_STEP_FACTOR * fl / 1e9:.1f} | {anchor_s} |")
        print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m student.flops", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="unifuse", help="registry name (student.models.MODEL_NAMES)")
    ap.add_argument("--encoder", default="", help="resnet18 | resnet34 | resnet_small | resnet_tiny; empty: the model's default")
    ap.add_argument("--height", type=int, default=512, help="panorama height; width is 2 x height")
    ap.add_argument("--table", action="store_true", help="print the markdown table of all models instead")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.table:
        print(table(args.height))
        return 0
    model = _build(args.model, args.encoder)
    fl = forward_flops(model, args.height)
    enc = args.encoder or getattr(model, "encoder_arch", "-")
    print(f"model {args.model} encoder {enc} input {args.height}x{2 * args.height}")
    print(f"params {param_count(model) / 1e6:.2f} M")
    print(f"forward {fl / 1e9:.1f} GFLOPs ({fl / 2e9:.1f} GMACs); train step {TRAIN_STEP_FACTOR * fl / 1e9:.1f} GFLOPs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
