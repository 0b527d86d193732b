"""From ``teacher.*`` configuration to a label source, with an honest offline fallback.

``teacher.mode``: ``inprocess`` (the teacher on the student's device), ``ray`` (a pool of actor
replicas), ``cached`` (a precomputed store), ``hybrid`` (store or online per sample), ``oracle`` (exact
disparity of generated scenes; for measuring the mechanism, never a default) or ``none`` (labeled only).

When ``teacher.model`` is a hub id whose weights are neither cached nor reachable (no network), and
``teacher.offline_fallback`` is on, the run says so plainly and uses the best local teacher instead: the
project's own perspective teacher (trained on generated scenes, ``teacher_server/weights``), or, if
that is missing, a tiny random one announced as a demonstration of the plumbing only.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

import torch

from student.config import TeacherConfig, TrainConfig

log = logging.getLogger("pano_distill.teacher")

LOCAL_TEACHER = Path(__file__).resolve().parents[1] / "teacher_server" / "weights" / "pano-distill-perspective-v2"


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _cached_locally(model_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - any failure means "not usable from the cache"
        return False


def local_teacher_input_size(folder: Path = LOCAL_TEACHER, default: int = 518) -> int:
    info = folder / "pano_distill.json"
    if info.is_file():
        return int(json.loads(info.read_text()).get("input_size", default))
    return default


def resolve_teacher(tcfg: TeacherConfig) -> tuple[str, int, str]:
    """(model to load, input size, a sentence for the log) after the offline check."""
    from teacher_server.models import resolve_model_name

    name = resolve_model_name(tcfg.model)
    is_hub_id = not Path(name).exists() and not name.startswith(("tiny-random", "random:", "toy:"))
    if not is_hub_id or _cached_locally(name) or _hub_reachable():
        return name, tcfg.input_size, f"teacher {name}"
    if not tcfg.offline_fallback:
        return name, tcfg.input_size, f"teacher {name}"  # loading will fail with instructions
    if (LOCAL_TEACHER / "config.json").is_file():
        size = local_teacher_input_size()
        msg = (f"OFFLINE: the teacher {name} cannot be downloaded here and is not cached. Using the project's "
               f"own perspective teacher ({LOCAL_TEACHER.name}, trained on generated perspective views, input "
               f"{size}px) instead. It knows generated scenes, not real photos; point teacher.model at a local "
               f"copy of {name} for real data.")
        log.warning(msg)
        return str(LOCAL_TEACHER), size, f"teacher {LOCAL_TEACHER.name} (offline fallback)"
    msg = (f"OFFLINE: the teacher {name} cannot be downloaded and no local teacher exists; using a TINY RANDOM "
           "teacher. Its pseudo labels are meaningless: this run demonstrates the plumbing only.")
    log.warning(msg)
    return "tiny-random", min(tcfg.input_size, 98), "teacher tiny-random (offline fallback: plumbing only)"


def pool_options(tcfg: TeacherConfig, input_size: int, resources: str = "") -> dict:
    """Keyword arguments of ``RayTeacherPool`` for a teacher configuration."""
    return dict(replicas=tcfg.replicas, num_gpus=tcfg.gpus_per_replica, num_cpus=tcfg.cpus_per_replica,
                max_inflight=tcfg.max_inflight, input_size=input_size, dtype=tcfg.dtype,
                metrics_port=tcfg.metrics_port if tcfg.metrics_port >= 0 else None,
                resources={resources: 1} if resources else None)


def build_backend(tcfg: TeacherConfig, device: torch.device, *, teacher_service=None, resources: str = ""):
    """The face-answering backend (in-process, a Ray pool, or the cluster's shared service) and a description."""
    if teacher_service is not None:
        from teacher_server.service import ServiceClient

        return ServiceClient(teacher_service), "teacher service shared by the cluster's workers"
    model, input_size, description = resolve_teacher(tcfg)
    if tcfg.mode == "ray":
        from teacher_server.pool import RayTeacherPool

        return RayTeacherPool(model, **pool_options(tcfg, input_size, resources)), description
    from teacher_server.inprocess import InProcessTeacher

    return InProcessTeacher(model, device=device, dtype=tcfg.dtype, input_size=input_size), description


def build_label_source(cfg: TrainConfig, device: torch.device, *, teacher_service=None):
    """The label source of a run, or None when no pseudo labels are used."""
    t = cfg.teacher
    if t.mode == "none" or cfg.distill.pseudo_weight <= 0:
        return None
    if t.mode == "oracle":
        from teacher_server.oracle import OracleLabels

        log.info("teacher: ORACLE (exact disparity of generated scenes, affine=%s, noise=%s); for measuring the "
                 "mechanism only", t.oracle_affine, t.oracle_noise)
        return OracleLabels(affine=t.oracle_affine, noise=t.oracle_noise, seed=cfg.run.seed)
    from teacher_server.labels import CachedLabels, HybridLabels, OnlineLabels

    cached = None
    if t.mode in ("cached", "hybrid"):
        from teacher_server.store import PseudoLabelStore

        store = PseudoLabelStore(t.store, readonly=True)
        model, input_size, _ = resolve_teacher(t)
        store.check(model=model, face_size=cfg.face_size, input_size=input_size)
        cached = CachedLabels(store, seed=cfg.run.seed)
        if t.mode == "cached":
            log.info("teacher: cached pseudo labels from %s", t.store)
            return cached
    backend, description = build_backend(t, device, teacher_service=teacher_service,
                                         resources=cfg.cluster.teacher_resources)
    log.info("%s (%s backend)", description, "ray" if t.mode == "ray" else "in-process")
    online = OnlineLabels(backend)
    if t.mode == "hybrid":
        return HybridLabels(online, cached, online_fraction=t.hybrid_online_fraction, seed=cfg.run.seed)
    return online
