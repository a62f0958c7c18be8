"""What every OCR engine returns, and how textdiff finds an engine by name.

An engine reads a batch of images and returns one :class:`Reading` per image: the text lines it found in
reading order (top to bottom, left to right), each with its polygon in the pixels of the image it was given
and a confidence in 0..1, plus the words with Tesseract-style confidences in 0..100 that the spelling
evaluation's false-text rule reads (:func:`textdiff.eval.metrics.shows_text`). ``Reading.text`` joins the
lines with newlines, as the research code reads a ``.txt``.

Engines are registered by name (:func:`register_engine`); textdiff registers ``tesseract`` and ``ppocr``
(textdiff/ocr/__init__.py). A user adds docTR, EasyOCR or PaddleOCR by registering a factory that takes that
engine's keyword settings and returns an object with ``name``, ``version()`` and ``read(images, workers,
progress)``, and optionally a check of the same settings that says what to install (:func:`check_engine`).
Failures are OcrError (the engine ran and failed) or OcrMissingError (it cannot run), whatever the engine, so
a caller catches any engine's with those two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Protocol, Sequence, Union

import numpy as np
from PIL import Image

ImageLike = Union[Image.Image, np.ndarray]
Point = tuple[float, float]


class OcrError(RuntimeError):
    """An OCR engine ran but failed, or returned output that does not fit the images given to it."""


class OcrMissingError(RuntimeError):
    """An OCR engine's program or package is not installed; the message says how to install it."""


@dataclass(frozen=True)
class OcrLine:
    """One text line: its ``text``, ``polygon`` (corners clockwise from the top left, image pixels) and the
    engine's ``confidence`` in 0..1 (for Tesseract, the mean of its words')."""

    text: str
    polygon: tuple[Point, ...]
    confidence: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        """The axis-aligned rectangle [left, top, right, bottom] around the polygon."""
        xs, ys = [p[0] for p in self.polygon], [p[1] for p in self.polygon]
        return min(xs), min(ys), max(xs), max(ys)


@dataclass(frozen=True)
class Reading:
    """What an engine read in one image: ``text`` (words joined by spaces, lines by newlines), each word with
    its confidence in 0..100, and the lines with their polygons (empty where an engine gives no boxes)."""

    text: str
    words: tuple[tuple[str, float], ...] = ()
    lines: tuple[OcrLine, ...] = ()


def reading_of_lines(lines: Sequence[OcrLine]) -> Reading:
    """The Reading of ``lines`` already in reading order: text joined by newlines, each line's words at its
    confidence x 100 (an engine that scores lines, not words)."""
    words = tuple((w, 100.0 * line.confidence) for line in lines for w in line.text.split())
    return Reading("\n".join(line.text for line in lines), words, tuple(lines))


class OcrEngine(Protocol):
    """An OCR engine as textdiff calls it."""

    name: str

    def version(self) -> str:
        """The engine and model versions, recorded with every annotation and evaluation."""

    def read(self, images: Iterable[ImageLike], workers: int = 1, progress: bool = True) -> list[Reading]:
        """One Reading per image (uint8 ``[H, W, 3]`` arrays or PIL images), in order."""


EngineFactory = Callable[..., OcrEngine]  # keyword settings of that engine -> engine
EngineCheck = Callable[..., None]  # the same settings -> None, or OcrMissingError naming what to install


@dataclass(frozen=True)
class _Entry:
    factory: EngineFactory
    check: Optional[EngineCheck]


_ENGINES: dict[str, _Entry] = {}


def register_engine(name: str, factory: EngineFactory, check: Optional[EngineCheck] = None) -> None:
    """Make ``factory`` the engine called ``name`` (``--engine NAME``, ``eval.ocr_engine=NAME``).

    ``check``, given the same keyword settings, raises OcrMissingError naming what to install when the engine's
    program or package is absent, without loading the engine (so a run can refuse to start in a second).
    """
    _ENGINES[name] = _Entry(factory, check)


def engine_names() -> list[str]:
    """The registered engines' names, sorted."""
    return sorted(_ENGINES)


def _entry(name: str) -> _Entry:
    if name not in _ENGINES:
        raise ValueError(f"OCR engine {name!r} is unknown; choose one of {', '.join(engine_names())} (or register "
                         "one with textdiff.ocr.register_engine)")
    return _ENGINES[name]


def check_engine(name: str, **settings) -> None:
    """Raise OcrMissingError, naming what to install, when engine ``name`` cannot run with ``settings``; a
    ValueError names the choices for an unknown engine. An engine registered without a check passes."""
    check = _entry(name).check
    if check is not None:
        check(**settings)


def make_engine(name: str, **settings) -> OcrEngine:
    """The engine called ``name`` built with its keyword ``settings`` (each engine documents its own); a
    ValueError names the choices for an unknown engine."""
    return _entry(name).factory(**settings)


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
