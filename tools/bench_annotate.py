#!/usr/bin/env python
"""Benchmark tools/annotate.py per OCR engine on a scene-text set with exact ground truth.

    python tools/make_scene_text.py /tmp/st500 --n 500 --size 256 --workers 2
    python tools/bench_annotate.py /tmp/st500 --out /tmp/bench_annotate --workers 2 \\
        --engine ppocr --engine tesseract --record docs/annotate.json

Prints CER, exact line match, safebox IoU (median, 10th percentile), false-text rate on text-free images,
miss rate on images with text, skip rate and images/s per engine as a Markdown table (docs/annotate.md),
and whether the default engine reaches the goals. Each engine's annotation is started over in OUT/ENGINE.
Metrics: textdiff/experiments/annotation.py.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from textdiff.data.annotate import AnnotateError
from textdiff.data.annotate_filters import PRESETS
from textdiff.data.sources import SourceError
from textdiff.experiments.annotation import BenchmarkError, goal_misses, markdown_table, run_benchmark


def engine_spec(text: str) -> tuple[str, dict]:
    """``NAME`` or ``NAME:KEY=VALUE,KEY=VALUE`` -> (NAME, settings; values as JSON where they parse)."""
    name, _, rest = text.partition(":")
    settings = {}
    for pair in filter(None, rest.split(",")):
        key, sep, value = pair.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"{pair!r} in --engine {text!r} is not KEY=VALUE")
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value
    return name, settings


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("gt_dir", metavar="GT_DIR", help="a scene-text set (tools/make_scene_text.py)")
    p.add_argument("--out", default="/tmp/bench_annotate", help="where each engine's annotation goes (OUT/ENGINE)")
    p.add_argument("--engine", type=engine_spec, action="append", metavar="NAME[:KEY=VALUE,...]",
                   help="an engine and its settings (repeatable; default: ppocr and tesseract)")
    p.add_argument("--preset", choices=tuple(PRESETS), default="default", help="filters (default: default)")
    p.add_argument("--workers", type=int, default=2, help="reading processes (default 2)")
    p.add_argument("--record", help="also write the result as JSON here (docs/annotate.json)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    engines = args.engine or [("ppocr", {}), ("tesseract", {})]
    command = shlex.join(["bench_annotate.py", *(sys.argv[1:] if argv is None else argv)])
    try:
        result = run_benchmark(args.gt_dir, args.out, engines, args.preset, args.workers, not args.no_progress,
                               args.record, command)
    except (BenchmarkError, AnnotateError, SourceError) as e:
        print(f"bench_annotate: error: {e}", file=sys.stderr)
        return 1
    gt = result["ground_truth"]
    print(f"{gt['images']} images ({gt['text_free']} text-free, {gt['size']} px) in {gt['dir']}, preset "
          f"{args.preset}, {args.workers} workers on {result['cpus']} CPUs\n")
    print(markdown_table(result))
    first = next(iter(result["engines"]))
    misses = goal_misses(result["engines"][first])
    print(f"\n{first}: " + ("every goal reached" if not misses else "goals missed: " + "; ".join(misses)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
