"""Text-aware augmentation: square crops that keep the text, flips of text-free images, resizes.

Every step is a small function of its inputs and an explicit ``numpy.random.Generator``; the stream derives
one generator per sample with :func:`sample_rng` from (seed, epoch, reader, position), so a resumed run
draws exactly the augmentations the uninterrupted run would have drawn.

Boxes are ``(left, top, right, bottom)`` floats in pixels of the stored image. A *safebox* encloses all text
in an image; a crop of an image with text always contains its whole safebox. An image's *px scale*
``(sx, sy)`` says how much the stored image was enlarged from its original, so a crop side below
``image_size * max(px_scale)`` would show the original's pixels larger than 1:1; crops never go there.

The seed's knobs (``cfg.augment``): ``crop_prob``, ``crop_min_scale``, ``crop_max_scale`` for images with
text; ``use_special_crop_for_empty_string`` switches text-free images to ``crop_prob_es`` and
``crop_min_scale_es``; ``use_random_safebox_for_empty_string`` crops text-free images around a real safebox
borrowed from another training image (``es_safebox``), with the main ``crop_prob`` and ``crop_min_scale``, as
the research code; ``no_safebox`` centre-crops (or pads) an image with text but no safebox;
``flip_lr_prob_es`` flips text-free images only; ``antialias``, ``bicubic_down``, ``low_res_clamp``,
``blur_prob``, ``blur_sigma_min``, ``blur_sigma_max`` shape the low-resolution conditioning image of upsamplers.

Boxes of text that OCR could not read (a shard's ``unreadable``, ``data.mask_unreadable``) follow the image
through the padding, the crop, the resize and the flip into a loss mask of the output pixels they touch.
"""

from __future__ import annotations

import hashlib
import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from textdiff.config import AugmentConfig

Box = tuple[float, float, float, float]

# Gaussian-blur kernel width of the seed's upsampler conditioning augmentation (its blur_width).
BLUR_KERNEL_SIZE = 5


def sample_rng(seed: int, *ids: int | str) -> np.random.Generator:
    """A generator determined by ``seed`` and ``ids`` (ints or strings such as a sample key) alone."""
    words = [seed]
    for i in ids:
        if isinstance(i, str):
            i = int.from_bytes(hashlib.blake2b(i.encode("utf-8"), digest_size=8).digest(), "little")
        words.append(int(i))
    return np.random.default_rng(words)


def clamp_box(box: Sequence[float], width: int, height: int) -> Box:
    """``box`` clipped to the image ``width`` x ``height``; raises if it is inverted or lies outside."""
    left, top, right, bottom = (float(v) for v in box)
    left, top = max(0.0, left), max(0.0, top)
    right, bottom = min(float(width), right), min(float(height), bottom)
    if not (left <= right and top <= bottom):
        raise ValueError(f"safebox {list(box)} is inverted or outside the {width}x{height} image; "
                         "fix the safebox in the shard's .json (tools/make_shards.py --safeboxes)")
    return left, top, right, bottom


def min_crop_side(width: int, height: int, image_size: int, px_scale: Sequence[float]) -> float:
    """Smallest square side a crop may have: ``image_size`` stored px, and ``image_size * max(px_scale)``
    so the original is never zoomed past 1:1; capped at the shorter image side (the largest square)."""
    return min(float(min(width, height)), float(image_size) * max(1.0, *(float(s) for s in px_scale)))


def _centred_start(length: float, side: float, low: float, high: float) -> float:
    """Start of a span of ``side`` inside ``[0, length]``, centred, shifted to cover ``[low, high]``."""
    start = (length - side) / 2
    start = min(start, low)  # cover the protected span's start
    start = max(start, high - side)  # and its end
    return min(max(start, 0.0), length - side)


def largest_square(width: int, height: int, safebox: Optional[Box] = None) -> Box:
    """The biggest square inside the image: centred, shifted to hold ``safebox`` when one is given."""
    side = float(min(width, height))
    if safebox is None:
        safebox = (width / 2, height / 2, width / 2, height / 2)
    left = _centred_start(float(width), side, safebox[0], safebox[2])
    top = _centred_start(float(height), side, safebox[1], safebox[3])
    return left, top, left + side, top + side


def draw_crop_box(width: int, height: int, safebox: Optional[Box], px_scale: Sequence[float], image_size: int,
                  min_scale: float, max_scale: float, rng: np.random.Generator) -> Box:
    """A random square crop whose area is a fraction in ``[min_scale, max_scale]`` of the largest square.

    The fraction is raised where needed so the side is at least :func:`min_crop_side` and at least the
    safebox's longer edge; the position is uniform among the placements that contain the whole safebox.
    ``safebox`` must fit the largest square (see :func:`pad_to_hold`).
    """
    short = float(min(width, height))
    protected = min_crop_side(width, height, image_size, px_scale)
    if safebox is not None:
        protected = max(protected, safebox[2] - safebox[0], safebox[3] - safebox[1])
    frac_low = max(min_scale, (protected / short) ** 2)
    frac_high = max(max_scale, frac_low)
    side = math.sqrt(rng.uniform(frac_low, frac_high)) * short
    side = min(max(side, protected), short)
    if safebox is None:
        x_range, y_range = (0.0, width - side), (0.0, height - side)
    else:
        x_range = (max(0.0, safebox[2] - side), min(safebox[0], width - side))
        y_range = (max(0.0, safebox[3] - side), min(safebox[1], height - side))
    left = rng.uniform(x_range[0], max(x_range))
    top = rng.uniform(y_range[0], max(y_range))
    return left, top, left + side, top + side


def random_safebox(width: int, height: int, rng: np.random.Generator) -> Box:
    """A random box for a text-free image to be cropped around as if it held text: each edge 10-90% of
    the shorter image side, placed uniformly (``use_random_safebox_for_empty_string``)."""
    short = min(width, height)
    box_w, box_h = rng.uniform(0.1, 0.9, size=2) * short
    left = rng.uniform(0.0, width - box_w)
    top = rng.uniform(0.0, height - box_h)
    return left, top, left + box_w, top + box_h


def pad_offset(width: int, height: int, safebox: Box) -> tuple[int, int, int, int]:
    """``(new_width, new_height, dx, dy)`` of :func:`pad_to_hold`: the padded size and where the image's top left
    corner lands in it (``(width, height, 0, 0)`` when a square of the image already holds ``safebox``)."""
    need = max(safebox[2] - safebox[0], safebox[3] - safebox[1])
    if need <= min(width, height):
        return width, height, 0, 0
    side = math.ceil(need)
    new_w, new_h = (width, max(height, side)) if width >= height else (max(width, side), height)
    return new_w, new_h, (new_w - width) // 2, (new_h - height) // 2


def pad_to_hold(image: Image.Image, safebox: Box) -> tuple[Image.Image, Box]:
    """Pad the shorter dimension (border-median colour, centred) until a square can hold ``safebox``.

    A safebox wider than the image is tall cannot fit any square crop; padding keeps all its text instead
    of cutting it. Returns the image and the safebox in the padded image's pixels (unchanged if it fits).
    """
    width, height = image.size
    new_w, new_h, dx, dy = pad_offset(width, height, safebox)
    if (new_w, new_h) == (width, height):
        return image, safebox
    image = _rgb(image)
    arr = np.asarray(image)
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    fill = tuple(int(c) for c in np.median(border, axis=0))
    canvas = Image.new("RGB", (new_w, new_h), fill)
    canvas.paste(image, (dx, dy))
    return canvas, (safebox[0] + dx, safebox[1] + dy, safebox[2] + dx, safebox[3] + dy)


def _pixel_span(low: float, high: float, start: float, length: float, size: int) -> tuple[int, int]:
    """The output pixels ``[first, last)`` of a crop ``[start, start + length)`` resized to ``size`` px whose
    footprints overlap the span ``[low, high)`` (empty: first >= last)."""
    scale = size / length
    first = math.floor((low - start) * scale)
    last = math.ceil((high - start) * scale)
    return max(0, first), min(size, last)


def covered_pixels(boxes: Sequence[Sequence[float]], crop: Box, size: int) -> np.ndarray:
    """bool ``[size, size]``: True at every pixel of :func:`crop_resize` (``crop`` -> ``size`` x ``size``) whose
    footprint a box of ``boxes`` touches. Boxes and crop are in the same pixels, right/bottom exclusive; output
    pixel (i, j) covers ``[left + j w / size, left + (j + 1) w / size)`` across (w: the crop's width), and
    likewise down; a box touches it where the two overlap by more than an edge."""
    covered = np.zeros((size, size), dtype=bool)
    for box in boxes:
        x0, x1 = _pixel_span(box[0], box[2], crop[0], crop[2] - crop[0], size)
        y0, y1 = _pixel_span(box[1], box[3], crop[1], crop[3] - crop[1], size)
        if x0 < x1 and y0 < y1:
            covered[y0:y1, x0:x1] = True
    return covered


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")  # convert() would copy an RGB image


def draft_for_crop(image: Image.Image, box: Box, size: int) -> tuple[Image.Image, Box]:
    """Let a JPEG that is not decoded yet decode at 1/2, 1/4 or 1/8 scale (DCT scaling) while the crop
    keeps at least ``2 * size`` px per side, as Pillow's ``thumbnail`` does; returns the image and the box
    in its new pixels. Other images come back unchanged. Large photos decode several times faster."""
    if image.format != "JPEG" or not image.tile:  # tile is emptied once the pixels are decoded
        return image, box
    scale = 1
    while scale < 8 and (box[2] - box[0]) / (scale * 2) >= 2 * size:
        scale *= 2
    if scale == 1:
        return image, box
    width, height = image.size
    image.draft("RGB", (math.ceil(width / scale), math.ceil(height / scale)))
    sx, sy = image.size[0] / width, image.size[1] / height
    return image, (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def crop_resize(image: Image.Image, box: Box, size: int) -> np.ndarray:
    """Crop ``box`` and resize it to ``size`` x ``size`` (bicubic, antialiased): uint8 ``[size, size, 3]``."""
    return np.asarray(_rgb(image).resize((size, size), Image.Resampling.BICUBIC, box=box))


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` -> float ``[3, H, W]`` in [-1, 1]."""
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def is_power_of_two_factor(size: int, small: int) -> bool:
    """Whether halving ``size`` some number of times (at least once) reaches ``small`` (256 -> 64: yes, 96 -> 64: no)."""
    while size > small:
        size //= 2
        if size == small:
            return True
    return False


def low_res_mode(size: int, small: int, antialias: bool, bicubic_down: bool) -> str:
    """``F.interpolate`` mode of the research code's low-res conditioning: ``"bicubic"`` with ``bicubic_down``,
    else ``"bilinear"`` with ``antialias`` or a factor that is not a power of two, else ``"area"``."""
    if bicubic_down:
        return "bicubic"
    if antialias or not is_power_of_two_factor(size, small):
        return "bilinear"
    return "area"


def downsample(image: torch.Tensor, size: int, antialias: bool = False, bicubic_down: bool = False,
               clamp: bool = False) -> torch.Tensor:
    """``[3, S, S]`` in [-1, 1] -> ``[3, size, size]`` by :func:`low_res_mode`, antialiased only with ``antialias``
    (as the research code), clamped to [-1, 1] only with ``clamp`` (bicubic overshoots it slightly)."""
    mode = low_res_mode(image.shape[-1], size, antialias, bicubic_down)
    kwargs = {"antialias": antialias} if mode != "area" else {}
    out = F.interpolate(image[None], size=(size, size), mode=mode, **kwargs)[0]
    return out.clamp(-1.0, 1.0) if clamp else out


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """``[C, H, W]`` blurred by a ``BLUR_KERNEL_SIZE``-wide Gaussian of ``sigma`` px (reflect padding)."""
    half = BLUR_KERNEL_SIZE // 2
    x = torch.arange(-half, half + 1, dtype=image.dtype)
    kernel = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    c = image.shape[0]
    out = F.pad(image[None], (half, half, half, half), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return out[0]


def low_res_condition(image: torch.Tensor, size: int, cfg: AugmentConfig, rng: np.random.Generator) -> torch.Tensor:
    """The upsampler's conditioning image: ``image [3, S, S]`` downsampled to ``[3, size, size]``, then with
    probability ``blur_prob`` blurred with sigma uniform in [``blur_sigma_min``, ``blur_sigma_max``]."""
    low = downsample(image, size, cfg.antialias, cfg.bicubic_down, cfg.low_res_clamp)
    blur_roll, sigma = rng.random(), rng.uniform(cfg.blur_sigma_min, cfg.blur_sigma_max)
    if blur_roll < cfg.blur_prob:
        low = gaussian_blur(low, sigma)
    return low


def borrows_safeboxes(cfg: AugmentConfig) -> bool:
    """Whether text-free images are cropped around a real safebox borrowed from another training image."""
    return cfg.use_random_safebox_for_empty_string and cfg.es_safebox == "borrowed"


def fit_box(box: Sequence[float], width: int, height: int) -> Box:
    """``box`` (another image's safebox) moved into a ``width`` x ``height`` image, keeping its size
    (edges capped at the image's): a borrowed box keeps the size of real text, wherever it stood."""
    box_w = min(float(box[2]) - float(box[0]), float(width))
    box_h = min(float(box[3]) - float(box[1]), float(height))
    left = min(max(float(box[0]), 0.0), width - box_w)
    top = min(max(float(box[1]), 0.0), height - box_h)
    return left, top, left + box_w, top + box_h


def text_free_safebox(width: int, height: int, cfg: AugmentConfig, borrowed: Sequence[Box],
                      rng: np.random.Generator) -> Optional[Box]:
    """The box a text-free image is cropped around with ``use_random_safebox_for_empty_string``: one of
    ``borrowed`` (real safeboxes of other training images) moved into the image (:func:`fit_box`) with
    ``es_safebox="borrowed"``, else (or when none is at hand) a :func:`random_safebox`. None when the
    borrowed box is longer than the image's short side: no square holds it, so the image is not cropped,
    as the research code's crop then falls back to the whole image."""
    if cfg.es_safebox == "borrowed" and borrowed:
        box = fit_box(borrowed[int(rng.integers(len(borrowed)))], width, height)
        return box if max(box[2] - box[0], box[3] - box[1]) <= min(width, height) else None
    return random_safebox(width, height, rng)


def choose_crop(width: int, height: int, has_text: bool, safebox: Optional[Box], px_scale: Sequence[float],
                image_size: int, cfg: AugmentConfig, rng: np.random.Generator,
                borrowed: Sequence[Box] = ()) -> Box:
    """The crop box of one image under the seed's knobs, as the research code chooses it.

    ``safebox`` must fit the largest square (images with text go through :func:`pad_to_hold` first). A
    text-free image with ``use_random_safebox_for_empty_string`` is cropped around :func:`text_free_safebox`
    with the main ``crop_prob``/``crop_min_scale`` (the research code passes it through the text images'
    crop); otherwise it is cropped unprotected, with ``crop_prob_es``/``crop_min_scale_es`` when
    ``use_special_crop_for_empty_string``.
    """
    crop_prob, min_scale = cfg.crop_prob, cfg.crop_min_scale
    if not has_text:
        if cfg.use_random_safebox_for_empty_string:
            safebox = text_free_safebox(width, height, cfg, borrowed, rng)
            if safebox is None:
                return largest_square(width, height)
        elif cfg.use_special_crop_for_empty_string:
            crop_prob, min_scale = cfg.crop_prob_es, cfg.crop_min_scale_es
    if rng.random() < crop_prob:
        return draw_crop_box(width, height, safebox, px_scale, image_size, min_scale, cfg.crop_max_scale, rng)
    return largest_square(width, height, safebox)


def augment_sample(image: Image.Image, txt: Optional[str], safebox: Optional[Sequence[float]],
                   px_scale: Sequence[float], cfg: AugmentConfig, image_size: int, low_res_size: int,
                   rng: np.random.Generator, borrowed_safeboxes: Sequence[Sequence[float]] = (),
                   unreadable: Optional[Sequence[Sequence[float]]] = None) -> dict[str, torch.Tensor]:
    """Crop, flip, resize one decoded sample.

    image: RGB, any size; txt: its transcription ("" = no text, None = unknown, treated as text);
    safebox: box around the text or None (an image with text but no safebox is centre-cropped, as the
    research code, or with ``augment.no_safebox="pad"`` protected whole); px_scale: ``[sx, sy]``;
    borrowed_safeboxes: real safeboxes of other training images, for a text-free image to borrow one;
    unreadable: boxes of text OCR could not read ([l, t, r, b] in the image's pixels), or None.
    Returns ``image [3, image_size, image_size]`` in [-1, 1], ``low_res [3, s, s]`` in [-1, 1] when
    ``low_res_size`` (s) > 0, and with ``unreadable`` given (even empty) ``loss_mask [1, image_size,
    image_size]`` float: 0 at every output pixel a box touches (:func:`covered_pixels`, the boxes carried
    through the padding, the crop and the flip the image went through), 1 elsewhere. The mask draws nothing
    from ``rng``: the image and low_res are the same with or without it.
    """
    width, height = image.size
    has_text = txt != ""
    box, dx, dy = None, 0, 0
    if has_text and safebox is None and cfg.no_safebox == "centre_crop":
        crop = largest_square(width, height)
    else:
        if has_text:
            box = clamp_box(safebox if safebox is not None else (0, 0, width, height), width, height)
            _, _, dx, dy = pad_offset(width, height, box)
            image, box = pad_to_hold(image, box)
            width, height = image.size
        crop = choose_crop(width, height, has_text, box, px_scale, image_size, cfg, rng,
                           [tuple(b) for b in borrowed_safeboxes])
    masked = None
    if unreadable is not None:  # in the padded image's pixels, before the draft scales image and crop alike
        masked = covered_pixels([(b[0] + dx, b[1] + dy, b[2] + dx, b[3] + dy) for b in unreadable], crop, image_size)
    image, crop = draft_for_crop(image, crop, image_size)
    arr = crop_resize(image, crop, image_size)
    flip_roll = rng.random()  # drawn for every image so text and text-free samples consume the rng alike
    if not has_text and flip_roll < cfg.flip_lr_prob_es:
        arr = arr[:, ::-1]
        masked = masked[:, ::-1] if masked is not None else None
    out = {"image": to_tensor(arr)}
    if low_res_size > 0:
        out["low_res"] = low_res_condition(out["image"], low_res_size, cfg, rng)
    if masked is not None:
        out["loss_mask"] = torch.from_numpy((~masked)[None].astype(np.float32))
    return out
