"""Which OCR boxes are text, and which images an annotation keeps: the filters of tools/annotate.py and
their presets.

Each box an engine returns is one of three things (:func:`box_kind`):

- ``noise``: not text at all. Textured photographs (foliage, gravel, fabric) make detectors fire, and the
  recogniser then reads a single character, punctuation or a stray CJK glyph at low confidence; on 100
  text-free scene-text photographs PP-OCR returned 27 such boxes: 24 single characters, all below 0.66, and
  3 longer strings, all below 0.28 (docs/annotate.md). Noise is dropped before anything else: an image of
  noise alone is text-free.
- ``unreadable``: text that is there but read below ``min_confidence``. Its image cannot be called
  text-free, and its transcription would be a guess: the image is skipped (``unreadable: "drop"``), kept
  with the text as read (``"keep"``), or kept with its unreadable lines left out of the transcription and
  their boxes listed for the training loss to mask (``"mask"``, as AnyText masks its invalid lines; an image
  with no readable line is skipped, as under "drop"), and counted each way.
- ``text``: read at ``min_confidence`` or above.

The image-level filters then skip images whose text is too small, too many lines, too much of the image,
or (``text_free: "drop"``) images without text; every skip has a reason, counted in summary.json. Filters
are applied when the outputs are written, not when the images are read, so a rerun with other filters
re-uses the OCR of a finished run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Optional, Sequence

UNREADABLE_CHOICES = ("drop", "keep", "mask")
TEXT_FREE_CHOICES = ("keep", "drop")


@dataclass(frozen=True)
class AnnotationFilters:
    """The filters (flags of tools/annotate.py, same names with dashes). Sizes are of the image as read
    (upright, in stored pixels); 0 turns a size filter off."""

    min_confidence: float = 0.5  # a box read below this is unreadable text (PaddleOCR's drop_score)
    noise_confidence: float = 0.3  # a box read below this is no text at all
    single_char_confidence: float = 0.9  # a box of one character or of punctuation alone is text only from here
    # an image with unreadable text: "drop" it, "keep" its lines as read, or "mask" them: left out of the
    # transcription, their boxes written to unreadable.json (make_shards --unreadable, data.mask_unreadable)
    unreadable: str = "drop"
    text_free: str = "keep"  # an image without text: "keep" it (transcription ""), or "drop" it
    max_lines: int = 0  # skip images with more lines than this (0: any number)
    min_text_height_px: float = 6.0  # skip images where a line's ink is shorter than this many pixels
    min_text_height_frac: float = 0.0  # ... or shorter than this share of the image's shorter side
    min_char_area_frac: float = 0.0  # ... or whose characters (ink box / characters) cover less of the image
    min_image_side: int = 0  # skip images whose shorter side is below this (px)
    max_text_area_frac: float = 1.0  # skip images whose safebox covers more than this share of the image

    def validate(self) -> None:
        """Raise ValueError naming the flag that is out of range."""
        for name in ("min_confidence", "noise_confidence", "single_char_confidence", "min_text_height_frac",
                     "min_char_area_frac", "max_text_area_frac"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{_flag(name)} {getattr(self, name)} must lie in 0..1")
        for name in ("max_lines", "min_text_height_px", "min_image_side"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{_flag(name)} {getattr(self, name)} must be >= 0 (0 turns it off)")
        if self.noise_confidence > self.min_confidence:
            raise ValueError(f"--noise-confidence {self.noise_confidence} is above --min-confidence "
                             f"{self.min_confidence}: a box cannot be noise yet readable; lower it")
        if self.unreadable not in UNREADABLE_CHOICES:
            raise ValueError(f"--unreadable {self.unreadable!r}: choose {', '.join(UNREADABLE_CHOICES[:-1])} or "
                             f"{UNREADABLE_CHOICES[-1]}")
        if self.text_free not in TEXT_FREE_CHOICES:
            raise ValueError(f"--text-free {self.text_free!r}: choose {' or '.join(TEXT_FREE_CHOICES)}")

    def to_json(self) -> dict:
        return asdict(self)


def _flag(name: str) -> str:
    return name.replace("_", "-")


# Named starting points; any flag given beside --preset overrides the preset's value.
PRESETS: dict[str, AnnotationFilters] = {
    # what docs/annotate.md measures: drop noise and unreadable images, keep text-free ones
    "default": AnnotationFilters(),
    # GlyphDraw's strict selection of text images: every box read at 0.9 or above, 1-3 lines, characters
    # large enough to learn glyphs from (each at least 0.1% of the image: 8 x 8 px at 256 px), no text-free
    # images and no image that is mostly text (a document page or a screenshot)
    "glyphdraw": AnnotationFilters(min_confidence=0.9, single_char_confidence=0.95, text_free="drop", max_lines=3,
                                   min_text_height_px=8.0, min_char_area_frac=0.001, max_text_area_frac=0.8),
    # keep as much as can be read: lower thresholds, unreadable lines kept as read, no size filters
    "permissive": AnnotationFilters(min_confidence=0.3, noise_confidence=0.1, single_char_confidence=0.5,
                                    unreadable="keep", min_text_height_px=0.0),
}


def make_filters(preset: str = "default", **overrides) -> AnnotationFilters:
    """The filters of ``preset`` with the ``overrides`` that are not None; ValueError names an unknown preset
    or a value out of range."""
    if preset not in PRESETS:
        raise ValueError(f"--preset {preset!r} is unknown; choose one of {', '.join(PRESETS)}")
    known = {f.name for f in fields(AnnotationFilters)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"no filter {unknown[0]!r}; the filters are {', '.join(sorted(known))}")
    filters = replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
    filters.validate()
    return filters


def visible_chars(text: str) -> int:
    """Letters, digits and other word characters in ``text`` (punctuation, symbols and spaces not counted)."""
    return sum(1 for c in text if c.isalnum())


def box_kind(text: str, confidence: float, filters: AnnotationFilters) -> str:
    """``"noise"``, ``"unreadable"`` or ``"text"`` for a box read as ``text`` with ``confidence`` (module doc)."""
    if confidence < filters.noise_confidence:
        return "noise"
    if visible_chars(text) <= 1 and confidence < filters.single_char_confidence:
        return "noise"
    return "text" if confidence >= filters.min_confidence else "unreadable"


@dataclass(frozen=True)
class LineFacts:
    """What the image filters need of one line: its text and its ink box [l, t, r, b]."""

    text: str
    box: Sequence[float]


def image_skip(lines: Sequence[LineFacts], width: int, height: int, safebox: Optional[Sequence[float]],
               filters: AnnotationFilters) -> Optional[tuple[str, str]]:
    """``(kind, reason)`` when the image filters skip an image of ``width`` x ``height`` with ``lines``
    (after noise is dropped; under ``unreadable: "mask"`` the readable ones, those the transcription holds)
    and ``safebox``; None when it is kept."""
    if filters.min_image_side and min(width, height) < filters.min_image_side:
        return "too_small", f"shorter side {min(width, height)} px is below --min-image-side {filters.min_image_side}"
    if not lines:
        if filters.text_free == "drop":
            return "text_free_dropped", "no text found (--text-free drop)"
        return None
    if filters.max_lines and len(lines) > filters.max_lines:
        return "too_many_lines", f"{len(lines)} lines exceed --max-lines {filters.max_lines}"
    short = min(width, height)
    for line in lines:
        ink_height = line.box[3] - line.box[1]
        if ink_height < filters.min_text_height_px:
            return "text_too_small", (f"line {line.text!r} is {ink_height:.0f} px high, below --min-text-height-px "
                                      f"{filters.min_text_height_px:g}")
        if ink_height < filters.min_text_height_frac * short:
            return "text_too_small", (f"line {line.text!r} is {ink_height / short:.3f} of the shorter side high, "
                                      f"below --min-text-height-frac {filters.min_text_height_frac:g}")
        chars = max(1, visible_chars(line.text))
        char_area = (line.box[2] - line.box[0]) * ink_height / chars / (width * height)
        if char_area < filters.min_char_area_frac:
            return "text_too_small", (f"characters of line {line.text!r} cover {char_area:.4f} of the image each, "
                                      f"below --min-char-area-frac {filters.min_char_area_frac:g}")
    if safebox is not None:
        area = (safebox[2] - safebox[0]) * (safebox[3] - safebox[1]) / (width * height)
        if area > filters.max_text_area_frac:
            return "text_too_large", (f"the text covers {area:.2f} of the image, above --max-text-area-frac "
                                      f"{filters.max_text_area_frac:g}")
    return None
