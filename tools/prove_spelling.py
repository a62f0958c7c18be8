#!/usr/bin/env python
"""The spelling experiment: train a small text-writing model on the CPU and measure, by OCR, whether it
writes the transcription it is given (docs/spelling.md).

    python tools/prove_spelling.py --minutes 40 --out runs/spell --json

Renders every 2-3 digit string (10% held out, never in a shard), shards it with make_shards, trains
ds_configs/spell_cpu.json with DeepSpeed until the budget leaves only the evaluation's reserve, then samples
every held-out string from the EMA weights with guidance and with the null transcription and reads both
with each OCR engine (--engine, repeatable; default every one installed, the recipe's eval.ocr_engine
first). Prints, per engine, CER with the transcription, the null control and that engine's OCR ceiling, and
chance; with --json one JSON object. A rerun with the same --out continues the training from its last
checkpoint. Reading a finished run's saved images again, with no training or sampling:

    python tools/prove_spelling.py --rescore runs/spell --engine ppocr --json

Noisy OCR labels: 30% of the training images labelled with another training string and flagged unreadable,
trained with the flagged text masked out of the loss, and without, at the same budget (docs/data.md,
"Unreadable text"):

    python tools/prove_spelling.py --wrong-labels 0.3 --set data.mask_unreadable=true --out runs/wrong_masked
    python tools/prove_spelling.py --wrong-labels 0.3 --out runs/wrong_unmasked
    python tools/prove_spelling.py --compare runs/wrong_unmasked runs/wrong_masked   # B - A, paired bootstrap

Which EMA spells best, after a run that kept EDM2's power-function snapshots (docs/ema.md):

    python tools/prove_spelling.py --ema-sweep runs/spell --json
    python tools/prove_spelling.py --ema-curve runs/spell --json    # every kept checkpoint's averages
"""

from __future__ import annotations

import argparse
import json
import sys

from textdiff.config import ConfigError
from textdiff.experiments.ema_sweep import SIGMA_RELS, ema_curve, ema_sweep
from textdiff.experiments.spelling import (RESULT_KEYS, Design, ExperimentError, compare_runs, rescore,
                                           run_experiment)
from textdiff.ocr import OcrError, OcrMissingError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Design()
    p.add_argument("--minutes", type=float, default=40.0, help="total wall time, setup and evaluation included")
    p.add_argument("--out", default="runs/spell", help="work directory (data, run, eval, result.json)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the split, the renders and the samples")
    p.add_argument("--renders", type=int, default=d.renders, help="training images per training string")
    p.add_argument("--wrong-labels", type=float, default=d.wrong_labels, metavar="SHARE",
                   help="label this share of the training images with another training string (seeded by --seed; "
                        "the image keeps its own ink) and list its string box as unreadable text, which "
                        "--set data.mask_unreadable=true masks out of the loss (default 0: every label right)")
    p.add_argument("--guidance", type=float, default=d.guidance, help="transcription guidance of the headline CER")
    p.add_argument("--sampler", default=d.sampler, help="sampler of every evaluation")
    p.add_argument("--steps", type=int, default=None,
                   help=f"sampling steps of every evaluation (default {d.steps}; 10 below 20 minutes)")
    p.add_argument("--eval-per-string", type=int, default=None,
                   help=f"samples per held-out string (default {d.eval_per_string}; 1 below 20 minutes)")
    p.add_argument("--recipe", default=d.recipe, help="training recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a recipe key (repeatable), as for launch.sh")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--engine", dest="engines", action="append", default=[], metavar="NAME",
                   help="OCR engine of the final evaluation (repeatable: tesseract, ppocr); the first gives the "
                        "headline figures and the training curve (default: every one installed, eval.ocr_engine first)")
    p.add_argument("--rescore", metavar="RUN_OUT",
                   help="no training or sampling: read the images the finished run in RUN_OUT saved again with the "
                        "recipe's current eval settings and the --engine(s), each with its ceiling on fresh "
                        "renders; updates RUN_OUT/result.json")
    p.add_argument("--ema-sweep", metavar="RUN_OUT",
                   help="no training: score every average the finished run in RUN_OUT kept and EMAs of --sigma-rels "
                        "rebuilt from its snapshots (it must have trained with ema.power_sigma_rels and "
                        "ema.snapshot_every); writes RUN_OUT/ema_sweep.json and .png")
    p.add_argument("--ema-curve", metavar="RUN_OUT",
                   help="no training: score every average (and the raw weights) of every checkpoint the finished run "
                        "in RUN_OUT kept (train with checkpoint.keep_every) on the held-out strings, one image each; "
                        "writes RUN_OUT/ema_curve.json")
    p.add_argument("--curve-every", type=int, default=0, metavar="STEPS",
                   help="--ema-curve: only the checkpoints at a multiple of STEPS, and the last (default: every one)")
    p.add_argument("--averages", default="", metavar="NAMES",
                   help="--ema-curve: comma list of the averages to score (\"raw\": the raw weights; default all)")
    p.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"),
                   help="no training: B's held-out CER minus A's on the same strings and seeds, with a paired "
                        "bootstrap 95%% interval over the held-out strings (--engine: whose readings; default A's "
                        "first)")
    p.add_argument("--rounds", type=int, default=10000, help="--compare: bootstrap rounds")
    p.add_argument("--sigma-rels", default=",".join(f"{s:g}" for s in SIGMA_RELS),
                   help="--ema-sweep: comma list of EMA widths to rebuild")
    args = p.parse_args(argv)
    if args.ema_sweep:
        return sweep(args)
    if args.ema_curve:
        return curve_of_averages(args)
    if args.compare:
        return compare(args)
    per_string = args.eval_per_string or (d.eval_per_string if args.minutes >= 20 else 1)
    steps = args.steps or (d.steps if args.minutes >= 20 else 10)
    design = Design(renders=args.renders, seed=args.seed, guidance=args.guidance, sampler=args.sampler,
                    steps=steps, eval_per_string=per_string, recipe=args.recipe, overrides=tuple(args.overrides),
                    engines=tuple(args.engines), wrong_labels=args.wrong_labels)
    try:
        result = rescore(args.rescore, args.engines) if args.rescore else run_experiment(args.out, args.minutes, design)
    except FileNotFoundError as e:
        print(f"prove_spelling: --rescore needs a finished run (result.json, eval/samples.jsonl): {e}", file=sys.stderr)
        return 2
    except (ConfigError, ExperimentError, OcrMissingError, OcrError) as e:
        print(f"prove_spelling: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({k: result[k] for k in RESULT_KEYS}))
    else:
        print(summary(result))
    return 0


def sweep(args) -> int:
    """``--ema-sweep``: print the table (or one JSON object) of :func:`ema_sweep`."""
    try:
        sigma_rels = [float(s) for s in args.sigma_rels.split(",") if s]
        result = ema_sweep(args.ema_sweep, sigma_rels, args.engines[0] if args.engines else None)
    except (ConfigError, ExperimentError, OcrMissingError, OcrError, ValueError) as e:
        print(f"prove_spelling: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
        return 0
    for row in result["rows"]:
        fit = f"  fit {row['fit']:.4f}" if "fit" in row else ""
        print(f"{row['average']:22s} CER {row['cer']:.4f}  exact {row['exact']:.3f}{fit}")
    best, kept = result["best_rebuilt"], result["best_kept"]
    print(f"best rebuilt: {best['average']} CER {best['cer']:.4f}; best kept: {kept['average']} CER {kept['cer']:.4f} "
          f"({result['engine']}, {result['n_eval']} images, step {result['step']})")
    return 0


def curve_of_averages(args) -> int:
    """``--ema-curve``: print CER by step per average (or one JSON object) of :func:`ema_curve`."""
    try:
        result = ema_curve(args.ema_curve, args.engines[0] if args.engines else None, every=args.curve_every,
                           averages=[a for a in args.averages.split(",") if a])
    except (ConfigError, ExperimentError, OcrMissingError, OcrError, ValueError) as e:
        print(f"prove_spelling: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
        return 0
    for row in result["rows"]:
        print(f"step {row['step']:6d} ({row['samples_seen']:7d} samples)  {row['average']:18s} CER {row['cer']:.4f}  "
              f"exact {row['exact']:.3f}")
    return 0


def compare(args) -> int:
    """``--compare``: print B - A with its interval (or one JSON object) of :func:`compare_runs`."""
    try:
        result = compare_runs(*args.compare, args.engines[0] if args.engines else None, args.rounds)
    except (ConfigError, ExperimentError, ValueError) as e:
        print(f"prove_spelling: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
        return 0
    low, high = result["ci95"]
    print(f"A {result['a']}: CER {result['cer_a']:.4f}\nB {result['b']}: CER {result['cer_b']:.4f}\n"
          f"B - A {result['difference']:+.4f} (95% interval {low:+.4f} to {high:+.4f} over {result['strings']} "
          f"held-out strings, {result['samples']} samples; B better in {result['b_better']:.1%} of "
          f"{result['rounds']} rounds; {result['engine']})")
    return 0


def summary(result: dict) -> str:
    """The figures of ``result`` in words, one line per OCR engine and one for the run."""
    guidance = result["design"]["guidance"]
    lines = [f"{name}: held-out CER {f['cer_txt']:.3f} (exact {f['exact_txt']:.3f}) with the transcription at guidance "
             f"{guidance:g}; null control {f['cer_null']:.3f}; OCR ceiling {f['cer_ceiling']:.3f} ({f['version']})"
             for name, f in result["engines"].items()]
    lines.append(f"chance {result['cer_chance']:.3f}; {result['steps']} steps, {result['samples_seen']} samples, "
                 f"{result['minutes']:.1f} min, {result['n_eval']} images each; headline engine {result['engine']}")
    wrong = result.get("wrong_labels")
    if wrong:
        lines.append(f"wrong labels: {wrong['images']} of {wrong['of']} training images ({wrong['share']:g}, seed "
                     f"{wrong['seed']}), {'masked out of the loss' if wrong['masked'] else 'trained on as labelled'}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
