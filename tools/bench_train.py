#!/usr/bin/env python3
"""Images/s of a training step at a recipe, through DeepSpeed and in plain PyTorch, and the overhead ratio.

    python tools/bench_train.py --config ds_configs/demo_cpu.json --steps 10
    python tools/bench_train.py --config ds_configs/base64.json --set deepspeed.zero_optimization.stage=2

Uses a fixed synthetic batch (no data loading) and random weights (no CLIP download: the caption
encoder keeps its random initialisation). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys

from textdiff.config import ConfigError, load_config


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="recipe JSON (ds_configs/*.json)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config key (repeatable), as for launch.sh")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps of each kind")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"bench_train: {e}", file=sys.stderr)
        return 2
    from textdiff.train.bench import bench_train

    result = bench_train(cfg, steps=args.steps, warmup=args.warmup)
    print(json.dumps({"config": args.config, "overrides": args.overrides, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
