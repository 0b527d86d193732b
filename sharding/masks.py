"""Offline sky/watermark validity masks for WebDataset panorama shards, into an LMDB :class:`MaskStore`.

Usage::

    # GroundingDINO + SAM over shards (resumable: keys already in the store are skipped)
    python -m sharding.masks --shards data/shards --store data/masks.lmdb \\
        [--detector IDEA-Research/grounding-dino-base] [--sam ~/.cache/pano-distill/sam_vit_b_01ec64.pth] \\
        [--box-threshold 0.3] [--text-threshold 0.25] [--prompts sky watermark] [--min-valid 0.2] \\
        [--shard-mask prefer|combine|ignore] [--limit N] [--overwrite] [--ray --replicas N [--ray-address ADDR]]

    # import masks that came with the data (255 = valid, 0 = sky), key = file name without "_valid.png"
    python -m sharding.masks --store data/masks.lmdb --import-masks ../shared/samples/outdoor [--key-prefix P]

    # plumbing demo / CI without weights (random tiny models, meaningless masks)
    python -m sharding.masks --shards data/shards --store /tmp/m.lmdb --tiny-random

``--shards`` takes what ``sharding.stream`` takes (shard files, globs, brace patterns, a ``manifest.json``
or its folder: every split unless ``--split``) and folders of ``*.tar`` without a manifest; shards are read
with the trainer's reader (:mod:`sharding.mask_samples`). The models and their defaults (GroundingDINO
base, "sky"/"watermark", thresholds 0.3/0.25, SAM ViT-B in each box) are :mod:`sharding.segmenters`'s.
Masks are stored at the panorama's native resolution.

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

With ``--ray`` the run is a Ray Data pipeline (:mod:`sharding.masks_ray`): shards are read by Ray tasks
with the same reader, an actor pool of ``--replicas`` segmenters (one torch thread each, one CPU or
``--gpus-per-replica``) makes the masks, and the driver, the only writer, stores them as they stream in.
Without ``--ray-address`` (or ``RAY_ADDRESS``) a local single-node Ray bound to 127.0.0.1 is started
(``sharding.ray_connect``).

A run that stops halfway is resumed by running it again: stored keys are skipped (a corrupt entry, whose
checksum fails, counts as not stored and is redone). ``--overwrite`` builds a new store beside the old one
(``STORE.overwrite-new``, itself resumable) and swaps it in atomically when the run completes; until then
readers keep the old store. A sample that cannot be decoded is skipped, counted by reason and named in the
summary; an unreadable or truncated shard is named too, and the run goes on. Wrong input (missing store,
other settings, missing weights) stops with one ``error:`` line and exit code 2 (``sharding.cli``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from sharding import cli
from sharding.mask_samples import (  # noqa: F401 - part of this module's API
    SHARD_MASK_RULES,
    LazyMasker,
    ModelLoadError,
    RawSample,
    RunSummary,
    SampleResult,
    _record,
    build_masker,
    decode_rgb,
    decode_shard_mask,
    expand_shards,
    iter_shard_samples,
    process_sample,
    resolve,
)
from sharding.lmdb_base import swap_store  # noqa: F401 - used by --overwrite, part of this module's API
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


# ------------------------------------------------------------------------------------------ the run
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
    batch_size: int = 2,
    progress: bool = True,
    masker: Any = None,
    split: str | None = None,
) -> RunSummary:
    """Make and store validity masks for every sample of ``shards`` not yet in the store.

    ``masker`` (a callable ``rgb -> MaskResult``) replaces the models built from ``cfg`` (local runs only).
    ``overwrite``: build a new store beside the old one and swap it in when the run completes.
    """
    from tqdm import tqdm

    if shard_mask not in SHARD_MASK_RULES:
        raise cli.UserError(f"shard_mask must be one of {SHARD_MASK_RULES}, got {shard_mask!r}")
    if use_ray and masker is not None:
        raise ValueError("a custom masker cannot be sent to Ray actors; pass cfg instead")
    cfg = cfg or MaskerConfig()
    shard_list = resolve(shards, split)
    final_path = os.fspath(store_path)
    replace = overwrite and Path(final_path, "data.mdb").is_file()
    work_path = f"{final_path.rstrip(os.sep)}.overwrite-new" if replace else final_path
    store = MaskStore(work_path, min_valid=min_valid)
    expected = {**cfg.metadata(), "min_valid": float(min_valid), "shard_mask_rule": shard_mask}
    _prepare_store(store, expected, allow_mismatch)
    if replace:
        log.info("--overwrite: building the new store in %s; it replaces %s when the run completes",
                 work_path, final_path)
    if cfg.tiny:
        log.warning("--tiny-random: the models have RANDOM weights and the masks are MEANINGLESS "
                    "(plumbing demo/CI only); do not train on store %s", final_path)
    summary = RunSummary()
    shard_errors: list[tuple[str, str]] = []
    t0 = time.perf_counter()
    counts = [i.count for i in shard_list]
    total = sum(counts) if counts and all(c is not None for c in counts) else None  # type: ignore[misc]
    bar = tqdm(total=total, desc="masks", unit="pano", disable=not progress, file=sys.stderr)

    def at_limit() -> bool:
        return limit is not None and summary.processed + len(summary.failed) >= limit

    def postfix() -> None:
        bar.set_postfix(done=summary.processed, skipped=summary.skipped_stored, failed=len(summary.failed),
                        refresh=False)

    try:
        if not use_ray:
            local = masker if masker is not None else LazyMasker(cfg)
            for sample in iter_shard_samples(shard_list, shard_errors):
                bar.update(1)
                if sample.key in store:
                    summary.skipped_stored += 1
                    continue
                if at_limit():
                    summary.stopped_at_limit = True
                    break
                _record(store, summary, process_sample(local, sample, shard_mask))
                postfix()
        else:
            from sharding.masks_ray import run_ray_data, unpack_result

            def on_row(row: dict) -> bool:
                status = row["status"]
                if status == "shard_error":
                    shard_errors.append((row["key"], row["detail"]))
                    return True
                bar.update(1)
                if status == "stored":
                    summary.skipped_stored += 1
                    return True
                if at_limit():
                    summary.stopped_at_limit = True
                    return False
                _record(store, summary, unpack_result(row))
                postfix()
                return True

            skip = frozenset(k for k in store.keys() if k in store)  # corrupt entries are redone
            run_ray_data(shard_list, cfg, rule=shard_mask, skip=skip, replicas=replicas,
                         gpus_per_replica=gpus_per_replica, ray_address=ray_address, batch_size=batch_size,
                         progress=progress, on_row=on_row)
    finally:
        bar.close()
    summary.failed += shard_errors
    summary.seconds = time.perf_counter() - t0
    if replace:
        if summary.stopped_at_limit:
            log.info("--overwrite stopped at --limit: %s is kept until the new store %s is complete; run again "
                     "with --overwrite to continue", final_path, work_path)
        else:
            store.close()
            swap_store(work_path, final_path)
            store = MaskStore(final_path, min_valid=min_valid)
            log.info("the new store replaced %s", final_path)
    log.info("\n%s", summary.format(store))
    return summary


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
                raise cli.UserError(f"no *{key_suffix}.png masks in {p}")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise cli.UserError(f"mask file not found: {p}")
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
    p.add_argument("--overwrite", action="store_true",
                   help="--shards: build a new store beside STORE and swap it in when complete; "
                        "--import-masks: re-import keys that are already stored")
    p.add_argument("--allow-mismatch", action="store_true", help="write into a store made with other settings")
    p.add_argument("--ray", action="store_true", help="run as a Ray Data pipeline (actor pool of segmenters)")
    p.add_argument("--replicas", type=int, default=2, help="--ray: segmenter actors (one torch thread each)")
    p.add_argument("--batch-size", type=int, default=2, help="--ray: panoramas per segmenter call")
    p.add_argument("--ray-address", default=None, help="existing cluster (default: a local one on 127.0.0.1)")
    p.add_argument("--gpus-per-replica", type=float, default=0.0, help="GPU share of each Ray actor")
    p.add_argument("--summary-json", default=None, help="also write the summary here")
    p.add_argument("--no-progress", action="store_true")
    cli.add_common_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.setup_logging(args.log_level)
    if args.import_masks:
        summary = import_masks(args.import_masks, args.store, key_suffix=args.key_suffix, key_prefix=args.key_prefix,
                               min_valid=args.min_valid, overwrite=args.overwrite, progress=not args.no_progress)
    else:
        detector, sam = args.detector, args.sam
        if args.tiny_random:
            detector = sam = TINY_RANDOM
        cfg = MaskerConfig(
            detector=detector, sam=sam, sam_type=args.sam_type, tokenizer=args.tokenizer,
            prompts=tuple(args.prompts), box_threshold=args.box_threshold, text_threshold=args.text_threshold,
            detect_height=args.detect_height, max_boxes=args.max_boxes, device=args.device,
        )
        summary = run_masks(
            args.shards, args.store, cfg, min_valid=args.min_valid, shard_mask=args.shard_mask, limit=args.limit,
            overwrite=args.overwrite, allow_mismatch=args.allow_mismatch, use_ray=args.ray, replicas=args.replicas,
            ray_address=args.ray_address, gpus_per_replica=args.gpus_per_replica, batch_size=args.batch_size,
            progress=not args.no_progress, split=args.split,
        )
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary.as_dict(), indent=2))
    return 1 if summary.failed and not summary.processed and not summary.skipped_stored else 0


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
