"""bench/gpu.py's measuring kit: sizes, the timer, FLOP figures and MFU, synthetic batches.

FLOP figures (see bench/gpu.py): the *anchor* ones are published counts (the Depth Anything V2 teachers'
FLOPs per panorama in ``teacher_server.models.TFLOP_PER_PANORAMA``; the students' papers' forward GFLOPs in
``student.flops.ANCHORS``), the *counted* ones come from ``torch.utils.flop_counter``.
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import Callable

import torch

from student.config import OptimConfig
from student.engine import LocalEngine
from student.flops import ANCHORS as STUDENT_FORWARD_ANCHORS, TRAIN_STEP_FACTOR
from student.models import build_model
from teacher_server.models import TFLOP_PER_PANORAMA

TEACHER_ANCHOR_INPUT = 518  # the published teacher FLOPs are for 518 x 518 faces
STUDENT_ANCHOR_HEIGHT = 512  # the papers' student FLOPs are for 512 x 1024 panoramas
GOAL_TEACHER_MFU = 0.40
GOAL_FULL_OVER_PARTS = 1.10
# HBM bandwidth (GB/s) for the projections' bandwidth utilisation; first match in the card's name wins.
PEAK_GBS = (("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100", 3350.0), ("A100", 2039.0), ("L40S", 864.0),
            ("RTX 4090", 1008.0))


# ------------------------------------------------------------------------------------------ sizes


def sizes(tiny: bool) -> dict:
    """Everything that differs between the real run and the CPU smoke run."""
    if tiny:
        return dict(
            teachers=[("tiny-random", "tiny-random", None)], teacher_input=56, teacher_batches={"tiny-random": [12]},
            eager_row="tiny-random",
            students=[("unifuse_tiny", "", None), ("bifusepp_tiny", "", None)], height=64, student_batches=[2],
            formats=["nchw", "channels_last"], face=32, full_teacher="tiny-random", full_student=("unifuse_tiny", ""),
            proj_batch=2, warmup=1, repeats=3, max_seconds=3.0, rounds=1)
    return dict(
        teachers=[("DA-V2-S", "random:small", "small"), ("DA-V2-B", "random:base", "base"),
                  ("DA-V2-L", "random:large", "large")],
        teacher_input=518,
        teacher_batches={"random:small": [24, 48, 96], "random:base": [24, 48, 96], "random:large": [12, 24, 48]},
        eager_row="random:small",
        students=[("unifuse", "resnet18", ("unifuse", "resnet18")), ("bifusepp", "resnet34", ("bifusepp", "resnet34"))],
        height=512, student_batches=[6, 16], formats=["nchw", "channels_last"], face=256,
        full_teacher="random:small", full_student=("unifuse", "resnet18"),
        proj_batch=8, warmup=3, repeats=10, max_seconds=20.0, rounds=2)


# ------------------------------------------------------------------------------------------ timing


class Bench:
    def __init__(self, device: torch.device, warmup: int, repeats: int, max_seconds: float, budget_s: float):
        self.device, self.warmup, self.repeats, self.max_seconds = device, warmup, repeats, max_seconds
        self.t_start = time.perf_counter()
        self.budget_s = budget_s

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t_start)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_memory(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def max_mem_gb(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.cuda else None

    def times(self, fn: Callable[[], object], *, warmup: int | None = None, repeats: int | None = None) -> list[float]:
        """Seconds of each timed call of ``fn`` (after ``warmup`` untimed calls), synchronised around each;
        stops early (after at least 3 calls) once ``max_seconds`` have gone."""
        for _ in range(self.warmup if warmup is None else warmup):
            fn()
        self.sync()
        out: list[float] = []
        t_begin = time.perf_counter()
        n = self.repeats if repeats is None else repeats
        for i in range(n):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            out.append(time.perf_counter() - t0)
            if i >= 2 and time.perf_counter() - t_begin > self.max_seconds:
                break
        return out


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def guard(bench: Bench, what: str, fn: Callable[[], dict], *, need_s: float = 0.0) -> dict:
    """Run one measurement; OOM and an exhausted time budget are reported in the row, not raised."""
    if bench.left() < need_s:
        return {"skipped": f"time budget ({bench.budget_s:.0f} s) spent"}
    bench.reset_memory()
    try:
        row = fn()
    except Exception as err:  # noqa: BLE001 - one failed row must not lose the others
        if not is_oom(err):
            raise
        row = {"error": "OOM", "detail": str(err).splitlines()[0][:200]}
    if "error" not in row and bench.cuda:
        row["max_mem_gb"] = bench.max_mem_gb()
    bench.reset_memory()
    print(f"  {what}: {short(row)}", flush=True)
    return row


def short(row: dict) -> str:
    keys = ("faces_per_s", "panoramas_per_s", "ms", "mfu", "gbs", "error", "skipped", "max_mem_gb")
    parts = []
    for k in keys:
        v = row.get(k)
        if v is None:
            continue
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


# ------------------------------------------------------------------------------------------ FLOPs


def teacher_counted_flops_per_pano(teacher, input_size: int, device: torch.device) -> int:
    """FLOPs of six faces at ``input_size`` through the teacher's model, counted with eager attention
    (its bmm products are counted everywhere; SDPA kernels are not, e.g. on the CPU)."""
    from torch.utils.flop_counter import FlopCounterMode

    backbone = getattr(teacher.model, "backbone", None)
    before = getattr(getattr(backbone, "config", None), "_attn_implementation", None)
    if before is not None:
        backbone.set_attn_implementation("eager")
    try:
        x = torch.rand(6, 3, input_size, input_size, device=device)
        counter = FlopCounterMode(display=False)
        with counter:
            teacher.raw(x)
        return int(counter.get_total_flops())
    finally:
        if before is not None:
            backbone.set_attn_implementation(before)


def set_teacher_attention(teacher, impl: str) -> str:
    """Set the Dinov2 backbone's attention implementation; returns what is in effect."""
    backbone = getattr(teacher.model, "backbone", None)
    if backbone is None or not hasattr(backbone, "set_attn_implementation"):
        return "n/a"
    backbone.set_attn_implementation(impl)
    return str(backbone.config._attn_implementation)


def teacher_anchor(size: str | None, input_size: int) -> float | None:
    """Published FLOPs per panorama (six faces) of DA-V2 ``size`` (``TFLOP_PER_PANORAMA``); they hold
    at 518 x 518 only."""
    if size not in TFLOP_PER_PANORAMA or input_size != TEACHER_ANCHOR_INPUT:
        return None
    return TFLOP_PER_PANORAMA[size] * 1e12


def student_anchor(key, height: int) -> float | None:
    """3 x the paper's forward FLOPs (``student.flops.ANCHORS``: (params M, GFLOPs) at 512 x 1024)."""
    if key not in STUDENT_FORWARD_ANCHORS or height != STUDENT_ANCHOR_HEIGHT:
        return None
    return TRAIN_STEP_FACTOR * STUDENT_FORWARD_ANCHORS[key][1] * 1e9


def mfu_fields(items_per_s: float, anchor: float | None, counted: float | None, peak_flops: float,
               primary: str) -> dict:
    """Both MFUs (anchor, counted) and the headline one (``primary`` if available, else the other)."""
    out = {"flops_per_item_anchor": anchor, "flops_per_item_counted": counted,
           "mfu_anchor": items_per_s * anchor / peak_flops if anchor else None,
           "mfu_counted": items_per_s * counted / peak_flops if counted else None}
    basis = primary if out[f"mfu_{primary}"] is not None else ("counted" if primary == "anchor" else "anchor")
    out["mfu"], out["mfu_basis"] = out[f"mfu_{basis}"], basis
    out["tflops"] = items_per_s * (anchor if basis == "anchor" else counted) / 1e12
    return out


# ------------------------------------------------------------------------------------------ data


def make_half(n: int, height: int, device: torch.device, seed: int, labeled: bool) -> dict:
    g = torch.Generator().manual_seed(seed)
    w = 2 * height
    half = {"key": [f"bench-{seed}-{i}" for i in range(n)],
            "rgb": torch.rand(n, 3, height, w, generator=g).to(device),
            "valid": torch.ones(n, 1, height, w, dtype=torch.bool).to(device)}
    if labeled:
        half["depth"] = (0.5 + 9.0 * torch.rand(n, 1, height, w, generator=g)).to(device)
    return half


def student_engine(name: str, encoder: str, device: torch.device, channels_last: bool) -> LocalEngine:
    torch.manual_seed(0)
    model = build_model(name, encoder=encoder)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)  # before the optimizer sees the parameters
    return LocalEngine(model, OptimConfig(amp="auto"), device)  # bf16 autocast on CUDA, fp32 on CPU


