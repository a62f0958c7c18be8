"""The sharder: a source folder (or the synthetic demo set) -> WebDataset tar shards plus ``manifest.json``.

Each sample is ``KEY.jpg|png|webp`` (the image bytes, RGB), ``KEY.txt`` (the transcription, UTF-8; "" = no
text; absent = unknown, only with ``--missing-txt keep``) and ``KEY.json`` (``captions``, ``safebox``,
``px_scale``, ``width``, ``height``, ``source``; the same keys and types in every sample, and ``unreadable``
where ``--unreadable`` lists boxes of text OCR could not read). Samples are
written in a random order over the whole input (``--seed``), so every shard is a random sample of the set.
Shards are ``OUT_DIR/shard-000000.tar ...``; each is written as ``shard-NNNNNN.tar.partial`` and renamed
when complete, so a killed run leaves no half shard under a shard name. ``manifest.json`` (written last,
also atomically) lists the shards, counts, bytes, the share of text-free images, the brace pattern for
training, the sample order and seed, the command, and every skipped input.

Usage (see docs/data.md)::

    python tools/make_shards.py SRC_DIR OUT_DIR [--captions C.json] [--safeboxes S.json] [--px-scales P.json]
        [--transcriptions T.json] [--unreadable U.json]
        [--seed S]   # the random sample order (default 0; --order sorted keeps path order)
    python tools/make_shards.py --synthetic 1000 OUT_DIR --seed 0
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from textdiff.data import side_files, sources
from textdiff.data.pool import pool_map
from textdiff.data.sources import (BAD_INPUT_KINDS, DEFAULT_MAX_PIXELS, ImageJob, KeyIndex, Problem, ShardSample,
                                   SourceError, SourceOptions, sample_meta)
from textdiff.data.synthetic import MIN_SIZE as MIN_SYNTHETIC_SIZE, synthetic_sample
from textdiff.files import atomic_write_json, publish

SHARD_NAME = "shard-{:06d}.tar"
PARTIAL_SUFFIX = ".partial"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "textdiff-shards/1"
# Sample orders of a source folder: a seeded random permutation (the default: each shard a random sample of
# the set) or the sorted paths (a folder laid out by source then gives shards of one source each).
ORDER_RANDOM, ORDER_SORTED = "random", "sorted"
# Synthetic samples are drawn independently per index, so index order already is a random order.
ORDER_SYNTHETIC = "index"
# Fixed tar member time, so the same input gives byte-identical shards.
TAR_MTIME = 0.0


class ShardingError(RuntimeError):
    """The sharder cannot go on (bad OUT_DIR, bad input under --strict); the message says what to do."""


@dataclass
class ShardInfo:
    """One finished shard: its file name in OUT_DIR, sample count and size in bytes."""

    name: str
    samples: int
    bytes: int


def prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Create ``out_dir``; refuse a non-empty one unless ``overwrite``, which removes earlier shards only."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ShardingError(f"output folder {out_dir} is a file; give a folder path")
    out_dir.mkdir(parents=True, exist_ok=True)
    present = sorted(p.name for p in out_dir.iterdir())
    if present and not overwrite:
        shown = ", ".join(present[:5]) + (" ..." if len(present) > 5 else "")
        raise ShardingError(f"output folder {out_dir} is not empty ({len(present)} entries: {shown}); pass "
                            "--overwrite to replace its shards and manifest, or choose an empty folder")
    for name in present:
        if re.fullmatch(r"shard-\d{6}\.tar(\.partial)?", name) or name == MANIFEST_NAME:
            (out_dir / name).unlink()


def write_shards(samples: Iterable[ShardSample], out_dir: Path, maxcount: int = 10000,
                 maxsize: float = 1e9) -> list[ShardInfo]:
    """Write samples into ``out_dir/shard-NNNNNN.tar``, a new shard after ``maxcount`` samples or ``maxsize``
    bytes; each shard is renamed into place only when complete (an exception leaves no partial shard)."""
    from webdataset import TarWriter  # imports torch: only when shards are written

    shards: list[ShardInfo] = []
    writer, partial, count, size = None, None, 0, 0
    try:
        for sample in samples:
            if writer is not None and (count >= maxcount or size >= maxsize):
                writer.close()
                shards.append(_finish(partial, count))
                writer = None
            if writer is None:
                partial = out_dir / (SHARD_NAME.format(len(shards)) + PARTIAL_SUFFIX)
                writer, count, size = TarWriter(str(partial), mtime=TAR_MTIME, encoder=False, format="PAX_FORMAT"), 0, 0
            size += writer.write(sample.to_webdataset())
            count += 1
        if writer is not None:
            writer.close()
            shards.append(_finish(partial, count))
            writer = None
    finally:
        if writer is not None:
            writer.close()
            partial.unlink(missing_ok=True)
    return shards


def _finish(partial: Path, count: int) -> ShardInfo:
    final = partial.with_name(partial.name[: -len(PARTIAL_SUFFIX)])
    publish(partial, final)
    return ShardInfo(final.name, count, final.stat().st_size)


def brace_pattern(out_dir: Path, count: int) -> str:
    """The brace pattern naming ``count`` shards of ``out_dir`` (absolute), for ``data.shards``."""
    base = out_dir.resolve()
    if count == 1:
        return str(base / SHARD_NAME.format(0))
    return str(base / f"shard-{{{0:06d}..{count - 1:06d}}}.tar")


def build_manifest(out_dir: Path, shards: list[ShardInfo], written: Counter, problems: list[Problem],
                   inputs: int, command: str, order: str = ORDER_RANDOM, seed: int = 0) -> dict:
    """The manifest.json content (documented field by field in docs/data.md)."""
    samples = sum(s.samples for s in shards)
    return {
        "format": MANIFEST_FORMAT,
        "pattern": brace_pattern(out_dir, len(shards)) if shards else None,
        "shards": [{"name": s.name, "samples": s.samples, "bytes": s.bytes} for s in shards],
        "samples": samples,
        "bytes": sum(s.bytes for s in shards),
        "inputs": inputs,
        "with_text": written["with_text"],
        "text_free": written["text_free"],
        "unknown_text": written["unknown_text"],
        "with_unreadable": written["with_unreadable"],
        "text_free_share": written["text_free"] / samples if samples else 0.0,
        "skipped_count": len(problems),
        "skipped_by_kind": dict(sorted(Counter(p.kind for p in problems).items())),
        "skipped": [p.to_json() for p in problems],
        "order": order,
        "seed": seed,
        "command": command,
    }


def _count_kind(sample: ShardSample) -> str:
    return "unknown_text" if sample.txt is None else "text_free" if sample.txt == "" else "with_text"


def _count(written: Counter, sample: ShardSample) -> None:
    written[_count_kind(sample)] += 1
    written["with_unreadable"] += "unreadable" in sample.meta


def _render_synthetic(args: tuple[int, int, int, str]) -> ShardSample:
    index, seed, size, ext = args
    sample = synthetic_sample(index, seed, size)
    meta = sample_meta(sample.captions, sample.safebox, sample.px_scale, size, size, f"synthetic:{seed}:{index}")
    return ShardSample(f"{index:06d}", ext, sources.encode_image(sample.image, ext), sample.text, meta)


def make_synthetic_shards(n: int, out_dir: str | Path, seed: int = 0, size: int = 64, maxcount: int = 10000,
                          maxsize: float = 1e9, workers: int = 0, overwrite: bool = False,
                          progress: bool = True, command: str = "", image_format: str = "png") -> dict:
    """Write ``n`` demo images (textdiff.data.synthetic) as shards into ``out_dir``; returns the manifest.

    ``image_format`` is "png" (lossless, the default), "jpg" or "webp".
    """
    if n < 1:
        raise ShardingError(f"--synthetic {n}: give a positive number of images")
    if size < MIN_SYNTHETIC_SIZE:
        raise ShardingError(f"--size {size}: synthetic images need at least {MIN_SYNTHETIC_SIZE} px for legible text")
    out_dir = Path(out_dir)
    prepare_out_dir(out_dir, overwrite)
    written: Counter = Counter()

    def counted(stream: Iterable[ShardSample]) -> Iterator[ShardSample]:
        for sample in stream:
            _count(written, sample)
            yield sample

    if image_format not in ("png", "jpg", "webp"):
        raise ShardingError(f"--image-format {image_format}: synthetic images are stored as png, jpg or webp")
    items = [(i, seed, size, image_format) for i in range(n)]
    shards = write_shards(counted(pool_map(_render_synthetic, items, workers, "synthetic", progress)),
                          out_dir, maxcount, maxsize)
    manifest = build_manifest(out_dir, shards, written, [], n, command, ORDER_SYNTHETIC, seed)
    atomic_write_json(out_dir / MANIFEST_NAME, manifest)
    return manifest


def sample_keys(rel_paths: Sequence[str]) -> list[str]:
    """Shard sample keys for source images: the canonical key with every character outside
    ``[A-Za-z0-9_-/]`` (dots above all, which WebDataset reads as the start of the extension) made ``_``;
    a clash gets ``_2``, ``_3`` ... in sorted order."""
    keys, used = [], set()
    for rel in rel_paths:
        base = re.sub(r"[^A-Za-z0-9_/-]", "_", sources.canonical_key(rel))
        key, n = base, 1
        while key in used:
            n += 1
            key = f"{base}_{n}"
        used.add(key)
        keys.append(key)
    return keys


def plan_source_jobs(src_dir: Path, captions: Optional[Path] = None, safeboxes: Optional[Path] = None,
                     px_scales: Optional[Path] = None, transcriptions: Optional[Path] = None,
                     unreadable: Optional[Path] = None) -> tuple[list[ImageJob], list[Problem], int]:
    """Scan ``src_dir`` and map the side files onto its images: (jobs, problems, images found). With
    ``transcriptions``, each image's transcription is its value there (not its .txt); with ``unreadable``,
    each listed image carries its boxes of text OCR could not read."""
    rel_paths = sources.scan_images(src_dir)
    if not rel_paths:
        raise SourceError(f"source folder {src_dir} holds no images ({', '.join(sources.IMAGE_SUFFIXES)})")
    index = KeyIndex(rel_paths)
    problems: list[Problem] = []
    skip: set[str] = set()
    values = {}
    for name, path, parse, bad_kind in (("captions", captions, side_files.parse_captions, "bad_value"),
                                        ("safebox", safeboxes, side_files.parse_safebox, "bad_safebox"),
                                        ("px_scale", px_scales, side_files.parse_px_scale, "bad_value"),
                                        ("transcription", transcriptions, sources.parse_transcription, "bad_value"),
                                        ("unreadable", unreadable, side_files.parse_unreadable, "bad_unreadable")):
        if path is None:
            values[name] = {}
            continue
        values[name], found, skipped = side_files.resolve_side_file(Path(path), index, parse, bad_kind)
        problems += found
        skip |= skipped
    listed = str(transcriptions) if transcriptions is not None else None
    boxes_file = str(unreadable) if unreadable is not None else None
    jobs = [ImageJob(str(src_dir), rel, key, tuple(values["captions"].get(rel, ())),
                     _tuple_or_none(values["safebox"].get(rel)), tuple(values["px_scale"].get(rel, (1.0, 1.0))),
                     listed, values["transcription"].get(rel), boxes_file,
                     tuple(tuple(b) for b in values["unreadable"].get(rel, ())))
            for rel, key in zip(rel_paths, sample_keys(rel_paths)) if rel not in skip]
    return jobs, problems, len(rel_paths)


def _tuple_or_none(value: Optional[list]) -> Optional[tuple]:
    return tuple(value) if value is not None else None


def _fatal_if_strict(problems: Iterable[Problem], strict: bool, after: str) -> None:
    if not strict:
        return
    for p in problems:
        if p.kind in BAD_INPUT_KINDS:
            raise ShardingError(f"{p.where}: {p.reason} [--strict: stopped {after}]")


class _Prepare:
    """Picklable ``prepare_sample`` with fixed options, for the worker pool."""

    def __init__(self, options: SourceOptions):
        self.options = options

    def __call__(self, job: ImageJob) -> ShardSample | Problem:
        return sources.prepare_sample(job, self.options)


def make_source_shards(src_dir: str | Path, out_dir: str | Path, captions: Optional[str | Path] = None,
                       safeboxes: Optional[str | Path] = None, px_scales: Optional[str | Path] = None,
                       options: SourceOptions = SourceOptions(), strict: bool = False, maxcount: int = 10000,
                       maxsize: float = 1e9, workers: int = 0, overwrite: bool = False, progress: bool = True,
                       command: str = "", seed: int = 0, order: str = ORDER_RANDOM,
                       transcriptions: Optional[str | Path] = None, unreadable: Optional[str | Path] = None) -> dict:
    """Write the images of ``src_dir`` (with their .txt, or the ``transcriptions`` side file, and the other
    side files; ``unreadable``: boxes of text OCR could not read, stored in the samples' .json) as shards;
    returns the manifest.

    ``order`` "random" writes the images in the permutation ``seed`` draws over all of them (each shard a
    random sample of the set); "sorted" in path order. Bad input is skipped and listed in the manifest, or
    raises ShardingError with ``strict``.
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if out_dir.resolve() == src_dir.resolve() or src_dir.resolve() in out_dir.resolve().parents:
        raise ShardingError(f"output folder {out_dir} lies inside the source folder {src_dir}; choose another")
    if order not in (ORDER_RANDOM, ORDER_SORTED):
        raise ShardingError(f"--order {order}: choose {ORDER_RANDOM} or {ORDER_SORTED}")
    jobs, problems, inputs = plan_source_jobs(src_dir, *(Path(p) if p else None for p in
                                                         (captions, safeboxes, px_scales, transcriptions, unreadable)))
    if order == ORDER_RANDOM:
        jobs = shuffled(jobs, seed)
    _fatal_if_strict(problems, strict, "before writing anything")
    prepare_out_dir(out_dir, overwrite)
    written: Counter = Counter()

    def accepted(results: Iterable[ShardSample | Problem]) -> Iterator[ShardSample]:
        for result in results:
            if isinstance(result, Problem):
                _fatal_if_strict([result], strict, f"with the complete shards so far in {out_dir} and no manifest; "
                                 "rerun with --overwrite once fixed")
                problems.append(result)
                continue
            _count(written, result)
            yield result

    shards = write_shards(accepted(pool_map(_Prepare(options), jobs, workers, "shards", progress)),
                          out_dir, maxcount, maxsize)
    manifest = build_manifest(out_dir, shards, written, problems, inputs, command, order, seed)
    atomic_write_json(out_dir / MANIFEST_NAME, manifest)
    return manifest


def shuffled(items: Sequence, seed: int) -> list:
    """``items`` in the permutation that ``seed`` draws (numpy PCG64: the same on every machine)."""
    return [items[i] for i in np.random.default_rng(seed).permutation(len(items))]


def build_parser() -> argparse.ArgumentParser:
    """The command line of tools/make_shards.py (textdiff-make-shards)."""
    p = argparse.ArgumentParser(
        prog="make_shards.py", description="Write WebDataset tar shards (+ manifest.json) from a folder of "
        "images with .txt transcriptions, or the built-in synthetic demo set. See docs/data.md.",
        usage="%(prog)s SRC_DIR OUT_DIR [options]\n       %(prog)s --synthetic N OUT_DIR [--seed S] [options]")
    p.add_argument("paths", nargs="+", metavar="SRC_DIR OUT_DIR", help="source folder and output folder "
                   "(only OUT_DIR with --synthetic)")
    p.add_argument("--synthetic", type=int, metavar="N", help="write N synthetic demo images instead of a folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample order of a folder (--order random) or "
                   "of the synthetic set (default 0)")
    p.add_argument("--order", choices=(ORDER_RANDOM, ORDER_SORTED), default=None,
                   help="folder only: write the images in a seeded random order (default; each shard a random "
                   "sample of the set) or sorted by path")
    p.add_argument("--size", type=int, default=None,
                   help=f"synthetic only: image side in px (default {SYNTHETIC_SIZE})")
    p.add_argument("--captions", help="JSON object {key: caption or [captions]} or JSON Lines {key, value}")
    p.add_argument("--safeboxes", help="JSON {key: [left, top, right, bottom]} in stored-image pixels")
    p.add_argument("--px-scales", help="JSON {key: [sx, sy]}: stored size / original size")
    p.add_argument("--transcriptions", help="JSON {key: text} (\"\" = no text; tools/annotate.py writes it): "
                   "the transcriptions, read instead of the .txt beside each image; images it does not list have "
                   "unknown text (see --missing-txt)")
    p.add_argument("--unreadable", help="JSON {key: [[left, top, right, bottom], ...]} in stored-image pixels: "
                   "boxes of text OCR could not read (tools/annotate.py --unreadable mask writes it), stored in each "
                   "sample's .json for data.mask_unreadable; the safebox should cover them too")
    p.add_argument("--missing-txt", choices=("skip", "keep"), default=None,
                   help="images without a .txt (unknown text): skip them (default) or keep them without KEY.txt")
    p.add_argument("--strip-txt", action="store_true",
                   help="drop trailing newlines of each .txt and count a whitespace-only .txt as no text (default: "
                   "keep the file as the research code reads it; a trailing newline is a token)")
    p.add_argument("--min-side", type=int, default=None, help="skip images whose shorter side / px scale is below this")
    p.add_argument("--require-captions", action="store_true", help="skip images without a caption")
    p.add_argument("--max-side", type=int, default=None,
                   help="shrink images whose longer side exceeds this (rescales safebox and px scale); 0: keep bytes")
    p.add_argument("--image-format", choices=("keep", "jpg", "png", "webp"), default="keep",
                   help="keep each image's bytes and format (default), or store all in one format (re-encoded; "
                   "the datasets library's webdataset loader needs one format per data set); synthetic images "
                   "are png unless jpg or webp is given")
    p.add_argument("--max-pixels", type=int, default=None,
                   help=f"refuse images above this many pixels (decompression bombs; default {DEFAULT_MAX_PIXELS})")
    p.add_argument("--maxcount", type=int, default=10000, help="samples per shard at most (default 10000)")
    p.add_argument("--maxsize", type=float, default=1e9, help="bytes per shard, about (default 1e9)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="decoding processes (0: in the main process; default min(8, CPUs))")
    p.add_argument("--strict", action="store_true", help="stop at the first bad input instead of skipping it")
    p.add_argument("--overwrite", action="store_true", help="replace the shards and manifest of a non-empty OUT_DIR")
    return p


# Flags that act on a source folder's images only (default None or False, so a given one is seen).
FOLDER_ONLY_FLAGS = ("captions", "safeboxes", "px_scales", "transcriptions", "unreadable", "missing_txt", "min_side",
                     "max_side", "max_pixels", "require_captions", "strict", "order", "strip_txt")
SYNTHETIC_SIZE = 64


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse (exit status 2) what a mode would silently ignore, and impossible numbers."""
    if args.synthetic is not None:
        if len(args.paths) != 1:
            p.error(f"--synthetic N takes only OUT_DIR; got {len(args.paths)} paths: {' '.join(args.paths)}")
        given = [f for f in FOLDER_ONLY_FLAGS if getattr(args, f) not in (None, False)]
        if given:
            p.error(f"--{given[0].replace('_', '-')} applies to a source folder, not to --synthetic (synthetic "
                    "images are rendered at --size with known text and captions; nothing to filter or resize)")
    elif len(args.paths) != 2:
        p.error(f"expected SRC_DIR OUT_DIR (or --synthetic N OUT_DIR); got {len(args.paths)} paths")
    elif args.size is not None:
        p.error("--size applies to --synthetic only; shrink a folder's images with --max-side")
    for flag in ("maxcount", "maxsize", "max_pixels", "size"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            p.error(f"--{flag.replace('_', '-')} must be positive")
    for flag in ("workers", "min_side", "max_side"):
        if getattr(args, flag) is not None and getattr(args, flag) < 0:
            p.error(f"--{flag.replace('_', '-')} must be >= 0")


def run(argv: Optional[Sequence[str]] = None) -> dict:
    """Parse the command line and write the shards; returns the manifest (raises on errors)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    command = shlex.join(["make_shards.py", *argv])
    common = dict(maxcount=args.maxcount, maxsize=args.maxsize, workers=args.workers, overwrite=args.overwrite,
                  command=command)
    if args.synthetic is not None:
        fmt = "png" if args.image_format == "keep" else args.image_format
        return make_synthetic_shards(args.synthetic, args.paths[0], seed=args.seed, size=args.size or SYNTHETIC_SIZE,
                                     image_format=fmt, **common)
    defaults = SourceOptions()
    options = SourceOptions(missing_txt=args.missing_txt or defaults.missing_txt,
                            min_side=defaults.min_side if args.min_side is None else args.min_side,
                            require_captions=args.require_captions,
                            max_side=defaults.max_side if args.max_side is None else args.max_side,
                            max_pixels=args.max_pixels or defaults.max_pixels, image_format=args.image_format,
                            strip_txt=args.strip_txt)
    return make_source_shards(args.paths[0], args.paths[1], args.captions, args.safeboxes, args.px_scales,
                              options=options, strict=args.strict, seed=args.seed, order=args.order or ORDER_RANDOM,
                              transcriptions=args.transcriptions, unreadable=args.unreadable, **common)


def summary(manifest: dict) -> str:
    """A few lines for the terminal: what was written, what was skipped, what to pass to training."""
    unreadable = manifest.get("with_unreadable")
    lines = [f"wrote {len(manifest['shards'])} shards, {manifest['samples']} samples "
             f"({manifest['text_free_share']:.1%} text-free, {manifest['unknown_text']} unknown text"
             + (f", {unreadable} with unreadable text boxes" if unreadable else "")
             + f"), {manifest['bytes'] / 1e6:.1f} MB"]
    if manifest["skipped_count"]:
        kinds = ", ".join(f"{k}: {v}" for k, v in manifest["skipped_by_kind"].items())
        lines.append(f"skipped {manifest['skipped_count']} inputs ({kinds}); reasons in manifest.json 'skipped'")
        lines += [f"  {s['source']}: {s['reason']}" for s in manifest["skipped"][:5]]
    if manifest["pattern"]:
        lines.append(f"train with: --set data.shards={manifest['pattern']}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point: run and print the summary; exit 1 on an error or when no sample was written."""
    try:
        manifest = run(argv)
    except (ShardingError, SourceError) as e:
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 1
    print(summary(manifest))
    if not manifest["samples"]:
        print("make_shards: error: no sample was written; see the skipped inputs above", file=sys.stderr)
        return 1
    return 0
