#!/usr/bin/env python
"""Render a SynthText-style test set: words in many fonts over real photographs, with ground truth.

    python tools/make_scene_text.py OUT_DIR --n 500 --size 256 [--seed 0] [--text-free-share 0.2]
        [--backgrounds DIR] [--words PATH] [--workers 2] [--overwrite]
    python tools/make_shards.py OUT_DIR/images SHARDS_DIR --safeboxes OUT_DIR/safeboxes.json

Writes OUT_DIR/images/KEY.png (+ KEY.txt), transcriptions.json, safeboxes.json, lines.jsonl, summary.json
(textdiff/data/scene_text.py, scene_text_set.py). A rerun with the same settings resumes. Needs the Debian packages that
tools/setup_env.sh installs (fonts, photographs, wamerican).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

from textdiff.data.scene_text import SceneTextError
from textdiff.data.scene_text_set import make_scene_text_set


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", metavar="OUT_DIR", help="output folder (created; a rerun with the same settings resumes)")
    p.add_argument("--n", type=int, default=500, help="number of images (default 500)")
    p.add_argument("--size", type=int, default=256, help="image side in px (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    p.add_argument("--text-free-share", type=float, default=0.2, help="share of images without text (default 0.2)")
    p.add_argument("--backgrounds", help="folder of background photographs (default: the Debian wallpaper photos)")
    p.add_argument("--words", help="word list, one word a line (default /usr/share/dict/american-english)")
    p.add_argument("--workers", type=int, default=0, help="rendering processes (0: in this process; default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace images and records of an earlier run in OUT_DIR")
    args = p.parse_args(argv)
    if args.workers < 0:
        p.error("--workers must be >= 0")
    command = shlex.join(["make_scene_text.py", *(sys.argv[1:] if argv is None else argv)])
    start = time.perf_counter()
    try:
        summary = make_scene_text_set(args.out_dir, args.n, size=args.size, text_free_share=args.text_free_share,
                                      seed=args.seed, backgrounds=args.backgrounds, words=args.words,
                                      workers=args.workers, overwrite=args.overwrite, command=command)
    except SceneTextError as e:
        print(f"make_scene_text: error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    print(f"{summary['images']} images in {args.out_dir} ({summary['text_free']} text-free, {summary['lines']} lines, "
          f"{len(summary['fonts_used'])} fonts of {summary['font_faces_found']}, {len(summary['backgrounds_used'])} "
          f"backgrounds) in {seconds:.1f} s")
    print(f"shard with: python tools/make_shards.py {args.out_dir}/images SHARDS_DIR "
          f"--safeboxes {args.out_dir}/safeboxes.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
