"""Typed run configuration: the single source of truth for a training run.

A run is configured by the dataclasses below, a YAML file (``--config``) that overrides their defaults, and
trailing ``key=value`` arguments that override dotted fields (``optim.steps=20 run.out_dir=/tmp/r``).
Unknown keys, ill-typed values, modes outside their ``Literal`` choices and non-finite numbers are refused
with the offending key named (a ``ConfigError``: one line, exit code 2): a typo must not silently train
the wrong thing. Every field carries one line of help in its metadata; ``python -m student.train --help``
lists them all (``help_text``). The resolved configuration is written next to every checkpoint.

The parsing itself (typed coercion, merging, overrides, help lines) is ``student.typed_config``;
this module is the schema, its cross-field checks and the entry points.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from student import typed_config
from student.typed_config import ConfigError, help_lines, merge, opt, parse_override, section, yaml_problem


@dataclass
class RunConfig:
    """Run folder, seed, device, logging and checkpoints."""

    out_dir: str = opt("runs/demo", "run folder: config.yaml, metrics.jsonl, checkpoints/, eval.json, train.log")
    seed: int = opt(0, "seed of weights, data order, rotations and augmentation")
    device: str = opt("auto", "auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    log_every: int = opt(10, "steps per metrics.jsonl line (>= 1)")
    ckpt_every: int = opt(100, "steps between checkpoints; 0: only at the end")
    keep_checkpoints: int = opt(2, "newest step_* folders kept; 0 keeps all")
    check_every: int = opt(50, "steps between checks that every parameter is finite (>= 1)")
    metrics_port: int = opt(-1, "Prometheus endpoint of the trainer; -1 off, 0 any free port")
    metrics_host: str = opt("127.0.0.1", "address the Prometheus endpoint binds")
    progress: bool = opt(True, "show a progress bar")
    tensorboard: bool = opt(False, "also write TensorBoard event files into the run folder")


@dataclass
class GeneratedDataConfig:
    """Generated scenes (sharding.synthetic) sharded once into a cache folder, for demos and CI."""

    labeled: int = opt(64, "labeled panoramas rendered")
    unlabeled: int = opt(128, "unlabeled panoramas rendered")
    val: int = opt(16, "held-out labeled panoramas for evaluation")
    labeled_style: str = opt("apartment", "scene style of the labeled set")
    unlabeled_style: str = opt("house", "scene style of the unlabeled set")
    val_style: str = opt("apartment", "scene style of the validation set")
    height: int = opt(256, "rendering resolution (training resolution is data.height)")
    windows: bool = opt(True, "windows onto sky in the scenes")
    watermark: bool = opt(True, "a watermark at the nadir of unlabeled panoramas, as on real captures")
    samples_per_shard: int = opt(8, "panoramas per tar shard")
    seed: int = opt(0, "first scene seed (the three sets never overlap)")
    cache_dir: str = opt("~/.cache/pano-distill/generated", "where rendered shards are kept between runs")


@dataclass
class DataConfig:
    """Training and validation data."""

    source: Literal["generated", "shards"] = opt("generated", "generated scenes, or the shards named below")
    labeled: list[str] = opt([], "labeled shards: tar paths, globs, brace patterns or manifest.json")
    unlabeled: list[str] = opt([], "unlabeled shards (pseudo labels), same forms")
    val: list[str] = opt([], "validation shards, same forms")
    labeled_split: str = opt("", "split read from a manifest.json; empty: its only split, or train")
    unlabeled_split: str = opt("", "split of the unlabeled manifest; empty: as above")
    val_split: str = opt("", "split of the validation manifest; empty: val, else test, else the only one")
    allow_pipe: bool = opt(False, "accept pipe:COMMAND shard addresses (runs a shell command per shard)")
    height: int = opt(256, "training resolution, a multiple of 16; width is 2 * height")
    batch_size: int = opt(4, "panoramas per step per rank, half labeled and half unlabeled (even)")
    num_workers: int = opt(2, "data loader processes per rank")
    shuffle: int = opt(64, "shuffle buffer, in samples")
    mask_store: str = opt("", "LMDB of sky/watermark masks (sharding.masks); empty: none")
    generated: GeneratedDataConfig = section(GeneratedDataConfig)


@dataclass
class ModelConfig:
    """The student network."""

    name: str = opt("unifuse", "unifuse, bifusepp, rectnet, or their *_tiny variants for CI")
    encoder: str = opt("", "empty: the model's default (UniFuse ResNet-18, BiFuse++ ResNet-34)")
    pretrained: str = opt("", "ImageNet encoder weights: local .pth, HF id or folder; empty: random init")
    options: dict[str, Any] = opt({}, "further fields of the model's config dataclass")

    @property
    def label(self) -> str:
        return f"{self.name}-{self.encoder}" if self.encoder else self.name


@dataclass
class TeacherConfig:
    """The perspective teacher that answers the cube faces of unlabeled panoramas."""

    mode: Literal["inprocess", "ray", "cached", "hybrid", "oracle", "none"] = opt(
        "inprocess", "where pseudo labels come from (oracle: exact depth of generated scenes, for measurements)")
    model: str = opt("depth-anything/Depth-Anything-V2-Small-hf", "HF id, local folder, or tiny-random")
    offline_fallback: bool = opt(True, "weights unreachable: use the best local teacher, announced")
    input_size: int = opt(518, "teacher input resolution (a multiple of its ViT patch)")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = opt("auto", "auto: bf16 on GPU, fp32 on CPU")
    replicas: int = opt(1, "teacher actors (mode=ray)")
    gpus_per_replica: float = opt(0.0, "GPUs per teacher actor")
    cpus_per_replica: float = opt(1.0, "CPUs per teacher actor")
    max_inflight: int = opt(2, "requests in flight per replica (backpressure)")
    lookahead: int = opt(1, "batches requested ahead of the step")
    store: str = opt("", "precomputed pseudo-label LMDB (teacher_server.precompute), for cached/hybrid")
    hybrid_online_fraction: float = opt(0.5, "hybrid: fraction of samples labeled online")
    oracle_affine: bool = opt(True, "oracle: random scale/shift per face, like a relative teacher")
    oracle_noise: float = opt(0.0, "oracle: relative noise added to its disparity")
    metrics_port: int = opt(-1, "first replica's Prometheus port; -1 off")


@dataclass
class DistillConfig:
    """The distillation loss."""

    face_size: int = opt(0, "cube face size of the pseudo loss; 0: data.height // 2")
    rotation: bool = opt(True, "random cube rotation per sample; false: the no-rotation ablation")
    max_deg: list[float] = opt([45.0, 45.0, 45.0], "yaw, pitch, roll limits of the rotation, degrees")
    use_masks: bool = opt(True, "sky/watermark masks on the pseudo-label loss")
    labeled_weight: float = opt(1.0, "weight of the labeled loss; 0 with no labeled data")
    pseudo_weight: float = opt(1.0, "weight of the pseudo-label loss; 0: labeled only")
    augment: bool = opt(True, "student-side yaw roll, flip and colour jitter")
    color_jitter: float = opt(0.2, "colour jitter amplitude")


@dataclass
class OptimConfig:
    """Optimizer and schedule."""

    steps: int = opt(1000, "optimizer steps of the whole run (>= 1)")
    lr: float = opt(1e-4, "Adam learning rate")
    betas: list[float] = opt([0.9, 0.999], "Adam betas")
    weight_decay: float = opt(0.0, "Adam weight decay")
    grad_clip: float = opt(1.0, "gradient norm clip; 0: none")
    amp: Literal["auto", "bf16", "fp16", "off"] = opt("auto", "autocast dtype; auto: bf16 on GPU, off on CPU")
    schedule: Literal["constant", "cosine"] = opt("constant", "cosine: decay to min_lr_ratio * lr at the last step")
    warmup_steps: int = opt(0, "linear warm-up from 0 (both schedules)")
    min_lr_ratio: float = opt(0.1, "cosine: final lr as a fraction of optim.lr, in [0, 1]")
    max_nonfinite: int = opt(5, "stop after this many non-finite losses in a row")


@dataclass
class EvalConfig:
    """Evaluation on data.val."""

    protocol: Literal["lstsq", "median"] = opt("lstsq", "alignment of relative predictions to ground truth")
    max_depth: float = opt(10.0, "metres; ground truth beyond is ignored")
    crop: int = opt(0, "rows cropped at the top and bottom")
    max_images: int = opt(0, "0: all of data.val")
    every: int = opt(0, "evaluate every N steps during training; 0: only at the end")


@dataclass
class ClusterConfig:
    """Ray Train workers with DeepSpeed."""

    num_workers: int = opt(0, "0: one process; >= 1: Ray Train workers with DeepSpeed")
    address: str = opt("", "Ray address; empty: local, or auto under a Ray job")
    use_gpu: bool = opt(False, "workers use GPUs")
    cpus_per_worker: float = opt(1.0, "CPUs per worker")
    gpus_per_worker: float = opt(1.0, "GPUs per worker; < 1 lets workers share a card")
    zero_stage: int = opt(0, "DeepSpeed ZeRO stage: 0, 1 or 2")
    max_failures: int = opt(2, "worker failures tolerated (restart from the last checkpoint)")
    teacher_resources: str = opt("", "custom resource of teacher nodes, e.g. teacher_node")
    student_resources: str = opt("", "custom resource of student nodes, e.g. student_node")
    teacher_wait_s: float = opt(300.0, "seconds a run waits for a node offering teacher_resources when none "
                                       "is left (an autoscaler may bring one back), then stops: TeacherNodesLost")
    metrics_port: int = opt(8081, "worker r exports Prometheus metrics on metrics_port + r; -1 off")
    allow_resize: bool = opt(False, "accept a different worker count than the checkpoint's")


@dataclass
class AdversarialConfig:
    """Lee et al. 2020: synthetic-to-real adaptation with smoothness, normal and adversarial losses."""

    enabled: bool = opt(False, "use this recipe instead of distillation")
    pretrain_steps: int = opt(100, "depth-only phase before the adversarial phase")
    depth_weight: float = opt(1.0, "beta_depth")
    smooth_weight: float = opt(0.2, "beta_smooth")
    normal_weight: float = opt(0.4, "beta_normal")
    adv_weight: float = opt(1e-3, "alpha")
    disc_lr: float = opt(1e-4, "discriminator learning rate")
    disc_weight_decay: float = opt(1e-4, "gamma")
    disc_encoder: str = opt("resnet18", "discriminator encoder")


@dataclass
class TrainConfig:
    run: RunConfig = section(RunConfig)
    data: DataConfig = section(DataConfig)
    model: ModelConfig = section(ModelConfig)
    teacher: TeacherConfig = section(TeacherConfig)
    distill: DistillConfig = section(DistillConfig)
    optim: OptimConfig = section(OptimConfig)
    eval: EvalConfig = section(EvalConfig)
    cluster: ClusterConfig = section(ClusterConfig)
    adversarial: AdversarialConfig = section(AdversarialConfig)

    def validate(self) -> "TrainConfig":
        """Checks across fields and ranges (types and modes were checked when parsing)."""
        at_least = {"optim.steps": (self.optim.steps, 1), "run.log_every": (self.run.log_every, 1),
                    "run.check_every": (self.run.check_every, 1), "data.height": (self.data.height, 16),
                    "distill.face_size": (self.distill.face_size, 0), "run.ckpt_every": (self.run.ckpt_every, 0),
                    "optim.warmup_steps": (self.optim.warmup_steps, 0), "optim.max_nonfinite": (self.optim.max_nonfinite, 1),
                    "data.num_workers": (self.data.num_workers, 0), "teacher.input_size": (self.teacher.input_size, 1),
                    "cluster.num_workers": (self.cluster.num_workers, 0),
                    "cluster.teacher_wait_s": (self.cluster.teacher_wait_s, 0)}
        for key, (value, low) in at_least.items():
            if value < low:
                raise ConfigError(f"{key} must be >= {low}, got {value}")
        if self.distill.face_size == 1:  # 0 is the documented "auto" (height // 2), not a size
            raise ConfigError("distill.face_size must be 0 (auto: data.height // 2) or a size >= 2, got 1")
        if not 0.0 <= self.optim.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.optim.min_lr_ratio}")
        if self.data.batch_size < 2 or self.data.batch_size % 2:
            raise ConfigError(f"data.batch_size must be even and >= 2 (half labeled, half unlabeled), "
                              f"got {self.data.batch_size}")
        if self.data.height % 16:
            raise ConfigError(f"data.height must be a multiple of 16, got {self.data.height}")
        for key, port, span in (("run.metrics_port", self.run.metrics_port, 1),
                                ("teacher.metrics_port", self.teacher.metrics_port, self.teacher.replicas),
                                ("cluster.metrics_port", self.cluster.metrics_port, self.cluster.num_workers)):
            if port != -1 and not 0 <= port <= 65535 - max(span - 1, 0):
                raise ConfigError(f"{key} must be -1 (off) or a port in 0-65535 (for every replica/worker), "
                                  f"got {port}")
        if self.data.source == "shards" and not self.data.labeled and self.distill.labeled_weight > 0:
            raise ConfigError("data.source=shards needs data.labeled shards (or distill.labeled_weight=0)")
        if len(self.distill.max_deg) != 3:
            raise ConfigError(f"distill.max_deg must hold yaw, pitch, roll limits, got {self.distill.max_deg}")
        if self.teacher.mode in ("cached", "hybrid") and not self.teacher.store:
            raise ConfigError(f"teacher.mode={self.teacher.mode} needs teacher.store (a precomputed LMDB)")
        if self.cluster.zero_stage not in (0, 1, 2):
            raise ConfigError(f"cluster.zero_stage must be 0, 1 or 2, got {self.cluster.zero_stage}")
        _check_model(self.model)
        return self

    @property
    def face_size(self) -> int:
        return self.distill.face_size or self.data.height // 2


def _check_model(model: ModelConfig) -> None:
    """``model.name``/``encoder``/``options`` as the registry would build them, before anything is written."""
    from student.models import MODEL_NAMES, model_config

    if model.name not in MODEL_NAMES:
        raise ConfigError(f"model.name must be one of {', '.join(MODEL_NAMES)}; got {model.name!r}")
    try:
        model_config(model.name, encoder=model.encoder, **model.options)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"model.encoder/model.options: {err}") from err


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Defaults <- YAML file <- ``key=value`` overrides, validated; a ``ConfigError`` names what is wrong."""
    cfg = TrainConfig()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {p} is not valid YAML: {yaml_problem(err)}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{p} must hold a mapping of config sections, got {type(data).__name__}")
        try:
            merge(cfg, data)
        except ConfigError as err:
            raise ConfigError(f"{p}: {err}") from err
    for arg in overrides:
        merge(cfg, parse_override(arg))
    return cfg.validate()


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(values: dict) -> TrainConfig:
    return merge(TrainConfig(), values).validate()


def dump_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def iter_fields(cls: type = TrainConfig, prefix: str = ""):
    """(dotted key, type, default, help) of every leaf field, in declaration order."""
    return typed_config.iter_fields(cls, prefix)


def help_text() -> str:
    """Every configuration key with its type, default and help, for ``--help``."""
    return "\n".join(help_lines(TrainConfig))
