"""From ``data.*`` configuration to the training batch stream and the validation set.

``data.source=generated`` renders scenes with ``sharding.synthetic`` and shards them once into a cache
folder keyed by the generation settings (``data.generated``): labeled panoramas of one style, unlabeled
ones of another (with watermarks, like real captures), and a labeled validation set. Seeds of the three
sets never overlap. Rendering holds an exclusive lock on the cache entry (``gen-<digest>.lock``): a second
process that would render the same entry at the same time is refused with the holder's pid; once the
shards exist, any number of runs read them without a lock. ``data.source=shards`` reads the shards named in
``data.labeled``, ``data.unlabeled`` and ``data.val`` (tar paths, globs, brace patterns, or
``manifest.json`` files).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from sharding.cli import UserError
from student.config import TrainConfig

log = logging.getLogger("pano_distill.data")

# Seed offsets of the generated sets: disjoint scenes for labeled, unlabeled and validation data.
_SEED_OFFSETS = {"labeled": 0, "unlabeled": 100_000, "val": 200_000}


def _generated_dir(cfg: TrainConfig) -> Path:
    g = cfg.data.generated
    key = json.dumps({k: getattr(g, k) for k in ("labeled", "unlabeled", "val", "labeled_style", "unlabeled_style",
                                                   "val_style", "height", "windows", "watermark",
                                                   "samples_per_shard", "seed")}, sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return Path(g.cache_dir).expanduser() / f"gen-{digest}"


def _build_generated(out: Path, count: int, style: str, seed: int, *, height: int, windows: bool,
                     watermark: bool, samples_per_shard: int) -> None:
    from sharding.build import build

    if (out / "manifest.json").is_file():
        return
    tmp = out.with_name(out.name + ".tmp")
    log.info("rendering %d generated %s panoramas (seed %d) into %s", count, style, seed, out)
    build("generated", None, tmp, count=count, style=style, height=height, seed=seed, windows=windows,
          watermark=watermark, samples_per_shard=samples_per_shard, overwrite=True)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)


def prepare_data(cfg: TrainConfig) -> TrainConfig:
    """Make sure the shards exist; for generated data, render them once and point the config at them."""
    if cfg.data.source != "generated":
        return cfg
    g = cfg.data.generated
    root = _generated_dir(cfg)
    sets = {"labeled": (g.labeled, g.labeled_style, False), "unlabeled": (g.unlabeled, g.unlabeled_style, g.watermark),
            "val": (g.val, g.val_style, False)}
    todo = [name for name, (count, _, _) in sets.items() if count > 0 and not (root / name / "manifest.json").is_file()]
    if todo:
        from student.checkpoint import Lock

        with Lock(root.with_name(root.name + ".lock"), f"the generated-data cache {root}"):
            for name in todo:  # _build_generated skips a set another writer finished meanwhile
                count, style, watermark = sets[name]
                _build_generated(root / name, count, style, g.seed + _SEED_OFFSETS[name], height=g.height,
                                 windows=g.windows, watermark=watermark, samples_per_shard=g.samples_per_shard)
    cfg.data.source = "shards"
    cfg.data.labeled = [str(root / "labeled" / "manifest.json")] if g.labeled else []
    cfg.data.unlabeled = [str(root / "unlabeled" / "manifest.json")] if g.unlabeled else []
    cfg.data.val = [str(root / "val" / "manifest.json")] if g.val else []
    return cfg


class BatchStream:
    """Mixed half/half batches forever, epoch after epoch, each carrying the position to resume after it."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        while True:
            produced = False
            for batch in self.loader:
                produced = True
                batch["position"] = self.loader.state_dict()
                yield batch
            if not produced:
                raise RuntimeError("the training data yielded no batch in a whole epoch: too few samples for "
                                   "data.batch_size on this many workers (see the data-plane log)")

    def skipped(self) -> dict[str, int]:
        return self.loader.skipped()

    def close(self) -> None:
        pass


def build_train_stream(cfg: TrainConfig, rank: int, world_size: int, position: dict | None) -> BatchStream:
    from sharding.stream import make_loader

    cfg = prepare_data(cfg)
    d = cfg.data
    if not d.labeled:
        raise UserError("no labeled shards: set data.labeled (the epoch is defined by the labeled stream)")
    unlabeled = d.unlabeled or None
    if unlabeled is None and cfg.distill.pseudo_weight > 0 and cfg.teacher.mode != "none":
        raise UserError("pseudo labels need unlabeled panoramas: set data.unlabeled, or teacher.mode=none")
    loader = make_loader(d.labeled, batch_size=d.batch_size, unlabeled_urls=unlabeled, num_workers=d.num_workers,
                         height=d.height, rank=rank, world_size=world_size, seed=cfg.run.seed, shuffle=d.shuffle,
                         mask_store=d.mask_store or None, split=_split(d.labeled, d.labeled_split),
                         unlabeled_split=_split(d.unlabeled, d.unlabeled_split),
                         pin_memory=torch.cuda.is_available(), allow_pipe=d.allow_pipe)
    if position:
        loader.load_state_dict(position)
    return BatchStream(loader)


def _split(urls: list[str], wanted: str = "", prefer: tuple[str, ...] = ("train",)) -> str | None:
    """The split to read from manifests: ``wanted``, else the only one, else the first of ``prefer``."""
    if wanted:
        return wanted
    for u in urls:
        p = Path(u).expanduser()
        m = p if p.name == "manifest.json" else p / "manifest.json"
        if m.is_file():
            from sharding.manifest import load_manifest

            splits = list(load_manifest(m)["splits"])  # an invalid manifest: a UserError naming the file
            if len(splits) == 1:
                return splits[0]
            for name in prefer:
                if name in splits:
                    return name
            return splits[0]
    return None


def val_evaluator(cfg: TrainConfig, device: torch.device, amp_dtype: torch.dtype | None):
    """A function model -> evaluation report on ``data.val``, or None when there is no validation set."""
    cfg = prepare_data(cfg)
    if not cfg.data.val:
        return None
    from sharding.stream import read_samples
    from student.evaluate import evaluate_predictor, student_predictor

    e = cfg.eval

    def samples():
        return read_samples(cfg.data.val, height=cfg.data.height,
                            split=_split(cfg.data.val, cfg.data.val_split, ("val", "test")), labeled=True,
                            allow_pipe=cfg.data.allow_pipe)

    def evaluate(model: torch.nn.Module) -> dict:
        report = evaluate_predictor(student_predictor(model, amp_dtype), samples(), device=device, protocol=e.protocol,
                                    max_depth=e.max_depth, crop=e.crop, max_images=e.max_images,
                                    batch_size=max(1, cfg.data.batch_size))
        report["shards"] = cfg.data.val
        return report

    evaluate.samples = samples  # for the run's preview picture
    return evaluate
