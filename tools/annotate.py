#!/usr/bin/env python
"""Annotate any image collection by OCR: transcriptions, safeboxes and text boxes for make_shards.

    python tools/annotate.py SOURCE OUT_DIR [--preset default|glyphdraw|permissive] [--workers 2]
        [--engine ppocr|tesseract] [--engine-setting KEY=VALUE ...] [--write-txt DIR] [--shards SHARDS_DIR]

SOURCE is a folder of images (any depth), WebDataset .tar shards (img2dataset's: KEY.jpg, KEY.txt = the
caption), a .parquet file or folder, or a datasets save_to_disk folder. OUT_DIR gets transcriptions.json,
safeboxes.json, captions.json (when the source has captions), unreadable.json (with --unreadable mask),
ocr.jsonl and summary.json; then

    python tools/make_shards.py SOURCE SHARDS_DIR --transcriptions OUT_DIR/transcriptions.json \\
        --safeboxes OUT_DIR/safeboxes.json [--unreadable OUT_DIR/unreadable.json]

(a folder source; for shards and data sets, shard the --write-txt DIR instead), or --shards SHARDS_DIR does
both in one command. A killed run continues where it stopped; a rerun with other filters re-uses the OCR.
Formats, filters, presets and measurements: docs/annotate.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

from textdiff.data.annotate import AnnotateError, annotate, make_annotated_shards
from textdiff.data.annotate_filters import PRESETS, TEXT_FREE_CHOICES, UNREADABLE_CHOICES, make_filters
from textdiff.data.annotate_sources import KINDS, SourceSpec, detect_kind
from textdiff.data.shards import ShardingError, summary as shards_summary
from textdiff.data.sources import DEFAULT_MAX_PIXELS, SourceError

FILTER_FLAGS = {  # flag -> (type, help); defaults come from the preset (docs/annotate.md lists them)
    "min_confidence": (float, "a box read below this confidence is unreadable text"),
    "noise_confidence": (float, "a box read below this confidence is no text at all (noise)"),
    "single_char_confidence": (float, "a box of one character or of punctuation alone is text only from here"),
    "unreadable": (UNREADABLE_CHOICES, "an image with unreadable text: drop it, keep its lines as read, or mask "
                   "them (left out of the transcription, boxes in unreadable.json for data.mask_unreadable)"),
    "text_free": (TEXT_FREE_CHOICES, "an image without text: keep it (transcription \"\") or drop it"),
    "max_lines": (int, "skip images with more lines (0: any)"),
    "min_text_height_px": (float, "skip images with a line of ink shorter than this (px; 0: off)"),
    "min_text_height_frac": (float, "... or shorter than this share of the shorter side (0: off)"),
    "min_char_area_frac": (float, "... or whose characters each cover less than this share of the image (0: off)"),
    "min_image_side": (int, "skip images whose shorter side is below this (px; 0: off)"),
    "max_text_area_frac": (float, "skip images whose safebox covers more than this share of the image (1: off)"),
}


def engine_setting(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` -> (KEY, VALUE as JSON when it parses, else the string)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (e.g. det_min_side=512)")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="annotate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SOURCE", help="folder of images, .tar shards, .parquet file/folder or "
                   "save_to_disk folder")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output folder (a rerun continues the run in it)")
    src = p.add_argument_group("source")
    src.add_argument("--source-kind", choices=("auto",) + KINDS, default="auto",
                     help="what SOURCE holds (default: told from its files)")
    src.add_argument("--image-key", help="shards: image member extensions, ';'-separated (default jpg;jpeg;png;webp); "
                     "data sets: the image column (default: the one column of images)")
    src.add_argument("--caption-key", help="shards: the caption member's extension (default txt); data sets: the "
                     "caption column (default text or caption, when present)")
    src.add_argument("--id-key", help="data sets: the column whose values are the keys (default: row numbers)")
    src.add_argument("--split", help="a save_to_disk DatasetDict: the split to read")
    ocr = p.add_argument_group("OCR")
    ocr.add_argument("--engine", default="ppocr", help="OCR engine registered in textdiff.ocr (default ppocr)")
    ocr.add_argument("--engine-setting", type=engine_setting, action="append", default=[], metavar="KEY=VALUE",
                     help="a keyword setting of the engine (repeatable), e.g. det_min_side=512")
    ocr.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                     help="reading processes (0: in this process; default min(2, CPUs))")
    ocr.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                     help=f"refuse images above this many pixels, as make_shards does (default {DEFAULT_MAX_PIXELS})")
    filters = p.add_argument_group("filters (defaults: the preset's; docs/annotate.md)")
    filters.add_argument("--preset", choices=tuple(PRESETS), default="default", help="named filter settings")
    for name, (kind, text) in FILTER_FLAGS.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(kind, tuple):
            filters.add_argument(flag, choices=kind, default=None, help=text)
        else:
            filters.add_argument(flag, type=kind, default=None, help=text)
    out = p.add_argument_group("output")
    out.add_argument("--write-txt", metavar="DIR", help="also write each annotated image into DIR with its .txt "
                     "beside it (the research code's layout; what make_shards reads)")
    out.add_argument("--shards", metavar="SHARDS_DIR", help="then write shards there (make_shards --transcriptions "
                     "--safeboxes [--captions] [--unreadable]); a source other than a folder needs --write-txt")
    out.add_argument("--overwrite", action="store_true", help="start over: remove an earlier run's files from "
                     "OUT_DIR (and the shards of SHARDS_DIR)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _shards_dir_problem(args: argparse.Namespace) -> Optional[str]:
    """What is wrong with --shards, found before any image is read, or None."""
    if args.shards is None:
        return None
    shards = Path(args.shards)
    if args.write_txt is None:
        try:
            kind = args.source_kind if args.source_kind != "auto" else detect_kind(Path(args.source))
        except SourceError:
            return None  # annotate names what is wrong with the source
        if kind != "folder":
            return f"--shards needs a folder of images: give --write-txt DIR for a {kind} source"
    images = Path(args.write_txt or args.source)
    if shards.resolve() == images.resolve() or images.resolve() in shards.resolve().parents:
        return f"--shards {shards} lies inside the folder of images {images}; choose a folder outside it"
    if shards.is_dir() and any(shards.iterdir()) and not args.overwrite:
        return f"--shards {shards} is not empty; pass --overwrite or choose an empty folder"
    return None


def run(argv: Optional[Sequence[str]] = None) -> tuple[argparse.Namespace, dict, Optional[dict]]:
    """Parse the command line, annotate, and shard with --shards: (arguments, summary, manifest or None)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers < 0:
        parser.error("--workers must be >= 0")
    if args.max_pixels <= 0:
        parser.error("--max-pixels must be positive")
    problem = _shards_dir_problem(args)
    if problem:
        parser.error(problem)
    try:
        filters = make_filters(args.preset, **{name: getattr(args, name) for name in FILTER_FLAGS})
    except ValueError as e:
        parser.error(str(e))
    spec = SourceSpec(args.source, args.source_kind, args.image_key, args.caption_key, args.id_key, args.split)
    command = shlex.join(["annotate.py", *argv])
    summary = annotate(spec, args.out_dir, args.engine, dict(args.engine_setting), filters, args.preset,
                       workers=args.workers, max_pixels=args.max_pixels, write_txt=args.write_txt,
                       overwrite=args.overwrite, progress=not args.no_progress, command=command)
    manifest = None
    if args.shards is not None:
        images = args.write_txt or args.source
        manifest = make_annotated_shards(args.out_dir, images, args.shards, workers=args.workers,
                                         overwrite=args.overwrite, progress=not args.no_progress,
                                         command=f"{command} (--shards)")
    return args, summary, manifest


def report(summary: dict, out_dir: str, source: str, write_txt: Optional[str]) -> str:
    """A few lines for the terminal: what was annotated, skipped and how to shard it."""
    lines = [f"annotated {summary['annotated']} of {summary['inputs']} images with {summary['engine']} "
             f"({summary['with_text']} with text, {summary['text_free']} text-free = "
             f"{summary['text_free_share']:.1%}); read {summary['read_this_run']} this run"
             + (f" at {summary['images_per_s']:.1f} img/s" if summary["images_per_s"] else "")
             + (f", {summary['resumed_records']} from an earlier run" if summary["resumed_records"] else "")]
    if summary["skipped_count"]:
        kinds = ", ".join(f"{k}: {v}" for k, v in summary["skipped_by_kind"].items())
        lines.append(f"skipped {summary['skipped_count']} ({kinds}); reasons in {out_dir}/ocr.jsonl")
    images = write_txt if summary["source"]["kind"] != "folder" else source
    if images:
        extra = "".join(f" --{name.split('.')[0]} {out_dir}/{name}" for name in ("captions.json", "unreadable.json")
                        if name in summary["outputs"])
        lines.append(f"shard with: python tools/make_shards.py {images} SHARDS_DIR --transcriptions "
                     f"{out_dir}/transcriptions.json --safeboxes {out_dir}/safeboxes.json{extra}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line and print the report; exit status 1 on an error (2: a bad flag)."""
    try:
        args, summary, manifest = run(argv)
    except (AnnotateError, SourceError, ShardingError) as e:
        print(f"annotate: error: {e}", file=sys.stderr)
        return 1
    print(report(summary, args.out_dir, args.source, args.write_txt))
    if manifest is not None:
        print(shards_summary(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
