"""Specification of the annotation's filters and presets (textdiff/data/annotate_filters.py) and of the
outcome of one record under them (textdiff/data/annotate_merge.py)."""

from __future__ import annotations

import pytest

from textdiff.data.annotate_filters import PRESETS, AnnotationFilters, LineFacts, box_kind, image_skip, make_filters
from textdiff.data.annotate_merge import Tally, ocr_line, outcome

DEFAULT = AnnotationFilters()


def quad(l, t, r, b):
    return [[l, t], [r, t], [r, b], [l, b]]


def record(*boxes, width=256, height=256) -> dict:
    """A read record of ``boxes`` (text, confidence, [l, t, r, b]), each box's ink 2 px inside it."""
    return {"key": "k", "source": "k.png", "status": "read", "reason": None, "width": width, "height": height,
            "format": "PNG", "captions": None,
            "boxes": [{"text": text, "confidence": conf, "polygon": quad(*box),
                       "ink": [box[0] + 2, box[1] + 2, box[2] - 2, box[3] - 2]} for text, conf, box in boxes]}


# --- boxes -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, confidence, kind", [
    ("OPEN", 0.95, "text"), ("OPEN", 0.5, "text"), ("OPEN", 0.49, "unreadable"), ("OPEN", 0.29, "noise"),
    ("8", 0.66, "noise"), ("8", 0.92, "text"), ("福", 0.49, "noise"), (")", 0.95, "text"), ("..", 0.7, "noise"),
    ("A1", 0.6, "text"),
])
def test_box_kind_under_the_default_filters(text, confidence, kind):
    assert box_kind(text, confidence, DEFAULT) == kind


def test_a_record_of_noise_alone_is_a_text_free_image():
    result = outcome(record(("8", 0.66, (100, 100, 160, 180)), ("APOR", 0.23, (10, 10, 60, 30))), DEFAULT)
    assert (result.kind, result.transcription, result.safebox, len(result.noise)) == ("text_free", "", None, 2)


def test_noise_beside_a_line_does_not_join_it():
    result = outcome(record(("rut", 0.9, (200, 148, 230, 160)), ("0", 0.09, (232, 149, 240, 160))), DEFAULT)
    assert result.transcription == "rut" and result.safebox == [202, 150, 228, 158]


def test_lines_are_joined_in_reading_order_and_the_safebox_is_the_union_of_their_ink():
    result = outcome(record(("world", 0.9, (70, 20, 120, 40)), ("hello", 0.95, (10, 21, 60, 41)),
                            ("again", 0.9, (10, 60, 60, 80))), DEFAULT)
    assert result.kind == "text" and result.transcription == "hello world\nagain"
    assert result.safebox == [12, 22, 118, 78]
    assert [line["box"] for line in result.lines] == [[12, 22, 118, 39], [12, 62, 58, 78]]


def test_unreadable_text_drops_the_image_or_is_kept_as_read():
    unreadable = record(("OPEN", 0.95, (10, 10, 60, 30)), ("Bakery", 0.4, (10, 40, 70, 60)))
    dropped = outcome(unreadable, DEFAULT)
    assert dropped.kind == "unreadable_text" and "'Bakery' read at confidence 0.40" in dropped.reason
    kept = outcome(unreadable, make_filters(unreadable="keep"))
    assert (kept.kind, kept.transcription, kept.unreadable_kept) == ("text", "OPEN\nBakery", True)


def test_an_unreadable_record_keeps_its_skip_kind():
    bad = {"key": "k", "source": "k.png", "status": "bad_image", "reason": "truncated", "captions": None}
    assert (outcome(bad, DEFAULT).kind, outcome(bad, DEFAULT).reason) == ("bad_image", "truncated")


# --- image filters -------------------------------------------------------------------------------------------


def line(text="HELLO", box=(10, 10, 110, 30)):
    return LineFacts(text, box)


@pytest.mark.parametrize("filters, lines, size, kind", [
    (make_filters(max_lines=2), [line(), line(), line()], (256, 256), "too_many_lines"),
    (make_filters(max_lines=3), [line(), line(), line()], (256, 256), None),
    (make_filters(min_text_height_px=21), [line()], (256, 256), "text_too_small"),
    (make_filters(min_text_height_px=20), [line()], (256, 256), None),
    (make_filters(min_text_height_frac=0.1), [line()], (256, 256), "text_too_small"),  # 20 px < 25.6 px
    (make_filters(min_text_height_frac=0.05), [line()], (256, 256), None),
    # 100 x 20 px over 5 characters: 400 px each = 0.0061 of 256 x 256
    (make_filters(min_char_area_frac=0.007), [line()], (256, 256), "text_too_small"),
    (make_filters(min_char_area_frac=0.006), [line()], (256, 256), None),
    (make_filters(min_image_side=300), [], (400, 256), "too_small"),
    (make_filters(text_free="drop"), [], (256, 256), "text_free_dropped"),
    (DEFAULT, [], (256, 256), None),
])
def test_each_image_filter_skips_exactly_past_its_threshold(filters, lines, size, kind):
    safebox = [10, 10, 110, 30] if lines else None
    skip = image_skip(lines, *size, safebox, filters)
    assert (skip[0] if skip else None) == kind


def test_max_text_area_skips_an_image_mostly_covered_by_text():
    full = [line(box=(0, 0, 200, 200))]
    assert image_skip(full, 256, 256, [0, 0, 200, 200], make_filters(max_text_area_frac=0.6))[0] == "text_too_large"
    assert image_skip(full, 256, 256, [0, 0, 200, 200], make_filters(max_text_area_frac=0.62)) is None  # 0.61


def test_skip_reasons_name_the_flag_and_the_numbers():
    kind, reason = image_skip([line()], 256, 256, [10, 10, 110, 30], make_filters(min_text_height_px=24))
    assert reason == "line 'HELLO' is 20 px high, below --min-text-height-px 24"


# --- presets ---------------------------------------------------------------------------------------------------


def test_presets_are_default_glyphdraw_and_permissive_with_documented_values():
    assert list(PRESETS) == ["default", "glyphdraw", "permissive"]
    glyphdraw = PRESETS["glyphdraw"]
    assert (glyphdraw.min_confidence, glyphdraw.max_lines, glyphdraw.text_free, glyphdraw.min_char_area_frac) == \
        (0.9, 3, "drop", 0.001)
    permissive = PRESETS["permissive"]
    assert (permissive.min_confidence, permissive.unreadable, permissive.min_text_height_px) == (0.3, "keep", 0.0)


def test_glyphdraw_keeps_only_text_images_of_1_to_3_confident_lines():
    glyphdraw = PRESETS["glyphdraw"]
    three = record(*[(f"line{i}", 0.95, (10, 10 + 30 * i, 110, 34 + 30 * i)) for i in range(3)])
    four = record(*[(f"line{i}", 0.95, (10, 10 + 30 * i, 110, 34 + 30 * i)) for i in range(4)])
    doubtful = record(("OPEN", 0.85, (10, 10, 110, 34)))
    assert [outcome(r, glyphdraw).kind for r in (three, four, doubtful, record())] == \
        ["text", "too_many_lines", "unreadable_text", "text_free_dropped"]
    assert outcome(doubtful, DEFAULT).kind == "text"


def test_a_flag_beside_a_preset_overrides_its_value():
    assert make_filters("glyphdraw", max_lines=5).max_lines == 5
    assert make_filters("glyphdraw", max_lines=None).max_lines == 3


@pytest.mark.parametrize("overrides, message", [
    ({"min_confidence": 1.5}, "--min-confidence 1.5 must lie in 0..1"),
    ({"max_lines": -1}, "--max-lines -1 must be >= 0"),
    ({"noise_confidence": 0.6}, "--noise-confidence 0.6 is above --min-confidence 0.5"),
    ({"unreadable": "maybe"}, "--unreadable 'maybe': choose drop, keep or mask"),
])
def test_impossible_filter_values_are_refused_naming_the_flag(overrides, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
        make_filters(**overrides)


def test_an_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="--preset 'strict' is unknown; choose one of default, glyphdraw, permissive"):
        make_filters("strict")


# --- --unreadable mask ---------------------------------------------------------------------------------------

MASK = make_filters(unreadable="mask")


def test_unreadable_mask_keeps_the_readable_lines_and_lists_the_unreadable_ones_ink_boxes():
    result = outcome(record(("OPEN", 0.95, (10, 10, 60, 30)), ("Bakery", 0.4, (10, 40, 70, 60))), MASK)
    assert (result.kind, result.transcription) == ("text", "OPEN")
    assert result.unreadable == ([12, 42, 68, 58],)
    assert result.safebox == [12, 12, 68, 58]  # both lines: a crop must not cut the masked text out either
    assert not result.unreadable_kept and len(result.lines) == 2


def test_a_line_with_one_unreadable_word_is_masked_whole():
    result = outcome(record(("world", 0.4, (70, 20, 120, 40)), ("hello", 0.95, (10, 21, 60, 41)),
                            ("again", 0.9, (10, 60, 60, 80))), MASK)
    assert result.transcription == "again" and result.unreadable == ([12, 22, 118, 39],)


def test_an_image_whose_every_line_is_unreadable_is_skipped_under_mask_as_under_drop():
    result = outcome(record(("Bakery", 0.4, (10, 40, 70, 60)), ("OPEN", 0.45, (10, 10, 60, 30))), MASK)
    assert result.kind == "unreadable_text" and not result.kept
    assert result.reason == ("line 'Bakery' read at confidence 0.40, below --min-confidence 0.5 (no line is readable, "
                             "and --unreadable mask keeps an image only with a transcription to train on)")


def test_under_mask_the_line_filters_see_the_transcribed_lines_only():
    # the unreadable line's ink is 4 px high, below --min-text-height-px 6: it would skip the image as read
    small = record(("OPEN", 0.95, (10, 10, 60, 30)), ("tiny", 0.4, (10, 50, 40, 58)))
    assert outcome(small, make_filters(unreadable="keep")).kind == "text_too_small"
    masked = outcome(small, MASK)
    assert (masked.kind, masked.transcription, masked.unreadable) == ("text", "OPEN", ([12, 52, 38, 56],))
    assert outcome(small, make_filters(unreadable="mask", max_lines=1)).kind == "text"  # 1 line transcribed
    # the safebox of both lines ([12, 12, 58, 56]: 46 x 44 px = 0.49 of 64 x 64; the readable line's alone
    # would be 0.18) is what --max-text-area-frac measures
    big = record(("OPEN", 0.95, (10, 10, 60, 30)), ("tiny", 0.4, (10, 50, 40, 58)), width=64, height=64)
    assert outcome(big, make_filters(unreadable="mask", max_text_area_frac=0.4)).reason == \
        "the text covers 0.49 of the image, above --max-text-area-frac 0.4"


def test_masked_images_and_lines_are_counted_and_listed_in_ocr_jsonl():
    tally = Tally()
    rec = record(("OPEN", 0.95, (10, 10, 60, 30)), ("Bakery", 0.4, (10, 40, 70, 60)), ("Fresh", 0.3, (10, 70, 70, 90)))
    result = outcome(rec, MASK)
    tally.add(result)
    tally.add(outcome(record(("OPEN", 0.95, (10, 10, 60, 30))), MASK))
    counts = tally.to_json()
    assert (counts["with_text"], counts["lines"], counts["unreadable_masked"], counts["masked_lines"]) == (2, 4, 1, 2)
    assert counts["unreadable_kept"] == 0
    row = ocr_line(rec, result, "test")
    assert row["unreadable"] == [[12, 42, 68, 58], [12, 72, 68, 88]] and row["transcription"] == "OPEN"
