"""Tesseract OCR: preprocessing of small images, batched reading in order, and the missing-program error."""

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from textdiff.config import EvalConfig
from textdiff.eval.ocr import (TesseractMissingError, glyph_upscale_factor, ink_height, ocr_image, ocr_images, preprocess,
                              to_pil, upscale_factor)


def render(text: str, size: int = 64, font_px: int = 12, bg=(230, 225, 200), fg=(20, 30, 60)) -> Image.Image:
    image = Image.new("RGB", (size, size), bg)
    ImageDraw.Draw(image).text((3, size // 2 - font_px // 2), text, fill=fg, font=ImageFont.load_default(size=font_px))
    return image


def test_upscale_factor_is_the_whole_factor_nearest_ocr_height():
    assert [upscale_factor(h, 192) for h in (32, 64, 100, 128, 256, 1024)] == [6, 3, 2, 2, 1, 1]


def test_preprocess_upscales_to_about_ocr_height_and_adds_a_margin():
    out = preprocess(render("abc"), EvalConfig(ocr_height=256))
    # 64 * 4 = 256 px, plus a margin of 256 // 8 = 32 px on each side
    assert out.mode == "L" and out.size == (320, 320)


def test_preprocess_turns_light_text_on_dark_into_dark_on_light():
    cfg = EvalConfig(ocr_height=64, ocr_binarize=False)
    out = np.asarray(preprocess(render("abc", bg=(10, 10, 30), fg=(250, 250, 250)), cfg))
    assert np.median(out) == 255
    assert out.min() < 64


def test_preprocess_binarize_leaves_two_levels():
    out = np.asarray(preprocess(render("abc"), EvalConfig(ocr_height=128, ocr_binarize=True)))
    assert set(np.unique(out).tolist()) == {0, 255}


def test_to_pil_rejects_float_and_channels_first_arrays():
    with pytest.raises(TypeError, match="uint8"):
        to_pil(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"transpose\(1, 2, 0\)"):
        to_pil(np.zeros((3, 8, 8), np.uint8))


def test_reads_a_word_rendered_at_64px():
    assert ocr_image(render("lantern"), EvalConfig()).text == "lantern"


def test_reads_light_text_on_a_dark_background():
    assert ocr_image(render("copper", bg=(20, 20, 40), fg=(240, 230, 90)), EvalConfig()).text == "copper"


def test_reads_a_uint8_array_like_a_pil_image():
    assert ocr_image(np.asarray(render("summit")), EvalConfig()).text == "summit"


def test_many_images_over_several_workers_keep_their_order():
    # 40 images make two Tesseract chunks (32 + 8) that run side by side
    words = ["ember", "falcon", "violet", "ripple"] * 10
    readings = ocr_images([render(w) for w in words], EvalConfig(), workers=2, progress=False)
    assert [r.text for r in readings] == words


def test_blank_image_reads_as_no_letters():
    reading = ocr_image(Image.new("RGB", (64, 64), (128, 140, 160)), EvalConfig())
    assert not any(ch.isalnum() for ch in reading.text)


def test_missing_tesseract_named_in_config_says_to_install_tesseract_ocr():
    with pytest.raises(TesseractMissingError, match="install the tesseract-ocr package") as err:
        ocr_image(render("x"), EvalConfig(tesseract_cmd="no-such-tesseract-binary"))
    assert "eval.tesseract_cmd" in str(err.value)


def test_tesseract_absent_from_path_gives_the_same_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(TesseractMissingError, match="tesseract-ocr"):
        ocr_image(render("x"), EvalConfig())


def test_psm_6_reads_two_lines_that_psm_7_cannot():
    image = render("river")
    ImageDraw.Draw(image).text((3, 44), "otter", fill=(20, 30, 60), font=ImageFont.load_default(size=12))
    assert ocr_image(image, EvalConfig(psm=6)).text == "river\notter"
    assert ocr_image(image, EvalConfig(psm=7)).text != "river\notter"


def test_ink_height_spans_the_inked_rows_and_ignores_a_speck():
    gray = np.full((32, 32), 255, np.uint8)
    gray[10:20, 4:28] = 0  # a 10-row bar of 24 px per row
    gray[2, 3] = 0  # one dark pixel: under 5% of the fullest row
    assert ink_height(gray) == 10
    assert ink_height(np.full((8, 8), 255, np.uint8)) == 0


def test_glyph_upscale_brings_the_ink_to_the_glyph_height_capped_by_ocr_height():
    gray = np.full((32, 32), 255, np.uint8)
    gray[11:21, 4:28] = 0  # 10 px ink
    assert glyph_upscale_factor(gray, EvalConfig(ocr_glyph_height=40, ocr_height=192)) == 4  # 40 / 10
    assert glyph_upscale_factor(gray, EvalConfig(ocr_glyph_height=40, ocr_height=96)) == 3  # 96 / 32 caps it
    assert glyph_upscale_factor(gray, EvalConfig(ocr_glyph_height=0, ocr_height=192)) == 6  # off: 192 / 32
    noise = np.random.default_rng(0).integers(0, 256, (32, 32)).astype(np.uint8)  # ink in every row
    assert glyph_upscale_factor(noise, EvalConfig(ocr_glyph_height=40, ocr_height=192)) == 6


def test_the_whitelist_keeps_tesseract_to_the_listed_characters():
    image = render("4711", size=64, font_px=20)
    assert ocr_image(image, EvalConfig(whitelist="0123456789", ocr_glyph_height=40)).text == "4711"
    restricted = ocr_image(image, EvalConfig(whitelist="abc", ocr_glyph_height=40)).text
    assert not any(c.isdigit() for c in restricted)


def test_an_empty_one_line_reading_is_read_again_in_the_retry_mode():
    """Tesseract 5's one-line mode (psm 7) returns nothing for some clean 32 px digit renders (8 of 220 held-out
    renders of the spelling experiment); word mode (psm 8) reads them. This render of "544" is one of them."""
    from textdiff.experiments.spelling_set import render_rng, render_string

    image = render_string("544", render_rng(7919, "544", 118), 32)[0]
    cfg = EvalConfig(whitelist="0123456789", ocr_glyph_height=40)
    assert ocr_image(image, cfg).text == ""
    assert ocr_image(image, EvalConfig(whitelist="0123456789", ocr_glyph_height=40, ocr_retry_psm=8)).text == "544"
