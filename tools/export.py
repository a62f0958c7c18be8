#!/usr/bin/env python3
"""Export a training checkpoint's EMA (or raw) weights and config to one safetensors file for sampling.

    python tools/export.py runs/demo runs/demo/ema.safetensors            # latest checkpoint, its EMA
    python tools/export.py runs/demo/checkpoints/step_00000300 out.safetensors --raw
"""

from __future__ import annotations

import argparse
import sys

from textdiff.config import ConfigError
from textdiff.formats.weights import LoadError, export_checkpoint


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="run directory, its checkpoints/ folder, or one step_NNNNNNNN checkpoint")
    p.add_argument("out", help="the .safetensors file to write")
    p.add_argument("--raw", action="store_true", help="the optimizer's weights instead of the EMA")
    p.add_argument("--ema-rate", type=float, default=None, help="which EMA when the run kept several")
    args = p.parse_args(argv)
    try:
        out = export_checkpoint(args.source, args.out, "raw" if args.raw else "ema", args.ema_rate)
    except (ConfigError, LoadError) as e:
        print(f"export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
