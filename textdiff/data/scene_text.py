"""A SynthText-style test set: words in many fonts over real photographs, with exact ground truth.

Scene ``index`` is a pure function of a generator seeded by (seed, index) (:func:`scene_rng`), so any number
of workers can render a set, and a rerun resumes it. :func:`render_scene` crops a photograph, draws 1-3 lines
in one font, size, colour and tilt, puts them where the photograph is calmest among a few candidates, and
colours them at least ``MIN_CONTRAST`` in luminance away from the photograph (its 10th and 90th percentiles)
under every line box. Ground truth per line: the box of every pixel its ink changes ([l, t, r, b],
right/bottom exclusive) and its level ink box turned with the text (a quadrilateral); the safebox is the
union of the boxes. Assets are fixed lists from Debian packages (tools/setup_env.sh installs them), or
``backgrounds=DIR``.

textdiff/data/scene_text_set.py writes a set of them into a folder.
"""

from __future__ import annotations

import colorsys
import math
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFont

from textdiff.data.sources import IMAGE_SUFFIXES, to_rgb, upright
from textdiff.data.synthetic import luma

SETUP_HINT = "(tools/setup_env.sh does as root)"
WORDS_PATH = Path("/usr/share/dict/american-english")  # Debian package wamerican
WORD_PATTERN = re.compile(r"[A-Za-z]{2,12}")  # plain ASCII letters: no possessives, accents or long words
FONT_ROOT = Path("/usr/share/fonts")
# package -> a file it installs under FONT_ROOT; the folders of these files are scanned for fonts.
FONT_PACKAGES = {
    "fonts-dejavu-core": "truetype/dejavu/DejaVuSans.ttf",
    "fonts-dejavu-extra": "truetype/dejavu/DejaVuSerifCondensed.ttf",
    "fonts-liberation2": "truetype/liberation2/LiberationSerif-Regular.ttf",
    "fonts-freefont-ttf": "truetype/freefont/FreeSerif.ttf",
    "fonts-urw-base35": "opentype/urw-base35/NimbusSansNarrow-Regular.otf",
    "fonts-crosextra-carlito": "truetype/crosextra/Carlito-Regular.ttf",
    "fonts-crosextra-caladea": "truetype/crosextra/Caladea-Regular.ttf",
    "fonts-roboto-unhinted": "truetype/roboto/unhinted/RobotoCondensed-Regular.ttf",
    "fonts-roboto-slab": "opentype/roboto/slab/RobotoSlab-Regular.otf",
    "fonts-open-sans": "truetype/open-sans/OpenSans-Regular.ttf",
    "fonts-lato": "truetype/lato/Lato-Regular.ttf",
    "fonts-ebgaramond": "opentype/ebgaramond/EBGaramond12-Regular.otf",
    "fonts-cantarell": "opentype/cantarell/Cantarell-Regular.otf",
    "fonts-comfortaa": "truetype/comfortaa/Comfortaa-Regular.ttf",
}
FONT_KINDS = {
    "serif": ("C059", "Caladea", "DejaVu Serif", "EB Garamond", "FreeSerif", "Liberation Serif", "Nimbus Roman",
              "P052", "Roboto Slab", "URW Bookman"),
    "sans": ("Cantarell", "Carlito", "Comfortaa", "DejaVu Sans", "FreeSans", "Lato", "Liberation Sans", "Nimbus Sans",
             "Nimbus Sans Narrow", "Open Sans", "Open Sans Condensed", "Roboto", "Roboto Condensed", "URW Gothic"),
    "mono": ("DejaVu Sans Mono", "FreeMono", "Liberation Mono", "Nimbus Mono PS"),
    "script": ("Z003",),
}
# Fonts whose letters are not the Latin alphabet, and weights too faint to count as ink on a photograph.
NON_TEXT_FAMILIES = ("D050000L", "Standard Symbols PS", "DejaVu Math TeX Gyre")
FAINT_STYLES = ("Thin", "Hairline", "ExtraLight")
BOLD_STYLES = ("Bold", "Black", "Heavy", "Demi", "Extrabold", "Semibold")
PHOTO_ROOT = Path("/usr/share/backgrounds")
# (package, folder under PHOTO_ROOT, its photographs; None: every .jpg in the folder). The other wallpaper
# packages of Debian 12 hold mostly abstract art; these 27 files are all photographs of scenes.
PHOTO_PACKAGES: tuple[tuple[str, str, Optional[tuple[str, ...]]], ...] = (
    ("lomiri-wallpapers-16.04", "", tuple(f"{n}.jpg" for n in (
        "Bridge_by_Sander_Klootwijk Dragonfly_by_Bolly Picture_0B_by_freespace Picture_1A_by_freespace "
        "Wine_by_Jakkub_Mede aitzgorri_by_Aitzol_Berasategi analogpattern_by_Peter_Nerlich free_by_Peter_Nerlich "
        "friends_by_Aitzol_Berasategi greentock_by_Peter_Nerlich life_by_Aitzol_Berasategi "
        "picosdeeuropa_by_Aitzol_Berasategi seeding_by_Clements_Engelhardt sunset_by_Aitzol_Berasategi "
        "umang_by_Abhishek_Mudgal").split())),
    ("mate-backgrounds", "mate/nature", None),
)
MIN_SIZE = 64  # px: smaller images leave no room for a line of 12 px letters
PHOTO_ZOOM = 3.0  # photographs are kept with a short side of at most this many output sides: crops zoom 1-3x
MIN_FONT_PX, MIN_FONT_FRAC, MAX_FONT_FRAC = 12, 0.05, 0.2  # font size (em) bounds; fractions of the side
MAX_ANGLE_DEG = 5.0
MARGIN_PX = 4  # between the turned text block and the image edge
# Luminance (0..255) difference of the text colour from both quantiles of the photograph under each line
# box: at least 90% of the photograph there differs from the text by this much.
MIN_CONTRAST = 64.0
CONTRAST_QUANTILES = (0.1, 0.9)
PLACEMENT_CANDIDATES = 6  # block positions tried per scene; the calmest (lowest luminance spread) wins
TRIES = 30  # draws of crop, words and font before a scene is given up


class SceneTextError(ValueError):
    """An asset or argument is missing or wrong; the message names it and what to do."""


@dataclass(frozen=True)
class FontFace:
    """One font file: ``name`` is family and style; ``kind`` serif, sans, mono, script (or other)."""

    path: str
    name: str
    family: str
    kind: str
    bold: bool
    condensed: bool


@dataclass(frozen=True)
class SceneAssets:
    """What scenes are made of: font faces, background photograph paths and words (each sorted)."""

    fonts: tuple[FontFace, ...]
    backgrounds: tuple[str, ...]
    words: tuple[str, ...]


@dataclass(frozen=True)
class TextLayout:
    """A text block before colouring: ``lines`` are (text, x, baseline y) of level text in output pixels
    (anchor "ls"), turned ``angle_deg`` counter-clockwise about ``center``."""

    face: FontFace
    size_px: int
    lines: tuple[tuple[str, int, int], ...]
    center: tuple[float, float]
    angle_deg: float


@dataclass(frozen=True)
class SceneLine:
    """Ground truth of one line: ``box`` [l, t, r, b] (right/bottom exclusive) encloses every pixel its ink
    changes; ``polygon`` is its level ink box turned with the text, 4 (x, y) corners clockwise from top-left."""

    text: str
    box: tuple[int, int, int, int]
    polygon: tuple[tuple[float, float], ...]
    font: str
    size_px: int


@dataclass
class SceneSample:
    """One scene: ``image`` RGB size x size, ``background`` the same crop without text, ``lines`` in reading
    order (none: text-free), ``colour`` and ``layout`` of the text."""

    image: Image.Image
    background: Image.Image
    background_name: str
    lines: tuple[SceneLine, ...] = ()
    colour: Optional[tuple[int, int, int]] = None
    layout: Optional[TextLayout] = None

    @property
    def transcription(self) -> str:
        return "\n".join(line.text for line in self.lines)

    @property
    def safebox(self) -> Optional[list[int]]:
        """The union [l, t, r, b] of the line boxes; None for a text-free scene."""
        boxes = [line.box for line in self.lines]
        return [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes),
                max(b[3] for b in boxes)] if boxes else None


def find_fonts(root: Path = FONT_ROOT) -> tuple[FontFace, ...]:
    """The text faces of ``FONT_PACKAGES`` under ``root``, sorted by path; raises SceneTextError naming every
    package that is not installed."""
    missing = [package for package, marker in FONT_PACKAGES.items() if not (root / marker).is_file()]
    if missing:
        raise SceneTextError(f"fonts missing under {root}: install {' '.join(missing)} {SETUP_HINT}")
    faces = []
    for folder in sorted({(root / marker).parent for marker in FONT_PACKAGES.values()}):
        for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".ttf", ".otf")):
            family, style = ImageFont.truetype(str(path), 12).getname()
            if family in NON_TEXT_FAMILIES or any(s in style for s in FAINT_STYLES):
                continue
            kind = next((k for k, families in FONT_KINDS.items() if family in families), "other")
            faces.append(FontFace(str(path), f"{family} {style}", family, kind, any(b in style for b in BOLD_STYLES),
                                  any(w in f"{family} {style}" for w in ("Condensed", "Narrow"))))
    return tuple(faces)


def find_backgrounds(folder: Optional[str | Path] = None) -> tuple[str, ...]:
    """Sorted paths of background photographs: every image below ``folder``, or (None) the photographs of
    ``PHOTO_PACKAGES``; raises SceneTextError naming the folder or the packages to install."""
    if folder is not None:
        folder = Path(folder)
        if not folder.is_dir():
            raise SceneTextError(f"backgrounds folder {folder} does not exist; pass a folder of photographs")
        found = sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not found:
            raise SceneTextError(f"backgrounds folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                                 "add photographs or pass another folder")
        return tuple(found)
    found, missing = [], []
    for package, sub, names in PHOTO_PACKAGES:
        paths = [PHOTO_ROOT / sub / n for n in names] if names else sorted((PHOTO_ROOT / sub).glob("*.jpg"))
        if not paths or not all(p.is_file() for p in paths):
            missing.append(package)
        found += [str(p) for p in paths]
    if missing:
        raise SceneTextError(f"background photographs missing under {PHOTO_ROOT}: install {' '.join(missing)} "
                             f"{SETUP_HINT}, or pass backgrounds=DIR (--backgrounds DIR)")
    return tuple(sorted(found))


def load_words(path: Optional[str | Path] = None) -> tuple[str, ...]:
    """The words of a word list (one a line; default Debian's wamerican) made of 2-12 plain ASCII letters."""
    path = Path(path) if path is not None else WORDS_PATH
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise SceneTextError(f"word list {path} not found: install wamerican {SETUP_HINT}, or pass words=PATH "
                             "(--words PATH), one word a line") from None
    words = tuple(sorted({w for w in text.split() if WORD_PATTERN.fullmatch(w)}))
    if not words:
        raise SceneTextError(f"word list {path} has no word of 2-12 ASCII letters; pass another --words")
    return words


def load_assets(backgrounds: Optional[str | Path] = None, words: Optional[str | Path] = None) -> SceneAssets:
    """Fonts, background photographs and words, each checked (SceneTextError) before any rendering."""
    return SceneAssets(find_fonts(), find_backgrounds(backgrounds), load_words(words))


@lru_cache(maxsize=64)
def load_photo(path: str, size: int) -> Image.Image:
    """Photograph ``path`` upright, RGB, shrunk to a short side of at most ``PHOTO_ZOOM * size``."""
    short = round(PHOTO_ZOOM * size)
    try:
        image = Image.open(path)
        image.draft("RGB", (short, short))  # JPEG: decode at a reduced scale, still >= short (much faster)
        image = to_rgb(upright(image)[0])
        image.load()
    except Exception as e:  # Pillow raises many types for garbage input
        raise SceneTextError(f"background {path} is not a readable image ({type(e).__name__}: {e}); remove it "
                             "or pass another --backgrounds folder") from None
    factor = short / min(image.size)
    if factor < 1:
        image = image.resize((round(image.width * factor), round(image.height * factor)), Image.LANCZOS)
    return image


def random_crop(rng: random.Random, photo: Image.Image, size: int) -> Image.Image:
    """A square crop of ``photo`` (side log-uniform between ``size`` and its short side) resized to
    ``size`` x ``size``, mirrored half of the time."""
    short = min(photo.size)
    side = math.exp(rng.uniform(math.log(min(size, short)), math.log(short)))
    x, y = rng.uniform(0, photo.width - side), rng.uniform(0, photo.height - side)
    crop = photo.resize((size, size), Image.BILINEAR, box=(x, y, x + side, y + side))
    return crop.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


@lru_cache(maxsize=256)
def _font(path: str, px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, px, layout_engine=ImageFont.Layout.BASIC)  # the same glyphs with or without raqm


def _draw_lines(rng: random.Random, words: Sequence[str]) -> list[str]:
    case = rng.choices((str.lower, str.title, str.upper), weights=(0.45, 0.3, 0.25))[0]
    return [case(" ".join(rng.choice(words) for _ in range(rng.choice((1, 1, 2, 2, 3)))))
            for _ in range(rng.randint(1, 3))]


def _turn(x: float, y: float, center: tuple[float, float], angle_deg: float) -> tuple[float, float]:
    """(x, y) turned ``angle_deg`` counter-clockwise on screen (y down) about ``center``, as Image.rotate does."""
    a = math.radians(angle_deg)
    dx, dy = x - center[0], y - center[1]
    return center[0] + dx * math.cos(a) + dy * math.sin(a), center[1] - dx * math.sin(a) + dy * math.cos(a)


def draw_layout(rng: random.Random, size: int, assets: SceneAssets, background_luma: np.ndarray
                ) -> Optional[TextLayout]:
    """Words, font, size, alignment, tilt and position of a text block in a ``size`` px image, placed where
    ``background_luma`` ([size, size]) varies least among ``PLACEMENT_CANDIDATES`` positions; None when the
    words drawn do not fit even at the smallest font."""
    texts = _draw_lines(rng, assets.words)
    family = rng.choice(sorted({f.family for f in assets.fonts}))  # families equally often, whatever their faces
    face = rng.choice([f for f in assets.fonts if f.family == family])
    min_px = max(MIN_FONT_PX, round(MIN_FONT_FRAC * size))
    px = round(math.exp(rng.uniform(math.log(min_px), math.log(max(min_px, MAX_FONT_FRAC * size)))))
    align, spacing = rng.choice(("left", "center", "right")), rng.uniform(0.95, 1.2)
    angle = rng.uniform(-MAX_ANGLE_DEG, MAX_ANGLE_DEG)
    cos, sin = abs(math.cos(math.radians(angle))), abs(math.sin(math.radians(angle)))
    room = size - 2 * MARGIN_PX - 2  # bicubic turning spreads ink by up to 2 px
    while True:
        font = _font(face.path, px)
        pitch = max(1, round(sum(font.getmetrics()) * spacing))
        boxes = [font.getbbox(t, anchor="ls") for t in texts]
        width = max(r - l for l, _, r, _ in boxes)
        xs = [{"left": 0, "center": (width - r + l) // 2, "right": width - r + l}[align] - l for l, _, r, _ in boxes]
        top = min(t + i * pitch for i, (_, t, _, _) in enumerate(boxes))
        bottom = max(b + i * pitch for i, (_, _, _, b) in enumerate(boxes))
        height = bottom - top
        extent = (max(width, width * cos + height * sin), max(height, width * sin + height * cos))
        if max(extent) <= room:
            break
        if px == min_px:
            return None
        px = max(min_px, min(px - 1, math.floor(px * room / max(extent))))
    half_w, half_h = extent[0] / 2, extent[1] / 2
    candidates = [(rng.uniform(MARGIN_PX + half_w, size - MARGIN_PX - half_w),
                   rng.uniform(MARGIN_PX + half_h, size - MARGIN_PX - half_h)) for _ in range(PLACEMENT_CANDIDATES)]
    cx, cy = min(candidates, key=lambda c: float(background_luma[round(c[1] - half_h):round(c[1] + half_h),
                                                                 round(c[0] - half_w):round(c[0] + half_w)].std()))
    dx, dy = round(cx - width / 2), round(cy - (top + bottom) / 2)
    lines = tuple((t, dx + x, dy + i * pitch) for i, (t, x) in enumerate(zip(texts, xs)))
    return TextLayout(face, px, lines, (dx + width / 2, dy + (top + bottom) / 2), angle)


def line_masks(layout: TextLayout, size: int) -> list[tuple[Image.Image, tuple[int, int, int, int]]]:
    """Per line: its ink as an "L" coverage mask [size, size] (turned) and its level ink box [l, t, r, b]."""
    font = _font(layout.face.path, layout.size_px)
    masks = []
    for text, x, y in layout.lines:
        mask = Image.new("L", (size, size), 0)
        ImageDraw.Draw(mask).text((x, y), text, fill=255, font=font, anchor="ls")
        level = mask.getbbox()
        if layout.angle_deg:
            mask = mask.rotate(layout.angle_deg, resample=Image.BICUBIC, center=layout.center)
        masks.append((mask, level))
    return masks


def paint_text(background: Image.Image, layout: TextLayout, colour: tuple[int, int, int],
               masks: Optional[list[tuple[Image.Image, tuple[int, int, int, int]]]] = None
               ) -> tuple[Image.Image, list[SceneLine]]:
    """``background`` with the layout's text in ``colour``, and each line's ground truth (``masks``: the
    layout's :func:`line_masks`, when already made)."""
    masks = masks or line_masks(layout, background.width)
    ink, lines = masks[0][0], []
    for (mask, (l, t, r, b)), (text, _, _) in zip(masks, layout.lines):
        ink = ImageChops.lighter(ink, mask)
        corners = [_turn(x, y, layout.center, layout.angle_deg) for x, y in ((l, t), (r, t), (r, b), (l, b))]
        lines.append(SceneLine(text, mask.getbbox(), tuple((round(x, 2), round(y, 2)) for x, y in corners),
                               layout.face.name, layout.size_px))
    return Image.composite(Image.new("RGB", background.size, colour), background, ink), lines


def background_levels(grey: np.ndarray) -> tuple[float, float]:
    """The ``CONTRAST_QUANTILES`` of the background luminance under a box: ``grey`` [h, w] in 0..255."""
    low, high = np.quantile(grey, CONTRAST_QUANTILES)
    return float(low), float(high)


def text_colour(rng: random.Random, lumas: Sequence[float]) -> Optional[tuple[int, int, int]]:
    """A random colour whose luminance is at least ``MIN_CONTRAST`` from each of ``lumas`` (the
    :func:`background_levels` under each line box), or None when no luminance is."""
    sides = [(0.0, min(lumas) - MIN_CONTRAST - 1)] if min(lumas) - MIN_CONTRAST - 1 >= 0 else []
    sides += [(max(lumas) + MIN_CONTRAST + 1, 255.0)] if max(lumas) + MIN_CONTRAST + 1 <= 255 else []
    if not sides:
        return None
    target = rng.uniform(*rng.choice(sides))
    saturation = rng.uniform(0.0, 0.15) if rng.random() < 0.5 else rng.uniform(0.3, 1.0)
    base = np.array(colorsys.hsv_to_rgb(rng.random(), saturation, 1.0)) * 255.0
    level = luma(tuple(base))
    # luminance is linear in RGB: scale towards black, or mix towards white, to hit the target exactly
    rgb = base * target / level if target <= level else base + (255.0 - base) * (target - level) / (255.0 - level)
    colour = tuple(int(v) for v in np.clip(np.round(rgb), 0, 255))
    return colour if all(abs(luma(colour) - v) >= MIN_CONTRAST for v in lumas) else None


def render_scene(rng: random.Random, size: int, assets: SceneAssets, text_free: bool = False) -> SceneSample:
    """One ``size`` x ``size`` scene: a crop of a background photograph with 1-3 lines of words (none when
    ``text_free``); raises SceneTextError when ``TRIES`` draws found no text that fits with contrast."""
    for _ in range(TRIES):
        name = rng.choice(assets.backgrounds)
        background = random_crop(rng, load_photo(name, size), size)
        if text_free:
            return SceneSample(background, background, name)
        grey = np.asarray(background, dtype=np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        layout = draw_layout(rng, size, assets, grey)
        if layout is None:
            continue
        masks = line_masks(layout, size)
        boxes = [mask.getbbox() for mask, _ in masks]
        colour = text_colour(rng, [v for l, t, r, b in boxes for v in background_levels(grey[t:b, l:r])])
        if colour is not None:
            image, lines = paint_text(background, layout, colour, masks)
            return SceneSample(image, background, name, tuple(lines), colour, layout)
    raise SceneTextError(f"no text fitted a {size} px scene with contrast in {TRIES} draws; use a larger --size "
                         "or a word list with shorter words")


def scene_rng(seed: int, index: int) -> random.Random:
    """The generator of scene ``index`` under ``seed``: independent of how many workers render."""
    return random.Random(f"textdiff-scene-text:{seed}:{index}")


def scene_record(key: str, sample: SceneSample) -> dict:
    """The ``lines.jsonl`` object of a scene."""
    lines = [{"text": line.text, "box": list(line.box), "polygon": [list(p) for p in line.polygon],
              "font": line.font, "size_px": line.size_px} for line in sample.lines]
    return {"key": key, "lines": lines, "safebox": sample.safebox, "text_free": not sample.lines}


