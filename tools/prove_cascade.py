#!/usr/bin/env python
"""The cascade experiment: train a 32 -> 64 px upsampler on the CPU and measure, by OCR, whether the spelling
model's samples come out of it as legible 64 px text (docs/cascade.md).

    python tools/prove_cascade.py --base runs/spell --minutes 40 --out runs/cascade --json

--base is a finished tools/prove_spelling.py --out: its saved held-out samples (32 px) are the cascade's input,
so the upsampler's budget is its own; without --base the spelling experiment runs first into OUT/base for
--base-minutes. Prints the CER of the base samples, of them upscaled by bicubic interpolation and through the
upsampler at each noise-conditioning level, of the upsampler on real 32 px renders, PSNR and SSIM against the
real 64 px renders, and the OCR ceilings at 32 and 64 px. A rerun with the same --out continues training;
--reevaluate scores a trained upsampler again without training.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from textdiff.config import ConfigError
from textdiff.experiments.cascade import RESULT_KEYS, CascadeDesign, reevaluate, run_cascade_experiment
from textdiff.experiments.spelling import Design, ExperimentError, run_experiment
from textdiff.ocr import OcrError, OcrMissingError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = CascadeDesign(base="")
    p.add_argument("--base", default=None, help="a finished spelling experiment's --out (default: run one first)")
    p.add_argument("--base-minutes", type=float, default=40.0, help="without --base: the spelling experiment's budget")
    p.add_argument("--minutes", type=float, default=40.0, help="the upsampler's wall time, data and evaluation included")
    p.add_argument("--out", default="runs/cascade", help="work directory (data, run, eval, result.json)")
    p.add_argument("--recipe", default=d.recipe, help="the upsampler's recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override an upsampler recipe key (repeatable), as for launch.sh")
    p.add_argument("--renders", type=int, default=d.renders, help="64 px training images per training string")
    p.add_argument("--steps", type=int, default=d.steps, help="the upsampler's sampling steps")
    p.add_argument("--levels", default=",".join(map(str, d.levels)),
                   help="noise-conditioning levels to sample at (the first is the headline)")
    p.add_argument("--engine", default="", help="OCR engine (default: the recipe's eval.ocr_engine)")
    p.add_argument("--reevaluate", action="store_true", help="no training: score the upsampler in --out again")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    out = Path(args.out)
    try:
        levels = tuple(int(v) for v in args.levels.split(",") if v)
        if args.base is None and not args.reevaluate:
            run_experiment(out / "base", args.base_minutes, Design())
        base = args.base or str(out / "base")
        design = CascadeDesign(base=base, recipe=args.recipe, overrides=tuple(args.overrides), renders=args.renders,
                               steps=args.steps, levels=levels, engine=args.engine)
        result = reevaluate(out, design) if args.reevaluate else run_cascade_experiment(out, args.minutes, design)
    except (ConfigError, ExperimentError, OcrMissingError, OcrError, ValueError) as e:
        print(f"prove_cascade: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({k: result.get(k) for k in (*RESULT_KEYS, "cer_cascade64_by_level")}))
    else:
        print(summary(result))
    return 0


def summary(result: dict) -> str:
    """The figures in words."""
    levels = ", ".join(f"{level}: {cer:.3f}" for level, cer in result["cer_cascade64_by_level"].items())
    return "\n".join([
        f"held-out CER ({result['engine']}, {result['n_eval']} images): base 32 px {result['cer_base32']:.3f} "
        f"(ceiling {result['ceiling32']:.3f}); bicubic 64 px {result['cer_bicubic64']:.3f}; cascade 64 px "
        f"{result['cer_cascade64']:.3f} (by noise level {levels}; ceiling {result['ceiling64']:.3f})",
        f"real 32 px renders upsampled: CER {result['cer_up_real']:.3f} (bicubic {result['cer_bicubic_real']:.3f}), "
        f"PSNR {result['psnr_up']:.2f} dB (bicubic {result['psnr_bicubic']:.2f}), SSIM {result['ssim_up']:.4f} "
        f"(bicubic {result['ssim_bicubic']:.4f})",
        f"{result.get('steps')} steps, {result.get('samples_seen')} samples, {result.get('minutes')} min"])


if __name__ == "__main__":
    sys.exit(main())
