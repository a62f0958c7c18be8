"""Tesseract, called through its command-line program, as an OCR engine (``tesseract``).

Renders (the default): small generated images (32-64 px) are far below the text height Tesseract was trained
on (about 30 px per capital letter), so each image is prepared first (:func:`preprocess`): grayscale,
upscaled by a whole factor to about ``ocr_height`` px (or so the ink is ``ocr_glyph_height`` px tall), turned
dark-text-on-light, contrast stretched, Otsu-binarised and given a white margin; docs/eval.md has the
measurements behind each step. Photographs (``photo=True``, for annotating real images): grayscale, upscaled
by the whole-image rule alone and given the margin; no glyph rule (it measures one line's ink), no inversion
(a photograph holds text of either polarity), no stretch or threshold (a global threshold splits a busy
photograph, not its text, which Tesseract's own binarisation handles), a page segmentation mode that finds
lines anywhere (3 or 11) and no whitelist.

Many images go to one Tesseract process as a list file (one "page" each), because starting Tesseract and
loading its language model costs ~0.2 s while reading a small page costs ~0.01 s. Its TSV output gives every
word with a confidence, which tells a shape read as a letter apart from text
(:func:`textdiff.eval.metrics.shows_text`), and a box, from which each line's box is mapped back to the
pixels of the image given.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from textdiff.ocr.base import ImageLike, OcrError, OcrLine, OcrMissingError, Reading, to_pil

# Images per Tesseract process: large enough to amortise its start-up, small enough to spread over workers.
_CHUNK = 32
PHOTO_PSMS = (3, 11)  # a page of text, sparse text: the modes that find lines anywhere in a photograph


class TesseractMissingError(OcrMissingError):
    """The Tesseract program named by ``eval.tesseract_cmd`` cannot be found or run."""


class TesseractError(OcrError):
    """Tesseract ran but failed, or its output does not match the images given to it."""


def find_tesseract(tesseract_cmd: str = "tesseract") -> str:
    """Return the full path of the Tesseract program, or raise TesseractMissingError saying how to install it."""
    path = shutil.which(tesseract_cmd)
    if path is None:
        raise TesseractMissingError(
            f"the Tesseract OCR program {tesseract_cmd!r} (eval.tesseract_cmd) was not found on PATH; spelling "
            "evaluation needs it: install the tesseract-ocr package (Debian/Ubuntu: apt-get install tesseract-ocr, "
            "or run tools/setup_env.sh as root), or give the program's path: --set eval.tesseract_cmd=PATH for "
            "training, --tesseract PATH for tools/eval_text.py")
    return path


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


def glyph_upscale_factor(gray: np.ndarray, ocr_height: int, ocr_glyph_height: int) -> int:
    """The whole upscale factor for one dark-on-light gray image ``[H, W]``.

    With ``ocr_glyph_height`` > 0, the factor that brings the ink's height (:func:`ink_height`) closest to
    it, at most the one that brings the image to ``ocr_height``: Tesseract's LSTM reads glyphs of 30-50 px
    best, and enlarging a 32 px image 6x to 192 px makes 20 px digits 120 px tall, where it reads 7 as '/'.
    An image whose ink fills nearly all its rows (noise, no clear line) falls back to the ``ocr_height`` rule.
    """
    by_height = upscale_factor(gray.shape[0], ocr_height)
    if ocr_glyph_height <= 0:
        return by_height
    span = ink_height(gray)
    if span < 3 or span > 0.9 * gray.shape[0]:
        return by_height
    return max(1, min(by_height, round(ocr_glyph_height / span)))


@dataclass(frozen=True)
class Page:
    """One image as Tesseract sees it: the prepared ``image``, and the ``factor`` it was enlarged by and the
    ``margin`` (px, after enlarging) added around it, which map its pixels back to the ``size`` (width,
    height) of the image given."""

    image: Image.Image
    factor: int
    margin: int
    size: tuple[int, int]

    def to_given(self, box: tuple[int, int, int, int]) -> tuple[float, float, float, float]:
        """A box [left, top, right, bottom] in the prepared image's pixels, in the given image's, clipped to it."""
        width, height = self.size
        left, top, right, bottom = ((v - self.margin) / self.factor for v in box)
        return (min(max(left, 0.0), width), min(max(top, 0.0), height),
                min(max(right, 0.0), width), min(max(bottom, 0.0), height))


@dataclass(frozen=True)
class TsvWord:
    """One word of Tesseract's TSV: its text, confidence (0..100) and box [left, top, right, bottom] in the
    prepared page's pixels."""

    text: str
    conf: float
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class TesseractEngine:
    """Tesseract with its settings, named as the keys of the ``eval`` section that set them (docs/eval.md).

    ``psm`` is the page segmentation mode (7: one line); ``ocr_retry_psm`` > 0 reads images that came back
    empty once more in that mode; ``whitelist`` lists the only characters it may read ("" any); ``photo``
    prepares photographs instead of small renders and needs ``psm`` 3 or 11 and no whitelist.
    """

    tesseract_cmd: str = "tesseract"
    ocr_lang: str = "eng"
    psm: int = 7
    ocr_retry_psm: int = 0
    ocr_height: int = 192
    ocr_glyph_height: int = 0
    whitelist: str = ""
    ocr_binarize: bool = True
    ocr_timeout_s: float = 5.0
    photo: bool = False

    name = "tesseract"

    def __post_init__(self):
        if self.photo and self.psm not in PHOTO_PSMS:
            raise ValueError(f"Tesseract's photograph mode reads a page, not a line: give psm=11 (sparse text: signs, "
                             f"labels) or psm=3 (a page of text), not {self.psm}")
        if self.photo and self.ocr_retry_psm not in (0, *PHOTO_PSMS):
            raise ValueError(f"Tesseract's photograph mode retries in a page mode too: ocr_retry_psm 0 (none), 3 or "
                             f"11, not {self.ocr_retry_psm}")
        if self.photo and self.whitelist:
            raise ValueError(f"Tesseract's photograph mode reads any text; drop the whitelist {self.whitelist!r}")

    def version(self) -> str:
        """The program's version and language model, e.g. ``tesseract 5.3.0 (eng)``."""
        binary = find_tesseract(self.tesseract_cmd)
        try:
            result = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise TesseractMissingError(f"could not run Tesseract {binary!r} --version (eval.tesseract_cmd): {e}; "
                                        "install the tesseract-ocr package or point eval.tesseract_cmd at it") from None
        lines = (result.stdout or result.stderr).strip().splitlines()
        if result.returncode != 0 or not lines:
            raise TesseractError(f"{binary} --version exited with {result.returncode} and printed no version; check "
                                 "that eval.tesseract_cmd names the Tesseract program")
        return f"{lines[0].strip()} ({self.ocr_lang})"

    def read(self, images: Iterable[ImageLike], workers: int = 1, progress: bool = True) -> list[Reading]:
        """Read the text of each image (uint8 ``[H, W, 3]`` arrays or PIL images); one Reading per image, its
        lines with boxes in the image's pixels and confidences (mean of the words') in 0..1.

        ``workers`` Tesseract processes run side by side, each on chunks of 32 images. With
        ``ocr_retry_psm`` > 0, images read as empty are read once more in that page segmentation mode
        (one-line mode 7 returns nothing for about 4% of clean 32 px digit renders, which word mode 8 reads).
        """
        if workers < 1:
            raise ValueError(f"workers is {workers}; give at least 1 (--workers)")
        binary = find_tesseract(self.tesseract_cmd)
        images = list(images)
        chunks = [images[i:i + _CHUNK] for i in range(0, len(images), _CHUNK)]
        readings: list[Reading] = []
        with ThreadPoolExecutor(max_workers=workers) as pool, \
                tqdm(total=len(images), desc="ocr", unit="img", disable=not progress) as bar:
            for chunk_readings in pool.map(lambda chunk: _ocr_chunk(binary, chunk, self), chunks):
                readings.extend(chunk_readings)
                bar.update(len(chunk_readings))
            empty = [i for i, r in enumerate(readings) if not r.text.strip()]
            if self.ocr_retry_psm and empty:
                retry = replace(self, psm=self.ocr_retry_psm)
                again = [images[i] for i in empty]
                parts = [again[i:i + _CHUNK] for i in range(0, len(again), _CHUNK)]
                reread = [r for got in pool.map(lambda chunk: _ocr_chunk(binary, chunk, retry), parts) for r in got]
                for i, reading in zip(empty, reread):
                    readings[i] = reading
        return readings


def prepare(image: ImageLike, engine: TesseractEngine) -> Page:
    """The page Tesseract reads for one image, with the geometry that maps it back: an ``L`` image with a
    white margin of 1/8 of its longer side.

    Renders: dark text on light (the background is taken to be the median gray level, as text covers the
    minority of pixels; a dark background is inverted), upscaled by :func:`glyph_upscale_factor`, contrast
    stretched, Otsu-thresholded with ``engine.ocr_binarize``. Photographs (``engine.photo``): the gray image
    upscaled by :func:`upscale_factor` alone (docs/eval.md measures the choices on scene-text renders).
    """
    given = to_pil(image)
    gray = given.convert("L")
    if engine.photo:
        factor = upscale_factor(gray.height, engine.ocr_height)
    else:
        if np.median(np.asarray(gray)) < 128:
            gray = ImageOps.invert(gray)
        factor = glyph_upscale_factor(np.asarray(gray), engine.ocr_height, engine.ocr_glyph_height)
    if factor != 1:
        gray = gray.resize((gray.width * factor, gray.height * factor), Image.LANCZOS)
    if not engine.photo:
        gray = ImageOps.autocontrast(gray, cutoff=1)
        if engine.ocr_binarize:
            level = _otsu_threshold(np.asarray(gray))
            gray = gray.point(lambda v: 255 if v > level else 0)
    margin = max(gray.width, gray.height) // 8
    return Page(ImageOps.expand(gray, border=margin, fill=255), factor, margin, given.size)


def preprocess(image: ImageLike, engine: TesseractEngine) -> Image.Image:
    """The image Tesseract reads for ``image`` (see :func:`prepare`)."""
    return prepare(image, engine).image


def _tesseract_command(binary: str, list_file: Path, engine: TesseractEngine) -> list[str]:
    whitelist = ["-c", f"tessedit_char_whitelist={engine.whitelist}"] if engine.whitelist else []
    return [binary, str(list_file), "stdout", "--psm", str(engine.psm), "-l", engine.ocr_lang, *whitelist, "tsv"]


def parse_tsv(tsv: str, n_pages: int) -> list[list[list[TsvWord]]]:
    """Split Tesseract's TSV output over ``n_pages`` pages: per page, its lines in Tesseract's order, each the
    list of its words.

    Columns: level page_num block_num par_num line_num word_num left top width height conf text; level 5
    rows are words (a line is a (block, par, line) number), level 1 rows mark each page (so a page without
    words still shows up).
    """
    pages: dict[int, dict[tuple[str, str, str], list[TsvWord]]] = {}
    for line in tsv.splitlines()[1:]:
        cols = line.split("\t")
        if len(cols) < 12 or not cols[0].isdigit():
            continue
        page = pages.setdefault(int(cols[1]), {})
        if cols[0] == "5" and cols[11].strip():
            left, top, width, height = (int(c) for c in cols[6:10])
            word = TsvWord(cols[11].strip(), float(cols[10]), (left, top, left + width, top + height))
            page.setdefault((cols[2], cols[3], cols[4]), []).append(word)
    if sorted(pages) != list(range(1, n_pages + 1)):
        raise TesseractError(f"Tesseract returned pages {sorted(pages)[:5]}... for {n_pages} images")
    return [list(pages[number].values()) for number in range(1, n_pages + 1)]


def page_reading(lines: Sequence[Sequence[TsvWord]], page: Page) -> Reading:
    """The Reading of one page's TSV lines: words joined by spaces, lines by newlines; each line's box the
    union of its words' boxes in the given image's pixels, its confidence the mean of its words' / 100."""
    ocr_lines = []
    for words in lines:
        left, top, right, bottom = page.to_given((min(w.box[0] for w in words), min(w.box[1] for w in words),
                                                  max(w.box[2] for w in words), max(w.box[3] for w in words)))
        ocr_lines.append(OcrLine(" ".join(w.text for w in words),
                                 ((left, top), (right, top), (right, bottom), (left, bottom)),
                                 sum(w.conf for w in words) / len(words) / 100.0))
    return Reading("\n".join(line.text for line in ocr_lines),
                   tuple((w.text, w.conf) for words in lines for w in words), tuple(ocr_lines))


def _ocr_chunk(binary: str, images: Sequence[ImageLike], engine: TesseractEngine) -> list[Reading]:
    with tempfile.TemporaryDirectory(prefix="textdiff-ocr-") as tmp:
        paths, pages = [], []
        for i, image in enumerate(images):
            path = Path(tmp) / f"{i:05d}.png"
            pages.append(prepare(image, engine))
            pages[-1].image.save(path)
            paths.append(str(path))
        list_file = Path(tmp) / "pages.txt"
        list_file.write_text("\n".join(paths) + "\n", encoding="utf-8")
        # one thread per process: the workers already run processes side by side
        env = dict(os.environ, OMP_THREAD_LIMIT="1")
        try:
            result = subprocess.run(_tesseract_command(binary, list_file, engine), capture_output=True, env=env,
                                    timeout=engine.ocr_timeout_s * len(images) + 10)
        except OSError as e:
            raise TesseractMissingError(f"could not run Tesseract {binary!r} (eval.tesseract_cmd): {e}; install "
                                        "the tesseract-ocr package or point eval.tesseract_cmd at it") from None
        except subprocess.TimeoutExpired:
            raise TesseractError(f"Tesseract took longer than {engine.ocr_timeout_s} s per image on {len(images)} "
                                 "images; raise eval.ocr_timeout_s or check the machine's load") from None
    if result.returncode != 0:
        raise TesseractError(f"Tesseract {binary} exited with {result.returncode}: "
                             f"{result.stderr.decode('utf-8', 'replace').strip()[-800:]}; "
                             f"check eval.ocr_lang={engine.ocr_lang!r} is installed (tesseract --list-langs)")
    lines = parse_tsv(result.stdout.decode("utf-8", "replace"), len(images))
    return [page_reading(page_lines, page) for page_lines, page in zip(lines, pages)]


def check_tesseract(tesseract_cmd: str = "tesseract", **settings) -> None:
    """Raise TesseractMissingError, saying how to install it, unless the program ``tesseract_cmd`` is found;
    the engine's other ``settings`` play no part."""
    find_tesseract(tesseract_cmd)
