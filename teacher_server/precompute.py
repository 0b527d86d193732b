"""Precompute the teacher's answers for every unlabeled panorama under K seeded rotations.

    python -m teacher_server.precompute --shards 'unlabeled/unlabeled-*.tar' --store pseudo.lmdb \\
        --rotations 8 [--model ID] [--face-size 256] [--input-size 518] [--seed 0] [--max-deg 45] \\
        [--replicas 2] [--ray] [--limit N] [--height H]

Every sample of the shards (read with ``sharding.stream.read_samples``) is projected onto the six faces of
K rotated cubes; the rotations come from ``panorama.random_rotations`` with a generator seeded from
``(seed, key)``, so they are reproducible and independent of the order and of how the work is split. The
faces go to the teacher (``--replicas N`` Ray actors of ``RayTeacherPool``; ``--replicas 0``: in this
process) and the answers go to a :class:`~teacher_server.store.PseudoLabelStore` (fp16, zlib). Keys already
in the store are skipped, so an interrupted run resumes where it stopped. Samples that cannot be read are
skipped, logged with their key and counted by reason (``skipped_bad`` in the summary). With ``--ray`` the
same work runs as a Ray Data pipeline (:mod:`teacher_server.precompute_ray`: readers and a pool of teacher
actors, one LMDB writer on the driver); the stored answers are the same. At the end it prints the store's
size per panorama and the teacher time spent, which is the teacher time each training epoch saves (/ K).
Training reads the store with ``teacher.mode=cached`` (or ``hybrid``) and ``teacher.store=pseudo.lmdb``.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import logging
import time

import torch

from sharding import cli

from .models import DEFAULT_TEACHER, TeacherUnavailableError, resolve_model_name
from .store import PseudoLabelStore, make_header

log = logging.getLogger("teacher_server.precompute")


def rotations_for_key(seed: int, key: str, k: int, max_deg=45.0) -> torch.Tensor:
    """(K, 3, 3) rotations of one panorama: a function of (seed, key) only."""
    from panorama import random_rotations

    digest = hashlib.sha256(f"{int(seed)}:{key}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return random_rotations(int(k), max_deg, generator=gen)


def cube_faces(rgb: torch.Tensor, rotations: torch.Tensor, face_size: int) -> torch.Tensor:
    """One panorama (3, H, 2H) under K rotations -> faces (K * 6, 3, F, F)."""
    from panorama import equirect_to_cube

    k = rotations.shape[0]
    faces = equirect_to_cube(rgb[None].expand(k, -1, -1, -1).float(), face_size, rotation=rotations)
    return faces.reshape(k * 6, rgb.shape[0], face_size, face_size).contiguous()


def iter_panoramas(shards, height: int | None = None, split: str | None = None, skipped: dict | None = None):
    """Decoded samples of the shards in order (depth not decoded: the teacher only sees RGB); unreadable
    samples are logged and counted into ``skipped`` by reason."""
    from sharding.stream import read_samples

    yield from read_samples(shards, height=height, split=split, labeled=False, skipped=skipped)


def precompute(shards, store: str, *, rotations: int = 8, model: str = DEFAULT_TEACHER, face_size: int = 256,
               input_size: int = 518, seed: int = 0, max_deg=45.0, replicas: int = 1, limit: int | None = None,
               height: int | None = None, split: str | None = None, device: str = "auto", dtype: str = "auto",
               num_gpus: float = 0.0, num_cpus: float = 1.0, max_inflight: int = 2, max_batch_faces: int = 48,
               backend=None, ray_address: str | None = None, samples=None, log_every: int = 50,
               ray: bool = False, progress: bool = False) -> dict:
    """Fill ``store`` (created if needed; an existing one must have the same header). Returns a summary
    dict: counts of this run plus :meth:`PseudoLabelStore.report`. ``backend`` (anything with ``submit``
    and ``stats``) replaces the pool built from ``replicas``; ``samples`` replaces reading ``shards``.
    ``ray=True`` runs :func:`teacher_server.precompute_ray.precompute_ray` instead (``replicas`` teacher
    actors of a Ray Data pipeline)."""
    if ray:
        if backend is not None or samples is not None:
            raise ValueError("ray=True reads the shards itself: pass neither backend nor samples")
        from .precompute_ray import precompute_ray

        return precompute_ray(shards, store, rotations=rotations, model=model, face_size=face_size,
                              input_size=input_size, seed=seed, max_deg=max_deg, replicas=replicas, limit=limit,
                              height=height, split=split, device=device, dtype=dtype, num_gpus=num_gpus,
                              num_cpus=num_cpus, max_batch_faces=max_batch_faces, ray_address=ray_address,
                              log_every=log_every, progress=progress)
    header = make_header(model=resolve_model_name(model), face_size=face_size, input_size=input_size, seed=seed,
                         rotations=rotations, max_deg=max_deg)
    db = PseudoLabelStore(store, header=header)  # refuses an existing store built with other settings
    own_backend = backend is None
    if own_backend:
        if replicas <= 0:
            from .inprocess import InProcessTeacher

            backend = InProcessTeacher(model, device=device, dtype=dtype, input_size=input_size,
                                       max_batch_faces=max_batch_faces)  # (seed: rotations, not weights)
        else:
            from .pool import RayTeacherPool

            backend = RayTeacherPool(model, ray_address=ray_address, replicas=replicas, num_gpus=num_gpus, num_cpus=num_cpus,
                                     max_inflight=max_inflight, max_batch_faces=max_batch_faces, device=device,
                                     dtype=dtype, input_size=input_size)
    window = max(2, 2 * max(replicas, 1) * max_inflight)
    secs0 = float(backend.stats().get("compute_seconds", 0.0))
    t0 = time.perf_counter()
    done = skipped = invalid = 0
    nbytes = 0
    flushed = (0.0, 0, 0)  # totals already added to the store
    pending: collections.deque = collections.deque()
    skipped_bad: dict[str, int] = {}

    def teacher_seconds() -> float:
        return float(backend.stats().get("compute_seconds", 0.0)) - secs0

    def flush() -> None:
        nonlocal flushed
        secs = teacher_seconds()
        db.add_totals(teacher_seconds=secs - flushed[0], panoramas=done - flushed[1], nbytes=nbytes - flushed[2])
        flushed = (secs, done, nbytes)

    def finish_one() -> None:
        nonlocal done, invalid, nbytes
        key, rots, handle = pending.popleft()
        disp = handle.result().reshape(rotations, 6, 1, face_size, face_size)
        invalid += int((~torch.isfinite(disp).flatten(2).all(-1)).sum())
        nbytes += db.put(key, rots, disp)
        done += 1
        if done % 32 == 0:
            flush()
        if log_every and done % log_every == 0:
            dt = time.perf_counter() - t0
            log.info("%d panoramas stored (%d skipped), %.2f panoramas/s", done, skipped, done / max(dt, 1e-9))

    try:
        source = samples if samples is not None else iter_panoramas(shards, height=height, split=split,
                                                                    skipped=skipped_bad)
        for sample in source:
            if limit is not None and done + len(pending) >= limit:
                break
            key = sample["key"]
            if key in db:
                skipped += 1
                continue
            rots = rotations_for_key(seed, key, rotations, max_deg)
            faces = cube_faces(sample["rgb"], rots, face_size)
            pending.append((key, rots, backend.submit(faces)))
            while len(pending) >= window:
                finish_one()
        while pending:
            finish_one()
    finally:
        flush()
        if own_backend:
            backend.close()
    wall = time.perf_counter() - t0
    summary = {"computed": done, "skipped_existing": skipped, "skipped_bad": skipped_bad, "invalid_faces": invalid,
               "wall_seconds": wall, "teacher_seconds_this_run": flushed[0]}
    summary.update(db.report())
    log.info(db.format_report())
    db.close()
    return summary


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m teacher_server.precompute", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", nargs="+", required=True,
                   help="unlabeled shards: tar paths, globs, brace patterns, or a manifest.json / its folder")
    p.add_argument("--split", default=None, help="split of a manifest to read")
    p.add_argument("--store", required=True, help="LMDB folder to create or resume")
    p.add_argument("--rotations", type=int, default=8, help="K rotations per panorama")
    p.add_argument("--model", default=DEFAULT_TEACHER, help="teacher: HF id, alias, local folder, tiny-random, ...")
    p.add_argument("--face-size", type=int, default=256, help="cube face size F (training's distill.face_size)")
    p.add_argument("--input-size", type=int, default=518, help="teacher input size (multiple of 14)")
    p.add_argument("--height", type=int, default=None, help="resize panoramas to this height first (default: as stored)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-deg", type=float, nargs="+", default=[45.0],
                   help="Euler angle range: one value or yaw pitch roll (0 = no rotation)")
    p.add_argument("--replicas", type=int, default=1,
                   help="Ray teacher replicas (pool actors, or Ray Data actors with --ray); 0 = in this process")
    p.add_argument("--ray", action="store_true",
                   help="run as a Ray Data pipeline: parallel readers, --replicas teacher actors, one writer")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica (fractions share a GPU)")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    p.add_argument("--max-inflight", type=int, default=2, help="calls held per pool replica (not with --ray)")
    p.add_argument("--max-batch-faces", type=int, default=48)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU) | bf16 | fp16 | fp32")
    p.add_argument("--limit", type=int, default=None, help="compute at most N new panoramas")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    cli.add_common_arguments(p)
    return p


def _check_args(args) -> None:
    """Wrong values are user errors, named, before anything is opened or started."""
    for name in ("rotations", "face_size", "input_size", "max_batch_faces", "max_inflight"):
        if getattr(args, name) < 1:
            raise cli.UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.replicas < 0 or (args.ray and args.replicas < 1):
        raise cli.UserError(f"--replicas must be >= {1 if args.ray else 0}"
                            f"{' with --ray' if args.ray else ''}, got {args.replicas}")
    if args.limit is not None and args.limit < 0:
        raise cli.UserError(f"--limit must be >= 0, got {args.limit}")
    if len(args.max_deg) not in (1, 3):
        raise cli.UserError(f"--max-deg takes one value or three (yaw pitch roll), got {len(args.max_deg)}")
    from sharding.manifest import resolve_shards

    try:
        resolve_shards(args.shards, args.split, count=False)
    except ValueError as err:  # no match, a folder without manifest, a missing file
        raise cli.UserError(f"--shards: {err}") from err


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    cli.setup_logging(args.log_level)
    _check_args(args)
    max_deg = args.max_deg[0] if len(args.max_deg) == 1 else args.max_deg
    try:
        summary = precompute(args.shards, args.store, rotations=args.rotations, model=args.model,
                             face_size=args.face_size, input_size=args.input_size, seed=args.seed, max_deg=max_deg,
                             replicas=args.replicas, limit=args.limit, height=args.height, split=args.split,
                             device=args.device, dtype=args.dtype, num_gpus=args.num_gpus, num_cpus=args.num_cpus,
                             max_inflight=args.max_inflight, max_batch_faces=args.max_batch_faces,
                             ray_address=args.ray_address, ray=args.ray, progress=args.ray)
    except TeacherUnavailableError as err:
        raise cli.UserError(str(err)) from err
    bad = summary["skipped_bad"]
    print(f"computed {summary['computed']} panoramas, skipped {summary['skipped_existing']} already stored and "
          f"{sum(bad.values())} unreadable ({', '.join(f'{k} {v}' for k, v in sorted(bad.items())) or 'none'}), "
          f"{summary['invalid_faces']} invalid faces, {summary['wall_seconds']:.1f} s wall")
    print(f"store: {summary['panoramas']} panoramas, {summary['bytes_per_panorama'] / 1024:.1f} KiB per panorama, "
          f"{summary['bytes_on_disk'] / 2**20:.1f} MiB on disk")
    print(f"teacher time: {summary['teacher_seconds']:.1f} s in all "
          f"({summary['teacher_seconds_per_panorama'] * 1000:.1f} ms per panorama); each training epoch served "
          f"from the store saves {summary['teacher_seconds_per_epoch']:.1f} s of teacher time")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
