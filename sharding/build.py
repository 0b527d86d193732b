"""``python -m sharding.build``: convert a dataset layout into WebDataset shards plus ``manifest.json``.

Output (``--out DIR``): ``{split}-{index:06d}.tar`` shards of ``--samples-per-shard`` samples (the last shard
of a split may hold fewer) and ``manifest.json`` (``sharding.manifest``), written last: a folder with a
manifest is a complete build, and building into it again is refused unless ``--overwrite``.

A build never destroys the last good one: it is written into a sibling temporary folder
(``.<name>.building-<pid>``) and swapped in by renaming only once its manifest is written; the old folder
is moved aside (``.<name>.old-<pid>``) and removed after the swap, and files in it that are not part of a
build (anything but shards and the manifest) are carried over. A build that fails -- an input that yields
no sample, an error, an interrupt -- removes its temporary folder and leaves ``--out`` as it was.

Within a split, samples are written in the order of ``sha1(key)``: shards mix scenes and areas instead of
holding one scene each, and the order (so the shards and their sha256) is the same on every rebuild.
Bad inputs are skipped, counted by reason and named in the manifest and the summary; depth is converted to
uint16 millimetres once, here (``sharding.format``); depth beyond 65.534 m becomes invalid and is counted.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import multiprocessing
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

from tqdm import tqdm
from webdataset import TarWriter

from . import cli, sources
from .format import SampleError, cv2_fork_guard, encode_sample
from .manifest import MANIFEST, SHARD_RE, shard_name, tool_version, write_manifest

log = logging.getLogger("sharding.build")


class BuildError(cli.UserError, ValueError):
    """The build cannot start or produced nothing; the message says what to do (exit 2 from the CLI)."""


class _HashingFile:
    """Write-through file wrapper computing the sha256 of everything written."""

    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()

    def write(self, data):
        self.sha.update(data)
        return self.f.write(data)

    def flush(self):
        self.f.flush()


class _ShardSink:
    """Writes one split's samples into ``{split}-{index:06d}.tar``, rotating every ``per_shard`` samples.
    A shard is written as ``.tar.partial`` and renamed when complete."""

    def __init__(self, out: Path, split: str, per_shard: int):
        self.out, self.split, self.per_shard = out, split, per_shard
        self.shards: list[dict] = []
        self._file = self._hf = self._writer = None
        self._n = 0

    def write(self, sample: dict) -> None:
        if self._writer is None:
            name = shard_name(self.split, len(self.shards))
            self._file = open(self.out / (name + ".partial"), "wb")
            self._hf = _HashingFile(self._file)
            self._writer = TarWriter(self._hf, encoder=False, mtime=0, mode=0o644)
            self._n = 0
            self._name = name
        self._writer.write(sample)
        self._n += 1
        if self._n >= self.per_shard:
            self._close()

    def _close(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._file.close()
        os.replace(self.out / (self._name + ".partial"), self.out / self._name)
        self.shards.append({"path": self._name, "count": self._n, "sha256": self._hf.sha.hexdigest()})
        self._writer = None

    def close(self) -> list[dict]:
        self._close()
        return self.shards


def _prepare(cand: sources.Candidate):
    """Load, check and encode one candidate (runs in a pool worker when --workers > 1)."""
    try:
        loaded = cand.load()
        sample = encode_sample(cand.key, loaded["rgb"], meta=loaded["meta"], depth_mm=loaded["depth_mm"],
                               mask=loaded["mask"])
        return "ok", sample, loaded["clipped"]
    except SampleError as exc:
        return "skip", exc.reason, exc.detail


def _is_build_file(name: str) -> bool:
    return bool(SHARD_RE.match(name)) or name.endswith(".tar.partial") or name in (MANIFEST, MANIFEST + ".tmp")


def _check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse an existing build (complete or interrupted) in ``out`` unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise BuildError(f"--out {out} exists and is not a folder")
    if not out.exists():
        return
    existing = sorted(p.name for p in out.iterdir() if SHARD_RE.match(p.name) or p.name.endswith(".tar.partial"))
    has_manifest = (out / MANIFEST).exists()
    if (has_manifest or existing) and not overwrite:
        what = f"a complete build ({MANIFEST})" if has_manifest else \
            f"{len(existing)} shard file(s) of an interrupted build"
        raise BuildError(f"{out} already holds {what}; refusing to overwrite it. Pass --overwrite to replace it, "
                         f"or choose another --out")


def _swap_in(new: Path, out: Path) -> None:
    """Make the complete build in ``new`` the folder ``out``: renames only, the old build removed last."""
    if not out.exists():
        os.rename(new, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.rename(out, old)
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(old, out)  # put the previous build back
        raise
    for p in old.iterdir():  # the user's own files in the folder (notes, a mask store, ...) stay
        if not _is_build_file(p.name) and not (out / p.name).exists():
            os.rename(p, out / p.name)
    shutil.rmtree(old)


def build(source: str, input: str | os.PathLike | None, out: str | os.PathLike, *, split: str = "all",
          samples_per_shard: int = 100, overwrite: bool = False, split_lists: dict[str, str] | None = None,
          workers: int = 1, progress: bool = True, **source_options) -> dict:
    """Convert ``source`` at ``input`` into shards in ``out``; returns the manifest (also written). Built in
    a sibling temporary folder and swapped in only when complete (module docstring). ``source_options`` go
    to ``sources.list_source`` (count, style, height, seed, windows, watermark, rgb_format). Raises
    ``BuildError`` (a ``sharding.cli.UserError``) with a message for the user."""
    if samples_per_shard < 1:
        raise BuildError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    out = Path(out).expanduser().resolve()
    _check_out_dir(out, overwrite)
    try:
        listing = sources.list_source(source, input, split, split_lists=split_lists, **source_options)
    except BuildError:
        raise
    except ValueError as exc:  # the layout's own checks (no split lists, unknown source, ...)
        raise BuildError(str(exc)) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.building-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        manifest = _write_build(tmp, source, input, listing, split=split, samples_per_shard=samples_per_shard,
                                split_lists=split_lists, workers=workers, progress=progress,
                                source_options=source_options, out_name=out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # --out is untouched
        raise
    _swap_in(tmp, out)
    return manifest


def _write_build(out: Path, source, input, listing, *, split, samples_per_shard, split_lists, workers, progress,
                 source_options, out_name: Path) -> dict:
    """Write the shards and, if any sample was written, the manifest into ``out`` (a fresh folder)."""
    t0 = time.time()
    skipped: list[dict] = [{"path": p, "reason": r, "detail": d} for p, r, d in listing.skipped]
    seen: dict[str, str] = {}
    per_split: dict[str, list[sources.Candidate]] = {s: [] for s in listing.splits}
    for c in listing.candidates:
        if c.key in seen:
            skipped.append({"path": c.path, "reason": "duplicate_key",
                            "detail": f"key {c.key} already used by {seen[c.key]}"})
            continue
        seen[c.key] = c.path
        per_split.setdefault(c.split, []).append(c)
    for cands in per_split.values():
        cands.sort(key=lambda c: hashlib.sha1(c.key.encode()).hexdigest())

    total = sum(len(v) for v in per_split.values())
    splits_out: dict[str, dict] = {}
    clipped_pixels = clipped_samples = 0
    pool = None
    if workers > 1:
        with cv2_fork_guard():
            pool = multiprocessing.get_context("fork").Pool(workers)
    try:
        with tqdm(total=total, desc=f"sharding {source}", unit="pano", disable=not progress,
                  file=sys.stderr) as bar:
            for s, cands in per_split.items():
                sink = _ShardSink(out, s, samples_per_shard)
                results = pool.imap(_prepare, cands, chunksize=2) if pool else map(_prepare, cands)
                n = 0
                for cand, (status, a, b) in zip(cands, results):
                    bar.update(1)
                    if status == "skip":
                        skipped.append({"path": cand.path, "reason": a, "detail": b})
                        log.warning("skipped %s (%s): %s", cand.path, a, b)
                        continue
                    sink.write(a)
                    n += 1
                    if b:
                        clipped_pixels += b
                        clipped_samples += 1
                    bar.set_postfix(split=s, written=n, skipped=len(skipped))
                shards = sink.close()
                if n:  # a split whose every input was skipped is not listed (a manifest lists no empty split)
                    splits_out[s] = {"count": n, "shards": shards}
    finally:
        if pool is not None:
            pool.close()
            pool.join()

    counts = Counter(d["reason"] for d in skipped)
    if not splits_out:
        raise BuildError(f"no sample was written ({len(skipped)} skipped: "
                         f"{', '.join(f'{k}={v}' for k, v in counts.items()) or 'no inputs found'}); "
                         f"{out_name} was left as it was")
    manifest = {
        "tool": "sharding.build",
        "version": tool_version(),
        "source": source,
        "input": str(Path(input).expanduser().resolve()) if input is not None else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "splits": splits_out,
        "skipped": dict(sorted(counts.items())),
        "skipped_samples": skipped,
        "samples_per_shard": samples_per_shard,
        "depth_unit": "mm",
        "depth_clipped": {"pixels": clipped_pixels, "samples": clipped_samples, "max_mm": 65534},
        "options": {"split": split, **({k: str(v) for k, v in split_lists.items()} if split_lists else {}),
                    **source_options},
        "seconds": round(time.time() - t0, 2),
    }
    write_manifest(out, manifest)
    return manifest


def format_summary(manifest: dict, out: str | os.PathLike) -> str:
    lines = [f"sharding.build: {sum(v['count'] for v in manifest['splits'].values())} samples from "
             f"{manifest['source']}" + (f" ({manifest['input']})" if manifest.get("input") else "") +
             f" -> {out} in {manifest.get('seconds', 0):.1f} s"]
    for s, v in manifest["splits"].items():
        lines.append(f"  {s:<6} {v['count']:>7} samples in {len(v['shards'])} shard(s)")
    n_skip = sum(manifest["skipped"].values())
    lines.append(f"  skipped {n_skip}" + (":" if n_skip else ""))
    for reason, n in manifest["skipped"].items():
        names = [d["path"] for d in manifest["skipped_samples"] if d["reason"] == reason]
        shown = ", ".join(names[:5]) + (f", ... ({len(names) - 5} more)" if len(names) > 5 else "")
        lines.append(f"    {reason}: {n} ({shown})")
    dc = manifest.get("depth_clipped", {})
    if dc.get("pixels"):
        lines.append(f"  depth beyond 65.534 m made invalid: {dc['pixels']} pixels in {dc['samples']} sample(s)")
    lines.append(f"  manifest: {Path(out) / MANIFEST}")
    return "\n".join(lines)


def _split_list_arg(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected SPLIT=FILE, got {text!r}")
    k, v = text.split("=", 1)
    return k, v


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sharding.build",
        description="Convert a panorama dataset into WebDataset shards ({split}-{index:06d}.tar) and "
                    "manifest.json. Depth is stored as uint16 PNG in millimetres (0 = invalid).",
        epilog="Accepted layouts:\n" + sources.__doc__.split("Accepted layouts (paths relative to ``--input``):",
                                                              1)[1].replace("``", "'"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, choices=sources.SOURCES)
    p.add_argument("--input", help="dataset root (optional for --source generated)")
    p.add_argument("--out", required=True, help="output folder for shards and manifest.json")
    p.add_argument("--split", default="all", choices=("train", "val", "test", "all"),
                   help="split(s) to build; sources without splits (folder, generated) write everything to "
                        "this split ('train' for 'all')")
    p.add_argument("--samples-per-shard", type=int, default=100,
                   help="samples per shard (default 100); have at least ranks x DataLoader workers shards")
    p.add_argument("--overwrite", action="store_true", help="replace an existing build in --out")
    p.add_argument("--split-list", action="append", type=_split_list_arg, default=[], metavar="SPLIT=FILE",
                   help="split list file (matterport3d, stanford2d3d); repeatable")
    p.add_argument("--workers", type=int, default=1, help="processes that load and encode samples")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("generated scenes (--source generated)")
    g.add_argument("--count", type=int, help="number of panoramas")
    g.add_argument("--style", default="apartment", help="scene style (apartment, house, office)")
    g.add_argument("--height", type=int, default=256, help="panorama height; width is 2x (default 256)")
    g.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    g.add_argument("--windows", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--watermark", action="store_true", help="draw the nadir watermark (masked invalid)")
    g.add_argument("--rgb-format", choices=("png", "jpg"), default="png", help="RGB encoding (default png)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    cli.add_common_arguments(parser)
    args = parser.parse_args(argv)
    cli.setup_logging(args.log_level)
    gen = {}
    if args.source == "generated":
        gen = dict(count=args.count, style=args.style, height=args.height, seed=args.seed,
                   windows=args.windows, watermark=args.watermark, rgb_format=args.rgb_format)
    manifest = build(args.source, args.input, args.out, split=args.split, samples_per_shard=args.samples_per_shard,
                     overwrite=args.overwrite, split_lists=dict(args.split_list) or None, workers=args.workers,
                     progress=not args.quiet, **gen)
    print(format_summary(manifest, Path(args.out).expanduser().resolve()))
    return 0


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
