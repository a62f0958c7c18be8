"""Measure how well images spell their transcriptions, by OCR (Tesseract, or PP-OCR with --engine ppocr).

Ground truth, the ceiling the OCR allows (no model involved)::

    python tools/eval_text.py --renders 200 --json

Generated images, paired with their prompts by the ``image`` key of each JSONL line (the JSONL written by
tools/sample.py) or else by sorted file name; the report names the engine and gives its ceiling on synthetic
renders of the same prompts beside the images' figures::

    python tools/eval_text.py --images runs/demo/samples --prompts runs/demo/samples/samples.jsonl --json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from PIL import Image

from textdiff.config import ConfigError, EvalConfig, load_config
from textdiff.eval.prompts import heldout_prompts, pair_images, render_prompts
from textdiff.eval.spelling import ceiling_report, evaluate_images, ocr_engine
from textdiff.files import atomic_write_json
from textdiff.ocr import OcrError, OcrMissingError
from textdiff.sampling.prompts import PromptFileError, expand, read_prompts

METRIC_KEYS = ("cer", "exact_match", "word_accuracy", "false_text_rate", "ned", "sentence_accuracy",
               "mario_word_accuracy", "mario_precision", "mario_recall", "mario_f_measure", "n", "n_text", "n_empty")
SUMMARY_KEYS = (*METRIC_KEYS, "normalize", "engine", "engine_version")
# flag -> eval key of the Tesseract settings; they do nothing with another engine
TESSERACT_FLAGS = (("tesseract", "tesseract_cmd"), ("psm", "psm"), ("ocr_height", "ocr_height"),
                   ("binarize", "ocr_binarize"), ("ocr_glyph_height", "ocr_glyph_height"), ("whitelist", "whitelist"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--renders", type=int, metavar="N",
                        help="render N prompts with the synthetic generator and OCR them (the OCR ceiling)")
    source.add_argument("--images", type=Path, metavar="DIR", help="folder of generated images to evaluate")
    p.add_argument("--prompts", type=Path, metavar="FILE.jsonl",
                   help="prompt file (needed with --images; with --renders: render these instead of the held-out set)")
    p.add_argument("--config", type=Path, help="recipe JSON: its eval section and model.image_size are the defaults")
    p.add_argument("--size", type=int, help="render size in px for --renders (default: model.image_size, 64)")
    p.add_argument("--seed", type=int, help="seed of the held-out prompts and their renders (default: eval.seed)")
    p.add_argument("--no-normalize", action="store_true", help="compare case and whitespace exactly")
    p.add_argument("--engine", help="OCR engine: tesseract or ppocr (default: eval.ocr_engine, tesseract); "
                                    "docs/eval.md says which to use when")
    p.add_argument("--workers", type=int, default=1, help="OCR workers (Tesseract processes) run side by side")
    p.add_argument("--tesseract", help="Tesseract program (default: eval.tesseract_cmd, 'tesseract')")
    p.add_argument("--psm", type=int, help="Tesseract page segmentation mode (default: eval.psm)")
    p.add_argument("--ocr-height", type=int, help="upscale to about this height before OCR (default: eval.ocr_height)")
    p.add_argument("--ocr-glyph-height", type=int,
                   help="upscale so the text's ink is about this tall, at most to --ocr-height; 0: off "
                        "(default: eval.ocr_glyph_height)")
    p.add_argument("--whitelist", help="the only characters OCR may read, e.g. 0123456789 (default: eval.whitelist)")
    p.add_argument("--binarize", action=argparse.BooleanOptionalAction, default=None,
                   help="Otsu-threshold images before OCR (default: eval.ocr_binarize, on)")
    p.add_argument("--report", type=Path, help="write the full report (per-prompt rows and readings) as JSON here")
    p.add_argument("--json", action="store_true", help="print one JSON object with the aggregate metrics")
    return p.parse_args(argv)


def eval_config(args: argparse.Namespace) -> tuple[EvalConfig, int | None]:
    """The eval section to use (recipe, then flags) and the render size (--size, else the recipe's
    model.image_size; None when neither is given)."""
    cfg = load_config(args.config) if args.config else None
    base = cfg.eval if cfg else EvalConfig()
    changes = {"normalize": False} if args.no_normalize else {}
    for flag, key in (("engine", "ocr_engine"), ("seed", "seed"), *TESSERACT_FLAGS):
        if getattr(args, flag) is not None:
            changes[key] = getattr(args, flag)
    out = dataclasses.replace(base, **changes)
    out.validate()
    given = [f"--{flag.replace('_', '-')}" for flag, _ in TESSERACT_FLAGS if getattr(args, flag) is not None]
    if out.ocr_engine != "tesseract" and given:
        raise ConfigError(f"{', '.join(given)} set Tesseract, which --engine {out.ocr_engine} does not use; drop them")
    return out, args.size or (cfg.model.image_size if cfg else None)


def collect(args: argparse.Namespace, cfg: EvalConfig, size: int) -> tuple[list, list]:
    """The images and the prompt of each, from renders (``size`` px) or from an image folder."""
    if args.renders is not None:
        if args.renders < 1:
            raise PromptFileError(f"--renders is {args.renders}; give at least 1")
        prompts = expand(read_prompts(args.prompts))[:args.renders] if args.prompts else \
            heldout_prompts(args.renders, cfg.seed, size)
        return render_prompts(prompts, size, progress=True), prompts
    if args.prompts is None:
        raise PromptFileError("--images needs --prompts FILE.jsonl (the prompts the images were made for)")
    pairs = pair_images(read_prompts(args.prompts), args.images)
    images = []
    for path, _ in pairs:
        try:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        except OSError as e:
            raise PromptFileError(f"cannot read image {path}: {e}; remove it or fix the prompt file") from None
    return images, [p for _, p in pairs]


def ceiling(prompts: list, size: int, cfg: EvalConfig, workers: int, engine) -> dict | None:
    """The engine's figures on synthetic ``size`` px renders of ``prompts`` (the ceiling of the images'), or
    None, with the reason on stderr, when a prompt's text does not fit a render of that size."""
    try:
        report = ceiling_report(prompts, size, cfg, workers, engine=engine).to_dict()
    except ValueError as e:
        print(f"eval_text: no OCR ceiling beside the figures: {e}", file=sys.stderr)
        return None
    return {k: report[k] for k in METRIC_KEYS}


def print_summary(report: dict) -> None:
    def fmt(v):
        return "n/a" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))
    print(f"normalize case/whitespace: {report['normalize']}")
    print(f"OCR engine: {report['engine']} ({report['engine_version']})")
    ceiling = report.get("ceiling")  # the engine on renders of the same prompts
    for key in METRIC_KEYS:
        print(f"{key:>19}: {fmt(report[key])}" + (f"  (ceiling {fmt(ceiling[key])})" if ceiling else ""))
    worst = sorted((r for r in report["prompts"] if r.get("cer") is not None), key=lambda r: -r["cer"])[:10]
    if worst and worst[0]["cer"] > 0:
        print("worst prompts (cer, target -> readings):")
        for row in worst:
            if row["cer"] > 0:
                print(f"  {row['cer']:.3f}  {row['txt']!r} -> {row['readings']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg, size = eval_config(args)
        images, prompts = collect(args, cfg, size or 64)
        engine = ocr_engine(cfg)
        report = evaluate_images(images, prompts, cfg, workers=args.workers, engine=engine).to_dict()
        if args.images is not None:  # with --renders the figures are the ceiling themselves
            report["ceiling"] = ceiling(prompts, size or images[0].height, cfg, args.workers, engine)
    except (ConfigError, PromptFileError, OcrMissingError, OcrError, ValueError) as e:
        print(f"eval_text: {e}", file=sys.stderr)
        return 2
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.report, report, indent=1)
    if args.json:
        print(json.dumps({k: report[k] for k in (*SUMMARY_KEYS, "ceiling") if k in report}))
    else:
        print_summary(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
