"""Print the parameter count of a recipe's model, per part.

    python tools/model_summary.py ds_configs/base64.json [--set model.num_channels=128 ...] [--json]

The model is built on PyTorch's meta device (shapes only), so the full-size model with its CLIP text tower
is counted in about a second without memory or downloads. ``--json`` prints one JSON object with a count per
part, ``total`` and ``total_trainable``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from textdiff.config import ConfigError, load_config
from textdiff.models.summary import count_without_weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="recipe JSON, e.g. ds_configs/base64.json")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config key (repeatable)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    try:
        # DeepSpeed, imported on the way, logs its accelerator choice to stdout: keep stdout for the counts
        with contextlib.redirect_stdout(sys.stderr):
            counts = count_without_weights(load_config(args.config, args.set).model)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(counts))
        return 0
    for part, n in counts.items():
        print(f"{part:<24} {n:>14,d}  ({n / 1e6:8.2f} M)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
