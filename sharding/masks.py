"""Offline sky/watermark validity masks for WebDataset panorama shards, into an LMDB :class:`MaskStore`.

Usage::

    # GroundingDINO + SAM over shards (resumable: keys already in the store are skipped)
    python -m sharding.masks --shards data/shards --store data/masks.lmdb \\
        [--detector IDEA-Research/grounding-dino-base] [--sam ~/.cache/pano-distill/sam_vit_b_01ec64.pth] \\
        [--box-threshold 0.3] [--text-threshold 0.25] [--prompts sky watermark] [--min-valid 0.2] \\
        [--shard-mask prefer|combine|ignore] [--limit N] [--ray --replicas N [--ray-address ADDR]]

    # import masks that came with the data (255 = valid, 0 = sky), key = file name without "_valid.png"
    python -m sharding.masks --store data/masks.lmdb --import-masks ../shared/samples/outdoor [--key-prefix P]

    # plumbing demo / CI without weights (random tiny models, meaningless masks)
    python -m sharding.masks --shards data/shards --store /tmp/m.lmdb --tiny-random

``--shards`` takes what ``sharding.stream`` takes (shard files, globs, brace patterns such as
``train-{000000..000009}.tar``, a ``manifest.json`` or the folder holding it: every split unless ``--split``)
and also folders of ``*.tar`` without a manifest. Shards are read with ``sharding.stream.iter_shard``, the
trainer's reader, so keys and damaged-shard handling are the same as in training. The pipeline and its defaults are described in
:mod:`sharding.segmenters`: GroundingDINO ``IDEA-Research/grounding-dino-base`` on the whole equirect image
(512 x 1024), prompts "sky" and "watermark", box threshold 0.3, text threshold 0.25, SAM ViT-B
(``sam_vit_b_01ec64.pth``, https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth) inside
each box, the union of the segments is invalid. Masks are stored at the panorama's native resolution.

Masks that come with a shard sample (``K.mask.png``, e.g. imported ``*_valid.png``), ``--shard-mask``:

* ``prefer`` (default): the shard's mask is taken as is (source ``"imported"``) and the models do not run
  on that panorama. A hand-made or dataset-provided mask is better than the detector's, and the reader
  ANDs the shard mask with the store's mask anyway (docs/CONTRACTS.md), so nothing is lost.
* ``combine``: the models run and the stored mask is ``shard_mask AND model_mask`` (source
  ``"combined"``); for data whose masks cover only part of the invalid region (e.g. sky, not watermarks).
* ``ignore``: the shard's mask is not looked at (source ``"model"``).

Panoramas with a valid fraction under ``--min-valid`` (0.2) are recorded as rejected (the mask is stored
too). The store's metadata records the models and thresholds; running with other settings into a store
made with different ones stops with the list of differing fields (``--allow-mismatch`` to go on anyway).

With ``--ray`` the panoramas are spread over ``--replicas`` Ray actors (one torch thread each, one CPU or
``--gpus-per-replica``), with a bounded number of panoramas in flight; the driver is the only writer.
Without ``--ray-address`` a local single-node cluster bound to 127.0.0.1 is started.

A run that stops halfway is resumed by running it again: stored keys are skipped (``--overwrite`` redoes
them). A sample that cannot be decoded is skipped, counted and named in the summary; an unreadable or
truncated shard is named too, and the run goes on.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from sharding.mask_store import DEFAULT_MIN_VALID, MaskStore, load_mask_png
from sharding.segmenters import (
    DEFAULT_BOX_THRESHOLD,
    DEFAULT_DETECTOR,
    DEFAULT_MAX_BOXES,
    DEFAULT_PROMPTS,
    DEFAULT_SAM_CHECKPOINT,
    DEFAULT_TEXT_THRESHOLD,
    TINY_RANDOM,
    MaskerConfig,
)

log = logging.getLogger("sharding.masks")

SHARD_MASK_RULES = ("prefer", "combine", "ignore")
_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


# ------------------------------------------------------------------------------------------ shard reading
@dataclass
class RawSample:
    """The undecoded members of one shard sample."""

    key: str
    shard: str
    rgb: bytes | None = None
    rgb_name: str | None = None
    mask: bytes | None = None
    meta: bytes | None = None


def resolve(specs: Sequence[str | os.PathLike], split: str | None = None) -> list[tuple[str, int | None]]:
    """``(shard url, manifest count or None)`` for ``--shards``: what ``sharding.stream`` accepts (tar paths,
    globs, brace patterns, a ``manifest.json`` or a folder holding one; every split unless ``split``),
    plus folders of ``*.tar`` without a manifest."""
    from sharding.manifest import MANIFEST, load_manifest, resolve_shards

    out: list[tuple[str, int | None]] = []
    for spec in specs:
        p = Path(spec).expanduser()
        if p.is_dir() and not (p / MANIFEST).is_file():
            found = sorted(str(x) for x in p.glob("*.tar"))
            if not found:
                raise FileNotFoundError(f"no *.tar shards (and no {MANIFEST}) in {p}")
            out += [(i.url, i.count) for i in resolve_shards(found, count=False)]
        elif split is None and (p.is_dir() or p.name == MANIFEST):
            mpath = p / MANIFEST if p.is_dir() else p
            for sp in load_manifest(mpath)["splits"]:
                out += [(i.url, i.count) for i in resolve_shards(str(mpath), sp, count=False)]
        else:
            out += [(i.url, i.count) for i in resolve_shards(str(p), split, count=False)]
    seen: set[str] = set()
    return [x for x in out if not (x[0] in seen or seen.add(x[0]))]


def expand_shards(specs: Sequence[str | os.PathLike], split: str | None = None) -> list[str]:
    """Shard URLs for ``--shards`` (see :func:`resolve`)."""
    return [u for u, _ in resolve(specs, split)]


def _iter_shard_samples(shards: Iterable[tuple[str, int | None]], errors: list[tuple[str, str]]) -> Iterator[RawSample]:
    """Samples of the shards in order, undecoded, read by ``sharding.stream.iter_shard`` (the trainer's
    reader). A damaged shard, or one with fewer samples than its manifest count, is appended to ``errors``
    as ``(shard, reason)``; the next shard is read."""
    from sharding.stream import iter_shard

    def on_skip(reason: str, name: str, detail: str = "") -> None:
        errors.append((name, f"{reason}: {detail}" if detail else reason))

    for url, count in shards:
        for raw in iter_shard(url, count, on_skip):
            rgb_name = next((k for k in raw if k.startswith("rgb.") and k[4:] in _IMAGE_EXTS), None)
            yield RawSample(
                key=raw["__key__"], shard=url,
                rgb=raw.get(rgb_name) if rgb_name else None,
                rgb_name=f"{raw['__key__']}.{rgb_name}" if rgb_name else None,
                mask=raw.get("mask.png"), meta=raw.get("meta.json"),
            )


# ------------------------------------------------------------------------------------------ per sample
class SampleError(Exception):
    """A sample that cannot be used; the message names what is wrong."""


def decode_rgb(sample: RawSample) -> np.ndarray:
    from PIL import Image

    if sample.rgb is None:
        raise SampleError("no rgb.jpg/rgb.png member")
    try:
        with Image.open(io.BytesIO(sample.rgb)) as im:
            im.load()
            rgb = np.asarray(im.convert("RGB"))
    except Exception as exc:
        raise SampleError(f"cannot decode {sample.rgb_name}: {type(exc).__name__}: {exc}") from exc
    if rgb.shape[0] < 2 or rgb.shape[1] < 2:
        raise SampleError(f"{sample.rgb_name} is too small: {rgb.shape[1]}x{rgb.shape[0]}")
    return rgb


def decode_shard_mask(sample: RawSample, shape: tuple[int, int] | None) -> np.ndarray | None:
    """The sample's ``mask.png`` (255 = valid) as bool at ``shape`` (nearest neighbour), or ``None``."""
    if sample.mask is None:
        return None
    try:
        mask = _mask_from_bytes(sample.mask)
    except Exception as exc:
        raise SampleError(f"cannot decode {sample.key}.mask.png: {exc}") from exc
    if shape is not None and mask.shape != tuple(shape):
        rows = (np.arange(shape[0]) * mask.shape[0] // shape[0]).clip(0, mask.shape[0] - 1)
        cols = (np.arange(shape[1]) * mask.shape[1] // shape[1]).clip(0, mask.shape[1] - 1)
        mask = mask[rows][:, cols]
    return mask


def _mask_from_bytes(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if im.mode in ("RGBA", "LA", "PA"):
            im = im.convert("RGBA").convert("RGB")
        return np.asarray(im.convert("L")) > 127


@dataclass
class SampleResult:
    key: str
    valid: np.ndarray | None = None
    source: str = ""
    boxes: dict = field(default_factory=dict)  # prompt -> number of boxes
    error: str | None = None


def process_sample(masker: Any, sample: RawSample, rule: str) -> SampleResult:
    """Decode one sample and make its validity mask (never raises for a bad sample: ``error`` says why)."""
    try:
        if rule == "prefer" and sample.mask is not None:
            # the shard's own mask, taken as is; the image is still decoded to check that the sample is sound
            rgb_shape = decode_rgb(sample).shape[:2]
            return SampleResult(sample.key, decode_shard_mask(sample, rgb_shape), "imported")
        rgb = decode_rgb(sample)
        shard_mask = decode_shard_mask(sample, rgb.shape[:2]) if rule == "combine" else None
        result = masker(rgb)
        valid = result.valid
        source = "model"
        if shard_mask is not None:
            valid = valid & shard_mask
            source = "combined"
        return SampleResult(sample.key, valid, source, dict(Counter(b.label for b in result.boxes)))
    except SampleError as exc:
        return SampleResult(sample.key, error=str(exc))
    except ModelLoadError:
        raise
    except Exception as exc:  # a model failure on one panorama is reported, not fatal
        return SampleResult(sample.key, error=f"{type(exc).__name__}: {exc}")


class ModelLoadError(RuntimeError):
    """The models could not be built: fatal for the run (every panorama would fail the same way)."""


def build_masker(cfg: MaskerConfig) -> Any:
    from sharding.segmenters import SkyWatermarkMasker

    try:
        return SkyWatermarkMasker.from_config(cfg)
    except Exception as exc:
        raise ModelLoadError(str(exc)) from exc


class _LazyMasker:
    """Builds the models on first use, so that a run whose work is all stored loads no weights."""

    def __init__(self, cfg: MaskerConfig) -> None:
        self.cfg = cfg
        self._masker: Any = None

    def __call__(self, rgb: np.ndarray) -> Any:
        if self._masker is None:
            self._masker = build_masker(self.cfg)
        return self._masker(rgb)


class MaskWorker:
    """A Ray actor's body: builds the models at start (one torch thread) and answers samples."""

    def __init__(self, cfg: MaskerConfig, torch_threads: int = 1) -> None:
        import torch

        torch.set_num_threads(max(1, torch_threads))
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        try:
            self.masker = build_masker(cfg)
            self.error = None
        except ModelLoadError as exc:  # reported by ping(), so the driver can stop with the reason
            self.masker, self.error = None, str(exc)

    def process(self, sample: RawSample, rule: str) -> SampleResult:
        return process_sample(self.masker, sample, rule)

    def ping(self) -> tuple[int, str | None]:
        return os.getpid(), self.error


# ------------------------------------------------------------------------------------------ the run
@dataclass
class RunSummary:
    processed: int = 0
    skipped_stored: int = 0
    rejected: int = 0
    rejected_keys: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (key or shard, reason)
    by_source: dict[str, int] = field(default_factory=dict)
    boxes: dict[str, int] = field(default_factory=dict)
    valid_fraction_sum: float = 0.0
    seconds: float = 0.0
    stopped_at_limit: bool = False

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["failed"] = [list(x) for x in self.failed]
        d["mean_valid_fraction"] = self.valid_fraction_sum / self.processed if self.processed else None
        return d

    def format(self, store: MaskStore | None = None) -> str:
        lines = [
            "mask run summary",
            f"  processed              {self.processed} ({', '.join(f'{k}: {v}' for k, v in sorted(self.by_source.items())) or '-'})",
            f"  skipped, already stored {self.skipped_stored}",
            f"  rejected (< min valid)  {self.rejected}" + (f": {', '.join(self.rejected_keys[:10])}" + (" ..." if len(self.rejected_keys) > 10 else "") if self.rejected_keys else ""),
            f"  failed                 {len(self.failed)}",
        ]
        lines += [f"    {name}: {reason}" for name, reason in self.failed[:20]]
        if len(self.failed) > 20:
            lines.append(f"    ... and {len(self.failed) - 20} more")
        if self.processed:
            lines.append(f"  mean valid fraction    {self.valid_fraction_sum / self.processed:.3f}")
        if self.boxes:
            lines.append(f"  boxes per prompt       {dict(sorted(self.boxes.items()))}")
        rate = self.processed / self.seconds if self.seconds > 0 else 0.0
        lines.append(f"  time                   {self.seconds:.1f} s ({rate:.2f} panoramas/s)")
        if self.stopped_at_limit:
            lines.append("  stopped at --limit; run again to continue")
        if store is not None:
            s = store.summary()
            lines.append(f"  store {store.path}: {s['entries']} masks, {s['rejected']} rejected, by source {s['by_source']}")
        return "\n".join(lines)


def _record(store: MaskStore, summary: RunSummary, res: SampleResult) -> None:
    if res.error is not None or res.valid is None:
        summary.failed.append((res.key, res.error or "no mask"))
        log.warning("sample %s skipped: %s", res.key, res.error)
        return
    fraction = store.put(res.key, res.valid, source=res.source)
    summary.processed += 1
    summary.valid_fraction_sum += fraction
    summary.by_source[res.source] = summary.by_source.get(res.source, 0) + 1
    for k, v in res.boxes.items():
        summary.boxes[k] = summary.boxes.get(k, 0) + v
    if store.is_rejected(res.key):
        summary.rejected += 1
        summary.rejected_keys.append(res.key)


def _prepare_store(store: MaskStore, expected: dict, allow_mismatch: bool) -> None:
    stored = store.metadata
    diffs = {k: v for k, v in store.metadata_differences(expected).items() if v[0] != "<missing>"}
    if diffs and not allow_mismatch:
        store.check_metadata({k: expected[k] for k in diffs})  # raises with the list of fields
    if diffs:
        log.warning("mask store %s: settings differ (%s); going on because of --allow-mismatch",
                    store.path, ", ".join(sorted(diffs)))
        expected = {**expected, "mixed_settings": True}
    store.set_metadata({**stored, **expected})


def _init_ray(address: str | None, replicas: int) -> bool:
    """Connect to ``address`` or start a local single-node cluster on 127.0.0.1; True if started here."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # bind every port to 127.0.0.1
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local loopback-only cluster; no ~/.ray token
    ray.init(
        address="local",
        num_cpus=max(replicas, os.cpu_count() or 1),
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        object_store_memory=min(2_000_000_000, 500_000_000 * max(2, replicas)),
        configure_logging=False,
        log_to_driver=True,
    )
    return True


def run_masks(
    shards: Sequence[str],
    store_path: str | os.PathLike,
    cfg: MaskerConfig | None = None,
    *,
    min_valid: float = DEFAULT_MIN_VALID,
    shard_mask: str = "prefer",
    limit: int | None = None,
    overwrite: bool = False,
    allow_mismatch: bool = False,
    use_ray: bool = False,
    replicas: int = 2,
    ray_address: str | None = None,
    gpus_per_replica: float = 0.0,
    progress: bool = True,
    masker: Any = None,
    split: str | None = None,
) -> RunSummary:
    """Make and store validity masks for every sample of ``shards`` not yet in the store.

    ``masker`` (a callable ``rgb -> MaskResult``) replaces the models built from ``cfg`` (local runs only).
    """
    from tqdm import tqdm

    if shard_mask not in SHARD_MASK_RULES:
        raise ValueError(f"shard_mask must be one of {SHARD_MASK_RULES}, got {shard_mask!r}")
    cfg = cfg or MaskerConfig()
    shard_list = resolve(shards, split)
    store = MaskStore(store_path, min_valid=min_valid)
    expected = {**cfg.metadata(), "min_valid": float(min_valid), "shard_mask_rule": shard_mask}
    _prepare_store(store, expected, allow_mismatch)
    if cfg.tiny:
        log.warning("--tiny-random: the models have RANDOM weights and the masks are MEANINGLESS "
                    "(plumbing demo/CI only); do not train on store %s", store.path)
    summary = RunSummary()
    shard_errors: list[tuple[str, str]] = []
    t0 = time.perf_counter()
    counts = [c for _, c in shard_list]
    total = sum(counts) if counts and all(c is not None for c in counts) else None  # type: ignore[misc]
    bar = tqdm(total=total, desc="masks", unit="pano", disable=not progress, file=sys.stderr)

    def pending() -> Iterator[RawSample]:
        for sample in _iter_shard_samples(shard_list, shard_errors):
            bar.update(1)
            if not overwrite and sample.key in store:
                summary.skipped_stored += 1
                continue
            if limit is not None and summary.processed + len(summary.failed) + inflight_count() >= limit:
                summary.stopped_at_limit = True
                return
            yield sample
            bar.set_postfix(done=summary.processed, skipped=summary.skipped_stored, failed=len(summary.failed), refresh=False)

    inflight: dict[Any, str] = {}

    def inflight_count() -> int:
        return len(inflight)

    started_ray = False
    try:
        if not use_ray:
            local = masker if masker is not None else _LazyMasker(cfg)
            for sample in pending():
                _record(store, summary, process_sample(local, sample, shard_mask))
        else:
            import ray

            if masker is not None:
                raise ValueError("a custom masker cannot be sent to Ray actors; pass cfg instead")
            actors: list = []
            max_inflight = 2 * max(1, replicas)
            i = 0
            for sample in pending():
                if sample.mask is not None and shard_mask == "prefer":
                    _record(store, summary, process_sample(None, sample, shard_mask))  # no model needed
                    continue
                if not actors:  # started on the first panorama that needs the models
                    started_ray = _init_ray(ray_address, replicas)
                    actor_cls = ray.remote(num_cpus=1, num_gpus=gpus_per_replica)(MaskWorker)
                    actors = [actor_cls.remote(cfg) for _ in range(max(1, replicas))]
                    pings = ray.get([a.ping.remote() for a in actors])
                    errors = {e for _, e in pings if e}
                    if errors:
                        raise ModelLoadError("; ".join(sorted(errors)))
                    log.info("%d mask replicas up (pids %s)", len(actors), [p for p, _ in pings])
                while len(inflight) >= max_inflight:
                    done, _ = ray.wait(list(inflight), num_returns=1)
                    _collect(ray, done, inflight, store, summary)
                ref = actors[i % len(actors)].process.remote(sample, shard_mask)
                inflight[ref] = sample.key
                i += 1
            while inflight:
                done, _ = ray.wait(list(inflight), num_returns=1)
                _collect(ray, done, inflight, store, summary)
            for a in actors:
                ray.kill(a)
    finally:
        bar.close()
        if started_ray:
            import ray

            ray.shutdown()
    summary.failed += shard_errors
    summary.seconds = time.perf_counter() - t0
    log.info("\n%s", summary.format(store))
    return summary


def _collect(ray: Any, done: list, inflight: dict, store: MaskStore, summary: RunSummary) -> None:
    for ref in done:
        key = inflight.pop(ref)
        try:
            res = ray.get(ref)
        except Exception as exc:  # the actor died or raised
            res = SampleResult(key, error=f"replica failed: {type(exc).__name__}: {exc}")
        _record(store, summary, res)


# ------------------------------------------------------------------------------------------ imports
def import_masks(
    paths: Sequence[str | os.PathLike],
    store_path: str | os.PathLike,
    *,
    key_suffix: str = "_valid",
    key_prefix: str = "",
    min_valid: float = DEFAULT_MIN_VALID,
    overwrite: bool = False,
    progress: bool = True,
) -> RunSummary:
    """Import validity PNGs (255 = valid) as is (source ``"imported"``). Directories contribute every
    ``*{key_suffix}.png``; the key is ``key_prefix + file stem without key_suffix``."""
    from tqdm import tqdm

    files: list[Path] = []
    for p in map(lambda x: Path(x).expanduser(), paths):
        if p.is_dir():
            found = sorted(p.glob(f"*{key_suffix}.png"))
            if not found:
                raise FileNotFoundError(f"no *{key_suffix}.png masks in {p}")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"mask file not found: {p}")
    store = MaskStore(store_path, min_valid=min_valid)
    stored = store.metadata
    if "min_valid" in stored and float(stored["min_valid"]) != float(min_valid):
        store.check_metadata({"min_valid": float(min_valid)})
    if not stored:
        store.set_metadata({"min_valid": float(min_valid)})
    summary = RunSummary()
    t0 = time.perf_counter()
    for f in tqdm(files, desc="import masks", unit="mask", disable=not progress, file=sys.stderr):
        stem = f.stem
        if key_suffix and stem.endswith(key_suffix):
            stem = stem[: -len(key_suffix)]
        key = key_prefix + stem
        if not overwrite and key in store:
            summary.skipped_stored += 1
            continue
        try:
            valid = load_mask_png(f)
        except (ValueError, OSError) as exc:
            summary.failed.append((str(f), str(exc)))
            log.warning("%s skipped: %s", f, exc)
            continue
        _record(store, summary, SampleResult(key, valid, "imported"))
    summary.seconds = time.perf_counter() - t0
    log.info("\n%s", summary.format(store))
    return summary


# ------------------------------------------------------------------------------------------ CLI
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, "", argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action) or text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sharding.masks",
        description="Sky/watermark validity masks (GroundingDINO + SAM) for panorama shards, into an LMDB mask store.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--store", required=True, help="LMDB mask store directory (created if missing)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", nargs="+", help="shard files, globs, brace patterns, manifest.json or its folder, folders of *.tar")
    src.add_argument("--import-masks", nargs="+", metavar="PNG_OR_DIR",
                     help="import validity PNGs as is (255 = valid) instead of running the models")
    p.add_argument("--split", default=None, help="--shards with a manifest: only this split (default: all)")
    p.add_argument("--key-suffix", default="_valid", help="--import-masks: stripped from the file stem to make the key")
    p.add_argument("--key-prefix", default="",
                   help="--import-masks: prepended to the key (folder- matches `sharding.build --source folder` keys)")
    p.add_argument("--detector", default=DEFAULT_DETECTOR,
                   help="GroundingDINO: Hugging Face id or local directory (IDEA-Research/grounding-dino-tiny is faster), or tiny-random")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory/id or BERT vocab.txt (default: the detector's)")
    p.add_argument("--sam", default=DEFAULT_SAM_CHECKPOINT,
                   help="SAM checkpoint path or file name (searched in $PANO_SAM_DIR, ./checkpoints, ~/.cache/pano-distill), "
                        "a transformers SamModel id/directory, or tiny-random")
    p.add_argument("--sam-type", choices=["vit_b", "vit_l", "vit_h"], default=None, help="default: from the checkpoint's name")
    p.add_argument("--tiny-random", action="store_true",
                   help="tiny randomly initialised detector and SAM: meaningless masks, for demos/CI plumbing only")
    p.add_argument("--prompts", nargs="+", default=list(DEFAULT_PROMPTS), help="what to mask as invalid")
    p.add_argument("--box-threshold", type=float, default=DEFAULT_BOX_THRESHOLD, help="GroundingDINO box score threshold")
    p.add_argument("--text-threshold", type=float, default=DEFAULT_TEXT_THRESHOLD, help="GroundingDINO token threshold")
    p.add_argument("--detect-height", type=int, default=None, help="detector input height (width = 2x); default 512 (128 tiny)")
    p.add_argument("--max-boxes", type=int, default=DEFAULT_MAX_BOXES, help="best boxes per panorama sent to SAM")
    p.add_argument("--min-valid", type=float, default=DEFAULT_MIN_VALID, help="panoramas with a smaller valid fraction are rejected")
    p.add_argument("--shard-mask", choices=SHARD_MASK_RULES, default="prefer", help="what to do with a sample's own mask.png")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--limit", type=int, default=None, help="stop after this many new panoramas (resume later)")
    p.add_argument("--overwrite", action="store_true", help="redo keys that are already stored")
    p.add_argument("--allow-mismatch", action="store_true", help="write into a store made with other settings")
    p.add_argument("--ray", action="store_true", help="spread the work over Ray actor replicas")
    p.add_argument("--replicas", type=int, default=2, help="Ray actors (one torch thread each)")
    p.add_argument("--ray-address", default=None, help="existing cluster (default: a local one on 127.0.0.1)")
    p.add_argument("--gpus-per-replica", type=float, default=0.0, help="GPU share of each Ray actor")
    p.add_argument("--summary-json", default=None, help="also write the summary here")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.import_masks:
            summary = import_masks(args.import_masks, args.store, key_suffix=args.key_suffix,
                                   key_prefix=args.key_prefix, min_valid=args.min_valid,
                                   overwrite=args.overwrite, progress=not args.no_progress)
        else:
            detector, sam = args.detector, args.sam
            if args.tiny_random:
                detector = sam = TINY_RANDOM
            cfg = MaskerConfig(
                detector=detector, sam=sam, sam_type=args.sam_type, tokenizer=args.tokenizer,
                prompts=tuple(args.prompts), box_threshold=args.box_threshold,
                text_threshold=args.text_threshold, detect_height=args.detect_height,
                max_boxes=args.max_boxes, device=args.device,
            )
            summary = run_masks(
                args.shards, args.store, cfg, min_valid=args.min_valid, shard_mask=args.shard_mask,
                limit=args.limit, overwrite=args.overwrite, allow_mismatch=args.allow_mismatch,
                use_ray=args.ray, replicas=args.replicas, ray_address=args.ray_address,
                gpus_per_replica=args.gpus_per_replica, progress=not args.no_progress, split=args.split,
            )
    except (ValueError, OSError, ModelLoadError) as exc:
        log.debug("details", exc_info=True)
        log.error("%s", exc)
        return 2
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary.as_dict(), indent=2))
    return 1 if summary.failed and not summary.processed and not summary.skipped_stored else 0


if __name__ == "__main__":
    sys.exit(main())
