"""Specification of an annotation's geometry (textdiff/data/annotate_lines.py): boxes grouped into lines in
reading order, line boxes tightened to the ink, the safebox."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from textdiff.data.annotate_lines import Box, InkSettings, group_lines, inside, rectangle_around, tighten, union_box

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"  # fonts-dejavu-core (tools/setup_env.sh)


def rect(x: float, y: float, w: float, h: float, angle_deg: float = 0.0) -> np.ndarray:
    """A w x h rectangle with its top-left corner at (x, y), turned ``angle_deg`` (clockwise on screen) about it."""
    a = math.radians(angle_deg)
    u, n = np.array([math.cos(a), math.sin(a)]), np.array([-math.sin(a), math.cos(a)])
    origin = np.array([x, y])
    return np.array([origin, origin + w * u, origin + w * u + h * n, origin + h * n])


def box(text: str, x: float, y: float, w: float = 40, h: float = 16, angle_deg: float = 0.0) -> Box:
    return Box(text, 0.95, rect(x, y, w, h, angle_deg))


def texts(lines) -> list[str]:
    return [line.text for line in lines]


def test_boxes_on_one_row_become_one_line_read_left_to_right():
    lines = group_lines([box("world", 60, 12), box("hello", 10, 10), box("below", 10, 40)])
    assert texts(lines) == ["hello world", "below"]
    assert [b.text for b in lines[0].boxes] == ["hello", "world"]


def test_lines_come_top_to_bottom_whatever_the_order_of_the_boxes():
    shuffled = [box("three", 10, 90), box("one", 10, 10), box("two", 10, 50)]
    assert texts(group_lines(shuffled)) == ["one", "two", "three"]


def test_a_box_half_a_height_off_the_row_starts_a_new_line():
    # centres 8 px apart with 16 px boxes: 0.5 of the height -> same line; 9 px: a new one
    assert texts(group_lines([box("a1", 10, 10), box("b1", 60, 18)])) == ["a1 b1"]
    assert texts(group_lines([box("a1", 10, 10), box("b1", 60, 19)])) == ["a1", "b1"]


def test_boxes_of_very_different_heights_stay_apart():
    # centres 2 px apart (y 30 and 32) would make one line, but 40 px is more than twice 12 px
    assert texts(group_lines([box("BIG", 10, 10, 80, 40), box("small", 100, 26, 40, 12)])) == ["BIG", "small"]


def test_a_turned_line_keeps_its_words_together_and_its_lines_in_order():
    # two lines turned 5 degrees: the right end of each sits 8.7 px lower than its left end
    turned = [box("far", 110, 10 + 110 * math.tan(math.radians(5)), 60, 14, 5), box("near", 10, 10, 90, 14, 5),
              box("second", 10, 36, 90, 14, 5)]
    lines = group_lines(turned)
    assert texts(lines) == ["near far", "second"]
    top_edge = lines[0].polygon[1] - lines[0].polygon[0]
    assert math.degrees(math.atan2(top_edge[1], top_edge[0])) == pytest.approx(5.0, abs=0.5)


def test_line_polygon_encloses_its_boxes_and_confidence_is_the_lowest():
    lines = group_lines([Box("a", 0.9, rect(10, 10, 20, 10)), Box("b", 0.6, rect(40, 12, 20, 10))])
    (line,) = lines
    assert line.confidence == 0.6
    assert line.polygon.min(axis=0).tolist() == pytest.approx([10, 10]) and line.polygon.max(axis=0).tolist() == \
        pytest.approx([60, 22])


def test_rectangle_around_points_along_a_direction():
    points = np.array([[0, 0], [10, 0], [10, 5]], dtype=float)
    assert rectangle_around(points, np.array([1.0, 0.0])).tolist() == [[0, 0], [10, 0], [10, 5], [0, 5]]


def test_inside_marks_pixel_centres_in_a_polygon():
    ys, xs = np.mgrid[0:4, 0:4]
    assert inside(rect(1, 1, 2, 2), xs, ys).sum() == 4


def render_word(text: str, ground=(40, 90, 160), ink=(250, 240, 200), size=(200, 80), at=(30, 20), px=28):
    image = Image.new("RGB", size, ground)
    ImageDraw.Draw(image).text(at, text, fill=ink, font=ImageFont.truetype(FONT, px))
    array = np.asarray(image)
    changed = np.argwhere((array != np.array(ground)).any(axis=2))
    truth = (changed[:, 1].min(), changed[:, 0].min(), changed[:, 1].max() + 1, changed[:, 0].max() + 1)
    return array, truth


def test_tighten_finds_the_ink_box_of_a_padded_detector_box_within_1px():
    array, (l, t, r, b) = render_word("Harbour")
    padded = rect(l - 6, t - 5, (r - l) + 12, (b - t) + 10)  # the detector grows a box by about half a letter
    found = tighten(array, padded)
    assert found is not None
    assert np.abs(np.array(found) - np.array([l, t, r, b])).max() <= 1


def test_tighten_follows_a_background_that_changes_along_the_line():
    array, (l, t, r, b) = render_word("Harbour")
    shade = np.linspace(0.6, 1.3, array.shape[1])[None, :, None]
    ground = (array == np.array([40, 90, 160])).all(axis=2, keepdims=True)
    graded = np.where(ground, np.clip(array * shade, 0, 255), array).astype(np.uint8)
    found = tighten(graded, rect(l - 6, t - 5, (r - l) + 12, (b - t) + 10))
    assert np.abs(np.array(found) - np.array([l, t, r, b])).max() <= 1


def test_tighten_gives_none_without_contrast():
    flat = np.full((60, 120, 3), 128, dtype=np.uint8)
    assert tighten(flat, rect(10, 10, 80, 30)) is None


def test_a_neighbouring_lines_ink_is_not_taken_for_background():
    array, (l, t, r, b) = render_word("Harbour", size=(200, 110))
    lower, (_, t2, _, b2) = render_word("Quay", size=(200, 110), at=(30, 52))
    both = np.where((lower != np.array([40, 90, 160])).any(axis=2)[..., None], lower, array)
    found = tighten(both, rect(l - 6, t - 5, (r - l) + 12, (b - t) + 10),
                    others=[rect(l - 6, t2 - 5, 80, (b2 - t2) + 10)])
    assert np.abs(np.array(found) - np.array([l, t, r, b])).max() <= 1


def test_ink_settings_default_to_the_calibrated_values():
    assert InkSettings() == InkSettings(ring=0.25, edge=0.35, support=0.02, min_contrast=24.0)


def test_union_box_rounds_outward_and_is_none_for_no_boxes():
    assert union_box([[1.2, 2.8, 10.1, 5.0], [3, 1.5, 7, 9.2]]) == [1, 1, 11, 10]
    assert union_box([]) is None
