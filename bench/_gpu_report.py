"""bench/gpu.py's printed tables (the JSON file holds the same figures)."""

from __future__ import annotations

import math

from _gpu_measure import GOAL_FULL_OVER_PARTS


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
    print("MFU: teacher headline against the published FLOPs (0.69/2.28/7.83 TFLOP per pano); student and full "
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


