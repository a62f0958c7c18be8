"""Read the text in images with Tesseract, called through its command-line program.

Small generated images (64 px) are far below the text height Tesseract was trained on (about 30 px per
capital letter), so each image is prepared first (:func:`preprocess`): grayscale, upscaled by a whole factor
to about ``eval.ocr_height`` px, turned dark-text-on-light, contrast stretched, Otsu-binarised and given a
white margin; docs/eval.md has the measurements behind each step. Many images go to one Tesseract process
as a list file (one "page" each), because starting Tesseract and loading its language model costs ~0.2 s
while reading a small page costs ~0.01 s. Its TSV output gives every word with a confidence, which tells
a shape read as a letter apart from text (:func:`textdiff.eval.metrics.shows_text`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from textdiff.config import EvalConfig

ImageLike = Union[Image.Image, np.ndarray]

# Images per Tesseract process: large enough to amortise its start-up, small enough to spread over workers.
_CHUNK = 32


class TesseractMissingError(RuntimeError):
    """The Tesseract program named by ``eval.tesseract_cmd`` cannot be found or run."""


class TesseractError(RuntimeError):
    """Tesseract ran but failed, or its output does not match the images given to it."""


def find_tesseract(tesseract_cmd: str = "tesseract") -> str:
    """Return the full path of the Tesseract program, or raise TesseractMissingError saying how to install it."""
    path = shutil.which(tesseract_cmd)
    if path is None:
        raise TesseractMissingError(
            f"the Tesseract OCR program {tesseract_cmd!r} (eval.tesseract_cmd) was not found on PATH; spelling "
            "evaluation needs it: install the tesseract-ocr package (Debian/Ubuntu: apt-get install tesseract-ocr, "
            "or run tools/setup_env.sh as root), or give the program's path: --set eval.tesseract_cmd=PATH for training, --tesseract PATH for "
            "tools/eval_text.py")
    return path


def to_pil(image: ImageLike) -> Image.Image:
    """An RGB PIL image from a PIL image or a uint8 array ``[H, W, 3]``, ``[H, W, 1]`` or ``[H, W]``."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise TypeError(f"images must be uint8 arrays [H, W, 3] in 0..255 or PIL images, got dtype {array.dtype}; "
                        "convert a [-1, 1] tensor with ((x + 1) * 127.5).round().clamp(0, 255).byte()")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3):
        raise ValueError(f"images must have shape [H, W, 3] or [H, W], got {list(array.shape)}; "
                         "a channels-first [3, H, W] array needs .transpose(1, 2, 0)")
    return Image.fromarray(array).convert("RGB")


def _otsu_threshold(gray: np.ndarray) -> int:
    hist = np.bincount(gray.ravel(), minlength=256).astype(np.float64)
    levels = np.arange(256)
    weight_lo = np.cumsum(hist)
    weight_hi = weight_lo[-1] - weight_lo
    mean_lo = np.cumsum(hist * levels) / np.maximum(weight_lo, 1)
    mean_hi = ((hist * levels).sum() - np.cumsum(hist * levels)) / np.maximum(weight_hi, 1)
    between = weight_lo * weight_hi * (mean_lo - mean_hi) ** 2
    return int(np.argmax(between))


def upscale_factor(height: int, ocr_height: int) -> int:
    """The whole factor that brings an image of ``height`` px closest to ``ocr_height`` px, at least 1."""
    return max(1, round(ocr_height / height))


def ink_height(gray: np.ndarray) -> int:
    """Rows spanned by the ink of a one-line image: gray ``[H, W]`` uint8, dark text on light.

    Ink is what Otsu's threshold puts below the level; the span runs from the first to the last row holding
    at least 5% of the fullest row's ink, so specks of noise do not stretch it. 0 when there is no ink.
    """
    ink = gray <= _otsu_threshold(gray)
    rows = ink.sum(axis=1)
    if int(rows.max(initial=0)) == 0:
        return 0
    inked = np.flatnonzero(rows >= max(1, 0.05 * rows.max()))
    return int(inked[-1] - inked[0] + 1)


def glyph_upscale_factor(gray: np.ndarray, cfg: EvalConfig) -> int:
    """The whole upscale factor for one dark-on-light gray image ``[H, W]``.

    With ``cfg.ocr_glyph_height`` > 0, the factor that brings the ink's height (:func:`ink_height`) closest to
    it, at most the one that brings the image to ``cfg.ocr_height``: Tesseract's LSTM reads glyphs of 30-50 px
    best, and enlarging a 32 px image 6x to 192 px makes 20 px digits 120 px tall, where it reads 7 as '/'.
    An image whose ink fills nearly all its rows (noise, no clear line) falls back to the ``ocr_height`` rule.
    """
    by_height = upscale_factor(gray.shape[0], cfg.ocr_height)
    if cfg.ocr_glyph_height <= 0:
        return by_height
    span = ink_height(gray)
    if span < 3 or span > 0.9 * gray.shape[0]:
        return by_height
    return max(1, min(by_height, round(cfg.ocr_glyph_height / span)))


def preprocess(image: ImageLike, cfg: EvalConfig) -> Image.Image:
    """Prepare one image for Tesseract: an ``L`` image, dark text on light, upscaled by
    :func:`glyph_upscale_factor`, with a white margin of 1/8 of its side.

    The background is taken to be the median gray level (text covers the minority of pixels); a dark
    background is inverted. With ``cfg.ocr_binarize`` the result is thresholded at Otsu's level.
    """
    gray = to_pil(image).convert("L")
    if np.median(np.asarray(gray)) < 128:
        gray = ImageOps.invert(gray)
    factor = glyph_upscale_factor(np.asarray(gray), cfg)
    if factor != 1:
        gray = gray.resize((gray.width * factor, gray.height * factor), Image.LANCZOS)
    gray = ImageOps.autocontrast(gray, cutoff=1)
    if cfg.ocr_binarize:
        level = _otsu_threshold(np.asarray(gray))
        gray = gray.point(lambda v: 255 if v > level else 0)
    margin = max(gray.width, gray.height) // 8
    return ImageOps.expand(gray, border=margin, fill=255)


@dataclass(frozen=True)
class Reading:
    """What Tesseract read in one image: ``text`` (words joined by spaces, lines by newlines) and each
    word with its confidence in 0..100."""

    text: str
    words: tuple[tuple[str, float], ...] = ()


def _tesseract_command(binary: str, list_file: Path, cfg: EvalConfig) -> list[str]:
    whitelist = ["-c", f"tessedit_char_whitelist={cfg.whitelist}"] if cfg.whitelist else []
    return [binary, str(list_file), "stdout", "--psm", str(cfg.psm), "-l", cfg.ocr_lang, *whitelist, "tsv"]


def parse_tsv(tsv: str, n_pages: int) -> list[Reading]:
    """Split Tesseract's TSV output over ``n_pages`` pages into one Reading per page.

    Columns: level page_num block_num par_num line_num word_num left top width height conf text; level 5
    rows are words, level 1 rows mark each page (so a page without words still shows up).
    """
    pages: dict[int, dict[tuple[str, str, str], list[tuple[str, float]]]] = {}
    for line in tsv.splitlines()[1:]:
        cols = line.split("\t")
        if len(cols) < 12 or not cols[0].isdigit():
            continue
        page = pages.setdefault(int(cols[1]), {})
        if cols[0] == "5" and cols[11].strip():
            page.setdefault((cols[2], cols[3], cols[4]), []).append((cols[11].strip(), float(cols[10])))
    if sorted(pages) != list(range(1, n_pages + 1)):
        raise TesseractError(f"Tesseract returned pages {sorted(pages)[:5]}... for {n_pages} images")
    readings = []
    for number in range(1, n_pages + 1):
        lines = list(pages[number].values())
        readings.append(Reading("\n".join(" ".join(w for w, _ in words) for words in lines),
                                tuple(word for words in lines for word in words)))
    return readings


def _ocr_chunk(binary: str, images: Sequence[ImageLike], cfg: EvalConfig) -> list[Reading]:
    with tempfile.TemporaryDirectory(prefix="textdiff-ocr-") as tmp:
        paths = []
        for i, image in enumerate(images):
            path = Path(tmp) / f"{i:05d}.png"
            preprocess(image, cfg).save(path)
            paths.append(str(path))
        list_file = Path(tmp) / "pages.txt"
        list_file.write_text("\n".join(paths) + "\n", encoding="utf-8")
        # one thread per process: the workers already run processes side by side
        env = dict(os.environ, OMP_THREAD_LIMIT="1")
        try:
            result = subprocess.run(_tesseract_command(binary, list_file, cfg), capture_output=True, env=env,
                                    timeout=cfg.ocr_timeout_s * len(images) + 10)
        except OSError as e:
            raise TesseractMissingError(f"could not run Tesseract {binary!r} (eval.tesseract_cmd): {e}; install "
                                        "the tesseract-ocr package or point eval.tesseract_cmd at it") from None
        except subprocess.TimeoutExpired:
            raise TesseractError(f"Tesseract took longer than {cfg.ocr_timeout_s} s per image on {len(images)} "
                                 "images; raise eval.ocr_timeout_s or check the machine's load") from None
    if result.returncode != 0:
        raise TesseractError(f"Tesseract {binary} exited with {result.returncode}: "
                             f"{result.stderr.decode('utf-8', 'replace').strip()[-800:]}; "
                             f"check eval.ocr_lang={cfg.ocr_lang!r} is installed (tesseract --list-langs)")
    return parse_tsv(result.stdout.decode("utf-8", "replace"), len(images))


def ocr_images(images: Iterable[ImageLike], cfg: EvalConfig, workers: int = 1,
               progress: bool = True) -> list[Reading]:
    """Read the text of each image (uint8 ``[H, W, 3]`` arrays or PIL images); one Reading per image.

    ``workers`` Tesseract processes run side by side, each on chunks of 32 images. With
    ``cfg.ocr_retry_psm`` > 0, images read as empty are read once more in that page segmentation mode
    (one-line mode 7 returns nothing for about 4% of clean 32 px digit renders, which word mode 8 reads).
    """
    if workers < 1:
        raise ValueError(f"workers is {workers}; give at least 1 (--workers)")
    binary = find_tesseract(cfg.tesseract_cmd)
    images = list(images)
    chunks = [images[i:i + _CHUNK] for i in range(0, len(images), _CHUNK)]
    readings: list[Reading] = []
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=len(images), desc="ocr", unit="img", disable=not progress) as bar:
        for chunk_readings in pool.map(lambda chunk: _ocr_chunk(binary, chunk, cfg), chunks):
            readings.extend(chunk_readings)
            bar.update(len(chunk_readings))
        empty = [i for i, r in enumerate(readings) if not r.text.strip()]
        if cfg.ocr_retry_psm and empty:
            retry = replace(cfg, psm=cfg.ocr_retry_psm)
            again = [images[i] for i in empty]
            parts = [again[i:i + _CHUNK] for i in range(0, len(again), _CHUNK)]
            reread = [r for got in pool.map(lambda chunk: _ocr_chunk(binary, chunk, retry), parts) for r in got]
            for i, reading in zip(empty, reread):
                readings[i] = reading
    return readings


def ocr_image(image: ImageLike, cfg: EvalConfig) -> Reading:
    """Read the text of one image; see :func:`ocr_images`."""
    return ocr_images([image], cfg, progress=False)[0]
