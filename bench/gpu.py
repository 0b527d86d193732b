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

* *anchor*: published FLOP counts. Teacher: 0.69 / 2.28 / 7.83 TFLOP per panorama (six 518x518 faces) for
  DA-V2-S/B/L (``teacher_server.models.TFLOP_PER_PANORAMA``). Student: 3 x the papers' forward GFLOPs at
  512x1024 (``student.flops.ANCHORS``: UniFuse-R18 125 -> 0.375 TFLOP per panorama per training step;
  BiFuse++-R34 174 -> 0.522).
* *counted*: ours, ``torch.utils.flop_counter`` (2 x MACs of the matrix products). Teacher: one eager-
  attention forward of six faces (SDPA kernels are not counted on every backend). Student:
  ``student.flops.train_step_flops`` = 3 x forward (UniFuse-R18: 133 GFLOP forward -> 0.40 TFLOP).

The headline ``mfu`` of the teacher uses the anchor (the goal, >= 40% of peak, is stated against it); the
headline ``mfu`` of the student and of the full step uses our counted student figure (the same number the
training loop's MFU uses) plus, for the full step, the teacher's anchor. Tiny models have no anchor: their
MFU is counted only, and on the CPU it is against a nominal 0.16 TFLOP/s (plumbing, not a figure).
Projections do no matrix products: they get bandwidth, not MFU.

Code: ``_gpu_measure`` (sizes, timer, FLOPs and MFU), ``_gpu_sections`` (the four sections),
``_gpu_report`` (the printed tables); this file parses the flags and writes the JSON.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import socket
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _gpu_measure import GOAL_FULL_OVER_PARTS, GOAL_TEACHER_MFU, PEAK_GBS, Bench, sizes  # noqa: E402  (bench/, first on sys.path)
from _gpu_report import print_report  # noqa: E402
from _gpu_sections import bench_full_step, bench_projection, bench_student, bench_teacher  # noqa: E402
from sharding import cli  # noqa: E402
from student.monitor import peak_tflops  # noqa: E402

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
    cli.add_common_arguments(ap)
    args = ap.parse_args(argv)
    cli.setup_logging(args.log_level)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - {"teacher", "student", "full_step", "projection"}
    if unknown:
        raise cli.UserError(f"--sections: unknown {sorted(unknown)}; choose from teacher,student,full_step,projection")

    t0 = time.perf_counter()
    dev_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev_name == "cuda" and not torch.cuda.is_available():
        raise cli.UserError("--device cuda but CUDA is not available (this torch build or machine has no GPU)")
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
    raise SystemExit(cli.run(main))
