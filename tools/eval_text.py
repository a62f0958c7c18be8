"""Measure how well images spell their transcriptions, by OCR (Tesseract).

Ground truth, the ceiling the OCR allows (no model involved)::

    python tools/eval_text.py --renders 200 --json

Generated images, paired with their prompts by the ``image`` key of each JSONL line (the JSONL written by
tools/sample.py) or else by sorted file name::

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
from textdiff.eval.ocr import TesseractError, TesseractMissingError
from textdiff.eval.prompts import heldout_prompts, pair_images, render_prompts
from textdiff.sampling.prompts import PromptFileError, expand, read_prompts
from textdiff.eval.spelling import evaluate_images
from textdiff.files import atomic_write_json

SUMMARY_KEYS = ("cer", "exact_match", "word_accuracy", "false_text_rate", "n", "n_text", "n_empty", "normalize")


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
    p.add_argument("--workers", type=int, default=1, help="Tesseract processes run side by side")
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


def eval_config(args: argparse.Namespace) -> tuple[EvalConfig, int]:
    """The eval section to use (recipe, then flags) and the render size."""
    cfg = load_config(args.config) if args.config else None
    base = cfg.eval if cfg else EvalConfig()
    changes = {"normalize": False} if args.no_normalize else {}
    for flag, key in (("tesseract", "tesseract_cmd"), ("psm", "psm"), ("ocr_height", "ocr_height"), ("seed", "seed"),
                      ("binarize", "ocr_binarize"), ("ocr_glyph_height", "ocr_glyph_height"),
                      ("whitelist", "whitelist")):
        if getattr(args, flag) is not None:
            changes[key] = getattr(args, flag)
    out = dataclasses.replace(base, **changes)
    out.validate()
    size = args.size or (cfg.model.image_size if cfg else 64)
    return out, size


def collect(args: argparse.Namespace, cfg: EvalConfig, size: int) -> tuple[list, list]:
    """The images and the prompt of each, from renders or from an image folder."""
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


def print_summary(report: dict) -> None:
    def fmt(v):
        return "n/a" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))
    print(f"normalize case/whitespace: {report['normalize']}")
    for key in SUMMARY_KEYS[:-1]:
        print(f"{key:>16}: {fmt(report[key])}")
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
        images, prompts = collect(args, cfg, size)
        report = evaluate_images(images, prompts, cfg, workers=args.workers).to_dict()
    except (ConfigError, PromptFileError, TesseractMissingError, TesseractError, ValueError) as e:
        print(f"eval_text: {e}", file=sys.stderr)
        return 2
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.report, report, indent=1)
    if args.json:
        print(json.dumps({k: report[k] for k in SUMMARY_KEYS}))
    else:
        print_summary(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
