#!/usr/bin/env python
"""Rebuild an EMA of any width after training from the run's power-function EMA snapshots (EDM2's post-hoc
EMA; textdiff/train/posthoc_ema.py), and write it as an export that tools/sample.py loads like any other.

    python tools/reconstruct_ema.py RUN_DIR --sigma-rel 0.08 [--step N] [--out FILE.safetensors]

The run must have trained with ``ema.power_sigma_rels`` (e.g. [0.05, 0.10]) and ``ema.snapshot_every``. Prints
the fit (the relative L2 distance between the rebuilt profile and the asked one; 0 is exact) and the
coefficient of every snapshot average.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from textdiff.config import ConfigError
from textdiff.formats.export import write_export
from textdiff.formats.weights import LoadError, fit_shapes, model_shapes, read_source_config
from textdiff.train.posthoc_ema import reconstruct


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="the training run directory (it holds ema_snapshots/ and checkpoints/)")
    p.add_argument("--sigma-rel", type=float, required=True, help="relative width of the EMA to rebuild, e.g. 0.08")
    p.add_argument("--step", type=int, default=None, help="the snapshot step to rebuild at (default: the last)")
    p.add_argument("--out", default=None, help="the export to write (default RUN_DIR/ema_sigma<S>_step<N>.safetensors)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    try:
        cfg = read_source_config(args.run_dir)
        rec = reconstruct(args.run_dir, args.sigma_rel, args.step)
        out = Path(args.out) if args.out else Path(args.run_dir) / f"ema_sigma{args.sigma_rel:g}_step{rec.step}.safetensors"
        write_export(out, fit_shapes(rec.weights, model_shapes(cfg)), cfg,
                     {"weights": f"posthoc:sigma_rel={args.sigma_rel:g}", "source": str(args.run_dir),
                      "step": str(rec.step), "fit": f"{rec.fit:.6f}"})
    except (ConfigError, LoadError, ValueError) as e:
        print(f"reconstruct_ema: {e}", file=sys.stderr)
        return 2
    summary = {"out": str(out), "sigma_rel": rec.sigma_rel, "step": rec.step, "updates": rec.updates, "fit": rec.fit,
               "snapshots": len({s for s, _, _ in rec.terms})}
    if args.json:
        print(json.dumps({**summary, "terms": rec.terms}))
    else:
        print(f"wrote {out}: sigma_rel {rec.sigma_rel:g} at step {rec.step} ({rec.updates} EMA updates) from "
              f"{summary['snapshots']} snapshots; fit {rec.fit:.4f} (relative L2 distance of the profiles)")
        for step, key, coefficient in rec.terms:
            print(f"  step {step:8d}  {key:14s} {coefficient:+.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
