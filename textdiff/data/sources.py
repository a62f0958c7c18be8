"""Reading a source folder for the sharder: image keys, decoding and checks of each image (the side files of
captions, safeboxes, px scales, transcriptions and unreadable-text boxes: textdiff/data/side_files.py).

A source folder holds images (nested sub-folders allowed), each with its transcription in a ``.txt`` file
of the same name beside it, or all transcriptions in one side file (``--transcriptions``, what
tools/annotate.py writes). Side files map *image keys* to values; a key names one image:

- canonical: the path relative to the source folder, ``/`` separators, no extension: ``signs/street/0001``;
- legacy: the same with ``/`` replaced by ``_`` (``signs_street_0001``), or the bare file name without
  extension (``0001``), which is what the research code's keys were for images in sub-folders;
- with extension: ``signs/street/0001.jpg``.

A key that matches no image, or several images (``a/b`` and ``a_b`` both exist, or ``x.jpg`` and ``x.png``),
is reported; so is an image that two keys of the same file both name.

Nothing here is fatal by itself: problems come back as :class:`Problem` records, and the caller decides
(``--strict`` makes them fatal; otherwise they are skipped, counted and listed in the manifest).
"""

from __future__ import annotations

import io
import json
import math
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Optional, Sequence

from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif")

# Problem kinds that are bad input (fatal under --strict); the others are the user's filters.
BAD_INPUT_KINDS = frozenset({"bad_image", "bad_txt", "bad_safebox", "bad_unreadable", "bad_value", "bad_json_line",
                             "unknown_key", "ambiguous_key", "listed_twice", "too_many_pixels"})


# The decompression-bomb cap of the sharder and (data.max_pixels) of the training stream.
DEFAULT_MAX_PIXELS = 64_000_000
# Orientation tag of EXIF: 1 is upright; 2-8 are the flips and rotations a camera records instead of applying.
EXIF_ORIENTATION = 0x0112


class SourceError(ValueError):
    """A source folder or side file cannot be used at all; the message names it and what to do."""


@dataclass(frozen=True)
class Problem:
    """One skipped input: ``where`` is a file (or ``file:line``), ``kind`` a short category."""

    where: str
    kind: str
    reason: str
    key: Optional[str] = None

    def to_json(self) -> dict:
        """The manifest's record of this problem."""
        return {"source": self.where, "key": self.key, "kind": self.kind, "reason": self.reason}


def canonical_key(rel_path: str) -> str:
    """``sub/dir/name.ext`` -> ``sub/dir/name``."""
    path = PurePosixPath(rel_path)
    return str(path.with_suffix("")) if path.suffix else str(path)


def legacy_key(rel_path: str) -> str:
    """``sub/dir/name.ext`` -> ``sub_dir_name`` (the research code's key with separators replaced)."""
    return canonical_key(rel_path).replace("/", "_")


def stem_key(rel_path: str) -> str:
    """``sub/dir/name.ext`` -> ``name`` (the research code's key: it scanned each folder by file name)."""
    return PurePosixPath(rel_path).stem


def scan_images(src_dir: Path) -> list[str]:
    """Every image below ``src_dir`` as a sorted list of ``/``-separated relative paths."""
    if not src_dir.is_dir():
        raise SourceError(f"source folder {src_dir} does not exist or is not a folder; pass a folder of images "
                          "with a .txt transcription beside each (or use --synthetic N)")
    found = [p.relative_to(src_dir).as_posix() for p in src_dir.rglob("*")
             if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    return sorted(found)


class KeyIndex:
    """Resolves image keys in any accepted syntax to relative image paths (a key naming several images
    under different syntaxes is ambiguous, never silently resolved by precedence)."""

    def __init__(self, rel_paths: list[str]):
        self._by_key: dict[str, set[str]] = defaultdict(set)
        for rel in rel_paths:
            for key in (rel, canonical_key(rel), legacy_key(rel), stem_key(rel)):
                self._by_key[key].add(rel)

    def resolve(self, key: str) -> list[str]:
        """The images ``key`` names (sorted): one for a good key, none for unknown, several if ambiguous."""
        return sorted(self._by_key.get(key, ()))


@dataclass(frozen=True)
class SourceOptions:
    """The per-image choices of the sharder (command-line flags of tools/make_shards.py)."""

    missing_txt: str = "skip"  # "skip" or "keep" images without a .txt beside them
    min_side: int = 0  # skip images whose shorter side / px scale is below this
    require_captions: bool = False
    max_side: int = 0  # 0: keep original bytes; else shrink longer sides to this
    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb cap on width * height
    image_format: str = "keep"  # "keep" the source format, or store every image as "jpg", "png" or "webp"
    strip_txt: bool = False  # drop trailing line ends of transcriptions; whitespace-only counts as no text


@dataclass(frozen=True)
class ImageJob:
    """One source image and its side-file values, as a worker receives it."""

    src_dir: str
    rel_path: str
    key: str  # the sample key in the shard
    captions: tuple[str, ...] = ()
    safebox: Optional[tuple[float, ...]] = None
    px_scale: tuple[float, float] = (1.0, 1.0)
    # with a --transcriptions side file (its path): the image's value there (None: not listed), and the
    # .txt beside the image is not read
    transcriptions_file: Optional[str] = None
    transcription: Optional[str] = None
    # boxes of text OCR could not read, from the --unreadable side file (its path), in stored-image pixels
    unreadable_file: Optional[str] = None
    unreadable: tuple[tuple[float, ...], ...] = ()


@dataclass
class ShardSample:
    """One sample ready for a shard: ``txt`` None means unknown (no .txt written)."""

    key: str
    image_ext: str
    image_bytes: bytes
    txt: Optional[str]
    meta: dict

    def to_webdataset(self) -> dict:
        """The dict webdataset's TarWriter stores: ``KEY.ext``, ``KEY.txt``, ``KEY.json``."""
        sample = {"__key__": self.key, self.image_ext: self.image_bytes,
                  "json": json.dumps(self.meta, ensure_ascii=False).encode("utf-8")}
        if self.txt is not None:
            sample["txt"] = self.txt.encode("utf-8")
        return sample


def sample_meta(captions: Sequence[str], safebox: Optional[Sequence[float]], px_scale: Sequence[float],
                width: int, height: int, source: str, unreadable: Sequence[Sequence[float]] = ()) -> dict:
    """The per-sample ``.json``: the same keys with the same JSON types in every sample.

    Readers that infer a schema from the first samples (HuggingFace ``datasets`` looks at five) type a
    ``null`` or an empty list as "null" and then refuse every later value, so nothing here is ever null or
    empty: an image without a safebox gets the whole image ``[0, 0, width, height]`` (what the stream
    protects for a missing one anyway) and one without captions gets ``[""]`` (the stream's "no caption").
    The one optional key, ``unreadable`` (boxes of text OCR could not read), is written only where there are
    boxes, for the same reason: an empty list would type it "null"; absent, such readers leave it out.
    """
    box = list(safebox) if safebox is not None else [0, 0, width, height]
    meta = {"captions": [str(c) for c in captions] or [""], "safebox": [float(v) for v in box],
            "px_scale": [float(v) for v in px_scale], "width": int(width), "height": int(height),
            "source": str(source)}
    if unreadable:
        meta["unreadable"] = [[float(v) for v in b] for b in unreadable]
    return meta


def read_transcription(image_path: Path, strip: bool = False) -> Optional[str]:
    """The ``.txt`` beside an image ("" = no text in it), or None when there is none (unknown).

    Raises ValueError when the file is not UTF-8. A UTF-8 byte-order mark is dropped and line ends become
    ``"\n"``; otherwise the text is kept as the research code reads it: a trailing newline stays (a token
    for the transcription encoder) and only an empty file means no text. ``strip`` drops trailing line ends
    and counts a file of only whitespace as empty (``make_shards.py --strip-txt``).
    """
    txt_path = image_path.with_suffix(".txt")
    try:
        raw = txt_path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{txt_path.name} is not UTF-8 (invalid byte 0x{raw[e.start]:02x} at offset {e.start}); "
                         "re-save it as UTF-8") from None
    return clean_transcription(text, strip)


def clean_transcription(text: str, strip: bool = False) -> str:
    """A transcription with line ends made ``"\n"``; with ``strip``, trailing line ends dropped and a text of
    only whitespace made "" (see :func:`read_transcription`)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not strip:
        return text
    text = text.rstrip("\n")
    return "" if not text.strip() else text


def parse_transcription(value: Any) -> str:
    """A transcription value of a ``--transcriptions`` side file: a string ("" = no text in the image);
    raises ValueError otherwise."""
    if not isinstance(value, str):
        raise ValueError(f"transcription value {value!r} is not a string (\"\" for an image without text)")
    return value


_KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def decode_image(data: bytes, where: str, max_pixels: int) -> tuple[Image.Image, str]:
    """Fully decoded image and its format, as make_shards and tools/annotate.py read every image; raises
    SkipInput (its Problem names the file and why) for bombs and unreadable or truncated files."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise SkipInput(Problem(where, "too_many_pixels", f"refused as a decompression bomb: {e}")) from None
        except Exception as e:  # Pillow raises many types for garbage input
            raise SkipInput(Problem(where, "bad_image", f"unreadable image ({describe_error(e, where)})")) from None
        width, height = image.size
        if width * height > max_pixels:
            raise SkipInput(Problem(where, "too_many_pixels", f"{width}x{height} = {width * height} pixels exceeds "
                                f"--max-pixels {max_pixels} (decompression-bomb cap); raise it if the image is real"))
        try:
            image.load()
        except Exception as e:
            raise SkipInput(Problem(where, "bad_image", f"unreadable or truncated image ({describe_error(e, where)})")) from None
    return image, image.format or ""


_BUFFER_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def describe_error(error: Exception, name: str) -> str:
    """``Type: message`` of a Pillow error with the in-memory buffer's address replaced by ``name``, the file
    (or shard member) the bytes came from."""
    return f"{type(error).__name__}: {_BUFFER_REPR.sub(name, str(error))}"


def upright(image: Image.Image) -> tuple[Image.Image, bool]:
    """The image as it is meant to be seen (EXIF orientation applied) and whether that changed its pixels."""
    if image.getexif().get(EXIF_ORIENTATION, 1) in (0, 1):
        return image, False
    return ImageOps.exif_transpose(image), True


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of an image of any mode, alpha flattened on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def encode_image(image: Image.Image, ext: str) -> bytes:
    """An RGB image as ``jpg`` / ``webp`` (quality 95) or ``png`` bytes."""
    out = io.BytesIO()
    if ext == "jpg":
        image.save(out, "JPEG", quality=95)
    elif ext == "webp":
        image.save(out, "WEBP", quality=95)
    else:
        image.save(out, "PNG")
    return out.getvalue()


def shrink(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """(width, height) with the longer side brought down to ``max_side`` (unchanged if already within)."""
    width, height = size
    if max(width, height) <= max_side:
        return width, height
    factor = max_side / max(width, height)
    return max(1, round(width * factor)), max(1, round(height * factor))


def rescale_safebox(box: list[float], fx: float, fy: float, width: int, height: int) -> list[int]:
    """A safebox under a resize by (fx, fy), rounded outward to whole pixels so it still encloses the text."""
    return [max(0, math.floor(box[0] * fx)), max(0, math.floor(box[1] * fy)),
            min(width, math.ceil(box[2] * fx)), min(height, math.ceil(box[3] * fy))]


class SkipInput(Exception):
    """An input that is skipped, and counted, for the Problem it carries."""

    def __init__(self, problem: Problem):
        super().__init__(problem.reason)
        self.problem = problem


def prepare_sample(job: ImageJob, opts: SourceOptions) -> ShardSample | Problem:
    """Read, check and (with ``max_side``) resize one source image; a Problem says why it is skipped."""
    try:
        return _prepare(job, opts)
    except SkipInput as skip:
        return skip.problem


def _prepare(job: ImageJob, opts: SourceOptions) -> ShardSample:
    path = Path(job.src_dir) / job.rel_path
    where = job.rel_path
    if job.transcriptions_file is not None:
        txt = None if job.transcription is None else clean_transcription(job.transcription, opts.strip_txt)
        missing = f"not in --transcriptions {job.transcriptions_file} (transcription unknown)"
    else:
        try:
            txt = read_transcription(path, opts.strip_txt)
        except ValueError as e:
            raise SkipInput(Problem(where, "bad_txt", str(e), job.key)) from None
        missing = "no .txt beside it (transcription unknown)"
    if txt is None and opts.missing_txt == "skip":
        raise SkipInput(Problem(where, "missing_txt", f"{missing}; pass --missing-txt keep to keep such images", job.key))
    if opts.require_captions and not job.captions:
        raise SkipInput(Problem(where, "no_captions", "no caption (--require-captions)", job.key))
    data = path.read_bytes()
    image, fmt = decode_image(data, where, opts.max_pixels)
    # Cameras store the sensor's pixels and an EXIF rotation; viewers (and whoever drew the safebox) show the
    # image upright, while decoders that ignore EXIF (the stream, most readers) would not: store it upright.
    image, rotated = upright(image)
    width, height = image.size
    box = list(job.safebox) if job.safebox is not None else None
    if box is not None and not _inside(box, width, height):
        raise SkipInput(Problem(where, "bad_safebox", f"safebox {box} lies outside the {width}x{height} image; "
                            "fix it in the --safeboxes file", job.key))
    outside = next((list(b) for b in job.unreadable if not _inside(b, width, height)), None)
    if outside is not None:
        raise SkipInput(Problem(where, "bad_unreadable", f"unreadable box {outside} of key {job.key!r} lies outside "
                                f"the {width}x{height} image; fix it in --unreadable {job.unreadable_file}", job.key))
    unreadable = [list(b) for b in job.unreadable]
    sx, sy = job.px_scale
    if opts.min_side and min(width / sx, height / sy) < opts.min_side:
        raise SkipInput(Problem(where, "too_small", f"shorter side {min(width / sx, height / sy):.0f} px (stored size "
                            f"/ px scale) is below --min-side {opts.min_side}", job.key))
    ext = _KEEP_FORMATS.get(fmt, "png") if opts.image_format == "keep" else opts.image_format
    new_size = shrink((width, height), opts.max_side) if opts.max_side else (width, height)
    if new_size != (width, height):
        fx, fy = new_size[0] / width, new_size[1] / height
        image = to_rgb(image).resize(new_size, Image.LANCZOS)
        box = rescale_safebox(box, fx, fy, *new_size) if box is not None else None
        unreadable = [rescale_safebox(b, fx, fy, *new_size) for b in unreadable]
        sx, sy = sx * fx, sy * fy
        data = encode_image(image, ext)
    else:
        box = rescale_safebox(box, 1.0, 1.0, width, height) if box is not None else None
        unreadable = [rescale_safebox(b, 1.0, 1.0, width, height) for b in unreadable]
        if rotated or image.mode != "RGB" or _KEEP_FORMATS.get(fmt) != ext:
            data = encode_image(to_rgb(image), ext)
    meta = sample_meta(job.captions, box, (sx, sy), new_size[0], new_size[1], job.rel_path, unreadable)
    return ShardSample(job.key, ext, data, txt, meta)


def _inside(box: Sequence[float], width: int, height: int) -> bool:
    return 0 <= box[0] and 0 <= box[1] and box[2] <= width and box[3] <= height
