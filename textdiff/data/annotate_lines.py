"""Geometry of an annotation: an OCR engine's boxes grouped into lines in reading order, each line's box
tightened to its ink, and the safebox around them.

PP-OCR returns one box per run of text it detected; a line with wide word gaps comes back as several boxes,
and every box is padded beyond the ink (its detector grows each box by ``area * 1.6 / perimeter``, about half
a letter height). :func:`group_lines` joins boxes whose centres lie on one (slightly turned) line and orders
the lines top to bottom and their boxes left to right; :func:`tighten` shrinks a line's box to the pixels
that differ from the background around them. Pure functions of numpy arrays: images are uint8
``[H, W, 3]``, polygons ``[4, 2]`` corners (x, y) clockwise from the top left, boxes ``[l, t, r, b]`` with
right and bottom exclusive (the scene-text ground truth's and make_shards' convention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

# Two boxes are on one line when each one's centre lies within this share of the smaller box's height of
# the other's centre line (measured across the line's direction).
SAME_LINE_OFFSET = 0.5
# Tilts steeper than this (degrees) are not taken from a box's own edges: short boxes ('a', 'of') have
# edges too short to give a direction, and PP-OCR returns level boxes for them.
MAX_TILT_DEG = 20.0


@dataclass(frozen=True)
class Box:
    """One detected box: text, recogniser confidence in 0..1, polygon [4, 2] (clockwise from top left) and
    ``index``, the caller's number for it."""

    text: str
    confidence: float
    polygon: np.ndarray
    index: int = -1

    @property
    def direction(self) -> np.ndarray:
        """Unit vector along the text (left to right): the mean of the top and bottom edges."""
        p = self.polygon
        v = (p[1] - p[0]) + (p[2] - p[3])
        norm = float(np.hypot(*v))
        if norm == 0 or abs(math.degrees(math.atan2(v[1], v[0]))) > MAX_TILT_DEG:
            return np.array([1.0, 0.0])
        return v / norm

    @property
    def height(self) -> float:
        """The mean of the left and right edges' lengths."""
        p = self.polygon
        return 0.5 * (float(np.hypot(*(p[3] - p[0]))) + float(np.hypot(*(p[2] - p[1]))))

    @property
    def centre(self) -> np.ndarray:
        return self.polygon.mean(axis=0)


@dataclass(frozen=True)
class Line:
    """Boxes of one visual line, left to right: ``text`` their texts joined by spaces, ``polygon`` the
    rectangle along their mean direction around all of them, ``confidence`` the lowest of theirs."""

    boxes: tuple[Box, ...]
    polygon: np.ndarray

    @property
    def text(self) -> str:
        return " ".join(b.text for b in self.boxes)

    @property
    def confidence(self) -> float:
        return min(b.confidence for b in self.boxes)

    @property
    def height(self) -> float:
        p = self.polygon
        return 0.5 * (float(np.hypot(*(p[3] - p[0]))) + float(np.hypot(*(p[2] - p[1]))))


def _offset(a: Box, b: Box) -> float:
    """How far b's centre lies from a's centre line, across a's direction (px)."""
    u = a.direction
    d = b.centre - a.centre
    return abs(float(d[1] * u[0] - d[0] * u[1]))


def same_line(a: Box, b: Box) -> bool:
    """Whether boxes ``a`` and ``b`` sit on one line: each centre within :data:`SAME_LINE_OFFSET` of the
    smaller height from the other's centre line, and neither box more than twice the other's height."""
    low, high = sorted((a.height, b.height))
    if high > 2 * low:
        return False
    return max(_offset(a, b), _offset(b, a)) <= SAME_LINE_OFFSET * low


def rectangle_around(points: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """The rectangle [4, 2] with sides along ``direction`` (unit) and across it that encloses ``points``
    [N, 2], corners clockwise from the top left."""
    normal = np.array([-direction[1], direction[0]])
    along, across = points @ direction, points @ normal
    a0, a1, n0, n1 = along.min(), along.max(), across.min(), across.max()
    return np.array([a0 * direction + n0 * normal, a1 * direction + n0 * normal,
                     a1 * direction + n1 * normal, a0 * direction + n1 * normal])


def group_lines(boxes: Sequence[Box]) -> list[Line]:
    """``boxes`` joined into lines (any two boxes :func:`same_line` link, transitively), each line's boxes
    left to right along its direction, the lines top to bottom (by the height of their centre line at the
    mean centre of all boxes, so lines of a turned block keep their order)."""
    parent = list(range(len(boxes)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            if same_line(boxes[i], boxes[j]):
                parent[root(i)] = root(j)
    groups: dict[int, list[Box]] = {}
    for i, box in enumerate(boxes):
        groups.setdefault(root(i), []).append(box)
    lines = []
    for members in groups.values():
        weights = np.array([np.hypot(*(b.polygon[1] - b.polygon[0])) + 1e-6 for b in members])
        direction = (np.array([b.direction for b in members]) * weights[:, None]).sum(axis=0)
        direction = direction / np.hypot(*direction)
        members.sort(key=lambda b: float(b.centre @ direction))
        lines.append(Line(tuple(members), rectangle_around(np.concatenate([b.polygon for b in members]), direction)))
    if not lines:
        return []
    x0 = float(np.mean([b.centre[0] for b in boxes]))

    def height_at_x0(line: Line) -> float:
        centre = line.polygon.mean(axis=0)
        u = line.polygon[1] - line.polygon[0]
        slope = u[1] / u[0] if abs(u[0]) > 1e-6 else 0.0
        return float(centre[1] + (x0 - centre[0]) * slope)

    return sorted(lines, key=height_at_x0)


def inside(polygon: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Mask of the pixel centres (xs + 0.5, ys + 0.5) inside the convex ``polygon`` [4, 2] (clockwise on
    screen, y down)."""
    px, py = xs + 0.5, ys + 0.5
    mask = np.ones(np.broadcast(px, py).shape, dtype=bool)
    for k in range(len(polygon)):
        (x1, y1), (x2, y2) = polygon[k], polygon[(k + 1) % len(polygon)]
        mask &= (x2 - x1) * (py - y1) - (y2 - y1) * (px - x1) >= 0
    return mask


def _otsu(values: np.ndarray) -> float:
    """Otsu's threshold of ``values`` (1-D, any range) over 64 bins."""
    hist, edges = np.histogram(values, bins=64)
    hist = hist.astype(np.float64)
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = ((hist * centres).sum() - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    return float(edges[1 + int(np.argmax(w0 * w1 * (m0 - m1) ** 2))])


@dataclass(frozen=True)
class InkSettings:
    """How :func:`tighten` tells ink from background. ``ring``: the width, in shares of the line's height,
    of the band around the detector's polygon whose pixels are background (each column's, above and below
    the line, interpolated across it); ink is looked for inside the polygon only (looking 5% or 15% of the
    height beyond it caught more background than clipped ink). ``edge``: the share of the way from the
    local background to the text's colour a pixel must go to count as ink (its antialiased edge included).
    ``support``: the share of the fullest row's (column's) ink a row (column) needs to count, so specks of
    background that pass the threshold do not stretch the box. ``min_contrast``: the least distance (RGB,
    0..441) between the text's colour and the background for a pixel to say anything. The defaults are the
    best of a sweep on 160 scene-text images (docs/annotate.md)."""

    ring: float = 0.25
    edge: float = 0.35
    support: float = 0.02
    min_contrast: float = 24.0


def _column_medians(values: np.ndarray, mask: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Per column of ``values`` [h, w, 3], the median of the pixels ``mask`` [h, w] selects, [w, 3];
    ``fallback`` [3] for a column where it selects none. Columns without samples take their nearest
    sampled neighbour's value."""
    width = values.shape[1]
    out = np.empty((width, 3), dtype=np.float32)
    has = np.zeros(width, dtype=bool)
    for x in range(width):
        picked = values[mask[:, x], x]
        if len(picked):
            out[x] = np.median(picked, axis=0)
            has[x] = True
    if not has.any():
        out[:] = fallback
        return out
    sampled = np.flatnonzero(has)
    nearest = sampled[np.clip(np.searchsorted(sampled, np.arange(width)), 0, len(sampled) - 1)]
    left = sampled[np.clip(np.searchsorted(sampled, np.arange(width)) - 1, 0, len(sampled) - 1)]
    pick = np.where(np.abs(left - np.arange(width)) < np.abs(nearest - np.arange(width)), left, nearest)
    return out[pick]


def tighten(image: np.ndarray, polygon: np.ndarray, settings: InkSettings = InkSettings(),
            others: Sequence[np.ndarray] = ()) -> Optional[tuple[int, int, int, int]]:
    """The box [l, t, r, b] (r, b exclusive) of the ink of the line under ``polygon`` in ``image``
    uint8 [H, W, 3], or None when nothing in it stands out from its background.

    The background of each pixel is interpolated across the line between the colours of its column in a
    ring above and below the polygon (the polygons of the ``others`` lines excluded); the text's colour is
    the median of the pixels inside the polygon that Otsu's threshold puts far from their background; a
    pixel is ink when it lies at least ``settings.edge`` of the way from its background to that colour.
    """
    height_img, width_img = image.shape[:2]
    line_height = 0.5 * (float(np.hypot(*(polygon[3] - polygon[0]))) + float(np.hypot(*(polygon[2] - polygon[1]))))
    ring = max(2.0, settings.ring * line_height)
    pad = ring + 1
    l = max(0, int(math.floor(polygon[:, 0].min() - pad)))
    t = max(0, int(math.floor(polygon[:, 1].min() - pad)))
    r = min(width_img, int(math.ceil(polygon[:, 0].max() + pad)))
    b = min(height_img, int(math.ceil(polygon[:, 1].max() + pad)))
    if r - l < 3 or b - t < 3:
        return None
    region = image[t:b, l:r].astype(np.float32)
    ys, xs = np.mgrid[t:b, l:r]
    local = polygon.astype(np.float64)
    within = inside(local, xs, ys)
    background_ring = inside(_shrunk(local, -ring), xs, ys) & ~inside(_shrunk(local, -1.0), xs, ys)
    for other in others:
        background_ring &= ~inside(_shrunk(np.asarray(other, dtype=np.float64), -1.0), xs, ys)
    if background_ring.sum() < 4 or within.sum() < 4:
        return None
    # across: signed distance of each pixel from the line's centre line (negative above it)
    centre = local.mean(axis=0)
    normal = local[3] - local[0]
    normal = normal / max(float(np.hypot(*normal)), 1e-6)
    across = (xs + 0.5 - centre[0]) * normal[0] + (ys + 0.5 - centre[1]) * normal[1]
    fallback = np.median(region[background_ring], axis=0)
    above = _column_medians(region, background_ring & (across < 0), fallback)
    below = _column_medians(region, background_ring & (across >= 0), fallback)
    half = max(float(np.abs(across[background_ring]).max()), 1.0)
    share = np.clip((across + half) / (2 * half), 0.0, 1.0)[..., None]
    background = above[None, :, :] * (1 - share) + below[None, :, :] * share
    distance = np.linalg.norm(region - background, axis=2)
    level = _otsu(distance[within])
    far = within & (distance > level)
    if not far.any():
        return None
    text_colour = np.median(region[far], axis=0)
    towards_text = text_colour - background
    contrast2 = (towards_text ** 2).sum(axis=2)
    if float(np.sqrt(np.median(contrast2[within]))) < settings.min_contrast:
        return None
    # how far each pixel lies from its background towards the text colour (1: the text colour)
    towards = ((region - background) * towards_text).sum(axis=2) / np.maximum(contrast2, 1.0)
    ink = within & (towards >= settings.edge) & (contrast2 >= settings.min_contrast ** 2)
    rows, cols = ink.sum(axis=1), ink.sum(axis=0)
    if rows.max(initial=0) == 0:
        return None
    rows_kept = np.flatnonzero(rows >= max(1, settings.support * rows.max()))
    cols_kept = np.flatnonzero(cols >= max(1, settings.support * cols.max()))
    return (l + int(cols_kept[0]), t + int(rows_kept[0]), l + int(cols_kept[-1]) + 1, t + int(rows_kept[-1]) + 1)


def _shrunk(polygon: np.ndarray, distance: float) -> np.ndarray:
    """The rectangle ``polygon`` [4, 2] moved inwards by ``distance`` px on every side (outwards if negative)."""
    centre = polygon.mean(axis=0)
    along = polygon[1] - polygon[0]
    across = polygon[3] - polygon[0]
    u = along / max(float(np.hypot(*along)), 1e-6)
    n = across / max(float(np.hypot(*across)), 1e-6)
    half_w = max(0.5 * float(np.hypot(*along)) - distance, 0.5)
    half_h = max(0.5 * float(np.hypot(*across)) - distance, 0.5)
    return np.array([centre - half_w * u - half_h * n, centre + half_w * u - half_h * n,
                     centre + half_w * u + half_h * n, centre - half_w * u + half_h * n])


def union_box(boxes: Sequence[Sequence[float]]) -> Optional[list[int]]:
    """The smallest whole-pixel box [l, t, r, b] holding all ``boxes``; None for none."""
    if not boxes:
        return None
    return [int(math.floor(min(b[0] for b in boxes))), int(math.floor(min(b[1] for b in boxes))),
            int(math.ceil(max(b[2] for b in boxes))), int(math.ceil(max(b[3] for b in boxes)))]
