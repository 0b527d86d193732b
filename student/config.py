"""Typed run configuration: the single source of truth for a training run.

A run is configured by dataclasses below, a YAML file (``--config``) that overrides their defaults, and
trailing ``key=value`` arguments that override dotted fields (``train.steps=20 run.out_dir=/tmp/r``).
Unknown keys and ill-typed values are refused with the offending key named: a typo must not silently
train the wrong thing. The resolved configuration is written next to every checkpoint.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class RunConfig:
    out_dir: str = "runs/demo"
    seed: int = 0
    device: str = "auto"  # auto: cuda if available, else cpu
    log_every: int = 10
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    metrics_port: int = -1  # Prometheus endpoint of the trainer; -1 off, 0 any free port
    metrics_host: str = "127.0.0.1"
    progress: bool = True


@dataclass
class GeneratedDataConfig:
    """Generated scenes (sharding.synthetic) sharded once into a cache folder, for demos and CI."""

    labeled: int = 64
    unlabeled: int = 128
    val: int = 16
    labeled_style: str = "apartment"
    unlabeled_style: str = "house"
    val_style: str = "apartment"
    height: int = 256  # rendering resolution; training resolution is data.height
    windows: bool = True
    watermark: bool = True  # on unlabeled panoramas, as on real captures
    samples_per_shard: int = 8
    seed: int = 0
    cache_dir: str = "~/.cache/pano-distill/generated"


@dataclass
class DataConfig:
    source: str = "generated"  # generated | shards
    labeled: list[str] = field(default_factory=list)  # tar paths/globs/brace patterns or manifest.json
    unlabeled: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    labeled_split: str = ""  # split to read from a manifest.json; "" picks its only split, or "train"
    unlabeled_split: str = ""
    val_split: str = ""  # "" picks "val", else "test", else the only split
    height: int = 256  # training resolution; width is 2 * height
    batch_size: int = 4  # per rank, half labeled and half unlabeled
    num_workers: int = 2
    shuffle: int = 64
    mask_store: str = ""  # LMDB of sky/watermark masks (sharding.masks); "" none
    generated: GeneratedDataConfig = field(default_factory=GeneratedDataConfig)


@dataclass
class ModelConfig:
    name: str = "unifuse"  # unifuse | bifusepp | rectnet (and *_tiny variants for CI)
    encoder: str = ""  # "" for the model's own default (UniFuse: ResNet-18, BiFuse++: ResNet-34)
    pretrained: str = ""  # ImageNet encoder weights: local .pth, HF id or folder; "" random init
    options: dict[str, Any] = field(default_factory=dict)  # further fields of the model's config dataclass

    @property
    def label(self) -> str:
        return f"{self.name}-{self.encoder}" if self.encoder else self.name


@dataclass
class TeacherConfig:
    mode: str = "inprocess"  # inprocess | ray | cached | hybrid | oracle | none
    model: str = "depth-anything/Depth-Anything-V2-Small-hf"  # HF id, local folder, or tiny-random
    offline_fallback: bool = True  # weights unreachable: use the best local teacher, announced
    input_size: int = 518
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    replicas: int = 1
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    max_inflight: int = 2  # requests in flight per replica (backpressure)
    lookahead: int = 1  # batches requested ahead of the step
    store: str = ""  # cached pseudo-label LMDB (teacher_server.precompute)
    hybrid_online_fraction: float = 0.5
    oracle_affine: bool = True  # oracle: random scale/shift per face, like a relative teacher
    oracle_noise: float = 0.0
    metrics_port: int = -1  # first replica's Prometheus port; -1 off


@dataclass
class DistillConfig:
    face_size: int = 0  # 0: data.height // 2
    rotation: bool = True  # False: the no-rotation ablation
    max_deg: list[float] = field(default_factory=lambda: [45.0, 45.0, 45.0])
    use_masks: bool = True  # sky/watermark masks on the pseudo-label loss
    labeled_weight: float = 1.0  # 0 with no labeled data: pseudo labels only
    pseudo_weight: float = 1.0  # 0: labeled only
    augment: bool = True  # student side only: yaw roll, flip, colour jitter
    color_jitter: float = 0.2


@dataclass
class OptimConfig:
    steps: int = 1000
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    amp: str = "auto"  # auto: bf16 on GPU, off on CPU
    schedule: str = "constant"  # constant | cosine: lr decays from optim.lr to min_lr_ratio * optim.lr at the last step
    warmup_steps: int = 0  # linear warm-up from 0 (both schedules)
    min_lr_ratio: float = 0.1
    max_nonfinite: int = 5  # stop after this many non-finite losses in a row


@dataclass
class EvalConfig:
    protocol: str = "median"  # median | lstsq | none
    max_depth: float = 10.0
    crop: int = 0
    max_images: int = 0  # 0: all of data.val
    every: int = 0  # evaluate every N steps during training; 0 only at the end


@dataclass
class ClusterConfig:
    num_workers: int = 0  # 0: one process; >= 1: Ray Train workers with DeepSpeed
    address: str = ""  # Ray address; "" local / auto under a Ray job
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # < 1 lets workers share a card (benchmarks on one GPU)
    zero_stage: int = 0
    max_failures: int = 2
    teacher_resources: str = ""  # custom resource of teacher nodes, e.g. "teacher_node" (cluster/autoscaler.yaml)
    student_resources: str = ""  # custom resource of student nodes, e.g. "student_node"
    metrics_port: int = 8081  # worker r exports on metrics_port + r
    allow_resize: bool = False  # accept a different worker count than the checkpoint's


@dataclass
class AdversarialConfig:
    """Lee et al. 2020: synthetic-to-real adaptation with smoothness, normal and adversarial losses."""

    enabled: bool = False
    pretrain_steps: int = 100  # depth-only phase before the adversarial phase
    depth_weight: float = 1.0  # beta_depth
    smooth_weight: float = 0.2  # beta_smooth
    normal_weight: float = 0.4  # beta_normal
    adv_weight: float = 1e-3  # alpha
    disc_lr: float = 1e-4
    disc_weight_decay: float = 1e-4  # gamma
    disc_encoder: str = "resnet18"


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)

    def validate(self) -> "TrainConfig":
        _choice("data.source", self.data.source, ("generated", "shards"))
        _choice("teacher.mode", self.teacher.mode, ("inprocess", "ray", "cached", "hybrid", "oracle", "none"))
        _choice("eval.protocol", self.eval.protocol, ("median", "lstsq", "none"))
        _choice("optim.amp", self.optim.amp, ("auto", "bf16", "fp16", "off"))
        _choice("optim.schedule", self.optim.schedule, ("constant", "cosine"))
        if self.optim.warmup_steps < 0 or not 0.0 <= self.optim.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.warmup_steps must be >= 0 and optim.min_lr_ratio in [0, 1]; got "
                             f"{self.optim.warmup_steps} and {self.optim.min_lr_ratio}")
        if self.data.batch_size < 2 or self.data.batch_size % 2:
            raise ValueError(f"data.batch_size must be even and >= 2 (half labeled, half unlabeled), "
                             f"got {self.data.batch_size}")
        if self.data.height % 16:
            raise ValueError(f"data.height must be a multiple of 16, got {self.data.height}")
        if self.data.source == "shards" and not self.data.labeled and self.distill.labeled_weight > 0:
            raise ValueError("data.source=shards needs data.labeled shards (or distill.labeled_weight=0)")
        if len(self.distill.max_deg) != 3:
            raise ValueError(f"distill.max_deg must hold yaw, pitch, roll limits, got {self.distill.max_deg}")
        if self.teacher.mode in ("cached", "hybrid") and not self.teacher.store:
            raise ValueError(f"teacher.mode={self.teacher.mode} needs teacher.store (a precomputed LMDB)")
        if self.cluster.zero_stage not in (0, 1, 2):
            raise ValueError(f"cluster.zero_stage must be 0, 1 or 2, got {self.cluster.zero_stage}")
        return self

    @property
    def face_size(self) -> int:
        return self.distill.face_size or self.data.height // 2


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check/convert one YAML value to the annotated type, naming the key on failure."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a mapping, got {value!r}")
        return _merge(tp(), value, key + ".")
    if origin in (typing.Union, types.UnionType):
        last = None
        for arg in typing.get_args(tp):
            try:
                return _coerce(key, value, arg)
            except ValueError as err:
                last = err
        raise last  # type: ignore[misc]
    if tp is type(None):
        if value is None:
            return None
        raise ValueError(f"{key} must be null, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if value is None:
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"{key} must be a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp} at {key}")


def _merge(obj: Any, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in values.items():
        if k not in names:
            raise ValueError(f"unknown config key {prefix}{k!s}; known keys here: {', '.join(sorted(names))}")
        current = getattr(obj, k)
        if dataclasses.is_dataclass(current) and isinstance(v, dict):
            _merge(current, v, f"{prefix}{k}.")
        else:
            setattr(obj, k, _coerce(prefix + k, v, hints[k]))
    return obj


def parse_override(arg: str) -> dict:
    """``a.b.c=value`` -> nested dict; the value is read as YAML (numbers, booleans, lists)."""
    if "=" not in arg:
        raise ValueError(f"override {arg!r} must look like key=value (e.g. optim.steps=20)")
    key, raw = arg.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Defaults <- YAML file <- ``key=value`` overrides, validated."""
    cfg = TrainConfig()
    if path:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} not found")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{p} must hold a mapping of config sections, got {type(data).__name__}")
        _merge(cfg, data)
    for arg in overrides:
        _merge(cfg, parse_override(arg))
    return cfg.validate()


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(values: dict) -> TrainConfig:
    return _merge(TrainConfig(), values).validate()


def dump_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
