"""Shard samples for ``python -m sharding.masks``: which shards, their raw samples, one sample's mask, and
the run's accounting (:class:`RunSummary`, :func:`_record`).

Shared by the local run and the Ray Data run (:mod:`sharding.masks_ray`), so that both read, decode, skip
and name bad samples the same way. Shards are read with ``sharding.shard_reader.iter_shard``, the trainer's
reader (same keys, same damaged-shard handling, manifest hashes checked); images and masks are decoded with
``sharding.format``'s decoders, whose ``SampleError`` reasons (``unreadable_image``, ``incomplete_sample``,
``unreadable_mask``, ...) are what a run counts by.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from sharding import format as fmt
from sharding.cli import UserError
from sharding.format import SampleError
from sharding.mask_store import MaskStore

log = logging.getLogger("sharding.masks")

SHARD_MASK_RULES = ("prefer", "combine", "ignore")
_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# one mask decoder for the project: sharding.format's (decode_mask when it has one)
_decode_mask_bytes = getattr(fmt, "decode_mask", None) or fmt.decode_mask_png


@dataclass
class RawSample:
    """The undecoded members of one shard sample."""

    key: str
    shard: str
    rgb: bytes | None = None
    rgb_name: str | None = None
    mask: bytes | None = None
    meta: bytes | None = None


def resolve(specs: Sequence[str | os.PathLike], split: str | None = None) -> list:
    """``ShardInfo`` (url, count, sha256) for ``--shards``: what ``sharding.stream`` accepts (tar paths,
    globs, brace patterns, a ``manifest.json`` or a folder holding one; every split unless ``split``),
    plus folders of ``*.tar`` without a manifest."""
    from sharding.manifest import MANIFEST, load_manifest, resolve_shards

    out: list = []
    for spec in specs:
        p = Path(spec).expanduser()
        if p.is_dir() and not (p / MANIFEST).is_file():
            found = sorted(str(x) for x in p.glob("*.tar"))
            if not found:
                raise UserError(f"no *.tar shards (and no {MANIFEST}) in {p}")
            out += resolve_shards(found, count=False)
        elif split is None and (p.is_dir() or p.name == MANIFEST):
            mpath = p / MANIFEST if p.is_dir() else p
            for sp in load_manifest(mpath)["splits"]:
                out += resolve_shards(str(mpath), sp, count=False)
        else:
            out += resolve_shards(str(p), split, count=False)
    seen: set[str] = set()
    return [x for x in out if not (x.url in seen or seen.add(x.url))]


def expand_shards(specs: Sequence[str | os.PathLike], split: str | None = None) -> list[str]:
    """Shard URLs for ``--shards`` (see :func:`resolve`)."""
    return [i.url for i in resolve(specs, split)]


def iter_shard_samples(shards: Iterable[Any], errors: list[tuple[str, str]]) -> Iterator[RawSample]:
    """Samples of the shards (``ShardInfo`` or ``(url, count[, sha256])``) in order, undecoded. A damaged
    shard, or one with fewer samples than its manifest count, is appended to ``errors`` as
    ``(shard, reason)``; the next shard is read."""
    from sharding.shard_reader import iter_shard

    def on_skip(reason: str, name: str, detail: str = "") -> None:
        errors.append((name, f"{reason}: {detail}" if detail else reason))

    for info in shards:
        url, count, sha = (info.url, info.count, info.sha256) if hasattr(info, "url") else (tuple(info) + (None,))[:3]
        for raw in iter_shard(url, count, on_skip, sha256=sha):
            rgb_name = next((k for k in raw if k.startswith("rgb.") and k[4:] in _IMAGE_EXTS), None)
            yield RawSample(
                key=raw["__key__"], shard=url,
                rgb=raw.get(rgb_name) if rgb_name else None,
                rgb_name=f"{raw['__key__']}.{rgb_name}" if rgb_name else None,
                mask=raw.get("mask.png"), meta=raw.get("meta.json"),
            )


# ------------------------------------------------------------------------------------------ one sample
def decode_rgb(sample: RawSample) -> np.ndarray:
    """The sample's image, uint8 RGB (H, W, 3); ``SampleError`` naming the member when it cannot be used."""
    if sample.rgb is None:
        raise SampleError("incomplete_sample", f"{sample.key}: no rgb.jpg/rgb.png member")
    try:
        rgb, _ = fmt.decode_rgb(sample.rgb)
    except SampleError as exc:
        raise SampleError(exc.reason, f"{sample.rgb_name}: {exc.detail}") from exc
    if rgb.shape[0] < 2 or rgb.shape[1] < 2:
        raise SampleError("unreadable_image", f"{sample.rgb_name} is too small: {rgb.shape[1]}x{rgb.shape[0]}")
    return rgb


def decode_shard_mask(sample: RawSample, shape: tuple[int, int] | None) -> np.ndarray | None:
    """The sample's ``mask.png`` (255 = valid) as bool at ``shape`` (nearest neighbour), or ``None``."""
    if sample.mask is None:
        return None
    try:
        mask = _decode_mask_bytes(sample.mask)
    except SampleError as exc:
        raise SampleError(exc.reason, f"{sample.key}.mask.png: {exc.detail}") from exc
    if shape is not None and mask.shape != tuple(shape):
        mask = fmt.resize_nearest(mask, int(shape[0]), int(shape[1]))
    return mask


@dataclass
class SampleResult:
    key: str
    valid: np.ndarray | None = None
    source: str = ""
    boxes: dict = field(default_factory=dict)  # prompt -> number of boxes
    error: str | None = None


class ModelLoadError(UserError, RuntimeError):
    """The models could not be built (missing weights, ...): fatal for the run, every panorama would fail
    the same way. A ``UserError``: the message says which file or id and where to get it."""


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
        return SampleResult(sample.key, error=f"model_error: {type(exc).__name__}: {exc}")


def build_masker(cfg: Any) -> Any:
    from sharding.segmenters import SkyWatermarkMasker

    try:
        return SkyWatermarkMasker.from_config(cfg)
    except Exception as exc:
        raise ModelLoadError(str(exc)) from exc


class LazyMasker:
    """Builds the models on first use, so that a run whose work is all stored loads no weights."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self._masker: Any = None

    def __call__(self, rgb: np.ndarray) -> Any:
        if self._masker is None:
            self._masker = build_masker(self.cfg)
        return self._masker(rgb)


# ------------------------------------------------------------------------------------------ accounting
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

    def failed_by_reason(self) -> dict[str, int]:
        """Failures counted by their reason (``sharding.format.REASONS`` names, ``truncated_shard``, ...)."""
        out: dict[str, int] = {}
        for _, why in self.failed:
            reason = why.split(":", 1)[0].strip()
            out[reason] = out.get(reason, 0) + 1
        return out

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["failed"] = [list(x) for x in self.failed]
        d["failed_by_reason"] = self.failed_by_reason()
        d["mean_valid_fraction"] = self.valid_fraction_sum / self.processed if self.processed else None
        return d

    def format(self, store: MaskStore | None = None) -> str:
        lines = [
            "mask run summary",
            f"  processed              {self.processed} ({', '.join(f'{k}: {v}' for k, v in sorted(self.by_source.items())) or '-'})",
            f"  skipped, already stored {self.skipped_stored}",
            f"  rejected (< min valid)  {self.rejected}" + (f": {', '.join(self.rejected_keys[:10])}" + (" ..." if len(self.rejected_keys) > 10 else "") if self.rejected_keys else ""),
            f"  failed                 {len(self.failed)}"
            + (f" {dict(sorted(self.failed_by_reason().items()))}" if self.failed else ""),
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
            lines.append(f"  store {store.path}: {s['entries']} masks, {s['rejected']} rejected, by source "
                         f"{s['by_source']}" + (f", {s['corrupt']} CORRUPT: {s['corrupt_keys'][:10]}" if s["corrupt"] else ""))
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
