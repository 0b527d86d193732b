"""GPU figures in one short run: teacher faces/s, student steps, the full distillation step, projections.

    python bench/gpu.py                       # H100/H200: the real sizes, < 10 minutes, bench/results/gpu.json
    python bench/gpu.py --out /tmp/gpu.json --peak-tflops 989
    python bench/gpu.py --tiny --device cpu   # CPU smoke test of the plumbing (tiny models), < 1 minute

Sections (each timed with warm-up iterations, ``torch.cuda.synchronize()`` around every timed call, and
the median over repeats; ``torch.cuda.max_memory_allocated()`` is reported per measurement):

* **teacher**: faces/s of the frozen Depth Anything V2 S/B/L architectures (``random:small|base|large``:
  seeded random weights, speed does not depend on them) at 518x518 in bf16, through
  ``FrozenTeacher.forward`` (normalisation, the model, per-face normalisation of the answer), for a few
  batches of 6 x k faces; the model's attention runs through PyTorch SDPA (transformers'
  ``attn_implementation="sdpa"``, set on the Dinov2 backbone), plus one eager-attention row for DA-S.
* **student**: training steps of UniFuse-R18 and BiFuse++-R34 at 512x1024: bf16 autocast forward (as the
  training loop does), the affine-invariant loss, the loop's finiteness check, backward, gradient clipping
  and Adam through ``student.engine.LocalEngine``; NCHW and channels_last.
* **full_step**: the distillation step of the training loop in one process, without data loading:
  rotations, ``OnlineLabels`` + ``InProcessTeacher`` (DA-V2-S at 518 on 3 x 6 faces of 256),
  ``student.step.distill_step`` (UniFuse-R18, 3 labeled + 3 unlabeled panoramas at 512x1024) and
  ``LocalEngine.backward_and_step``; and its parts measured alone: the teacher on 18 faces of 256, the
  student step on 6 labeled panoramas, and the projections of the step (RGB -> rotated cube for the
  teacher, the rotated sky mask, and the student's prediction -> planar face disparity, forward and
  backward). It prints full / (sum of parts); the goal is <= 1.10.
* **projection**: ``equirect_to_cube`` of a batch of 512x1024 RGB with random rotations,
  ``cube_to_equirect`` back, ``equirect_to_planar_faces`` of disparity (forward, and forward+backward),
  as panoramas/s and effective GB/s (bytes in + bytes out over the time: the least traffic possible).

MFU = achieved FLOP/s / the card's dense bf16 peak (H100/H200: 989 TFLOP/s; ``--peak-tflops`` overrides).
Two FLOP figures are kept for every model and both MFUs are printed:

* *anchor*: the issue's figures. Teacher: 0.69 / 2.28 / 7.83 TFLOP per panorama (six 518x518 faces) for
  DA-V2-S/B/L. Student: 3 x the papers' forward GFLOPs at 512x1024 (UniFuse-R18 125 -> 0.375 TFLOP per
  panorama per training step, the issue's "0.37"; BiFuse++-R34 174 -> 0.522).
* *counted*: ours, ``torch.utils.flop_counter`` (2 x MACs of the matrix products). Teacher: one eager-
  attention forward of six faces (SDPA kernels are not counted on every backend). Student:
  ``student.flops.train_step_flops`` = 3 x forward (UniFuse-R18: 133 GFLOP forward -> 0.40 TFLOP).

The headline ``mfu`` of the teacher uses the anchor (the goal, >= 40% of peak, is stated against it); the
headline ``mfu`` of the student and of the full step uses our counted student figure (the same number the
training loop's MFU uses) plus, for the full step, the teacher's anchor. Tiny models have no anchor: their
MFU is counted only, and on the CPU it is against a nominal 0.16 TFLOP/s (plumbing, not a figure).
Projections do no matrix products: they get bandwidth, not MFU.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import socket
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from panorama import equirect_to_cube, equirect_to_planar_faces, cube_to_equirect, random_rotations  # noqa: E402
from student.config import OptimConfig  # noqa: E402
from student.engine import LocalEngine  # noqa: E402
from student.flops import ANCHORS as STUDENT_FORWARD_ANCHORS, TRAIN_STEP_FACTOR, train_step_flops  # noqa: E402
from student.losses import affine_invariant_loss, normalize_disparity  # noqa: E402
from student.models import build_model  # noqa: E402
from student.monitor import peak_tflops  # noqa: E402
from student.step import distill_step, rotated_face_mask  # noqa: E402
from teacher_server.inprocess import InProcessTeacher  # noqa: E402
from teacher_server.labels import OnlineLabels  # noqa: E402
from teacher_server.models import TFLOP_PER_PANORAMA, load_teacher  # noqa: E402

TEACHER_ANCHOR_INPUT = 518  # the issue's teacher FLOPs are for 518 x 518 faces
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


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def _guard(bench: Bench, what: str, fn: Callable[[], dict], *, need_s: float = 0.0) -> dict:
    """Run one measurement; OOM and an exhausted time budget are reported in the row, not raised."""
    if bench.left() < need_s:
        return {"skipped": f"time budget ({bench.budget_s:.0f} s) spent"}
    bench.reset_memory()
    try:
        row = fn()
    except Exception as err:  # noqa: BLE001 - one failed row must not lose the others
        if not _is_oom(err):
            raise
        row = {"error": "OOM", "detail": str(err).splitlines()[0][:200]}
    if "error" not in row and bench.cuda:
        row["max_mem_gb"] = bench.max_mem_gb()
    bench.reset_memory()
    print(f"  {what}: {_short(row)}", flush=True)
    return row


def _short(row: dict) -> str:
    keys = ("faces_per_s", "panoramas_per_s", "ms", "mfu", "gbs", "error", "skipped", "max_mem_gb")
    parts = []
    for k in keys:
        v = row.get(k)
        if v is None:
            continue
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


def _median(xs: list[float]) -> float:
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
    """The issue's FLOPs per panorama (six faces) of DA-V2 ``size``; they hold at 518 x 518 only."""
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


# ------------------------------------------------------------------------------------------ sections


def bench_teacher(bench: Bench, sz: dict, peak: float, attn: str) -> dict:
    rows = []
    s = sz["teacher_input"]
    for label, name, size in sz["teachers"]:
        if bench.left() < 30:
            rows.append({"model": label, "skipped": "time budget spent"})
            continue
        print(f"teacher {label} ({name}) at {s}x{s}", flush=True)
        try:
            teacher = load_teacher(name, bench.device, "bf16" if bench.cuda else "fp32", s)
        except Exception as err:  # noqa: BLE001
            if not _is_oom(err):
                raise
            rows.append({"model": label, "error": "OOM"})
            continue
        in_effect = set_teacher_attention(teacher, attn)
        counted = teacher_counted_flops_per_pano(teacher, s, bench.device)
        anchor = teacher_anchor(size, s)
        configs = [(b, in_effect) for b in sz["teacher_batches"][name]]
        if name == sz["eager_row"] and attn != "eager":
            configs.append((configs[len(configs) // 2][0], "eager"))
        for batch, impl in configs:
            def run(batch=batch, impl=impl) -> dict:
                set_teacher_attention(teacher, impl)
                faces = torch.rand(batch, 3, s, s, device=bench.device)
                t = _median(bench.times(lambda: teacher(faces)))
                faces_s = batch / t
                row = {"model": label, "arch": name, "attn": impl, "dtype": str(teacher.dtype).replace("torch.", ""),
                       "input": s, "batch_faces": batch, "ms": 1e3 * t, "faces_per_s": faces_s,
                       "panoramas_per_s": faces_s / 6}
                row.update(mfu_fields(faces_s / 6, anchor, counted, peak, "anchor"))
                return row

            row = _guard(bench, f"{label} batch {batch} {impl}", run, need_s=10)
            row.setdefault("model", label)
            row.setdefault("batch_faces", batch)
            row.setdefault("attn", impl)
            rows.append(row)
        set_teacher_attention(teacher, in_effect)
        del teacher
        bench.reset_memory()
    best = {}
    for r in rows:
        if r.get("faces_per_s") and r.get("attn") == attn_of(rows, r["model"]):
            if r["model"] not in best or r["faces_per_s"] > best[r["model"]]["faces_per_s"]:
                best[r["model"]] = r
    goals = {m: {"mfu": r["mfu"], "mfu_basis": r["mfu_basis"], "goal": GOAL_TEACHER_MFU,
                 "met": bool(r["mfu"] >= GOAL_TEACHER_MFU)} for m, r in best.items()}
    return {"rows": rows, "best": {m: {"batch_faces": r["batch_faces"], "faces_per_s": r["faces_per_s"],
                                       "mfu": r["mfu"]} for m, r in best.items()},
            "goal": goals, "attn_requested": attn}


def attn_of(rows: list[dict], model: str) -> str | None:
    """The attention implementation of a model's main rows (the first row's)."""
    for r in rows:
        if r.get("model") == model:
            return r.get("attn")
    return None


def _student_step_fn(engine: LocalEngine, batch: int, height: int, device: torch.device, channels_last: bool):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(batch, 3, height, 2 * height, generator=g).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    depth = (0.5 + 9.0 * torch.rand(batch, 1, height, 2 * height, generator=g)).to(device)
    target = normalize_disparity(1.0 / depth)
    mask = torch.ones_like(target, dtype=torch.bool)
    model = engine.module
    model.train()

    def step():
        with torch.autocast(device_type=device.type, dtype=engine.amp or torch.float32, enabled=engine.amp is not None):
            pred = model(x)
        loss = affine_invariant_loss(pred.float(), target, mask)
        if engine.all_finite(loss):  # the loop's one host sync per step
            engine.backward_and_step(loss)

    return step


def bench_student(bench: Bench, sz: dict, peak: float) -> dict:
    rows = []
    h = sz["height"]
    for name, encoder, anchor_key in sz["students"]:
        label = f"{name}" + (f"-{encoder}" if encoder else "")
        # counted FLOPs on the benchmark device (fp32 module, eval, batch 1)
        torch.manual_seed(0)
        counted = float(train_step_flops(build_model(name, encoder=encoder).to(bench.device), h))
        anchor = student_anchor(anchor_key, h)
        print(f"student {label} at {h}x{2 * h}: counted {counted / 1e12:.3f} TFLOP per panorama per train step"
              + (f", anchor {anchor / 1e12:.3f}" if anchor else ""), flush=True)
        for fmt in sz["formats"]:
            cl = fmt == "channels_last"
            for batch in sz["student_batches"]:
                def run(batch=batch, cl=cl, fmt=fmt) -> dict:
                    engine = student_engine(name, encoder, bench.device, cl)
                    try:
                        t = _median(bench.times(_student_step_fn(engine, batch, h, bench.device, cl)))
                    finally:
                        del engine
                    ps = batch / t
                    row = {"model": label, "format": fmt, "height": h, "batch": batch,
                           "amp": "bf16" if bench.cuda else "off (fp32 on CPU)", "ms": 1e3 * t,
                           "panoramas_per_s": ps}
                    row.update(mfu_fields(ps, anchor, counted, peak, "counted"))
                    return row

                row = _guard(bench, f"{label} {fmt} batch {batch}", run, need_s=15)
                row.setdefault("model", label)
                row.setdefault("format", fmt)
                row.setdefault("batch", batch)
                rows.append(row)
    return {"rows": rows}


def bench_full_step(bench: Bench, sz: dict, peak: float, attn: str, channels_last: bool) -> dict:
    """The training loop's distillation step, and its parts measured alone."""
    dev, h, f = bench.device, sz["height"], sz["face"]
    s = sz["teacher_input"]
    n_lab = n_unl = 3
    name, encoder = sz["full_student"]
    tname = sz["full_teacher"]
    size = tname.split(":", 1)[1] if tname.startswith("random:") else None
    print(f"full step: {name}{'-' + encoder if encoder else ''} at {h}x{2 * h}, {n_lab}+{n_unl} panoramas, "
          f"face {f}, teacher {tname} at {s}", flush=True)

    teacher = load_teacher(tname, dev, "bf16" if bench.cuda else "fp32", s)
    impl = set_teacher_attention(teacher, attn)
    t_counted = teacher_counted_flops_per_pano(teacher, s, dev)
    t_anchor = teacher_anchor(size, s)
    backend = InProcessTeacher(teacher)
    labels_src = OnlineLabels(backend)
    torch.manual_seed(0)
    s_counted = float(train_step_flops(build_model(name, encoder=encoder).to(dev), h))
    s_anchor = student_anchor((name, encoder), h)
    engine = student_engine(name, encoder, dev, channels_last)
    model = engine.module
    model.train()
    batch = {"labeled": make_half(n_lab, h, dev, 10, True), "unlabeled": make_half(n_unl, h, dev, 20, False)}
    batch6 = {"labeled": make_half(n_lab + n_unl, h, dev, 30, True), "unlabeled": None}
    gen = torch.Generator().manual_seed(0)
    faces18 = torch.rand(6 * n_unl, 3, f, f, generator=gen).to(dev)
    pred_src = torch.rand(n_unl, 1, h, 2 * h, generator=gen).to(dev) + 0.1

    def full():
        rots = random_rotations(n_unl, 45.0, generator=gen).to(dev)
        labels = labels_src.request(batch["unlabeled"], rots, f).result()
        out = distill_step(model, batch, labels, face_size=f, generator=gen, amp_dtype=engine.amp)
        if engine.all_finite(out.total):
            engine.backward_and_step(out.total)

    def part_teacher():
        backend.pseudo_label(faces18)

    def part_student():
        out = distill_step(model, batch6, None, face_size=f, generator=gen, pseudo_weight=0.0, amp_dtype=engine.amp)
        if engine.all_finite(out.total):
            engine.backward_and_step(out.total)

    def part_projections():
        rots = random_rotations(n_unl, 45.0, generator=gen).to(dev)
        unl = batch["unlabeled"]
        equirect_to_cube(unl["rgb"].float(), f, rotation=rots).reshape(6 * n_unl, 3, f, f).contiguous()
        rotated_face_mask(unl["valid"], f, rots)
        pred = pred_src.detach().requires_grad_(True)
        faces = equirect_to_planar_faces(pred, f, rotation=rots, quantity="disparity")
        torch.autograd.grad(faces.sum(), pred)

    fns = {"full": full, "teacher": part_teacher, "student": part_student, "projections": part_projections}
    samples: dict[str, list[float]] = {k: [] for k in fns}
    mem: dict[str, float | None] = {}
    result: dict = {"student": f"{name}{'-' + encoder if encoder else ''}", "teacher": tname, "attn": impl,
                    "height": h, "face": f, "teacher_input": s, "labeled": n_lab, "unlabeled": n_unl,
                    "format": "channels_last" if channels_last else "nchw",
                    "parts_definition": {
                        "teacher": f"InProcessTeacher.pseudo_label on {6 * n_unl} faces of {f} (resized to {s})",
                        "student": f"distill_step on {n_lab + n_unl} labeled panoramas + finiteness check + "
                                   "LocalEngine.backward_and_step",
                        "projections": f"equirect_to_cube of {n_unl} RGB with rotations, rotated_face_mask, "
                                       f"equirect_to_planar_faces of {n_unl} predictions forward+backward"}}
    try:
        for rnd in range(sz["rounds"]):
            for key, fn in fns.items():
                if bench.left() < 10 and samples[key]:
                    continue
                if bench.cuda:
                    torch.cuda.reset_peak_memory_stats(dev)
                samples[key] += bench.times(fn, warmup=bench.warmup if rnd == 0 else 1)
                if bench.cuda:
                    mem[key] = max(mem.get(key) or 0.0, bench.max_mem_gb())
    except Exception as err:  # noqa: BLE001
        if not _is_oom(err):
            raise
        result["error"] = "OOM"
        result["detail"] = str(err).splitlines()[0][:200]
        return result
    finally:
        del engine, model, teacher, backend, labels_src
        bench.reset_memory()
    t = {k: _median(v) for k, v in samples.items()}
    parts_sum = t["teacher"] + t["student"] + t["projections"]
    n = n_lab + n_unl
    step_flops_anchor = (n * s_anchor + n_unl * t_anchor) if (s_anchor and t_anchor) else None
    step_flops_counted = n * s_counted + n_unl * t_counted
    step_flops_headline = n * s_counted + n_unl * (t_anchor or t_counted)
    parts = {
        "teacher": {"ms": 1e3 * t["teacher"], "faces_per_s": 6 * n_unl / t["teacher"],
                    **mfu_fields(n_unl / t["teacher"], t_anchor, t_counted, peak, "anchor")},
        "student": {"ms": 1e3 * t["student"], "panoramas_per_s": n / t["student"],
                    **mfu_fields(n / t["student"], s_anchor, s_counted, peak, "counted")},
        "projections": {"ms": 1e3 * t["projections"], "panoramas_per_s": n_unl / t["projections"]},
    }
    for k in parts:
        parts[k]["repeats"] = len(samples[k])
        if bench.cuda:
            parts[k]["max_mem_gb"] = mem.get(k)
    steps_s = 1.0 / t["full"]
    full_row = {"ms": 1e3 * t["full"], "panoramas_per_s": n * steps_s, "teacher_faces_per_s": 6 * n_unl * steps_s,
                "repeats": len(samples["full"]),
                "flops_per_step_anchor": step_flops_anchor, "flops_per_step_counted": step_flops_counted,
                "flops_per_step": step_flops_headline,
                "mfu_anchor": steps_s * step_flops_anchor / peak if step_flops_anchor else None,
                "mfu_counted": steps_s * step_flops_counted / peak,
                "mfu": steps_s * step_flops_headline / peak,
                "mfu_basis": "student counted + teacher anchor" if t_anchor else "counted",
                "tflops": steps_s * step_flops_headline / 1e12}
    if bench.cuda:
        full_row["max_mem_gb"] = mem.get("full")
    ratio = t["full"] / parts_sum
    result.update(full=full_row, parts=parts, sum_of_parts_ms=1e3 * parts_sum, ratio_full_over_parts=ratio,
                  goal={"ratio_max": GOAL_FULL_OVER_PARTS, "met": bool(ratio <= GOAL_FULL_OVER_PARTS)})
    print(f"  full {1e3 * t['full']:.2f} ms vs parts {1e3 * parts_sum:.2f} ms "
          f"(teacher {1e3 * t['teacher']:.2f}, student {1e3 * t['student']:.2f}, projections "
          f"{1e3 * t['projections']:.2f}): ratio {ratio:.3f}", flush=True)
    return result


def bench_projection(bench: Bench, sz: dict, peak_gbs: float | None) -> dict:
    dev, h, f, b = bench.device, sz["height"], sz["face"], sz["proj_batch"]
    w = 2 * h
    gen = torch.Generator().manual_seed(5)
    rgb = torch.rand(b, 3, h, w, generator=gen).to(dev)
    disp = (torch.rand(b, 1, h, w, generator=gen) + 0.1).to(dev)
    faces = torch.rand(b, 6, 3, f, f, generator=gen).to(dev)
    rots = random_rotations(b, 45.0, generator=gen).to(dev)
    el = 4  # float32
    cases = {
        "equirect_to_cube": (lambda: equirect_to_cube(rgb, f, rotation=rots).contiguous(),
                             (b * 3 * h * w + b * 6 * 3 * f * f) * el),
        "cube_to_equirect": (lambda: cube_to_equirect(faces, h, w, rotation=rots),
                             (b * 6 * 3 * f * f + b * 3 * h * w) * el),
        "equirect_to_planar_faces": (lambda: equirect_to_planar_faces(disp, f, rotation=rots, quantity="disparity"),
                                     (b * h * w + b * 6 * f * f) * el),
    }

    def planar_fwd_bwd():
        x = disp.detach().requires_grad_(True)
        out = equirect_to_planar_faces(x, f, rotation=rots, quantity="disparity")
        torch.autograd.grad(out.sum(), x)

    cases["equirect_to_planar_faces fwd+bwd"] = (planar_fwd_bwd, 2 * (b * h * w + b * 6 * f * f) * el)
    rows = []
    for kernel, (fn, nbytes) in cases.items():
        def run(fn=fn, nbytes=nbytes, kernel=kernel) -> dict:
            t = _median(bench.times(fn))
            gbs = nbytes / t / 1e9
            return {"kernel": kernel, "batch": b, "height": h, "face": f, "ms": 1e3 * t, "panoramas_per_s": b / t,
                    "gbs": gbs, "bw_util": gbs / peak_gbs if peak_gbs else None, "bytes_min": nbytes,
                    "mfu": None, "mfu_note": "no matrix products: bandwidth, not MFU"}

        row = _guard(bench, kernel, run, need_s=5)
        row.setdefault("kernel", kernel)
        rows.append(row)
    return {"rows": rows, "peak_gbs": peak_gbs, "rotations": "random, each Euler angle in [-45, 45] deg"}


# ------------------------------------------------------------------------------------------ report


def _fmt(v, spec: str = ".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return format(v, spec)
    return str(v)


def _mem(v) -> str:
    return "" if v is None else f"  mem {v:.2f} GB"


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def print_report(res: dict) -> None:
    m = res["meta"]
    print("\n" + "=" * 100)
    print(f"bench/gpu.py  {m['date']}  {m['card']}  torch {m['torch']}  CUDA {m['cuda']}  cuDNN {m['cudnn']}  "
          f"transformers {m['transformers']}")
    print(f"peak {m['peak_tflops']:.4g} TFLOP/s ({m['peak_source']}); tiny={m['tiny']}; flags {m['flags']}")
    if m["tiny"]:
        print("TINY MODE: toy sizes, plumbing only; no figure here says anything about a GPU.")
    print("MFU: teacher headline against the issue's anchor (0.69/2.28/7.83 TFLOP per pano); student and full "
          "step headline against our counted student FLOPs (3 x forward); both shown.")

    t = res.get("teacher")
    if t:
        print("\nteacher (faces/s, FrozenTeacher.forward)")
        print(f"{'model':<12}{'attn':<7}{'batch':>6}{'ms':>10}{'faces/s':>11}{'pano/s':>9}{'TFLOP/s':>9}"
              f"{'MFU anch':>10}{'MFU cnt':>9}{'mem GB':>8}")
        for r in t["rows"]:
            if "faces_per_s" not in r:
                print(f"{r.get('model', ''):<12}{r.get('attn', ''):<7}{_fmt(r.get('batch_faces')):>6}  "
                      f"{r.get('error') or r.get('skipped')}")
                continue
            print(f"{r['model']:<12}{r['attn']:<7}{r['batch_faces']:>6}{_fmt(r['ms'], '.2f'):>10}"
                  f"{_fmt(r['faces_per_s'], '.1f'):>11}{_fmt(r['panoramas_per_s'], '.1f'):>9}"
                  f"{_fmt(r['tflops'], '.3g'):>9}{_pct(r['mfu_anchor']):>10}{_pct(r['mfu_counted']):>9}"
                  f"{_fmt(r.get('max_mem_gb'), '.1f'):>8}")
        for model, g in t["goal"].items():
            state = "met" if g["met"] else "NOT met"
            print(f"  goal {model}: MFU {_pct(g['mfu'])} ({g['mfu_basis']}) vs >= {_pct(g['goal'])}: {state}"
                  + (" (tiny/CPU: not meaningful)" if m["tiny"] else ""))
        seen = set()
        for r in t["rows"]:
            if r.get("flops_per_item_counted") and r["model"] not in seen:
                seen.add(r["model"])
                anchor = r["flops_per_item_anchor"]
                print(f"  FLOPs per panorama (6 faces) {r['model']}: anchor "
                      f"{_fmt(anchor / 1e12) + ' TFLOP' if anchor else '- (none for this model)'}, counted "
                      f"{_fmt(r['flops_per_item_counted'] / 1e12)} TFLOP (eager attention, flop_counter)")

    st = res.get("student")
    if st:
        print("\nstudent training step (forward under the loop's autocast: bf16 on CUDA, fp32 on the CPU; "
              "affine-invariant loss, backward, clipping, Adam)")
        print(f"{'model':<20}{'format':<15}{'batch':>6}{'ms':>10}{'pano/s':>9}{'TFLOP/s':>9}{'MFU cnt':>9}"
              f"{'MFU anch':>10}{'mem GB':>8}")
        for r in st["rows"]:
            if "panoramas_per_s" not in r:
                print(f"{r.get('model', ''):<20}{r.get('format', ''):<15}{_fmt(r.get('batch')):>6}  "
                      f"{r.get('error') or r.get('skipped')}")
                continue
            print(f"{r['model']:<20}{r['format']:<15}{r['batch']:>6}{_fmt(r['ms'], '.2f'):>10}"
                  f"{_fmt(r['panoramas_per_s'], '.2f'):>9}{_fmt(r['tflops'], '.3g'):>9}{_pct(r['mfu_counted']):>9}"
                  f"{_pct(r['mfu_anchor']):>10}{_fmt(r.get('max_mem_gb'), '.1f'):>8}")
        seen = set()
        for r in st["rows"]:
            if r.get("flops_per_item_counted") and r["model"] not in seen:
                seen.add(r["model"])
                anchor = r["flops_per_item_anchor"]
                print(f"  FLOPs per panorama per train step {r['model']}: counted "
                      f"{_fmt(r['flops_per_item_counted'] / 1e12)} TFLOP (3 x forward), anchor "
                      f"{_fmt(anchor / 1e12) + ' TFLOP (3 x paper forward)' if anchor else '- (none for this model)'}")

    fs = res.get("full_step")
    if fs and "skipped" in fs:
        print(f"\nfull distillation step: skipped ({fs['skipped']})")
    elif fs:
        print(f"\nfull distillation step ({fs['student']}, {fs['labeled']}+{fs['unlabeled']} panoramas at "
              f"{fs['height']}x{2 * fs['height']}, face {fs['face']}, teacher {fs['teacher']} at "
              f"{fs['teacher_input']})")
        if "error" in fs:
            print(f"  {fs['error']}: {fs.get('detail', '')}")
        else:
            full = fs["full"]
            print(f"  full step      {full['ms']:10.2f} ms  {full['panoramas_per_s']:8.2f} pano/s  "
                  f"MFU {_pct(full['mfu'])} ({full['mfu_basis']}); counted {_pct(full['mfu_counted'])}  "
                  f"{_mem(full.get('max_mem_gb'))}")
            for k, p in fs["parts"].items():
                rate = (f"{p['faces_per_s']:8.1f} faces/s" if "faces_per_s" in p
                        else f"{p['panoramas_per_s']:8.2f} pano/s")
                extra = f"  MFU {_pct(p.get('mfu'))} ({p['mfu_basis']})" if p.get("mfu") is not None else ""
                print(f"  part {k:<10}{p['ms']:10.2f} ms  {rate}{extra}{_mem(p.get('max_mem_gb'))}")
            state = "met" if fs["goal"]["met"] else "NOT met"
            print(f"  sum of parts   {fs['sum_of_parts_ms']:10.2f} ms; full / sum = {fs['ratio_full_over_parts']:.3f} "
                  f"(goal <= {GOAL_FULL_OVER_PARTS}: {state})")

    pr = res.get("projection")
    if pr:
        print(f"\nprojections (batch of panoramas, random rotations; effective GB/s = bytes in + out / time; "
              f"peak {_fmt(pr['peak_gbs'])} GB/s)")
        for r in pr["rows"]:
            if "ms" not in r:
                print(f"  {r['kernel']:<36} {r.get('error') or r.get('skipped')}")
                continue
            print(f"  {r['kernel']:<36}{r['ms']:10.3f} ms{r['panoramas_per_s']:10.1f} pano/s{r['gbs']:9.1f} GB/s"
                  f"  {_pct(r['bw_util'])}{_mem(r.get('max_mem_gb'))}")
    print(f"\nelapsed {res['elapsed_s']:.1f} s; JSON: {res['meta']['out']}")


# ------------------------------------------------------------------------------------------ main


def _peak_gbs(card: str) -> float | None:
    for key, value in PEAK_GBS:
        if key.lower() in card.lower():
            return value
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python bench/gpu.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None,
                    help="default: cuda if available, else cpu (which implies --tiny)")
    ap.add_argument("--tiny", action="store_true", help="tiny models and sizes (CPU smoke test)")
    ap.add_argument("--out", default=None, help="JSON output (default bench/results/gpu.json, "
                                                "or bench/results/gpu_tiny.json with --tiny)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="override the card's dense bf16 peak")
    ap.add_argument("--sections", default="teacher,student,full_step,projection",
                    help="comma-separated subset of teacher,student,full_step,projection")
    ap.add_argument("--teacher-attn", default="sdpa", help="attention of the teacher's Dinov2 backbone: sdpa "
                                                           "(default), eager, flash_attention_2 ...")
    ap.add_argument("--channels-last", action="store_true", help="full step: student in channels_last "
                                                                 "(the student section measures both formats)")
    ap.add_argument("--no-tf32", action="store_true", help="leave TF32 matmuls off (default: on)")
    ap.add_argument("--no-cudnn-benchmark", action="store_true", help="leave cudnn.benchmark off (default: on)")
    ap.add_argument("--budget-s", type=float, default=None, help="stop starting new measurements after this "
                                                                 "many seconds (default 540; tiny 300)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement")
    ap.add_argument("--warmup", type=int, default=None, help="untimed warm-up calls per measurement")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: 1 on the CPU, where the cores "
                                                           "are usually shared; torch's default on CUDA)")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    dev_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev_name == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    device = torch.device(dev_name)
    tiny = args.tiny or device.type == "cpu"
    if device.type == "cpu" and not args.tiny:
        print("note: on the CPU only --tiny sizes are run (tiny implied)", flush=True)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    elif args.threads:
        torch.set_num_threads(args.threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.backends.cuda.matmul.allow_tf32 = not args.no_tf32
        torch.backends.cudnn.allow_tf32 = not args.no_tf32
        torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark

    sz = sizes(tiny)
    if args.repeats:
        sz["repeats"] = args.repeats
    if args.warmup is not None:
        sz["warmup"] = args.warmup
    budget = args.budget_s if args.budget_s is not None else (300.0 if tiny else 540.0)
    bench = Bench(device, sz["warmup"], sz["repeats"], sz["max_seconds"], budget)

    peak_t, card = peak_tflops(device)
    peak_source = "detected" if device.type == "cuda" else "nominal CPU figure (student.monitor)"
    if args.peak_tflops:
        peak_t, peak_source = args.peak_tflops, "--peak-tflops"
    if device.type == "cuda":
        card = torch.cuda.get_device_name(device)
    peak = peak_t * 1e12
    out_path = Path(args.out) if args.out else ROOT / "bench" / "results" / ("gpu_tiny.json" if tiny else "gpu.json")

    import transformers

    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(), "python": platform.python_version(),
        "device": str(device), "card": card if device.type == "cuda" else f"cpu ({os.cpu_count()} cores, "
                                                                              f"{torch.get_num_threads()} threads)",
        "capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
        "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "transformers": transformers.__version__, "peak_tflops": peak_t, "peak_source": peak_source,
        "tiny": tiny, "budget_s": budget, "warmup": sz["warmup"], "repeats": sz["repeats"],
        "flags": {"tf32": not args.no_tf32, "cudnn_benchmark": not args.no_cudnn_benchmark,
                  "teacher_attn": args.teacher_attn, "full_step_channels_last": args.channels_last},
        "out": str(out_path),
        "goals": {"teacher_mfu_min": GOAL_TEACHER_MFU, "full_over_parts_max": GOAL_FULL_OVER_PARTS},
    }
    print(f"bench/gpu.py on {meta['card']} (peak {peak_t:.4g} TFLOP/s, {peak_source}); torch {meta['torch']}, "
          f"CUDA {meta['cuda']}; tiny={tiny}; budget {budget:.0f} s", flush=True)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - {"teacher", "student", "full_step", "projection"}
    if unknown:
        print(f"error: unknown sections {sorted(unknown)}", file=sys.stderr)
        return 2

    res: dict = {"meta": meta}
    if "teacher" in sections:
        res["teacher"] = bench_teacher(bench, sz, peak, args.teacher_attn)
    if "student" in sections:
        res["student"] = bench_student(bench, sz, peak)
    if "full_step" in sections:
        if bench.left() > 30:
            res["full_step"] = bench_full_step(bench, sz, peak, args.teacher_attn, args.channels_last)
        else:
            res["full_step"] = {"skipped": "time budget spent"}
    if "projection" in sections:
        res["projection"] = bench_projection(bench, sz, _peak_gbs(card) if device.type == "cuda" else None)
    res["elapsed_s"] = time.perf_counter() - t0
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(res, indent=2, default=str) + "\n")
    print_report(res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
