"""Stream a few batches from the shards of a recipe and write them as labelled PNG grids + JSON.

    python tools/preview_loader.py --config ds_configs/base64.json --set data.shards=data/demo/manifest.json \
        --out runs/preview

writes ``OUT/batch_000.png``, ``OUT/batch_000.json``, ... and prints the stream's counters. The batches are
exactly what training would see on that rank (same seed, crops, flips, low-res images).
"""

from __future__ import annotations

import argparse
import json
import sys
from itertools import islice
from pathlib import Path

from tqdm import tqdm

from textdiff.config import ConfigError, load_config
from textdiff.data.preview import save_batch_preview
from textdiff.data.stream import build_train_stream


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, type=Path, help="recipe JSON (ds_configs/*.json)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config key, e.g. data.shards=data/demo/manifest.json (repeatable)")
    p.add_argument("--out", required=True, type=Path, help="folder for the PNG grids and JSON files")
    p.add_argument("--batches", type=int, default=2, help="how many batches to write (default 2)")
    p.add_argument("--batch-size", type=int,
                   help="samples per batch (default: train_micro_batch_size_per_gpu of the recipe, capped at 16)")
    p.add_argument("--rank", type=int, default=0, help="which rank's stream to show (default 0)")
    p.add_argument("--world-size", type=int, default=1, help="ranks the stream is split over (default 1)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    batch_size = args.batch_size or min(16, int(cfg.deepspeed.get("train_micro_batch_size_per_gpu", 16)))
    try:
        stream = build_train_stream(cfg.data, cfg.augment, cfg.model.image_size, cfg.model.low_res_size,
                                    batch_size, args.rank, args.world_size)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for i, batch in enumerate(tqdm(islice(stream, args.batches), total=args.batches, desc="batches")):
        png, _ = save_batch_preview(batch, args.out, name=f"batch_{i:03d}")
        print(f"wrote {png} ({len(batch['key'])} samples)")
    print(json.dumps(stream.counters()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
