"""The training stream: shards -> per-rank, per-worker readers -> decoded, augmented, batched samples.

Design (docs/data_pipeline.md says more):

- A rank's DataLoader worker is one *reader*; readers are numbered ``slot = rank * W + worker`` over all
  ``world_size * W`` readers (``W = max(1, data.num_workers)``).
- Each reader walks *epochs*. In epoch ``e`` the shard list is permuted with a generator of
  ``(seed, e)`` shared by every rank and reader ``slot`` takes every ``G``-th shard from position ``slot``,
  so the readers of all ranks read every sample exactly once per epoch (``data.resampled=false``). With
  ``data.resampled=true`` a reader instead draws ``ceil(n_shards / G)`` shards with replacement per epoch
  (WebDataset's resampling: never-ending, balanced, any shard count; samples may repeat across readers).
- Inside an epoch a reader's samples are shuffled in consecutive blocks of ``data.shuffle_buffer`` samples,
  each block permuted by a generator of ``(seed, epoch, slot, block)``. Unlike a reservoir buffer, a
  block shuffle can be re-entered anywhere: the position of a reader is just ``(epoch, index)``.
- Augmentation draws from :func:`textdiff.data.augment.sample_rng` of ``(seed, epoch, slot, index)``.
- Workers batch their own samples; the DataLoader takes batches from its workers round-robin. A batch
  carries its reader and that reader's position after it, so :meth:`TrainStream.state_dict` knows every
  reader's position and which reader's batch comes next. A fresh stream given that state re-enters each
  reader at its position (reading but not decoding the samples of the current block before it, skipping
  whole shards when the manifest gives their counts) and rotates its workers so the same reader goes
  first: batches k+1, k+2, ... are bit-identical to the uninterrupted run's.

WebDataset supplies URL expansion (``::`` lists, braces), opening (local, ``http(s)://``, ``pipe:``) and
tar reading; its node/worker splitters and reservoir shuffle are not used because they read the rank from
the environment and cannot be resumed exactly.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import math
import os
from dataclasses import dataclass
from itertools import islice
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from textdiff.config import AugmentConfig, DataConfig
from textdiff.data.augment import augment_sample, sample_rng

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
STATE_FORMAT = "textdiff.stream/1"
REMOTE_PREFIXES = ("http://", "https://", "pipe:", "s3://", "gs://", "ais://", "hf://")


class CorruptSample(ValueError):
    """A sample that cannot be decoded; the stream skips it, warns and counts it."""


@dataclass(frozen=True)
class ShardList:
    """The shards of a data set: ``urls`` in a fixed order and, when a manifest gives them, sample counts."""

    urls: tuple[str, ...]
    counts: tuple[Optional[int], ...]


def _split_top_level_commas(spec: str) -> list[str]:
    """Split on commas outside braces, so ``a-{0,1}.tar,b.tar`` gives two patterns."""
    parts, depth, current = [], 0, ""
    for ch in spec:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return parts + [current]


def _manifest_entry(entry: Any, manifest: str) -> tuple[str, Optional[int]]:
    if isinstance(entry, str):
        return entry, None
    if isinstance(entry, dict):
        name = next((entry[k] for k in ("path", "url", "name", "file") if k in entry), None)
        count = next((entry[k] for k in ("count", "samples", "num_samples", "n_samples") if k in entry), None)
        if isinstance(name, str):
            return name, int(count) if count is not None else None
    raise ValueError(f"{manifest}: shard entry {entry!r} has no path; rewrite it with tools/make_shards.py")


def read_manifest(path: str) -> ShardList:
    """The shard list of a ``manifest.json`` written by tools/make_shards.py (paths relative to it)."""
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"data.shards: cannot read manifest {path}: {e}; run tools/make_shards.py") from None
    entries = manifest.get("shards") if isinstance(manifest, dict) else None
    if not entries:
        raise ValueError(f"data.shards: manifest {path} lists no shards (key 'shards'); run tools/make_shards.py")
    base = os.path.dirname(os.path.abspath(path))
    pairs = [_manifest_entry(e, path) for e in entries]
    urls = tuple(u if u.startswith(REMOTE_PREFIXES) or os.path.isabs(u) else os.path.join(base, u)
                 for u, _ in pairs)
    return ShardList(urls, tuple(c for _, c in pairs))


def resolve_shards(spec: str) -> ShardList:
    """Shard URLs from ``data.shards``: brace patterns, globs, comma or ``::`` lists, or a manifest.json.

    Local paths must exist (the error names the missing one); remote URLs are passed to WebDataset as
    they are. Counts come from a manifest (the given one, or ``manifest.json`` beside local shards).
    """
    if not spec:
        raise ValueError("data.shards is empty; set it to the brace pattern in the manifest.json of "
                         "tools/make_shards.py, or to that manifest.json")
    urls: list[str] = []
    counts: list[Optional[int]] = []
    manifests: dict[str, dict[str, Optional[int]]] = {}  # folder -> counts of its manifest, read once
    for part in (p.strip() for chunk in spec.split("::") for p in _split_top_level_commas(chunk)):
        if not part:
            continue
        if part.endswith(".json") and not part.startswith(REMOTE_PREFIXES):
            listed = read_manifest(part)
            urls += listed.urls
            counts += listed.counts
            continue
        for url in wds.shardlists.expand_urls(part):
            if url.startswith(REMOTE_PREFIXES):
                matches = [url]
            elif any(ch in url for ch in "*?["):
                matches = sorted(glob.glob(url))
                if not matches:
                    raise ValueError(f"data.shards: the glob {url} matches no file")
            elif not os.path.exists(url):
                raise ValueError(f"data.shards: shard {url} does not exist; check the pattern or run "
                                 "tools/make_shards.py")
            else:
                matches = [url]
            urls += matches
            counts += [_count_beside(m, manifests) for m in matches]
    if not urls:
        raise ValueError(f"data.shards={spec!r} names no shards")
    return ShardList(tuple(urls), tuple(counts))


def _count_beside(url: str, manifests: dict[str, dict[str, Optional[int]]]) -> Optional[int]:
    """The sample count of a local shard from the manifest.json in its folder, if there is one."""
    if url.startswith(REMOTE_PREFIXES):
        return None
    folder = os.path.dirname(os.path.abspath(url))
    if folder not in manifests:
        manifest = os.path.join(folder, "manifest.json")
        try:
            listed = read_manifest(manifest) if os.path.exists(manifest) else ShardList((), ())
        except ValueError:
            listed = ShardList((), ())
        manifests[folder] = dict(zip(listed.urls, listed.counts))
    return manifests[folder].get(os.path.abspath(url))


def epoch_shards(n_shards: int, seed: int, epoch: int, slot: int, num_slots: int, resampled: bool) -> list[int]:
    """Indices of the shards reader ``slot`` of ``num_slots`` reads in ``epoch``, in reading order."""
    if resampled:
        draws = max(1, math.ceil(n_shards / num_slots))
        return [int(i) for i in sample_rng(seed, "resample", epoch, slot).integers(0, n_shards, draws)]
    order = sample_rng(seed, "epoch", epoch).permutation(n_shards)
    return [int(i) for i in order[slot::num_slots]]


def _epoch_raw(shards: ShardList, order: Sequence[int], skip: int, counters: dict) -> Iterator[dict]:
    """Raw (undecoded) samples of the shards ``order``, from raw index ``skip`` on."""
    def on_error(exn: Exception) -> bool:
        counters["shard_errors"] += 1
        log.warning("skipping the rest of a shard after a read error: %s", exn)
        return True

    for index in order:
        count = shards.counts[index]
        if count is not None and skip >= count:
            skip -= count
            continue
        samples = wds.tariterators.tarfile_samples([{"url": shards.urls[index]}], handler=on_error)
        for sample in samples:
            if skip > 0:
                skip -= 1
                continue
            yield sample


def epoch_samples(shards: ShardList, order: Sequence[int], seed: int, epoch: int, slot: int, block: int,
                  start: int, counters: dict) -> Iterator[tuple[int, dict]]:
    """``(index, raw sample)`` of one reader's epoch, block-shuffled, from ``index == start`` on."""
    block = max(1, block)
    first_block = start // block
    raw = _epoch_raw(shards, order, first_block * block, counters)
    index = first_block * block
    for number in range(first_block, 2 ** 62):
        chunk = list(islice(raw, block))
        if not chunk:
            return
        for i in sample_rng(seed, "block", epoch, slot, number).permutation(len(chunk)):
            if index >= start:
                yield index, chunk[i]
            index += 1


def decode_sample(raw: dict) -> dict:
    """A raw WebDataset sample -> ``{"image": PIL (opened, not decoded), "txt", "captions", "safebox",
    "px_scale", "key"}``.

    ``txt`` is "" for a text-free image and None when the shard has no ``.txt`` (transcription unknown,
    ``make_shards.py --missing-txt keep``): None is the model's null condition, so such images teach the
    unconditional case and never the "no text here" one. Raises :class:`CorruptSample` naming the part
    that is missing or broken.
    """
    ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
    for part, present in (("image (.jpg/.png/.webp)", ext), (".json", "json" in raw)):
        if not present:
            raise CorruptSample(f"missing {part}")
    try:
        txt = raw["txt"].decode("utf-8") if "txt" in raw else None
    except UnicodeDecodeError as e:
        raise CorruptSample(f".txt is not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        meta = json.loads(raw["json"])
        captions = [str(c) for c in meta.get("captions") or []]
        px_scale = [float(s) for s in meta.get("px_scale") or (1.0, 1.0)]
        safebox = meta.get("safebox")
        if safebox is not None:
            safebox = [float(v) for v in safebox]
    except (ValueError, TypeError, AttributeError) as e:
        raise CorruptSample(f".json is malformed: {e}") from None
    if len(px_scale) != 2 or min(px_scale) <= 0 or (safebox is not None and len(safebox) != 4):
        raise CorruptSample(f".json has px_scale {px_scale} / safebox {safebox}; expected [sx, sy] > 0 and "
                            "[l, t, r, b]")
    try:
        image = Image.open(io.BytesIO(raw[ext]))  # header only: augment decodes, JPEGs at reduced scale
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise CorruptSample(f".{ext} does not decode: {e}") from None
    return {"image": image, "txt": txt, "captions": captions, "safebox": safebox, "px_scale": px_scale,
            "key": raw["__key__"]}


def collate(samples: list[dict]) -> dict:
    """Stack per-sample dicts into the batch layout of docs/architecture.md."""
    batch = {"image": torch.stack([s["image"] for s in samples])}
    if "low_res" in samples[0]:
        batch["low_res"] = torch.stack([s["low_res"] for s in samples])
    for name in ("txt", "capt", "key"):
        batch[name] = [s[name] for s in samples]
    return batch


@dataclass(frozen=True)
class StreamSpec:
    """Everything a reader needs, picklable for DataLoader workers."""

    shards: ShardList
    data: DataConfig
    augment: AugmentConfig
    image_size: int
    low_res_size: int
    batch_size: int
    rank: int
    world_size: int

    @property
    def readers_per_rank(self) -> int:
        return max(1, self.data.num_workers)


def _process(spec: StreamSpec, raw: dict, epoch: int, slot: int, index: int) -> dict:
    sample = decode_sample(raw)
    rng = sample_rng(spec.data.seed, epoch, slot, index)
    caption = sample["captions"][int(rng.integers(len(sample["captions"])))] if sample["captions"] else ""
    try:
        out = augment_sample(sample["image"], sample["txt"], sample["safebox"], sample["px_scale"], spec.augment,
                             spec.image_size, spec.low_res_size, rng)
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:  # pixel data broken past the header
        raise CorruptSample(f"image does not decode: {e}") from None
    except ValueError as e:  # a safebox outside the image
        raise CorruptSample(str(e)) from None
    return {**out, "txt": sample["txt"], "capt": caption, "key": sample["key"]}


def reader_batches(spec: StreamSpec, reader: int, position: dict) -> Iterator[dict]:
    """The never-ending batches of one reader (worker ``reader`` of this rank) from ``position``.

    Each batch carries ``_reader`` and ``_position`` (epoch, index and skip counts after it).
    """
    slot = spec.rank * spec.readers_per_rank + reader
    num_slots = spec.world_size * spec.readers_per_rank
    epoch, start = position["epoch"], position["index"]
    counters = {"skipped_corrupt": position["skipped_corrupt"], "shard_errors": position["shard_errors"]}
    pending: list[dict] = []
    while True:
        order = epoch_shards(len(spec.shards.urls), spec.data.seed, epoch, slot, num_slots, spec.data.resampled)
        read_any = False
        for index, raw in epoch_samples(spec.shards, order, spec.data.seed, epoch, slot, spec.data.shuffle_buffer,
                                        start, counters):
            read_any = True
            try:
                pending.append(_process(spec, raw, epoch, slot, index))
            except CorruptSample as e:
                counters["skipped_corrupt"] += 1
                log.warning("skipping corrupt sample %s in %s: %s", raw.get("__key__"), raw.get("__url__"), e)
                continue
            if len(pending) == spec.batch_size:
                batch = collate(pending)
                batch["_reader"] = reader
                batch["_position"] = {"epoch": epoch, "index": index + 1, **counters}
                pending = []
                yield batch
        if not read_any and start == 0:
            raise RuntimeError(f"reader {slot} found no samples in epoch {epoch} (shards "
                               f"{[spec.shards.urls[i] for i in order]}); check data.shards")
        epoch, start = epoch + 1, 0


class _ReaderDataset(IterableDataset):
    """DataLoader worker ``w`` runs reader ``(w + first_reader) % W`` from its stored position."""

    def __init__(self, spec: StreamSpec, positions: list[dict], first_reader: int):
        self.spec, self.positions, self.first_reader = spec, positions, first_reader

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        reader = (worker + self.first_reader) % self.spec.readers_per_rank
        return reader_batches(self.spec, reader, self.positions[reader])


def _fingerprint(spec: StreamSpec) -> dict:
    return {"rank": spec.rank, "world_size": spec.world_size, "num_workers": spec.data.num_workers,
            "batch_size": spec.batch_size, "seed": spec.data.seed, "resampled": spec.data.resampled,
            "shuffle_buffer": spec.data.shuffle_buffer, "num_shards": len(spec.shards.urls),
            "shard_digest": _digest(os.path.basename(u) for u in spec.shards.urls)}


def _digest(names) -> str:
    return hashlib.sha256("\n".join(names).encode("utf-8")).hexdigest()[:16]


class TrainStream:
    """Iterates batches of this rank forever; ``state_dict()`` / ``counters()`` report its position.

    Each ``iter()`` starts a DataLoader at the current position, so iterating again after a break continues
    where the last batch left off.
    """

    def __init__(self, spec: StreamSpec, state: Optional[dict] = None):
        self.spec = spec
        readers = spec.readers_per_rank
        self._positions = [{"epoch": 0, "index": 0, "skipped_corrupt": 0, "shard_errors": 0}
                           for _ in range(readers)]
        self._next_reader, self._batches = 0, 0
        if state is not None:
            self._load(state)

    def _load(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"stream state has format {state.get('format')!r}, expected {STATE_FORMAT!r}; "
                             "it was not written by TrainStream.state_dict()")
        expected = _fingerprint(self.spec)
        for key, value in expected.items():
            if state.get(key) != value:
                saved = "another list of shard names" if key == "shard_digest" else f"{key}={state.get(key)!r}"
                now = "data.shards names other shards" if key == "shard_digest" else f"{key}={value!r}"
                raise ValueError(f"the stream state was saved with {saved}, but in this run {now} (data.*, "
                                 "batch size, world size); resume with the same settings or start the "
                                 "stream afresh without the saved state")
        self._positions = [dict(p) for p in state["readers"]]
        self._next_reader, self._batches = state["next_reader"], state["batches"]

    def state_dict(self) -> dict:
        """JSON-able position: every reader's (epoch, index) and which reader's batch comes next."""
        return {"format": STATE_FORMAT, **_fingerprint(self.spec), "next_reader": self._next_reader,
                "batches": self._batches, "readers": [dict(p) for p in self._positions]}

    def counters(self) -> dict[str, int]:
        """Batches and samples delivered, corrupt samples and shard read errors skipped, lowest epoch."""
        return {"batches": self._batches, "samples": self._batches * self.spec.batch_size,
                "skipped_corrupt": sum(p["skipped_corrupt"] for p in self._positions),
                "shard_errors": sum(p["shard_errors"] for p in self._positions),
                "epoch": min(p["epoch"] for p in self._positions)}

    def __iter__(self) -> Iterator[dict]:
        data = self.spec.data
        dataset = _ReaderDataset(self.spec, [dict(p) for p in self._positions], self._next_reader)
        extra = {"prefetch_factor": data.prefetch_factor} if data.num_workers > 0 else {}
        loader = DataLoader(dataset, batch_size=None, num_workers=data.num_workers, pin_memory=data.pin_memory,
                            **extra)
        for batch in loader:
            reader = batch.pop("_reader")
            self._positions[reader] = {k: int(v) for k, v in batch.pop("_position").items()}
            self._next_reader = (reader + 1) % self.spec.readers_per_rank
            self._batches += 1
            yield batch


def build_train_stream(data_cfg: DataConfig, augment_cfg: AugmentConfig, image_size: int, low_res_size: int,
                       batch_size: int, rank: int, world_size: int, state: Optional[dict] = None) -> TrainStream:
    """The training stream of rank ``rank`` of ``world_size`` (from DeepSpeed/torch.distributed).

    ``batch_size`` is the per-rank micro-batch; ``low_res_size`` 0 means no ``low_res`` in batches;
    ``state`` is a saved :meth:`TrainStream.state_dict` to continue from.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if batch_size < 1:
        raise ValueError(f"batch size {batch_size} must be positive (DeepSpeed train_micro_batch_size_per_gpu)")
    shards = resolve_shards(data_cfg.shards)
    readers = world_size * max(1, data_cfg.num_workers)
    if not data_cfg.resampled and len(shards.urls) < readers:
        raise ValueError(f"data.shards has {len(shards.urls)} shards but world_size x data.num_workers = "
                         f"{readers} readers each need one per epoch; write more, smaller shards "
                         "(tools/make_shards.py --maxcount), use fewer workers, or set data.resampled=true")
    spec = StreamSpec(shards, data_cfg, augment_cfg, image_size, low_res_size, batch_size, rank, world_size)
    return TrainStream(spec, state)
