"""The built-in demo data set: random words drawn with Pillow's bundled font over varied backgrounds.

Every image is a pure function of a ``random.Random``: :func:`draw_scene` draws everything random about
an image (background, words, font size, colour, rotation, position, px scale) into a :class:`Scene`, and
:func:`paint` turns a scene into pixels. :func:`render_sample` does both and adds the captions.

Legibility comes first, because the spelling evaluator (textdiff/eval) treats these renders as the best
OCR can do: backgrounds keep to one luminance band (light or dark) and the text takes a colour from the
other band, rotations stay within +-8 degrees, the font size is at least 21% of the image side, and shapes
keep off the text. Measured: Tesseract with the eval defaults (4x upscale, one-line mode) reads 91% of
300 held-out renders at 64 px exactly (mean CER 0.064).

Some images are drawn smaller and enlarged with nearest-neighbour resampling, as upsampled web images are;
their ``px_scale`` (stored size / drawn size, > 1) tells the crops not to zoom in further. Nearest-neighbour
copies pixels, so the safebox stays exact: it is the bounding box of the ink mask enlarged the same way.

``TRAIN_WORDS`` and ``HELDOUT_WORDS`` are disjoint, so evaluation prompts made from ``HELDOUT_WORDS`` never
appear in shards written by :func:`synthetic_sample`.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont

TRAIN_WORDS: tuple[str, ...] = tuple("""
able acid aged also area army away baby back bake ball band bank barn base bath bead bear beat bell belt
bend best bike bird blow blue boat body bold bone book boot born boss bowl brave bread brick bride brown
build burn bush busy cake calm camp card care cart case cash cast cave cell chair chalk cheap chess chief
child city clay clean clock cloud coal coast coat code coin cold cook cool copy corn cost crew crop crow
cup cure dark dash date dawn deal deep deer desk dial dice dish dive dock door dove down draw dream dress
drum duck dust each earth east easy edge epic fact fair fall farm fast fern field film fire fish flag flat
flow foam fold food foot fork form fort fox free frog fuel game gate gear gift girl glad glow goat gold
golf good grab grain grape grass gray green grid grow gulf hair half hall hand harp hawk head heat herb
hero hill hive home hook hope horn host hour house huge hunt idea inch iron item jade jazz joke jump jury
keen kick kind king kite knot lake lamb lamp land lane last leaf lens life lift lime line lion list loaf
lock loft long loud love luck lunch mail main make map mask meal melt milk mill mind mint mist mole moon
moss moth mouse music nail name navy neat nest news nice night noon north note oak oats ocean olive open
orbit oven owl pace page paint palm park path peach pear pen piano pier pine pink plan plant plum poem
pond pool port post pull pump quiet race rain ramp read reed rice ride ring road rock roof room root rope
rose ruby rust safe sail salt sand seal seed shell ship shoe shop silk sing sink snow soap sock soft song
soup spin star stem stone storm sun swan table tail tall tea team tent tide tile time toad tool town toy
train tree trip tune vase vine wall wave west whale wheat wind wing wolf wood wool word work yard year zinc
zone
""".split())

HELDOUT_WORDS: tuple[str, ...] = tuple("""
acorn amber anchor apple arrow badge basil beach berry blaze bloom bonus brook candle canoe cedar cherry
cliff comet coral cotton crane crown daisy delta denim eagle ember fable falcon feast fiber flame frost
garden ghost ginger globe honey igloo ivory jelly jewel juice kettle koala ladder lemon lilac llama lotus
magnet mango maple marble meadow medal melon mirror novel onion opal otter panda paper pepper pilot
planet pocket prism pumpkin quartz radar raven ribbon river robin rocket saddle salmon silver spoon
sugar summit tiger timber tomato tulip velvet violet walnut willow zebra bison cactus dragon
feather forest glacier hammer island jungle lagoon lantern meteor orchid parrot pebble pirate puzzle
""".split())

MIN_SIZE = 16  # px; below this no word is legible
# Fraction of text-free ("es") images in the demo set.
TEXT_FREE_SHARE = 0.2
# Font sizes (em), as fractions of the drawn side: small enough for two short words, big enough for OCR.
FONT_MIN_FRAC = 0.21
FONT_MAX_FRAC = 0.34
MAX_ANGLE_DEG = 8.0
# Shares of images drawn smaller and enlarged (nearest neighbour) by each factor.
PX_SCALES = ((1.0, 0.8), (1.25, 0.2))
MARGIN_PX = 1

# Named colours (caption words) with RGB; each falls in the light or the dark luminance band.
PALETTE: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("white", (245, 245, 245)), ("light gray", (200, 200, 200)), ("yellow", (240, 220, 60)),
    ("beige", (225, 210, 170)), ("pink", (240, 170, 190)), ("light blue", (160, 200, 240)),
    ("light green", (170, 225, 160)), ("orange", (245, 165, 60)), ("cyan", (120, 225, 230)),
    ("black", (15, 15, 15)), ("dark gray", (60, 60, 60)), ("navy", (20, 30, 90)), ("dark red", (120, 20, 25)),
    ("dark green", (20, 80, 35)), ("purple", (80, 30, 110)), ("brown", (90, 55, 25)), ("blue", (30, 50, 170)),
    ("teal", (10, 90, 95)),
)
LIGHT_MIN_LUMA = 160  # background or text colours of the light band have at least this luminance
DARK_MAX_LUMA = 100
COLOUR_JITTER = 12
NOISE_SIGMA = (3.0, 8.0)
SHAPE_TRIES = 20
SHAPE_CLEARANCE_PX = 2
SHAPES = ("circle", "rectangle", "triangle")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")


@dataclass(frozen=True)
class Background:
    """What lies behind the text: ``kind`` is "gradient", "noise" or "shapes"."""

    kind: str
    colours: tuple[tuple[int, int, int], ...]  # gradient: (start, end); noise/shapes: (base, shape colours...)
    names: tuple[str, ...]  # caption words of ``colours``
    angle_deg: float = 0.0  # gradient direction
    noise_seed: int = 0
    noise_sigma: float = 0.0
    shapes: tuple[tuple[str, tuple[int, int, int, int]], ...] = ()  # (kind, box at drawn size)


@dataclass(frozen=True)
class Scene:
    """Everything random about one image; :func:`paint` makes its pixels."""

    size: int  # stored side in pixels
    drawn_size: int  # side it is drawn at before the nearest-neighbour enlargement to ``size``
    background: Background
    text: str
    font_px: int = 0  # at drawn size
    angle_deg: float = 0.0  # counter-clockwise
    origin: tuple[int, int] = (0, 0)  # top-left of the rotated text layer, at drawn size
    text_colour: tuple[int, int, int] = (0, 0, 0)
    text_colour_name: str = ""


@dataclass
class SyntheticSample:
    """One demo image: ``image`` RGB ``size`` x ``size``; ``safebox`` [l, t, r, b] (right/bottom exclusive)
    encloses exactly the ink of the text, None when ``text`` is ""; ``px_scale`` [sx, sy] >= 1."""

    image: Image.Image
    text: str
    safebox: Optional[list[int]]
    captions: list[str]
    px_scale: list[float]


def luma(rgb: tuple[int, int, int]) -> float:
    """ITU-R 601 luminance of an RGB colour, 0..255."""
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


@lru_cache(maxsize=None)
def _font(px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=px)


def _band(light: bool) -> list[tuple[str, tuple[int, int, int]]]:
    return [(n, c) for n, c in PALETTE if (luma(c) >= LIGHT_MIN_LUMA if light else luma(c) <= DARK_MAX_LUMA)]


def _colour(rng: random.Random, light: bool) -> tuple[str, tuple[int, int, int]]:
    """A palette colour of the band, jittered but kept inside the band."""
    name, rgb = rng.choice(_band(light))
    while True:
        jittered = tuple(min(255, max(0, v + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for v in rgb)
        if (luma(jittered) >= LIGHT_MIN_LUMA) if light else (luma(jittered) <= DARK_MAX_LUMA):
            return name, jittered


def _text_layer(text: str, font_px: int, angle_deg: float) -> Image.Image:
    """The text's ink as an "L" mask, rotated, cropped to its ink: [h, w] coverage 0..255."""
    font = _font(font_px)
    left, top, right, bottom = font.getbbox(text)
    mask = Image.new("L", (right - left + 4, bottom - top + 4), 0)
    ImageDraw.Draw(mask).text((2 - left, 2 - top), text, fill=255, font=font)
    mask = mask.rotate(angle_deg, resample=Image.BICUBIC, expand=True)
    return mask.crop(mask.getbbox())


def text_fits(text: str, size: int) -> bool:
    """Whether ``text`` fits one line of a ``size`` px image at the smallest font, level, at every px scale."""
    for factor, _ in PX_SCALES:
        drawn = round(size / factor)
        layer = _text_layer(text, max(1, round(FONT_MIN_FRAC * drawn)), 0.0)
        if layer.width > drawn - 2 * MARGIN_PX or layer.height > drawn - 2 * MARGIN_PX:
            return False
    return True


def random_transcription(rng: random.Random, words: tuple[str, ...] = TRAIN_WORDS, size: int = 64) -> str:
    """One or two words of ``words`` (lower, Title or UPPER case) that fit a ``size`` px image."""
    for _ in range(100):
        n = 1 if rng.random() < 0.7 else 2
        text = " ".join(rng.choice(words) for _ in range(n))
        case = rng.random()
        text = text.title() if case < 0.25 else text.upper() if case < 0.4 else text
        if text_fits(text, size):
            return text
    raise ValueError(f"no draw of 1-2 words from a {len(words)}-word vocabulary fits a {size} px image; "
                     "use a larger --size or shorter words")


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _draw_background(rng: random.Random, light: bool, side: int,
                     keep_clear: Optional[tuple[int, int, int, int]] = None) -> Background:
    """A random background; shapes stay off the ``keep_clear`` box (the text's, at drawn size), as shapes
    cutting through letters are what OCR misreads most."""
    kind = rng.choice(("gradient", "noise", "shapes"))
    base_name, base = _colour(rng, light)
    if kind == "gradient":
        end_name, end = _colour(rng, light)
        return Background(kind, (base, end), (base_name, end_name), angle_deg=rng.uniform(0.0, 360.0))
    if kind == "noise":
        return Background(kind, (base,), (base_name,), noise_seed=rng.getrandbits(63),
                          noise_sigma=rng.uniform(*NOISE_SIGMA))
    shape = rng.choice(SHAPES)
    shapes, colours, names = [], [base], [base_name]
    for _ in range(rng.randint(1, 4)):
        name, rgb = _colour(rng, light)
        for _ in range(SHAPE_TRIES):
            x0, y0 = rng.randint(-side // 4, side - 4), rng.randint(-side // 4, side - 4)
            box = (x0, y0, x0 + rng.randint(side // 8, side // 2), y0 + rng.randint(side // 8, side // 2))
            if keep_clear is None or not _overlaps(box, keep_clear):
                shapes.append((shape, box))
                colours.append(rgb)
                names.append(name)
                break
    if not shapes:
        return Background("flat", (base,), (base_name,))
    return Background(kind, tuple(colours), tuple(names), shapes=tuple(shapes))


def paint_background(background: Background, side: int) -> Image.Image:
    """The background alone, RGB ``side`` x ``side``."""
    if background.kind == "gradient":
        theta = np.deg2rad(background.angle_deg)
        yy, xx = np.mgrid[0:side, 0:side] / max(1, side - 1) - 0.5
        t = np.clip(xx * np.cos(theta) + yy * np.sin(theta) + 0.5, 0.0, 1.0)[..., None]
        start, end = (np.array(c, dtype=np.float64) for c in background.colours)
        return Image.fromarray(np.round(start * (1 - t) + end * t).astype(np.uint8), "RGB")
    if background.kind == "noise":
        noise = np.random.default_rng(background.noise_seed).normal(0.0, background.noise_sigma, (side, side, 1))
        pixels = np.array(background.colours[0], dtype=np.float64) + noise
        return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8), "RGB")
    if background.kind == "shapes":
        image = Image.new("RGB", (side, side), background.colours[0])
        draw = ImageDraw.Draw(image)
        for (shape, (x0, y0, x1, y1)), rgb in zip(background.shapes, background.colours[1:]):
            if shape == "circle":
                draw.ellipse((x0, y0, x1, y1), fill=rgb)
            elif shape == "rectangle":
                draw.rectangle((x0, y0, x1, y1), fill=rgb)
            else:
                draw.polygon(((x0, y1), ((x0 + x1) // 2, y0), (x1, y1)), fill=rgb)
        return image
    if background.kind == "flat":
        return Image.new("RGB", (side, side), background.colours[0])
    raise ValueError(f"unknown background kind {background.kind!r}; use gradient, noise, shapes or flat")


def flat_background(rgb: tuple[int, int, int]) -> Background:
    """A one-colour background (for checking where the ink of a scene lies)."""
    return Background("flat", (rgb,), ("plain",))


def draw_scene(text: str, rng: random.Random, size: int = 64) -> Scene:
    """Draw everything random about an image of ``text`` ("" = text-free), ``size`` x ``size`` px.

    Long text gets a smaller font, then no tilt; raises ValueError when it does not fit even so (when
    :func:`text_fits` is false).
    """
    if size < MIN_SIZE:
        raise ValueError(f"synthetic image size {size} is below {MIN_SIZE} px; text would not be legible")
    factor = rng.choices([s for s, _ in PX_SCALES], weights=[w for _, w in PX_SCALES])[0]
    drawn = round(size / factor)
    light_background = rng.random() < 0.6
    if not text:
        return Scene(size, drawn, _draw_background(rng, light_background, drawn), "")
    angle = rng.uniform(-MAX_ANGLE_DEG, MAX_ANGLE_DEG)
    font_min = max(1, round(FONT_MIN_FRAC * drawn))
    font_px = rng.randint(font_min, max(font_min, round(FONT_MAX_FRAC * drawn)))
    room = drawn - 2 * MARGIN_PX
    layer = _text_layer(text, font_px, angle)
    while (layer.width > room or layer.height > room) and font_px > font_min:
        font_px -= 1
        layer = _text_layer(text, font_px, angle)
    if layer.width > room or layer.height > room:  # long text: level it rather than shrink it further
        angle = 0.0
        layer = _text_layer(text, font_px, angle)
    if layer.width > room or layer.height > room:
        raise ValueError(f"text {text!r} ({len(text)} characters) does not fit a {size} px synthetic image at the "
                         f"smallest font ({font_min} px); shorten it (see text_fits) or use a larger size")
    origin = (rng.randint(MARGIN_PX, drawn - MARGIN_PX - layer.width),
              rng.randint(MARGIN_PX, drawn - MARGIN_PX - layer.height))
    clear = (origin[0] - SHAPE_CLEARANCE_PX, origin[1] - SHAPE_CLEARANCE_PX,
             origin[0] + layer.width + SHAPE_CLEARANCE_PX, origin[1] + layer.height + SHAPE_CLEARANCE_PX)
    background = _draw_background(rng, light_background, drawn, keep_clear=clear)
    colour_name, colour = _colour(rng, not light_background)
    return Scene(size, drawn, background, text, font_px, angle, origin, colour, colour_name)


def paint(scene: Scene) -> tuple[Image.Image, Optional[list[int]]]:
    """The scene's RGB ``size`` x ``size`` image and its safebox [l, t, r, b] (None without text).

    The safebox is the bounding box of every pixel the text changed (right/bottom exclusive).
    """
    image = paint_background(scene.background, scene.drawn_size)
    mask = Image.new("L", image.size, 0)
    if scene.text:
        mask.paste(_text_layer(scene.text, scene.font_px, scene.angle_deg), scene.origin)
        image = Image.composite(Image.new("RGB", image.size, scene.text_colour), image, mask)
    if scene.drawn_size != scene.size:
        image = image.resize((scene.size, scene.size), Image.NEAREST)
        mask = mask.resize((scene.size, scene.size), Image.NEAREST)
    box = mask.getbbox()
    return image, (list(box) if box else None)


def _place(box: list[int], size: int) -> str:
    cx, cy = (box[0] + box[2]) / 2 / size, (box[1] + box[3]) / 2 / size
    row = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else "middle"
    col = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "center"
    if row == "middle" and col == "center":
        return "in the center"
    return f"at the {row} {col}" if row != "middle" else f"at the {col}"


def _an(word: str) -> str:
    return f"an {word}" if word[:1] in "aeiou" else f"a {word}"


def describe_background(background: Background) -> str:
    """Caption words for a background, e.g. "a beige to yellow gradient", "an orange background"."""
    if background.kind == "gradient":
        first, second = background.names
        return f"{_an(first)} to {second} gradient" if first != second else f"{_an(first)} gradient"
    if background.kind == "noise":
        return f"a grainy {background.names[0]} background"
    if background.kind == "shapes":
        n, shape = len(background.shapes), background.shapes[0][0]
        return f"{_an(background.names[0])} background with {NUMBER_WORDS[n]} {shape}{'s' if n > 1 else ''}"
    return f"{_an(background.names[0])} background"


def captions(scene: Scene, safebox: Optional[list[int]]) -> list[str]:
    """Two captions describing the scene: one naming the words, one only the look."""
    back = describe_background(scene.background)
    if not scene.text or safebox is None:
        return [f"{back}, no text", back]
    tilt = ("tilted upward" if scene.angle_deg > 3 else "tilted downward" if scene.angle_deg < -3
            else "level")
    height = scene.font_px / scene.drawn_size
    letters = "large" if height > 0.28 else "small" if height < 0.23 else "medium"
    noun = "words" if " " in scene.text else "word"
    return [f'the {noun} "{scene.text}" in {letters} {scene.text_colour_name} letters on {back}, '
            f"{_place(safebox, scene.size)}, {tilt}",
            f"{scene.text_colour_name} text on {back}"]


def render_sample(text: str, rng: random.Random, size: int = 64) -> SyntheticSample:
    """Render ``text`` ("" = a text-free image) as a ``size`` x ``size`` demo image with safebox and captions."""
    scene = draw_scene(text, rng, size)
    image, safebox = paint(scene)
    px = scene.size / scene.drawn_size
    return SyntheticSample(image, text, safebox, captions(scene, safebox), [px, px])


def sample_rng(seed: int, index: int) -> random.Random:
    """The generator of demo image ``index`` under ``seed``: independent of how many workers render."""
    return random.Random(f"textdiff-synthetic:{seed}:{index}")


def synthetic_text(index: int, seed: int, size: int = 64) -> tuple[str, random.Random]:
    """The transcription of demo image ``index`` ("" for ~TEXT_FREE_SHARE of them) and its generator."""
    rng = sample_rng(seed, index)
    text = "" if rng.random() < TEXT_FREE_SHARE else random_transcription(rng, TRAIN_WORDS, size)
    return text, rng


def synthetic_sample(index: int, seed: int = 0, size: int = 64) -> SyntheticSample:
    """Demo image ``index`` of the set made with ``seed``: words from TRAIN_WORDS, ~20% text-free."""
    text, rng = synthetic_text(index, seed, size)
    return render_sample(text, rng, size)


def with_background(scene: Scene, background: Background) -> Scene:
    """The same scene over another background (its text, colour and placement unchanged)."""
    return dataclasses.replace(scene, background=background)
