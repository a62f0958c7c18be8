"""Specification of the PP-OCR engine (textdiff/ocr/ppocr.py): PP-OCRv4 from the rapidocr-onnxruntime wheel's
models, nothing downloaded."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

import textdiff.ocr
from textdiff.data.scene_text import load_assets, render_scene, scene_rng
from textdiff.ocr.ppocr import (PpOcrEngine, ctc_decode, detection_size, order_corners, reading_order,
                                settings_of)

pytest.importorskip("rapidocr_onnxruntime", reason="the annotate extra (pip install -e '.[annotate]')")

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"  # fonts-dejavu-core (tools/setup_env.sh)


def render(lines: list[str], size=(256, 128), px=26, colour=(20, 20, 20), ground=(235, 230, 220)) -> Image.Image:
    """``lines`` drawn one under another from (12, 12), ``px`` apart by 1.5."""
    image = Image.new("RGB", size, ground)
    draw = ImageDraw.Draw(image)
    font = ImageFont.truetype(FONT, px)
    for i, text in enumerate(lines):
        draw.text((12, 12 + int(1.5 * px) * i), text, fill=colour, font=font)
    return image


@pytest.fixture(scope="module")
def engine() -> PpOcrEngine:
    return PpOcrEngine()


def test_registered_as_ppocr_and_built_by_name():
    assert "ppocr" in textdiff.ocr.engine_names()
    assert textdiff.ocr.make_engine("ppocr", det_min_side=512).settings.det_min_side == 512


def test_reads_two_clean_lines_exactly_with_their_word_spaces(engine):
    reading = engine.read([render(["OPEN 24 HOURS", "fresh bread"])], progress=False)[0]
    assert reading.text == "OPEN 24 HOURS\nfresh bread"
    assert [line.text for line in reading.lines] == ["OPEN 24 HOURS", "fresh bread"]
    assert all(0.9 <= line.confidence <= 1.0 for line in reading.lines)
    assert reading.words == (("OPEN", pytest.approx(100 * reading.lines[0].confidence)),
                             ("24", pytest.approx(100 * reading.lines[0].confidence)),
                             ("HOURS", pytest.approx(100 * reading.lines[0].confidence)),
                             ("fresh", pytest.approx(100 * reading.lines[1].confidence)),
                             ("bread", pytest.approx(100 * reading.lines[1].confidence)))


def test_line_polygons_enclose_the_ink_in_the_given_images_pixels(engine):
    image = render(["Station"], size=(320, 96), px=30)
    ink = np.argwhere((np.asarray(image.convert("L")) < 128))
    (line,) = engine.read([image], progress=False)[0].lines
    left, top, right, bottom = line.box
    assert left <= ink[:, 1].min() and right >= ink[:, 1].max() and top <= ink[:, 0].min() and bottom >= ink[:, 0].max()
    assert right - left < 1.4 * (ink[:, 1].max() - ink[:, 1].min())  # padded, but not by more than 40%
    assert len(line.polygon) == 4


def test_a_64_px_render_is_read_as_the_spelling_evaluation_gives_it(engine):
    assert engine.read([render(["Moth"], size=(64, 64), px=18)], progress=False)[0].text == "Moth"


def test_scene_text_photographs_are_read_within_5_percent_cer(engine):
    from rapidfuzz.distance import Levenshtein

    assets = load_assets()
    scenes = [render_scene(scene_rng(11, i), 256, assets) for i in range(4)]
    readings = engine.read([s.image for s in scenes], progress=False)
    errors = sum(Levenshtein.distance(" ".join(r.text.split()), " ".join(s.transcription.split()))
                 for r, s in zip(readings, scenes))
    assert errors / sum(len(s.transcription) for s in scenes) <= 0.05


def test_a_plain_image_has_no_lines(engine):
    gradient = np.tile(np.linspace(40, 220, 256, dtype=np.uint8)[None, :, None], (192, 1, 3))
    assert engine.read([gradient], progress=False)[0].lines == ()


def test_two_workers_read_what_one_process_reads(engine):
    images = [render([w]) for w in ("alpha", "beta", "gamma", "delta")]
    assert engine.read(images, workers=2, progress=False) == engine.read(images, progress=False)


def test_version_names_rapidocr_onnxruntime_and_the_model_files(engine):
    version = engine.version()
    assert version.startswith("rapidocr-onnxruntime 1.4") and "onnxruntime 1." in version
    assert "ch_PP-OCRv4_det_infer.onnx + ch_PP-OCRv4_rec_infer.onnx" in version
    assert "cls" not in version and "ch_ppocr_mobile_v2.0_cls_infer.onnx" in PpOcrEngine(use_angle_cls=True).version()


def test_unknown_and_out_of_range_settings_are_refused_naming_them():
    with pytest.raises(ValueError, match="ppocr has no setting 'det_side'; its settings are .*det_min_side"):
        settings_of({"det_side": 512})
    with pytest.raises(ValueError, match="ppocr setting drop_score=1.5 must be in 0..1"):
        settings_of({"drop_score": 1.5})
    with pytest.raises(ValueError, match="det_max_side=100 must be >= det_min_side"):
        settings_of({"det_max_side": 100})


def test_detection_size_brings_the_short_side_up_and_the_long_side_down_in_multiples_of_32():
    assert detection_size(256, 256, 384, 1536) == (384, 384)
    assert detection_size(64, 32, 384, 1536) == (768, 384)
    assert detection_size(1024, 768, 384, 1536) == (1024, 768)
    assert detection_size(4000, 1000, 384, 1536) == (1536, 384)


def test_ctc_decode_collapses_repeats_and_puts_a_space_where_the_space_class_reaches_space_score():
    characters = ["blank", "a", "b", " "]

    def frames(*rows):
        return np.array(rows, dtype=np.float32)

    # frames: a a blank b | the blank frame gives the space 0.1
    probs = frames([0.0, 0.9, 0.1, 0.0], [0.0, 0.9, 0.1, 0.0], [0.8, 0.0, 0.1, 0.1], [0.0, 0.1, 0.9, 0.0])
    assert ctc_decode(probs, characters, space_score=0.05) == ("a b", pytest.approx(0.9))
    assert ctc_decode(probs, characters, space_score=0.2) == ("ab", pytest.approx(0.9))
    assert ctc_decode(frames([1.0, 0, 0, 0]), characters, 0.05) == ("", 0.0)


def test_corners_come_clockwise_from_the_top_left_and_rows_read_left_to_right():
    square = np.array([[10, 20], [0, 0], [10, 0], [0, 20]], dtype=np.float32)
    assert order_corners(square).tolist() == [[0, 0], [10, 0], [10, 20], [0, 20]]

    def box(x, y, w=30, h=10):
        return np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], dtype=np.float32)

    # a row of two boxes 2 px apart in height, and a line below
    assert reading_order([box(0, 40), box(50, 2), box(0, 0)]) == [2, 1, 0]
