"""bench/gpu.py's four sections: teacher, student training step, full distillation step, projections.

Each returns a JSON-ready dict; a row that runs out of memory or time says so instead of raising.
"""

from __future__ import annotations

import torch

from _gpu_measure import (Bench, guard, is_oom, make_half, median, mfu_fields, set_teacher_attention, student_anchor,
                          student_engine, teacher_anchor, teacher_counted_flops_per_pano, GOAL_FULL_OVER_PARTS,
                          GOAL_TEACHER_MFU)
from panorama import cube_to_equirect, equirect_to_cube, equirect_to_planar_faces, random_rotations
from student.engine import LocalEngine
from student.flops import train_step_flops
from student.losses import affine_invariant_loss, normalize_disparity
from student.models import build_model
from student.step import distill_step, rotated_face_mask
from teacher_server.inprocess import InProcessTeacher
from teacher_server.labels import OnlineLabels
from teacher_server.models import load_teacher


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
            if not is_oom(err):
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
                t = median(bench.times(lambda: teacher(faces)))
                faces_s = batch / t
                row = {"model": label, "arch": name, "attn": impl, "dtype": str(teacher.dtype).replace("torch.", ""),
                       "input": s, "batch_faces": batch, "ms": 1e3 * t, "faces_per_s": faces_s,
                       "panoramas_per_s": faces_s / 6}
                row.update(mfu_fields(faces_s / 6, anchor, counted, peak, "anchor"))
                return row

            row = guard(bench, f"{label} batch {batch} {impl}", run, need_s=10)
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
                        t = median(bench.times(_student_step_fn(engine, batch, h, bench.device, cl)))
                    finally:
                        del engine
                    ps = batch / t
                    row = {"model": label, "format": fmt, "height": h, "batch": batch,
                           "amp": "bf16" if bench.cuda else "off (fp32 on CPU)", "ms": 1e3 * t,
                           "panoramas_per_s": ps}
                    row.update(mfu_fields(ps, anchor, counted, peak, "counted"))
                    return row

                row = guard(bench, f"{label} {fmt} batch {batch}", run, need_s=15)
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
        if not is_oom(err):
            raise
        result["error"] = "OOM"
        result["detail"] = str(err).splitlines()[0][:200]
        return result
    finally:
        del engine, model, teacher, backend, labels_src
        bench.reset_memory()
    t = {k: median(v) for k, v in samples.items()}
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
            t = median(bench.times(fn))
            gbs = nbytes / t / 1e9
            return {"kernel": kernel, "batch": b, "height": h, "face": f, "ms": 1e3 * t, "panoramas_per_s": b / t,
                    "gbs": gbs, "bw_util": gbs / peak_gbs if peak_gbs else None, "bytes_min": nbytes,
                    "mfu": None, "mfu_note": "no matrix products: bandwidth, not MFU"}

        row = guard(bench, kernel, run, need_s=5)
        row.setdefault("kernel", kernel)
        rows.append(row)
    return {"rows": rows, "peak_gbs": peak_gbs, "rotations": "random, each Euler angle in [-45, 45] deg"}


