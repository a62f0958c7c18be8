"""The training stream: shards -> per-rank, per-worker readers -> decoded, augmented, batched samples.

Which shards ``data.shards`` names is textdiff.data.shard_urls; opening them (local, ``pipe:``, and fsspec URLs
read through network faults) is textdiff.data.remote. Design (docs/data_pipeline.md says more):

- A rank's DataLoader worker is one *reader*; readers are numbered ``slot = rank * W + worker`` over all
  ``world_size * W`` readers (``W = max(1, data.num_workers)``).
- Each reader walks *epochs*. In epoch ``e`` the shard list is permuted with a generator of
  ``(seed, e)`` shared by every rank and reader ``slot`` takes every ``G``-th shard from position ``slot``,
  so the readers of all ranks read every sample exactly once per epoch (``data.resampled=false``). With
  ``data.resampled=true`` a reader instead draws ``ceil(n_shards / G)`` shards with replacement per epoch
  (WebDataset's resampling: never-ending, balanced, any shard count; samples may repeat across readers).
- A reader takes its epoch's shards in *groups* of ``data.open_shards`` and reads a group's shards at
  once: each next sample comes from one of them, drawn by a generator of ``(seed, epoch, slot, group)``
  with weights of the samples each has left (by the manifest's counts; equal weights without them), so a
  group's samples are a random interleaving of its shards even when each shard holds one source.
- The samples of a group are then shuffled in consecutive blocks of ``data.shuffle_buffer`` samples, each
  block permuted by a generator of ``(seed, epoch, slot, group, block)``. Unlike a reservoir buffer, a
  block shuffle can be re-entered anywhere: the position of a reader is ``(epoch, group, index)``, with
  ``index`` counting the samples actually read from the group (never the manifest's counts, so a short
  shard cannot shift it).
- Augmentation draws from :func:`textdiff.data.augment.sample_rng` of ``(seed, epoch, slot, group, index)``.
  A text-free image that borrows a safebox draws it from the safeboxes of its shuffle block.
- A shard that ends early (a cut or garbled tar, fewer samples than its manifest lists, or a remote read that
  failed for good: HTTP 404, or a transient fault past ``data.retries``) is counted once in ``shard_errors``
  and warned about by name; its last sample read is dropped, since nothing shows that all of its members were
  read. A transient fault that a retry overcomes changes nothing: the retry resumes at the byte reached.
- Workers batch their own samples; the DataLoader takes batches from its workers round-robin. A batch
  carries its reader and that reader's position after it, so :meth:`TrainStream.state_dict` knows every
  reader's position and which reader's batch comes next. A fresh stream given that state re-enters each
  reader at its position (skipping whole groups, reading but not decoding the samples of the current
  group before its position) and rotates its workers so the same reader goes first: batches k+1, k+2, ...
  are bit-identical to the uninterrupted run's.

WebDataset supplies URL expansion (``::`` lists, braces), ``pipe:`` opening (only with ``data.allow_pipe``,
since it runs a shell command) and tar reading; its node/worker splitters and reservoir shuffle are not used
because they read the rank from the environment and cannot be resumed exactly, nor its ``curl`` opener of
``http(s)://`` URLs, which neither times out a stalled read nor resumes a broken one.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
from dataclasses import dataclass, field
from itertools import islice
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from textdiff.config import AugmentConfig, DataConfig
from textdiff.data.augment import augment_sample, borrows_safeboxes, sample_rng
from textdiff.data.remote import ReadPolicy, opened_shard, read_policy
from textdiff.data.shard_urls import ShardList, resolve_data_shards
from textdiff.data.sources import describe_error

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
STATE_FORMAT = "textdiff.stream/2"


class CorruptSample(ValueError):
    """A sample that cannot be decoded; the stream skips it, warns and counts it."""


def epoch_shards(n_shards: int, seed: int, epoch: int, slot: int, num_slots: int, resampled: bool) -> list[int]:
    """Indices of the shards reader ``slot`` of ``num_slots`` reads in ``epoch``, in reading order."""
    if resampled:
        draws = max(1, math.ceil(n_shards / num_slots))
        return [int(i) for i in sample_rng(seed, "resample", epoch, slot).integers(0, n_shards, draws)]
    order = sample_rng(seed, "epoch", epoch).permutation(n_shards)
    return [int(i) for i in order[slot::num_slots]]


def shard_groups(order: Sequence[int], open_shards: int) -> list[list[int]]:
    """A reader's epoch ``order`` cut into consecutive groups of ``open_shards`` shards read at once."""
    k = max(1, open_shards)
    return [list(order[i:i + k]) for i in range(0, len(order), k)]


def shard_samples(shards: ShardList, index: int, events: list[str], policy: ReadPolicy = ReadPolicy()
                  ) -> Iterator[dict]:
    """Raw samples of shard ``index``, in tar order; a shard that ends early appends one message to ``events``.

    Early means a read error (for a remote shard: one that ``policy``'s retries did not overcome), or fewer
    samples than the manifest lists (a tar cut at a block boundary or a garbled header reads as a clean end).
    Its last sample read is then held back: a cut may have taken some of its members (its ``.txt``, say), and
    a member's absence has a meaning (unknown text).
    """
    url, expected = shards.urls[index], shards.counts[index]
    errors: list[Exception] = []

    def stop(exn: Exception) -> bool:
        errors.append(exn)
        return False  # nothing after a broken member of a streamed tar can be trusted to line up

    files = wds.tariterators.tar_file_expander(opened_shard(url, policy, stop), handler=stop)
    held, read = None, 0
    for sample in wds.tariterators.group_by_keys(files, handler=stop):
        if held is not None:
            yield held
        held, read = sample, read + 1
    short = expected is not None and read < expected
    if held is not None and not (errors or short):
        yield held
    if errors or short:
        of = f" of the {expected} its manifest lists" if expected is not None else ""
        cause = f"read error: {_first_arg(errors[0])}" if errors else "the tar ends early (cut, or a garbled header)"
        dropped = ", the last one dropped as it may lack members" if held is not None else ""
        events.append(f"shard {url} is short: {read} samples read{of}{dropped}; {cause}")


def _first_arg(error: Exception) -> str:
    """An error's message without the streams and URLs WebDataset appends to its ``args``."""
    return str(error.args[0]) if error.args else type(error).__name__


def group_raw(shards: ShardList, group: Sequence[int], rng: np.random.Generator, events: list[str],
              policy: ReadPolicy = ReadPolicy()) -> Iterator[dict]:
    """Raw samples of the shards ``group``, read at once: each next one from a shard drawn by ``rng`` with
    weights of its samples left (manifest counts; 1 each where a count is unknown or used up)."""
    readers = [shard_samples(shards, i, events, policy) for i in group]
    left = [shards.counts[i] for i in group]
    while readers:
        weights = [max(1, n) if n is not None else 1 for n in left]
        draw, pick = int(rng.integers(sum(weights))), 0
        while draw >= weights[pick]:
            draw -= weights[pick]
            pick += 1
        try:
            sample = next(readers[pick])
        except StopIteration:
            del readers[pick], left[pick]
            continue
        if left[pick] is not None:
            left[pick] -= 1
        yield sample


def block_safeboxes(chunk: Sequence[dict]) -> tuple[tuple[float, float, float, float], ...]:
    """The safeboxes of the images with text in a shuffle block of raw samples, in block order: the real boxes a
    text-free image of the block borrows (``augment.use_random_safebox_for_empty_string``, as the research code
    draws one from another training image). Samples whose ``.json`` does not parse are passed over here."""
    boxes = []
    for raw in chunk:
        if raw.get("txt") == b"" or "json" not in raw:
            continue
        try:
            box = json.loads(raw["json"]).get("safebox")
            if box is not None and len(box) == 4:
                boxes.append(tuple(float(v) for v in box))
        except (ValueError, TypeError, AttributeError):
            continue
    return tuple(boxes)


def group_samples(shards: ShardList, group: Sequence[int], seed: int, epoch: int, slot: int, number: int,
                  block: int, start: int, counters: dict, borrow: bool = False, policy: ReadPolicy = ReadPolicy()
                  ) -> Iterator[tuple[int, dict, tuple]]:
    """``(index, raw sample, block's safeboxes)`` of group ``number`` of one reader's epoch, block-shuffled,
    from ``start`` on. The safeboxes (:func:`block_safeboxes`) are read only with ``borrow``, else ``()``;
    a resumed reader reads its whole current block again, so they do not depend on where it resumed. Remote
    shards are read with ``policy`` (retries, timeouts).

    ``counters["shard_errors"]`` counts each short shard once: the shortfalls found while reading the blocks
    that the position ``start`` had already read were counted before it was saved, so a resumed reader
    does not count them again.
    """
    block = max(1, block)
    first_block = start // block
    events: list[str] = []
    raw = group_raw(shards, group, sample_rng(seed, "mix", epoch, slot, number), events, policy)
    for _ in range(first_block * block):  # read, not decoded
        if next(raw, None) is None:
            break
    events.clear()
    index = first_block * block
    for block_number in range(first_block, 2 ** 62):
        chunk = list(islice(raw, block))
        if block_number > first_block or start % block == 0:
            for message in events:
                counters["shard_errors"] += 1
                log.warning("%s; counted in data/shard_errors", message)
        events.clear()
        if not chunk:
            return
        pool = block_safeboxes(chunk) if borrow else ()
        for i in sample_rng(seed, "block", epoch, slot, number, block_number).permutation(len(chunk)):
            if index >= start:
                yield index, chunk[i], pool
            index += 1


def decode_sample(raw: dict, max_pixels: int = DataConfig.max_pixels) -> dict:
    """A raw WebDataset sample -> ``{"image": PIL (opened, not decoded), "txt", "captions", "safebox",
    "px_scale", "unreadable", "key"}``.

    ``txt`` is "" for a text-free image and None when the shard has no ``.txt`` (transcription unknown,
    ``make_shards.py --missing-txt keep``): None is the model's null condition, so such images teach the
    unconditional case and never the "no text here" one. A caption "" (make_shards writes ``[""]`` for
    none, keeping one JSON schema) is no caption. ``unreadable`` is the list of boxes [l, t, r, b] of text
    OCR could not read (``make_shards.py --unreadable``; [] when the .json has none). Raises
    :class:`CorruptSample` naming the part that is missing or broken, or an image above ``max_pixels``
    (data.max_pixels, the decompression-bomb cap).
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
        captions = [str(c) for c in meta.get("captions") or [] if c != ""]
        px_scale = [float(s) for s in meta.get("px_scale") or (1.0, 1.0)]
        safebox = meta.get("safebox")
        if safebox is not None:
            safebox = [float(v) for v in safebox]
        unreadable = [[float(v) for v in box] for box in meta.get("unreadable") or []]
    except (ValueError, TypeError, AttributeError) as e:
        raise CorruptSample(f".json is malformed: {e}") from None
    if len(px_scale) != 2 or min(px_scale) <= 0 or (safebox is not None and len(safebox) != 4):
        raise CorruptSample(f".json has px_scale {px_scale} / safebox {safebox}; expected [sx, sy] > 0 and "
                            "[l, t, r, b]")
    bad = next((box for box in unreadable if len(box) != 4 or not (box[0] < box[2] and box[1] < box[3])), None)
    if bad is not None:
        raise CorruptSample(f".json has unreadable box {bad}; expected [l, t, r, b] with l < r and t < b "
                            "(tools/make_shards.py --unreadable)")
    member = f"{raw.get('__key__')}.{ext}"
    try:
        image = Image.open(io.BytesIO(raw[ext]))  # header only: augment decodes, JPEGs at reduced scale
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise CorruptSample(f".{ext} does not decode: {describe_error(e, member)}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise CorruptSample(f".{ext} is {width}x{height} = {width * height} pixels, above data.max_pixels "
                            f"{max_pixels} (decompression-bomb cap); raise it if the image is real")
    return {"image": image, "txt": txt, "captions": captions, "safebox": safebox, "px_scale": px_scale,
            "unreadable": unreadable, "key": raw["__key__"]}


def collate(samples: list[dict]) -> dict:
    """Stack per-sample dicts into the batch layout of docs/architecture.md (``loss_mask`` [N, 1, S, S] where
    the samples carry one: ``data.mask_unreadable``)."""
    batch = {"image": torch.stack([s["image"] for s in samples])}
    for name in ("low_res", "loss_mask"):
        if name in samples[0]:
            batch[name] = torch.stack([s[name] for s in samples])
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
    policy: ReadPolicy = field(default_factory=ReadPolicy)

    @property
    def readers_per_rank(self) -> int:
        return max(1, self.data.num_workers)


def _process(spec: StreamSpec, raw: dict, epoch: int, slot: int, group: int, index: int, pool: tuple = ()) -> dict:
    sample = decode_sample(raw, spec.data.max_pixels)
    rng = sample_rng(spec.data.seed, epoch, slot, group, index)
    caption = sample["captions"][int(rng.integers(len(sample["captions"])))] if sample["captions"] else ""
    try:
        out = augment_sample(sample["image"], sample["txt"], sample["safebox"], sample["px_scale"], spec.augment,
                             spec.image_size, spec.low_res_size, rng, borrowed_safeboxes=pool,
                             unreadable=sample["unreadable"] if spec.data.mask_unreadable else None)
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:  # pixel data broken past the header
        raise CorruptSample(f"image does not decode: {describe_error(e, sample['key'])}") from None
    except ValueError as e:  # a safebox outside the image
        raise CorruptSample(str(e)) from None
    return {**out, "txt": sample["txt"], "capt": caption, "key": sample["key"]}


def reader_batches(spec: StreamSpec, reader: int, position: dict) -> Iterator[dict]:
    """The never-ending batches of one reader (worker ``reader`` of this rank) from ``position``.

    Each batch carries ``_reader`` and ``_position`` (epoch, group, index and skip counts after it).
    """
    slot = spec.rank * spec.readers_per_rank + reader
    num_slots = spec.world_size * spec.readers_per_rank
    epoch, group, start = position["epoch"], position["group"], position["index"]
    counters = {"skipped_corrupt": position["skipped_corrupt"], "shard_errors": position["shard_errors"]}
    borrow = borrows_safeboxes(spec.augment)
    pending: list[dict] = []
    while True:
        order = epoch_shards(len(spec.shards.urls), spec.data.seed, epoch, slot, num_slots, spec.data.resampled)
        groups = shard_groups(order, spec.data.open_shards)
        read, usable = 0, 0
        for number in range(group, len(groups)):
            for index, raw, pool in group_samples(spec.shards, groups[number], spec.data.seed, epoch, slot, number,
                                                  spec.data.shuffle_buffer, start, counters, borrow, spec.policy):
                read += 1
                try:
                    pending.append(_process(spec, raw, epoch, slot, number, index, pool))
                except CorruptSample as e:
                    counters["skipped_corrupt"] += 1
                    log.warning("skipping corrupt sample %s in %s: %s", raw.get("__key__"), raw.get("__url__"), e)
                    continue
                usable += 1
                if len(pending) == spec.batch_size:
                    batch = collate(pending)
                    batch["_reader"] = reader
                    batch["_position"] = {"epoch": epoch, "group": number, "index": index + 1, **counters}
                    pending = []
                    yield batch
            start = 0
        if not usable and group == 0 and position["index"] == 0:  # else it would loop over epochs forever
            raise RuntimeError(f"reader {slot} found no usable samples in epoch {epoch} ({read} read, all corrupt "
                               f"or short; shards {[spec.shards.urls[i] for i in order]}); check data.shards and "
                               "the warnings above")
        epoch, group, position = epoch + 1, 0, {"index": 0}


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
            "shuffle_buffer": spec.data.shuffle_buffer, "open_shards": spec.data.open_shards,
            "num_shards": len(spec.shards.urls),
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
        self._positions = [{"epoch": 0, "group": 0, "index": 0, "skipped_corrupt": 0, "shard_errors": 0}
                           for _ in range(readers)]
        self._next_reader, self._batches = 0, 0
        if state is not None:
            self._load(state)

    def _load(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"stream state has format {state.get('format')!r}, expected {STATE_FORMAT!r}; it was "
                             "written by another textdiff version or not by TrainStream.state_dict(); start the "
                             "stream afresh without the saved state")
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
        """JSON-able position: every reader's (epoch, group, index) and which reader's batch comes next."""
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
    shards = resolve_data_shards(data_cfg)
    readers = world_size * max(1, data_cfg.num_workers)
    if not data_cfg.resampled and len(shards.urls) < readers:
        raise ValueError(f"data.shards has {len(shards.urls)} shards but world_size x data.num_workers = "
                         f"{readers} readers each need one per epoch; write more, smaller shards "
                         "(tools/make_shards.py --maxcount), use fewer workers, or set data.resampled=true")
    spec = StreamSpec(shards, data_cfg, augment_cfg, image_size, low_res_size, batch_size, rank, world_size,
                      read_policy(data_cfg))
    return TrainStream(spec, state)
