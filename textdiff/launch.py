"""Command line of ``launch.sh``: which recipe, which overrides, where the run lives, whether to resume; it
trains with the run's monitor (sample grids, spelling evaluation: textdiff/eval/monitor.py) when the recipe
asks for either."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from textdiff.config import ConfigError, TextdiffConfig, load_config
from textdiff.eval.monitor import TrainingMonitor
from textdiff.train.checkpoint import RunDirError, write_failure
from textdiff.train.loop import train
from textdiff.train.window import TrainingDiverged


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``launch.sh``; the DeepSpeed launcher adds ``--local_rank``."""
    p = argparse.ArgumentParser(
        prog="launch.sh", description="Train a textdiff model with DeepSpeed (see docs/training.md).",
        epilog="Example: deepspeed --num_gpus 2 launch.sh --config ds_configs/demo_cpu.json --run-dir runs/demo")
    p.add_argument("--config", required=True, help="recipe JSON (ds_configs/*.json): DeepSpeed keys + textdiff")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config key, e.g. train.max_steps=20 or deepspeed.gradient_clipping=0.5 "
                        "(repeatable; VALUE is JSON if it parses, else a string)")
    p.add_argument("--run-dir", default=None,
                   help="checkpoints, TensorBoard events, first batch and config go here (default runs/<recipe>)")
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="auto: continue from the latest complete checkpoint of the run dir (or start fresh when "
                        "there is none); PATH: a checkpoint directory or another run dir")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1,
                   help="set by the DeepSpeed launcher; do not pass by hand")
    return p


def run_dir_for(config_path: str, run_dir: Optional[str]) -> Path:
    """The run directory: ``--run-dir``, else ``runs/<recipe file stem>``."""
    return Path(run_dir) if run_dir else Path("runs") / Path(config_path).stem


def monitor_for(cfg: TextdiffConfig, run_dir: Path) -> Optional[TrainingMonitor]:
    """The run's monitor, or None when it neither samples grids (``train.sample_every``) nor evaluates
    (``eval.every``)."""
    return TrainingMonitor(cfg, run_dir) if cfg.train.sample_every or cfg.eval.every else None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse flags, load and validate the recipe, train; returns the process exit status."""
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"launch.sh: {e}", file=sys.stderr)
        return 2
    run_dir = run_dir_for(args.config, args.run_dir)
    try:
        train(cfg, run_dir, resume=args.resume, monitor=monitor_for(cfg, run_dir))
    except ConfigError as e:
        print(f"launch.sh: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"launch.sh: {e}", file=sys.stderr)
        return 3
    except RunDirError as e:
        print(f"launch.sh: {e}", file=sys.stderr)
        return 4
    except OSError as e:  # any other file of the run (events, samples, config copy) that could not be written
        if not e.filename:
            raise
        print(f"launch.sh: cannot write {write_failure(e)}; free space or make the folder writable, then "
              "continue with --resume auto", file=sys.stderr)
        return 4
    return 0
