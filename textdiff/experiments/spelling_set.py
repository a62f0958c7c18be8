"""The spelling experiment's data set (tools/prove_spelling.py): short strings drawn as large as the image allows.

Every string of ``lengths`` characters over ``alphabet`` (digits by default: 100 two-digit and 1000
three-digit strings) is either a training string or a held-out one (:func:`split_strings`, at least 10% held
out, in the same share for every length), so held-out strings are never drawn into a training shard. A
render (:func:`render_string`) puts the string on one line in a random colour on a random flat background of
contrasting luminance, at a random position, with glyphs stretched to a random 56-68% of the image height
and the line to at most 90% of its width: at 32 px, 18-22 px tall digits, which Tesseract reads back with
CER 0.015 (docs/spelling.md). Everything random comes from a ``random.Random``, so a seed fixes the set.

Noisy labels (:func:`wrong_labels`): a seeded share of the training images can be given the transcription of
another training string while they keep the ink of their own, as OCR mislabels photographs, with their
string's box listed as unreadable text (make_shards ``--unreadable``), so ``data.mask_unreadable`` can leave
it out of the loss.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from textdiff.data.preview import png_bytes
from textdiff.data.synthetic import luma

DIGITS = "0123456789"
MIN_CONTRAST = 110.0  # luma difference of text and background, 0..255
HEIGHT_FRACS = (0.56, 0.68)  # glyph height as a fraction of the image side
MAX_WIDTH_FRAC = 0.9
DRAW_PX = 96  # glyphs are drawn at this size, then resized to fit: smooth edges at any target size


def all_strings(alphabet: str = DIGITS, lengths: Sequence[int] = (2, 3)) -> list[str]:
    """Every string over ``alphabet`` of each length in ``lengths``, in lexicographic order per length."""
    return ["".join(chars) for n in lengths for chars in itertools.product(alphabet, repeat=n)]


def split_strings(strings: Sequence[str], heldout_frac: float, seed: int) -> tuple[list[str], list[str]]:
    """(training, held-out) strings: a seeded ``heldout_frac`` share of each length held out (rounded up, at
    least one per length). The two lists are disjoint and together hold every string once."""
    if not 0.0 < heldout_frac < 1.0:
        raise ValueError(f"the held-out share is {heldout_frac}; give a fraction in (0, 1), e.g. 0.1")
    rng = random.Random(f"textdiff-spelling-split:{seed}")
    train, heldout = [], []
    for n in sorted({len(s) for s in strings}):
        group = sorted(s for s in strings if len(s) == n)
        k = max(1, math.ceil(heldout_frac * len(group) - 1e-9))
        chosen = set(rng.sample(group, k))
        heldout += [s for s in group if s in chosen]
        train += [s for s in group if s not in chosen]
    return train, heldout


@lru_cache(maxsize=64)
def _glyphs(text: str) -> Image.Image:
    """The ink of ``text`` on one line, drawn bold at DRAW_PX px, cropped to its ink: an ``L`` mask."""
    font = ImageFont.load_default(size=DRAW_PX)
    stroke = DRAW_PX // 32
    left, top, right, bottom = font.getbbox(text, stroke_width=stroke)
    mask = Image.new("L", (right - left + 8, bottom - top + 8), 0)
    ImageDraw.Draw(mask).text((4 - left, 4 - top), text, fill=255, font=font, stroke_width=stroke, stroke_fill=255)
    return mask.crop(mask.getbbox())


def _colours(rng: random.Random) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    while True:
        background = tuple(rng.randint(0, 255) for _ in range(3))
        text = tuple(rng.randint(0, 255) for _ in range(3))
        if abs(luma(background) - luma(text)) >= MIN_CONTRAST:
            return background, text


def render_string(text: str, rng: random.Random, size: int = 32) -> tuple[Image.Image, list[int]]:
    """One ``size`` x ``size`` RGB render of ``text`` and its safebox [left, top, right, bottom) in px."""
    if not text:
        raise ValueError("render_string draws text; the spelling set has no text-free images")
    glyphs = _glyphs(text)
    height = max(4, round(rng.uniform(*HEIGHT_FRACS) * size))
    width = min(round(MAX_WIDTH_FRAC * size), round(glyphs.width * height / glyphs.height))
    if width > size - 2 or height > size - 2:
        raise ValueError(f"{text!r} does not fit a {size} px image; use a larger size or shorter strings")
    mask = glyphs.resize((width, height), Image.LANCZOS)
    background, colour = _colours(rng)
    image = Image.new("RGB", (size, size), background)
    x, y = rng.randint(1, size - 1 - width), rng.randint(1, size - 1 - height)
    image.paste(Image.new("RGB", (width, height), colour), (x, y), mask)
    return image, [x, y, x + width, y + height]


def render_rng(seed: int, text: str, index: int) -> random.Random:
    """The generator of render ``index`` of ``text`` under ``seed``."""
    return random.Random(f"textdiff-spelling-render:{seed}:{text}:{index}")


def wrong_labels(jobs: Sequence[tuple[str, int]], strings: Sequence[str], share: float, seed: int
                 ) -> dict[tuple[str, int], str]:
    """The renders ``(text, k)`` of ``jobs`` that get a wrong transcription, each with it: ``round(share *
    len(jobs))`` renders drawn without replacement by ``seed``, each labelled with a string drawn uniformly
    from ``strings`` (the training strings, so never a held-out one) other than its own text."""
    if not 0.0 <= share < 1.0:
        raise ValueError(f"the share of wrong labels is {share}; give a fraction in [0, 1), e.g. 0.3")
    if share and len(set(strings)) < 2:
        raise ValueError("wrong labels need at least two training strings to draw a wrong one from")
    rng = random.Random(f"textdiff-spelling-wrong:{seed}")
    chosen = sorted(rng.sample(range(len(jobs)), round(share * len(jobs))))
    wrong = {}
    for i in chosen:
        text = jobs[i][0]
        label = text
        while label == text:
            label = strings[rng.randrange(len(strings))]
        wrong[jobs[i]] = label
    return wrong


def write_folder(out_dir: str | Path, strings: Sequence[str], renders: int, seed: int, size: int = 32,
                 progress: bool = True, wrong_share: float = 0.0) -> int:
    """Write ``renders`` images of each string as the folder layout tools/make_shards.py reads:
    ``OUT/<text>_<k>.png`` with ``<text>_<k>.txt`` beside it and ``OUT/safeboxes.json`` (key -> box).
    With ``wrong_share`` > 0, that share of the images (:func:`wrong_labels` of ``seed``) has another
    training string in its .txt and its box in ``OUT/unreadable.json`` (key -> [box]). Returns the number
    of images. The folder is scratch for the sharder (plain writes, no fsync: 16k images in seconds); whoever
    calls this re-renders it when the shards were not finished."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    safeboxes, unreadable = {}, {}
    jobs = [(s, k) for s in strings for k in range(renders)]
    wrong = wrong_labels(jobs, strings, wrong_share, seed)
    for text, k in tqdm(jobs, desc="render", unit="img", disable=not progress):
        image, box = render_string(text, render_rng(seed, text, k), size)
        key = f"{text}_{k:03d}"
        (out / f"{key}.png").write_bytes(png_bytes(image))
        (out / f"{key}.txt").write_text(wrong.get((text, k), text), encoding="utf-8")
        safeboxes[key] = box
        if (text, k) in wrong:
            unreadable[key] = [box]
    (out / "safeboxes.json").write_text(json.dumps(safeboxes), encoding="utf-8")
    if wrong_share:
        (out / "unreadable.json").write_text(json.dumps(unreadable), encoding="utf-8")
    return len(jobs)


