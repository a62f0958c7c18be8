"""Annotate any image collection by OCR: transcriptions, safeboxes and text boxes in the formats make_shards
reads (tools/annotate.py; docs/annotate.md).

A run lists the source (textdiff.data.annotate_sources), reads every image in a pool of worker processes
with an OCR engine (textdiff.ocr), tightens each box to its ink (textdiff.data.annotate_lines), and appends
one record per image to ``OUT_DIR/progress.jsonl`` (flushed per record, fsynced every 2 s). A killed run
continues where it stopped: the records already there are kept, a half-written last line is cut off, and
only the images without a record are read. At the end the records are merged under the filters
(textdiff.data.annotate_merge, annotate_filters) into the output files, each written atomically:

- ``transcriptions.json`` {key: text}: lines in reading order joined by "\\n"; "" for a text-free image;
- ``safeboxes.json`` {key: [l, t, r, b]}: images with text only, right/bottom exclusive (every line's ink,
  masked lines too);
- ``unreadable.json`` {key: [[l, t, r, b], ...]}: with ``--unreadable mask`` only, the ink boxes of the lines
  read below the confidence, left out of the transcription (make_shards ``--unreadable``);
- ``captions.json`` {key: [captions]}: when the source has captions (shards, data sets);
- ``ocr.jsonl``: per image (skipped ones too), its outcome, lines (text, confidence, polygon, ink box and the
  engine's boxes) and the boxes dropped as noise;
- ``summary.json``: counts by outcome and skip reason, engine and versions, settings, images/s.

The OCR settings (source, engine, its settings, ink settings) are stored in ``OUT_DIR/settings.json``; a
rerun with other ones is refused (``overwrite`` starts over). The filters are not among them: a rerun with
other filters only merges again.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Optional

import numpy as np

import textdiff.ocr  # registers the engines (tesseract, ppocr)
from textdiff.data.annotate_filters import AnnotationFilters
from textdiff.data.annotate_lines import InkSettings, tighten
from textdiff.data.annotate_merge import READ, Tally, ocr_line, outcome
from textdiff.data.annotate_sources import (FORMAT_EXTS, Item, Plan, SourceSpec, decode_image, mirror_name,
                                            plan_source, read_item)
from textdiff.data.pool import pool_map
from textdiff.data.shards import make_source_shards
from textdiff.data.sources import DEFAULT_MAX_PIXELS, Problem, encode_image
from textdiff.files import atomic_write, atomic_write_bytes, atomic_write_json
from textdiff.ocr.base import OcrEngine, OcrMissingError

PROGRESS_NAME, SETTINGS_NAME = "progress.jsonl", "settings.json"
OUTPUT_NAMES = ("transcriptions.json", "safeboxes.json", "unreadable.json", "captions.json", "ocr.jsonl",
                "summary.json")
SUMMARY_FORMAT = "textdiff-annotate/1"
FSYNC_EVERY_S = 2.0
# Engine settings for photographs, under those the user gives: PP-OCR keeps every box it reads (the filters
# decide what is noise and what is unreadable); Tesseract reads sparse text anywhere (psm 11), unbinarised.
ENGINE_DEFAULTS = {"ppocr": {"drop_score": 0.0}, "tesseract": {"photo": True, "psm": 11}}


class AnnotateError(RuntimeError):
    """An annotation cannot run as asked; the message names the flag, file or folder and what to do."""


@dataclass(frozen=True)
class _Reader:
    """Picklable: reads one :class:`Item` into a record (in a worker process)."""

    plan_kind: str
    image_key: Optional[str]
    caption_key: Optional[str]
    engine: OcrEngine
    ink: InkSettings
    max_pixels: int

    def __call__(self, item: Item) -> dict:
        got = read_item(item, self.plan_kind, self.image_key, self.caption_key)
        if isinstance(got, Problem):
            return skip_record(item, got)
        data, captions = got
        decoded = decode_image(data, item.where, self.max_pixels)
        if isinstance(decoded, Problem):
            return skip_record(item, decoded, captions)
        image, fmt = decoded
        return read_record(item, np.asarray(image), fmt, captions, self.engine, self.ink)


def skip_record(item: Item, problem: Problem, captions: Optional[list[str]] = None) -> dict:
    """The record of an image that cannot be read (bad_image, too_many_pixels)."""
    return {"key": item.key, "source": item.where, "status": problem.kind, "reason": problem.reason,
            "captions": captions}


def read_record(item: Item, image: np.ndarray, fmt: str, captions: Optional[list[str]], engine: OcrEngine,
                ink: InkSettings) -> dict:
    """The record of one image (uint8 [H, W, 3], its file format ``fmt`` as Pillow names it): every box
    ``engine`` reads, with its ink box."""
    reading = engine.read([image], workers=1, progress=False)[0]
    polygons = [np.asarray(line.polygon, dtype=np.float64) for line in reading.lines]
    boxes = []
    for i, line in enumerate(reading.lines):
        box = tighten(image, polygons[i], ink, polygons[:i] + polygons[i + 1:])
        boxes.append({"text": line.text, "confidence": round(min(max(float(line.confidence), 0.0), 1.0), 4),
                      "polygon": [[round(float(x), 2), round(float(y), 2)] for x, y in line.polygon],
                      "ink": list(box) if box else None})
    return {"key": item.key, "source": item.where, "status": READ, "reason": None, "width": int(image.shape[1]),
            "height": int(image.shape[0]), "format": fmt, "captions": captions, "boxes": boxes}


def load_progress(path: Path) -> dict[str, int]:
    """The byte offset of each key's record in ``path`` (a run's progress.jsonl; {} when there is none); a
    half-written last line (a killed run) is cut off the file."""
    if not path.is_file():
        return {}
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    offsets, start = {}, 0
    for number, line in enumerate(data[:end].splitlines(keepends=True), 1):
        try:
            key = json.loads(line)["key"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise AnnotateError(f"{path}:{number} is not a record ({type(e).__name__}: {e}); the file was edited or "
                                "damaged: delete that line to read the image again, or pass --overwrite") from None
        if key in offsets:
            raise AnnotateError(f"{path}:{number} records image {key!r} a second time; pass --overwrite")
        offsets[key] = start
        start += len(line)
    return offsets


def read_record_at(f: BinaryIO, offset: int) -> dict:
    """The record at byte ``offset`` of an open progress.jsonl."""
    f.seek(offset)
    return json.loads(f.readline())


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _prepare_out_dir(out: Path, settings: dict, overwrite: bool) -> None:
    """Create ``out``; refuse one made with other OCR settings (or holding other files) unless ``overwrite``,
    which removes this tool's files from it."""
    if out.exists() and not out.is_dir():
        raise AnnotateError(f"output folder {out} is a file; give a folder")
    stored = out / SETTINGS_NAME
    if overwrite:
        for name in (PROGRESS_NAME, SETTINGS_NAME) + OUTPUT_NAMES:
            (out / name).unlink(missing_ok=True)
    elif stored.is_file():
        old = json.loads(stored.read_text(encoding="utf-8"))
        changed = next((k for k in settings if old.get(k) != settings[k]), None)
        if changed:
            raise AnnotateError(f"{out} holds a run with other settings ({changed}: {old.get(changed)!r}, now "
                                f"{settings[changed]!r}); pass --overwrite to start over, or choose another folder")
    elif out.is_dir() and any(out.iterdir()):
        raise AnnotateError(f"output folder {out} holds files this tool did not write; choose an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(stored, settings)


def _check_paths(plan: Plan, out: Path, write_txt: Optional[Path]) -> None:
    for flag, path in (("OUT_DIR", out), ("--write-txt", write_txt)):
        if path is not None and plan.kind == "folder" and _inside(path, plan.root):
            raise AnnotateError(f"{flag} {path} lies inside the source folder {plan.root}; a rerun would read "
                                "what it wrote: choose a folder outside it")
    if write_txt is not None and _inside(write_txt, out):
        raise AnnotateError(f"--write-txt {write_txt} lies inside OUT_DIR {out}; choose a folder beside it")


def build_engine(name: str, settings: dict) -> OcrEngine:
    """Engine ``name`` with the annotation's defaults for it (:data:`ENGINE_DEFAULTS`) under ``settings``;
    AnnotateError names an unknown engine, a bad setting or what to install."""
    try:
        return textdiff.ocr.make_engine(name, **{**ENGINE_DEFAULTS.get(name, {}), **settings})
    except (ValueError, TypeError) as e:
        raise AnnotateError(f"--engine {name} --engine-setting: {e}") from None
    except OcrMissingError as e:
        raise AnnotateError(str(e)) from None


def annotate(spec: SourceSpec, out_dir: str | Path, engine_name: str = "ppocr", engine_settings: Optional[dict] = None,
             filters: AnnotationFilters = AnnotationFilters(), preset: str = "default",
             ink: InkSettings = InkSettings(), workers: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS,
             write_txt: Optional[str | Path] = None, overwrite: bool = False, progress: bool = True,
             command: str = "") -> dict:
    """Annotate the images of ``spec`` into ``out_dir`` (module docstring); returns the summary.

    ``workers`` processes read the images (0: this process). Everything that can be checked (source, flags,
    engine and its packages, folders) is checked before any image is read: AnnotateError or SourceError.
    """
    out = Path(out_dir)
    write_txt = Path(write_txt) if write_txt is not None else None
    if workers < 0:
        raise AnnotateError(f"--workers {workers} must be >= 0 (0: in this process)")
    filters.validate()
    plan = plan_source(spec)
    _check_paths(plan, out, write_txt)
    engine_settings = {**ENGINE_DEFAULTS.get(engine_name, {}), **(engine_settings or {})}
    engine = build_engine(engine_name, engine_settings)
    version = engine.version()
    settings = {"source": {**spec.to_json(), "path": str(Path(spec.path).resolve()), "kind": plan.kind,
                           "image_key": plan.image_key,
                           "caption_key": plan.caption_key}, "engine": engine_name, "engine_version": version,
                "engine_settings": engine_settings, "ink": asdict(ink), "max_pixels": max_pixels}
    _prepare_out_dir(out, settings, overwrite)
    offsets = load_progress(out / PROGRESS_NAME)
    resumed = len(offsets)
    pending = [item for item in plan.items if item.key not in offsets]
    reader = _Reader(plan.kind, plan.image_key, plan.caption_key, engine, ink, max_pixels)
    start = time.perf_counter()
    with open(out / PROGRESS_NAME, "ab") as f:
        synced = time.monotonic()
        for record in pool_map(reader, pending, workers, "annotate", progress, ordered=False):
            offsets[record["key"]] = f.tell()
            f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
            f.flush()
            if time.monotonic() - synced > FSYNC_EVERY_S:
                os.fsync(f.fileno())
                synced = time.monotonic()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    run = {"read_this_run": len(pending), "resumed_records": resumed, "seconds": round(seconds, 2),
           "images_per_s": round(len(pending) / seconds, 2) if pending and seconds > 0 else None,
           "workers": workers, "command": command}
    summary = write_outputs(out, plan, offsets, filters, preset, settings, run)
    if write_txt is not None:
        summary["mirror"] = write_mirror(out, plan, offsets, filters, write_txt, max_pixels)
        atomic_write_json(out / "summary.json", summary)
    return summary


def write_outputs(out: Path, plan: Plan, offsets: dict[str, int], filters: AnnotationFilters, preset: str,
                  settings: dict, run: dict) -> dict:
    """Merge the records of ``out``/progress.jsonl (at ``offsets``) under ``filters`` into the output files,
    in key order; returns the summary. Records are read one at a time, so memory grows with the number of
    images by their keys and transcriptions only."""
    tally = Tally()
    tally.add_skips(p.kind for p in plan.problems)
    transcriptions, safeboxes, captions, unreadable = {}, {}, {}, {}
    items = sorted(plan.items, key=lambda i: i.key)

    def write_ocr_lines(target: BinaryIO) -> None:
        with open(out / PROGRESS_NAME, "rb") as progress:
            for item in items:
                record = read_record_at(progress, offsets[item.key])
                result = outcome(record, filters)
                tally.add(result)
                line = json.dumps(ocr_line(record, result, settings["engine"]), ensure_ascii=False) + "\n"
                target.write(line.encode("utf-8"))
                if not result.kept:
                    continue
                transcriptions[item.key] = result.transcription
                if result.safebox is not None:
                    safeboxes[item.key] = result.safebox
                if result.unreadable:
                    unreadable[item.key] = list(result.unreadable)
                if record.get("captions"):
                    captions[item.key] = record["captions"]

    atomic_write(out / "ocr.jsonl", write_ocr_lines)
    atomic_write_json(out / "transcriptions.json", transcriptions)
    atomic_write_json(out / "safeboxes.json", safeboxes)
    if plan.has_captions:
        atomic_write_json(out / "captions.json", captions)
    masking = filters.unreadable == "mask"
    if masking:
        atomic_write_json(out / "unreadable.json", unreadable)
    else:  # a rerun under other filters must not leave an earlier run's boxes for make_shards to pick up
        (out / "unreadable.json").unlink(missing_ok=True)
    planned = {item.key for item in plan.items}
    summary = {"format": SUMMARY_FORMAT, "inputs": plan.inputs, **tally.to_json(),
               "listing_problems": [p.to_json() for p in plan.problems],
               "records_not_in_source": sum(1 for key in offsets if key not in planned),
               **settings, "preset": preset, "filters": filters.to_json(), **run,
               "outputs": [n for n in OUTPUT_NAMES if (n != "captions.json" or plan.has_captions)
                           and (n != "unreadable.json" or masking)]}
    atomic_write_json(out / "summary.json", summary)
    return summary


def write_mirror(out: Path, plan: Plan, offsets: dict[str, int], filters: AnnotationFilters, folder: Path,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """Write every annotated image into ``folder`` with its transcription beside it (``KEY.ext`` and
    ``KEY.txt``: the research code's layout, which make_shards reads); returns counts. An image already
    there is not written again; its .txt is, when it changed."""
    written = kept = 0
    with open(out / PROGRESS_NAME, "rb") as progress:
        for item in plan.items:
            record = read_record_at(progress, offsets[item.key])
            result = outcome(record, filters)
            if not result.kept:
                continue
            kept += 1
            image_path = folder / mirror_name(item, FORMAT_EXTS.get(record["format"], "png"))
            if not image_path.is_file():
                image_path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(image_path, _mirror_bytes(item, plan, record["format"], max_pixels))
                written += 1
            txt_path = image_path.with_suffix(".txt")
            if not txt_path.is_file() or txt_path.read_text(encoding="utf-8") != result.transcription:
                atomic_write_bytes(txt_path, result.transcription.encode("utf-8"))
    return {"folder": str(folder), "images": kept, "images_written": written}


def _mirror_bytes(item: Item, plan: Plan, fmt: str, max_pixels: int) -> bytes:
    """The image's own bytes where make_shards reads its format by extension, else a PNG of it as read."""
    data, _ = read_item(item, plan.kind, plan.image_key, plan.caption_key)
    if fmt in FORMAT_EXTS:
        return data
    return encode_image(decode_image(data, item.where, max_pixels)[0], "png")


def make_annotated_shards(out_dir: str | Path, images: str | Path, shards_dir: str | Path, workers: int = 0,
                          overwrite: bool = False, progress: bool = True, command: str = "") -> dict:
    """Shard the annotated ``images`` folder (the source folder, or a --write-txt mirror) with the side
    files of ``out_dir`` (make_shards --transcriptions --safeboxes [--captions] [--unreadable]); returns the
    manifest."""
    out = Path(out_dir)
    captions, unreadable = out / "captions.json", out / "unreadable.json"
    return make_source_shards(images, shards_dir, captions if captions.is_file() else None,
                              out / "safeboxes.json", transcriptions=out / "transcriptions.json",
                              unreadable=unreadable if unreadable.is_file() else None, workers=workers,
                              overwrite=overwrite, progress=progress, command=command)
