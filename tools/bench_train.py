#!/usr/bin/env python3
"""Images/s of a training step at a recipe, through DeepSpeed and in plain PyTorch, and the overhead ratio;
with ``--peer``, textdiff's U-net next to diffusers' of the same size.

    python tools/bench_train.py --config ds_configs/demo_cpu.json --steps 10
    python tools/bench_train.py --config ds_configs/base64.json --set deepspeed.zero_optimization.stage=2
    python tools/bench_train.py --peer                      # demo and 46 M, fp32 and bf16 (needs '.[bench]')
    python tools/bench_train.py --peer --compile --sizes demo --dtypes fp32
    python tools/bench_train.py --peer --config ds_configs/base64.json --sizes recipe --dtypes bf16 --device cuda
    python tools/bench_train.py --checkpointing --sizes 46M  # activation checkpointing: memory and step cost

Uses a fixed synthetic batch (no data loading) and random weights (no CLIP download: the caption
encoder keeps its random initialisation). Steps are timed in A-B-B-A rounds in one process; prints one
JSON line per measurement. ``--peer`` needs diffusers (pip install -e '.[bench]').
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from textdiff.config import ConfigError, load_config
from textdiff.malloc import keep_freed_memory

# --peer and --checkpointing sizes: overrides of ds_configs/demo_cpu.json; "recipe" is --config as it is
DEMO = "ds_configs/demo_cpu.json"
PEER_SIZES = {
    "demo": [],
    "recipe": [],
    "46M": ["model.image_size=64", "model.num_channels=128", "model.channel_mult=[1,2,2,2]",
            "model.num_res_blocks=2", "model.attention_resolutions=[16,8]", "model.txt_resolutions=[16,8]",
            "deepspeed.train_micro_batch_size_per_gpu=4",
            # heads of width 32 in the middle block too, as at every level, so diffusers' peer (whose middle block
            # takes the last level's heads) is matched head for head there
            "model.num_heads=8"],
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def size_config(size: str, args):
    """The config of one ``--sizes`` entry, with ``--set`` applied."""
    return load_config(args.config if size == "recipe" else DEMO, PEER_SIZES[size] + args.overrides)


def run_peer(args, p: argparse.ArgumentParser) -> int:
    """``--peer``: one JSON line per size and dtype (and compiled, with ``--compile``)."""
    try:
        import diffusers  # noqa: F401
    except ImportError:
        p.error("--peer needs diffusers: pip install -e '.[bench]'")
    from textdiff.bench.peer import peer_bench

    device = torch.device(args.device)
    for size in args.sizes:
        cfg = size_config(size, args)
        for dtype in args.dtypes:
            result = peer_bench(cfg, DTYPES[dtype], steps=args.steps, warmup=args.warmup, compile=args.compile,
                                device=device)
            print(json.dumps({"size": size, **result}), flush=True)
    return 0


def run_checkpointing(args) -> int:
    """``--checkpointing``: per size, one JSON line per variant (off, the two smallest levels, every level)."""
    from textdiff.bench.train import checkpointing_bench

    for size in args.sizes:
        cfg = size_config(size, args)
        res = [cfg.model.feature_size // 2 ** i for i in range(len(cfg.model.channel_mult))]
        variants = {"off": {}, f"levels <= {res[-2]} px": {"use_checkpoint_below_res": res[-2]},
                    "every level": {"use_checkpoint": True}}
        for row in checkpointing_bench(cfg, variants, steps=args.steps, warmup=args.warmup,
                                       device=torch.device(args.device)):
            print(json.dumps({"size": size, **row}), flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="recipe JSON (ds_configs/*.json); required without --peer or --checkpointing, "
                   "and for --sizes recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config key (repeatable), as for launch.sh")
    p.add_argument("--steps", type=int, default=10, help="timed steps of each kind")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--peer", action="store_true", help="textdiff's U-net against diffusers' of the same size")
    p.add_argument("--sizes", nargs="+", choices=list(PEER_SIZES), default=["demo", "46M"],
                   help="with --peer or --checkpointing: demo_cpu.json, 46M (demo_cpu.json widened), or recipe "
                   "(--config as it is)")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES),
                   help="with --peer: fp32, and bf16 autocast")
    p.add_argument("--compile", action="store_true", help="with --peer: torch.compile both models")
    p.add_argument("--checkpointing", action="store_true",
                   help="activation checkpointing off, on the smallest levels, on every level (fp32)")
    p.add_argument("--device", default="cpu", help="with --peer: cpu or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: the recorded figures)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if not (args.peer or args.checkpointing) and not args.config:
        p.error("--config is required (or pass --peer or --checkpointing)")
    if (args.peer or args.checkpointing) and "recipe" in args.sizes and not args.config:
        p.error("--sizes recipe needs --config")
    torch.set_num_threads(args.threads)
    if args.device == "cpu":
        keep_freed_memory()  # as training and sampling on CPU do: both sides of --peer gain from it
    try:
        if args.peer:
            return run_peer(args, p)
        if args.checkpointing:
            return run_checkpointing(args)
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"bench_train: {e}", file=sys.stderr)
        return 2
    from textdiff.bench.train import bench_train

    result = bench_train(cfg, steps=args.steps, warmup=args.warmup)
    print(json.dumps({"config": args.config, "overrides": args.overrides, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
