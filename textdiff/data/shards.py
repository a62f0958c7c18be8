"""The sharder: a source folder (or the synthetic demo set) -> WebDataset tar shards plus ``manifest.json``.

Each sample is ``KEY.jpg|png|webp`` (the image bytes, RGB), ``KEY.txt`` (the transcription, UTF-8; "" = no
text; absent = unknown, only with ``--missing-txt keep``) and ``KEY.json`` (``captions``, ``safebox``,
``px_scale``, ``width``, ``height``, ``source``). Shards are ``OUT_DIR/shard-000000.tar ...``; each is
written as ``shard-NNNNNN.tar.partial`` and renamed when complete, so a killed run leaves no half shard
under a shard name. ``manifest.json`` (written last, also atomically) lists the shards, counts, bytes, the
share of text-free images, the brace pattern for training, the command, and every skipped input.

Usage (see docs/data.md)::

    python tools/make_shards.py SRC_DIR OUT_DIR [--captions C.json] [--safeboxes S.json] [--px-scales P.json]
    python tools/make_shards.py --synthetic 1000 OUT_DIR --seed 0
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import re
import shlex
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

from tqdm.auto import tqdm

from textdiff.data import sources
from textdiff.data.sources import (BAD_INPUT_KINDS, ImageJob, KeyIndex, Problem, ShardSample, SourceError,
                                   SourceOptions)
from textdiff.data.synthetic import synthetic_sample

SHARD_NAME = "shard-{:06d}.tar"
PARTIAL_SUFFIX = ".partial"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "textdiff-shards/1"
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
    with open(partial, "rb") as f:
        os.fsync(f.fileno())
    os.replace(partial, final)
    return ShardInfo(final.name, count, final.stat().st_size)


def brace_pattern(out_dir: Path, count: int) -> str:
    """The brace pattern naming ``count`` shards of ``out_dir`` (absolute), for ``data.shards``."""
    base = out_dir.resolve()
    if count == 1:
        return str(base / SHARD_NAME.format(0))
    return str(base / f"shard-{{{0:06d}..{count - 1:06d}}}.tar")


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write ``obj`` as indented JSON to ``path`` via a temporary name and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def build_manifest(out_dir: Path, shards: list[ShardInfo], written: Counter, problems: list[Problem],
                   inputs: int, command: str) -> dict:
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
        "text_free_share": written["text_free"] / samples if samples else 0.0,
        "skipped_count": len(problems),
        "skipped_by_kind": dict(sorted(Counter(p.kind for p in problems).items())),
        "skipped": [p.to_json() for p in problems],
        "command": command,
    }


def _count_kind(sample: ShardSample) -> str:
    return "unknown_text" if sample.txt is None else "text_free" if sample.txt == "" else "with_text"


def _pool_map(fn: Callable, items: Sequence, workers: int, desc: str, progress: bool) -> Iterator:
    """``fn`` over ``items`` in order, in a pool of ``workers`` processes (0: in this process), with tqdm."""
    bar = tqdm(total=len(items), desc=desc, unit="img", disable=not progress)
    if workers <= 0:
        results: Iterable = map(fn, items)
        pool = None
    else:
        pool = multiprocessing.get_context("spawn" if sys.platform == "darwin" else "fork").Pool(workers)
        results = pool.imap(fn, items, chunksize=max(1, min(64, len(items) // (workers * 8) or 1)))
    try:
        for result in results:
            bar.update(1)
            yield result
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()


def _render_synthetic(args: tuple[int, int, int]) -> ShardSample:
    index, seed, size = args
    sample = synthetic_sample(index, seed, size)
    buf = io.BytesIO()
    sample.image.save(buf, "PNG")
    meta = {"captions": sample.captions, "safebox": sample.safebox, "px_scale": sample.px_scale,
            "width": size, "height": size, "source": f"synthetic:{seed}:{index}"}
    return ShardSample(f"{index:06d}", "png", buf.getvalue(), sample.text, meta)


def make_synthetic_shards(n: int, out_dir: str | Path, seed: int = 0, size: int = 64, maxcount: int = 10000,
                          maxsize: float = 1e9, workers: int = 0, overwrite: bool = False,
                          progress: bool = True, command: str = "") -> dict:
    """Write ``n`` demo images (textdiff.data.synthetic) as shards into ``out_dir``; returns the manifest."""
    if n < 1:
        raise ShardingError(f"--synthetic {n}: give a positive number of images")
    out_dir = Path(out_dir)
    prepare_out_dir(out_dir, overwrite)
    written: Counter = Counter()

    def counted(stream: Iterable[ShardSample]) -> Iterator[ShardSample]:
        for sample in stream:
            written[_count_kind(sample)] += 1
            yield sample

    items = [(i, seed, size) for i in range(n)]
    shards = write_shards(counted(_pool_map(_render_synthetic, items, workers, "synthetic", progress)),
                          out_dir, maxcount, maxsize)
    manifest = build_manifest(out_dir, shards, written, [], n, command)
    write_json_atomic(out_dir / MANIFEST_NAME, manifest)
    return manifest
