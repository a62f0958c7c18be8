"""Evaluation prompts: the built-in held-out set of the synthetic domain, a user's own prompt file
(textdiff/sampling/prompts.py), and the images a prompt file names.

The held-out set (:func:`heldout_prompts`) draws one or two words of ``HELDOUT_WORDS`` (disjoint from the
training words, and mostly longer: 5-7 letters against 3-5) in the training set's mix of cases, with every
fifth prompt text-free, as in the training set. Each prompt's caption describes the synthetic render of it
(:func:`render_prompts`), so a caption-conditioned model is asked for the kind of scene it was trained on.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from textdiff.config import EvalConfig
from textdiff.data.synthetic import HELDOUT_WORDS, TEXT_FREE_SHARE, random_transcription, render_sample
from textdiff.sampling.prompts import Prompt, PromptFileError, expand, read_prompts

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
TEXT_FREE_EVERY = round(1 / TEXT_FREE_SHARE)  # prompt i is text-free when i % TEXT_FREE_EVERY is the last


def pair_images(prompts: list[Prompt], image_dir: str | Path) -> list[tuple[Path, Prompt]]:
    """Match image files to prompts: by each prompt's ``image`` key if every prompt has one, else by order.

    Without ``image`` keys, the images in ``image_dir`` sorted by name stand for the prompts expanded by their
    ``count`` (prompt 1 ``count`` times, then prompt 2 ...); the numbers must agree. ``image`` paths are
    taken relative to ``image_dir`` unless absolute.
    """
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise PromptFileError(f"image folder {image_dir} (--images) does not exist or is not a folder")
    if all(p.image is not None for p in prompts):
        pairs = [(image_dir / p.image, p) for p in prompts]
        missing = [str(path) for path, _ in pairs if not path.is_file()]
        if missing:
            raise PromptFileError(f"{len(missing)} image files named in the prompt file are missing, e.g. "
                                  f"{missing[0]}; pass the folder they are relative to as --images")
        return pairs
    files = sorted(f for f in image_dir.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    expanded = expand(prompts)
    if len(files) != len(expanded):
        raise PromptFileError(f"image folder {image_dir} holds {len(files)} images but the prompts ask for "
                              f"{len(expanded)} (counts included); give one image per prompt and count, named "
                              "so that sorting by name puts them in prompt order, or add an 'image' key per line")
    return list(zip(files, expanded))


def render_rng(seed: int, index: int) -> random.Random:
    """The generator of the synthetic render of evaluation image ``index`` under ``seed``."""
    return random.Random(f"textdiff-eval-render:{seed}:{index}")


def render_prompts(prompts: list[Prompt], size: int = 64, progress: bool = False) -> list[Image.Image]:
    """Render each prompt's ``txt`` with the synthetic generator (image i from ``render_rng(seed, i)``):
    ``size`` x ``size`` RGB images of exactly the asked text, the best case for OCR.

    ``prompts`` are taken one per image (see :func:`expand`).
    """
    return [render_sample(p.txt, render_rng(p.seed, i), size).image
            for i, p in enumerate(tqdm(prompts, desc="render", unit="img", disable=not progress))]


def heldout_prompts(n: int, seed: int = 0, size: int = 64) -> list[Prompt]:
    """The first ``n`` prompts of the built-in held-out set under ``seed``, for ``size`` px images.

    Transcriptions are 1-2 words of ``HELDOUT_WORDS`` that fit ``size`` px; every 5th is "" (text-free).
    Every prompt has ``seed`` and count 1; its caption is the first caption of its synthetic render.
    """
    if n < 1:
        raise ValueError(f"the held-out prompt count is {n}; ask for at least 1 (eval.num_prompts / --renders)")
    return [_heldout_prompt(i, seed, size) for i in range(n)]


def _heldout_prompt(index: int, seed: int, size: int) -> Prompt:
    txt = "" if index % TEXT_FREE_EVERY == TEXT_FREE_EVERY - 1 else \
        random_transcription(random.Random(f"textdiff-heldout:{seed}:{index}"), HELDOUT_WORDS, size)
    return Prompt(txt=txt, capt=render_sample(txt, render_rng(seed, index), size).captions[0], seed=seed)


def eval_prompts(cfg: EvalConfig, size: int = 64) -> list[Prompt]:
    """The prompts of training-time evaluation: ``cfg.prompts_file`` if set, else ``cfg.num_prompts``
    held-out prompts under ``cfg.seed`` for ``size`` px images (``model.image_size``)."""
    if cfg.prompts_file:
        return read_prompts(cfg.prompts_file)
    return heldout_prompts(cfg.num_prompts, cfg.seed, size)
